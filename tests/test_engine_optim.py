"""Tests for the optimisers, learning-rate schedules, per-group rates and staged training of
``pipeline.engine.fit`` (pipeline/optim.py). What the loop applies is read from the optimiser at
every step (a global step hook), and compared with hand-computed rates or torch's own schedulers.
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import pipeline.engine as engine
from pipeline.config import ConfigError, check_params, read_params
from pipeline.engine import Phase, TrainSettings, fit, split_head_params
from pipeline.heads import build_head

pytestmark = pytest.mark.usefixtures("one_thread")

T, D, C = 3, 6, 3
N = 8  # rows: batch_size 4 -> 2 steps per epoch
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _data(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, T, D)).astype(np.float32), np.arange(n) % C


class _Pool(nn.Module):
    """Mean over time, one linear map: (B, T, D) -> (B, C)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=1))


class _Steps:
    """Every optimiser step taken while open: (the optimiser, [(group name, lr)])."""

    def __enter__(self) -> list[tuple[torch.optim.Optimizer, list[tuple[Any, float]]]]:
        self.steps: list[tuple[torch.optim.Optimizer, list[tuple[Any, float]]]] = []

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.steps.append((opt, [(g.get("name"), g["lr"]) for g in opt.param_groups]))

        self.handle = register_optimizer_step_pre_hook(hook)
        return self.steps

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _epoch_lrs(s: TrainSettings, model: nn.Module | None = None) -> list[float]:
    """The first group's lr at the first step of each epoch, as the loop applied it (and the
    same at every step of the epoch)."""
    x, y = _data()
    with _Steps() as steps:
        fit(model or _Pool(), x, y, s, seed=0)
    per_epoch = len(steps) // s.epochs
    lrs = [lr for _, groups in steps for _, lr in groups[:1]]
    chunks = [lrs[e * per_epoch : (e + 1) * per_epoch] for e in range(s.epochs)]
    assert all(len(set(c)) == 1 for c in chunks), "the lr changed within an epoch"
    return [c[0] for c in chunks]


# -- optimisers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "cls", "expected"),
    [
        ({"optimizer": "adam", "weight_decay": 0.1}, torch.optim.Adam, {"weight_decay": 0.1}),
        ({"optimizer": "adamw", "weight_decay": 0.1}, torch.optim.AdamW, {"weight_decay": 0.1}),
        ({"optimizer": "sgd"}, torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
        (
            {"optimizer": "sgd", "momentum": 0.5, "nesterov": True},
            torch.optim.SGD,
            {"momentum": 0.5, "nesterov": True},
        ),
        ({"optimizer": "rmsprop"}, torch.optim.RMSprop, {"momentum": 0.0, "alpha": 0.99}),
        ({"optimizer": "rmsprop", "momentum": 0.8}, torch.optim.RMSprop, {"momentum": 0.8}),
        ({"optimizer": "adadelta"}, torch.optim.Adadelta, {"rho": 0.9, "eps": 1e-6}),
        ({"optimizer": "adadelta", "rho": 0.95}, torch.optim.Adadelta, {"rho": 0.95}),
    ],
)
def test_each_optimizer_is_the_torch_class_with_the_settings(
    settings: dict, cls: type, expected: dict
) -> None:
    x, y = _data()
    with _Steps() as steps:
        fit(_Pool(), x, y, TrainSettings(lr=0.03, epochs=1, batch_size=4, **settings), seed=0)
    opt = steps[0][0]
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.03
    for k, v in expected.items():
        assert opt.param_groups[0][k] == v, k


@pytest.mark.parametrize(
    ("optimizer", "reference"),
    [
        ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3)),
        ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01, weight_decay=1e-3)),
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-3)),
    ],
)
def test_the_old_settings_train_the_weights_a_plain_torch_loop_does(
    optimizer: str, reference: Any
) -> None:
    """Bit for bit: the optimisers that existed before schedules keep their exact behaviour
    (the reference: the loop the engine always ran, written out with torch alone)."""
    x, y = _data(n=10)
    s = TrainSettings(optimizer=optimizer, lr=0.01, weight_decay=1e-3, epochs=3, batch_size=4)
    torch.manual_seed(5)
    model = build_head("mean_pool", in_dim=D, num_classes=C, dropout=0.5)
    losses = fit(model, x, y, s, seed=7)

    torch.manual_seed(5)
    ref = build_head("mean_pool", in_dim=D, num_classes=C, dropout=0.5)
    engine.seed_everything(7)
    gen = torch.Generator().manual_seed(7)
    opt = reference(list(ref.parameters()))
    ref.train()
    ref_losses = []
    for _ in range(3):
        order = torch.randperm(10, generator=gen).numpy()
        total = 0.0
        for a, b in [(0, 4), (4, 8), (8, 10)]:  # batch_bounds(10, 4): a last batch of 2 stays
            idx = order[a:b]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(
                ref(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])
            )
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        ref_losses.append(total / 10)
    assert losses == ref_losses
    for (k, v), (_, w) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)


