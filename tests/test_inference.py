"""Tests for pipeline/inference.py: precision and device choice, channels-last, and batch norms
folded into convolutions (the same features, checked on every backbone)."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_rel, random_clips, slow_cases
from torch import nn

from pipeline.backbones import BACKBONES, build_backbone, is_3d
from pipeline.inference import (
    Compiled,
    fold_batchnorm,
    inference_context,
    inference_model,
    memory_format,
    resolve_device,
    resolve_precision,
)
from pipeline.inputs import rgb_input
from pipeline.video import Decoding, read_frames

# Tiny tensors: one intra-op thread is faster than two contending for a small shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm trained-looking statistics: a fresh one (mean 0, var 1, weight 1,
    bias 0) is almost the identity, so a wrong fold could pass unseen."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BN):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def _n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, _BN) for m in model.modules())


# -- batch norm folding -----------------------------------------------------------------------


# slow: 1.2-3 s each (measured on 2 shared cores); the other backbones take under 0.6 s
@pytest.mark.parametrize("name", slow_cases(BACKBONES, {"mc3_18", "r2plus1d_18", "r3d_18"}))
def test_folding_removes_every_batch_norm_and_keeps_the_features(name: str) -> None:
    """Every backbone, subclassed convolutions included (torchvision's Conv3DSimple,
    EfficientNet's same-padding Conv2d), loses all its batch norms and computes the same."""
    bb = build_backbone(name, weights="none")
    _random_statistics(bb.model)
    x = (
        random_clips(2, size=64)
        if is_3d(name)
        else torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    )
    before = _n_bn(bb.model)
    fast = inference_model(bb.model, kind=bb.kind, in_channels=3, device=torch.device("cpu"))
    assert before > 0 and _n_bn(fast) == 0
    assert _n_bn(bb.model) == before  # the original is left as it was
    with torch.inference_mode():
        want = bb.model(x)
        got = fast(x.contiguous(memory_format=memory_format(bb.kind)))
    assert_close_rel(got, want)


def test_folding_taps_and_maps_keeps_them() -> None:
    for output, ch in (("taps", 10), ("maps", 3)):
        bb = build_backbone("resnet34", weights="none", output=output, in_channels=ch)
        _random_statistics(bb.model)
        x = torch.randn(2, ch, 64, 64, generator=torch.Generator().manual_seed(2))
        fast = inference_model(bb.model, kind="2d", in_channels=ch, device=torch.device("cpu"))
        assert _n_bn(fast) == 0
        with torch.inference_mode():
            assert_close_rel(fast(x), bb.model(x))


class _Branches(nn.Module):
    """A convolution read by its batch norm and by something else: folding would change the
    other reader, so the pair must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_convolution_with_two_readers_is_not_folded(caplog: pytest.LogCaptureFixture) -> None:
    model = _random_statistics(_Branches()).eval()
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="pipeline.inference"):
        fast = fold_batchnorm(model, x)
    assert _n_bn(fast) == 1
    assert not caplog.text  # skipped by the graph check, not caught by the output check
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x))


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation: the output is not linear in the weight, so a fold is wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # fx cannot trace a branch on a value


def test_unsafe_folds_fall_back_to_the_model_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x = torch.randn(2, 3, 16, 16)
    standardised = _random_statistics(
        nn.Sequential(_StandardisedConv(3, 4, 3), nn.BatchNorm2d(4))
    ).eval()
    untraceable = _random_statistics(_DataDependent()).eval()
    with caplog.at_level(logging.WARNING, logger="pipeline.inference"):
        assert fold_batchnorm(standardised, x) is standardised
        assert fold_batchnorm(untraceable, x) is untraceable
    assert "folded output differs" in caplog.text and "fx cannot trace" in caplog.text


def test_folding_is_deterministic() -> None:
    """Two builds fold to the same bits: ranks and resumed runs write the same features."""
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for _ in range(2):
        bb = build_backbone("resnet18", weights="none")
        fast = inference_model(bb.model, kind="2d", in_channels=3, device=torch.device("cpu"))
        with torch.inference_mode():
            outs.append(fast(x))
    assert torch.equal(outs[0], outs[1])


# -- precision, device and memory format ------------------------------------------------------


def test_precision_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        resolve_precision("fp16", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_bf16_features_match_fp32_on_real_frames(videos: Path) -> None:
    """bf16 autocast + channels_last changes the numbers only slightly (cosine >= 0.99)."""
    bb = build_backbone("efficientnet_lite0", weights="imagenet")
    frames = read_frames(
        videos / "example.avi", np.array([5, 40, 80]), decoding=Decoding(short_side=128)
    )
    x = rgb_input(frames, crop=112, mean=bb.mean, std=bb.std)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        ref = bb.model(x)
        model = bb.model.to(memory_format=torch.channels_last)
        with inference_context(cpu, "bf16"):
            low = model(x.contiguous(memory_format=torch.channels_last)).float()
    cos = torch.nn.functional.cosine_similarity(ref, low, dim=1)
    assert (cos >= 0.99).all(), cos
    assert not torch.equal(ref, low)  # bf16 really ran


# -- batching and memory format with 3D models and maps ---------------------------------------


@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18", "s3d"])
def test_3d_models_run_channels_last_3d_with_the_same_features(name: str) -> None:
    assert memory_format("2d") == torch.channels_last
    assert memory_format("3d") == torch.channels_last_3d
    with pytest.raises(ValueError, match="kind must be '2d' or '3d'"):
        memory_format("4d")
    bb = build_backbone(name, weights="none")
    fmt = memory_format(bb.kind)
    x = random_clips(2)
    fast = copy.deepcopy(bb.model).to(memory_format=fmt)
    xc = x.contiguous(memory_format=fmt)
    assert xc.is_contiguous(memory_format=torch.channels_last_3d) and not xc.is_contiguous()
    with torch.inference_mode():
        ref = bb.model(x)
        got = fast(xc)
    assert_close_rel(got, ref)


# -- torch.compile (features.compile) ---------------------------------------------------------


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()


@pytest.mark.slow  # torch.compile: ~2.5 s
def test_the_compiled_model_gives_the_eager_outputs(one_thread: None) -> None:
    net = _small_net()
    x = torch.randn(4, 3, 16, 16)
    c = Compiled(net)
    with torch.inference_mode():
        first, second = c(x), c(x + 1)
        assert c.fast is not None  # compiled, checked, kept
        torch.testing.assert_close(first, net(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(second, net(x + 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("fast", "why"),
    [
        (lambda x: (_ for _ in ()).throw(RuntimeError("no C++ compiler")), "no C\\+\\+ compiler"),
        (lambda x: torch.zeros(len(x), 8), "differ by 1.0e\\+00 of their norm"),
        (lambda x: torch.full((len(x), 8), float("nan")), "differ by nan"),
    ],
)
def test_a_compile_that_fails_or_disagrees_leaves_the_eager_model(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fast,
    why: str,  # noqa: ANN001
) -> None:
    monkeypatch.setattr(torch, "compile", lambda model, **kw: fast)
    net, x = _small_net(), torch.randn(2, 3, 16, 16)
    c = Compiled(net)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        assert torch.equal(c(x), net(x))
        assert c.fast is None and torch.equal(c(x + 1), net(x + 1))
    assert re.search(f"running eagerly, .*{why}", caplog.text)
