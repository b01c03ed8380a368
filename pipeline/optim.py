"""A head's training settings, and the optimiser and learning-rate schedule they build: one
implementation for every head, used by ``pipeline.engine.fit``.

The learning rate of epoch e (0-based) of a run of E epochs is ``lr x lr_factor(s, e, E)``:

- ``constant``: 1
- ``step``: gamma ** (e // step_size) (TSRNN: lr 1e-3 halved every 5 epochs: step_size 5,
  gamma 0.5)
- ``multistep``: gamma ** (the number of milestones <= e) (MRRN: 1e-5 for 8 epochs, then 1e-6:
  milestones [8], gamma 0.1)
- ``cosine``: m + (1 - m) (1 + cos(pi e / E)) / 2 with m = min_lr / lr: from lr at the first
  epoch towards min_lr, which the epoch after the last would reach (torch's CosineAnnealingLR
  with T_max = E), so no epoch is spent at min_lr
- ``warmup_epochs`` W, with any of them: epochs e < W are further multiplied by (e + 1) / (W + 1),
  a linear ramp that reaches the schedule's own value at epoch W (torch's LinearLR with
  start_factor 1 / (W + 1) and total_iters W, chained with the schedule).

Schedules count epochs from 0 and step once per epoch, not per mini-batch. Every parameter group
(``group_lr``) is scaled by the same factor, so a group keeps its ratio to ``lr``; ``min_lr`` is
the floor of ``lr`` itself and a group falls to the same fraction of its own rate. A staged
training (a head's ``phases()``) restarts the schedule in each phase, over that phase's epochs.
Pretraining (``pretrain_epochs``) runs at a constant ``pretrain_lr`` over every parameter, with
no schedule, warm-up or group rates: it is a different objective (RTSAE's autoencoder), which
the papers train at one fixed rate, with its own optimiser and batch size where the paper gives
them (``pretrain_optimizer``, ``pretrain_batch_size``; RTSAE: Adadelta, batch 32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from pipeline.config import InvalidValue


@dataclass(frozen=True)
class TrainSettings:
    """The training keys of a ``heads.<name>`` section (pipeline.config.HEAD_TRAINING gives
    their types and allowed values; this class the defaults and the rules between keys)."""

    optimizer: str = "adam"  # adam | adamw | sgd | rmsprop | adadelta
    lr: float = 1e-3  # of the parameters in no group_lr group
    weight_decay: float = 0.0  # adam: L2 added to the gradient; adamw: decoupled
    momentum: float | None = None  # sgd, rmsprop; None = 0.9 for sgd, 0 for rmsprop (torch's)
    nesterov: bool = False  # sgd only, with momentum > 0
    rho: float | None = None  # adadelta's decay of its running averages; None = torch's 0.9
    epochs: int = 30
    batch_size: int = 32
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    schedule: str = "constant"  # constant | step | multistep | cosine (see the module docstring)
    step_size: int | None = None  # step: epochs between decays (required)
    gamma: float | None = None  # step, multistep: the decay factor; None = 0.1 (torch's)
    milestones: tuple[int, ...] | None = None  # multistep: increasing epochs (required)
    min_lr: float | None = None  # cosine: the floor of lr; None = 0
    warmup_epochs: int = 0  # linear warm-up, with any schedule
    group_lr: dict[str, float] = field(default_factory=dict)  # {head's param group: its lr}
    pretrain_epochs: int = 0  # epochs of the head's pretrain_loss before supervised training
    pretrain_lr: float | None = None  # None = lr
    pretrain_optimizer: str | None = None  # None = optimizer (RTSAE: Adadelta in stage 2)
    pretrain_batch_size: int | None = None  # None = batch_size

    def __post_init__(self) -> None:
        for key, reason in self._rules():
            raise InvalidValue(type(self).__name__, key, reason)

    def _rules(self) -> Iterable[tuple[str, str]]:
        """(key, reason) of each broken rule between settings. The values one key may take
        (choices, bounds) are pipeline.config's to check when params.yaml is loaded."""
        if self.optimizer not in OPTIMIZERS:
            yield "optimizer", f"unknown {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})"
        if self.schedule not in SCHEDULES:
            yield "schedule", f"unknown {self.schedule!r} (choose from {', '.join(SCHEDULES)})"
        if self.pretrain_optimizer is not None and self.pretrain_optimizer not in OPTIMIZERS:
            yield "pretrain_optimizer", f"unknown {self.pretrain_optimizer!r}"
        # a key the chosen optimiser(s) or schedule would ignore is refused, not silently
        # dropped; with a pretrain_optimizer, an optimiser's own key (momentum, rho) goes to
        # whichever of the two takes it
        used = " or ".join(dict.fromkeys(self._optimizers))
        if self.momentum is not None and not {"sgd", "rmsprop"} & set(self._optimizers):
            yield "momentum", f"only sgd and rmsprop take a momentum, not {used}"
        if self.nesterov and "sgd" not in self._optimizers:
            yield "nesterov", f"only sgd has Nesterov momentum, not {used}"
        if self.nesterov and not self.momentum_used:
            yield "nesterov", "needs momentum > 0, got 0"
        if self.rho is not None and "adadelta" not in self._optimizers:
            yield "rho", f"only adadelta takes rho, not {used}"
        # pretrain_* keys with pretrain_epochs 0 are allowed: -S pretrain_epochs=0 is an ablation
        uses = {
            "step_size": ("step",),
            "gamma": ("step", "multistep"),
            "milestones": ("multistep",),
            "min_lr": ("cosine",),
        }
        for key, schedules in uses.items():
            if getattr(self, key) is not None and self.schedule not in schedules:
                yield key, f"only schedule {' or '.join(schedules)} takes it, not {self.schedule}"
        if self.schedule == "step" and self.step_size is None:
            yield "step_size", "schedule step needs step_size (epochs between decays)"
        if self.schedule == "multistep":
            m = self.milestones
            if not m:
                yield "milestones", "schedule multistep needs milestones (epochs where lr decays)"
            elif any(b <= a for a, b in zip(m, m[1:], strict=False)):
                yield "milestones", f"must be strictly increasing, got {list(m)}"
        if self.min_lr is not None and self.min_lr > self.lr:
            yield "min_lr", f"must be <= lr ({self.lr:g}), got {self.min_lr:g}"
        if self.warmup_epochs >= self.epochs:
            yield "warmup_epochs", f"must be < epochs ({self.epochs}), got {self.warmup_epochs}"

    @property
    def _optimizers(self) -> tuple[str, ...]:
        """The optimisers this run uses: the supervised one, and the pretraining one if set."""
        if self.pretrain_epochs and self.pretrain_optimizer is not None:
            return (self.optimizer, self.pretrain_optimizer)
        return (self.optimizer,)

    def pretraining(self) -> TrainSettings:
        """The settings pretraining runs with: ``pretrain_optimizer`` (its own keys among
        momentum, nesterov and rho; torch's defaults for the others), ``pretrain_lr``,
        ``pretrain_batch_size``, a constant rate over every parameter (no schedule, warm-up
        or group rates)."""
        opt = self.pretrain_optimizer or self.optimizer
        return TrainSettings(
            optimizer=opt,
            lr=self.pretrain_lr or self.lr,
            weight_decay=self.weight_decay,
            momentum=self.momentum if opt in ("sgd", "rmsprop") else None,
            nesterov=self.nesterov and opt == "sgd",
            rho=self.rho if opt == "adadelta" else None,
            epochs=self.pretrain_epochs,
            batch_size=self.pretrain_batch_size or self.batch_size,
            grad_clip=self.grad_clip,
        )

    @property
    def momentum_used(self) -> float:
        """The momentum sgd or rmsprop uses (the default that kept old runs identical)."""
        if self.momentum is not None:
            return self.momentum
        return 0.9 if self.optimizer == "sgd" else 0.0


