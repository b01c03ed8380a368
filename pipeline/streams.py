"""Features caches as training data: what a cache's layout holds, and every video's rows with
the streams concatenated along the feature axis.

Cache layouts (the cache's "layout" attribute; "(T, D)" when it has none):
- "(T, D)": one sequence per video. T may differ between videos (3D clips: K_v = floor(l_v/8) - 1).
- "(V, T, D)": V views per video (10-crop kept as an axis, MRRN's clips; V may differ between
  videos). Each view is a training sample with its video's label; a video's score is the mean of
  its views' softmax scores, and out-of-fold folds never split a video's views.
- "(T, C, H, W)", "(V, T, C, H, W)": conv maps, for the heads in MAP_HEADS (TSRNN).
Sequences of unequal length (between videos, views or streams) are all brought to one number of
steps by Res-LSTM's sigma(t) (``TrainConfig.steps``: 25, the paper's T, by default).

Memory: features that fit ``TrainConfig.memory_gb`` (as stored: float16 stays float16) are held
in memory, each video's array as read (no stacked copy); larger ones are streamed: rows are read
from the caches as batches need them (``CacheRows``), each video assembled exactly as in
memory, so both give the same training to the bit. Which path is decided from the shapes the
caches' indexes record, before any feature is read."""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.cache import CacheError, FeatureCache, open_cache
from pipeline.engine import ArrayRows, Rows, mean_over_views
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


# The T of Res-LSTM's paper (Table 1), the default for sequences of unequal length.
PAPER_STEPS = 25


@dataclass
class Features:
    """Every video's training rows, streams concatenated along the feature axis: held in
    memory (``videos``) or read from the caches on demand (``source``, when they exceed the
    memory budget). ``rows(ids)`` gives the rows of some videos either way."""

    # id -> its views, each (T, D) or (T, C, H, W), as stored; {} when streamed
    videos: dict[str, list[np.ndarray]]
    dims: list[int]  # feature size per stream: D, or C for maps
    backbones: list[str]
    views: bool  # some stream has a view axis
    maps: bool
    steps: int | None  # the T of every row (None: no video)
    layouts: list[str]  # each stream's cache layout, e.g. "(V, T, D)"
    resampled: bool = False  # sigma(t) changed some sequence's length
    source: VideoSource | None = None  # streamed: reads and assembles a video's views
    n_views: dict[str, int] = field(default_factory=dict)  # id -> V (streamed)
    # in memory: every view of ``videos`` in one list (references, not copies), and each
    # video's [start, stop) in it; built on the first ``rows``
    _flat: list[np.ndarray] | None = None
    _spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        return self.source is not None

    def ids(self) -> list[str]:
        """The videos with features."""
        return list(self.n_views) if self.streamed else list(self.videos)

    def view_count(self, vid: str) -> int:
        return self.n_views[vid] if self.streamed else len(self.videos[vid])

    def rows(self, ids: list[str]) -> Rows:
        """The views of ``ids``, video after video -> Rows (R, T, ...) in the stored dtype."""
        if self.source is not None:
            return CacheRows(self.source, [(v, k) for v in ids for k in range(self.n_views[v])])
        if self._flat is None:
            self._flat = []
            for vid, vs in self.videos.items():
                self._spans[vid] = (len(self._flat), len(self._flat) + len(vs))
                self._flat.extend(vs)
        spans = [np.arange(*self._spans[v]) for v in ids]
        return ArrayRows(self._flat, np.concatenate(spans) if spans else np.zeros(0, np.int64))


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


def _feature_size(s: Stream, vid: str, shape: tuple[int, ...]) -> int:
    """D of a (..., T, D) array or C of a (..., T, C, H, W) one, after checking its shape."""
    ndim = 2 + LAYOUTS[s.layout][0] + 2 * LAYOUTS[s.layout][1]
    if len(shape) != ndim or 0 in shape:
        raise StreamError(
            f"{s.cache.root}: '{vid}' has shape {shape}, not the cache's layout {s.layout}"
        )
    if s.maps:
        return int(shape[-3])
    if s.dim is not None and shape[-1] != s.dim:
        raise StreamError(
            f"{s.cache.root}: '{vid}' has {shape[-1]} features, the cache says dim {s.dim}"
        )
    return int(shape[-1])


