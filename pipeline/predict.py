"""Predicting the action of new videos with a trained run (the ``data/`` of a repro, or a pulled
experiment): features as the run made them (pipeline/predict_features.py), then the chosen
head's saved models (pipeline/models.py) per stream and joint, and the saved fusion the fuse
stage fitted (pipeline/fusion_saved.py).

Which model: by default the one the evaluation picked (evaluate/metrics.json ``confusion_of``,
``evaluate.confusion: best``: the fusion, or the model, of the highest mean top-1); ``head``
alone takes that head's best fusion by the same rule; ``fusion`` names a fusion method or one
of the head's models (rgb, flow, rgb+flow). Every split's model is run and the probabilities
averaged over the splits (``splits`` names some); a fusion is applied per split, with that
split's fitted parameters, before averaging.

A video that fails (unreadable, no video stream, no frames) is a row with status failed and the
reason naming the file; the others go on.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.engine import predict
from pipeline.fusion_saved import FILE as FUSION_FILE
from pipeline.fusion_saved import FusionFileError, apply_fusion, read_fusion
from pipeline.inference import resolve_device
from pipeline.metrics import best_by_top1
from pipeline.models import ModelInfo, load_model
from pipeline.predict_features import new_video_features, read_run_features
from pipeline.streams import StreamError, assemble, open_streams, per_video
from pipeline.training import has_windows, predict_windows, video_windows

log = logging.getLogger(__name__)

TOP_K = 5
_MODEL = re.compile(r"model_split(.+)\.pt$")


class PredictError(ValueError):
    """A run folder or a choice predict cannot use; names the file or setting and the reason."""


@dataclass(frozen=True)
class Choice:
    """The head, what is reported as the fused result (a fusion method, or one model: a
    stream or rgb+flow), the models run and the splits."""

    head: str
    fusion: str
    is_fusion: bool
    models: tuple[str, ...]  # every trained input of the head: rgb, flow, rgb+flow
    fused_streams: tuple[str, ...]  # the inputs the fusion takes (sorted), or (fusion,)
    splits: tuple[str, ...]
    saved: dict[str, Any] | None = None  # the fusion's fusion.json (read_fusion); None: a model


@dataclass
class Prediction:
    """One video's result. scores: (C,) the fusion's own scores averaged over splits (the fuse
    stage's scale: summed probabilities, log-products, SVM decision values); probs: (C,) the
    fused probabilities (``fused_probabilities``); streams: {model: (C,) probabilities}."""

    path: str
    status: str  # ok | failed
    reason: str = ""
    head: str = ""
    fusion: str = ""
    splits: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    scores: np.ndarray | None = None
    probs: np.ndarray | None = None
    streams: dict[str, np.ndarray] = field(default_factory=dict)
    per_split: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split: {name: (C,)}

    def top(self, k: int = TOP_K) -> list[tuple[str, float]]:
        assert self.probs is not None
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(self.classes[i], float(self.probs[i])) for i in order]

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "status": self.status, "reason": self.reason}
        d |= {"head": self.head, "fusion": self.fusion, "splits": list(self.splits)}
        if self.status != "ok":
            return d
        top = self.top()
        d |= {"label": top[0][0], "probability": top[0][1]}
        d["top5"] = [{"class": c, "probability": p} for c, p in top]
        d["streams"] = {
            name: {"label": self.classes[int(p.argmax())], "probability": float(p.max())}
            for name, p in self.streams.items()
        }
        return d


def _metrics(run: Path) -> dict:
    path = run / "evaluate" / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PredictError(
            f"{path}: cannot read the evaluation ({e}); name the model: --head and --fusion"
        ) from None


def _trained_inputs(run: Path, head: str) -> list[str]:
    """The inputs the run trained ``head`` on: train/<head>-<input>/ with a model file."""
    found = [
        d.name[len(head) + 1 :]
        for d in sorted((run / "train").glob(f"{head}-*"))
        if any(_MODEL.search(p.name) for p in d.glob("model_split*.pt"))
    ]
    if not found:
        raise PredictError(f"{run / 'train'}: no trained model of head '{head}' ({head}-<stream>)")
    return sorted(found, key=lambda s: (s.count("+"), s))


def choose(
    run: Path, *, head: str | None = None, fusion: str | None = None, splits: Sequence[str] = ()
) -> Choice:
    """What to run (module docstring) -> Choice; PredictError naming the file or setting."""
    if head is None or fusion is None:
        metrics = _metrics(run)
        if head is None:
            picked = str(metrics.get("confusion_of", ""))
            head, _, kind = picked.partition("/")
            if not kind:
                raise PredictError(f"{run / 'evaluate' / 'metrics.json'}: no confusion_of")
            fusion = fusion or kind
        elif fusion is None:
            mine = metrics.get("fusion", {}).get(head) or metrics.get("streams", {}).get(head)
            if not mine:
                raise PredictError(f"{run / 'evaluate' / 'metrics.json'}: no results of {head}")
            fusion = best_by_top1(mine)
    assert fusion is not None
    models = _trained_inputs(run, head)
    doc_path = run / "fuse" / f"{head}-{fusion}" / FUSION_FILE
    is_fusion = fusion not in models
    saved = None
    if is_fusion:
        try:
            saved = read_fusion(doc_path)
            fused_streams = tuple(saved["streams"])
        except FusionFileError as e:
            raise PredictError(
                f"{e} (--fusion {fusion}: a fusion method, or one of {models})"
            ) from None
        lacking = [s for s in fused_streams if s not in models]
        if lacking:
            raise PredictError(f"{doc_path}: fuses {lacking}, which {run / 'train'} lacks")
    else:
        fused_streams = (fusion,)
    have = sorted(
        {
            m.group(1)
            for p in (run / "train" / f"{head}-{models[0]}").iterdir()
            if (m := _MODEL.search(p.name))
        }
    )
    wanted = tuple(str(s) for s in splits) or tuple(have)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise PredictError(f"--split {missing[0]}: {head} has models of splits {have}")
    return Choice(head, fusion, is_fusion, tuple(models), fused_streams, wanted, saved)


def _model_probs(
    run: Path,
    name: str,
    loaded: Sequence[tuple[torch.nn.Module, ModelInfo]],
    feats: Mapping[str, Mapping[str, np.ndarray]],
    ids: Sequence[str],
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray] | None]]:
    """Per split: the model's probabilities of videos ``ids`` (N, C), the mean over each
    video's views as the train stage scores (and window scores (N, M, C) with their weights
    for heads that have them, else None)."""
    info = loaded[0][1]
    dirs = [run / "features" / s for s in info.streams]
    try:  # the caches the model was trained on: the features identity must match
        streams = open_streams(dirs, info.streams, [f["params"] for f in info.features])
    except StreamError as e:
        raise PredictError(f"{info.path}: {e}") from None
    try:
        views = [assemble(v, [feats[s][v] for s in info.streams], streams, info.steps) for v in ids]
    finally:
        for s in streams:
            s.cache.close()
    groups = np.repeat(np.arange(len(ids)), [len(v) for v in views])
    x = np.stack([a for v in views for a in v])
    has_views = any(s.views for s in streams)
    probs, windows = [], []
    for model, _ in loaded:
        probs.append(per_video(predict(model, x), groups, has_views))
        if has_windows(model):
            w, weights = predict_windows(model, x)
            windows.append((video_windows(w, groups, has_views), weights))
        else:
            windows.append(None)
    return probs, windows


def fused_probabilities(spec: Mapping[str, Any], scores: np.ndarray) -> np.ndarray:
    """A fusion's scores (N, C) -> probabilities (N, C): sums of probabilities divided by the
    weights' sum; log-products (product, learned product) through a softmax, which is the
    normalised (weighted geometric mean) product; SVM decision values through a softmax (an
    ordering, not a calibrated probability); classes an SVM never saw get 0."""
    rule, kind = spec.get("rule"), spec.get("kind")
    if rule == "sum":
        return scores / scores.sum(1, keepdims=True)
    if rule == "weighted":
        return scores / sum(spec["weights"].values())
    if rule == "learned" and kind == "weighted":
        return scores / float(np.sum(spec["weights"]))
    z = scores - scores.max(1, keepdims=True)  # product, learned product, svm
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def predict_videos(
    videos: Sequence[Path],
    *,
    run: Path,
    head: str | None = None,
    fusion: str | None = None,
    splits: Sequence[str] = (),
    device: str = "auto",
    batch_sizes: Mapping[str, int] | None = None,
) -> list[Prediction]:
    """One Prediction per video of ``videos``, in order (see the module docstring).
    ``batch_sizes``: {stream: the features stage's batch_size} (not recorded in the caches).
    Raises PredictError / RunSettingsError / ModelFileError for the run, never for a video."""
    run = Path(run)
    choice = choose(run, head=head, fusion=fusion, splits=splits)
    dev = resolve_device(device)
    loaded = {}
    for name in choice.models:
        loaded[name] = [
            load_model(run / "train" / f"{choice.head}-{name}" / f"model_split{s}.pt")
            for s in choice.splits
        ]
    classes = loaded[choice.models[0]][0][1].classes
    for ms in loaded.values():
        for _, info in ms:
            if info.classes != classes:
                raise PredictError(
                    f"{info.path}: other classes than {loaded[choice.models[0]][0][1].path}"
                )
    specs = {}
    if choice.saved is not None:
        doc = choice.saved
        specs = {s: doc["splits"][s] for s in choice.splits if s in doc["splits"]}
        if len(specs) != len(choice.splits):
            raise PredictError(
                f"{run / 'fuse' / f'{choice.head}-{choice.fusion}' / FUSION_FILE}: no fusion of "
                f"splits {sorted(set(choice.splits) - set(specs))}"
            )
    streams = sorted({s for ms in loaded.values() for s in ms[0][1].streams})
    rf = read_run_features(run, streams, batch_sizes=batch_sizes)
    ids = {f"v{i:06d}": Path(p) for i, p in enumerate(videos)}
    with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
        feats, failed = new_video_features(rf, ids, device=dev, workdir=Path(tmp))
    ok = [v for v in ids if v not in failed]
    common = {
        "head": choice.head,
        "fusion": choice.fusion,
        "splits": choice.splits,
        "classes": classes,
    }
    results = {}
    for vid in failed:
        reason = failed[vid]
        path = str(ids[vid])
        results[vid] = Prediction(
            path, "failed", reason if path in reason else f"{path}: {reason}", **common
        )
    if ok:
        per_model = {n: _model_probs(run, n, ms, feats, ok) for n, ms in loaded.items()}
        scores, probs = [], []
        for k, split in enumerate(choice.splits):
            p = {n: per_model[n][0][k] for n in choice.fused_streams}
            if choice.is_fusion:
                w = [per_model[n][1][k] for n in choice.fused_streams]
                kw = {}
                if all(x is not None for x in w):
                    kw = {
                        "windows": {n: x[0] for n, x in zip(choice.fused_streams, w, strict=True)}
                    }
                    kw["window_weights"] = w[0][1]
                s = apply_fusion(specs[split], p, **kw)
                scores.append(s)
                probs.append(fused_probabilities(specs[split], s))
            else:
                scores.append(p[choice.fusion])
                probs.append(p[choice.fusion])
        mean_scores, mean_probs = np.mean(scores, axis=0), np.mean(probs, axis=0)
        for i, vid in enumerate(ok):
            results[vid] = Prediction(
                str(ids[vid]),
                "ok",
                scores=mean_scores[i],
                probs=mean_probs[i],
                streams={n: np.mean([q[i] for q in per_model[n][0]], axis=0) for n in loaded},
                per_split={
                    s: {
                        "fused": scores[k][i],
                        **{n: per_model[n][0][k][i] for n in loaded},
                    }
                    for k, s in enumerate(choice.splits)
                },
                **common,
            )
    return [results[v] for v in ids]
