"""Tests for pipeline/config.py: params.yaml loaded strictly into frozen dataclasses, and the
whole file checked at load (unknown sections, types, allowed values, rules between settings),
every message naming the file and the key path."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import (
    HEAD_TRAINING,
    CacheConfig,
    ConfigError,
    DatasetConfig,
    DecodeConfig,
    EvaluateConfig,
    FeaturesConfig,
    FlowConfig,
    FusionConfig,
    Params,
    RunConfig,
    StreamFeaturesConfig,
    TrainConfig,
    build,
    check_params,
    head_section,
    load_params,
    read_params,
    section,
)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"

SECTIONS = [
    ("run", RunConfig),
    ("dataset", DatasetConfig),
    ("decode", DecodeConfig),
    ("flow", FlowConfig),
    ("cache", CacheConfig),
    ("features", FeaturesConfig),
    ("features.rgb", StreamFeaturesConfig),
    ("features.flow", StreamFeaturesConfig),
    ("train", TrainConfig),
    ("fusion", FusionConfig),
    ("evaluate", EvaluateConfig),
]


@pytest.fixture(scope="module")
def params() -> dict:
    return load_params(PARAMS)


def _with(dotted: str, value: Any) -> dict:
    """The repository's params.yaml as read, with one value set (the key path may be new)."""
    data = copy.deepcopy(read_params(PARAMS))
    *path, last = dotted.split(".")
    node = data
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return data


def _refused(data: dict) -> str:
    """The message check_params gives ``data``, which it must refuse."""
    with pytest.raises(ConfigError) as e:
        check_params(data, source="params.yaml")
    return str(e.value)


def _params_file(tmp_path: Path, extra: str = "", *, text: str | None = None) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((PARAMS.read_text() if text is None else text) + extra)
    return path


# -- the repository's params.yaml -------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"), SECTIONS, ids=[s for s, _ in SECTIONS])
def test_repo_params_load_into_every_section(params: dict, name: str, cls: type) -> None:
    cfg = section(params, name, cls)
    assert isinstance(cfg, cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.__setattr__(dataclasses.fields(cls)[0].name, None)


def test_the_repo_params_pass_the_whole_file_check(params: dict) -> None:
    checked = check_params(params)
    assert isinstance(checked, Params)
    assert set(checked.run.heads) <= set(checked.heads)
    assert checked.decode == section(params, "decode", DecodeConfig)


def test_repo_params_values_arrive_typed(params: dict) -> None:
    flow = section(params, "flow", FlowConfig)
    assert flow.tvl1.lambda_ == pytest.approx(params["flow"]["tvl1"]["lambda"])
    assert isinstance(flow.bound, float)  # params.yaml writes 20: an int for a float field
    dataset = section(params, "dataset", DatasetConfig)
    assert dataset.splits == tuple(params["dataset"]["splits"])
    assert dataset.demo.videos_per_class == params["dataset"]["demo"]["videos_per_class"]
    fusion = section(params, "fusion", FusionConfig)
    assert isinstance(fusion.methods, tuple)
    assert fusion.weights == {k: float(v) for k, v in params["fusion"]["weights"].items()}
    decode = section(params, "decode", DecodeConfig)
    assert decode.short_side == params["decode"]["short_side"]


# -- unknown sections and keys ----------------------------------------------------------------


def test_an_unknown_top_level_section_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _params_file(tmp_path, "decodee:\n  num_frames: 3\n")
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert str(e.value) == (
        f"{path}: unknown section 'decodee' (known: run, dataset, decode, flow, cache, features, "
        "train, heads, joint, fusion, evaluate)"
    )


def test_unknown_key_names_it_and_the_known_keys() -> None:
    with pytest.raises(ConfigError) as e:
        section({"decode": {"num_frames": 25, "num_frame": 3}}, "decode", DecodeConfig)
    msg = str(e.value)
    assert "params.yaml:decode" in msg
    assert "'num_frame'" in msg
    for known in ("flow_pairs", "num_frames", "short_side", "workers"):
        assert known in msg


def test_unknown_nested_key_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"flow\.tvl1: unknown key 'lamda'.*lambda"):
        section({"flow": {"tvl1": {"lamda": 0.1}}}, "flow", FlowConfig)
    # the Python spelling is not a params.yaml key
    with pytest.raises(ConfigError, match=r"flow\.tvl1: unknown key 'lambda_'"):
        section({"flow": {"tvl1": {"lambda_": 0.1}}}, "flow", FlowConfig)