def test_the_optimizer_choices_are_params_yamls() -> None:
    from pipeline import config, optim

    assert typing.get_args(config.Optimizer) == tuple(optim.OPTIMIZERS)
    assert typing.get_args(config.Schedule) == optim.SCHEDULES


# -- schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, [1.0] * 5),
        ({"schedule": "step", "step_size": 2, "gamma": 0.5}, [1.0, 1.0, 0.5, 0.5, 0.25]),
        ({"schedule": "step", "step_size": 3}, [1.0, 1.0, 1.0, 0.1, 0.1]),  # gamma 0.1
        ({"schedule": "multistep", "milestones": [1, 3], "gamma": 0.1}, [1, 0.1, 0.1, 0.01, 0.01]),
        # 0.2 + 0.8 (1 + cos(pi e / 5)) / 2
        ({"schedule": "cosine", "min_lr": 0.2}, [1.0, 0.923607, 0.723607, 0.476393, 0.276393]),
        ({"warmup_epochs": 3}, [0.25, 0.5, 0.75, 1.0, 1.0]),
        # warm-up times the schedule: (e + 1) / 3 x 0.5 ** (e // 2)
        (
            {"schedule": "step", "step_size": 2, "gamma": 0.5, "warmup_epochs": 2},
            [1 / 3, 2 / 3, 0.5, 0.5, 0.25],
        ),
    ],
)
def test_each_schedule_sets_the_specified_lr_per_epoch(settings: dict, expected: list) -> None:
    if "milestones" in settings:
        settings = {**settings, "milestones": tuple(settings["milestones"])}
    s = TrainSettings(optimizer="sgd", lr=1.0, epochs=5, batch_size=4, **settings)
    assert _epoch_lrs(s) == pytest.approx(expected, rel=1e-5)


def test_cosine_with_warm_up_is_torchs_linear_warm_up_chained_with_cosine() -> None:
    """An independent reference: torch's own schedulers stepped once per epoch."""
    s = TrainSettings(lr=0.1, epochs=7, batch_size=4, schedule="cosine", warmup_epochs=2)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / 3, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7),
        ]
    )
    want = []
    for _ in range(7):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert _epoch_lrs(s) == pytest.approx(want, rel=1e-9)


def test_the_scheduled_lr_is_the_step_the_weights_take() -> None:
    """Plain SGD on a loss whose gradient is 1: each step moves the weight by exactly -lr."""

    class Sum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(len(x), C)

        def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            seen.append(self.w.item())
            return self.w * 1.0

    seen: list[float] = []
    s = TrainSettings(
        optimizer="sgd", momentum=0.0, lr=0.5, epochs=4, batch_size=4,
        schedule="multistep", milestones=(2,),
    )  # fmt: skip
    x, y = _data()
    fit(Sum(), x, y, s, seed=0)
    steps = -np.diff(seen)  # 2 steps an epoch: 0.5, 0.5, 0.5, 0.5, 0.05, 0.05, 0.05
    np.testing.assert_allclose(steps, [0.5] * 4 + [0.05] * 3, rtol=1e-6)


def test_on_epoch_records_the_lr_the_loop_applied() -> None:
    s = TrainSettings(lr=1.0, epochs=4, batch_size=4, schedule="step", step_size=1, gamma=0.5)
    seen: list[Any] = []
    x, y = _data()
    with _Steps() as steps:
        losses = fit(_Pool(), x, y, s, seed=0, on_epoch=seen.append)
    assert [e.lr for e in seen] == [groups[0][1] for _, groups in steps[::2]]
    assert [e.lr for e in seen] == [1.0, 0.5, 0.25, 0.125]
    assert [e.loss for e in seen] == losses
    assert [(e.stage, e.epoch) for e in seen] == [("train", i) for i in range(4)]


