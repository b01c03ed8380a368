"""Tests for pipeline/manifest.py: records, the splitter and manifest storage."""

from __future__ import annotations

import random
import unicodedata
from collections import Counter
from pathlib import Path, PurePosixPath

import pytest

from pipeline.manifest import (
    DatasetError,
    Manifest,
    VideoRecord,
    id_problem,
    name_id,
    path_id,
    read_manifest,
    split_train_test,
    write_manifest,
)

# ----------------------------------------------------------------------------- ids


def test_path_id_is_the_readable_path_without_extension() -> None:
    assert path_id("walking/clip_01.avi") == "walking/clip_01"
    assert path_id("running/clip_01.avi") == "running/clip_01"
    assert path_id("бег_01.avi") == "бег_01" and path_id("ход_01.avi") == "ход_01"
    assert path_id(PurePosixPath("a b/c!d[é]/x.y-z.mp4")) == "a b/c!d[é]/x.y-z"
    assert path_id("e\u0301te\u0301.avi") == "\u00e9t\u00e9"  # NFC
    # escaped, not replaced: a control character, "%", a leading ".", white space at an end
    assert path_id("a\nb.avi") == "a%0Ab" and path_id("100%.avi") == "100%25"
    assert path_id(".hidden/x.avi") == "%2Ehidden/x" and path_id(" x /y.avi") == "%20x%20/y"
    assert path_id("x/\udce9.avi") == "x/%E9"  # a byte of a file name that is not UTF-8
    # a combining mark after an escape is escaped too: it would compose with the hex digit
    assert path_id("a\n\u0301.avi") == "a%0A%CC%81" and path_id(".\u0301x") == "%2E%CC%81x"
    for bad in ("/abs/x.avi", "../x.avi", "a/../../x.avi", ""):
        with pytest.raises(ValueError, match="not a relative path"):
            path_id(bad)


def test_name_id_keeps_the_official_ids() -> None:
    """UCF101 and HMDB51 ids are what they have always been, so their caches stay valid."""
    assert name_id("v_ApplyEyeMakeup_g08_c01") == "v_ApplyEyeMakeup_g08_c01"
    assert (
        name_id("(Rad)Schlag_die_Bank!_cartwheel_f_cm_np1_le_med_0")
        == "_Rad_Schlag_die_Bank__cartwheel_f_cm_np1_le_med_0"
    )
    assert name_id("бег_01") == "бег_01" and name_id("ход_01") == "ход_01"
    assert name_id("a/b c") == "a_b_c"  # no '/' in a file name's id


_POOL = (
    "aZ09_.-/ %,\"'!#()[]"  # ASCII, with the CSV and JSON specials
    "éeÉ\u0301\u0327ñßøЖжбегход中文한글ﬁ\u212a"  # letters, combining marks, compatibility forms
    "\n\r\t\x00\x7f\x85\u2028\u2029\u200e\u202e\ufeff\u200c\u200d\u00a0\u3000"  # controls, spaces
    "\udce9\udcff"  # bytes of non-UTF-8 file names
)


def _random_paths(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = "".join(rng.choice(_POOL) for _ in range(rng.randint(1, 12)))
        parts = [p for p in text.split("/") if p not in ("", ".", "..")]
        if parts:
            out.append("/".join(parts) + rng.choice(["", ".avi", ".mp4"]))
    return out


def test_path_ids_are_valid_and_distinct_for_distinct_paths() -> None:
    """Every id path_id makes passes id_problem, and two paths get one id only when they are
    one path after NFC normalisation and without the extension."""
    by_id: dict[str, str] = {}
    for rel in _random_paths(20000, seed=0):
        vid = path_id(rel)
        assert id_problem(vid) is None, (rel, vid, id_problem(vid))
        assert path_id(rel) == vid  # stable
        key = str(PurePosixPath(unicodedata.normalize("NFC", rel)).with_suffix(""))
        assert by_id.setdefault(vid, key) == key, (rel, vid, by_id[vid])
    assert len(by_id) > 15000


def test_name_ids_are_valid() -> None:
    for name in _random_paths(5000, seed=1):
        vid = name_id(name)
        assert id_problem(vid) is None, (name, vid, id_problem(vid))
        assert vid.isascii() or not name.isascii()


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("", "is empty"),
        ("/a", "empty path component"),
        ("a//b", "empty path component"),
        ("a/", "empty path component"),
        (".x", "starts with '.'"),
        ("a/../b", "starts with '.'"),
        ("a/ b", "white space"),
        ("a\nb", "U+000A"),
        ("a\u2028b", "U+2028"),
        ("a\udce9", "U+DCE9"),
        ("e\u0301", "NFC"),
    ],
)
def test_video_record_rejects_an_unsafe_id_naming_the_file(bad: str, why: str) -> None:
    path = Path("/data/x.avi").absolute()
    with pytest.raises(DatasetError, match="video_id") as err:
        VideoRecord(video_id=bad, path=path, label=0, group="", splits=("train",))
    assert str(err.value).startswith(f"{path}: ") and why in str(err.value)


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


def test_unicode_and_nested_ids_round_trip(tmp_path: Path) -> None:
    """Ids with '/', Unicode letters, spaces, commas and quotes survive the manifest CSV."""
    ids = ["walking/clip_01", "running/clip_01", "бег_01", "ход_01", 'a, "b"/c d', "中文/한글"]
    videos = tuple(
        VideoRecord(
            video_id=v, path=tmp_path / f"{i}.avi", label=i % 2, group="", splits=("train",)
        )
        for i, v in enumerate(ids)
    )
    m = Manifest(classes=("бег", "walk"), split_names=("1",), videos=videos)
    write_manifest(m, tmp_path / "m.csv")
    back = read_manifest(tmp_path / "m.csv")
    assert back == m and [v.video_id for v in back.videos] == ids


def test_a_manifest_written_before_ids_were_paths_keeps_its_ids(tmp_path: Path) -> None:
    """The manifest format did not change: an older manifest (ids made by the old rule, file
    names with everything outside [A-Za-z0-9_.-] as "_") is read with the same ids."""
    path = tmp_path / "old.csv"
    path.write_text(
        '#classes=["walking", "running"]\n'
        "video_id,path,label,label_name,group,split_1\n"
        "v_ApplyEyeMakeup_g08_c01,/data/a/v_ApplyEyeMakeup_g08_c01.avi,0,walking,g08,train\n"
        "___01,/data/b/\u0431\u0435\u0433_01.avi,1,running,,test\n"
        "clip_1.x-y,/data/b/clip 1.x-y.avi,1,running,,test\n",
        encoding="utf-8",
    )
    m = read_manifest(path)
    assert [v.video_id for v in m.videos] == ["v_ApplyEyeMakeup_g08_c01", "___01", "clip_1.x-y"]


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
