"""Train, predict and cross-fit loops for temporal heads on cached features.

A head is an ``nn.Module`` mapping (B, T, D) (or (B, T, C, H, W)) to logits (B, C). It may also
define these optional methods, which the loops call when present:

- ``prepare(x: Tensor) -> None``: called once with every training video's features before any
  optimisation, for statistics fitted on the training set (Res-LSTM's PCA, normalisers).
- ``loss(x: Tensor, y: Tensor) -> Tensor``: the training objective; default cross-entropy on
  ``forward(x)``. Heads with auxiliary terms (TSRNN's accumulative loss, RTSAE's eq. 12) use it.
- ``pretrain_loss(x: Tensor) -> Tensor``: an unsupervised objective, minimised for
  ``pretrain_epochs`` epochs before the supervised ones (RTSAE's autoencoder stage).
- ``report() -> dict``: numbers about the last ``forward`` in eval mode (e.g. the fraction of
  time steps an attention gate kept); the train stage logs them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.runner import progress

log = logging.getLogger(__name__)

# Keys of a head's params.yaml section that configure training, not the module.
TRAINING_KEYS = (
    "optimizer",
    "lr",
    "weight_decay",
    "epochs",
    "batch_size",
    "grad_clip",
    "pretrain_epochs",
    "pretrain_lr",
)


@dataclass(frozen=True)
class TrainSettings:
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 30
    batch_size: int = 32
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    pretrain_epochs: int = 0  # epochs of the head's pretrain_loss before supervised training
    pretrain_lr: float | None = None  # None = lr


def split_head_params(params: Mapping[str, Any]) -> tuple[TrainSettings, dict[str, Any]]:
    """A head's params section -> (training settings, constructor kwargs)."""
    train = {k: params[k] for k in TRAINING_KEYS if k in params}
    model = {k: v for k, v in params.items() if k not in TRAINING_KEYS}
    # the values were checked when params.yaml was loaded (pipeline.config.head_section)
    return TrainSettings(**train), model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(model: nn.Module, s: TrainSettings, lr: float) -> torch.optim.Optimizer:
    p = [q for q in model.parameters() if q.requires_grad]
    if s.optimizer == "adam":
        return torch.optim.Adam(p, lr=lr, weight_decay=s.weight_decay)
    if s.optimizer == "rmsprop":
        return torch.optim.RMSprop(p, lr=lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=s.weight_decay)


