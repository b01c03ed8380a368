"""Tests for pipeline/heads: every registered head, the registry, and head-specific behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import slow_cases
from torch import nn

from pipeline.engine import TrainSettings, fit, head_loss, predict
from pipeline.heads import (
    HEADS,
    build_head,
    get_head_class,
    head_arguments,
    head_names,
    load_all,
    register_head,
)

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, D, C = 4, 6, 16, 3


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_head(name, in_dim=D, num_classes=C)


def test_registry_holds_the_params_yaml_heads() -> None:
    assert {"mean_pool", "lstm"} <= set(head_names())
    # each module registers the head of its own name, so importing a head by name works
    assert sorted(load_all()) == head_names()


@pytest.mark.slow  # a fresh interpreter
def test_a_head_is_imported_only_when_asked_for() -> None:
    """A train stage imports its own head's module only (its dvc.yaml deps list that file)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; from pipeline.heads import build_head; "
        "build_head('lstm', in_dim=4, num_classes=2); "
        "print(sorted(m for m in sys.modules if m.startswith('pipeline.heads.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "['pipeline.heads.lstm']"


@pytest.mark.parametrize("name", head_names())
def test_output_shape(name: str) -> None:
    model = _build(name).eval()
    for b, t in [(B, T), (1, 1), (3, 25)]:
        assert model(torch.randn(b, t, D)).shape == (b, C)


@pytest.mark.parametrize("name", head_names())
def test_backward_gives_finite_grads_on_every_parameter(name: str) -> None:
    model = _build(name).train()
    # head_loss: the head's own objective when it has one (auxiliary branches get gradients too)
    x = torch.randn(B, T, D)
    loss = head_loss(model, x, torch.tensor([0, 1, 2, 0]))
    pretrain = getattr(model, "pretrain_loss", None)
    if pretrain is not None:  # a branch trained only before (RTSAE's decoder, gone in stage 3)
        loss = loss + pretrain(x)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# slow: over 1 s (measured on 2 shared cores); the other heads take 0.01-0.2 s
@pytest.mark.parametrize("name", slow_cases(head_names(), {"sru"}))
def test_deterministic_for_a_seed(name: str) -> None:
    x = torch.randn(B, T, D)
    a, b = _build(name, seed=0).eval(), _build(name, seed=0).eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    c = _build(name, seed=1).eval()
    assert not torch.allclose(a(x), c(x))  # the seed is what makes them equal


# slow: 1.2-6 s each (measured on 2 shared cores); the other heads take under 1 s
@pytest.mark.parametrize("name", slow_cases(head_names(), {"res_lstm", "sru", "tsrnn"}))
def test_fits_a_separable_set(name: str) -> None:
    # Each class has its own mean feature direction; every step is noisy around it.
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(C), 8)
    centres = rng.normal(size=(C, D)) * 2
    x = centres[y][:, None, :] + rng.normal(scale=0.5, size=(len(y), T, D))
    model = _build(name)
    settings = TrainSettings(lr=3e-3, epochs=20, batch_size=8)
    losses = fit(model, x.astype(np.float32), y, settings, seed=0)
    assert losses[-1] < losses[0]
    assert (predict(model, x).argmax(axis=1) == y).all()


@pytest.mark.parametrize("name", head_names())
def test_head_arguments_are_keyword_only(name: str) -> None:
    args = head_arguments(name)
    assert "in_dim" not in args and "num_classes" not in args
    with pytest.raises(TypeError):
        get_head_class(name)(D, C)  # type: ignore[call-arg]


def test_register_head_rejects_a_duplicate_name() -> None:
    get_head_class("lstm")
    before = dict(HEADS)
    with pytest.raises(ValueError, match="'lstm' is already registered"):

        @register_head("lstm")
        class Other(nn.Module):
            pass

    assert HEADS == before


def test_build_head_names_an_unknown_kwarg() -> None:
    with pytest.raises(TypeError, match="hiden") as e:
        build_head("lstm", in_dim=D, num_classes=C, hiden=32)
    assert "hidden" in str(e.value)  # and lists what it does take


def test_unknown_head() -> None:
    with pytest.raises(KeyError, match="unknown head 'gru'"):
        build_head("gru", in_dim=D, num_classes=C)


def test_build_head_passes_its_kwargs() -> None:
    model = build_head("lstm", in_dim=D, num_classes=C, hidden=7, layers=2)
    assert model.lstm.hidden_size == 7 and model.lstm.num_layers == 2
    with pytest.raises(ValueError, match="layers must be 1-3"):
        build_head("lstm", in_dim=D, num_classes=C, layers=4)


def test_mean_pool_ignores_order_lstm_does_not() -> None:
    x = torch.randn(B, T, D)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(perm, torch.arange(T))
    mean_pool = _build("mean_pool").eval()
    torch.testing.assert_close(mean_pool(x[:, perm]), mean_pool(x))
    lstm = _build("lstm").eval()
    assert not torch.allclose(lstm(x[:, perm]), lstm(x), atol=1e-4)


def test_params_yaml_configures_every_head_with_known_arguments() -> None:
    """Every registered head has a params.yaml section whose keys are training settings or the
    head's own constructor arguments, and it builds from them."""
    from pathlib import Path

    import yaml

    from pipeline.engine import split_head_params

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert set(params["heads"]) == set(head_names())
    assert set(params["run"]["heads"]) | set(params["run"]["joint_heads"]) <= set(head_names())
    for name, section in params["heads"].items():
        _, kwargs = split_head_params(section)
        assert set(kwargs) <= head_arguments(name), (
            f"heads.{name}: unknown {set(kwargs) - head_arguments(name)}"
        )
        build_head(name, in_dim=D, num_classes=C, **kwargs)
