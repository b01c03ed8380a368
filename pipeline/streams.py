"""Features caches as training data: what a cache's layout holds, and every video's rows with
the streams concatenated along the feature axis.

Cache layouts (the cache's "layout" attribute; "(T, D)" when it has none):
- "(T, D)": one sequence per video. T may differ between videos (3D clips: K_v = floor(l_v/8) - 1).
- "(V, T, D)": V views per video (10-crop kept as an axis, MRRN's clips; V may differ between
  videos). Each view is a training sample with its video's label; a video's score is the mean of
  its views' softmax scores, and out-of-fold folds never split a video's views.
- "(T, C, H, W)", "(V, T, C, H, W)": conv maps, for the heads in MAP_HEADS (TSRNN).
Sequences of unequal length (between videos, views or streams) are all brought to one number of
steps, given or the shortest sequence's length, by Res-LSTM's sigma(t)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache import CacheError, FeatureCache, open_cache
from pipeline.engine import mean_over_views
from pipeline.steps import sigma

log = logging.getLogger(__name__)


class StreamError(ValueError):
    """Caches that cannot be trained on as asked; names the cache and the reason."""


# layout -> (has a view axis, conv maps)
LAYOUTS = {
    "(T, D)": (False, False),
    "(V, T, D)": (True, False),
    "(T, C, H, W)": (False, True),
    "(V, T, C, H, W)": (True, True),
}
# Heads whose forward takes conv maps (B, T, C, H, W); every other head needs (B, T, D).
MAP_HEADS = ("tsrnn",)


@dataclass(frozen=True)
class Stream:
    """One --features cache: what its attributes say it holds."""

    name: str  # rgb / flow (from --stream), for messages
    cache: FeatureCache
    layout: str
    views: bool
    maps: bool
    backbone: str
    dim: int | None  # the "dim" attribute: D of vector layouts (not checked for maps)
    levels: list[int] | None  # per-level dims of multi-level taps, concatenated along D


@dataclass
class Features:
    """Every video's training rows, streams concatenated along the feature axis."""

    videos: dict[str, list[np.ndarray]]  # id -> its views, each (T, D) or (T, C, H, W)
    dims: list[int]  # feature size per stream: D, or C for maps
    backbones: list[str]
    views: bool  # some stream has a view axis
    maps: bool
    steps: int | None  # the T every sequence was resampled to; None = as cached
    layouts: list[str]  # each stream's cache layout, e.g. "(V, T, D)"


def open_streams(
    dirs: list[Path], names: list[str], expected: list[dict] | None = None
) -> list[Stream]:
    """Open each feature stage's cache and read its layout. ``expected``: one params_identity
    per cache, compared with the cache's ``params`` attribute (StreamError on a difference)."""
    if expected is not None and len(expected) != len(dirs):
        raise StreamError(f"{len(expected)} expected params for {len(dirs)} caches {dirs}")
    streams = []
    for i, d in enumerate(dirs):
        cache = open_cache(d / "cache", "r")
        name = names[i] if len(names) == len(dirs) else str(d)
        if expected is not None:
            try:
                cache.check_attrs({"params": expected[i]})
            except CacheError as e:
                raise StreamError(f"features.{name} in params.yaml: {e}") from None
        attrs = cache.attrs
        layout = str(attrs.get("layout", "(T, D)"))
        if layout not in LAYOUTS:
            raise StreamError(
                f"{cache.root}: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})"
            )
        levels = attrs.get("levels")
        streams.append(
            Stream(
                name=name,
                cache=cache,
                layout=layout,
                views=LAYOUTS[layout][0],
                maps=LAYOUTS[layout][1],
                backbone=str(attrs.get("backbone")),
                dim=int(attrs["dim"]) if attrs.get("dim") is not None else None,
                levels=[int(v) for v in levels] if levels is not None else None,
            )
        )
    if len({s.maps for s in streams}) > 1:
        raise StreamError(
            "cannot concatenate conv maps with vectors: "
            + ", ".join(f"{s.cache.root} is {s.layout}" for s in streams)
        )
    return streams


def check_head(head: str, model_kwargs: dict, streams: list[Stream]) -> None:
    """Fail before training when the head cannot take what the caches hold."""
    where = ", ".join(str(s.cache.root) for s in streams)
    if streams[0].maps and head not in MAP_HEADS:
        raise StreamError(
            f"head '{head}' takes (B, T, D) features, but {where} holds conv maps "
            f"(layout {streams[0].layout}); only {', '.join(MAP_HEADS)} take maps: train "
            f"'{head}' on pooled or taps features (features.<stream>.output)"
        )
    if model_kwargs.get("levels") is not None:
        want = [int(v) for v in model_kwargs["levels"]]
        have = (
            [d for s in streams for d in s.levels]  # type: ignore[union-attr]
            if all(s.levels is not None for s in streams)
            else None
        )
        if want != have:
            cached = f"levels {have}" if have is not None else "no levels (not multi-level taps)"
            raise StreamError(
                f"heads.{head}.levels is {want} in params.yaml, but {where} has {cached}; "
                f"set heads.{head}.levels to the cache's levels, or null for one stack over all D"
            )


