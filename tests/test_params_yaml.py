"""params.yaml is laid out as DVC writes it, so `dvc exp run -S key=value` changes one line.

`dvc exp run -S` loads params.yaml with ruamel.yaml's round-trip loader, sets every value
again (dvc.utils.hydra.apply_overrides) and dumps the whole file: lists come back one item per
line, nulls as empty values, and a comment after a list's last item is dropped. A file written
another way became a 102-line diff for one changed value. These tests call the function
`dvc exp run -S` calls, on a copy of params.yaml."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _leaves(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every value that is not a mapping or a list: what -S sets alone."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            yield f"{prefix}{k}", v


def _other(value: Any) -> tuple[str, Any]:
    """A different value of the same kind -> (as written after -S key=, as YAML loads it)."""
    if isinstance(value, bool):
        return str(not value).lower(), not value
    if isinstance(value, int):
        return str(value + 1), value + 1
    if isinstance(value, float):
        return repr(value + 0.25), value + 0.25
    if value is None:
        return "somewhere", "somewhere"
    return f"{value}x", f"{value}x"


def _set(params: dict, key: str, value: Any) -> dict:
    *path, last = key.split(".")
    d = params
    for k in path:
        d = d[k]
    d[last] = value
    return params


def _check_one_line_change(tmp_path: Path, key: str, value: Any) -> None:
    """Run -S ``key``=<another value> on a copy of params.yaml: exactly the line of ``key``
    changes, and every value but ``key`` loads as before."""
    text, new_value = _other(value)
    path = tmp_path / "params.yaml"
    path.write_bytes(PARAMS.read_bytes())
    apply_overrides(path, [f"{key}={text}"])
    before, after = PARAMS.read_text().splitlines(), path.read_text().splitlines()
    changed = [(i, a, b) for i, (a, b) in enumerate(zip(before, after, strict=False), 1) if a != b]
    assert len(after) == len(before) and len(changed) == 1, (
        f"-S {key}={text} changed {len(changed)} lines of params.yaml "
        f"({len(before)} -> {len(after)} lines); first: {changed[:3]}"
    )
    # the key's own line, at its start or inside a mapping written on one line ({a: 1, b: 2})
    line, name = changed[0][2], re.escape(key.rsplit(".", 1)[-1])
    assert re.match(rf"\s*(\S.*[{{,] ?)?{name}: ", line) and text in line, changed
    want = _set(yaml.safe_load(PARAMS.read_text()), key, new_value)
    assert yaml.safe_load(path.read_text()) == want


@pytest.mark.parametrize(
    "key",
    [
        "heads.lstm.hidden",  # the example: an int in a head section
        "heads.lstm.lr",  # a float
        "dataset.root",  # a null (written as an empty value) set to a path
        "features.rgb.backbone",  # a string with a comment after it
        "features.flow.max_clips",  # the last value of a section, before a blank line
        "train.steps",  # a null before the heads section's blank line
        "features.rgb.compile",  # a bool
        "fusion.weights.flow",  # a value in a mapping written on one line
        "heads.rtsae.pretrain_lr",  # the last head's last value
    ],
)
def test_exp_run_set_param_changes_only_the_line_set(tmp_path: Path, key: str) -> None:
    value = dict(_leaves(yaml.safe_load(PARAMS.read_text())))[key]
    _check_one_line_change(tmp_path, key, value)


@pytest.mark.slow  # ~150 round trips through DVC's serializer, ~40 ms each
def test_exp_run_set_param_changes_only_the_line_set_for_every_value(tmp_path: Path) -> None:
    leaves = list(_leaves(yaml.safe_load(PARAMS.read_text())))
    assert len(leaves) > 100  # every section is walked, not only the first
    for key, value in leaves:
        _check_one_line_change(tmp_path, key, value)


def test_a_round_trip_through_dvc_changes_no_byte(tmp_path: Path) -> None:
    """Setting a value to the value it has rewrites the file as it is: DVC's layout is ours."""
    path = tmp_path / "params.yaml"
    path.write_bytes(PARAMS.read_bytes())
    apply_overrides(path, ["train.seed=0"])
    assert yaml.safe_load(PARAMS.read_text())["train"]["seed"] == 0
    assert path.read_bytes() == PARAMS.read_bytes()
