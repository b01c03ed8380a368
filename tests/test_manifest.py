"""Tests for pipeline/manifest.py: records, the splitter and manifest storage."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.manifest import (
    DatasetError,
    Manifest,
    VideoRecord,
    read_manifest,
    safe_id,
    split_train_test,
    write_manifest,
)

# ----------------------------------------------------------------------------- basics


def test_safe_id_replaces_every_unsafe_character() -> None:
    assert safe_id("v_ApplyEyeMakeup_g08_c01") == "v_ApplyEyeMakeup_g08_c01"
    assert safe_id("a b/c!d[é].x-y") == "a_b_c_d___.x-y"


def test_subset_and_without() -> None:
    root = Path("/data").absolute()
    videos = (
        VideoRecord(video_id="a", path=root / "a.avi", label=0, group="", splits=("train", "test")),
        VideoRecord(
            video_id="b", path=root / "b.avi", label=1, group="", splits=("test", "unused")
        ),
    )
    m = Manifest(classes=("x", "y"), split_names=("1", "2"), videos=videos)
    assert [v.video_id for v in m.subset("1", "train")] == ["a"]
    assert [v.video_id for v in m.subset("2", "unused")] == ["b"]
    smaller = m.without(["b", "not-there"])
    assert [v.video_id for v in smaller.videos] == ["a"]
    assert smaller.classes == ("x", "y")  # labels keep their meaning
    with pytest.raises(ValueError, match="unknown split"):
        m.subset("3", "train")


def test_manifest_rejects_duplicate_ids_naming_both_paths() -> None:
    root = Path("/data").absolute()
    a = VideoRecord(video_id="v", path=root / "x" / "v.avi", label=0, group="", splits=("train",))
    b = VideoRecord(video_id="v", path=root / "y" / "v.mp4", label=0, group="", splits=("test",))
    with pytest.raises(DatasetError) as err:
        Manifest(classes=("x",), split_names=("1",), videos=(a, b))
    assert str(a.path) in str(err.value) and str(b.path) in str(err.value)


# ----------------------------------------------------------------------------- splitter


def test_split_train_test_stratified() -> None:
    labels = [0] * 10 + [1] * 2 + [2]
    out = split_train_test(labels, None, test_fraction=0.3, seed=0)
    per_class = {
        y: Counter(o for o, lab in zip(out, labels, strict=True) if lab == y) for y in (0, 1, 2)
    }
    assert per_class[0] == {"train": 7, "test": 3}
    assert per_class[1] == {"train": 1, "test": 1}
    assert per_class[2] == {"train": 1}
    assert out == split_train_test(labels, None, test_fraction=0.3, seed=0)
    with pytest.raises(ValueError, match="test_fraction"):
        split_train_test(labels, None, test_fraction=1.0, seed=0)


def test_split_train_test_keeps_groups_apart() -> None:
    labels = [y for y in range(4) for _ in range(12)]
    groups = [f"s{i % 6}" for i in range(len(labels))]  # subjects shared across classes
    out = split_train_test(labels, groups, test_fraction=0.3, seed=3)
    test_groups = {g for g, o in zip(groups, out, strict=True) if o == "test"}
    train_groups = {g for g, o in zip(groups, out, strict=True) if o == "train"}
    assert test_groups and train_groups and not test_groups & train_groups
    assert 0.15 <= out.count("test") / len(out) <= 0.45


# ----------------------------------------------------------------------------- storage


def test_manifest_round_trip(tmp_path: Path) -> None:
    root = tmp_path.absolute()
    videos = (
        VideoRecord(
            video_id="a",
            path=root / 'we,ird "name".avi',
            label=2,
            group="g01",
            splits=("train", "test"),
        ),
        VideoRecord(
            video_id="b.x-1", path=root / "b.avi", label=0, group="", splits=("unused", "train")
        ),
    )
    m = Manifest(classes=("zeta", "alpha, beta", "gamma"), split_names=("1", "2"), videos=videos)
    path = tmp_path / "out" / "manifest.csv"
    write_manifest(m, path)
    back = read_manifest(path)
    assert back == m
    assert back.classes == ("zeta", "alpha, beta", "gamma")  # class 1 has no video but survives
    assert (
        path.read_text().splitlines()[1] == "video_id,path,label,label_name,group,split_1,split_2"
    )


def test_paths_inside_the_project_are_stored_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A video inside the working directory (the project, where DVC runs stages) is written
    relative to it and read back absolute against the reader's working directory; one outside
    is written absolute."""
    project, outside = tmp_path / "project", tmp_path / "elsewhere" / "c.avi"
    videos = (
        VideoRecord(
            video_id="a", path=project / "data" / "a.avi", label=0, group="", splits=("train",)
        ),
        VideoRecord(video_id="c", path=outside, label=0, group="", splits=("test",)),
    )
    (project / "data").mkdir(parents=True)
    monkeypatch.chdir(project)
    write_manifest(Manifest(classes=("x",), split_names=("1",), videos=videos), Path("m.csv"))
    rows = (project / "m.csv").read_text().splitlines()[2:]
    assert rows[0].split(",")[1] == "data/a.avi" and rows[1].split(",")[1] == str(outside)
    moved = tmp_path / "clone"
    (project / "m.csv").rename(tmp_path / "m.csv")
    moved.mkdir()
    monkeypatch.chdir(moved)
    back = read_manifest(tmp_path / "m.csv")
    assert [v.path for v in back.videos] == [moved / "data" / "a.avi", outside]


def test_read_manifest_rejects_tampered_label(tmp_path: Path) -> None:
    v = VideoRecord(
        video_id="a", path=tmp_path.absolute() / "a.avi", label=0, group="", splits=("train",)
    )
    path = tmp_path / "m.csv"
    write_manifest(Manifest(classes=("x", "y"), split_names=("1",), videos=(v,)), path)
    path.write_text(path.read_text().replace(",0,x,", ",1,x,"))
    with pytest.raises(DatasetError, match=rf"^{path}:3: label_name"):
        read_manifest(path)