# -- types --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [("25", "expected an integer"), (True, "expected an integer"), (2.5, "expected an integer")],
)
def test_wrong_type_for_an_int(value: object, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as e:
        build(DecodeConfig, {"num_frames": value}, where="params.yaml:decode")
    assert "params.yaml:decode.num_frames" in str(e.value)


def test_wrong_type_for_a_string_or_list() -> None:
    with pytest.raises(ConfigError, match=r"features\.rgb\.weights: expected a string"):
        section({"features": {"rgb": {"weights": 18}}}, "features", FeaturesConfig)
    with pytest.raises(ConfigError, match=r"fusion\.methods: expected a list"):
        section({"fusion": {"methods": "sum"}}, "fusion", FusionConfig)
    with pytest.raises(ConfigError, match=r"decode: expected a mapping"):
        section({"decode": [1, 2]}, "decode", DecodeConfig)


@pytest.mark.parametrize("value", ["twenty", True, [20]])
def test_wrong_type_for_a_float(value: object) -> None:
    with pytest.raises(ConfigError, match=r"flow\.bound: expected a number"):
        section({"flow": {"bound": value}}, "flow", FlowConfig)


# -- numbers: 1e-4 is a float -------------------------------------------------------------------


def test_1e_minus_4_is_a_float_as_dvc_reads_it(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) read `lr: 1e-4` as the string '1e-4', and training crashed with a
    TypeError naming no key; DVC (YAML 1.2) reads a number."""
    path = _params_file(
        tmp_path, text="run: {heads: [lstm]}\nheads:\n  lstm: {lr: 1e-4}\nflow: {bound: 2E1}\n"
    )
    loaded = load_params(path)
    assert loaded["heads"]["lstm"]["lr"] == 1e-4
    assert isinstance(loaded["heads"]["lstm"]["lr"], float)
    assert section(loaded, "flow", FlowConfig).bound == 20.0
    assert read_params(path)["heads"]["lstm"]["lr"] == 1e-4  # the reader itself, YAML 1.2 floats


def test_a_number_written_as_a_string_becomes_a_float(tmp_path: Path) -> None:
    """A quoted '1e-4' (what a YAML 1.1 writer puts there) for a float setting is that float,
    and the train stage's mapping carries the float, not the string."""
    path = _params_file(
        tmp_path,
        text="run: {heads: [lstm]}\nheads:\n  lstm: {lr: '1e-4'}\nflow: {tvl1: {tau: '0.5'}}\n",
    )
    loaded = load_params(path)
    assert loaded["heads"]["lstm"]["lr"] == 1e-4
    assert section(loaded, "flow", FlowConfig).tvl1.tau == 0.5


def test_the_train_settings_of_1e_minus_4_are_a_float(tmp_path: Path) -> None:
    from pipeline.engine import split_head_params

    path = _params_file(tmp_path, text="run: {heads: [lstm]}\nheads:\n  lstm: {lr: 1e-4}\n")
    settings, _ = split_head_params(load_params(path)["heads"]["lstm"])
    assert settings.lr == 1e-4 and isinstance(settings.lr, float)


# -- heads.<name> -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", "ten", "params.yaml:heads.lstm.epochs: expected an integer, got 'ten'"),
        ("lr", "abc", "params.yaml:heads.lstm.lr: expected a number, got 'abc'"),
        ("lr", 0, "params.yaml:heads.lstm.lr: must be > 0, got 0.0"),
        ("epochs", 0, "params.yaml:heads.lstm.epochs: must be >= 1, got 0"),
        (
            "optimizer",
            "adamax",
            "params.yaml:heads.lstm.optimizer: unknown 'adamax' "
            "(choose from adam, adamw, sgd, rmsprop, adadelta)",
        ),
    ],
)
def test_head_training_settings_are_checked_with_the_whole_file(
    key: str, value: object, message: str
) -> None:
    """Without importing the head: every stage checks them when it loads params.yaml."""
    assert _refused(_with(f"heads.lstm.{key}", value)) == message


