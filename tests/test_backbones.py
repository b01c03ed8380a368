"""Tests for pipeline/backbones.py: offline weights, cross-modality init, 2D taps/maps, 3D clip
models, crops and input preparation."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from pathlib import Path

import hub_server
import numpy as np
import pytest
import torch
import torchvision
from conftest import assert_close_rel, random_clips, slow_cases

from pipeline import backbones
from pipeline.backbones import (
    BACKBONES,
    BACKBONES_2D,
    BACKBONES_3D,
    IMAGENET_STD,
    KINETICS_MEAN,
    KINETICS_STD,
    WeightsError,
    build_backbone,
    is_3d,
)
from pipeline.inputs import (
    flow_input,
    rgb_input,
)
from pipeline.video import Decoding, read_frames

# Tiny tensors: one intra-op thread is faster than two contending for a small shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")

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


def test_backbones_and_raft_resolve_a_weights_setting_through_one_function(tmp_path: Path) -> None:
    """The same file gets the same identity and the same errors, whoever names it."""
    from pipeline.config import FlowConfig, RaftConfig
    from pipeline.flow import raft_weights

    def raft(weights: str) -> FlowConfig:
        return FlowConfig(algorithm="raft_small", raft=RaftConfig(weights=weights, device="cpu"))

    f = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(1)}, f)
    sha = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    want = (f, f"file w.pth sha256:{sha}")
    assert raft_weights(raft(str(f))) == want
    assert backbones._resolve_weights("resnet18", str(f)) == want
    assert raft_weights(raft("none")) == (None, "random (seed 0)")
    assert backbones._resolve_weights("resnet18", "none") == (None, "random (seed 0)")
    gone = str(tmp_path / "gone.pth")
    with pytest.raises(WeightsError, match=r"weights file not found \(flow.raft.weights: default,"):
        raft_weights(raft(gone))
    with pytest.raises(WeightsError, match=r"weights file not found \(weights: imagenet,"):
        backbones._resolve_weights("resnet18", gone)


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


# -- torchvision's weights file: hub cache, download, or a clear stop ---------------------------
# No test reaches the internet: the enum's URL is pointed at 127.0.0.1 (tests/hub_server.py).


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache under a fresh TORCH_HOME -> its checkpoints folder (not created)."""
    return hub_server.empty_hub(monkeypatch, tmp_path / "torch")


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the torchvision networks built during the test."""
    calls: list[str] = []
    get_model = torchvision.models.get_model

    def spy(name: str, **kwargs: object) -> torch.nn.Module:
        calls.append(name)
        return get_model(name, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", spy)
    return calls


@pytest.mark.parametrize("name", ["resnet18", "s3d"])
def test_imagenet_without_the_file_or_network_stops_naming_file_url_and_folder(
    name: str, hub: Path, built: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    enum = torchvision.models.get_model_weights(name).DEFAULT
    with hub_server.refusing() as base:
        url = f"{base}/{hub_server.file_name(enum)}"
        hub_server.point_at(monkeypatch, enum, url)
        start = time.perf_counter()
        with pytest.raises(WeightsError) as e:
            build_backbone(name, weights="imagenet")
        took = time.perf_counter() - start
    message = str(e.value)
    assert message.startswith(str(hub / hub_server.file_name(enum)))  # file name and folder
    assert url in message and f"in {hub}/" in message and "'weights: imagenet'" in message
    assert "\n" not in message  # one line
    assert built == []  # stopped before building anything: no random network exists
    assert list(hub.iterdir()) == []  # no partial file left under the real name
    assert took < 5, took  # the offline failure is quick (here: a refused connection)


def test_a_stalled_download_is_cut_off_by_the_socket_timeout(
    hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enum = torchvision.models.get_model_weights("resnet18").DEFAULT
    monkeypatch.setattr(backbones, "DOWNLOAD_TIMEOUT_S", 0.5)
    with hub_server.silent() as base:
        hub_server.point_at(monkeypatch, enum, f"{base}/{hub_server.file_name(enum)}")
        start = time.perf_counter()
        with pytest.raises(WeightsError, match="timed out"):
            build_backbone("resnet18", weights="imagenet")
    assert time.perf_counter() - start < 5  # urllib alone would wait on the silent server forever
    assert socket.getdefaulttimeout() is None  # the process-wide timeout is restored


def test_imagenet_file_is_downloaded_into_the_hub_cache_and_loaded(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's downloader fetches the file under the URL's name, checks the hash prefix in that
    name, and the backbone gets exactly its weights."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    served = tmp_path / "served"
    served.mkdir()
    staged = served / "staged.pth"
    torch.save(state, staged)
    sha = hashlib.sha256(staged.read_bytes()).hexdigest()
    name = f"resnet18-{sha[:8]}.pth"  # torchvision's naming: <model>-<sha256 prefix>.pth
    staged.rename(served / name)
    enum = torchvision.models.get_model_weights("resnet18").DEFAULT
    with hub_server.serving(served) as base:
        hub_server.point_at(monkeypatch, enum, f"{base}/{name}")
        bb = build_backbone("resnet18", weights="imagenet")
    assert (hub / name).read_bytes() == (served / name).read_bytes()
    assert bb.weights_id == f"ResNet18_Weights.IMAGENET1K_V1 sha256:{sha[:16]}"
    _assert_weights_equal(bb.model, state)


def test_a_download_whose_hash_does_not_match_its_name_stops_and_leaves_nothing(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enum = torchvision.models.get_model_weights("resnet18").DEFAULT
    served = tmp_path / "served"
    served.mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), served / hub_server.file_name(enum))
    with hub_server.serving(served) as base:
        hub_server.point_at(monkeypatch, enum, f"{base}/{hub_server.file_name(enum)}")
        with pytest.raises(WeightsError, match="invalid hash value"):
            build_backbone("resnet18", weights="imagenet")
    assert list(hub.iterdir()) == []


def test_imagenet_file_prepared_in_the_hub_cache_is_loaded_as_it_is(
    hub: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file put under torchvision's name by hand is used without a hash check, as
    ``enum.get_state_dict()`` would use it (torch checks the hash prefix only while downloading),
    so an offline machine can be given the file; a warning says that its hash does not match the
    name, and the cache identity records the file's own sha256."""
    enum = torchvision.models.get_model_weights("resnet18").DEFAULT
    target = hub / hub_server.file_name(enum)
    target.parent.mkdir(parents=True)
    torch.manual_seed(4)
    state = torchvision.models.resnet18().state_dict()  # random init, not ImageNet's
    torch.save(state, target)
    with caplog.at_level(logging.WARNING, logger="pipeline.backbones"):
        bb = build_backbone("resnet18", weights="imagenet")
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    assert bb.weights_id == f"ResNet18_Weights.IMAGENET1K_V1 sha256:{sha[:16]}"
    _assert_weights_equal(bb.model, state)
    assert "does not start with f37072fd" in caplog.text and str(target) in caplog.text


