"""Tests for pipeline/cache/index.py: what a cache holds (cache.json's packs, overridden by unit
packs), its attrs, and packs that are missing or unreadable, named with their videos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import ATTRS, fill, pack_names, video

from pipeline.cache import CacheError, open_cache


def test_check_attrs_names_the_differing_key_and_both_values(
    cache_path: Path, backend: str
) -> None:
    fill(cache_path, ["a"], backend)
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
    fill(cache_path, ["a"], backend)
    c = open_cache(cache_path, "r")
    c.check_attrs({})
    c.check_attrs({"crop": 64})
    c.check_attrs({"flow": {"algorithm": "tvl1", "bound": 20}})


def test_check_attrs_reports_a_key_the_cache_lacks(cache_path: Path, backend: str) -> None:
    fill(cache_path, ["a"], backend)
    with pytest.raises(CacheError, match="short_side: None -> 64"):
        open_cache(cache_path, "r").check_attrs({"short_side": 64})


def test_a_listed_pack_that_is_missing_is_named(cache_path: Path, backend: str) -> None:
    fill(cache_path, ["a"], backend)
    (pack,) = pack_names(cache_path)
    shutil.rmtree(cache_path / "packs" / pack, ignore_errors=True)
    (cache_path / "packs" / pack).unlink(missing_ok=True)
    with pytest.raises(CacheError, match=f"{pack}: listed in .*cache.json but missing"):
        open_cache(cache_path, "r")


def test_an_unreadable_pack_is_named(cache_path: Path, backend: str) -> None:
    fill(cache_path, ["a"], backend)
    (pack,) = pack_names(cache_path)
    broken = cache_path / "packs" / pack
    (broken / "zarr.json" if backend == "zarr" else broken).write_bytes(b"\0" * 10)
    with pytest.raises(CacheError, match=f"{pack}.*: unreadable pack"):
        open_cache(cache_path, "r")


def test_a_rewritten_video_overrides_the_compacted_one(cache_path: Path, backend: str) -> None:
    fill(cache_path, ["a", "b", "c"], backend)
    (old,) = pack_names(cache_path)
    new = np.full((2, 5), 7, dtype=np.float16)
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
        c.write("b", new, {"source": "sha-b2"})
        np.testing.assert_array_equal(c.read("b"), new)
        with open_cache(cache_path, "r") as r:  # another process, before compaction
            np.testing.assert_array_equal(r.read("b"), new)
            assert r.meta("b") == {"source": "sha-b2"}
            np.testing.assert_array_equal(r.read("a"), video("a"))
    assert old not in pack_names(cache_path) and len(pack_names(cache_path)) == 1
    with open_cache(cache_path, "r") as c:
        np.testing.assert_array_equal(c.read("b"), new)
        assert c.meta("b") == {"source": "sha-b2"}
        assert c.up_to_date({"a": "sha-a", "b": "sha-b", "c": "sha-c"}) == {"a", "c"}


def test_shape_gives_each_entry_as_written_without_reading_it(tmp_path: Path) -> None:
    arrays = {"a": np.zeros((3, 4), np.float16), "b": np.ones((2, 5, 6), np.uint8)}
    with open_cache(tmp_path / "c", "w", videos_per_pack=1) as c:
        for vid, a in arrays.items():
            c.write(vid, a, {})
    with open_cache(tmp_path / "c", "r") as c:
        for vid, a in arrays.items():
            assert c.shape(vid) == (a.shape, a.dtype)
        with pytest.raises(CacheError, match="no entry for video 'x'"):
            c.shape("x")