def test_a_stage_that_loads_a_bad_head_setting_stops_before_any_video(tmp_path: Path) -> None:
    path = _params_file(tmp_path, text="run: {heads: [lstm]}\nheads:\n  lstm: {epochs: ten}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:heads\.lstm\.epochs: expected an integer"):
        load_params(path)


@pytest.mark.parametrize("name", sorted(read_params(PARAMS)["heads"]))
def test_every_head_section_of_params_yaml_fits_its_head(params: dict, name: str) -> None:
    from pipeline.heads import get_head_class, head_arguments

    cls = get_head_class(name)
    got = head_section(params, name, cls)
    assert set(got) == set(params["heads"][name])
    assert set(got) - set(HEAD_TRAINING) <= head_arguments(name)


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        ("lstm", "hidden", "abc", "params.yaml:heads.lstm.hidden: expected an integer, got 'abc'"),
        ("lstm", "dropout", "half", "params.yaml:heads.lstm.dropout: expected a number, got 'half'"),
        ("ts_lstm", "hidden", [256, "x"], "params.yaml:heads.ts_lstm.hidden[1]: expected an integer, got 'x'"),
        ("ts_lstm", "fc_before_pool", "no", "params.yaml:heads.ts_lstm.fc_before_pool: expected true/false, got 'no'"),
        ("sru", "levels", 128, "params.yaml:heads.sru.levels: expected a list, got 128"),
    ],
)  # fmt: skip
def test_head_constructor_arguments_are_checked_against_its_signature(
    params: dict, name: str, key: str, value: object, message: str
) -> None:
    from pipeline.heads import get_head_class

    bad = copy.deepcopy(params)
    bad["heads"][name][key] = value
    with pytest.raises(ConfigError) as e:
        head_section(bad, name, get_head_class(name))
    assert str(e.value) == message


def test_head_arguments_are_converted_to_their_annotated_type(params: dict) -> None:
    from pipeline.heads import get_head_class

    cfg = copy.deepcopy(params)
    cfg["heads"]["lstm"].update(dropout="0.25", lr="1e-4")
    got = head_section(cfg, "lstm", get_head_class("lstm"))
    assert got["dropout"] == 0.25 and got["lr"] == 1e-4


def test_an_unknown_head_key_names_the_heads_arguments(params: dict) -> None:
    from pipeline.heads import get_head_class

    bad = copy.deepcopy(params)
    bad["heads"]["lstm"]["hiden"] = 256
    with pytest.raises(ConfigError) as e:
        head_section(bad, "lstm", get_head_class("lstm"))
    assert str(e.value) == (
        "params.yaml:heads.lstm: unknown key 'hiden' (known: batch_size, dropout, epochs, "
        "gamma, grad_clip, group_lr, hidden, layers, lr, milestones, min_lr, momentum, nesterov, "
        "optimizer, pretrain_batch_size, pretrain_epochs, pretrain_lr, pretrain_optimizer, rho, "
        "schedule, step_size, warmup_epochs, "
        "weight_decay)"
    )


