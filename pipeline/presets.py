"""Paper presets: params.yaml fragments (presets/<name>.yaml) that set one paper's published
configuration, run as a DVC experiment (``bash scripts/run.sh preset <name>``).

A preset is a nested mapping laid out as params.yaml. Applying it replaces each of its leaves in
params.yaml and leaves every other setting as it is (the dataset above all: a preset says how a
paper trains, the user's params.yaml says on what). A leaf is a value whose params.yaml
counterpart is not a mapping, or absent (a training key a head section does not spell out, such
as ``schedule``): ``fusion.weights`` is walked into, ``heads.sru.group_lr`` is set whole.

The presets run through ``dvc exp run -S ++key=value`` (``overrides``): DVC's own way to change
params, so the experiment is recorded with its params and re-runs only the stages whose
sections changed. ``check_preset`` proves that DVC's rewrite gives a params.yaml that loads
strictly (an unknown or misspelt key, a value outside its choices: ConfigError naming the
preset) and holds the preset's values.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, read_params


class PresetError(ConfigError):
    """A preset file that is not a params.yaml fragment (names the file and the key)."""


def read_preset(path: Path) -> dict[str, Any]:
    """presets/<name>.yaml -> its nested mapping; PresetError for a file that is not one."""
    try:
        data = read_params(path)  # params.yaml's loader: 1e-4 is a float, as DVC reads it
    except ConfigError as e:
        raise PresetError(str(e)) from None
    if not data:
        raise PresetError(f"{path}: a preset is a non-empty mapping of params.yaml sections")
    return dict(data)


def leaves(
    preset: Mapping[str, Any], params: Mapping[str, Any], *, where: str = ""
) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of ``preset``: walked into where ``params`` holds a
    mapping at the same key, taken whole elsewhere."""
    for key, value in preset.items():
        dotted = f"{where}{key}"
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise PresetError(f"{dotted}: a preset key is a plain name, got {key!r}")
        below = params.get(key) if isinstance(params, Mapping) else None
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            yield from leaves(value, below, where=f"{dotted}.")
        else:
            yield dotted, value


def merged(params: Mapping[str, Any], preset: Mapping[str, Any]) -> dict[str, Any]:
    """params.yaml's content with every leaf of ``preset`` put in (what ``overrides`` makes DVC
    write, without DVC)."""
    out = copy.deepcopy(dict(params))
    for dotted, value in leaves(preset, params):
        node = out
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = copy.deepcopy(value)
    return out


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-./]*")


def hydra_value(value: Any) -> str:
    """A YAML value -> the same value in Hydra's override grammar (what ``dvc exp run -S``
    parses): null, true/false, numbers, plain or quoted strings, [lists] and {mappings}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        reserved = {"null", "true", "false", "inf", "nan"}
        if _BARE.fullmatch(value) and value.lower() not in reserved:
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise PresetError(f"a preset value must be YAML data, got {value!r}")


def overrides(params: Mapping[str, Any], preset: Mapping[str, Any]) -> list[str]:
    """The ``dvc exp run -S`` arguments that put ``preset`` into ``params``: ``++key=value``
    for each leaf (``++`` sets a key whether or not params.yaml has it)."""
    return [f"++{k}={hydra_value(v)}" for k, v in leaves(preset, params)]


def check_preset(
    path: Path, params: Mapping[str, Any], *, written: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load the preset ``path`` over ``params`` strictly -> the merged params.

    ``written``: params.yaml as DVC rewrote it with ``overrides`` (tests); None = ``merged``.
    Raises PresetError naming the file when the result is not a valid params.yaml (every
    section, and every head section against its head's constructor and training keys) or
    does not hold the preset's values."""
    from pipeline.config import check_params, head_section
    from pipeline.engine import split_head_params
    from pipeline.heads import get_head_class

    preset = read_preset(path)
    result = dict(written) if written is not None else merged(params, preset)
    source = f"{path} over params.yaml"
    try:
        checked = check_params(result, source=source)
        # each train stage's settings as it will take them: the head's constructor arguments,
        # and the rules between training keys (a step schedule without step_size), which the
        # stage would otherwise find only when it starts training
        for name in checked.heads:
            for joint in (False, True) if name in checked.joint else (False,):
                section = "joint" if joint else "heads"
                hp = head_section(result, name, get_head_class(name), source=source, joint=joint)
                split_head_params(hp, where=f"{source}:{section}.{name}")
    except (ConfigError, KeyError) as e:
        raise PresetError(str(e)) from None
    for dotted, value in leaves(preset, params):
        node: Any = result
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node != value:
            raise PresetError(f"{path}: {dotted} is {node!r} after applying it, not {value!r}")
    return result
