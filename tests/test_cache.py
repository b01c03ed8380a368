"""Tests for pipeline/cache.py: round trips, resume semantics, attrs checks, atomic writes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import CacheError, open_cache

ATTRS = {"backbone": "resnet18", "crop": 64, "flow": {"bound": 20, "algorithm": "tvl1"}}


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _fill(path: Path, ids: list[str], attrs: dict = ATTRS) -> None:
    with open_cache(path, "w", attrs=attrs) as c:
        for i, v in enumerate(ids):
            c.write(v, np.full((2, 3), i, dtype=np.float32), {"source": f"sha-{v}"})


# -- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 5 * 2 * 4 * 6, dtype=np.uint8).reshape(2, 5, 2, 4, 6),
        np.random.default_rng(0).normal(size=(25, 512)).astype(np.float16),
        np.random.default_rng(0).normal(size=(3, 7)),  # float64
        np.zeros((0, 4), dtype=np.float32),
    ],
    ids=["uint8-5d", "float16", "float64", "empty"],
)
def test_write_read_round_trip(cache_path: Path, array: np.ndarray) -> None:
    meta = {"source": "abc", "frames": 32, "looped": False, "points": [0, 3, 7]}
    with open_cache(cache_path, "w", attrs=ATTRS) as c:
        c.write("v_x_g01_c01", array, meta)
    with open_cache(cache_path, "r") as c:
        got = c.read("v_x_g01_c01")
        assert got.dtype == array.dtype
        assert got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert c.meta("v_x_g01_c01") == meta
        assert c.attrs == ATTRS


def test_write_replaces_an_older_entry(cache_path: Path) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS) as c:
        c.write("v", np.zeros((4, 4), dtype=np.float32), {"source": "old"})
        c.write("v", np.ones((2, 8), dtype=np.uint8), {"source": "new"})
        assert c.read("v").shape == (2, 8) and c.read("v").dtype == np.uint8
        assert c.meta("v") == {"source": "new"}
        assert c.keys() == ["v"]


def test_write_a_scalar_array_is_a_clear_error(cache_path: Path) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS) as c:
        with pytest.raises(CacheError, match="'v': a 0-d array"):
            c.write("v", np.array(3.5))
        assert "v" not in c


def test_keys_sorted_len_iter_and_contains(cache_path: Path) -> None:
    _fill(cache_path, ["b", "c10", "a", "c2"])
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


def test_contains_rejects_the_root_itself(cache_path: Path) -> None:
    _fill(cache_path, ["a"])
    with open_cache(cache_path, "r") as c:
        assert "" not in c
        assert "." not in c


# -- open_cache modes -------------------------------------------------------------------------


def test_open_missing_cache_for_reading_names_the_path(cache_path: Path) -> None:
    with pytest.raises(CacheError, match="no feature cache here") as e:
        open_cache(cache_path, "r")
    assert str(e.value).startswith(str(cache_path))


def test_open_rejects_an_unknown_mode(cache_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        open_cache(cache_path, "x")  # type: ignore[arg-type]


def test_append_with_the_same_attrs_resumes(cache_path: Path) -> None:
    _fill(cache_path, ["a", "b"])
    # Tuples and lists compare equal after the JSON round trip of storage.
    same = {**ATTRS, "flow": {"algorithm": "tvl1", "bound": 20}}
    with open_cache(cache_path, "a", attrs=same) as c:
        assert c.keys() == ["a", "b"]
        c.write("c", np.zeros(3))
    with open_cache(cache_path, "r") as c:
        assert c.keys() == ["a", "b", "c"]
        np.testing.assert_array_equal(c.read("b"), np.full((2, 3), 1, dtype=np.float32))


def test_append_with_other_attrs_starts_over(
    cache_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(cache_path, ["a", "b"])
    other = {**ATTRS, "crop": 224}
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        with open_cache(cache_path, "a", attrs=other) as c:
            assert c.keys() == []
            assert c.attrs["crop"] == 224
    assert "crop: 64 -> 224" in caplog.text


def test_write_mode_empties(cache_path: Path) -> None:
    _fill(cache_path, ["a", "b"])
    with open_cache(cache_path, "w", attrs=ATTRS) as c:
        assert c.keys() == []
        assert c.attrs == ATTRS


def test_append_creates_a_missing_cache(cache_path: Path) -> None:
    with open_cache(cache_path, "a", attrs=ATTRS) as c:
        assert c.keys() == []
        c.write("a", np.ones(2))
    assert open_cache(cache_path, "r").keys() == ["a"]


# -- check_attrs ------------------------------------------------------------------------------


def test_check_attrs_names_the_differing_key_and_both_values(cache_path: Path) -> None:
    _fill(cache_path, ["a"])
    c = open_cache(cache_path, "r")
    with pytest.raises(CacheError) as e:
        c.check_attrs({"backbone": "resnet50", "crop": 64})
    msg = str(e.value)
    assert msg.startswith(str(cache_path))
    assert "backbone" in msg and "'resnet18'" in msg and "'resnet50'" in msg
    assert "crop" not in msg  # an equal key is not reported
    with pytest.raises(CacheError, match=r"flow\.bound: 20 -> 30"):
        c.check_attrs({"flow": {"bound": 30, "algorithm": "tvl1"}})


def test_check_attrs_passes_on_a_subset(cache_path: Path) -> None:
    _fill(cache_path, ["a"])
    c = open_cache(cache_path, "r")
    c.check_attrs({})
    c.check_attrs({"crop": 64})
    c.check_attrs({"flow": {"algorithm": "tvl1", "bound": 20}})


def test_check_attrs_reports_a_key_the_cache_lacks(cache_path: Path) -> None:
    _fill(cache_path, ["a"])
    with pytest.raises(CacheError, match="short_side: None -> 64"):
        open_cache(cache_path, "r").check_attrs({"short_side": 64})


# -- atomic writes and resuming ---------------------------------------------------------------


def test_leftover_tmp_of_a_killed_writer_is_ignored_and_cleaned(cache_path: Path) -> None:
    _fill(cache_path, ["a"])
    # A writer killed mid-write leaves a complete-looking array under .tmp/<id>.<pid>.
    with open_cache(cache_path, "a", attrs=ATTRS) as c:
        c.write("half", np.ones((2, 2)))
    tmp = cache_path / ".tmp" / "b.12345"
    tmp.parent.mkdir()
    (cache_path / "half").rename(tmp)
    assert (tmp / "zarr.json").exists()
    with open_cache(cache_path, "r") as c:
        assert c.keys() == ["a"]
        assert "b" not in c
        assert len(c) == 1
    with open_cache(cache_path, "a", attrs=ATTRS) as c:
        assert not (cache_path / ".tmp").exists()
        assert c.keys() == ["a"]


def test_close_removes_an_empty_tmp_dir(cache_path: Path) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS) as c:
        c.write("a", np.ones(2))
    assert not (cache_path / ".tmp").exists()
    assert (cache_path / "a" / "zarr.json").exists()


def test_up_to_date_compares_the_source_fingerprint(cache_path: Path) -> None:
    _fill(cache_path, ["a", "b", "c"])
    with open_cache(cache_path, "r") as c:
        got = c.up_to_date({"a": "sha-a", "b": "sha-CHANGED", "c": "sha-c", "d": "sha-d"})
    assert got == {"a", "c"}  # b's input changed, d was never written


def test_up_to_date_ignores_entries_without_a_source(cache_path: Path) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS) as c:
        c.write("a", np.ones(2))
        assert c.up_to_date({"a": "sha-a"}) == set()


@pytest.mark.parametrize("bad", ["", "a/b", ".x", ".tmp", ".."])
def test_invalid_ids_are_rejected(cache_path: Path, bad: str) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS) as c:
        with pytest.raises(CacheError, match="invalid video id") as e:
            c.write(bad, np.ones(2))
        assert str(e.value).startswith(str(cache_path))
        assert c.keys() == []


def test_read_only_cache_refuses_to_write(cache_path: Path) -> None:
    _fill(cache_path, ["a"])
    with open_cache(cache_path, "r") as c:
        with pytest.raises(CacheError, match="read-only"):
            c.write("b", np.ones(2))
        assert c.keys() == ["a"]