def test_head_training_agrees_with_the_engines_train_settings() -> None:
    """config cannot import pipeline.engine (torch, in every stage): its table of the training
    settings must list exactly TrainSettings' fields, of the same types."""
    from pipeline.engine import TRAINING_KEYS, TrainSettings

    def base(tp: Any) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Annotated:
            return base(args[0])
        if origin is typing.Literal:
            return type(args[0])
        if args:
            return frozenset(base(a) for a in args)
        return tp

    engine = typing.get_type_hints(TrainSettings)
    assert set(HEAD_TRAINING) == set(engine) == set(TRAINING_KEYS)
    assert {k: base(v) for k, v in HEAD_TRAINING.items()} == {k: base(v) for k, v in engine.items()}


def test_a_run_head_needs_a_section() -> None:
    data = _with("run.heads", ["lstm", "lstmm"])
    assert _refused(data) == "params.yaml:run.heads: 'lstmm' has no section heads.lstmm"


# -- ranges ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("decode.num_frames", 0, "params.yaml:decode.num_frames: must be >= 1, got 0"),
        ("decode.num_frames", -5, "params.yaml:decode.num_frames: must be >= 1, got -5"),
        ("decode.flow_pairs", 0, "params.yaml:decode.flow_pairs: must be >= 1, got 0"),
        ("decode.short_side", 0, "params.yaml:decode.short_side: must be >= 16, got 0"),
        ("decode.workers", -1, "params.yaml:decode.workers: must be >= 0, got -1"),
        ("flow.bound", 0, "params.yaml:flow.bound: must be > 0, got 0.0"),
        ("flow.raft.iterations", 0, "params.yaml:flow.raft.iterations: must be >= 1, got 0"),
        ("flow.tvl1.scale_step", 1, "params.yaml:flow.tvl1.scale_step: must be > 0 and < 1, got 1.0"),
        ("features.rgb.crop", 0, "params.yaml:features.rgb.crop: must be >= 1, got 0"),
        ("features.flow.max_clips", 0, "params.yaml:features.flow.max_clips: must be >= 1, got 0"),
        ("cache.videos_per_pack", 0, "params.yaml:cache.videos_per_pack: must be >= 1, got 0"),
        ("dataset.test_fraction", 1.0, "params.yaml:dataset.test_fraction: must be > 0 and < 1, got 1.0"),
        ("train.oof_folds", 1, "params.yaml:train.oof_folds: must be 0 (in-sample scores) or at least 2 folds, got 1"),
        ("fusion.svm_folds", 1, "params.yaml:fusion.svm_folds: must be >= 2, got 1"),
        ("fusion.svm_c", [1.0, -1.0], "params.yaml:fusion.svm_c[1]: must be > 0, got -1.0"),
    ],
)  # fmt: skip
def test_values_out_of_range_are_refused(key: str, value: object, message: str) -> None:
    assert _refused(_with(key, value)) == message