def test_pretraining_runs_at_a_constant_pretrain_lr() -> None:
    class Pre(_Pool):
        def pretrain_loss(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean(dim=1)).pow(2).mean()

    s = TrainSettings(
        lr=1.0, epochs=2, batch_size=4, schedule="step", step_size=1, gamma=0.5,
        pretrain_epochs=3, pretrain_lr=0.01, warmup_epochs=1,
    )  # fmt: skip
    seen: list[Any] = []
    x, y = _data()
    fit(Pre(), x, y, s, seed=0, on_epoch=seen.append)
    assert [(e.stage, e.lr) for e in seen] == [("pretrain", 0.01)] * 3 + [
        ("train", 0.5),  # warm-up: 1 x 1 / 2
        ("train", 0.5),  # step: 0.5 ** 1
    ]


def test_pretraining_takes_its_own_optimizer_batch_size_and_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RTSAE (paper 003): Adadelta (rho 0.95) at batch 32 for the autoencoder, then SGD with
    momentum 0.9 at batch 16: each optimiser gets the keys it takes, each stage its batch."""
    made: list[torch.optim.Optimizer] = []
    real = engine.build_optimizer

    def spy(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(engine, "build_optimizer", spy)
    sizes: list[tuple[str, int]] = []

    class Pre(_Pool):
        def pretrain_loss(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(("pretrain", len(x)))
            return self.fc(x.mean(dim=1)).pow(2).mean()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(("train", len(x)))
            return super().forward(x)

    s = TrainSettings(
        optimizer="sgd", momentum=0.9, lr=1e-3, epochs=1, batch_size=2, rho=0.95,
        pretrain_epochs=1, pretrain_optimizer="adadelta", pretrain_lr=1.0, pretrain_batch_size=8,
    )  # fmt: skip
    x, y = _data()
    fit(Pre(), x, y, s, seed=0)
    assert [type(o).__name__ for o in made] == ["Adadelta", "SGD"]
    pre, sup = made[0].param_groups[0], made[1].param_groups[0]
    assert (pre["rho"], pre["lr"]) == (0.95, 1.0)
    assert (sup["momentum"], sup["lr"]) == (0.9, 1e-3)
    assert sizes == [("pretrain", 8)] + [("train", 2)] * 4
    # rho with neither optimiser adadelta is refused, as before
    with pytest.raises(ValueError, match="rho"):
        TrainSettings(optimizer="sgd", rho=0.95, pretrain_epochs=1, pretrain_optimizer="adam")


# -- per-group learning rates -------------------------------------------------------------------


def _mrrn() -> nn.Module:
    torch.manual_seed(0)
    return build_head("sru", in_dim=D, num_classes=C, hidden=4, layers=1, levels=[1, 2, 3])


def test_sru_levels_are_its_parameter_groups() -> None:
    model = _mrrn()
    groups = model.param_groups()
    assert list(groups) == ["low", "mid", "high"]
    for name, stack in zip(groups, model.stacks, strict=True):
        assert [id(p) for p in groups[name]] == [id(p) for p in stack.parameters()]
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    assert groups["low"][0].shape[1] == 1 and groups["high"][0].shape[1] == 3  # input dims
    one = build_head("sru", in_dim=D, num_classes=C, hidden=4, layers=1)
    assert one.param_groups() == {}


def test_group_lr_gives_mrrns_low_and_mid_levels_their_rate_through_the_schedule() -> None:
    """Paper 002: 1e-5 for 8 epochs then 1e-6, 1e-4 for the low and mid levels (here the
    milestone is epoch 1 of 2; every group follows the same schedule)."""
    model = _mrrn()
    s = TrainSettings(
        lr=1e-5, epochs=2, batch_size=4, schedule="multistep", milestones=(1,),
        group_lr={"low": 1e-4, "mid": 1e-4},
    )  # fmt: skip
    x, y = _data()
    with _Steps() as steps:
        fit(model, x, y, s, seed=0)
    opt = steps[0][0]
    named = {g["name"]: g["params"] for g in opt.param_groups}
    levels = model.param_groups()
    assert [id(p) for p in named["low"]] == [id(p) for p in levels["low"]]
    assert [id(p) for p in named["mid"]] == [id(p) for p in levels["mid"]]
    assert [id(p) for p in named[None]] == [id(p) for p in levels["high"]]  # the rest: lr
    rates = [dict(groups) for _, groups in steps]
    want = [{None: 1e-5, "low": 1e-4, "mid": 1e-4}] * 2 + [
        {None: 1e-6, "low": 1e-5, "mid": 1e-5}
    ] * 2
    assert rates == [pytest.approx(w, rel=1e-12) for w in want]


@pytest.mark.parametrize(
    ("model", "names"),
    [(_mrrn, "low, mid, high"), (lambda: _Pool(), "none")],
)
def test_a_group_the_head_does_not_declare_is_refused(model: Any, names: str) -> None:
    x, y = _data()
    s = TrainSettings(epochs=1, batch_size=4, group_lr={"top": 1e-3})
    with pytest.raises(ValueError, match=r"group_lr names 'top', but its parameter groups") as e:
        fit(model(), x, y, s, seed=0)
    assert names in str(e.value)
    assert type(model()).__name__ in str(e.value)


# -- staged training ----------------------------------------------------------------------------


class _TwoPart(nn.Module):
    """Two linear maps whose logits add: phase "a" trains a, then phase "b" trains b."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(D, C), nn.Linear(D, C)
        self.calls: list[str] = []
        self.a_when_b_started: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x.mean(dim=1)) + self.b(x.mean(dim=1))

    def _loss(self, name: str) -> Any:
        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if name == "b" and self.a_when_b_started is None:
                self.a_when_b_started = self.a.weight.detach().clone()
            self.calls.append(name)
            return nn.functional.cross_entropy(self(x), y)

        return loss

    def phases(self) -> list[Phase]:
        return [
            Phase("a", 2, list(self.a.parameters()), self._loss("a")),
            Phase("b", None, list(self.b.parameters()), self._loss("b")),
        ]


