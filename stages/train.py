"""train: one temporal head on one stream's cached features (or several streams' features
concatenated along D, e.g. rgb+flow for TS-LSTM and RTSAE), for every split of the manifest.
Writes per-video softmax scores (test videos, and out-of-fold scores for training videos) and
the trained weights. Reads only its head's params section and the `train` section (and, with
--params-check, the `features.<stream>` sections the caches must have been written with).

Cache layouts, views, and the resampling of unequal lengths to `train.steps`:
pipeline/streams.py."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import CacheError
from pipeline.config import ConfigError, StreamFeaturesConfig, TrainConfig, head_section, section
from pipeline.datasets import read_manifest
from pipeline.engine import (
    fit,
    out_of_fold,
    predict,
    predict_report,
    seed_everything,
    split_head_params,
)
from pipeline.heads import build_head, get_head_class, head_arguments
from pipeline.identity import params_identity
from pipeline.runner import resolve_workers
from pipeline.scores import ScoreTable, concat, write_scores
from pipeline.streams import StreamError, check_head, load_features, open_streams, per_video

log = logging.getLogger("train")


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
    m = read_manifest(manifest)
    try:
        streams = open_streams(features, stream.split("+"), expected)
        check_head(head, model_kwargs, streams)
        feats = load_features(streams, [v.video_id for v in m.videos], steps=cfg.steps)
    except (StreamError, CacheError) as e:  # CacheError: a damaged cache, naming the file
        raise SystemExit(f"train: {e}") from None
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
            # no seconds here: train_log.json is in the stage's DVC output, whose hash must
            # depend on inputs and params only, or every re-run would re-run fuse and evaluate.
            # The time is in the log line above.
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
    try:  # the head's section against its constructor, before any cache is opened
        head = get_head_class(args.head)
    except KeyError as e:  # its message lists the heads there are
        raise SystemExit(f"train: {e.args[0]}") from None
    try:
        hp = head_section(params, args.head, head, source=str(args.params))
    except ConfigError as e:
        raise SystemExit(f"train: {e}") from None
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
