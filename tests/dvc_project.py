"""A tiny copy of this project with its DVC DAG reproduced once per test session: the demo at 32
px with two cheap heads (and one joint head), for the tests that run DVC itself (the DAG, the
re-run rules, sharing through a remote, predicting with what a repro trained). Each test module
takes its own copy (``copy_project``), so what one changes (params, a remote, an experiment)
never reaches another."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``args`` (dvc, git) in ``cwd`` with this interpreter's bin first on PATH; with
    ``check`` a failure fails the test showing the output's tails."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["DVC_NO_ANALYTICS"] = "1"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def tiny_params(p: dict) -> dict:
    """params.yaml made tiny: 24 demo videos of 12 frames at 32 px, resnet18 without weights,
    Farneback flow, mean_pool and lstm per stream and mean_pool joint, 3 epochs."""
    p["run"].update(heads=["mean_pool", "lstm"], joint_heads=["mean_pool"])
    p["dataset"]["demo"].update(videos_per_class=4, frames=12, size=32)
    p["dataset"]["probe_workers"] = 1
    p["decode"].update(num_frames=8, flow_pairs=2, short_side=32, workers=1)
    p["flow"].update(algorithm="farneback", workers=1)
    for s in ("rgb", "flow"):
        p["features"][s].update(backbone="resnet18", weights="none", crop=32, threads=1)
    p["train"].update(oof_folds=2, threads=1)
    for h in p["heads"].values():
        h["epochs"] = 3
    p["heads"]["lstm"]["hidden"] = 16
    p["fusion"]["svm_folds"] = 2
    return p


def build_project(proj: Path) -> Path:
    """The project's DVC files, code and tiny params in ``proj``, a git repo with DVC, its DAG
    reproduced and committed -> ``proj``."""
    proj.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, proj / name)
    for pkg in ("pipeline", "stages"):
        shutil.copytree(ROOT / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], proj)
    run(["git", "config", "user.email", "t@t.invalid"], proj)
    run(["git", "config", "user.name", "t"], proj)
    run(["dvc", "init", "-q"], proj)
    run(["dvc", "repro"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "tiny"], proj)
    return proj


def copy_project(src: Path, dest: Path) -> Path:
    """A full copy of a built project (git history, DVC cache, data/) at ``dest``."""
    shutil.copytree(src, dest, symlinks=True)
    return dest
