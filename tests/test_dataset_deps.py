"""DVC sees the dataset: prepare stops, run by DVC, unless dvc.yaml lists the dataset's files
among its deps (pipeline/dataset_deps.py), and a prepare run after videos were added, changed
or removed probes only those (pipeline/probe_memo.py). On a real DVC project: adding a video
to a folder dataset makes ``dvc status`` report prepare, and ``dvc repro`` computes that one
video in prepare and flow (the features stages resume as flow does)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from dvc_project import copy_project, run

import pipeline.preparation
from pipeline.config import DatasetConfig
from pipeline.dataset_deps import DepsError, check_declared
from pipeline.demo import render, write_video
from pipeline.manifest import read_manifest
from stages import prepare


def _clip(path: Path, seed: int) -> None:
    bg = np.full((32, 32, 3), 60.0 + seed)
    write_video(path, render("motion_left", np.random.default_rng(seed), bg, 8), 25)


def _dvc_yaml(tmp_path: Path, deps: list[str]) -> Path:
    path = tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump({"stages": {"prepare": {"cmd": "x", "deps": deps}}}))
    return path


# ----------------------------------------------------------------------------- declared deps


def test_a_folder_dataset_under_no_dependency_stops_naming_the_setting_and_the_line(
    tmp_path: Path,
) -> None:
    cfg = DatasetConfig(name="folder", root=str(tmp_path / "videos"))
    dvc_yaml = _dvc_yaml(tmp_path, ["stages/prepare.py", "pipeline/config.py"])
    with pytest.raises(DepsError) as e:
        check_declared(cfg, [tmp_path / "videos/a/x.avi"], dvc_yaml=dvc_yaml)
    assert "dataset.root" in str(e.value)
    assert f"\n      - {tmp_path / 'videos'}" in str(e.value)


def test_ucf101_needs_both_its_videos_and_its_split_lists(tmp_path: Path) -> None:
    cfg = DatasetConfig(
        name="ucf101", root=str(tmp_path / "UCF-101"), splits_dir=str(tmp_path / "lists")
    )
    only_videos = _dvc_yaml(tmp_path, ["UCF-101"])  # relative to dvc.yaml's folder
    with pytest.raises(DepsError, match=r"dataset\.splits_dir"):
        check_declared(cfg, [], dvc_yaml=only_videos)
    # a parent folder covers both; a dep given as {path: options} counts too
    check_declared(
        cfg, [tmp_path / "UCF-101/A/v.avi"], dvc_yaml=_dvc_yaml(tmp_path, [str(tmp_path)])
    )
    both = _dvc_yaml(tmp_path, [{"UCF-101": {}}, "lists"])
    check_declared(cfg, [tmp_path / "UCF-101/A/v.avi"], dvc_yaml=both)


def test_a_csv_video_outside_every_dependency_is_named(tmp_path: Path) -> None:
    cfg = DatasetConfig(name="csv", csv=str(tmp_path / "k/list.csv"), root=str(tmp_path / "k"))
    dvc_yaml = _dvc_yaml(tmp_path, ["k"])
    check_declared(cfg, [tmp_path / "k/train/a.mp4"], dvc_yaml=dvc_yaml)
    # "k2" starts with "k" but is not under it
    with pytest.raises(DepsError, match=r"1 video\(s\) of the listing, e\.g\. .*k2/b\.mp4"):
        check_declared(cfg, [tmp_path / "k/train/a.mp4", tmp_path / "k2/b.mp4"], dvc_yaml=dvc_yaml)


def test_the_demo_needs_no_dataset_dependency(tmp_path: Path) -> None:
    demo_video = tmp_path / "data/prepare/demo/videos/a/v.avi"
    check_declared(DatasetConfig(name="demo"), [demo_video], dvc_yaml=_dvc_yaml(tmp_path, ["x.py"]))


def test_prepare_checks_the_deps_only_when_dvc_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert prepare.dvc_yaml_running() is None
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "train@lstm-rgb")
    assert prepare.dvc_yaml_running() is None
    monkeypatch.setenv("DVC_STAGE", "prepare")
    assert prepare.dvc_yaml_running() == tmp_path / "dvc.yaml"


# ----------------------------------------------------------------------------- probe memo


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    for c, cls in enumerate("ab"):
        for k in range(3):
            _clip(root / cls / f"clip_{k}.avi", seed=10 * c + k)
    return root


def _probed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names ("a/clip_0.avi") of the files probe_file is called on from now."""
    real, calls = pipeline.preparation.probe_file, []

    def counted(path: Path) -> object:
        calls.append(Path(path).relative_to(Path(path).parents[1]).as_posix())
        return real(path)

    monkeypatch.setattr(pipeline.preparation, "probe_file", counted)
    return calls


