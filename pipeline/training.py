"""The train stage's protocol: one temporal head on one stream's cached features (or several
streams' features concatenated along D, e.g. rgb+flow), fitted and scored on every split of
the manifest.

Per split: fit on the train videos, save the weights, score the test videos, and score the
train videos out of fold (``TrainConfig.oof_folds`` >= 2; in-sample otherwise) so that the SVM
fusion learns from scores the model did not see. A head with ``window_scores`` (TSRNN: the
probabilities of each pooling window, its recurrences) also gives those, for the same videos and
from the same models, for the per-recurrence SVM fusion (window_scores.npz). Cache layouts, views, the resampling of
unequal lengths to ``TrainConfig.steps``, and features held in memory or streamed from the caches
beyond ``TrainConfig.memory_gb``: pipeline/streams.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.datasets import read_manifest
from pipeline.engine import (
    EpochLog,
    Rows,
    as_rows,
    fit,
    iter_batches,
    out_of_fold,
    predict,
    predict_report,
    seed_everything,
    split_head_params,
)
from pipeline.heads import build_head, head_arguments
from pipeline.manifest import Manifest
from pipeline.models import checkpoint, save_model
from pipeline.runner import resolve_workers
from pipeline.scores import (
    WINDOW_SCORES,
    ScoreTable,
    WindowScores,
    concat,
    write_scores,
    write_window_scores,
)
from pipeline.streams import (
    Features,
    Stream,
    check_head,
    load_features,
    open_streams,
    per_video,
)

log = logging.getLogger(__name__)


class TrainError(ValueError):
    """A manifest and features that cannot be trained on as asked (a split without train or
    test videos); names the split and the counts."""


@dataclass
class Trained:
    """What training one head on every split gives, before anything is written.

    states: {split: the head's state_dict after fitting on that split's train videos}.
    scores: one row per (split, subset, video), scores (N, C) softmax (mean over views).
    log: train_log.json's content (no wall-clock time: see ``train_splits``).
    windows: the same rows' window scores (N, M, C), for heads with ``window_scores``; else None.
    model: what every split's checkpoint says of its model besides the weights (head, stream,
    params, constructor kwargs, class names, features identity, steps: pipeline/models.py).
    """

    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scores: ScoreTable | None = None
    log: dict[str, Any] = field(default_factory=dict)
    windows: WindowScores | None = None
    model: dict[str, Any] = field(default_factory=dict)


def has_windows(model: torch.nn.Module) -> bool:
    """Whether the head scores each pooling window: ``window_scores(x) -> ((B, M, C)
    probabilities, (M,) eq. 8 weights)``."""
    return callable(getattr(model, "window_scores", None))


@torch.inference_mode()
def predict_windows(
    model: torch.nn.Module, x: np.ndarray | Rows, *, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """x: (N, T, ...) (an array or Rows) -> (window probabilities (N, M, C) float32, the
    windows' weights (M,)) of a head with ``window_scores``, in eval mode."""
    model.eval()
    rows = as_rows(x)
    n = len(rows)
    bounds = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
    probs, weights = [], None
    for _, batch in iter_batches(rows, np.arange(n), bounds):
        p, weights = model.window_scores(batch)
        probs.append(p.float().cpu())
    assert weights is not None  # a split has test and train rows (TrainError otherwise)
    return torch.cat(probs).numpy(), weights.float().cpu().numpy()


def video_windows(probs: np.ndarray, groups: np.ndarray, views: bool) -> np.ndarray:
    """(R, M, C) per row -> (N, M, C) per video: the mean of its views, as ``per_video``."""
    r, m, c = probs.shape
    return per_video(probs.reshape(r, m * c), groups, views).reshape(-1, m, c)


def _split_rows(
    feats: Features, parts: Mapping[str, list]
) -> tuple[dict[str, Rows], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """{subset: videos} -> (x, y, groups) per subset: x Rows (R, T, D) or (R, T, C, H, W) in
    the stored dtype (held in memory or streamed from the caches), one row per view (per video
    without a view axis); y (N,) the video labels; groups (R,) the index of each row's video,
    so that per-view scores can be averaged back to videos."""
    counts = {p: [feats.view_count(v.video_id) for v in vs] for p, vs in parts.items()}
    groups = {p: np.repeat(np.arange(len(vs)), counts[p]) for p, vs in parts.items()}
    x = {p: feats.rows([v.video_id for v in vs]) for p, vs in parts.items()}
    y = {p: np.array([v.label for v in vs]) for p, vs in parts.items()}
    return x, y, groups


def train_splits(
    *,
    head: str,
    stream: str,
    head_params: Mapping[str, Any],
    cfg: TrainConfig,
    feats: Features,
    manifest: Manifest,
    identity: Sequence[Mapping[str, Any]] = (),
) -> Trained:
    """Fit ``head`` on every split of ``manifest`` with ``feats`` (videos without features are
    left out) -> Trained. ``head_params``: its checked params.yaml section (training settings
    and constructor arguments, pipeline.config.head_section); ``stream``: for the log and the
    checkpoints; ``identity``: each stream's features identity (``features_identity``), for
    the checkpoints.

    Each split starts from ``cfg.seed``, so a split's weights and scores do not depend on the
    splits before it; raises TrainError when a split has no train or no test video."""
    settings, model_kwargs = split_head_params(head_params)
    dims = feats.dims
    in_dim = sum(dims)
    num_classes = len(manifest.classes)
    if len(dims) > 1 and "stream_dims" in head_arguments(head):
        model_kwargs = {**model_kwargs, "stream_dims": dims}

    def make() -> torch.nn.Module:
        return build_head(head, in_dim=in_dim, num_classes=num_classes, **model_kwargs)

    out = Trained(log={"head": head, "stream": stream, "features": feats.backbones, "splits": {}})
    # the settings it was trained with, as the stage took them (a joint stage's joint.<head>
    # applied over heads.<head>), so a model and its log say what it is without params.yaml
    params = {k: head_params[k] for k in sorted(head_params)}
    # what a checkpoint needs to rebuild the model and feed it (pipeline/models.py)
    out.model = {
        "head": head,
        "stream": stream,
        "params": params,
        "kwargs": {"in_dim": in_dim, "num_classes": num_classes, **model_kwargs},
        "classes": list(manifest.classes),
        "features": [dict(f) for f in identity],
        "steps": feats.steps,
    }
    out.log["params"] = params
    # the T of every sequence (train.steps), recorded always: a head's results depend on it
    out.log["steps"] = feats.steps
    if feats.resampled:
        out.log["resampled"] = True  # some cached lengths differed and sigma(t) changed them
    if any(layout != "(T, D)" for layout in feats.layouts):
        out.log["layouts"] = feats.layouts
    tables, windows = [], []
    weights: np.ndarray | None = None  # the window weights (M,), the same on every split
    have = set(feats.ids())
    for split in manifest.split_names:
        parts = {
            p: [v for v in manifest.subset(split, p) if v.video_id in have]
            for p in ("train", "test")
        }
        if not parts["train"] or not parts["test"]:
            raise TrainError(
                f"split {split} has {len(parts['train'])} train and {len(parts['test'])} test videos with features"
            )
        x, y, groups = _split_rows(feats, parts)
        y_rows = {p: y[p][groups[p]] for p in parts}
        t0 = time.perf_counter()
        seed_everything(cfg.seed)
        model = make()
        epochs: list[EpochLog] = []
        losses = fit(
            model,
            x["train"],
            y_rows["train"],
            settings,
            seed=cfg.seed,
            desc=f"{head}/{stream} split {split}",
            on_epoch=epochs.append,
        )
        out.states[split] = model.state_dict()
        test_scores, report = predict_report(model, x["test"])
        scores = {"test": per_video(test_scores, groups["test"], feats.views)}
        windowed = has_windows(model)
        win: dict[str, np.ndarray] = {}
        if windowed:
            win["test"], w = predict_windows(model, x["test"])
            if weights is not None and not np.array_equal(w, weights):
                raise TrainError(f"{head}: split {split} has other window weights than before")
            weights = w
        folds: dict[int, list[EpochLog]] = {}  # the fold models' epochs, with their val
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
                # the window scores come from the same fold models, beside the probabilities
                score=_probs_and_windows if windowed else None,
                on_epoch=partial(_append_fold, folds),
            )
            if windowed:
                r = len(train_scores)
                win["train"] = train_scores[:, num_classes:].reshape(r, -1, num_classes)
                train_scores = train_scores[:, :num_classes]
        else:
            train_scores = predict(model, x["train"])
            if windowed:
                win["train"], _ = predict_windows(model, x["train"])
        scores["train"] = per_video(train_scores, groups["train"], feats.views)
        for p in ("train", "test"):
            n = len(parts[p])
            ids = [v.video_id for v in parts[p]]
            tables.append(ScoreTable([split] * n, [p] * n, ids, y[p], scores[p]))
            if windowed:
                per = video_windows(win[p], groups[p], feats.views)
                windows.append(WindowScores([split] * n, [p] * n, ids, y[p], per, weights))
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
        out.log["splits"][split] = {
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
            # every epoch as the loop ran it (pretraining and phases included): its stage,
            # learning rate (schedule, warm-up) and mean training loss; the training curves
            "epochs": _epoch_records(epochs, folds),
            # no seconds here: train_log.json is in the stage's DVC output, whose hash must
            # depend on inputs and params only, or every re-run would re-run fuse and evaluate.
            # The time is in the log line above.
            **{f"test_{k}": v for k, v in report.items()},
        }
        for k, v in report.items():
            log.info("%s/%s split %s: %s = %.4g", head, stream, split, k, v)
    out.scores = concat(tables)
    if windows:
        out.windows = WindowScores(
            [s for w in windows for s in w.split],
            [s for w in windows for s in w.subset],
            [v for w in windows for v in w.video_id],
            np.concatenate([w.label for w in windows]),
            np.concatenate([w.scores for w in windows]),
            windows[0].weights,
        )
    return out


def _append_fold(folds: dict[int, list[EpochLog]], fold: int, epoch: EpochLog) -> None:
    folds.setdefault(fold, []).append(epoch)


def _epoch_records(
    epochs: Sequence[EpochLog], folds: Mapping[int, Sequence[EpochLog]]
) -> list[dict[str, Any]]:
    """train_log.json's epochs: each of the split's model with its stage, lr and mean loss,
    and, with out-of-fold models (``folds``: {fold: its epochs}), ``val_top1``: the mean over
    the fold models of their top-1 on their held-out training videos after the same epoch,
    the cross-validation curve (the fold models train as the split's model does, on
    (k-1)/k of its videos: same stages and epochs)."""
    records = [{"stage": e.stage, "epoch": e.epoch, "lr": e.lr, "loss": e.loss} for e in epochs]
    for i, r in enumerate(records):
        vals = [f[i].val for f in folds.values() if i < len(f)]
        if folds and len(vals) == len(folds) and None not in vals:
            assert all(f[i].stage == r["stage"] for f in folds.values())  # same settings
            r["val_top1"] = float(np.mean(vals))
    return records


def _probs_and_windows(model: torch.nn.Module, rows: Rows) -> np.ndarray:
    """rows (n, T, ...) -> (n, C + M * C): the probabilities, then the window probabilities
    flattened; what out_of_fold keeps of each fold model for a head with window scores."""
    probs = predict(model, rows)
    win, _ = predict_windows(model, rows)
    return np.concatenate([probs, win.reshape(len(win), -1)], axis=1)


def features_identity(stream: Stream) -> dict[str, Any]:
    """What a model's input features were, from the cache's attributes: the stream, its params
    identity (pipeline/identity.py), backbone, weights and layout; predict computes a new
    video's features with exactly these, and refuses caches that say otherwise."""
    attrs = stream.cache.attrs
    return {
        "stream": stream.name,
        "params": attrs.get("params"),
        "backbone": attrs.get("backbone"),
        "weights": attrs.get("weights"),
        "layout": stream.layout,
    }


def write_trained(trained: Trained, out: Path) -> None:
    """``out``/model_split<s>.pt for every split (a self-describing checkpoint,
    pipeline/models.py), scores.csv, train_log.json and, for a head
    with window scores, window_scores.npz."""
    out.mkdir(parents=True, exist_ok=True)
    for split, state in trained.states.items():
        ckpt = checkpoint(split=split, state_dict=state, **trained.model)
        save_model(out / f"model_split{split}.pt", ckpt)
    assert trained.scores is not None  # train_splits always sets it
    write_scores(out / "scores.csv", trained.scores)
    if trained.windows is not None:
        write_window_scores(out / WINDOW_SCORES, trained.windows)
    (out / "train_log.json").write_text(json.dumps(trained.log, indent=1))


def train_head(
    *,
    head: str,
    stream: str,
    head_params: Mapping[str, Any],
    cfg: TrainConfig,
    features: Sequence[Path],
    manifest: Path,
    out: Path,
    expected: Sequence[dict] | None = None,
) -> Trained:
    """The train stage: ``head`` on the features stage outputs ``features`` (one folder per
    stream of ``stream``, e.g. "rgb+flow", holding ``cache/``) for every split of the manifest
    file ``manifest``; writes ``out`` (see ``write_trained``) and returns what it wrote.

    ``expected``: one params_identity per cache, compared with what the cache was written with
    (None: not checked). Raises StreamError (caches the head cannot take, or written with other
    settings), CacheError (a damaged cache) or TrainError before anything is written."""
    torch.set_num_threads(resolve_workers(cfg.threads))
    m = read_manifest(manifest)
    streams = open_streams(
        list(features), stream.split("+"), None if expected is None else list(expected)
    )
    check_head(head, split_head_params(head_params)[1], streams)
    feats = load_features(
        streams, [v.video_id for v in m.videos], steps=cfg.steps, memory_gb=cfg.memory_gb
    )
    have = set(feats.ids())
    missing = [v.video_id for v in m.videos if v.video_id not in have]
    if missing:
        log.warning(
            "%d of %d manifest videos have no %s features (failed upstream); left out",
            len(missing),
            len(m.videos),
            stream,
        )
    trained = train_splits(
        head=head,
        stream=stream,
        head_params=head_params,
        cfg=cfg,
        feats=feats,
        manifest=m,
        identity=[features_identity(s) for s in streams],
    )
    write_trained(trained, out)
    return trained
