"""Tests for pipeline/backbones.py: offline weights, cross-modality init, input preparation."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline.backbones import (
    BACKBONES_2D,
    IMAGENET_STD,
    WeightsError,
    build_backbone,
    centre_crop,
    extract_batched,
    flow_input,
    inference_context,
    resolve_device,
    resolve_precision,
    rgb_input,
)
from pipeline.video import read_frames

DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
DIMS["efficientnet_lite0"] = 1280
IMAGENET_BOW = 456  # ImageNet class index of 'bow' (the archery clip)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 state dict with random (seeded) weights, as a user-supplied weights file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_registry_names() -> None:
    assert set(BACKBONES_2D) == set(DIMS)


@pytest.mark.parametrize("name", BACKBONES_2D)
def test_every_backbone_maps_images_to_features(name: str) -> None:
    bb = build_backbone(name, weights="none")
    assert bb.dim == DIMS[name]
    assert bb.weights_id.startswith("random")
    assert bb.in_channels == 3
    assert not bb.model.training
    assert not any(p.requires_grad for p in bb.model.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = bb.model(x)
    assert y.shape == (2, DIMS[name])
    assert torch.isfinite(y).all()
    # Different images, different features. Relative: a randomly initialised EfficientNet-Lite0
    # in eval mode has features of ~1e-8 (its activations shrink through the depth).
    assert (y[0] - y[1]).abs().max() > 1e-3 * y.abs().max() > 0


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16", weights="none")


# -- weights files and cross-modality initialisation -----------------------------------------


def test_weights_file_is_loaded_and_identified(resnet18_file: Path) -> None:
    bb = build_backbone("resnet18", weights=str(resnet18_file))
    state = torch.load(resnet18_file, weights_only=True)
    torch.testing.assert_close(bb.model.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(bb.model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    sha = hashlib.sha256(resnet18_file.read_bytes()).hexdigest()
    assert sha[:16] in bb.weights_id
    assert resnet18_file.name in bb.weights_id


def test_cross_modality_init_averages_rgb_and_replicates(resnet18_file: Path) -> None:
    rgb = build_backbone("resnet18", weights=str(resnet18_file), in_channels=3)
    flow = build_backbone("resnet18", weights=str(resnet18_file), in_channels=10)
    w3 = rgb.model.conv1.weight
    w10 = flow.model.conv1.weight
    assert w10.shape == (64, 10, 7, 7)
    expected = w3.mean(dim=1, keepdim=True).repeat(1, 10, 1, 1)
    torch.testing.assert_close(w10, expected)
    assert flow.model.conv1.in_channels == 10
    assert not w10.requires_grad
    # Every other layer is the RGB network's.
    torch.testing.assert_close(flow.model.layer1[0].conv1.weight, rgb.model.layer1[0].conv1.weight)
    assert flow.weights_id == rgb.weights_id
    # Flow normalisation: centred at 0.5 with the mean ImageNet std, one value per channel.
    assert flow.mean == (0.5,) * 10
    assert flow.std == pytest.approx((float(np.mean(IMAGENET_STD)),) * 10)
    with torch.no_grad():
        assert flow.model(torch.randn(2, 10, 32, 32)).shape == (2, 512)


def test_cross_modality_init_on_efficientnet() -> None:
    rgb = build_backbone("efficientnet_lite0", weights="imagenet")
    flow = build_backbone("efficientnet_lite0", weights="imagenet", in_channels=10)
    w3 = rgb.model.net._conv_stem.weight
    torch.testing.assert_close(
        flow.model.net._conv_stem.weight, w3.mean(dim=1, keepdim=True).repeat(1, 10, 1, 1)
    )
    with torch.no_grad():
        assert flow.model(torch.randn(1, 10, 32, 32)).shape == (1, 1280)


def test_weights_of_another_architecture_raise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    r50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), r50)
    with pytest.raises(WeightsError, match="does not fit resnet18") as e:
        build_backbone("resnet18", weights=str(r50))
    assert str(e.value).startswith(str(r50))
    # Same shapes but extra blocks: caught by the unexpected-keys check, not by load_state_dict.
    r34 = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), r34)
    with pytest.raises(WeightsError, match="unexpected") as e:
        build_backbone("resnet18", weights=str(r34))
    assert str(e.value).startswith(str(r34))


def test_missing_or_broken_weights_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "none.pth"
    with pytest.raises(WeightsError, match="not found") as e:
        build_backbone("resnet18", weights=str(missing))
    assert str(e.value).startswith(str(missing))
    broken = tmp_path / "broken.pth"
    broken.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a loadable state dict") as e:
        build_backbone("resnet18", weights=str(broken))
    assert str(e.value).startswith(str(broken))


def test_imagenet_without_a_local_file_warns_and_is_random(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pipeline.backbones"):
        bb = build_backbone("resnet18", weights="imagenet")
    assert bb.weights_id.startswith("random")
    assert "RANDOM weights" in caplog.text
    assert str(tmp_path) in caplog.text  # says where it looked


# -- real ImageNet weights (EfficientNet-Lite0 ships offline) ---------------------------------


def test_efficientnet_lite0_imagenet_weights_are_real(videos: Path) -> None:
    bb = build_backbone("efficientnet_lite0", weights="imagenet")
    assert "imagenet sha256:" in bb.weights_id
    assert not bb.model.training
    assert not any(p.requires_grad for p in bb.model.parameters())
    archery = read_frames(videos / "example.avi", np.array([0]), short_side=224)
    make_up = read_frames(videos / "test.avi", np.array([0]), short_side=224)
    x = rgb_input(np.concatenate([archery, make_up]), crop=224, mean=bb.mean, std=bb.std)
    with torch.no_grad():
        feats = bb.model(x)
        logits = bb.model.net(x[:1])
    assert feats.shape == (2, 1280)
    cos = torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0)
    assert cos < 0.95  # two different scenes, two different feature vectors
    # Trained weights recognise the bow of the archery clip; random ones would not.
    assert logits.argmax().item() == IMAGENET_BOW


# -- input preparation ------------------------------------------------------------------------


def test_centre_crop_takes_the_centre() -> None:
    x = np.arange(6 * 10).reshape(6, 10)
    c = centre_crop(x, 4)
    assert c.shape == (4, 4)
    assert c[0, 0] == x[1, 3]  # top = (6 - 4) // 2, left = (10 - 4) // 2
    with pytest.raises(ValueError, match="smaller than the crop"):
        centre_crop(x, 7)


def test_rgb_input_shape_crop_and_normalisation() -> None:
    frames = np.zeros((3, 40, 60, 3), dtype=np.uint8)
    frames[:, 4:36, 14:46] = (255, 0, 0)  # the centre 32x32 is pure red
    x = rgb_input(frames, crop=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], torch.ones(3, 32, 32))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(x[:, 1], -torch.ones(3, 32, 32))  # (0 - 0.25) / 0.25
    torch.testing.assert_close(x[:, 2], torch.zeros(3, 32, 32))


def test_flow_input_shape_and_channel_order() -> None:
    t, ell, h, w = 2, 5, 40, 50
    stacks = np.zeros((t, ell, 2, h, w), dtype=np.uint8)
    for j in range(ell):
        stacks[:, j, 0] = 10 * j  # x of pair j
        stacks[:, j, 1] = 10 * j + 5  # y of pair j
    x = flow_input(stacks, crop=32, mean=(0.0,) * 10, std=(1.0,) * 10)
    assert x.shape == (t, 2 * ell, 32, 32)
    # Channels are x0, y0, x1, y1, ...
    np.testing.assert_allclose(x[0, :, 0, 0].numpy() * 255, [0, 5, 10, 15, 20, 25, 30, 35, 40, 45])


def test_flow_input_of_zero_flow_is_about_zero(resnet18_file: Path) -> None:
    flow = build_backbone("resnet18", weights=str(resnet18_file), in_channels=10)
    stacks = np.full((2, 5, 2, 40, 40), 128, dtype=np.uint8)  # quantised zero flow
    x = flow_input(stacks, crop=32, mean=flow.mean, std=flow.std)
    assert x.shape == (2, 10, 32, 32)
    assert x.abs().max() < 0.01


def test_imagenet_enum_file_in_the_local_torch_cache_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resnet18_file: Path
) -> None:
    """The real loading path for torchvision weights: the DEFAULT enum's file, found offline in
    $TORCH_HOME/hub/checkpoints under the name torchvision would download it to."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = torchvision.models.get_model_weights("resnet18").DEFAULT
    target = tmp_path / "hub" / "checkpoints" / Path(enum.url).name
    target.parent.mkdir(parents=True)
    target.write_bytes(resnet18_file.read_bytes())
    bb = build_backbone("resnet18", weights="imagenet")
    assert (
        str(enum) in bb.weights_id
        and hashlib.sha256(target.read_bytes()).hexdigest()[:16] in bb.weights_id
    )
    expected = torch.load(resnet18_file, weights_only=True)["conv1.weight"]
    torch.testing.assert_close(bb.model.conv1.weight, expected)


def test_extract_batched_packs_videos_and_keeps_each_ones_rows(resnet18_file: Path) -> None:
    bb = build_backbone("resnet18", weights=str(resnet18_file))
    videos = [(f"v{i}", torch.randn(t, 3, 32, 32)) for i, t in enumerate([5, 1, 7, 3, 9])]
    calls = []
    model = bb.model

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return model(x)

    with torch.inference_mode():
        got = list(extract_batched(counting, iter(videos), batch_size=8))
        alone = {v: model(x) for v, x in videos}
    assert [v for v, _ in got] == [v for v, _ in videos]
    for v, f in got:
        torch.testing.assert_close(f, alone[v], rtol=1e-4, atol=1e-4)
    assert (
        max(calls) <= 8 and len(calls) < len(videos) + 2
    )  # frames of several videos share a batch


def test_precision_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_bf16_features_match_fp32_on_real_frames(videos: Path) -> None:
    """bf16 autocast + channels_last changes the numbers only slightly (cosine >= 0.99)."""
    bb = build_backbone("efficientnet_lite0", weights="imagenet")
    frames = read_frames(videos / "example.avi", np.array([5, 40, 80]), short_side=128)
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