def common_steps(lengths: list[int], steps: int | str) -> int | None:
    """The T every sequence is brought to, None when they stay as cached: an integer ``steps``
    always; "auto": None when all ``lengths`` are equal, else PAPER_STEPS (25); "shortest":
    None when equal, else the shortest of ``lengths``."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        if steps < 1:
            raise StreamError(f"steps must be >= 1, 'auto' or 'shortest', got {steps}")
        return steps
    if steps not in ("auto", "shortest"):
        raise StreamError(f"steps must be >= 1, 'auto' or 'shortest', got {steps!r}")
    if len(set(lengths)) <= 1:
        return None
    return PAPER_STEPS if steps == "auto" else min(lengths)


def resample(x: np.ndarray, t: int) -> np.ndarray:
    """x: (K, ...) -> (t, ...), the steps sigma(K, t) (Res-LSTM section 3.1): evenly spread,
    first and last kept, steps repeated when K < t."""
    if len(x) == t:
        return x
    return x[sigma(len(x), t)]


def _paired(counts: list[int]) -> int:
    """Views per stream -> the views of the video. Clip k of each stream covers the same
    frames: a one-view stream is paired with every view of the others, and unequal counts keep
    the first min(V) clips."""
    return max(counts) if min(counts) == 1 else min(counts)


def assemble(
    vid: str, arrays: list[np.ndarray], streams: list[Stream], t: int | None
) -> list[np.ndarray]:
    """One video's array per stream -> its views, each brought to t steps (None: as read) and
    the streams concatenated along D (or C of maps)."""
    per_stream = [list(a) if s.views else [a] for a, s in zip(arrays, streams, strict=True)]
    n = _paired([len(v) for v in per_stream])
    per_stream = [v * n if len(v) == 1 else v[:n] for v in per_stream]
    axis = 1 if streams[0].maps else -1  # C of (T, C, H, W), D of (T, D)
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
    return views


@dataclass(frozen=True)
class _Scanned:
    """What a video's arrays are, without their values (from the caches' indexes)."""

    views: list[int]  # per stream: V (1 without a view axis)
    lengths: list[int]  # per stream: T
    tails: list[tuple[int, ...]]  # per stream: the shape after T, (D,) or (C, H, W)
    dtypes: list[np.dtype]


class VideoSource:
    """Reads a video's views from the caches and assembles them as the in-memory path does
    (``assemble``); the last few videos are kept (the views of a video are read one by one).
    Thread-safe: the training loop reads ahead in a background thread."""

    def __init__(
        self, streams: list[Stream], t: int | None, shape: tuple[int, ...], dtype: np.dtype
    ) -> None:
        """shape: (T, ...) of every view after assembly (checked per read: a cache changed
        since it was sized must not train on other shapes); dtype: of the rows given out."""
        self.streams, self.t, self.shape, self.dtype = streams, t, shape, dtype
        self._kept: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self._kept_bytes = 0
        self._lock = threading.Lock()
        self.max_kept_bytes = 32 << 20  # reads come in cache order: a video's views in a row

    def views(self, vid: str) -> list[np.ndarray]:
        """vid -> its views, each of ``shape``."""
        with self._lock:
            if vid in self._kept:
                self._kept.move_to_end(vid)
                return self._kept[vid]
            views = assemble(vid, [s.cache.read(vid) for s in self.streams], self.streams, self.t)
            for v in views:
                if v.shape != self.shape:
                    where = ", ".join(str(s.cache.root) for s in self.streams)
                    raise StreamError(
                        f"{where}: '{vid}' now reads as {v.shape}, not {self.shape} as when "
                        "training started; was the cache rewritten?"
                    )
            self._kept[vid] = views
            self._kept_bytes += sum(v.nbytes for v in views)
            while self._kept_bytes > self.max_kept_bytes and len(self._kept) > 1:
                _, old = self._kept.popitem(last=False)
                self._kept_bytes -= sum(v.nbytes for v in old)
            return views


class CacheRows:
    """Rows (engine.Rows) read from the caches as they are asked for: row r is view
    ``refs[r][1]`` of video ``refs[r][0]``."""

    streamed = True

    def __init__(self, source: VideoSource, refs: list[tuple[str, int]]) -> None:
        self.source, self.refs = source, refs
        self.row_nbytes = math.prod(source.shape) * source.dtype.itemsize

    def __len__(self) -> int:
        return len(self.refs)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """idx: (B,) -> (B, T, ...) in the cached dtype. Read in cache order (ids sorted: the
        order of packs and chunks), so that rows sharing a chunk or a video decode it once."""
        out = np.empty((len(idx), *self.source.shape), self.source.dtype)
        refs = [self.refs[int(r)] for r in idx]
        for i in sorted(range(len(refs)), key=refs.__getitem__):
            vid, k = refs[i]
            out[i] = self.source.views(vid)[k]
        return out

    def subset(self, idx: np.ndarray) -> CacheRows:
        return CacheRows(self.source, [self.refs[int(r)] for r in idx])


def load_features(
    streams: list[Stream],
    ids: list[str],
    *,
    steps: int | str = "auto",
    memory_gb: float | None = None,
) -> Features:
    """The views of ``ids`` in every stream, each brought to a common T (see ``common_steps``)
    and concatenated along the feature axis. Videos missing from any cache are left out.

    ``memory_gb``: the most the features may take in memory, as stored (None: no limit); when
    they would take more, they are streamed (``Features.source``) and only shapes are kept.
    Sizes come from the caches' indexes (``FeatureCache.shape``), so the streamed path reads
    nothing here, and the in-memory path reads each video once."""
    budget = math.inf if memory_gb is None else memory_gb * 1e9
    have = set.intersection(*(set(s.cache.keys()) for s in streams))
    wanted = [v for v in ids if v in have]
    scanned: dict[str, _Scanned] = {}
    dims: list[set[int]] = [set() for _ in streams]
    stored = 0  # bytes of every wanted array as cached
    for vid in wanted:
        infos = [s.cache.shape(vid) for s in streams]  # from the indexes: nothing read
        for k, (s, (shape, dtype)) in enumerate(zip(streams, infos, strict=True)):
            dims[k].add(_feature_size(s, vid, shape))
            stored += math.prod(shape) * dtype.itemsize
        scanned[vid] = _Scanned(
            views=[sh[0] if s.views else 1 for (sh, _), s in zip(infos, streams, strict=True)],
            lengths=[sh[1 if s.views else 0] for (sh, _), s in zip(infos, streams, strict=True)],
            tails=[sh[2 if s.views else 1 :] for (sh, _), s in zip(infos, streams, strict=True)],
            dtypes=[d for _, d in infos],
        )
    for s, d in zip(streams, dims, strict=True):
        if len(d) > 1:
            raise StreamError(f"{s.cache.root}: videos have different feature sizes {d}")

    # unequal view counts between streams, where neither is one view: the first min(V) kept
    cut = sum(len(set(m.views)) > 1 and min(m.views) > 1 for m in scanned.values())
    if cut:
        log.warning(
            "%d videos have unequal view counts in %s; the first min(V) views kept",
            cut,
            "+".join(s.name for s in streams),
        )
    n_views = {vid: _paired(m.views) for vid, m in scanned.items()}
    lengths = [[m.lengths[k] for m in scanned.values()] for k in range(len(streams))]
    every = [t for ls in lengths for t in ls]
    t = common_steps(every, steps) if every else None
    resampled = t is not None and any(n != t for n in every)
    if resampled:
        ranges = ", ".join(
            f"{s.name} {min(ls)}-{max(ls)}" for s, ls in zip(streams, lengths, strict=True) if ls
        )
        log.info(
            "sequences have %s steps; sigma(t) brings each to %d steps (train.steps: %s)",
            ranges,
            t,
            steps,
        )
    common = t if t is not None else (every[0] if every else None)
    feats = Features(
        videos={},
        dims=[next(iter(d)) if d else 0 for d in dims],
        backbones=[s.backbone for s in streams],
        views=any(s.views for s in streams),
        maps=streams[0].maps,
        steps=common,
        layouts=[s.layout for s in streams],
        resampled=resampled,
    )
    if not scanned:
        return feats
    tail = _tail(streams, scanned)
    dtype = np.result_type(*(d for m in scanned.values() for d in m.dtypes))
    shape = (common, *tail)
    rows = sum(n_views.values())
    size = rows * math.prod(shape) * dtype.itemsize
    what = f"{rows} rows x {shape} {dtype} = {size / 1e9:.2f} GB"
    limit = "no limit" if memory_gb is None else f"train.memory_gb {memory_gb:g}"
    if stored <= budget and size <= budget:
        log.info("features: %s, %s: held in memory", what, limit)
        for vid in scanned:
            # as read where nothing changes (one stream, lengths as cached): no copy at all
            feats.videos[vid] = assemble(vid, [s.cache.read(vid) for s in streams], streams, t)
        return feats
    log.info(
        "features: %s, over %s: streamed from the caches batch by batch (read ahead in a "
        "thread; every video is read again each epoch)",
        what,
        limit,
    )
    feats.source = VideoSource(streams, t, shape, dtype)
    feats.n_views = n_views
    return feats


def _tail(streams: list[Stream], scanned: dict[str, _Scanned]) -> tuple[int, ...]:
    """The shape after T of every assembled view: (sum of D,) or (sum of C, H, W). StreamError
    when maps of the streams (or of videos) differ in H x W."""
    for vid, m in scanned.items():
        if len({tl[1:] for tl in m.tails}) > 1:
            shapes = [(n, *tl) for n, tl in zip(m.lengths, m.tails, strict=True)]
            raise StreamError(
                f"{vid}: maps of shapes {shapes} cannot be concatenated "
                "(streams need the same H x W)"
            )
    spatial = {tl[1:] for m in scanned.values() for tl in m.tails}
    if len(spatial) > 1:
        where = ", ".join(str(s.cache.root) for s in streams)
        raise StreamError(f"{where}: videos have maps of different H x W {sorted(spatial)}")
    first = next(iter(scanned.values())).tails
    return (sum(tl[0] for tl in first), *first[0][1:])


def per_video(probs: np.ndarray, groups: np.ndarray, views: bool) -> np.ndarray:
    """Scores of the rows (N, C) -> per video: the mean softmax of its views."""
    return mean_over_views(probs, groups) if views else probs