# -- choices ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("decode.sampling", "uniform", "decode.sampling: unknown 'uniform' (choose from points, dense)"),
        ("decode.resize", "cubic", "decode.resize: unknown 'cubic' (choose from decoder, opencv)"),
        ("flow.algorithm", "raft", "flow.algorithm: unknown 'raft' (choose from tvl1, tvl1_fast, farneback, raft_small, raft_large)"),
        ("flow.raft.device", "tpu", "flow.raft.device: unknown 'tpu' (choose from auto, cpu, cuda)"),
        ("features.rgb.backbone", "vgg16", "features.rgb.backbone: unknown 'vgg16' (choose from resnet18, resnet34, resnet50, resnet101, efficientnet_lite0, r3d_18, mc3_18, r2plus1d_18, s3d)"),
        ("features.flow.backbone", "i3d", "features.flow.backbone: unknown 'i3d' (choose from resnet18, resnet34, resnet50, resnet101, efficientnet_lite0, r3d_18, mc3_18, r2plus1d_18, s3d)"),
        ("features.rgb.output", "logits", "features.rgb.output: unknown 'logits' (choose from pooled, taps, maps)"),
        ("features.rgb.crops", "five", "features.rgb.crops: unknown 'five' (choose from centre, ten_mean, ten_axis)"),
        ("features.rgb.sampling", "dense", "features.rgb.sampling: unknown 'dense' (choose from points, clips)"),
        ("features.rgb.precision", "fp8", "features.rgb.precision: unknown 'fp8' (choose from fp32, bf16, fp16, auto)"),
        ("features.flow.device", "gpu", "features.flow.device: unknown 'gpu' (choose from auto, cpu, cuda)"),
        ("features.rgb.taps", ["layer2", "layer5"], "features.rgb.taps[1]: unknown 'layer5' (choose from layer1, layer2, layer3, layer4)"),
        ("cache.backend", "lmdb", "cache.backend: unknown 'lmdb' (choose from zarr, hdf5)"),
        ("dataset.name", "kinetics", "dataset.name: unknown 'kinetics' (choose from demo, ucf101, hmdb51, folder, csv)"),
        ("fusion.methods", ["sum", "avg"], "fusion.methods[1]: unknown 'avg' (choose from sum, product, weighted, svm, learned)"),
        ("fusion.streams", ["rgb", "depth"], "fusion.streams[1]: unknown 'depth' (choose from rgb, flow)"),
        ("run.streams", ["rgb", "audio"], "run.streams[1]: unknown 'audio' (choose from rgb, flow)"),
        ("train.device", "gpu", "train.device: unknown 'gpu' (choose from auto, cpu, cuda)"),
    ],
)  # fmt: skip
def test_a_choice_outside_its_values_is_refused_with_the_choices(
    key: str, value: object, message: str
) -> None:
    assert _refused(_with(key, value)) == f"params.yaml:{message}"


def test_the_library_choice_lists_agree_with_the_config() -> None:
    """The modules that act on a choice list the same values (or take them from config)."""
    from pipeline import config
    from pipeline.backbones import BACKBONES, BACKBONES_3D
    from pipeline.flow import RAFT_ALGORITHMS
    from pipeline.fusion import FUSIONS

    assert typing.get_args(config.FusionMethod) == FUSIONS
    assert typing.get_args(config.BackboneName) == BACKBONES
    assert set(BACKBONES_3D) == set(typing.get_args(config.Backbone3D))
    assert set(RAFT_ALGORITHMS) < set(typing.get_args(config.FlowAlgorithm))


