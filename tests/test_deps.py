"""dvc.yaml's promise, checked against the code: each stage's ``deps:`` are exactly the project
files it runs (the import closure of its module, and of its head's module for a train stage),
and its ``params:`` exactly the settings its outputs depend on. That editing one head's file
marks only that head's train stages in ``dvc status`` is tested on a real tiny pipeline in
tests/test_pipeline.py.

Print what dvc.yaml should list: ``python tests/test_deps.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import shlex
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def _module_file(name: str) -> Path | None:
    """The project file of dotted module ``name`` (a module or a package's __init__), or None
    for a module outside the project (torch, numpy, ...)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
        "TYPE_CHECKING"
    )


def _imported(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports, anywhere in it (functions and
    ``__main__`` included: they run), except under ``if TYPE_CHECKING:`` (never runs)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # submodules, if they are
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def closure(*files: Path) -> set[str]:
    """Project files (relative paths) that running ``files`` imports, transitively, with each
    module's parent packages' non-empty __init__.py (they run on import)."""
    seen: set[Path] = set()
    todo = list(files)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # pipeline, pipeline.heads, pipeline.heads.lstm
                found = _module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return {
        str(p.relative_to(ROOT))
        for p in seen
        if not (p.name == "__init__.py" and not p.read_text().strip())
    }


def _stages() -> list[Any]:
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return list(repo.index.stages)


def _arg(cmd: str, flag: str) -> str | None:
    words = shlex.split(cmd)
    return words[words.index(flag) + 1] if flag in words else None


def expected_code_deps(cmd: str) -> set[str]:
    """The project files a stage command (``python -m stages.X ...``) runs."""
    module = _arg(cmd, "-m")
    assert module and module.startswith("stages."), cmd
    files = [ROOT / (module.replace(".", "/") + ".py")]
    head = _arg(cmd, "--head")
    if head:  # the registry imports the head's own module, by name, when it is built
        files.append(ROOT / "pipeline" / "heads" / f"{head}.py")
    return closure(*files)


def listed_code_deps(stage: Any) -> set[str]:
    """The project files a stage's deps: name, a folder standing for the .py files under it."""
    out: set[str] = set()
    for d in stage.deps:
        rel = Path(d.def_path)
        if rel.parts[0] not in PACKAGES:
            continue  # data, params.yaml
        path = ROOT / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        out.update(
            str(p.relative_to(ROOT))
            for p in files
            if not (p.name == "__init__.py" and not p.read_text().strip())
        )
    return out


STAGES = _stages()


@pytest.mark.parametrize("stage", STAGES, ids=[s.addressing for s in STAGES])
def test_a_stage_lists_exactly_the_code_it_runs(stage: Any) -> None:
    want, have = expected_code_deps(stage.cmd), listed_code_deps(stage)
    assert have == want, (
        f"dvc.yaml {stage.addressing}: missing {sorted(want - have)}, "
        f"not run by the stage {sorted(have - want)}"
    )


def test_the_closure_follows_imports_inside_functions_and_skips_type_checking(
    tmp_path: Path,
) -> None:
    """The test's own ground: lazy imports run, TYPE_CHECKING imports do not."""
    src = ROOT / "stages" / "flow.py"
    tree = src.read_text()
    assert "from pipeline.backbones import WeightsError" in tree  # imported in __main__ only
    assert "pipeline/backbones.py" in closure(src)
    assert "pipeline/heads/lstm.py" not in expected_code_deps(
        "python -m stages.train --head mean_pool"
    )
    assert "pipeline/heads/lstm.py" in expected_code_deps("python -m stages.train --head lstm")
    # pipeline/backbones.py imports torchvision's WeightsEnum under TYPE_CHECKING only
    assert any(
        _is_type_checking(n)
        for n in ast.walk(ast.parse((ROOT / "pipeline/backbones.py").read_text()))
        if isinstance(n, ast.If)
    )


def _identity_fields() -> set[str]:
    """The ``features.<stream>`` settings the cache identity reads, whatever the branch: found
    by running ``params_identity`` on a recorder of attribute reads."""
    from pipeline.config import StreamFeaturesConfig
    from pipeline.identity import params_identity

    read: set[str] = set()

    class Recorder:
        def __init__(self, cfg: StreamFeaturesConfig) -> None:
            self._cfg = cfg

        def __getattr__(self, key: str) -> object:
            read.add(key)
            return getattr(self._cfg, key)

    base = StreamFeaturesConfig()
    for variant in (
        base,
        dataclasses.replace(base, output="taps"),
        dataclasses.replace(base, sampling="clips"),
        dataclasses.replace(base, output="maps", crops="ten_axis"),
    ):
        params_identity(Recorder(variant))  # type: ignore[arg-type]
    return read


@pytest.mark.parametrize(
    "stage",
    [s for s in STAGES if s.addressing.startswith("train")],
    ids=[s.addressing for s in STAGES if s.addressing.startswith("train")],
)
def test_a_train_stage_lists_the_features_settings_its_cache_check_reads(stage: Any) -> None:
    """The train stage checks its caches against these settings (--params-check), so a change
    to any of them must re-run it, and a change to any other (batch size, threads) must not."""
    streams = _arg(stage.cmd, "--stream").split("+")
    want = {f"features.{s}.{k}" for s in streams for k in _identity_fields()}
    have = {
        k
        for d in stage.deps
        if d.def_path == "params.yaml"
        for k in d.params
        if k.startswith("features.")
    }
    assert have == want, (
        f"{stage.addressing}: missing {sorted(want - have)}, extra {sorted(have - want)}"
    )


if __name__ == "__main__":
    for st in STAGES:
        print(st.addressing)
        for f in sorted(expected_code_deps(st.cmd)):
            print("  -", f)