def head_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy on the head's logits; a head with its own objective defines ``loss``."""
    custom: Callable[[Tensor, Tensor], Tensor] | None = getattr(model, "loss", None)
    if custom is not None:
        return custom(x, y)
    return nn.functional.cross_entropy(model(x), y)


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    s: TrainSettings,
    *,
    seed: int,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` on x (N, T, D), y (N,) -> mean loss per epoch. Deterministic for a seed."""
    seed_everything(seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    prepare: Callable[[Tensor], None] | None = getattr(model, "prepare", None)
    if prepare is not None:
        with torch.no_grad():
            prepare(xt)
    gen = torch.Generator().manual_seed(seed)
    pretrain: Callable[[Tensor], Tensor] | None = getattr(model, "pretrain_loss", None)
    if s.pretrain_epochs and pretrain is None:
        raise ValueError(f"{type(model).__name__} has no pretrain_loss; set pretrain_epochs: 0")
    if s.pretrain_epochs:
        opt = _optimizer(model, s, s.pretrain_lr or s.lr)
        _epochs(
            model,
            opt,
            s,
            s.pretrain_epochs,
            gen,
            lambda idx: pretrain(xt[idx]),
            len(xt),
            f"{desc} (pretrain)",
        )
    opt = _optimizer(model, s, s.lr)
    return _epochs(
        model, opt, s, s.epochs, gen, lambda idx: head_loss(model, xt[idx], yt[idx]), len(xt), desc
    )


def _epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    s: TrainSettings,
    epochs: int,
    gen: torch.Generator,
    batch_loss: Callable[[Tensor], Tensor],
    n: int,
    desc: str,
) -> list[float]:
    """Shuffled mini-batch epochs minimising ``batch_loss(indices)`` -> mean loss per epoch."""
    losses = []
    model.train()
    for _ in progress(range(epochs), desc=desc, unit="epoch"):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, s.batch_size):
            idx = order[i : i + s.batch_size]
            opt.zero_grad()
            loss = batch_loss(idx)
            loss.backward()
            if s.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
    return losses


def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """x: (N, T, D) -> softmax probabilities (N, C)."""
    return predict_report(model, x, batch_size=batch_size)[0]


@torch.inference_mode()
def predict_report(
    model: nn.Module, x: np.ndarray, *, batch_size: int = 256
) -> tuple[np.ndarray, dict[str, float]]:
    """x: (N, T, D) -> (softmax probabilities (N, C), the head's ``report()`` averaged over
    batches weighted by batch size; empty for heads without one)."""
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    report = getattr(model, "report", None)
    out, totals = [], {}
    for i in range(0, len(xt), batch_size):
        batch = xt[i : i + batch_size]
        out.append(model(batch).softmax(dim=-1))
        if report is not None:
            for k, v in report().items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(batch)
    return torch.cat(out).numpy(), {k: v / len(xt) for k, v in totals.items()}


def mean_over_views(probs: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """probs: (N, C) per view, groups: (N,) the video of each view -> (G, C), the mean of each
    video's views, videos in ascending ``groups`` order (G distinct values)."""
    ids, inverse = np.unique(groups, return_inverse=True)
    total = np.zeros((len(ids), probs.shape[1]), dtype=np.float64)
    np.add.at(total, inverse, probs)
    return (total / np.bincount(inverse)[:, None]).astype(probs.dtype)


def fold_assignment(
    y: np.ndarray,
    *,
    folds: int,
    seed: int,
    num_classes: int,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """y: (N,) -> the fold (0..k-1) of every row, stratified by class, k = min(folds, the
    smallest class's number of videos). groups: (N,) the video of each row when a video has
    several rows (views): folds are drawn over videos, so all views of a video share a fold
    (a view seen in training would leak its video's label into the held-out score). None: each
    row is a video."""
    from sklearn.model_selection import StratifiedKFold

    if groups is None:
        video_y, inverse = y, np.arange(len(y))
    else:
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        video_y = y[first]
        if (video_y[inverse] != y).any():
            raise ValueError("out-of-fold: the views of one video carry different labels")
    counts = np.bincount(video_y, minlength=num_classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2:
        raise ValueError("out-of-fold scores need at least 2 training videos in every class")
    video_fold = np.empty(len(video_y), dtype=np.int64)
    # StratifiedKFold uses only the number of rows of its first argument
    rows = np.zeros((len(video_y), 1))
    split = StratifiedKFold(k, shuffle=True, random_state=seed).split(rows, video_y)
    for f, (_, te) in enumerate(split):
        video_fold[te] = f
    return video_fold[inverse]


def out_of_fold(
    make: Callable[[], nn.Module],
    x: np.ndarray,
    y: np.ndarray,
    s: TrainSettings,
    *,
    folds: int,
    seed: int,
    num_classes: int,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Cross-fitted probabilities (N, C) for the training rows x (N, T, ...): each is scored by a
    model that did not see its video, so late fusion learned on them (SVM) is not fitted to
    over-confident scores. groups: (N,) the video of each row (views); see ``fold_assignment``.
    The result stays per row; ``mean_over_views`` gives per-video scores."""
    fold = fold_assignment(y, folds=folds, seed=seed, num_classes=num_classes, groups=groups)
    probs = np.zeros((len(y), num_classes), dtype=np.float32)
    k = int(fold.max()) + 1
    for f in range(k):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        model = make()
        fit(model, x[tr], y[tr], s, seed=seed + 1 + f, desc=f"fold {f + 1}/{k}")
        probs[te] = predict(model, x[te])
    return probs