def test_a_section_made_in_code_is_checked_too() -> None:
    """The library trusts the sections it is handed: one made in code (a test, a benchmark, a
    plan.json read back) cannot hold a value params.yaml could not."""
    with pytest.raises(ConfigError) as e:
        DecodeConfig(resize="cubic", workers=1)
    assert str(e.value) == "DecodeConfig.resize: unknown 'cubic' (choose from decoder, opencv)"
    with pytest.raises(
        ConfigError, match=r"FlowConfig\.algorithm: unknown 'raft' .*tvl1.*farneback"
    ):
        FlowConfig(algorithm="raft")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"StreamFeaturesConfig\.backbone: unknown 'vgg16'"):
        StreamFeaturesConfig(backbone="vgg16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"DecodeConfig\.num_frames: must be >= 1, got 0"):
        DecodeConfig(num_frames=0)
    assert dataclasses.replace(DecodeConfig(), short_side=16).short_side == 16


# -- rules between settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"decode.sampling": "dense", "decode.flow_pairs": 5},
            "decode.flow_pairs: must be 1 with sampling: dense (every pair once), got 5",
        ),
        (
            {"features.rgb.backbone": "r3d_18"},
            "features.rgb.sampling: r3d_18 is a 3D backbone and reads clips: set sampling: clips "
            "(Res-LSTM: clip_len 16, clip_stride 8)",
        ),
        (
            {"features.rgb.backbone": "mc3_18", "features.rgb.sampling": "clips", "features.rgb.output": "maps"},
            "features.rgb.output: 'maps' is for 2D backbones; mc3_18 is a 3D clip backbone and "
            "gives pooled features only",
        ),
        (
            {"features.rgb.backbone": "efficientnet_lite0", "features.rgb.output": "taps"},
            "features.rgb.output: 'taps' reads ResNet blocks layer1, layer2, layer3, layer4; "
            "efficientnet_lite0 has none (use one of resnet18, resnet34, resnet50, resnet101)",
        ),
        (
            {"features.rgb.backbone": "resnet34", "features.rgb.output": "taps", "features.rgb.taps": ["layer2", "layer2"]},
            "features.rgb.taps: must be distinct names from layer1, layer2, layer3, layer4, got "
            "['layer2', 'layer2']",
        ),
        (
            {"decode.short_side": 64, "features.rgb.crop": 65},
            "features.rgb.crop: 65 is larger than decode.short_side 64, the short side of the "
            "frames it is cropped from",
        ),
        (
            {"decode.short_side": 48, "features.rgb.crop": 64},
            "features.rgb.crop: 64 is larger than decode.short_side 48, the short side of the "
            "frames it is cropped from",
        ),
        (
            {"features.flow.backbone": "r3d_18", "features.flow.sampling": "clips", "decode.flow_pairs": 5},
            "features.flow.backbone: r3d_18 is a 3D backbone: its flow clips take one flow field "
            "per step, so decode needs flow_pairs: 1 (and sampling: dense), not 5",
        ),
        ({"dataset.name": "folder"}, "dataset.root: is required for dataset 'folder'"),
        (
            {"dataset.name": "ucf101", "dataset.root": "UCF-101", "dataset.splits_dir": "s", "dataset.splits": [1, 4]},
            "dataset.splits: ucf101 has the official splits 1, 2, 3; got [1, 4]",
        ),
        (
            {"fusion.weights": {"rgb": 1.0}},
            "fusion.weights: weighted fusion needs a weight for every stream; ['flow'] has none",
        ),
        (
            {"run.streams": ["rgb"]},
            "fusion.streams: ['flow'] not trained (run.streams: ['rgb'])",
        ),
        (
            {"evaluate.confusion": "lstm"},
            "evaluate.confusion: must be best, <head>/<stream> or <head>/<fusion>, got 'lstm'",
        ),
        (
            {"run.heads": ["lstm", "ts_lstm"], "run.joint_heads": ["ts_lstm"], "evaluate.confusion": "lstm/rgbb"},
            "evaluate.confusion: 'lstm/rgbb' is not a model of this run (heads: lstm, ts_lstm; "
            "streams and fusions: rgb, flow, rgb+flow, sum, product, weighted, svm, learned)",
        ),
    ],
)  # fmt: skip
def test_settings_that_cannot_work_together_are_refused(changes: dict, message: str) -> None:
    data = copy.deepcopy(read_params(PARAMS))
    for key, value in changes.items():
        data = _merge(data, key, value)
    assert _refused(data) == f"params.yaml:{message}"


def _merge(data: dict, dotted: str, value: Any) -> dict:
    *path, last = dotted.split(".")
    node = data
    for key in path:
        node = node[key]
    node[last] = value
    return data


def test_a_file_for_one_stage_needs_only_its_sections(tmp_path: Path) -> None:
    """Rules between sections apply where the file gives both: the defaults of a section left out
    describe no run (a features-only file with a 300-px crop is not checked against decode)."""
    path = _params_file(tmp_path, text="features:\n  rgb: {backbone: resnet18, crop: 300}\n")
    assert section(load_params(path), "features.rgb", StreamFeaturesConfig).crop == 300
    path = _params_file(tmp_path, text="run: {heads: [lstm]}\n")
    with pytest.raises(ConfigError, match=r"run\.heads: 'lstm' has no section heads\.lstm"):
        load_params(path)


def test_a_confusion_of_this_run_is_accepted() -> None:
    for chosen in ("best", "lstm/flow", "ts_lstm/rgb+flow", "lstm/weighted"):
        assert check_params(_with("evaluate.confusion", chosen)).evaluate.confusion == chosen