def _assert_weights_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``model`` equals the same-named one of ``state`` (the classifier, which a
    feature extractor drops, aside)."""
    got = model.state_dict()
    assert set(got) == {k for k in state if not k.startswith("fc.")}
    for key, value in got.items():
        assert torch.equal(value, state[key]), key


# -- real ImageNet weights (EfficientNet-Lite0 ships offline) ---------------------------------


def test_efficientnet_lite0_imagenet_weights_are_real(videos: Path) -> None:
    bb = build_backbone("efficientnet_lite0", weights="imagenet")
    assert "imagenet sha256:" in bb.weights_id
    assert not bb.model.training
    assert not any(p.requires_grad for p in bb.model.parameters())
    archery = read_frames(videos / "example.avi", np.array([0]), decoding=Decoding(short_side=224))
    make_up = read_frames(videos / "test.avi", np.array([0]), decoding=Decoding(short_side=224))
    x = rgb_input(np.concatenate([archery, make_up]), crop=224, mean=bb.mean, std=bb.std)
    with torch.no_grad():
        feats = bb.model(x)
        logits = bb.model.net(x[:1])
    assert feats.shape == (2, 1280)
    cos = torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0)
    assert cos < 0.95  # two different scenes, two different feature vectors
    # Trained weights recognise the bow of the archery clip; random ones would not.
    assert logits.argmax().item() == IMAGENET_BOW


# -- flow input and the local torchvision weights file ---------------------------------------


def test_flow_input_of_zero_flow_is_about_zero(resnet18_file: Path) -> None:
    flow = build_backbone("resnet18", weights=str(resnet18_file), in_channels=10)
    stacks = np.full((2, 5, 2, 40, 40), 128, dtype=np.uint8)  # quantised zero flow
    x = flow_input(stacks, crop=32, mean=flow.mean, std=flow.std)
    assert x.shape == (2, 10, 32, 32)
    assert x.abs().max() < 0.01


# -- 3D clip backbones ------------------------------------------------------------------------

DIMS_3D = {"r3d_18": 512, "mc3_18": 512, "r2plus1d_18": 512, "s3d": 1024}
# The first convolution of each 3D model, where the RGB (or flow) clip enters.
STEM_3D = {
    "r3d_18": "stem.0",
    "mc3_18": "stem.0",
    "r2plus1d_18": "stem.0",
    "s3d": "features.0.0.0",
}


def _classifier(net: torch.nn.Module) -> torch.nn.Module:
    """A torchvision video model's last layer."""
    if isinstance(net, torchvision.models.video.S3D):
        return net.classifier[1]  # Conv3d(1024, 400, 1): a linear map on the channels
    return net.fc


