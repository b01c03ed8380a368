"""Tests for pipeline/datasets.py: official UCF101 / HMDB51 split files, folder and CSV adapters."""

from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from pipeline.datasets import (
    DatasetError,
    Listing,
    Manifest,
    csv_manifest,
    folder_manifest,
    hmdb51_manifest,
    read_manifest,
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
    listing = ucf101_manifest(root=root, splits_dir=_splits_dir("ucf101_splits"), splits=[1, 2, 3])
    assert listing.rejected == ()
    return listing.manifest


@pytest.fixture(scope="module")
def hmdb(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("hmdb") / "hmdb51"
    listing = hmdb51_manifest(root=root, splits_dir=_splits_dir("hmdb51_splits"), splits=[1, 2, 3])
    assert listing.rejected == ()
    return listing.manifest


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # empty: an adapter that opened videos would fail on these
    return path


def _manifest(listing: Listing) -> Manifest:
    """The manifest of an adapter that left nothing out."""
    assert listing.rejected == (), listing.rejected
    return listing.manifest


# The rule ids were made by before they became paths: every character outside [A-Za-z0-9_.-]
# as "_". UCF101 and HMDB51 ids must still follow it, or their existing caches would be lost.
_OLD_ID = re.compile(r"[^A-Za-z0-9_.-]")


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
    # ids are file names, as before ids were paths: existing caches keep their entries
    assert all(v.video_id == _OLD_ID.sub("_", v.path.stem) for v in ucf.videos)


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
    m = _manifest(ucf101_manifest(root=root, splits_dir=splits, splits=[1]))
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


def test_ucf101_a_video_listed_twice_is_one_rejection_and_the_rest_goes_on(tmp_path: Path) -> None:
    splits = _mini_ucf(
        tmp_path,
        [
            "Archery/v_Archery_g08_c01.avi 1",
            "Archery/v_Archery_g08_c02.avi 1",
            "Archery/v_Archery_g08_c01.avi 1",  # again, in the same split
            "HandstandPushups/v_Archery_g09_c01.avi 2",  # one name in two class folders
            "Archery/v_Archery_g09_c01.avi 1",
        ],
    )
    listing = ucf101_manifest(root=tmp_path / "videos", splits_dir=splits, splits=[1])
    assert sorted(v.video_id for v in listing.manifest.videos) == [
        "v_Archery_g08_c02",
        "v_HandStandPushups_g01_c01",
    ]
    twice, clash = listing.rejected
    assert twice.video_id == "v_Archery_g08_c01" and len(twice.paths) == 2
    assert "the same file listed more than once" in twice.reason
    assert "trainlist01.txt:1" in twice.reason and "trainlist01.txt:3" in twice.reason
    assert clash.video_id == "v_Archery_g09_c01"
    assert "different files that give one id" in clash.reason
    for path in clash.paths:
        assert str(path) in clash.reason
    assert {p.parent.name for p in clash.paths} == {"Archery", "HandstandPushups"}


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
    # names full of "!" and "[" give the ids they always had (existing caches stay valid)
    assert all(x.video_id == _OLD_ID.sub("_", x.path.stem) for x in hmdb.videos)
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
    m = _manifest(
        folder_manifest(root=tmp_path, group_pattern=r"_g(\d+)_", test_fraction=0.25, seed=0)
    )
    assert m.classes == ("jump", "run", "walk") and m.split_names == ("1",)
    assert len(m.videos) == 45
    assert {v.video_id for v in m.videos if v.label == 0} == {
        f"jump/v_jump_g{g:02d}_c{c:02d}" for g in range(1, 6) for c in range(1, 4)
    }
    assert all(v.path.is_absolute() and v.path.suffix == ".avi" for v in m.videos)
    train = {v.group for v in m.subset("1", "train")}
    test = {v.group for v in m.subset("1", "test")}
    assert train and test and not train & test
    for label in range(3):
        roles = {v.splits[0] for v in m.videos if v.label == label}
        assert roles == {"train", "test"}
    again = folder_manifest(root=tmp_path, group_pattern=r"_g(\d+)_", test_fraction=0.25, seed=0)
    assert again.manifest == m
    splits_by_seed = {
        tuple(
            sorted(
                _roles(
                    folder_manifest(
                        root=tmp_path, group_pattern=r"_g(\d+)_", test_fraction=0.25, seed=s
                    ).manifest
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
    m = _manifest(folder_manifest(root=tmp_path, group_pattern=None, test_fraction=0.2, seed=1))
    assert "a/sub/a0" in {v.video_id for v in m.videos}
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


def test_folder_names_that_made_one_id_now_make_distinct_ids(tmp_path: Path) -> None:
    """One name in two class folders, names that differed only in characters the old ids
    replaced with "_", and Cyrillic names (all "___01" before) are distinct videos."""
    for rel in (
        "walking/clip_01.avi",
        "running/clip_01.avi",
        "walking/clip 1.avi",
        "walking/clip_1.mp4",
        "running/бег_01.avi",
        "walking/ход_01.avi",
        "бег/бег_01.avi",
    ):
        _touch(tmp_path / rel)
    m = _manifest(folder_manifest(root=tmp_path, group_pattern=None, test_fraction=0.5, seed=0))
    assert sorted(v.video_id for v in m.videos) == sorted(
        [
            "walking/clip_01",
            "running/clip_01",
            "walking/clip 1",
            "walking/clip_1",
            "running/бег_01",
            "walking/ход_01",
            "бег/бег_01",
        ]
    )


def test_folder_ids_that_still_collide_are_one_rejection_naming_both(tmp_path: Path) -> None:
    """Two files whose paths differ only in the extension, or only in Unicode normalisation,
    give one id: that id is left out as one rejection naming both files, the rest go on."""
    a = _touch(tmp_path / "x" / "clip.avi")
    b = _touch(tmp_path / "x" / "clip.mp4")
    nfc = _touch(tmp_path / "y" / unicodedata.normalize("NFC", "café.avi"))
    nfd = _touch(tmp_path / "y" / unicodedata.normalize("NFD", "café.avi"))
    _touch(tmp_path / "x" / "other.avi")
    _touch(tmp_path / "y" / "other.avi")
    listing = folder_manifest(root=tmp_path, group_pattern=None, test_fraction=0.5, seed=0)
    assert sorted(v.video_id for v in listing.manifest.videos) == ["x/other", "y/other"]
    ext, norm = listing.rejected
    assert ext.video_id == "x/clip" and set(ext.paths) == {a, b}
    assert str(a) in ext.reason and str(b) in ext.reason and "extension" in ext.reason
    assert norm.video_id == "y/café" and set(norm.paths) == {nfc, nfd}
    assert "NFC" in norm.reason


def test_folder_file_name_that_is_not_utf8_is_left_out(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        _touch(tmp_path / cls / "ok.avi")
    try:
        fd = os.open(os.fsencode(tmp_path / "a") + b"/caf\xe9.avi", os.O_CREAT | os.O_WRONLY)
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8")
    os.close(fd)
    listing = folder_manifest(root=tmp_path, group_pattern=None, test_fraction=0.5, seed=0)
    assert sorted(v.video_id for v in listing.manifest.videos) == ["a/ok", "b/ok"]
    (bad,) = listing.rejected
    assert bad.video_id == "a/caf%E9" and "caf\\xe9.avi: file name is not UTF-8" in bad.reason
    bad.reason.encode("utf-8")  # writable into failures.csv


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
    m = _manifest(csv_manifest(csv_path=csv_path, root=None, test_fraction=0.3, seed=0))
    assert m.classes == ("jump", "walk")
    by_id = {v.video_id: v for v in m.videos}
    a, b = by_id["clips/a"], by_id["clips/b"]
    assert a.path == (tmp_path / "meta" / "clips" / "a.mp4").absolute()
    assert a.splits == ("train",) and a.label == 1 and a.group == "s1"
    assert b.splits == ("test",) and b.label == 0
    # outside the root: the absolute path less its leading "/"
    assert by_id["abs/c"].path == Path("/abs/c.mp4") and by_id["abs/c"].splits == ("unused",)
    other_root = csv_manifest(csv_path=csv_path, root=tmp_path / "vids", test_fraction=0.3, seed=0)
    assert {v.video_id: v for v in other_root.manifest.videos}["clips/a"].path == (
        tmp_path / "vids" / "clips" / "a.mp4"
    ).absolute()


def test_csv_rows_that_give_one_id_are_one_rejection(tmp_path: Path) -> None:
    """A file listed twice (even spelled differently), or two files that differ only in the
    extension: each is one rejection naming every row, and the other rows go on."""
    csv_path = tmp_path / "v.csv"
    csv_path.write_text(
        "path,label\n"
        "walking/clip_01.avi,walk\n"
        "running/clip_01.avi,run\n"
        "walking/clip_02.avi,walk\n"
        "./walking/clip_01.avi,walk\n"
        "running/x.avi,run\n"
        "running/x.mp4,run\n"
        f"{tmp_path}/running/y.avi,run\n"
        "running/y.avi,run\n"
        "бег_01.avi,run\n"
        "ход_01.avi,walk\n",
        encoding="utf-8",
    )
    listing = csv_manifest(csv_path=csv_path, root=None, test_fraction=0.5, seed=0)
    ids = sorted(v.video_id for v in listing.manifest.videos)
    assert ids == ["running/clip_01", "walking/clip_02", "бег_01", "ход_01"]
    by_id = {r.video_id: r for r in listing.rejected}
    assert set(by_id) == {"walking/clip_01", "running/x", "running/y"}
    assert f"{csv_path}:2" in by_id["walking/clip_01"].reason
    assert f"{csv_path}:5" in by_id["walking/clip_01"].reason
    assert "the same file listed more than once" in by_id["walking/clip_01"].reason
    assert "extension" in by_id["running/x"].reason
    assert {p.name for p in by_id["running/x"].paths} == {"x.avi", "x.mp4"}
    assert "the same file listed more than once" in by_id["running/y"].reason
    for r in listing.rejected:
        for p in r.paths:
            assert str(p) in r.reason


def test_csv_without_split_column_splits_by_group(tmp_path: Path) -> None:
    rows = [
        f"{cls}/{cls}_{s}_{i}.avi,{cls},s{s}"
        for cls in ("b", "a")
        for s in range(5)
        for i in range(3)
    ]
    csv_path = tmp_path / "v.csv"
    csv_path.write_text("path,label,group\n" + "\n".join(rows) + "\n")
    m = _manifest(csv_manifest(csv_path=csv_path, root=tmp_path, test_fraction=0.3, seed=7))
    assert m.classes == ("a", "b") and len(m.videos) == 30
    train = {v.group for v in m.subset("1", "train")}
    test = {v.group for v in m.subset("1", "test")}
    assert train and test and not train & test
    assert m == csv_manifest(csv_path=csv_path, root=tmp_path, test_fraction=0.3, seed=7).manifest

    plain = tmp_path / "plain.csv"
    plain.write_text("path,label\n" + "\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    m2 = _manifest(csv_manifest(csv_path=plain, root=tmp_path, test_fraction=0.3, seed=7))
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
