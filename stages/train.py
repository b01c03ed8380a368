"""train: one temporal head on one stream's cached features (or several streams' features
concatenated along D, e.g. rgb+flow for TS-LSTM and RTSAE), for every split of the manifest.
Writes per-video softmax scores (test videos, and out-of-fold scores for training videos) and
the trained weights. Reads only its head's params section and the `train` section (and, with
--params-check, the `features.<stream>` sections the caches must have been written with).

Cache layouts (the cache's "layout" attribute; "(T, D)" when it has none):
- "(T, D)": one sequence per video. T may differ between videos (3D clips: K_v = floor(l_v/8) - 1).
- "(V, T, D)": V views per video (10-crop kept as an axis, MRRN's clips; V may differ between
  videos). Each view is a training sample with its video's label; a video's score is the mean of
  its views' softmax scores, and out-of-fold folds never split a video's views.
- "(T, C, H, W)", "(V, T, C, H, W)": conv maps, for the heads in MAP_HEADS (TSRNN).
Sequences of unequal length (between videos, views or streams) are all brought to `train.steps`
steps, or the shortest sequence's length when it is null, by Res-LSTM's sigma(t)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import CacheError, FeatureCache, open_cache
from pipeline.config import ConfigError, StreamFeaturesConfig, TrainConfig, section
from pipeline.datasets import read_manifest
from pipeline.engine import (
    fit,
    mean_over_views,
    out_of_fold,
    predict,
    predict_report,
    seed_everything,
    split_head_params,
)
from pipeline.extract import params_identity
from pipeline.heads import build_head, head_arguments
from pipeline.heads.res_lstm import sigma
from pipeline.runner import resolve_workers
from pipeline.scores import ScoreTable, concat, write_scores

log = logging.getLogger("train")

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


def open_streams(
    dirs: list[Path], names: list[str], expected: list[dict] | None = None
) -> list[Stream]:
    """Open each feature stage's cache and read its layout. ``expected``: one params_identity
    per cache, compared with the cache's ``params`` attribute (SystemExit on a difference)."""
    if expected is not None and len(expected) != len(dirs):
        raise SystemExit(f"train: {len(expected)} expected params for {len(dirs)} caches {dirs}")
    streams = []
    for i, d in enumerate(dirs):
        cache = open_cache(d / "cache", "r")
        name = names[i] if len(names) == len(dirs) else str(d)
        if expected is not None:
            try:
                cache.check_attrs({"params": expected[i]})
            except CacheError as e:
                raise SystemExit(f"train: features.{name} in params.yaml: {e}") from None
        attrs = cache.attrs
        layout = str(attrs.get("layout", "(T, D)"))
        if layout not in LAYOUTS:
            raise SystemExit(
                f"train: {cache.root}: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})"
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
        raise SystemExit(
            "train: cannot concatenate conv maps with vectors: "
            + ", ".join(f"{s.cache.root} is {s.layout}" for s in streams)
        )
    return streams


def check_head(head: str, model_kwargs: dict, streams: list[Stream]) -> None:
    """Fail before training when the head cannot take what the caches hold."""
    where = ", ".join(str(s.cache.root) for s in streams)
    if streams[0].maps and head not in MAP_HEADS:
        raise SystemExit(
            f"train: head '{head}' takes (B, T, D) features, but {where} holds conv maps "
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
            raise SystemExit(
                f"train: heads.{head}.levels is {want} in params.yaml, but {where} has {cached}; "
                f"set heads.{head}.levels to the cache's levels, or null for one stack over all D"
            )


def _feature_size(s: Stream, vid: str, arr: np.ndarray) -> int:
    """D of a (..., T, D) array or C of a (..., T, C, H, W) one, after checking the shape."""
    ndim = 2 + LAYOUTS[s.layout][0] + 2 * LAYOUTS[s.layout][1]
    if arr.ndim != ndim or 0 in arr.shape:
        raise SystemExit(
            f"train: {s.cache.root}: '{vid}' has shape {arr.shape}, not the cache's layout {s.layout}"
        )
    if s.maps:
        return int(arr.shape[-3])
    if s.dim is not None and arr.shape[-1] != s.dim:
        raise SystemExit(
            f"train: {s.cache.root}: '{vid}' has {arr.shape[-1]} features, the cache says dim {s.dim}"
        )
    return int(arr.shape[-1])


def common_steps(lengths: list[int], steps: int | None) -> int | None:
    """The T every sequence is brought to: ``steps``, or the shortest of ``lengths`` when they
    differ; None when ``steps`` is None and all lengths are equal (the sequences stay as cached)."""
    if steps is not None:
        if steps < 1:
            raise SystemExit(f"train: steps must be >= 1 or null, got {steps}")
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
            raise SystemExit(f"train: {s.cache.root}: videos have different feature sizes {d}")

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
                raise SystemExit(
                    f"train: {vid}: maps of shapes {[p.shape for p in parts]} cannot be "
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
    )


def per_video(probs: np.ndarray, groups: np.ndarray, views: bool) -> np.ndarray:
    """Scores of the rows (N, C) -> per video: the mean softmax of its views."""
    return mean_over_views(probs, groups) if views else probs


def main(
    head: str,
    stream: str,
    *,
    head_params: dict,
    cfg: TrainConfig,
    features: list[Path],
    manifest: Path,
    out: Path,
    expected: list[dict] | None = None,
) -> None:
    """expected: one params_identity per --features cache (None: not checked)."""
    torch.set_num_threads(resolve_workers(cfg.threads))
    settings, model_kwargs = split_head_params(head_params)
    streams = open_streams(features, stream.split("+"), expected)
    check_head(head, model_kwargs, streams)
    m = read_manifest(manifest)
    feats = load_features(streams, [v.video_id for v in m.videos], steps=cfg.steps)
    missing = [v.video_id for v in m.videos if v.video_id not in feats.videos]
    if missing:
        log.warning(
            "%d of %d manifest videos have no %s features (failed upstream); left out",
            len(missing),
            len(m.videos),
            stream,
        )
    dims = feats.dims
    in_dim = sum(dims)
    num_classes = len(m.classes)
    if len(dims) > 1 and "stream_dims" in head_arguments(head):
        model_kwargs = {**model_kwargs, "stream_dims": dims}

    def make() -> torch.nn.Module:
        return build_head(head, in_dim=in_dim, num_classes=num_classes, **model_kwargs)

    out.mkdir(parents=True, exist_ok=True)
    tables, log_info = (
        [],
        {"head": head, "stream": stream, "features": feats.backbones, "splits": {}},
    )
    if feats.steps is not None:
        log_info["steps"] = feats.steps
    if any(s.layout != "(T, D)" for s in streams):
        log_info["layouts"] = [s.layout for s in streams]
    for split in m.split_names:
        parts = {
            p: [v for v in m.subset(split, p) if v.video_id in feats.videos]
            for p in ("train", "test")
        }
        if not parts["train"] or not parts["test"]:
            raise SystemExit(
                f"train: split {split} has {len(parts['train'])} train and {len(parts['test'])} test videos with features"
            )
        # one row per view (per video without a view axis); groups: the video of each row
        n_views = {p: [len(feats.videos[v.video_id]) for v in vs] for p, vs in parts.items()}
        groups = {p: np.repeat(np.arange(len(vs)), n_views[p]) for p, vs in parts.items()}
        x = {
            p: np.stack([r for v in vs for r in feats.videos[v.video_id]]).astype(np.float32)
            for p, vs in parts.items()
        }
        y = {p: np.array([v.label for v in vs]) for p, vs in parts.items()}
        y_rows = {p: y[p][groups[p]] for p in parts}
        t0 = time.perf_counter()
        seed_everything(cfg.seed)
        model = make()
        losses = fit(
            model,
            x["train"],
            y_rows["train"],
            settings,
            seed=cfg.seed,
            desc=f"{head}/{stream} split {split}",
        )
        torch.save(model.state_dict(), out / f"model_split{split}.pt")
        test_scores, report = predict_report(model, x["test"])
        scores = {"test": per_video(test_scores, groups["test"], feats.views)}
        if cfg.oof_folds >= 2:
            train_scores = out_of_fold(
                make,
                x["train"],
                y_rows["train"],
                settings,
                folds=cfg.oof_folds,
                seed=cfg.seed,
                num_classes=num_classes,
                groups=groups["train"] if feats.views else None,
            )
        else:
            train_scores = predict(model, x["train"])
        scores["train"] = per_video(train_scores, groups["train"], feats.views)
        for p in ("train", "test"):
            n = len(parts[p])
            tables.append(
                ScoreTable([split] * n, [p] * n, [v.video_id for v in parts[p]], y[p], scores[p])
            )
        acc = float((scores["test"].argmax(1) == y["test"]).mean())
        log.info(
            "%s/%s split %s: test top-1 %.3f (%d videos), %.1f s",
            head,
            stream,
            split,
            acc,
            len(y["test"]),
            time.perf_counter() - t0,
        )
        log_info["splits"][split] = {
            "train_videos": len(y["train"]),
            "test_videos": len(y["test"]),
            **(
                {"train_views": len(x["train"]), "test_views": len(x["test"])}
                if feats.views
                else {}
            ),
            "test_top1": acc,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "seconds": round(time.perf_counter() - t0, 2),
            **{f"test_{k}": v for k, v in report.items()},
        }
        for k, v in report.items():
            log.info("%s/%s split %s: %s = %.4g", head, stream, split, k, v)
    write_scores(out / "scores.csv", concat(tables))
    (out / "train_log.json").write_text(json.dumps(log_info, indent=1))


def expected_params(params: dict, stream: str, n_caches: int) -> list[dict]:
    """params_identity of features.<s> in params.yaml for each s of ``stream`` split on '+'."""
    names = stream.split("+")
    if len(names) != n_caches:
        raise SystemExit(
            f"train: --stream {stream} names {len(names)} streams, --features {n_caches}"
        )
    try:
        return [
            params_identity(section(params, f"features.{s}", StreamFeaturesConfig)) for s in names
        ]
    except ConfigError as e:
        raise SystemExit(f"train: --params-check: {e}") from None


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(
        __doc__,
        "manifest",
        "out",
        extra={
            "head": {"required": True},
            "stream": {"required": True},
            "features": {"type": Path, "nargs": "+", "required": True},
            "params-check": {
                "action": argparse.BooleanOptionalAction,
                "default": False,
                "help": "fail unless each cache was written with params.yaml's features.<stream>",
            },
        },
    )
    hp = params.get("heads", {}).get(args.head)
    if hp is None:
        raise SystemExit(f"params.yaml: no section heads.{args.head}")
    main(
        args.head,
        args.stream,
        head_params=hp,
        cfg=section(params, "train", TrainConfig),
        features=args.features,
        manifest=args.manifest,
        out=args.out,
        expected=(
            expected_params(params, args.stream, len(args.features)) if args.params_check else None
        ),
    )