def test_phases_run_in_order_and_train_only_their_parameters() -> None:
    from pipeline import optim

    model = _TwoPart()
    a0, b0 = model.a.weight.detach().clone(), model.b.weight.detach().clone()
    x, y = _data()
    # weight decay and clipping: neither may reach a parameter outside the phase
    s = TrainSettings(lr=0.05, epochs=3, batch_size=4, weight_decay=0.1, grad_clip=0.1)
    seen: list[Any] = []
    with _Steps() as steps:
        losses = fit(model, x, y, s, seed=0, on_epoch=seen.append)
    assert model.calls == ["a"] * 4 + ["b"] * 6  # 2 epochs, then s.epochs = 3; 2 steps each
    assert len(losses) == 5 and [e.stage for e in seen] == ["a"] * 2 + ["b"] * 3
    assert not torch.equal(model.a_when_b_started, a0)  # phase a trained a ...
    assert torch.equal(model.a.weight, model.a_when_b_started)  # ... and phase b left it
    assert not torch.equal(model.b.weight, b0)
    opts = [opt for opt, _ in steps]
    assert opts[0] is opts[3] and opts[4] is opts[-1] and opts[0] is not opts[4]  # fresh per phase
    assert [id(p) for p in optim.optimised(opts[0])] == [id(p) for p in model.a.parameters()]


def test_phase_a_alone_leaves_the_other_parameters_untouched() -> None:
    model = _TwoPart()
    model.phases = lambda: [Phase("a", 2, list(model.a.parameters()), model._loss("a"))]
    b0 = model.b.weight.detach().clone()
    x, y = _data()
    fit(model, x, y, TrainSettings(lr=0.05, epochs=3, batch_size=4, weight_decay=0.1), seed=0)
    assert torch.equal(model.b.weight, b0)


def test_a_phase_trains_like_a_model_whose_other_parameters_are_frozen() -> None:
    """Gradient clipping included: the norm is over the phase's parameters, so b's gradient
    (the phase's loss reaches b) does not shrink a's steps."""
    x, y = _data()
    s = TrainSettings(lr=0.05, epochs=3, batch_size=4, grad_clip=0.05)
    staged = _TwoPart()
    staged.phases = lambda: [Phase("a", None, list(staged.a.parameters()), staged._loss("a"))]
    fit(staged, x, y, s, seed=0)
    frozen = _TwoPart()
    frozen.phases = None  # one plain phase over the parameters that need a gradient
    frozen.b.requires_grad_(False)
    fit(frozen, x, y, s, seed=0)
    torch.testing.assert_close(staged.a.weight, frozen.a.weight, rtol=0, atol=0)
    torch.testing.assert_close(staged.b.weight, frozen.b.weight, rtol=0, atol=0)


def test_each_phase_restarts_the_schedule_over_its_own_epochs() -> None:
    s = TrainSettings(lr=1.0, epochs=3, batch_size=4, schedule="step", step_size=1, gamma=0.5)
    seen: list[Any] = []
    x, y = _data()
    fit(_TwoPart(), x, y, s, seed=0, on_epoch=seen.append)
    assert [e.lr for e in seen] == [1.0, 0.5, 1.0, 0.5, 0.25]


