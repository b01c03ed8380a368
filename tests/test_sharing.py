"""Team sharing through a DVC remote (README "Sharing caches"): every metric, plot and output
dvc.yaml declares reaches a teammate, through git or through DVC's cache. A reproduced project
pushed to a local remote, cloned to another path and pulled is up to date (``dvc status``
clean, ``dvc repro`` runs no stage); a teammate's change of one head setting then re-runs only
that head's train stages, fuse and evaluate; queued experiments run two at a time, each running
only the stages its change touches."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from dvc_project import copy_project, run

ROOT = Path(__file__).resolve().parents[1]


def _declared_outputs(dvc_yaml: dict) -> list[tuple[str, str, bool]]:
    """(stage, path, cached) of every out, metric and plot file of every stage in dvc.yaml
    (a templated path is left as written: only its cache flag matters here)."""
    found = []
    for stage, body in dvc_yaml["stages"].items():
        body = body.get("do", body)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                found.append((stage, path, (opts or {}).get("cache", True)))
    return found


def test_every_uncached_output_is_tracked_by_git() -> None:
    # an output DVC does not cache reaches a clone only through git: it must not be ignored
    outputs = _declared_outputs(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    uncached = [path for _, path, cached in outputs if not cached]
    if not uncached:
        return
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *uncached], cwd=ROOT, capture_output=True, text=True
    )
    ignored = proc.stdout.split()
    assert not ignored, (
        f"dvc.yaml declares {ignored} with cache: false, and .gitignore ignores them: a "
        "teammate's clone gets them from neither git nor a DVC remote, so dvc repro re-runs "
        "their stage"
    )


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


@pytest.fixture(scope="module")
def shared(tiny_repro: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the project, pushed to a local remote; a git clone of it at another path, pulled)."""
    base = tmp_path_factory.mktemp("share")
    proj = copy_project(tiny_repro, base / "proj")
    remote = base / "remote"
    run(["dvc", "remote", "add", "-d", "store", str(remote)], proj)
    run(["dvc", "push"], proj)
    clone = base / "elsewhere" / "clone"
    clone.parent.mkdir()
    run(["git", "clone", "-q", str(proj), str(clone)], base)
    run(["dvc", "remote", "add", "-d", "store", str(remote)], clone)
    run(["dvc", "pull"], clone)
    return proj, clone


@pytest.mark.slow
def test_a_pulled_clone_is_up_to_date(shared: tuple[Path, Path]) -> None:
    _, clone = shared
    status = run(["dvc", "status"], clone).stdout
    assert "Data and pipelines are up to date" in status, status
    log = run(["dvc", "repro"], clone).stdout
    assert not _ran(log), log[-3000:]


@pytest.mark.slow
def test_a_teammates_head_change_reruns_that_head_only(shared: tuple[Path, Path]) -> None:
    _, clone = shared
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["heads"]["lstm"]["hidden"] = 8  # tiny_params: 16
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = run(["dvc", "repro"], clone).stdout
    assert _ran(log) == {"train@lstm-rgb", "train@lstm-flow", "fuse", "evaluate"}, log[-3000:]


@pytest.mark.slow
def test_queued_experiments_run_in_parallel_without_recomputing_features(
    shared: tuple[Path, Path],
) -> None:
    # `dvc exp run --queue` + `dvc queue start -j 2` (README "Sharing caches"): each
    # experiment runs in its own copy of the project, its outputs checked out from the DVC
    # cache (persist outputs included), so it runs only the stages its change touches
    proj, _ = shared
    for name, confusion in (("q1", "lstm/rgb"), ("q2", "mean_pool/flow")):
        run(
            ["dvc", "exp", "run", "--queue", "-S", f"evaluate.confusion={confusion}", "-n", name],
            proj,
        )
    run(["dvc", "queue", "start", "-j", "2"], proj)
    try:
        deadline = time.monotonic() + 240
        while True:
            status = run(["dvc", "queue", "status"], proj).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            assert time.monotonic() < deadline, f"the queue did not finish:\n{status}"
            time.sleep(1)
    finally:
        run(["dvc", "queue", "stop"], proj, check=False)
    for name in ("q1", "q2"):
        assert re.search(rf"\b{name}\s+\S+ \S+\s+Success", status), status
        assert _ran(run(["dvc", "queue", "logs", name], proj).stdout) == {"evaluate"}
