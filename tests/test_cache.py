"""Tests for pipeline/cache.py, every one on both backends (Zarr v3 sharded, HDF5): round trips,
packing and compaction, resume semantics, attrs checks, crash safety, several processes."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pytest

import pipeline.cache
from pipeline.cache import CacheError, FeatureCache, open_cache

ROOT = Path(__file__).resolve().parents[1]
ATTRS = {"backbone": "resnet18", "crop": 64, "flow": {"bound": 20, "algorithm": "tvl1"}}


@pytest.fixture(params=["zarr", "hdf5"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _video(video_id: str) -> np.ndarray:
    """A deterministic (T, 16) float16 array per id, T depending on the id."""
    seed = zlib.crc32(video_id.encode())
    rng = np.random.default_rng(seed)
    return rng.normal(size=(3 + seed % 5, 16)).astype(np.float16)


def _fill(path: Path, ids: list[str], backend: str, attrs: dict = ATTRS, **kw: object) -> None:
    with open_cache(path, "w", attrs=attrs, backend=backend, **kw) as c:
        for v in ids:
            c.write(v, _video(v), {"source": f"sha-{v}"})


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _packs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "packs").iterdir())


# -- round trip -------------------------------------------------------------------------------

ARRAYS = {
    "uint8-5d": np.arange(2 * 5 * 2 * 4 * 6, dtype=np.uint8).reshape(2, 5, 2, 4, 6),
    "float16": np.random.default_rng(0).normal(size=(25, 512)).astype(np.float16),
    "float64": np.random.default_rng(1).normal(size=(3, 7)),
    "int64": np.arange(-6, 6).reshape(3, 4),
    "bool": np.array([[True, False, True]]),
    "empty": np.zeros((0, 4), dtype=np.float32),
    # Over one 1 MiB inner chunk: read straight from the pack, not through the chunk cache.
    "maps-over-a-chunk": np.random.default_rng(2).normal(size=(6, 512, 14, 14)).astype(np.float16),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_write_read_round_trip(cache_path: Path, backend: str, name: str) -> None:
    array = ARRAYS[name]
    meta = {"source": "abc", "frames": 32, "looped": False, "points": [0, 3, 7]}
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        c.write("v_x_g01_c01", array, meta)
        np.testing.assert_array_equal(c.read("v_x_g01_c01"), array)  # from the unit pack
    with open_cache(cache_path, "r") as c:  # from the compacted pack
        got = c.read("v_x_g01_c01")
        assert got.dtype == array.dtype
        assert got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert c.meta("v_x_g01_c01") == meta
        assert c.attrs == ATTRS
        assert c.backend == backend


def test_varying_shapes_and_dtypes_in_one_cache(cache_path: Path, backend: str) -> None:
    rng = np.random.default_rng(0)
    want = {}
    for i in range(12):  # flow stacks whose width depends on the video
        want[f"flow{i:02d}"] = rng.integers(0, 256, size=(4, 2, 2, 8, 10 + i), dtype=np.uint8)
    for i in range(40):  # (K, D) features, varying K; 64 kB each, so some straddle two chunks
        want[f"feat{i:02d}"] = rng.normal(size=(20 + i % 3, 1600)).astype(np.float16)
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend, videos_per_pack=64) as c:
        for k in rng.permutation(sorted(want)):
            c.write(str(k), want[str(k)])
    with open_cache(cache_path, "r") as c:
        assert c.keys() == sorted(want)
        for k in rng.permutation(sorted(want)):  # random order: chunk cache misses and hits
            got = c.read(str(k))
            assert got.dtype == want[str(k)].dtype
            np.testing.assert_array_equal(got, want[str(k)])
    assert len(_packs(cache_path)) == 2  # one dtype per pack: the float16 and the uint8 videos


def test_read_returns_a_copy(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a", "b"], backend)
    with open_cache(cache_path, "r") as c:
        x = c.read("a")
        x[...] = 0
        np.testing.assert_array_equal(c.read("a"), _video("a"))


def test_write_replaces_an_older_entry(cache_path: Path, backend: str) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        c.write("v", np.zeros((4, 4), dtype=np.float32), {"source": "old"})
        c.write("v", np.ones((2, 8), dtype=np.uint8), {"source": "new"})
        assert c.read("v").shape == (2, 8) and c.read("v").dtype == np.uint8
        assert c.meta("v") == {"source": "new"}
        assert c.keys() == ["v"]
    with open_cache(cache_path, "r") as c:
        np.testing.assert_array_equal(c.read("v"), np.ones((2, 8), dtype=np.uint8))


def test_write_a_scalar_array_is_a_clear_error(cache_path: Path, backend: str) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        with pytest.raises(CacheError, match="'v': a 0-d array"):
            c.write("v", np.array(3.5))
        with pytest.raises(CacheError, match="'v': cannot store dtype"):
            c.write("v", np.array(["text"]))
        assert "v" not in c


def test_keys_sorted_len_iter_and_contains(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["b", "c10", "a", "c2"], backend)
    with open_cache(cache_path, "r") as c:
        assert c.keys() == ["a", "b", "c10", "c2"]
        assert list(c) == c.keys()
        assert len(c) == 4
        assert "a" in c
        assert "z" not in c
        with pytest.raises(CacheError, match="no entry for video 'z'"):
            c.read("z")
        with pytest.raises(CacheError, match="no entry for video 'z'"):
            c.meta("z")


def test_contains_rejects_the_root_itself(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a"], backend)
    with open_cache(cache_path, "r") as c:
        assert "" not in c
        assert "." not in c


# '/' is allowed (ids are paths under the dataset root: tests/test_ids.py); empty and "."-led
# components, control characters and lone surrogates are not
@pytest.mark.parametrize(
    "bad", ["", "/a", "a/", "a//b", "a/../b", ".x", ".tmp", "..", "a\nb", "\udce9"]
)
def test_invalid_ids_are_rejected(cache_path: Path, backend: str, bad: str) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        with pytest.raises(CacheError, match="invalid video id") as e:
            c.write(bad, np.ones(2))
        assert str(e.value).startswith(str(cache_path))
        assert c.keys() == []


def test_read_only_cache_refuses_to_write_and_compact(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a"], backend)
    before = _files(cache_path)
    with open_cache(cache_path, "r") as c:
        with pytest.raises(CacheError, match="read-only"):
            c.write("b", np.ones(2))
        with pytest.raises(CacheError, match="read-only"):
            c.compact()
        assert c.keys() == ["a"]
    assert _files(cache_path) == before


# -- open_cache modes -------------------------------------------------------------------------


def test_open_missing_cache_for_reading_names_the_path(cache_path: Path) -> None:
    with pytest.raises(CacheError, match="no feature cache here") as e:
        open_cache(cache_path, "r")
    assert str(e.value).startswith(str(cache_path))


def test_open_rejects_an_unknown_mode_and_backend(cache_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        open_cache(cache_path, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        open_cache(cache_path, "w", backend="npz")  # type: ignore[arg-type]
    assert not cache_path.exists()


def test_reading_takes_the_backend_from_the_cache(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a"], backend)
    other = "hdf5" if backend == "zarr" else "zarr"
    with open_cache(cache_path, "r", backend=other) as c:  # type: ignore[arg-type]
        assert c.backend == backend
        np.testing.assert_array_equal(c.read("a"), _video("a"))


def test_append_with_the_same_attrs_resumes(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a", "b"], backend)
    # Tuples and lists compare equal after the JSON round trip of storage.
    same = {**ATTRS, "flow": {"algorithm": "tvl1", "bound": 20}}
    with open_cache(cache_path, "a", attrs=same, backend=backend) as c:
        assert c.keys() == ["a", "b"]
        c.write("c", np.zeros(3))
    with open_cache(cache_path, "r") as c:
        assert c.keys() == ["a", "b", "c"]
        np.testing.assert_array_equal(c.read("b"), _video("b"))


def test_append_with_other_attrs_starts_over(
    cache_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(cache_path, ["a", "b"], backend)
    other = {**ATTRS, "crop": 224}
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        with open_cache(cache_path, "a", attrs=other, backend=backend) as c:
            assert c.keys() == []
            assert c.attrs["crop"] == 224
    assert "crop: 64 -> 224" in caplog.text
    assert _packs(cache_path) == []


def test_append_with_another_backend_starts_over(
    cache_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(cache_path, ["a", "b"], backend)
    other = "hdf5" if backend == "zarr" else "zarr"
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        with open_cache(cache_path, "a", attrs=ATTRS, backend=other) as c:  # type: ignore[arg-type]
            assert c.keys() == []
            c.write("a", _video("a"))
    assert f"backend: '{backend}' -> '{other}'" in caplog.text
    with open_cache(cache_path, "r") as c:
        assert c.backend == other and c.keys() == ["a"]
    suffix = ".zarr" if other == "zarr" else ".h5"
    assert all(p.endswith(suffix) for p in _packs(cache_path))


def test_secondary_with_other_attrs_raises_and_touches_nothing(
    cache_path: Path, backend: str
) -> None:
    _fill(cache_path, ["a", "b"], backend)
    (cache_path / ".tmp").mkdir()
    (cache_path / ".tmp" / "v-0000.99999").write_bytes(b"another rank's write in progress")
    before = _files(cache_path)
    with pytest.raises(CacheError, match=r"crop: 64 -> 224") as e:
        open_cache(cache_path, "a", attrs={**ATTRS, "crop": 224}, backend=backend, primary=False)
    assert str(e.value).startswith(str(cache_path))
    other = "hdf5" if backend == "zarr" else "zarr"
    with pytest.raises(CacheError, match="backend"):
        open_cache(cache_path, "w", attrs=ATTRS, backend=other, primary=False)  # type: ignore[arg-type]
    # Same settings: it joins, in "w" mode too, and neither cleans nor compacts.
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend, primary=False) as c:
        assert c.keys() == ["a", "b"]
        with pytest.raises(CacheError, match="only the primary"):
            c.compact()
    assert _files(cache_path) == before


def test_secondary_needs_an_existing_cache(cache_path: Path, backend: str) -> None:
    with pytest.raises(CacheError, match="primary process must open it first"):
        open_cache(cache_path, "a", attrs=ATTRS, backend=backend, primary=False)
    assert not cache_path.exists()


def test_write_mode_empties(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a", "b"], backend)
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        assert c.keys() == []
        assert c.attrs == ATTRS
    assert _packs(cache_path) == []


def test_append_creates_a_missing_cache(cache_path: Path, backend: str) -> None:
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
        assert c.keys() == []
        c.write("a", np.ones(2))
    assert open_cache(cache_path, "r").keys() == ["a"]


def test_older_per_video_layout_is_named_and_started_over(cache_path: Path, backend: str) -> None:
    (cache_path / "v1").mkdir(parents=True)
    (cache_path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (cache_path / "v1" / "zarr.json").write_text("{}")
    with pytest.raises(CacheError, match="older layout"):
        open_cache(cache_path, "r")
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
        assert c.keys() == []
    assert not (cache_path / "v1").exists()


def test_a_directory_that_is_no_cache_is_not_deleted(cache_path: Path, backend: str) -> None:
    cache_path.mkdir()
    (cache_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a feature cache"):
        open_cache(cache_path, "w", attrs=ATTRS, backend=backend)
    assert (cache_path / "notes.txt").read_text() == "mine"


# -- check_attrs ------------------------------------------------------------------------------


def test_check_attrs_names_the_differing_key_and_both_values(
    cache_path: Path, backend: str
) -> None:
    _fill(cache_path, ["a"], backend)
    c = open_cache(cache_path, "r")
    with pytest.raises(CacheError) as e:
        c.check_attrs({"backbone": "resnet50", "crop": 64})
    msg = str(e.value)
    assert msg.startswith(str(cache_path))
    assert "backbone" in msg and "'resnet18'" in msg and "'resnet50'" in msg
    assert "crop" not in msg  # an equal key is not reported
    with pytest.raises(CacheError, match=r"flow\.bound: 20 -> 30"):
        c.check_attrs({"flow": {"bound": 30, "algorithm": "tvl1"}})


def test_check_attrs_passes_on_a_subset(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a"], backend)
    c = open_cache(cache_path, "r")
    c.check_attrs({})
    c.check_attrs({"crop": 64})
    c.check_attrs({"flow": {"algorithm": "tvl1", "bound": 20}})


def test_check_attrs_reports_a_key_the_cache_lacks(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a"], backend)
    with pytest.raises(CacheError, match="short_side: None -> 64"):
        open_cache(cache_path, "r").check_attrs({"short_side": 64})


# -- packing and compaction -------------------------------------------------------------------

IDS = [f"v_{i:03d}" for i in range(200)]


def test_compaction_leaves_few_files(cache_path: Path, backend: str) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend, videos_per_pack=64) as c:
        for v in IDS:
            c.write(v, _video(v), {"source": f"sha-{v}"})
        assert len(_packs(cache_path)) == 200  # one unit pack per finished video
    per_pack = 2 if backend == "zarr" else 1  # zarr.json + shard | .h5
    assert len(_files(cache_path)) == 4 * per_pack + 1  # ceil(200 / 64) packs + cache.json
    assert not (cache_path / ".tmp").exists()
    with open_cache(cache_path, "r") as c:
        assert c.keys() == IDS
        for v in IDS:
            np.testing.assert_array_equal(c.read(v), _video(v))
            assert c.meta(v) == {"source": f"sha-{v}"}


def test_compaction_is_deterministic(tmp_path: Path, backend: str) -> None:
    """The same entries give byte-identical packs, whatever order and sessions wrote them."""
    one, two = tmp_path / "one", tmp_path / "two"
    _fill(one, IDS, backend, videos_per_pack=64)
    # Reversed, in two sessions: the first compacts 100 videos into other packs, the second
    # adds the rest, so its compaction must regroup and drop the first one's packs.
    rev = IDS[::-1]
    _fill(two, rev[:100], backend, videos_per_pack=64)
    with open_cache(two, "a", attrs=ATTRS, backend=backend, videos_per_pack=64) as c:
        for v in rev[100:]:
            c.write(v, _video(v), {"source": f"sha-{v}"})
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    assert len(a) == 4 * (2 if backend == "zarr" else 1) + 1
    for name in a:
        assert a[name] == b[name], name


def test_compaction_keeps_unchanged_packs(cache_path: Path, backend: str) -> None:
    _fill(cache_path, IDS, backend, videos_per_pack=64)
    inodes = {p: (cache_path / "packs" / p).stat().st_ino for p in _packs(cache_path)}
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend, videos_per_pack=64) as c:
        c.write("v_200", _video("v_200"), {"source": "sha-v_200"})  # sorts last
    after = {p: (cache_path / "packs" / p).stat().st_ino for p in _packs(cache_path)}
    kept = set(inodes) & set(after)
    assert len(kept) == 3 and all(inodes[p] == after[p] for p in kept)  # only the last changed
    assert len(after) == 4
    assert open_cache(cache_path, "r").keys() == [*IDS, "v_200"]


def test_a_rewritten_video_overrides_the_compacted_one(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a", "b", "c"], backend)
    (old,) = _packs(cache_path)
    new = np.full((2, 5), 7, dtype=np.float16)
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
        c.write("b", new, {"source": "sha-b2"})
        np.testing.assert_array_equal(c.read("b"), new)
        with open_cache(cache_path, "r") as r:  # another process, before compaction
            np.testing.assert_array_equal(r.read("b"), new)
            assert r.meta("b") == {"source": "sha-b2"}
            np.testing.assert_array_equal(r.read("a"), _video("a"))
    assert old not in _packs(cache_path) and len(_packs(cache_path)) == 1
    with open_cache(cache_path, "r") as c:
        np.testing.assert_array_equal(c.read("b"), new)
        assert c.meta("b") == {"source": "sha-b2"}
        assert c.up_to_date({"a": "sha-a", "b": "sha-b", "c": "sha-c"}) == {"a", "c"}


def test_rewriting_with_the_same_source_but_other_data_is_kept(
    cache_path: Path, backend: str
) -> None:
    """The pack name hashes the data too, so a changed video never hides behind an old pack."""
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        c.write("a", np.zeros(4))
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
        c.write("a", np.ones(4))
    np.testing.assert_array_equal(open_cache(cache_path, "r").read("a"), np.ones(4))


def test_an_error_inside_the_with_block_skips_compaction(cache_path: Path, backend: str) -> None:
    with pytest.raises(KeyError):
        with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
            for v in IDS[:5]:
                c.write(v, _video(v))
            raise KeyError("boom")
    assert all(p.startswith("v-") for p in _packs(cache_path)) and len(_packs(cache_path)) == 5
    with open_cache(cache_path, "r") as c:
        assert c.keys() == IDS[:5]
        np.testing.assert_array_equal(c.read(IDS[3]), _video(IDS[3]))


def test_a_reader_survives_a_compaction_under_it(cache_path: Path, backend: str) -> None:
    """A reader whose packs are replaced and deleted never gets fill values: it re-indexes."""
    # 200 kB videos: a pack of 16 spans 4 inner chunks, so most reads below miss the chunk
    # cache and go to the deleted pack's file.
    rng = np.random.default_rng(0)
    want = {v: rng.normal(size=(100, 1024)).astype(np.float16) for v in IDS[:40]}
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend, videos_per_pack=16) as c:
        for v, x in want.items():
            c.write(v, x)
    reader = open_cache(cache_path, "r")
    np.testing.assert_array_equal(reader.read(IDS[0]), want[IDS[0]])  # opens the first pack
    new = np.full_like(want[IDS[0]], 3)
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend, videos_per_pack=16) as c:
        c.write(IDS[0], new)
    for v in IDS[1:40]:  # the first pack is gone, replaced by another
        np.testing.assert_array_equal(reader.read(v), want[v])
    got = reader.read(IDS[0])  # the old snapshot (an open HDF5 file) or the new entry
    assert np.array_equal(got, new) or np.array_equal(got, want[IDS[0]])


def test_a_write_during_compaction_is_not_lost(
    cache_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compaction deletes a unit pack only if it still holds what was absorbed."""
    _fill(cache_path, IDS[:20], backend, videos_per_pack=8)
    primary = open_cache(cache_path, "a", attrs=ATTRS, backend=backend, videos_per_pack=8)
    primary.write(IDS[3], np.zeros(5))
    other = open_cache(cache_path, "a", attrs=ATTRS, backend=backend, primary=False)
    name_of = FeatureCache._pack_name

    def late_writes(self: FeatureCache, group: list) -> str:
        # Another rank's writes land after compaction indexed the cache: a new video, and a
        # newer version of the video compaction is absorbing.
        if "late" not in other:
            other.write("late", np.ones(3))
            other.write(IDS[3], np.full(5, 2.0))
        return name_of(self, group)

    monkeypatch.setattr(FeatureCache, "_pack_name", late_writes)
    primary.close()
    with open_cache(cache_path, "r") as c:
        assert c.keys() == sorted([*IDS[:20], "late"])
        np.testing.assert_array_equal(c.read("late"), np.ones(3))
        np.testing.assert_array_equal(c.read(IDS[3]), np.full(5, 2.0))


