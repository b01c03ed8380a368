"""train: one temporal head on one stream's cached features (or several streams' features
concatenated along D, e.g. rgb+flow for TS-LSTM and RTSAE), for every split of the manifest.
Writes per-video softmax scores (test videos, and out-of-fold scores for training videos) and
the trained weights. Reads only its head's params section and the `train` section."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import open_cache
from pipeline.config import TrainConfig, section
from pipeline.datasets import read_manifest
from pipeline.engine import (
    fit,
    out_of_fold,
    predict,
    predict_report,
    seed_everything,
    split_head_params,
)
from pipeline.heads import build_head, head_arguments
from pipeline.runner import resolve_workers
from pipeline.scores import ScoreTable, concat, write_scores

log = logging.getLogger("train")


def load_features(
    dirs: list[Path], ids: list[str]
) -> tuple[dict[str, np.ndarray], list[int], list[str]]:
    """Features of ``ids`` from one or more feature stages' caches, concatenated along the last
    axis -> ({id: (T, sum D)}, [D per cache], [backbone per cache]). Videos missing from any
    cache are left out."""
    caches = [open_cache(d / "cache", "r") for d in dirs]
    have = set.intersection(*(set(c.keys()) for c in caches))
    feats = {}
    for vid in ids:
        if vid in have:
            parts = [c.read(vid).astype(np.float32) for c in caches]
            if len({p.shape[0] for p in parts}) > 1:
                raise SystemExit(
                    f"train: {vid} has {[p.shape[0] for p in parts]} steps in {dirs}; streams must share the sampling"
                )
            feats[vid] = np.concatenate(parts, axis=-1)
    return (
        feats,
        [int(c.attrs["dim"]) for c in caches],
        [str(c.attrs.get("backbone")) for c in caches],
    )


def main(
    head: str,
    stream: str,
    *,
    head_params: dict,
    cfg: TrainConfig,
    features: list[Path],
    manifest: Path,
    out: Path,
) -> None:
    torch.set_num_threads(resolve_workers(cfg.threads))
    settings, model_kwargs = split_head_params(head_params)
    m = read_manifest(manifest)
    feats, dims, backbones = load_features(features, [v.video_id for v in m.videos])
    missing = [v.video_id for v in m.videos if v.video_id not in feats]
    if missing:
        log.warning(
            "%d of %d manifest videos have no %s features (failed upstream); left out",
            len(missing),
            len(m.videos),
            stream,
        )
    in_dim = sum(dims)
    num_classes = len(m.classes)
    if len(dims) > 1 and "stream_dims" in head_arguments(head):
        model_kwargs = {**model_kwargs, "stream_dims": dims}

    def make() -> torch.nn.Module:
        return build_head(head, in_dim=in_dim, num_classes=num_classes, **model_kwargs)

    out.mkdir(parents=True, exist_ok=True)
    tables, log_info = (
        [],
        {"head": head, "stream": stream, "features": backbones, "splits": {}},
    )
    for split in m.split_names:
        parts = {
            p: [v for v in m.subset(split, p) if v.video_id in feats] for p in ("train", "test")
        }
        if not parts["train"] or not parts["test"]:
            raise SystemExit(
                f"train: split {split} has {len(parts['train'])} train and {len(parts['test'])} test videos with features"
            )
        x = {p: np.stack([feats[v.video_id] for v in vs]) for p, vs in parts.items()}
        y = {p: np.array([v.label for v in vs]) for p, vs in parts.items()}
        t0 = time.perf_counter()
        seed_everything(cfg.seed)
        model = make()
        losses = fit(
            model,
            x["train"],
            y["train"],
            settings,
            seed=cfg.seed,
            desc=f"{head}/{stream} split {split}",
        )
        torch.save(model.state_dict(), out / f"model_split{split}.pt")
        test_scores, report = predict_report(model, x["test"])
        scores = {"test": test_scores}
        if cfg.oof_folds >= 2:
            scores["train"] = out_of_fold(
                make,
                x["train"],
                y["train"],
                settings,
                folds=cfg.oof_folds,
                seed=cfg.seed,
                num_classes=num_classes,
            )
        else:
            scores["train"] = predict(model, x["train"])
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
    )
