"""Train, predict and cross-fit loops for temporal heads on cached features."""

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

OPTIMIZERS = ("adam", "rmsprop", "sgd")
# Keys of a head's params.yaml section that configure training, not the module.
TRAINING_KEYS = ("optimizer", "lr", "weight_decay", "epochs", "batch_size")


@dataclass(frozen=True)
class TrainSettings:
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 30
    batch_size: int = 32


def split_head_params(params: Mapping[str, Any]) -> tuple[TrainSettings, dict[str, Any]]:
    """A head's params section -> (training settings, constructor kwargs)."""
    train = {k: params[k] for k in TRAINING_KEYS if k in params}
    model = {k: v for k, v in params.items() if k not in TRAINING_KEYS}
    settings = TrainSettings(**train)
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got '{settings.optimizer}'")
    return settings, model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    p = model.parameters()
    if s.optimizer == "adam":
        return torch.optim.Adam(p, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "rmsprop":
        return torch.optim.RMSprop(p, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(p, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)


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
    opt = _optimizer(model, s)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in progress(range(s.epochs), desc=desc, unit="epoch"):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(order), s.batch_size):
            idx = order[i : i + s.batch_size]
            opt.zero_grad()
            loss = head_loss(model, xt[idx], yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(xt))
    return losses


@torch.inference_mode()
def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """x: (N, T, D) -> softmax probabilities (N, C)."""
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    out = [model(xt[i : i + batch_size]).softmax(dim=-1) for i in range(0, len(xt), batch_size)]
    return torch.cat(out).numpy()


def out_of_fold(
    make: Callable[[], nn.Module],
    x: np.ndarray,
    y: np.ndarray,
    s: TrainSettings,
    *,
    folds: int,
    seed: int,
    num_classes: int,
) -> np.ndarray:
    """Cross-fitted probabilities (N, C) for the training videos: each is scored by a model that
    did not see it, so late fusion learned on them (SVM) is not fitted to over-confident scores."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=num_classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2:
        raise ValueError("out-of-fold scores need at least 2 training videos in every class")
    probs = np.zeros((len(y), num_classes), dtype=np.float32)
    for f, (tr, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y)):
        model = make()
        fit(model, x[tr], y[tr], s, seed=seed + 1 + f, desc=f"fold {f + 1}/{k}")
        probs[te] = predict(model, x[te])
    return probs