# Keys of a head's params.yaml section that configure training, not the module.
TRAINING_KEYS = tuple(f.name for f in fields(TrainSettings))


def _adam(p: list[dict], s: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.Adam(p, lr=s.lr, weight_decay=s.weight_decay)


def _adamw(p: list[dict], s: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(p, lr=s.lr, weight_decay=s.weight_decay)


def _sgd(p: list[dict], s: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        p, lr=s.lr, momentum=s.momentum_used, nesterov=s.nesterov, weight_decay=s.weight_decay
    )


def _rmsprop(p: list[dict], s: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(p, lr=s.lr, momentum=s.momentum_used, weight_decay=s.weight_decay)


def _adadelta(p: list[dict], s: TrainSettings) -> torch.optim.Optimizer:
    # eps stays torch's 1e-6, RTSAE's value (paper 003: eps 1e-6, rho 0.95)
    rho = {} if s.rho is None else {"rho": s.rho}
    return torch.optim.Adadelta(p, lr=s.lr, weight_decay=s.weight_decay, **rho)


# params.yaml's choices (pipeline.config.Optimizer lists the same names: tests check it)
OPTIMIZERS: dict[str, Callable[[list[dict], TrainSettings], torch.optim.Optimizer]] = {
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
    "rmsprop": _rmsprop,
    "adadelta": _adadelta,
}
SCHEDULES = ("constant", "step", "multistep", "cosine")


def lr_factor(s: TrainSettings, epoch: int, epochs: int) -> float:
    """The factor on every group's learning rate in epoch ``epoch`` (0-based) of a run of
    ``epochs`` epochs (see the module docstring for each schedule)."""
    if s.schedule == "step":
        f = (0.1 if s.gamma is None else s.gamma) ** (epoch // s.step_size)
    elif s.schedule == "multistep":
        passed = sum(m <= epoch for m in s.milestones or ())
        f = (0.1 if s.gamma is None else s.gamma) ** passed
    elif s.schedule == "cosine":
        floor = (s.min_lr or 0.0) / s.lr
        f = floor + (1.0 - floor) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0
    else:
        f = 1.0
    if epoch < s.warmup_epochs:
        f *= (epoch + 1) / (s.warmup_epochs + 1)
    return f


def lr_factors(s: TrainSettings, epochs: int) -> list[float]:
    """``lr_factor`` of each epoch of a run of ``epochs`` epochs: what the training loop applies."""
    return [lr_factor(s, e, epochs) for e in range(epochs)]


def head_param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The head's named parameter groups (its optional ``param_groups()``), {} without."""
    declare: Callable[[], Mapping[str, list[nn.Parameter]]] | None = getattr(
        model, "param_groups", None
    )
    return {} if declare is None else dict(declare())


def build_optimizer(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    s: TrainSettings,
    *,
    lr: float | None = None,
    group_lr: Mapping[str, float] | None = None,
) -> torch.optim.Optimizer:
    """The optimiser of ``s.optimizer`` over ``params`` (those that require a gradient): one
    torch param group per ``group_lr`` entry (the parameters of the head's group of that name
    that are in ``params``, at that lr), then the rest at ``lr`` (None = ``s.lr``). Every group
    carries ``name`` (None for the rest) and ``base_lr``, which ``set_lr`` scales.

    Raises ValueError when ``group_lr`` names a group the head does not declare (naming the
    head, the name and its groups) or when two named groups share a parameter."""
    group_lr = s.group_lr if group_lr is None else group_lr
    lr = s.lr if lr is None else lr
    trainable = [p for p in params if p.requires_grad]
    declared = head_param_groups(model) if group_lr else {}
    unknown = [g for g in group_lr if g not in declared]
    if unknown:
        have = ", ".join(declared) or "none (it has no param_groups())"
        raise ValueError(
            f"{type(model).__name__}: group_lr names {', '.join(map(repr, unknown))}, "
            f"but its parameter groups are: {have}"
        )
    keep = {id(p) for p in trainable}
    owner: dict[int, str] = {}
    groups: list[dict[str, Any]] = []
    for name, group_rate in group_lr.items():
        mine = [p for p in declared[name] if id(p) in keep]
        for p in mine:
            if id(p) in owner:
                raise ValueError(
                    f"{type(model).__name__}: a parameter is in groups {owner[id(p)]!r} and "
                    f"{name!r}; group_lr needs disjoint groups"
                )
            owner[id(p)] = name
        if mine:  # a phase may train none of a group's parameters
            groups.append({"params": mine, "lr": group_rate, "base_lr": group_rate, "name": name})
    rest = [p for p in trainable if id(p) not in owner]
    if rest:
        # first, and the only group without group_lr: the optimiser old runs were trained with
        groups.insert(0, {"params": rest, "lr": lr, "base_lr": lr, "name": None})
    return OPTIMIZERS[s.optimizer](groups, s)


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Every group's lr := its ``base_lr`` x ``factor`` (one epoch's schedule)."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def optimised(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters ``opt`` updates, in its order."""
    return [p for g in opt.param_groups for p in g["params"]]
