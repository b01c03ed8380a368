"""Train, predict and cross-fit loops for temporal heads on cached features.

A head is an ``nn.Module`` mapping (B, T, D) (or (B, T, C, H, W)) to logits (B, C). It may also
define these optional methods, which the loops call when present:

- ``prepare(batches: Iterable[Tensor]) -> None``: called once before any optimisation with
  every training row, in batches (each (B, T, D) float32, in row order), for statistics fitted
  on the training set (Res-LSTM's PCA, normalisers). Batches, not one tensor, so that features
  streamed from the cache (pipeline/streams.py) get the same fit as features held in memory.

- ``loss(x: Tensor, y: Tensor) -> Tensor``: the training objective; default cross-entropy on
  ``forward(x)``. Heads with auxiliary terms (TSRNN's accumulative loss, RTSAE's eq. 12) use it.
- ``pretrain_loss(x: Tensor) -> Tensor``: an unsupervised objective, minimised for
  ``pretrain_epochs`` epochs before the supervised ones (RTSAE's autoencoder stage).
- ``report() -> dict``: numbers about the last ``forward`` in eval mode (e.g. the fraction of
  time steps an attention gate kept); the train stage logs them.
- ``param_groups() -> dict[str, list[nn.Parameter]]``: named groups of parameters that a
  head's ``group_lr`` setting gives their own learning rate (MRRN's low and mid levels).
- ``phases() -> list[Phase]``: staged training (TSRNN: the key-frame branch alone, then the
  temporal branch with it frozen, then all): the supervised epochs run as these phases in
  order, each with a fresh optimiser and schedule over its own parameters only.

The optimiser, the learning rate of every epoch (schedules, warm-up) and the per-group rates
come from the head's training settings: pipeline/optim.py, one implementation for every head.

Training rows come as an array (N, T, ...) or as ``Rows`` (an index over rows read on demand,
e.g. from the feature caches); either way a batch is converted to float32 only when it is used,
so float16 features stay float16 in memory. Mini-batches: ``batch_bounds`` (never one row).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, InvalidValue
from pipeline.optim import (
    TRAINING_KEYS,
    TrainSettings,
    build_optimizer,
    lr_factors,
    optimised,
    set_lr,
)
from pipeline.runner import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """One stage of a staged training (a head's ``phases()``).

    name: for logs; epochs: its number of epochs (None = the head's ``epochs`` setting);
    params: the parameters it trains (every other one is left as it is);
    loss: (x (B, T, ...), y (B,)) -> scalar, its objective."""

    name: str
    epochs: int | None
    params: list[nn.Parameter]
    loss: Callable[[Tensor, Tensor], Tensor]


class Rows(Protocol):
    """Training or scoring rows, read on demand: what ``fit``, ``predict`` and ``out_of_fold``
    take besides arrays. ``streamed``: reads are slow enough to be worth doing ahead of use, in
    a background thread and many batches at once (see ``iter_batches``)."""

    streamed: bool
    row_nbytes: int  # the bytes of one row as stored

    def __len__(self) -> int: ...

    def take(self, idx: np.ndarray) -> np.ndarray:
        """idx: (B,) row numbers -> their rows (B, T, ...), in the stored dtype."""
        ...

    def subset(self, idx: np.ndarray) -> Rows:
        """The rows ``idx`` (in that order) as Rows of their own (out-of-fold folds)."""
        ...


class ArrayRows:
    """Rows held in memory, through an index (a fold's rows are not copied): one array
    (R, T, ...), or a list of R arrays (T, ...) (each video's rows as read from its cache,
    stacked per batch, so holding them never needs a second, stacked copy)."""

    streamed = False

    def __init__(
        self, data: np.ndarray | Sequence[np.ndarray], index: np.ndarray | None = None
    ) -> None:
        """data: (R, T, ...) any dtype, or R arrays (T, ...) of one shape and dtype; index: (N,)
        the rows of ``data`` these rows are (None = all, in order)."""
        self.data = data
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.row_nbytes = data[0].nbytes if len(data) else 0

    def __len__(self) -> int:
        return len(self.data) if self.index is None else len(self.index)

    def take(self, idx: np.ndarray) -> np.ndarray:
        rows = np.asarray(idx if self.index is None else self.index[idx], dtype=np.int64)
        if isinstance(self.data, np.ndarray):
            return self.data[rows]
        return np.stack([self.data[r] for r in rows])

    def subset(self, idx: np.ndarray) -> ArrayRows:
        idx = np.asarray(idx, dtype=np.int64)
        return ArrayRows(self.data, idx if self.index is None else self.index[idx])


def as_rows(x: np.ndarray | Rows) -> Rows:
    """An array (N, T, ...) -> ArrayRows over it; Rows stay as they are."""
    return ArrayRows(x) if isinstance(x, np.ndarray) else x


# Streamed rows are read a window of consecutive batches at a time, up to this many bytes as
# stored (at least one batch), one window ahead of the one in use: 2 x 256 MB held at most.
# Why windows: a take() of many rows can read them in cache order, so rows that share a
# compressed chunk (pooled features: 16 videos of 25 x 1280 float16 a ~1 MiB chunk) or a video
# (its views) are decoded once, not once per row; batches and their order stay exactly those of
# the in-memory path. Measured by bench/bench_train_stream.py.
READ_AHEAD_BYTES = 256 << 20


def iter_batches(
    rows: Rows, order: np.ndarray, bounds: list[tuple[int, int]]
) -> Iterator[tuple[np.ndarray, Tensor]]:
    """(row numbers (B,), rows (B, T, ...) float32) for each [start, stop) of ``bounds`` over
    ``order``, in that order. Streamed rows are read in windows of consecutive batches (see
    READ_AHEAD_BYTES) by one background thread (one: a cache reader is used by one thread at a
    time), the next window while the model computes on this one."""
    if not rows.streamed:
        for a, b in bounds:
            idx = order[a:b]
            yield idx, torch.from_numpy(np.ascontiguousarray(rows.take(idx))).float()
        return
    per = max(1, READ_AHEAD_BYTES // max(rows.row_nbytes, 1))
    windows: list[list[tuple[int, int]]] = [[]]
    for a, b in bounds:
        if windows[-1] and b - windows[-1][0][0] > per:
            windows.append([])
        windows[-1].append((a, b))
    windows = [w for w in windows if w]

    def load(w: list[tuple[int, int]]) -> np.ndarray:
        return rows.take(order[w[0][0] : w[-1][1]])

    with ThreadPoolExecutor(1, thread_name_prefix="rows") as pool:
        pending: deque[Future[np.ndarray]] = deque()
        nxt = 0
        for w in windows:
            while nxt < len(windows) and len(pending) < 2:
                pending.append(pool.submit(load, windows[nxt]))
                nxt += 1
            data = pending.popleft().result()
            start = w[0][0]
            for a, b in w:
                part = np.ascontiguousarray(data[a - start : b - start])
                yield order[a:b], torch.from_numpy(part).float()
            del data


def _prepare_batches(rows: Rows, *, max_bytes: int = 64 << 20) -> Iterator[Tensor]:
    """Every row in order, in float32 batches of at most ``max_bytes`` (at least one row)."""
    n = len(rows)
    if n == 0:
        return
    per = max(1, max_bytes // max(rows.take(np.arange(1)).size * 4, 1))
    for _, xb in iter_batches(rows, np.arange(n), [(a, min(a + per, n)) for a in range(0, n, per)]):
        yield xb


def split_head_params(
    params: Mapping[str, Any], *, where: str | None = None
) -> tuple[TrainSettings, dict[str, Any]]:
    """A head's params section -> (training settings, constructor kwargs). Settings that
    contradict each other raise ConfigError naming ``where`` and the key
    (``params.yaml:heads.sru.step_size: ...``; None: ``TrainSettings.step_size: ...``)."""
    train = {k: params[k] for k in TRAINING_KEYS if k in params}
    model = {k: v for k, v in params.items() if k not in TRAINING_KEYS}
    # each value was checked when params.yaml was loaded (pipeline.config.head_section); the
    # rules between them are TrainSettings'
    try:
        return TrainSettings(**train), model
    except InvalidValue as e:
        if where is None:
            raise
        raise ConfigError(f"{where}.{e.key}: {e.reason}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def head_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy on the head's logits; a head with its own objective defines ``loss``."""
    custom: Callable[[Tensor, Tensor], Tensor] | None = getattr(model, "loss", None)
    if custom is not None:
        return custom(x, y)
    return nn.functional.cross_entropy(model(x), y)


@dataclass(frozen=True)
class EpochLog:
    """One epoch of ``fit``, as given to its ``on_epoch``: stage "pretrain", "train" or a phase's
    name; epoch: 0-based within the stage; lr: the learning rate of the parameters in no
    ``group_lr`` group that epoch (each group's rate is scaled by the same factor); loss: the
    epoch's mean loss; val: what ``fit``'s ``validate`` gave after the epoch (None: not asked)."""

    stage: str
    epoch: int
    lr: float
    loss: float
    val: float | None = None


def fit(
    model: nn.Module,
    x: np.ndarray | Rows,
    y: np.ndarray,
    s: TrainSettings,
    *,
    seed: int,
    desc: str = "train",
    on_epoch: Callable[[EpochLog], None] | None = None,
    validate: Callable[[nn.Module], float] | None = None,
) -> list[float]:
    """Train ``model`` on x (N, T, D) (an array or Rows), y (N,) -> mean loss per supervised
    epoch (over all of the head's phases, in order). Deterministic for a seed, and the same for
    an array and Rows holding the same values.

    Order: the head's ``prepare``; ``pretrain_epochs`` of its ``pretrain_loss`` (constant
    ``pretrain_lr``, every parameter, ``TrainSettings.pretraining``); then the supervised epochs: one phase training every
    parameter on ``head_loss``, or the head's ``phases()``, each with a fresh optimiser and
    schedule over its own parameters. ``on_epoch``: called after every epoch (pretraining too).
    ``validate(model)``: called after every epoch (in eval mode; training mode is restored
    after it), its value given as ``EpochLog.val``; it must not change the model (``predict``
    on held-out rows), and the training is then the same as without it."""
    seed_everything(seed)
    rows = as_rows(x)
    yt = torch.as_tensor(y, dtype=torch.long)
    if len(rows) != len(yt):
        raise ValueError(f"{desc}: {len(rows)} rows but {len(yt)} labels")
    prepare: Callable[[Iterable[Tensor]], None] | None = getattr(model, "prepare", None)
    if prepare is not None:
        with torch.no_grad():
            prepare(_prepare_batches(rows))
    gen = torch.Generator().manual_seed(seed)
    pretrain: Callable[[Tensor], Tensor] | None = getattr(model, "pretrain_loss", None)
    if s.pretrain_epochs and pretrain is None:
        raise ValueError(f"{type(model).__name__} has no pretrain_loss; set pretrain_epochs: 0")
    if s.pretrain_epochs:
        ps = s.pretraining()
        lr = ps.lr
        opt = build_optimizer(model, model.parameters(), ps)
        losses, vals = _epochs(
            model,
            opt,
            ps,
            [1.0] * s.pretrain_epochs,
            gen,
            rows,
            lambda xb, idx: pretrain(xb),
            f"{desc} (pretrain)",
            validate,
        )
        _report(on_epoch, "pretrain", lr, [1.0] * s.pretrain_epochs, losses, vals)
    staged: Callable[[], list[Phase]] | None = getattr(model, "phases", None)
    if staged is None:
        phases = [Phase("train", None, list(model.parameters()), partial(head_loss, model))]
    else:
        phases = staged()
    out: list[float] = []
    for phase in phases:
        epochs = s.epochs if phase.epochs is None else phase.epochs
        if epochs < 0:
            raise ValueError(f"{type(model).__name__}: phase {phase.name!r} has {epochs} epochs")
        if epochs == 0:
            continue
        if not any(p.requires_grad for p in phase.params):
            raise ValueError(
                f"{type(model).__name__}: phase {phase.name!r} has no parameter to train"
            )
        opt = build_optimizer(model, phase.params, s)
        factors = lr_factors(s, epochs)  # a fresh schedule in every phase
        losses, vals = _epochs(
            model,
            opt,
            s,
            factors,
            gen,
            rows,
            lambda xb, idx, loss=phase.loss: loss(xb, yt[torch.from_numpy(idx)]),
            desc if staged is None else f"{desc} ({phase.name})",
            validate,
        )
        _report(on_epoch, phase.name, s.lr, factors, losses, vals)
        out += losses
    return out


def _report(
    on_epoch: Callable[[EpochLog], None] | None,
    stage: str,
    lr: float,
    factors: list[float],
    losses: list[float],
    vals: list[float | None],
) -> None:
    if on_epoch is not None:
        for e, (f, loss, val) in enumerate(zip(factors, losses, vals, strict=True)):
            on_epoch(EpochLog(stage, e, lr * f, loss, val))


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each mini-batch of an epoch over n rows: ``batch_size`` rows each, the
    rest in the last one, except that a last batch of one row joins the one before it.

    Why: BatchNorm in training mode cannot normalise one row (TS-LSTM's and temporal
    inception's BatchNorm1d raise on (1, C)), and N % batch_size == 1 happens on real splits
    (UCF101 split 1: 9,537 = 596 x 16 + 1 training videos) and on out-of-fold folds. Merged,
    not dropped: every row is seen every epoch and the epoch's mean loss covers all rows; one
    batch of batch_size + 1 rows changes nothing else. n == 1 (or batch_size == 1) keeps
    batches of one row."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"batch_bounds needs n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    starts = list(range(0, n, batch_size))
    if batch_size > 1 and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(a, starts[i + 1] if i + 1 < len(starts) else n) for i, a in enumerate(starts)]


def _epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    s: TrainSettings,
    factors: list[float],
    gen: torch.Generator,
    rows: Rows,
    batch_loss: Callable[[Tensor, np.ndarray], Tensor],
    desc: str,
    validate: Callable[[nn.Module], float] | None = None,
) -> tuple[list[float], list[float | None]]:
    """One shuffled mini-batch epoch per entry of ``factors`` (that epoch's learning-rate
    factor, ``set_lr``) minimising ``batch_loss(x (B, T, ...), row numbers (B,))`` over the
    parameters of ``opt`` -> (mean loss per epoch, ``validate(model)`` after each epoch or
    None)."""
    losses: list[float] = []
    vals: list[float | None] = []
    model.train()
    n = len(rows)
    bounds = batch_bounds(n, s.batch_size)
    params = optimised(opt)
    for factor in progress(factors, desc=desc, unit="epoch"):
        set_lr(opt, factor)
        order = torch.randperm(n, generator=gen).numpy()
        total = 0.0
        for idx, xb in iter_batches(rows, order, bounds):
            # the model's, not only opt's: a phase's loss may reach parameters it does not
            # train, whose gradients would otherwise pile up
            model.zero_grad(set_to_none=True)
            loss = batch_loss(xb, idx)
            loss.backward()
            if s.grad_clip > 0:
                # the norm of what this optimiser steps (a phase's parameters only)
                nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        vals.append(None if validate is None else float(validate(model)))
        model.train()  # as the epochs began: validate's predict left it in eval mode
    return losses, vals


def predict(model: nn.Module, x: np.ndarray | Rows, *, batch_size: int = 256) -> np.ndarray:
    """x: (N, T, D) (an array or Rows) -> softmax probabilities (N, C)."""
    return predict_report(model, x, batch_size=batch_size)[0]


@torch.inference_mode()
def predict_report(
    model: nn.Module, x: np.ndarray | Rows, *, batch_size: int = 256
) -> tuple[np.ndarray, dict[str, float]]:
    """x: (N, T, D) (an array or Rows) -> (softmax probabilities (N, C), the head's
    ``report()`` averaged over batches weighted by batch size; empty for heads without one)."""
    model.eval()
    rows = as_rows(x)
    n = len(rows)
    report = getattr(model, "report", None)
    out, totals = [], {}
    bounds = [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
    for _, batch in iter_batches(rows, np.arange(n), bounds):
        out.append(model(batch).softmax(dim=-1))
        if report is not None:
            for k, v in report().items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(batch)
    return torch.cat(out).numpy(), {k: v / n for k, v in totals.items()}


def mean_over_views(probs: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """probs: (N, C) per view, groups: (N,) the video of each view -> (G, C), the mean of each
    video's views, videos in ascending ``groups`` order (G distinct values)."""
    ids, inverse = np.unique(groups, return_inverse=True)
    total = np.zeros((len(ids), probs.shape[1]), dtype=np.float64)
    np.add.at(total, inverse, probs)
    return (total / np.bincount(inverse)[:, None]).astype(probs.dtype)


def held_out_top1(
    model: nn.Module, *, x: Rows, y: np.ndarray, groups: np.ndarray | None = None
) -> float:
    """Top-1 of ``model`` on rows x (N, T, ...) with labels y (N,); with ``groups`` (N,) the
    video of each row, per video (the mean of its views' probabilities, as the scores are)."""
    probs = predict(model, x)
    if groups is None:
        return float((probs.argmax(1) == y).mean())
    _, first = np.unique(groups, return_index=True)  # mean_over_views' video order
    return float((mean_over_views(probs, groups).argmax(1) == y[first]).mean())


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
    x: np.ndarray | Rows,
    y: np.ndarray,
    s: TrainSettings,
    *,
    folds: int,
    seed: int,
    num_classes: int,
    groups: np.ndarray | None = None,
    score: Callable[[nn.Module, Rows], np.ndarray] | None = None,
    on_epoch: Callable[[int, EpochLog], None] | None = None,
) -> np.ndarray:
    """Cross-fitted probabilities (N, C) for the training rows x (N, T, ...) (an array or
    Rows): each is scored by a model that did not see its video, so late fusion learned on them
    (SVM) is not fitted to over-confident scores. groups: (N,) the video of each row (views); see ``fold_assignment``.
    score: what a fold model gives for its held-out rows, (n, ...) (None: ``predict``, (n, C);
    e.g. per-window scores as well, from the same fold models).
    on_epoch(fold, EpochLog): every epoch of every fold model, with ``val`` its top-1 on its
    held-out videos after that epoch (per video: the mean of its views' probabilities), the
    validation curve of the cross-fitting; the scores are the same with it as without.
    The result stays per row; ``mean_over_views`` gives per-video scores."""
    fold = fold_assignment(y, folds=folds, seed=seed, num_classes=num_classes, groups=groups)
    probs = np.zeros((len(y), num_classes), dtype=np.float32) if score is None else None
    k = int(fold.max()) + 1
    rows = as_rows(x)
    for f in range(k):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        model = make()
        held = rows.subset(te)
        fit(
            model,
            rows.subset(tr),
            y[tr],
            s,
            seed=seed + 1 + f,
            desc=f"fold {f + 1}/{k}",
            on_epoch=None if on_epoch is None else partial(on_epoch, f),
            validate=None
            if on_epoch is None
            else partial(
                held_out_top1, x=held, y=y[te], groups=None if groups is None else groups[te]
            ),
        )
        got = predict(model, held) if score is None else score(model, held)
        if probs is None:
            probs = np.zeros((len(y), *got.shape[1:]), dtype=np.float32)
        probs[te] = got
    assert probs is not None  # every fold holds a row (fold_assignment)
    return probs