def test_a_second_run_probes_only_the_videos_added_or_changed(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DatasetConfig(name="folder", root=str(folder), test_fraction=0.5, probe_workers=1)
    out = tmp_path / "data" / "prepare"
    calls = _probed(monkeypatch)
    prepare.main(cfg, out)
    assert len(calls) == 6
    assert not (out / "journal").exists()  # the output holds no history
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv", "manifest.csv", "probe.csv"]

    calls.clear()
    _clip(folder / "b" / "clip_9.avi", seed=99)  # added
    _clip(folder / "a" / "clip_1.avi", seed=77)  # changed: other bytes
    (folder / "a" / "clip_2.avi").unlink()  # removed
    counts = prepare.main(cfg, out)
    assert sorted(calls) == ["a/clip_1.avi", "b/clip_9.avi"]
    assert (counts.done, counts.skipped, counts.failed) == (2, 4, 0)

    # the outputs are those of a fresh run on the dataset as it is now
    fresh = tmp_path / "fresh" / "prepare"
    prepare.main(cfg, fresh)
    for name in ("manifest.csv", "probe.csv", "failures.csv"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    ids = [v.video_id for v in read_manifest(out / "manifest.csv").videos]
    assert "a/clip_2" not in ids and "b/clip_9" in ids


def test_the_memo_keeps_no_failure_and_no_video_of_other_code(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (folder / "a" / "broken.avi").write_text("not a video\n")
    cfg = DatasetConfig(name="folder", root=str(folder), test_fraction=0.5, probe_workers=1)
    out = tmp_path / "prepare"
    prepare.main(cfg, out)
    calls = _probed(monkeypatch)
    prepare.main(cfg, out)
    assert calls == ["a/broken.avi"]  # a failure may be transient: tried again
    calls.clear()
    monkeypatch.setattr(pipeline.preparation, "_code", lambda: "other code")
    prepare.main(cfg, out)
    assert len(calls) == 7


# ----------------------------------------------------------------------------- on DVC


@pytest.fixture(scope="module")
def folder_project(tiny_repro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project with a folder dataset in ``videos/``: 3 demo videos of each of 2
    classes (few, so that the first repro, which computes them all, stays short)."""
    proj = copy_project(tiny_repro, tmp_path_factory.mktemp("deps") / "proj")
    demo = proj / "data/prepare/demo/videos"
    for cls in sorted(p.name for p in demo.iterdir())[:2]:
        (proj / "videos" / cls).mkdir(parents=True)
        for clip in sorted((demo / cls).iterdir())[:3]:
            shutil.copy(clip, proj / "videos" / cls / clip.name)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["dataset"].update(name="folder", root="videos")
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


def _counts(log: str, stage: str) -> tuple[int, int]:
    """(done, already done) that ``stage`` logged in a dvc repro's output."""
    m = re.search(rf"{stage}: (\d+) done, (\d+) already done", log)
    assert m, f"{stage} logged no counts:\n{log[-3000:]}"
    return int(m[1]), int(m[2])


@pytest.mark.slow
def test_dvc_sees_a_video_added_to_a_folder_dataset(folder_project: Path) -> None:
    proj = folder_project
    targets = ["flow"]  # prepare, decode, flow: the features stages resume as flow does
    refused = run(["dvc", "repro", *targets], proj, check=False)
    assert refused.returncode != 0
    assert "dataset.root" in refused.stdout + refused.stderr

    dvc_yaml = proj / "dvc.yaml"
    text = dvc_yaml.read_text()
    text = text.replace(
        "    params:\n      - dataset\n", "      - videos\n    params:\n      - dataset\n", 1
    )
    dvc_yaml.write_text(text)
    run(["dvc", "repro", *targets], proj)
    assert "up to date" in run(["dvc", "status", *targets], proj).stdout
    again = run(["dvc", "repro", *targets], proj).stdout
    assert "Running stage" not in again

    _clip(proj / "videos" / sorted(p.name for p in (proj / "videos").iterdir())[0] / "new.avi", 5)
    assert "up to date" not in run(["dvc", "status"], proj).stdout
    status = run(["dvc", "status", "prepare"], proj).stdout
    assert "prepare:" in status and "videos" in status
    log = run(["dvc", "repro", *targets], proj)
    text = log.stdout + log.stderr
    # the new video alone is probed, its frames checked and its flow computed
    assert _counts(text, "prepare") == (1, 6)
    assert _counts(text, "decode") == (1, 6)
    assert _counts(text, "flow") == (1, 6)
    assert "up to date" in run(["dvc", "status", *targets], proj).stdout
