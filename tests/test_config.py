"""Tests for pipeline/config.py: strict loading of params.yaml into frozen dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    DatasetConfig,
    DecodeConfig,
    EvaluateConfig,
    FeaturesConfig,
    FlowConfig,
    FusionConfig,
    StreamFeaturesConfig,
    TrainConfig,
    build,
    load_params,
    section,
)

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

SECTIONS = [
    ("dataset", DatasetConfig),
    ("decode", DecodeConfig),
    ("flow", FlowConfig),
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


@pytest.mark.parametrize(("name", "cls"), SECTIONS, ids=[s for s, _ in SECTIONS])
def test_repo_params_load_into_every_section(params: dict, name: str, cls: type) -> None:
    cfg = section(params, name, cls)
    assert isinstance(cfg, cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.__setattr__(dataclasses.fields(cls)[0].name, None)


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


@pytest.mark.parametrize(
    ("value", "reason"),
    [("25", "expected an integer"), (True, "expected an integer"), (2.5, "expected an integer")],
)
def test_wrong_type_for_an_int(value: object, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as e:
        build(DecodeConfig, {"num_frames": value}, where="params.yaml:decode")
    assert "params.yaml:decode.num_frames" in str(e.value)


def test_wrong_type_for_a_string_or_list() -> None:
    with pytest.raises(ConfigError, match=r"features\.rgb\.backbone: expected a string"):
        section({"features": {"rgb": {"backbone": 18}}}, "features", FeaturesConfig)
    with pytest.raises(ConfigError, match=r"fusion\.methods: expected a list"):
        section({"fusion": {"methods": "sum"}}, "fusion", FusionConfig)
    with pytest.raises(ConfigError, match=r"decode: expected a mapping"):
        section({"decode": [1, 2]}, "decode", DecodeConfig)


@pytest.mark.parametrize("value", ["20", True])
def test_wrong_type_for_a_float(value: object) -> None:
    with pytest.raises(ConfigError, match=r"flow\.bound"):
        section({"flow": {"bound": value}}, "flow", FlowConfig)


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