def test_registry_of_all_backbones() -> None:
    assert set(BACKBONES_3D) == set(DIMS_3D)
    assert BACKBONES == (*BACKBONES_2D, *BACKBONES_3D)
    assert [n for n in BACKBONES if is_3d(n)] == list(BACKBONES_3D)


@pytest.mark.parametrize("name", BACKBONES_3D)
def test_every_3d_backbone_maps_clips_to_features(name: str) -> None:
    bb = build_backbone(name, weights="none")
    assert (bb.kind, bb.output, bb.levels, bb.dim) == ("3d", "pooled", None, DIMS_3D[name])
    assert bb.layer == ("features avgpool" if name == "s3d" else "avgpool")
    assert bb.weights_id.startswith("random")
    # Kinetics-400 statistics, whatever the weights (the enum's preset, read offline).
    assert bb.mean == pytest.approx(KINETICS_MEAN) and bb.std == pytest.approx(KINETICS_STD)
    assert not bb.model.training
    assert not any(p.requires_grad for p in bb.model.parameters())
    with torch.no_grad():
        y = bb.model(random_clips(2))
    assert y.shape == (2, DIMS_3D[name])
    assert torch.isfinite(y).all()
    assert (y[0] - y[1]).abs().max() > 1e-3 * y.abs().max() > 0