# -- loading ------------------------------------------------------------------------------------


def test_lambda_maps_to_lambda_() -> None:
    cfg = section({"flow": {"tvl1": {"lambda": 0.3}}}, "flow", FlowConfig)
    assert cfg.tvl1.lambda_ == pytest.approx(0.3)
    assert cfg.tvl1.tau == pytest.approx(0.25)  # the others keep their defaults


def test_missing_section() -> None:
    with pytest.raises(ConfigError, match="missing section 'train'"):
        section({"decode": {}}, "train", TrainConfig)
    with pytest.raises(ConfigError, match=r"missing section 'features\.flow'"):
        section({"features": {"rgb": {}}}, "features.flow", StreamFeaturesConfig)


def test_empty_section_gives_the_defaults() -> None:
    assert section({"decode": None}, "decode", DecodeConfig) == DecodeConfig()


def test_optional_string_accepts_null() -> None:
    cfg = section({"dataset": {"root": None, "csv": "a.csv"}}, "dataset", DatasetConfig)
    assert cfg.root is None and cfg.csv == "a.csv"


def test_load_params_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=str(missing)):
        load_params(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_params(scalar)


# -- the stages ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stage_stops_at_load_with_one_line_naming_the_file_and_key(tmp_path: Path) -> None:
    """num_frames: 0 used to be blamed on every video; now decode stops before reading any."""
    params = _params_file(
        tmp_path, text=PARAMS.read_text().replace("num_frames: 25", "num_frames: 0")
    )
    assert read_params(params)["decode"]["num_frames"] == 0
    run = subprocess.run(
        [sys.executable, "-m", "stages.decode", "--params", str(params), "--manifest", "m.csv",
         "--probe", "p.csv", "--out", str(tmp_path / "decode")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.strip() == f"{params}:decode.num_frames: must be >= 1, got 0"
    assert not (tmp_path / "decode").exists()


@pytest.mark.slow
def test_the_features_stage_refuses_a_crop_larger_than_the_frames_once(tmp_path: Path) -> None:
    """The plan was made at short side 32: a 64-px crop fails before any video is read (the
    video here does not even exist), where before each video failed on its own."""
    from pipeline.plan import Plan, PlannedVideo, write_plan
    from stages import features

    video = PlannedVideo("v", str(tmp_path / "v.avi"), 12, False, [0, 4, 8], "ab" * 32, 48, 32)
    dec = tmp_path / "decode"
    write_plan(dec / "plan.json", Plan(DecodeConfig(short_side=32, workers=1), {"v": video}))
    cfg = StreamFeaturesConfig(backbone="resnet18", weights="none", crop=64, threads=1)
    with pytest.raises(ConfigError) as e:
        features.main(cfg, stream="rgb", source=dec, out=tmp_path / "features")
    assert str(e.value) == (
        "features.rgb.crop: 64 is larger than the short side 32 of the frames it crops "
        f"({dec / 'plan.json'}: decode.short_side 32)"
    )
    assert not (tmp_path / "features").exists()
    assert json.loads((dec / "plan.json").read_text())["settings"]["short_side"] == 32


@pytest.mark.slow
def test_the_train_stage_checks_its_heads_constructor_arguments_before_any_cache(
    tmp_path: Path,
) -> None:
    """`hidden: abc` used to crash while building the head, after the caches were read."""
    import subprocess
    import sys

    path = _params_file(tmp_path, text="heads:\n  lstm: {hidden: abc}\ntrain: {seed: 0}\n")
    run = subprocess.run(
        [
            sys.executable, "-m", "stages.train", "--params", str(path), "--head", "lstm",
            "--stream", "rgb", "--features", str(tmp_path / "absent"),
            "--manifest", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "out"),
        ],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"train: {path}:heads.lstm.hidden: expected an integer, got 'abc'"
    )
    assert not (tmp_path / "out").exists()
