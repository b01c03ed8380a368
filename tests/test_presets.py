"""Paper presets (presets/*.yaml, pipeline/presets.py, scripts/preset.py): every preset loads
strictly over the repo's params.yaml, names only keys that exist, and DVC's own rewrite of
params.yaml (the one `dvc exp run -S` does) gives exactly the preset's values."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import read_params
from pipeline.presets import (
    PresetError,
    check_preset,
    hydra_value,
    leaves,
    merged,
    overrides,
    read_preset,
)

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
PAPERS = {"tsrnn", "res_lstm", "mrrn", "rtsae", "ts_lstm", "temporal_inception"}


def _dvc_rewrite(tmp_path: Path, sets: list[str]) -> dict:
    """params.yaml copied to tmp_path and rewritten by DVC's -S code with ``sets``."""
    from dvc.utils.hydra import apply_overrides

    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    apply_overrides(target, sets)
    return read_params(target)


def test_there_is_a_preset_for_every_paper_configuration() -> None:
    assert PAPERS <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_a_preset_applied_by_dvc_loads_strictly_with_its_values(path: Path, tmp_path: Path) -> None:
    params = read_params(ROOT / "params.yaml")
    preset = read_preset(path)
    written = _dvc_rewrite(tmp_path, overrides(params, preset))
    # what DVC wrote is what merged() predicts, and it loads strictly with the preset's values
    assert written == merged(params, preset)
    check_preset(path, params, written=written)
    # a preset trains its paper's heads only, and says so
    assert set(preset["run"]["heads"]) <= set(written["heads"])


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_a_preset_is_commented_with_where_the_paper_says_it(path: Path) -> None:
    """Every leaf line carries a comment (the paper's section or table, or why it differs)."""
    params = read_params(ROOT / "params.yaml")
    lines = path.read_text().splitlines()
    for dotted, _ in leaves(read_preset(path), params):
        key = dotted.rsplit(".", 1)[-1]
        hit = [ln for ln in lines if re.match(rf"\s*{key}:", ln)]
        assert hit, f"{path.name}: {dotted} not found as a line"
        # a list's or mapping's comment may sit on its key line or on its items
        assert any("#" in ln for ln in hit), f"{path.name}: {dotted} has no comment"


def test_a_misspelt_head_key_is_refused_naming_the_preset_and_key(tmp_path: Path) -> None:
    params = read_params(ROOT / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("heads:\n  tsrnn:\n    windwo: 5\n")
    with pytest.raises(PresetError, match=r"bad\.yaml.*heads\.tsrnn.*unknown key 'windwo'"):
        check_preset(bad, params)


def test_a_value_outside_its_choices_is_refused(tmp_path: Path) -> None:
    params = read_params(ROOT / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("flow:\n  algorithm: tvl2\n")
    with pytest.raises(PresetError, match=r"bad\.yaml.*flow\.algorithm.*tvl2"):
        check_preset(bad, params)


def test_an_unknown_section_is_refused(tmp_path: Path) -> None:
    params = read_params(ROOT / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimiser:\n  lr: 0.1\n")
    with pytest.raises(PresetError, match="unknown section 'optimiser'"):
        check_preset(bad, params)


def test_leaves_walk_into_params_mappings_and_take_new_mappings_whole() -> None:
    params = {"fusion": {"weights": {"rgb": 1.0, "flow": 1.5}}, "heads": {"sru": {"lr": 1.0}}}
    preset = {
        "fusion": {"weights": {"flow": 2.0}},
        "heads": {"sru": {"group_lr": {"low": 1e-4}, "lr": 1e-5}},
    }
    assert dict(leaves(preset, params)) == {
        "fusion.weights.flow": 2.0,
        "heads.sru.group_lr": {"low": 1e-4},
        "heads.sru.lr": 1e-5,
    }
    out = merged(params, preset)
    assert out["fusion"]["weights"] == {"rgb": 1.0, "flow": 2.0}
    assert out["heads"]["sru"] == {"lr": 1e-5, "group_lr": {"low": 1e-4}}
    assert params["heads"]["sru"] == {"lr": 1.0}  # not changed in place


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        25,
        1e-05,
        0.001,
        1.5,
        "adam",
        "ten_mean",
        "null",
        "a b",
        "x:y",
        [1, 2],
        ["rgb", "flow"],
        [],
        {"low": 0.0001, "mid": 0.0001},
        [0.1, 0.2, 0.7],
    ],
)
def test_every_value_survives_dvcs_override_parser(value: object, tmp_path: Path) -> None:
    """hydra_value is read back by DVC as the same YAML value (an independent parser)."""
    got = _dvc_rewrite(tmp_path, [f"++seed_probe.value={hydra_value(value)}"])
    assert got["seed_probe"]["value"] == value
    assert type(got["seed_probe"]["value"]) is type(value)


def test_the_command_prints_dvc_exp_run_with_every_override() -> None:
    if not PRESETS:
        pytest.fail("no presets/*.yaml")
    path = PRESETS[0]
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "preset.py"), path.stem, "--print", "-n", "x"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    params = read_params(ROOT / "params.yaml")
    sets = overrides(params, read_preset(path))
    assert out.startswith("dvc exp run -S ")
    assert out.endswith(" -n x")
    assert out.count(" -S ") == len(sets)


def test_an_unknown_preset_name_lists_the_presets() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "preset.py"), "no_such_paper"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "presets/no_such_paper.yaml" in r.stderr


def test_the_readme_table_points_at_every_preset() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Paper configurations", 1)[1].split("\n### ", 1)[0]
    for path in PRESETS:
        assert f"presets/{path.name}" in section, path.name


def test_preset_files_are_yaml_mappings_of_sections() -> None:
    for path in PRESETS:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict) and "run" in data, path.name


def test_training_keys_that_contradict_each_other_are_refused_before_the_run(
    tmp_path: Path,
) -> None:
    """A step schedule without its step size fails at check time, naming the preset and key,
    not when the train stage reaches it after the features are extracted."""
    params = read_params(ROOT / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("heads:\n  tsrnn:\n    schedule: step\n")
    with pytest.raises(PresetError, match=r"bad\.yaml.*heads\.tsrnn\.step_size"):
        check_preset(bad, params)


def test_a_joint_section_is_checked_against_its_head(tmp_path: Path) -> None:
    params = read_params(ROOT / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("joint:\n  res_lstm:\n    fusoin: sum\n")
    with pytest.raises(PresetError, match=r"bad\.yaml.*joint\.res_lstm.*unknown key 'fusoin'"):
        check_preset(bad, params)
    bad.write_text("joint:\n  res_lstm:\n    fusion: mean\n")
    with pytest.raises(PresetError, match=r"joint\.res_lstm\.fusion"):
        check_preset(bad, params)