# slow: 1.4-1.8 s each (measured on 2 shared cores); mc3_18 and s3d take under 1 s
@pytest.mark.parametrize("name", slow_cases(BACKBONES_3D, {"r2plus1d_18", "r3d_18"}))
def test_3d_weights_file_gives_the_features_its_classifier_reads(name: str, tmp_path: Path) -> None:
    """A saved torchvision model loads by path; its features are exactly the input of that
    model's own classifier (so logits recomputed from them equal the model's logits)."""
    torch.manual_seed(1)
    net = torchvision.models.get_model(name).eval()
    # No bias: S3D's random features are so small (~1e-6) that bias + W f would round to the bias.
    torch.nn.init.zeros_(_classifier(net).bias)
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    bb = build_backbone(name, weights=str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.weights_id == f"file {path.name} sha256:{sha[:16]}"
    if name == "s3d":
        # torchvision's S3D pools with a fixed (2, 7, 7) window, sized for 16 x 224 x 224 input,
        # where it is the global mean; without it its logits are the classifier's outputs
        # averaged over every position, which is the classifier of the global mean (linear).
        net.avgpool = torch.nn.Identity()
    x = random_clips(2, size=64)  # S3D: 2 x 2 x 2 feature positions, so the mean is over several
    w = _classifier(net).weight.flatten(1)  # (400, D)
    with torch.no_grad():
        assert_close_rel(bb.model(x) @ w.T, net(x))


def test_3d_weights_of_another_architecture_raise(tmp_path: Path, resnet18_file: Path) -> None:
    torch.manual_seed(0)
    mc3 = tmp_path / "mc3.pth"  # the same keys as r3d_18, but (1, 3, 3) kernels in layer2-4
    torch.save(torchvision.models.get_model("mc3_18").state_dict(), mc3)
    with pytest.raises(WeightsError, match="does not fit r3d_18") as e:
        build_backbone("r3d_18", weights=str(mc3))
    assert str(e.value).startswith(str(mc3))
    # A 2D ResNet's keys (conv1, ...) are not a video ResNet's (stem.0, ...).
    with pytest.raises(WeightsError, match="does not fit r3d_18") as e:
        build_backbone("r3d_18", weights=str(resnet18_file))
    assert str(e.value).startswith(str(resnet18_file))


def test_3d_imagenet_means_the_kinetics_enum_file_in_the_local_cache(hub: Path) -> None:
    enum = torchvision.models.get_model_weights("s3d").DEFAULT
    target = hub / hub_server.file_name(enum)
    target.parent.mkdir(parents=True)
    torch.manual_seed(2)
    state = torchvision.models.get_model("s3d").state_dict()
    torch.save(state, target)
    bb = build_backbone("s3d", weights="imagenet")
    sha = hashlib.sha256(target.read_bytes()).hexdigest()[:16]
    assert bb.weights_id == f"S3D_Weights.KINETICS400_V1 sha256:{sha}"
    torch.testing.assert_close(bb.model.features[0][0][0].weight, state["features.0.0.0.weight"])


@pytest.mark.parametrize("name", BACKBONES_3D)
def test_3d_cross_modality_init_averages_rgb_and_replicates(name: str) -> None:
    rgb = build_backbone(name, weights="none")
    flow = build_backbone(name, weights="none", in_channels=2)  # x, y per time step
    w3 = rgb.model.get_submodule(STEM_3D[name]).weight  # (out, 3, kt, kh, kw)
    conv = flow.model.get_submodule(STEM_3D[name])
    assert conv.weight.shape == (w3.shape[0], 2, *w3.shape[2:]) and conv.in_channels == 2
    mean = (w3[:, 0] + w3[:, 1] + w3[:, 2]) / 3
    torch.testing.assert_close(conv.weight[:, 0], mean)
    torch.testing.assert_close(conv.weight[:, 1], mean)
    assert not conv.weight.requires_grad
    # Everything after the stem is the RGB network's.
    rest = {k: v for k, v in rgb.model.state_dict().items() if not k.startswith(STEM_3D[name])}
    flow_state = flow.model.state_dict()
    assert all(torch.equal(v, flow_state[k]) for k, v in rest.items())
    assert flow.mean == (0.5, 0.5)
    assert flow.std == pytest.approx((float(np.mean(IMAGENET_STD)),) * 2)
    with torch.no_grad():
        assert flow.model(random_clips(1, c=2)).shape == (1, DIMS_3D[name])


# -- 2D taps (MRRN) and maps (TSRNN) ----------------------------------------------------------


def test_resnet34_taps_are_the_spatial_means_of_each_block() -> None:
    bb = build_backbone("resnet34", weights="none", output="taps")
    assert (bb.kind, bb.output, bb.levels, bb.dim) == ("2d", "taps", (128, 256, 512), 896)
    assert bb.layer == "layer2,layer3,layer4 avgpool"
    # Independently: torchvision's resnet34 with the same weights, run block by block.
    ref = torchvision.models.resnet34().eval()
    missing, unexpected = ref.load_state_dict(bb.model.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = bb.model(x)
        a = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        a1 = ref.layer1(a)
        a2 = ref.layer2(a1)
        a3 = ref.layer3(a2)
        a4 = ref.layer4(a3)
    assert feats.shape == (2, 896)
    torch.testing.assert_close(feats[:, :128], a2.mean(dim=(2, 3)))
    torch.testing.assert_close(feats[:, 128:384], a3.mean(dim=(2, 3)))
    torch.testing.assert_close(feats[:, 384:], a4.mean(dim=(2, 3)))


def test_taps_run_one_pass_up_to_the_deepest_tap_in_the_given_order() -> None:
    bb = build_backbone("resnet50", weights="none", output="taps", taps=("layer2", "layer1"))
    assert bb.levels == (512, 256) and bb.dim == 768
    assert bb.layer == "layer2,layer1 avgpool"
    # Nothing after the deepest tap is kept (or run): no layer3, layer4, fc.
    assert not any(k.startswith(("layer3", "layer4", "fc")) for k in bb.model.state_dict())
    stem_calls = []
    bb.model.conv1.register_forward_hook(lambda *_: stem_calls.append(1))
    ref = torchvision.models.resnet50().eval()
    ref.load_state_dict(bb.model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = bb.model(x)
        a1 = ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))
        a2 = ref.layer2(a1)
    assert len(stem_calls) == 1  # one forward pass for every tap
    torch.testing.assert_close(feats[:, :512], a2.mean(dim=(2, 3)))
    torch.testing.assert_close(feats[:, 512:], a1.mean(dim=(2, 3)))


def test_resnet18_maps_at_224_average_to_the_pooled_features() -> None:
    pooled = build_backbone("resnet18", weights="none")
    maps = build_backbone("resnet18", weights="none", output="maps")
    assert (maps.output, maps.dim, maps.levels, maps.layer) == ("maps", 512, None, "layer4 maps")
    assert (pooled.output, pooled.layer, pooled.levels) == ("pooled", "layer4 avgpool", None)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        m = maps.model(x)
        p = pooled.model(x)
    assert m.shape == (2, 512, 7, 7)
    torch.testing.assert_close(m.mean(dim=(2, 3)), p)


def test_efficientnet_maps_average_to_the_pooled_features() -> None:
    pooled = build_backbone("efficientnet_lite0", weights="imagenet")
    maps = build_backbone("efficientnet_lite0", weights="imagenet", output="maps")
    assert (maps.dim, maps.layer, pooled.layer) == (1280, "features maps", "features avgpool")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        m = maps.model(x)
        torch.testing.assert_close(m.mean(dim=(2, 3)), pooled.model(x))
    assert m.shape == (1, 1280, 2, 2)