def _feature_size(s: Stream, vid: str, arr: np.ndarray) -> int:
    """D of a (..., T, D) array or C of a (..., T, C, H, W) one, after checking the shape."""
    ndim = 2 + LAYOUTS[s.layout][0] + 2 * LAYOUTS[s.layout][1]
    if arr.ndim != ndim or 0 in arr.shape:
        raise StreamError(
            f"{s.cache.root}: '{vid}' has shape {arr.shape}, not the cache's layout {s.layout}"
        )
    if s.maps:
        return int(arr.shape[-3])
    if s.dim is not None and arr.shape[-1] != s.dim:
        raise StreamError(
            f"{s.cache.root}: '{vid}' has {arr.shape[-1]} features, the cache says dim {s.dim}"
        )
    return int(arr.shape[-1])


def common_steps(lengths: list[int], steps: int | None) -> int | None:
    """The T every sequence is brought to: ``steps``, or the shortest of ``lengths`` when they
    differ; None when ``steps`` is None and all lengths are equal (the sequences stay as cached)."""
    if steps is not None:
        if steps < 1:
            raise StreamError(f"steps must be >= 1 or null, got {steps}")
        return steps
    return min(lengths) if len(set(lengths)) > 1 else None


def resample(x: np.ndarray, t: int) -> np.ndarray:
    """x: (K, ...) -> (t, ...), the steps sigma(K, t) (Res-LSTM section 3.1): evenly spread,
    first and last kept, steps repeated when K < t."""
    if len(x) == t:
        return x
    return x[sigma(len(x), t)]


def load_features(streams: list[Stream], ids: list[str], *, steps: int | None = None) -> Features:
    """The views of ``ids`` in every stream, each brought to a common T (see ``common_steps``)
    and concatenated along the feature axis. Videos missing from any cache are left out."""
    have = set.intersection(*(set(s.cache.keys()) for s in streams))
    raw: dict[str, list[list[np.ndarray]]] = {}  # id -> per stream, its views
    dims: list[set[int]] = [set() for _ in streams]
    for vid in ids:
        if vid not in have:
            continue
        per_stream = []
        for k, s in enumerate(streams):
            arr = s.cache.read(vid)
            dims[k].add(_feature_size(s, vid, arr))
            per_stream.append(list(arr) if s.views else [arr])
        raw[vid] = per_stream
    for s, d in zip(streams, dims, strict=True):
        if len(d) > 1:
            raise StreamError(f"{s.cache.root}: videos have different feature sizes {d}")

    # Views across streams: a one-view stream is paired with every view of the others; clip k
    # of each stream covers the same frames, so unequal counts keep the first min(V) clips.
    cut = 0
    for vid, per_stream in raw.items():
        counts = [len(v) for v in per_stream]
        if len(set(counts)) == 1:
            continue
        n = max(counts) if min(counts) == 1 else min(counts)
        cut += min(counts) > 1
        raw[vid] = [v * n if len(v) == 1 else v[:n] for v in per_stream]
    if cut:
        log.warning(
            "%d videos have unequal view counts in %s; the first min(V) views kept",
            cut,
            "+".join(s.name for s in streams),
        )

    lengths = [[len(x) for per in raw.values() for x in per[k]] for k in range(len(streams))]
    every = [t for ls in lengths for t in ls]
    t = common_steps(every, steps) if every else None
    if t is not None and any(n != t for n in every):
        ranges = ", ".join(
            f"{s.name} {min(ls)}-{max(ls)}" for s, ls in zip(streams, lengths, strict=True) if ls
        )
        log.info(
            "sequences have %s steps; sigma(t) brings each to %d steps (train.steps: %s)",
            ranges,
            t,
            steps if steps is not None else "null, the shortest",
        )
    axis = 1 if streams[0].maps else -1  # C of (T, C, H, W), D of (T, D)
    videos = {}
    for vid, per_stream in raw.items():
        views = []
        for parts in zip(*per_stream, strict=True):
            # unequal lengths anywhere (streams included) always give a common t
            parts = [resample(p, t) for p in parts] if t is not None else list(parts)
            try:
                views.append(np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0])
            except ValueError:
                raise StreamError(
                    f"{vid}: maps of shapes {[p.shape for p in parts]} cannot be "
                    "concatenated (streams need the same H x W)"
                ) from None
        videos[vid] = views
    return Features(
        videos=videos,
        dims=[next(iter(d)) if d else 0 for d in dims],
        backbones=[s.backbone for s in streams],
        views=any(s.views for s in streams),
        maps=streams[0].maps,
        steps=t,
        layouts=[s.layout for s in streams],
    )


def per_video(probs: np.ndarray, groups: np.ndarray, views: bool) -> np.ndarray:
    """Scores of the rows (N, C) -> per video: the mean softmax of its views."""
    return mean_over_views(probs, groups) if views else probs
