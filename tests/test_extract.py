"""Tests for pipeline/extract.py: batching across videos, entry shapes and layouts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import StreamFeaturesConfig
from pipeline.extract import (
    arrange,
    forward_batched,
    layout,
    params_identity,
)


class _Recorder(nn.Module):
    """Doubles its input and records every batch size it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        return x * 2


@pytest.mark.parametrize("lengths", [[25, 25, 25], [3], [7, 64, 1, 30], [64, 64]])
def test_forward_batched_packs_videos_into_equal_batches_in_order(lengths: list[int]) -> None:
    model = _Recorder()
    inputs = [(f"v{i}", torch.full((n, 3), float(i))) for i, n in enumerate(lengths)]
    out = list(forward_batched(model, inputs, batch_size=16))
    assert [v for v, _ in out] == [v for v, _ in inputs]
    for (_, x), (_, y) in zip(inputs, out, strict=True):
        torch.testing.assert_close(y, x * 2)
    # every batch the model sees has exactly batch_size rows (the last is zero-padded)
    assert set(model.sizes) == {16}
    assert len(model.sizes) == -(-sum(lengths) // 16)


def test_forward_batched_results_do_not_depend_on_the_other_videos() -> None:
    """What makes sharded and resumed runs byte-equal: a video's features come out the same
    whichever videos share its batches."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    conv.eval()
    videos = {f"v{i}": torch.randn(5 + i, 3, 16, 16) for i in range(6)}
    with torch.inference_mode():
        together = dict(forward_batched(conv, videos.items(), batch_size=8))
        for name in ("v1", "v4"):
            alone = dict(forward_batched(conv, [(name, videos[name])], batch_size=8))
            assert torch.equal(alone[name], together[name])


def _cfg(**kw: object) -> StreamFeaturesConfig:
    return dataclasses.replace(StreamFeaturesConfig(backbone="resnet18"), **kw)


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        ({}, "(T, D)"),
        ({"crops": "ten_mean"}, "(T, D)"),
        ({"crops": "ten_axis"}, "(V, T, D)"),
        ({"output": "maps"}, "(T, C, H, W)"),
        ({"output": "maps", "crops": "ten_axis"}, "(V, T, C, H, W)"),
        ({"sampling": "clips"}, "(V, T, D)"),  # MRRN: per-frame features of each clip
        ({"backbone": "r3d_18", "sampling": "clips"}, "(T, D)"),  # one feature per 3D clip
        ({"backbone": "r3d_18", "sampling": "clips", "crops": "ten_axis"}, "(V, T, D)"),
    ],
)
def test_layout(kw: dict, want: str) -> None:
    assert layout(_cfg(**kw)) == want


def test_arrange_shapes_and_ten_crop_mean() -> None:
    out = torch.arange(10 * 4 * 3, dtype=torch.float32).reshape(40, 3)  # V=10 crops, n=4 frames
    axis = arrange(out, n=4, cfg=_cfg(crops="ten_axis"))
    mean = arrange(out, n=4, cfg=_cfg(crops="ten_mean"))
    assert axis.shape == (10, 4, 3) and mean.shape == (4, 3) and mean.dtype == np.float16
    # eq. (5): x_t = 1/K_c sum_k A(k, t, :)
    np.testing.assert_allclose(mean, axis.astype(np.float32).mean(0), rtol=1e-3)
    assert axis[3, 2, 1] == out[3 * 4 + 2, 1]
    centre = arrange(out[:4], n=4, cfg=_cfg())
    assert centre.shape == (4, 3)


def test_arrange_splits_2d_clips_into_views() -> None:
    cfg = _cfg(sampling="clips", clip_len=5)
    out = torch.arange(3 * 5 * 2, dtype=torch.float32).reshape(15, 2)  # K=3 clips of s=5
    got = arrange(out, n=15, cfg=cfg)
    assert got.shape == (3, 5, 2)
    np.testing.assert_array_equal(got[1, 0], out[5].numpy())
    maps = arrange(torch.zeros(8, 4, 2, 2), n=8, cfg=_cfg(output="maps"))
    assert maps.shape == (8, 4, 2, 2)


def test_params_identity_leaves_out_what_does_not_apply() -> None:
    base = params_identity(_cfg())
    assert "taps" not in base and "clip_len" not in base
    assert params_identity(_cfg(batch_size=3, threads=1, device="cpu")) == base
    assert params_identity(_cfg(clip_len=99)) == base  # only read with sampling: clips
    assert params_identity(_cfg(output="taps"))["taps"] == ["layer2", "layer3", "layer4"]
    assert params_identity(_cfg(sampling="clips", max_clips=20))["max_clips"] == 20


def test_forward_batched_with_a_3d_model_and_with_maps() -> None:
    """Clips (n, 3, s, H, W) and conv maps (n, C, h, w) come back per video, equal to the video
    run alone in a batch of the same size."""
    from pipeline.backbones import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("r3d_18", weights="none")
    videos = [(f"v{i}", torch.randn(k, 3, 8, 32, 32)) for i, k in enumerate([3, 1, 2])]
    maps = build_backbone("resnet18", weights="none", output="maps")
    frames = [(f"f{i}", torch.randn(t, 3, 64, 64)) for i, t in enumerate([2, 3])]
    with torch.inference_mode():
        got = list(forward_batched(bb.model, iter(videos), batch_size=2))
        got_maps = list(forward_batched(maps.model, iter(frames), batch_size=4))
        alone = {v: dict(forward_batched(bb.model, [(v, x)], batch_size=2))[v] for v, x in videos}
        alone |= {
            v: dict(forward_batched(maps.model, [(v, x)], batch_size=4))[v] for v, x in frames
        }
    assert [v for v, _ in got] == ["v0", "v1", "v2"]
    assert [f.shape for _, f in got] == [(3, 512), (1, 512), (2, 512)]
    assert [f.shape for _, f in got_maps] == [(2, 512, 2, 2), (3, 512, 2, 2)]
    for v, f in got + got_maps:
        assert torch.equal(f, alone[v])
