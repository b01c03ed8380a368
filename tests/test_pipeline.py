"""The whole DVC DAG on a tiny demo: `dvc repro` completes, and changing a head's parameter
re-runs that head's training (and fusion/evaluation), never the extraction."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from dvc_project import copy_project, run

EXTRACTION = ("prepare", "decode", "flow", "features@rgb", "features@flow")

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run(args, cwd)


@pytest.fixture(scope="module")
def project(tiny_repro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tiny_repro, tmp_path_factory.mktemp("proj") / "proj")


def test_repro_produces_metrics_for_every_head_stream_and_fusion(project: Path) -> None:
    m = json.loads((project / "data/evaluate/metrics.json").read_text())
    assert set(m["streams"]) == {"mean_pool", "lstm"}
    for head in ("mean_pool", "lstm"):
        joint = {"rgb+flow"} if head == "mean_pool" else set()
        assert set(m["streams"][head]) == {"rgb", "flow", *joint}
        assert set(m["fusion"][head]) == {"sum", "product", "weighted", "svm", "learned"}
        for acc in [*m["streams"][head].values(), *m["fusion"][head].values()]:
            assert 0.0 <= acc["top1"] <= acc["top5"] <= 1.0 and acc["n"] == 6
    assert (project / "data/evaluate/confusion.png").stat().st_size > 1000
    groups = m["class_groups"]["lstm/rgb"]
    assert set(groups) == {"motion-only", "order-only", "appearance-only"}
    table = (project / "data/evaluate/results.md").read_text()
    assert "| lstm | fused: svm |" in table and "order-only" in table.splitlines()[0]
    assert _status(project) == set()


def _status(project: Path) -> set[str]:
    out = _run(["dvc", "status", "--json"], project).stdout
    return set(json.loads(out or "{}"))


def test_head_param_change_reruns_only_that_head(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["heads"]["lstm"]["hidden"] = 24
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _status(project)
    assert {"train@lstm-rgb", "train@lstm-flow"} <= changed
    assert changed <= {"train@lstm-rgb", "train@lstm-flow", "fuse", "evaluate"}
    _run(["git", "checkout", "params.yaml"], project)
    assert _status(project) == set()


def test_a_joint_setting_reruns_only_the_joint_stage(project: Path) -> None:
    """joint.<head> is the joint stage's: the same head's per-stream stages stay up to date."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["joint"]["mean_pool"] = {"dropout": 0.25}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert _status(project) == {"train_joint@mean_pool"}
    finally:
        _run(["git", "checkout", "params.yaml"], project)
    assert _status(project) == set()


@pytest.mark.parametrize(
    ("edited", "marked"),
    [
        ("pipeline/heads/lstm.py", {"train@lstm-rgb", "train@lstm-flow"}),
        ("pipeline/fusion.py", {"fuse"}),
        ("pipeline/inputs.py", {"features@rgb", "features@flow"}),
    ],
)
def test_editing_one_file_marks_only_the_stages_that_run_it(
    project: Path, edited: str, marked: set[str]
) -> None:
    """dvc.yaml's deps are each stage's import closure (tests/test_deps.py), and a train stage
    imports only its own head: editing lstm.py marks the lstm stages and no other."""
    with (project / edited).open("a") as fh:
        fh.write("\n# an edit\n")
    try:
        assert _status(project) == marked
    finally:
        _run(["git", "checkout", edited], project)
    assert _status(project) == set()


def test_exp_run_set_param_skips_extraction(project: Path) -> None:
    feats = project / "data/features/rgb/cache"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in feats.iterdir())
    out = _run(["dvc", "exp", "run", "-S", "heads.lstm.hidden=20"], project)
    text = out.stdout + out.stderr
    ran = {line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")}
    assert {"train@lstm-rgb", "train@lstm-flow"} <= ran
    assert not ran & set(EXTRACTION), f"extraction re-ran: {ran}"
    assert not ran & {"train@mean_pool-rgb", "train@mean_pool-flow"}
    assert sorted((p.name, p.stat().st_mtime_ns) for p in feats.iterdir()) == before


def test_forced_retrain_leaves_dvc_lock_and_downstream_stages_as_they_were(project: Path) -> None:
    """A train stage re-run on the same inputs writes the same bytes (no timings in its output,
    tests/test_reproducible.py), so DVC records the same hash: dvc.lock does not change, and
    fuse and evaluate are not marked for a re-run."""
    lock = (project / "dvc.lock").read_bytes()
    assert _status(project) == set()
    _run(["dvc", "repro", "--force", "--single-item", "train@mean_pool-rgb"], project)
    assert _status(project) == set()
    assert (project / "dvc.lock").read_bytes() == lock