def test_a_listed_pack_that_is_missing_is_named(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a"], backend)
    (pack,) = _packs(cache_path)
    shutil.rmtree(cache_path / "packs" / pack, ignore_errors=True)
    (cache_path / "packs" / pack).unlink(missing_ok=True)
    with pytest.raises(CacheError, match=f"{pack}: listed in .*cache.json but missing"):
        open_cache(cache_path, "r")


def test_an_unreadable_pack_is_named(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a"], backend)
    (pack,) = _packs(cache_path)
    broken = cache_path / "packs" / pack
    (broken / "zarr.json" if backend == "zarr" else broken).write_bytes(b"\0" * 10)
    with pytest.raises(CacheError, match=f"{pack}.*: unreadable pack"):
        open_cache(cache_path, "r")


# -- crashes and resuming ---------------------------------------------------------------------


def test_leftovers_of_a_crash_are_ignored_then_cleaned(
    tmp_path: Path, cache_path: Path, backend: str
) -> None:
    _fill(cache_path, ["a", "b"], backend)
    # A compaction killed before it wrote cache.json leaves an unlisted pack behind; a write
    # killed midway leaves a file in .tmp/.
    ghost = tmp_path / "ghost"
    _fill(ghost, ["ghost"], backend)
    (pack,) = _packs(ghost)
    garbage = cache_path / "packs" / ("p-0123456789abcdef" + Path(pack).suffix)
    if backend == "zarr":
        shutil.copytree(ghost / "packs" / pack, garbage)
    else:
        shutil.copy(ghost / "packs" / pack, garbage)
    (cache_path / ".tmp").mkdir()
    (cache_path / ".tmp" / "v-0123456789abcdef.h5.12345").write_bytes(b"half a pack")
    # ... and a process killed while replacing cache.json leaves its temporary file.
    half_doc = cache_path / "cache.json.12345.tmp"
    half_doc.write_text('{"format": 2, "pa')
    with open_cache(cache_path, "r") as c:
        assert c.keys() == ["a", "b"]
        assert "ghost" not in c
    assert garbage.exists() and half_doc.exists()  # a reader cleans nothing
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
        assert not (cache_path / ".tmp").exists()
        assert not garbage.exists()
        assert not half_doc.exists()
        assert c.keys() == ["a", "b"]
        np.testing.assert_array_equal(c.read("b"), _video("b"))


_KILLED_WRITER = """
import sys
import numpy as np
from pipeline.cache import open_cache
with open_cache(sys.argv[1], "w", attrs={}, backend=sys.argv[2]) as c:
    for i in range(100_000):
        c.write(f"v{i:06d}", np.full((20, 300), i % 251, np.uint8), {"source": str(i)})
"""


def test_a_killed_writer_leaves_its_finished_videos(cache_path: Path, backend: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(cache_path), backend],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            packs = cache_path / "packs"
            if packs.is_dir() and sum(1 for _ in packs.iterdir()) >= 20:
                break
            assert proc.poll() is None, "the writer ended before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    with open_cache(cache_path, "r") as c:
        done = c.keys()
        assert 20 <= len(done) < 100_000
        assert done == [f"v{i:06d}" for i in range(len(done))]
        for v in done:
            i = int(v[1:])
            np.testing.assert_array_equal(c.read(v), np.full((20, 300), i % 251, np.uint8))
            assert c.meta(v) == {"source": str(i)}
    with open_cache(cache_path, "a", attrs={}, backend=backend) as c:  # resume
        assert c.keys() == done
        assert not (cache_path / ".tmp").exists()
    assert len(_packs(cache_path)) == -(-len(done) // 64)


def test_up_to_date_compares_the_source_fingerprint(cache_path: Path, backend: str) -> None:
    _fill(cache_path, ["a", "b", "c"], backend)
    with open_cache(cache_path, "r") as c:
        got = c.up_to_date({"a": "sha-a", "b": "sha-CHANGED", "c": "sha-c", "d": "sha-d"})
    assert got == {"a", "c"}  # b's input changed, d was never written


def test_up_to_date_ignores_entries_without_a_source(cache_path: Path, backend: str) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        c.write("a", np.ones(2))
        assert c.up_to_date({"a": "sha-a"}) == set()


# -- several processes ------------------------------------------------------------------------


class _Reads:
    """A map-style dataset reading one video per item from a cache opened in the parent
    process. Not a torch Dataset subclass: the spawned writers below then need no torch."""

    def __init__(self, cache: FeatureCache, ids: list[str]) -> None:
        self.cache, self.ids = cache, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, int, bool, np.ndarray]:
        x = self.cache.read(self.ids[i])
        # White-box: the worker read through pack handles of its own (never its parent's).
        own = os.getpid() in self.cache._by_pid
        return self.ids[i], os.getpid(), own, x


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_dataloader_workers_read_a_cache_opened_in_the_parent(
    cache_path: Path, backend: str, context: str
) -> None:
    import torch

    _fill(cache_path, IDS[:80], backend, videos_per_pack=16)
    cache = open_cache(cache_path, "r")
    for v in IDS[:80:7]:  # the parent has packs open before the workers start
        np.testing.assert_array_equal(cache.read(v), _video(v))
    loader = torch.utils.data.DataLoader(
        _Reads(cache, IDS[:80]),  # type: ignore[arg-type]
        batch_size=None,
        num_workers=2,
        multiprocessing_context=context,
    )
    pids = set()
    got = {}
    for vid, pid, own, x in loader:
        assert own
        pids.add(pid)
        got[vid] = x.numpy()
    assert len(pids) == 2 and os.getpid() not in pids
    assert sorted(got) == IDS[:80]
    for v, x in got.items():
        np.testing.assert_array_equal(x, _video(v))
    np.testing.assert_array_equal(cache.read(IDS[5]), _video(IDS[5]))  # the parent still reads


def _rank(
    path: str, backend: str, primary: bool, ids: list[str], opened: Event, done: Event
) -> None:
    """One torchrun-like rank: the primary opens first and compacts after the other closed."""
    if not primary:
        assert opened.wait(60)
    c = open_cache(
        Path(path), "a", attrs=ATTRS, backend=backend, videos_per_pack=16, primary=primary
    )
    if primary:
        opened.set()
    for v in ids:
        c.write(v, _video(v), {"source": f"sha-{v}"})
    if primary:
        assert done.wait(60)
    c.close()
    if not primary:
        done.set()


def test_two_processes_write_one_cache(tmp_path: Path, backend: str) -> None:
    shared = tmp_path / "shared"
    ctx = mp.get_context("spawn")
    opened, done = ctx.Event(), ctx.Event()
    ids = IDS[:60]
    procs = [
        ctx.Process(target=_rank, args=(str(shared), backend, True, ids[0::2], opened, done)),
        ctx.Process(target=_rank, args=(str(shared), backend, False, ids[1::2], opened, done)),
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with open_cache(shared, "r") as c:
        assert c.keys() == ids
        for v in ids:
            np.testing.assert_array_equal(c.read(v), _video(v))
    single = tmp_path / "single"
    _fill(single, ids, backend, videos_per_pack=16)
    assert _files(shared) == _files(single)
    assert len(_packs(shared)) == 4


# -- damaged files: found, named with their videos, recomputed on resume ---------------------

DAMAGES = ["delete", "truncate", "zero", "flip"]
# data: the shard (zarr) or the HDF5 data after the user block; header: zarr.json or the HDF5
# user block (the pack's index); doc: cache.json
TARGETS = ["data", "header", "doc"]
DAMAGE_IDS = [f"d_{i:02d}" for i in range(20)]  # packs of 8, 8 and 4 videos
VICTIM = "d_09"  # in the second pack
FLIPS = (0.0, 0.13, 0.29, 0.5, 0.71, 0.87, 1.0)  # where in the part a bit is flipped


def _victim_pack(root: Path) -> tuple[str, list[str]]:
    """(name, videos) of the pack that holds VICTIM (white-box: the cache's index)."""
    with open_cache(root, "r") as c:
        name = c._index[VICTIM][0]
        return name, sorted(v for v, (n, _) in c._index.items() if n == name)


def _part(root: Path, backend: str, target: str) -> tuple[Path, int, int]:
    """The file to damage and the byte range [lo, hi) of the part ``target`` names."""
    if target == "doc":
        f = root / "cache.json"
        return f, 0, f.stat().st_size
    name, _ = _victim_pack(root)
    if backend == "zarr":
        f = root / "packs" / f"{name}.zarr" / ("c/0" if target == "data" else "zarr.json")
        return f, 0, f.stat().st_size
    f = root / "packs" / f"{name}.h5"
    # the user block holds the header; the HDF5 file (its superblock first) follows
    start = f.read_bytes().find(b"\x89HDF\r\n\x1a\n") or 2048  # (files before user blocks)
    return (f, start, f.stat().st_size) if target == "data" else (f, 0, start)


def _damage(f: Path, lo: int, hi: int, how: str, at: float = 0.5) -> None:
    data = bytearray(f.read_bytes())
    if how == "delete":
        f.unlink()
        return
    if how == "truncate":
        data = data[: lo + (hi - lo) // 2]  # cut inside the part
    elif how == "zero":
        data[lo:hi] = bytes(hi - lo)
    else:
        i = lo + round((hi - lo - 1) * at)
        data[i] ^= 1 << (i % 8)
    f.write_bytes(bytes(data))


def _read_everything(root: Path) -> None:
    with open_cache(root, "r") as c:
        for v in c.keys():
            c.read(v)


def _resume(root: Path, backend: str, ids: list[str]) -> set[str]:
    """What the flow and features stages do: keep the sound up-to-date entries, write the rest."""
    with open_cache(root, "a", attrs=ATTRS, backend=backend, videos_per_pack=8) as c:
        done = c.up_to_date({v: f"sha-{v}" for v in ids}, verify=True)
        for v in ids:
            if v not in done:
                c.write(v, _video(v), {"source": f"sha-{v}"})
    return done


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("target", TARGETS)
def test_a_damaged_file_is_named_with_its_videos_and_recomputed_on_resume(
    tmp_path: Path, backend: str, target: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    fresh, root = tmp_path / "fresh", tmp_path / "damaged"
    _fill(fresh, DAMAGE_IDS, backend, videos_per_pack=8)
    _fill(root, DAMAGE_IDS, backend, videos_per_pack=8)
    # a damaged cache.json takes every video with it; a damaged pack, the videos it holds
    affected = DAMAGE_IDS if target == "doc" else _victim_pack(root)[1]
    f, lo, hi = _part(root, backend, target)
    original = f.read_bytes()
    for at in FLIPS if how == "flip" else (0.5,):
        f.write_bytes(original)
        _damage(f, lo, hi, how, at)
        with pytest.raises(CacheError) as e:
            _read_everything(root)  # never zeros, other values or a library's trace
        msg = str(e.value)
        assert str(f) in msg, (at, msg)
        assert all(repr(v) in msg for v in affected), (at, msg)

    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        done = _resume(root, backend, DAMAGE_IDS)
    assert VICTIM not in done
    assert done == set(DAMAGE_IDS) - set(affected)  # the other packs are kept
    assert str(f) in caplog.text and f"'{VICTIM}'" in caplog.text
    assert _files(root) == _files(fresh)  # recomputed to the same bytes


def test_a_chunk_missing_from_a_shard_is_an_error_not_zeros(
    cache_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zarr reads an inner chunk that the shard index marks missing as fill values."""
    x = np.zeros((3, 1 << 19), np.float16)  # three 1 MiB chunks, the first two all zeros
    x[2] = 1
    with open_cache(cache_path, "w", attrs=ATTRS, backend="zarr") as c:
        c.write("v", x)
    (pack,) = _packs(cache_path)
    tail = (cache_path / "packs" / pack / "c" / "0").read_bytes()[-(16 * 3 + 4) :]
    offsets = np.frombuffer(tail[:-4], "<u8").reshape(3, 2)
    assert (offsets != np.iinfo(np.uint64).max).all()  # written: all-zero chunks too

    zarr = pipeline.cache.zarr  # the one module that imports zarr
    real = zarr.create_array

    def without_empty_chunks(*args: object, **kw: object) -> object:
        return real(*args, **{**kw, "config": {"write_empty_chunks": False}})

    monkeypatch.setattr(zarr, "create_array", without_empty_chunks)
    missing = r"c/0: inner chunks \[0, 1\] of 3 are missing"
    with open_cache(cache_path, "w", attrs=ATTRS, backend="zarr") as c:
        c.write("v", x)
        c.close(compact=False)
    with pytest.raises(CacheError, match=missing) as e:
        open_cache(cache_path, "r").read("v")
    assert "'v'" in str(e.value)
    with pytest.raises(CacheError, match=missing):  # nor is it compacted
        open_cache(cache_path, "a", attrs=ATTRS, backend="zarr").close()


def _forge(c: FeatureCache, video_id: str, wrong: np.ndarray) -> None:
    """White-box: a unit pack whose files are consistent (sizes, CRCs) but whose data is not
    what the entry's sha1 says: damage that happened before the pack was written."""
    name = next(n for n, videos in c._units.items() if video_id in videos)
    entry = dict(c._units[name][video_id])
    c._write_pack(name, np.ascontiguousarray(wrong).reshape(-1), {video_id: entry}, durable=False)


def test_the_stored_sha1_is_checked_when_asked_for(
    cache_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(cache_path, ["a", "b"], backend)
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
        c.write("a", _video("a"), {"source": "sha-a"})
        _forge(c, "a", _video("a") + np.float16(1))
        c.close(compact=False)
    with open_cache(cache_path, "r") as c:
        assert c.read("a").shape == _video("a").shape  # the file checks alone cannot tell
        with pytest.raises(CacheError, match="'a' does not match its stored sha1") as e:
            c.read("a", verify=True)
        assert "packs/v-" in str(e.value)
        np.testing.assert_array_equal(c.read("b", verify=True), _video("b"))
        assert list(c.verify()) == ["a"] and "sha1" in c.verify(["a"])["a"]
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        assert _resume(cache_path, backend, ["a", "b"]) == {"b"}
    assert "damaged video 'a'" in caplog.text
    with open_cache(cache_path, "r") as c:
        np.testing.assert_array_equal(c.read("a", verify=True), _video("a"))


@pytest.mark.parametrize("damage", ["flip", "sha1"])
def test_compaction_does_not_copy_a_damaged_entry(
    tmp_path: Path, backend: str, damage: str
) -> None:
    fresh, root = tmp_path / "fresh", tmp_path / "damaged"
    _fill(fresh, DAMAGE_IDS, backend, videos_per_pack=8)
    with open_cache(root, "w", attrs=ATTRS, backend=backend, videos_per_pack=8) as c:
        for v in DAMAGE_IDS:
            c.write(v, _video(v), {"source": f"sha-{v}"})
        if damage == "sha1":
            _forge(c, VICTIM, _video(VICTIM) * 2)
        c.close(compact=False)  # unit packs, as a killed run leaves them
    if damage == "flip":
        # white-box: the unit pack's name is a hash of the id
        unit = (
            root
            / "packs"
            / (pipeline.cache._unit_name(VICTIM) + (".zarr" if backend == "zarr" else ".h5"))
        )
        f = unit / "c" / "0" if backend == "zarr" else unit
        _damage(f, 0, f.stat().st_size, "flip")
    with pytest.raises(CacheError, match="damaged entries found while compacting") as e:
        with open_cache(root, "a", attrs=ATTRS, backend=backend, videos_per_pack=8):
            pass  # closing compacts
    assert f"'{VICTIM}'" in str(e.value) and "packs/v-" in str(e.value)
    with open_cache(root, "r") as c:  # compacted without it; every other video is there
        assert c.keys() == [v for v in DAMAGE_IDS if v != VICTIM]
        for v in c.keys():
            np.testing.assert_array_equal(c.read(v, verify=True), _video(v))
    assert _resume(root, backend, DAMAGE_IDS) == set(DAMAGE_IDS) - {VICTIM}
    assert _files(root) == _files(fresh)


def test_a_cache_json_of_the_older_format_is_named_then_started_over(
    cache_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(cache_path, ["a"], backend)
    (cache_path / "cache.json").write_text(
        json.dumps({"format": 1, "backend": backend, "attrs": ATTRS, "packs": []})
    )
    with pytest.raises(CacheError, match=r"cache.json: format 1, written by an older version"):
        open_cache(cache_path, "r")
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
            assert c.keys() == []
    assert "format 1" in caplog.text and "starting the cache over" in caplog.text


# -- a full disk: the file and the reason, and a cache that resumes ---------------------------

_FULL_DISK_WRITER = """
import resource, signal, sys
import numpy as np
from pipeline.cache import open_cache

path, backend, limit, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "big"
# Files may not grow past ``limit`` bytes: a write beyond fails with EFBIG, as on a full disk,
# inside the real write path. SIGXFSZ would kill the process instead: ignore it.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
with open_cache(path, "w", attrs={}, backend=backend, videos_per_pack=64) as c:
    for i in range(30):  # incompressible, ~4 kB each: a unit pack fits, a pack of 30 does not
        x = np.random.default_rng(i).integers(0, 256, (4, 1024), dtype=np.uint8)
        c.write(f"v{i:02d}", x, {"source": str(i)})
    if big:  # a unit pack over the limit
        c.write("v99", np.random.default_rng(99).integers(0, 256, (64, 1024), dtype=np.uint8))
print("no error", file=sys.stderr)
"""


@pytest.mark.parametrize("when", ["write", "compaction"])
def test_a_full_disk_names_the_file_and_leaves_a_resumable_cache(
    tmp_path: Path, backend: str, when: str
) -> None:
    root = tmp_path / "cache"
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_WRITER, str(root), backend, str(32 << 10),
         "big" if when == "write" else "small"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]  # an exception, not a crash (h5py: SIGSEGV)
    last = run.stderr.strip().splitlines()[-1]
    pack = "v-" if when == "write" else "p-"
    assert last.startswith("pipeline.cache.CacheError: "), last
    assert f"{root}/.tmp/{pack}" in last and "File too large" in last, last
    assert not (root / ".tmp").exists()  # the partial file is gone
    ids = [f"v{i:02d}" for i in range(30)]
    with open_cache(root, "r") as c:  # what was written before is there and sound
        assert c.keys() == ids
        for v in ids:
            c.read(v, verify=True)
    with open_cache(root, "a", attrs={}, backend=backend, videos_per_pack=64) as c:
        assert c.up_to_date({v: str(i) for i, v in enumerate(ids)}, verify=True) == set(ids)
        if when == "write":
            c.write("v99", np.random.default_rng(99).integers(0, 256, (64, 1024), dtype=np.uint8))
    fresh = tmp_path / "fresh"
    with open_cache(fresh, "w", attrs={}, backend=backend, videos_per_pack=64) as c:
        for i, v in enumerate(ids):
            c.write(
                v,
                np.random.default_rng(i).integers(0, 256, (4, 1024), dtype=np.uint8),
                {"source": str(i)},
            )
        if when == "write":
            c.write("v99", np.random.default_rng(99).integers(0, 256, (64, 1024), dtype=np.uint8))
    assert _files(root) == _files(fresh)
