"""Tests for pipeline/datasets.py: official UCF101 / HMDB51 split files, folder and CSV adapters."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.datasets import (
    DatasetError,
    Manifest,
    csv_manifest,
    folder_manifest,
    hmdb51_manifest,
    read_manifest,
    safe_id,
    ucf101_manifest,
    write_manifest,
)

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
SPLITS = TESTDATA / "splits"


def _splits_dir(name: str) -> Path:
    path = SPLITS / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the official split files live in ../shared/testdata")
    return path


@pytest.fixture(scope="module")
def ucf(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("ucf") / "UCF-101"  # does not exist: files are not required
    return ucf101_manifest(root=root, splits_dir=_splits_dir("ucf101_splits"), splits=[1, 2, 3])


@pytest.fixture(scope="module")
def hmdb(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("hmdb") / "hmdb51"
    return hmdb51_manifest(root=root, splits_dir=_splits_dir("hmdb51_splits"), splits=[1, 2, 3])


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # empty: an adapter that opened videos would fail on these
    return path


def _roles(m: Manifest, split: str = "1") -> dict[str, str]:
    k = m.split_names.index(split)
    return {v.video_id: v.splits[k] for v in m.videos}


# ----------------------------------------------------------------------------- UCF101


def test_ucf101_split1_counts(ucf: Manifest) -> None:
    assert len(ucf.classes) == 101
    assert ucf.classes[0] == "ApplyEyeMakeup" and ucf.classes[-1] == "YoYo"
    assert len(ucf.subset("1", "train")) == 9537
    assert len(ucf.subset("1", "test")) == 3783
    assert ucf.subset("1", "unused") == []


def test_ucf101_splits_1_to_3_cover_every_video(ucf: Manifest) -> None:
    assert ucf.split_names == ("1", "2", "3")
    assert len(ucf.videos) == 13320
    for v in ucf.videos:
        assert set(v.splits) <= {"train", "test"}, v
    expected = {"1": (9537, 3783), "2": (9586, 3734), "3": (9624, 3696)}
    for split, (n_train, n_test) in expected.items():
        assert len(ucf.subset(split, "train")) == n_train
        assert len(ucf.subset(split, "test")) == n_test


def test_ucf101_records(ucf: Manifest) -> None:
    by_id = {v.video_id: v for v in ucf.videos}
    v = by_id["v_ApplyEyeMakeup_g08_c01"]
    assert v.label == 0 and v.group == "g08" and v.splits[0] == "train"
    assert v.path.is_absolute()
    assert v.path.parts[-2:] == ("ApplyEyeMakeup", "v_ApplyEyeMakeup_g08_c01.avi")
    # the lists spell the files "HandStandPushups", the class "HandstandPushups"
    hs = by_id["v_HandStandPushups_g01_c01"]
    assert ucf.classes[hs.label] == "HandstandPushups"
    assert all(len(v.group) == 3 and v.group.startswith("g") for v in ucf.videos)


def test_ucf101_split1_groups_disjoint(ucf: Manifest) -> None:
    train = {v.group for v in ucf.subset("1", "train")}
    test = {v.group for v in ucf.subset("1", "test")}
    assert not train & test
    assert test == {f"g{i:02d}" for i in range(1, 8)}  # the official split 1 tests groups 1-7


def test_ucf101_missing_split_file_names_it(tmp_path: Path) -> None:
    splits_dir = _splits_dir("ucf101_splits")
    with pytest.raises(DatasetError, match="trainlist04.txt"):
        ucf101_manifest(root=tmp_path, splits_dir=splits_dir, splits=[4])
    with pytest.raises(DatasetError, match="classInd.txt"):
        ucf101_manifest(root=tmp_path, splits_dir=tmp_path, splits=[1])


def _mini_ucf(tmp_path: Path, train_lines: list[str]) -> Path:
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 Archery\r\n2 HandstandPushups\r\n")
    (splits / "trainlist01.txt").write_text("".join(f"{line}\r\n" for line in train_lines))
    (splits / "testlist01.txt").write_text("handstandpushups/v_HandStandPushups_g01_c01.avi  \r\n")
    return splits


def test_ucf101_case_insensitive_classes_and_real_file_spelling(tmp_path: Path) -> None:
    splits = _mini_ucf(
        tmp_path,
        ["Archery/v_Archery_g08_c01.avi 1", "HandstandPushups/v_HandStandPushups_g08_c01.avi 2"],
    )
    root = tmp_path / "videos"
    real = _touch(root / "HandstandPushups" / "v_HandStandPushups_g01_c01.avi")
    m = ucf101_manifest(root=root, splits_dir=splits, splits=[1])
    by_id = {v.video_id: v for v in m.videos}
    test_video = by_id["v_HandStandPushups_g01_c01"]
    assert test_video.label == 1 and test_video.splits == ("test",) and test_video.group == "g01"
    assert test_video.path == real.absolute()  # the list's "handstandpushups" folder, on disk
    assert (
        by_id["v_Archery_g08_c01"].path == (root / "Archery" / "v_Archery_g08_c01.avi").absolute()
    )


def test_ucf101_label_disagreeing_with_folder_names_file_and_line(tmp_path: Path) -> None:
    splits = _mini_ucf(
        tmp_path, ["Archery/v_Archery_g08_c01.avi 1", "Archery/v_Archery_g08_c02.avi 2"]
    )
    with pytest.raises(DatasetError, match=r"trainlist01\.txt:2: label '2' disagrees"):
        ucf101_manifest(root=tmp_path, splits_dir=splits, splits=[1])


# ----------------------------------------------------------------------------- HMDB51


def test_hmdb51_split1_counts(hmdb: Manifest) -> None:
    assert len(hmdb.classes) == 51
    assert list(hmdb.classes) == sorted(hmdb.classes)
    assert len(hmdb.subset("1", "train")) == 3570
    assert len(hmdb.subset("1", "test")) == 1530
    assert len(hmdb.subset("1", "unused")) == 1666
    for split in ("2", "3"):
        assert len(hmdb.subset(split, "train")) == 3570
        assert len(hmdb.subset(split, "test")) == 1530


def test_hmdb51_records(hmdb: Manifest) -> None:
    v = next(v for v in hmdb.videos if v.path.name == "April_09_brush_hair_u_nm_np1_ba_goo_0.avi")
    assert hmdb.classes[v.label] == "brush_hair"
    assert v.path.parent.name == "brush_hair" and v.group == ""
    assert v.splits[0] == "train"
    # names full of "!" and "[" still give safe, unique ids
    assert all(safe_id(x.video_id) == x.video_id for x in hmdb.videos)
    assert len({x.video_id for x in hmdb.videos}) == len(hmdb.videos) == 6766


def test_hmdb51_missing_split_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "run_test_split1.txt").write_text("a.avi 1\nb.avi 2\n")
    (tmp_path / "walk_test_split1.txt").write_text("c.avi 1\n")
    (tmp_path / "run_test_split2.txt").write_text("a.avi 2\nb.avi 1\n")
    with pytest.raises(DatasetError, match="walk_test_split2.txt"):
        hmdb51_manifest(root=tmp_path, splits_dir=tmp_path, splits=[1, 2])
    with pytest.raises(DatasetError, match=r"_test_split3\.txt"):
        hmdb51_manifest(root=tmp_path, splits_dir=tmp_path, splits=[3])


# ----------------------------------------------------------------------------- folder adapter


def _folder_tree(root: Path) -> None:
    for cls in ("walk", "jump", "run"):
        for g in range(1, 6):
            for c in range(1, 4):
                _touch(root / cls / f"v_{cls}_g{g:02d}_c{c:02d}.avi")


def test_folder_group_split_keeps_groups_apart_and_is_seeded(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    _touch(tmp_path / "run" / "notes.txt")  # not a video
    _touch(tmp_path / ".hidden" / "v_x_g01_c01.avi")  # not a class
    m = folder_manifest(root=tmp_path, group_pattern=r"_g(\d+)_", test_fraction=0.25, seed=0)
    assert m.classes == ("jump", "run", "walk") and m.split_names == ("1",)
    assert len(m.videos) == 45
    assert all(v.path.is_absolute() and v.path.suffix == ".avi" for v in m.videos)
    train = {v.group for v in m.subset("1", "train")}
    test = {v.group for v in m.subset("1", "test")}
    assert train and test and not train & test
    for label in range(3):
        roles = {v.splits[0] for v in m.videos if v.label == label}
        assert roles == {"train", "test"}
    again = folder_manifest(root=tmp_path, group_pattern=r"_g(\d+)_", test_fraction=0.25, seed=0)
    assert again == m
    splits_by_seed = {
        tuple(
            sorted(
                _roles(
                    folder_manifest(
                        root=tmp_path, group_pattern=r"_g(\d+)_", test_fraction=0.25, seed=s
                    )
                ).items()
            )
        )
        for s in range(6)
    }
    assert len(splits_by_seed) > 1  # the seed matters


def test_folder_stratified_split_without_pattern(tmp_path: Path) -> None:
    for cls, n in (("a", 10), ("b", 2), ("c", 1)):
        for i in range(n):
            _touch(tmp_path / cls / "sub" / f"{cls}{i}.mp4")  # recursive
    m = folder_manifest(root=tmp_path, group_pattern=None, test_fraction=0.2, seed=1)
    counts = {
        c: Counter(v.splits[0] for v in m.videos if m.classes[v.label] == c) for c in m.classes
    }
    assert counts["a"] == {"train": 8, "test": 2}
    assert counts["b"] == {"train": 1, "test": 1}
    assert counts["c"] == {"train": 1}
    assert all(v.group == "" for v in m.videos)


def test_folder_unmatched_file_is_named(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    odd = _touch(tmp_path / "walk" / "holiday.avi")
    with pytest.raises(DatasetError, match="holiday.avi") as err:
        folder_manifest(root=tmp_path, group_pattern=r"_g(\d+)_", test_fraction=0.25, seed=0)
    assert str(odd) in str(err.value)


def test_folder_duplicate_ids_name_both_paths(tmp_path: Path) -> None:
    a = _touch(tmp_path / "x" / "clip 1.avi")
    b = _touch(tmp_path / "y" / "clip_1.mp4")
    with pytest.raises(DatasetError, match="duplicate video_id") as err:
        folder_manifest(root=tmp_path, group_pattern=None, test_fraction=0.5, seed=0)
    assert str(a) in str(err.value) and str(b) in str(err.value)


# ----------------------------------------------------------------------------- CSV adapter


def test_csv_with_split_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "meta" / "videos.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "path,label,split,group\n"
        "clips/a.mp4,walk,train,s1\n"
        "clips/b.mp4,jump,TEST,s2\n"
        "/abs/c.mp4,walk,unused,\n"
    )
    m = csv_manifest(csv_path=csv_path, root=None, test_fraction=0.3, seed=0)
    assert m.classes == ("jump", "walk")
    by_id = {v.video_id: v for v in m.videos}
    assert by_id["a"].path == (tmp_path / "meta" / "clips" / "a.mp4").absolute()
    assert by_id["a"].splits == ("train",) and by_id["a"].label == 1 and by_id["a"].group == "s1"
    assert by_id["b"].splits == ("test",) and by_id["b"].label == 0
    assert by_id["c"].path == Path("/abs/c.mp4") and by_id["c"].splits == ("unused",)
    other_root = csv_manifest(csv_path=csv_path, root=tmp_path / "vids", test_fraction=0.3, seed=0)
    assert {v.video_id: v for v in other_root.videos}["a"].path == (
        tmp_path / "vids" / "clips" / "a.mp4"
    ).absolute()


def test_csv_without_split_column_splits_by_group(tmp_path: Path) -> None:
    rows = [
        f"{cls}/{cls}_{s}_{i}.avi,{cls},s{s}"
        for cls in ("b", "a")
        for s in range(5)
        for i in range(3)
    ]
    csv_path = tmp_path / "v.csv"
    csv_path.write_text("path,label,group\n" + "\n".join(rows) + "\n")
    m = csv_manifest(csv_path=csv_path, root=tmp_path, test_fraction=0.3, seed=7)
    assert m.classes == ("a", "b") and len(m.videos) == 30
    train = {v.group for v in m.subset("1", "train")}
    test = {v.group for v in m.subset("1", "test")}
    assert train and test and not train & test
    assert m == csv_manifest(csv_path=csv_path, root=tmp_path, test_fraction=0.3, seed=7)

    plain = tmp_path / "plain.csv"
    plain.write_text("path,label\n" + "\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    m2 = csv_manifest(csv_path=plain, root=tmp_path, test_fraction=0.3, seed=7)
    for label in range(2):
        roles = Counter(v.splits[0] for v in m2.videos if v.label == label)
        assert roles == {"train": 10, "test": 5}  # stratified: round(15 * 0.3) = 5 per class


def test_csv_bad_label_row_names_file_and_line(tmp_path: Path) -> None:
    csv_path = tmp_path / "v.csv"
    csv_path.write_text("path,label\na.avi,walk\nb.avi,  \n")
    with pytest.raises(DatasetError, match=rf"^{csv_path}:3: empty label"):
        csv_manifest(csv_path=csv_path, root=None, test_fraction=0.3, seed=0)
    csv_path.write_text("path,label,split\na.avi,walk,val\n")
    with pytest.raises(DatasetError, match=rf"^{csv_path}:2: split 'val'"):
        csv_manifest(csv_path=csv_path, root=None, test_fraction=0.3, seed=0)
    csv_path.write_text("file,label\na.avi,walk\n")
    with pytest.raises(DatasetError, match=rf"^{csv_path}:1: header"):
        csv_manifest(csv_path=csv_path, root=None, test_fraction=0.3, seed=0)


def test_manifest_round_trip_official(hmdb: Manifest, tmp_path: Path) -> None:
    path = tmp_path / "hmdb.csv"
    write_manifest(hmdb, path)
    assert read_manifest(path) == hmdb