# -- settings checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key", "reason"),
    [
        ({"schedule": "step"}, "step_size", "schedule step needs step_size"),
        ({"schedule": "multistep"}, "milestones", "schedule multistep needs milestones"),
        ({"schedule": "multistep", "milestones": (3, 3)}, "milestones", "strictly increasing"),
        ({"schedule": "cosine", "step_size": 2}, "step_size", "only schedule step takes it"),
        ({"gamma": 0.5}, "gamma", "only schedule step or multistep takes it, not constant"),
        ({"schedule": "step", "step_size": 2, "min_lr": 0.0}, "min_lr", "only schedule cosine"),
        ({"schedule": "cosine", "min_lr": 0.1, "lr": 0.01}, "min_lr", "must be <= lr (0.01)"),
        ({"warmup_epochs": 30}, "warmup_epochs", "must be < epochs (30), got 30"),
        ({"nesterov": True}, "nesterov", "only sgd has Nesterov momentum, not adam"),
        ({"optimizer": "sgd", "momentum": 0.0, "nesterov": True}, "nesterov", "momentum > 0"),
        ({"momentum": 0.9}, "momentum", "only sgd and rmsprop take a momentum, not adam"),
        ({"optimizer": "sgd", "rho": 0.9}, "rho", "only adadelta takes rho, not sgd"),
    ],
)
def test_settings_that_contradict_each_other_are_refused_naming_the_key(
    kwargs: dict, key: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=rf"^TrainSettings\.{key}: .*{re.escape(reason)}"):
        TrainSettings(**kwargs)
    with pytest.raises(
        ConfigError, match=rf"^params\.yaml:heads\.sru\.{key}: .*{re.escape(reason)}"
    ):
        split_head_params({"hidden": 8, **kwargs}, where="params.yaml:heads.sru")


def _refused(key: str, value: Any) -> str:
    data = read_params(PARAMS)
    data["heads"]["sru"][key] = value
    with pytest.raises(ConfigError) as e:
        check_params(data, source="params.yaml")
    return str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("schedule", "linear", "unknown 'linear' (choose from constant, step, multistep, cosine)"),
        ("optimizer", "lamb", "unknown 'lamb' (choose from adam, adamw, sgd, rmsprop, adadelta)"),
        ("milestones", [4, 0], "milestones[1]: must be >= 1, got 0"),
        ("milestones", 8, "milestones: expected a list, got 8"),
        ("gamma", 1.5, "gamma: must be > 0 and <= 1, got 1.5"),
        ("momentum", 1.0, "momentum: must be >= 0 and < 1, got 1.0"),
        ("nesterov", "yes", "nesterov: expected true/false, got 'yes'"),
        ("group_lr", {"low": 0}, "group_lr.low: must be > 0, got 0.0"),
        ("warmup_epochs", -1, "warmup_epochs: must be >= 0, got -1"),
        ("step_size", 0, "step_size: must be >= 1, got 0"),
    ],
)
def test_params_yaml_refuses_a_bad_training_value_naming_the_key(
    key: str, value: Any, message: str
) -> None:
    got = _refused(key, value)
    assert got.startswith("params.yaml:heads.sru.") and got.endswith(message), got


def test_params_yaml_training_values_arrive_as_train_settings() -> None:
    data = read_params(PARAMS)
    data["heads"]["sru"] |= {
        "schedule": "multistep", "milestones": [8], "gamma": 0.1,
        "group_lr": {"low": "1e-4", "mid": 1.0e-4}, "lr": 1.0e-5,
    }  # fmt: skip
    section = check_params(data, source="params.yaml").heads["sru"]
    s, _ = split_head_params(section)
    assert s.milestones == (8,) and s.group_lr == {"low": 1e-4, "mid": 1e-4}
    assert _lrs_of(s, 10) == pytest.approx([1e-5] * 8 + [1e-6] * 2)


def _lrs_of(s: TrainSettings, epochs: int) -> list[float]:
    from pipeline.optim import lr_factors

    return [s.lr * f for f in lr_factors(s, epochs)]


def test_lr_factor_matches_torchs_step_and_multistep_schedulers() -> None:
    from pipeline.optim import lr_factors

    for s, make in [
        (
            TrainSettings(epochs=12, schedule="step", step_size=5, gamma=0.5),
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
        ),
        (
            TrainSettings(epochs=12, schedule="multistep", milestones=(2, 8), gamma=0.3),
            lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 8], gamma=0.3),
        ),
    ]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        want = []
        for _ in range(12):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lr_factors(s, 12) == pytest.approx(want, rel=1e-12)
    assert math.isclose(lr_factors(TrainSettings(epochs=4, schedule="cosine"), 4)[2], 0.5)
