"""Tests for the facade of pipeline/cache (``open_cache``, ``FeatureCache``), every one on both
backends (Zarr v3 sharded, HDF5): round trips, the open modes, and caches byte-identical to
those of the single-module cache that preceded the package. The modules' own tests are in
tests/test_cache_<module>.py."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from cache_helpers import ATTRS, BACKENDS, ROOT, cache_files, fill, pack_names, video

from pipeline.cache import CacheError, open_cache
from pipeline.cache.compaction import groups

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
    assert len(pack_names(cache_path)) == 2  # one dtype per pack: the float16 and the uint8 videos


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
    fill(cache_path, ["b", "c10", "a", "c2"], backend)
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
    fill(cache_path, ["a"], backend)
    with open_cache(cache_path, "r") as c:
        assert "" not in c
        assert "." not in c


def test_read_only_cache_refuses_to_write_and_compact(cache_path: Path, backend: str) -> None:
    fill(cache_path, ["a"], backend)
    before = cache_files(cache_path)
    with open_cache(cache_path, "r") as c:
        with pytest.raises(CacheError, match="read-only"):
            c.write("b", np.ones(2))
        with pytest.raises(CacheError, match="read-only"):
            c.compact()
        assert c.keys() == ["a"]
    assert cache_files(cache_path) == before


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
    fill(cache_path, ["a"], backend)
    other = "hdf5" if backend == "zarr" else "zarr"
    with open_cache(cache_path, "r", backend=other) as c:  # type: ignore[arg-type]
        assert c.backend == backend
        np.testing.assert_array_equal(c.read("a"), video("a"))


def test_append_with_the_same_attrs_resumes(cache_path: Path, backend: str) -> None:
    fill(cache_path, ["a", "b"], backend)
    # Tuples and lists compare equal after the JSON round trip of storage.
    same = {**ATTRS, "flow": {"algorithm": "tvl1", "bound": 20}}
    with open_cache(cache_path, "a", attrs=same, backend=backend) as c:
        assert c.keys() == ["a", "b"]
        c.write("c", np.zeros(3))
    with open_cache(cache_path, "r") as c:
        assert c.keys() == ["a", "b", "c"]
        np.testing.assert_array_equal(c.read("b"), video("b"))


def test_append_with_other_attrs_starts_over(
    cache_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    fill(cache_path, ["a", "b"], backend)
    other = {**ATTRS, "crop": 224}
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        with open_cache(cache_path, "a", attrs=other, backend=backend) as c:
            assert c.keys() == []
            assert c.attrs["crop"] == 224
    assert "crop: 64 -> 224" in caplog.text
    assert pack_names(cache_path) == []


def test_append_with_another_backend_starts_over(
    cache_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    fill(cache_path, ["a", "b"], backend)
    other = "hdf5" if backend == "zarr" else "zarr"
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        with open_cache(cache_path, "a", attrs=ATTRS, backend=other) as c:  # type: ignore[arg-type]
            assert c.keys() == []
            c.write("a", video("a"))
    assert f"backend: '{backend}' -> '{other}'" in caplog.text
    with open_cache(cache_path, "r") as c:
        assert c.backend == other and c.keys() == ["a"]
    suffix = ".zarr" if other == "zarr" else ".h5"
    assert all(p.endswith(suffix) for p in pack_names(cache_path))


def test_secondary_with_other_attrs_raises_and_touches_nothing(
    cache_path: Path, backend: str
) -> None:
    fill(cache_path, ["a", "b"], backend)
    (cache_path / ".tmp").mkdir()
    (cache_path / ".tmp" / "v-0000.99999").write_bytes(b"another rank's write in progress")
    before = cache_files(cache_path)
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
    assert cache_files(cache_path) == before


def test_secondary_needs_an_existing_cache(cache_path: Path, backend: str) -> None:
    with pytest.raises(CacheError, match="primary process must open it first"):
        open_cache(cache_path, "a", attrs=ATTRS, backend=backend, primary=False)
    assert not cache_path.exists()


def test_write_mode_empties(cache_path: Path, backend: str) -> None:
    fill(cache_path, ["a", "b"], backend)
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        assert c.keys() == []
        assert c.attrs == ATTRS
    assert pack_names(cache_path) == []


def test_append_creates_a_missing_cache(cache_path: Path, backend: str) -> None:
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
        assert c.keys() == []
        c.write("a", np.ones(2))
    assert open_cache(cache_path, "r").keys() == ["a"]


# The per-video Zarr layout of before format 1 has no cache.json and no version to read: nothing
# tells it from someone's data, so it is refused like any directory that is not a cache.
@pytest.mark.parametrize("content", ["notes", "per-video layout"])
def test_a_directory_that_is_no_cache_is_neither_read_nor_deleted(
    cache_path: Path, backend: str, content: str
) -> None:
    cache_path.mkdir()
    if content == "notes":
        (cache_path / "notes.txt").write_text("mine")
    else:
        (cache_path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
        (cache_path / "v1").mkdir()
        (cache_path / "v1" / "zarr.json").write_text("{}")
    before = cache_files(cache_path)
    with pytest.raises(CacheError, match="no feature cache here"):
        open_cache(cache_path, "r")
    for mode in ("w", "a"):
        with pytest.raises(CacheError, match="not a feature cache; not deleting it"):
            open_cache(cache_path, mode, attrs=ATTRS, backend=backend)  # type: ignore[arg-type]
    assert cache_files(cache_path) == before


# -- the same bytes as the single-module cache ------------------------------------------------

# The last commit with the cache as one module, pipeline/cache.py: the package must write, read
# and compact caches exactly as it did.
SINGLE_MODULE = "de37342dfc5a0fa44570d55d8286e1c33d96dc06"


@pytest.fixture(scope="module")
def single_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """pipeline/cache.py as of SINGLE_MODULE, imported as module ``cache_single_module``."""
    try:
        source = subprocess.run(
            ["git", "show", f"{SINGLE_MODULE}:pipeline/cache.py"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {SINGLE_MODULE[:7]} is not in this clone's history (shallow?)")
    path = tmp_path_factory.mktemp("single_module") / "cache_single_module.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[path.stem]


def _entries() -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """Videos of every kind a pack holds: pooled features, flow stacks (another dtype, so
    another pack), an empty array, one over an inner chunk; ids with '/' and Unicode."""
    rng = np.random.default_rng(7)
    out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    for v in ["a_01", "a_02", "walking/clip_01", "бег_01", "c_03", "c_04", "c_05"]:
        out[v] = (video(v), {"source": f"sha-{v}", "frames": 32, "points": (0, 3)})
    for i in range(3):
        flow = rng.integers(0, 256, size=(2, 5, 2, 4, 6 + i), dtype=np.uint8)
        out[f"flow_{i}"] = (flow, {"source": f"sha-flow_{i}"})
    out["m_empty"] = (np.zeros((0, 4), np.float32), {})
    out["m_maps"] = (rng.normal(size=(6, 512, 14, 14)).astype(np.float16), {"layer": "4"})
    return out


def _write(cache: Any, ids: list[str], entries: dict[str, tuple[np.ndarray, dict]]) -> None:
    for v in ids:
        cache.write(v, *entries[v])


def _contents(cache: Any) -> dict[str, Any]:
    """Everything a reader sees of a cache."""
    got = {v: (cache.read(v, verify=True), cache.meta(v)) for v in cache.keys()}
    return {"attrs": cache.attrs, "backend": cache.backend, "videos": got}


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert {k: a[k] for k in ("attrs", "backend")} == {k: b[k] for k in ("attrs", "backend")}
    assert list(a["videos"]) == list(b["videos"])
    for v, (x, meta) in a["videos"].items():
        y, other = b["videos"][v]
        assert x.dtype == y.dtype and x.shape == y.shape, v
        np.testing.assert_array_equal(x, y)
        assert meta == other, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_caches_are_byte_identical_to_the_single_module_cache(
    tmp_path: Path, single_module: ModuleType, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The single module grouped videos by the rule before content-defined boundaries (runs of
    # videos_per_pack from the first id); given the package's grouping it must write the
    # package's bytes: the pack and cache.json formats did not change.
    monkeypatch.setattr(
        single_module.FeatureCache,
        "_groups",
        lambda self, entries: groups(entries, self.videos_per_pack),
    )
    entries = _entries()
    ids = sorted(entries)
    first, second = ids[::2], ids[1::2]
    kw: dict[str, Any] = {"attrs": ATTRS, "backend": backend, "videos_per_pack": 4}
    steps: dict[str, list[dict[str, bytes]]] = {}
    for who, m in [("before", single_module), ("package", sys.modules["pipeline.cache"])]:
        root = tmp_path / who
        with m.open_cache(root, "w", **kw) as c:  # unit packs only, as a killed run leaves them
            _write(c, first, entries)
            c.close(compact=False)
        one = cache_files(root)
        with m.open_cache(root, "a", **kw) as c:  # resumed, then compacted on close
            _write(c, second, entries)
            c.write("a_01", video("a_02"), {"source": "rewritten"})  # replaces a packed entry
        two = cache_files(root)
        with m.open_cache(root, "a", **kw) as c:  # unit packs over compacted ones, compacted
            c.write("c_04", np.ones((2, 16), np.float16), {"source": "again"})
        steps[who] = [one, two, cache_files(root)]
    for i, (a, b) in enumerate(zip(steps["before"], steps["package"], strict=True)):
        assert sorted(a) == sorted(b), i
        assert all(a[f] == b[f] for f in a), (i, [f for f in a if a[f] != b[f]])

    # A cache the single module wrote, with unit packs over compacted packs, reads the same
    # through the package and compacts to the same bytes.
    old = tmp_path / "old"
    with single_module.open_cache(old, "w", **kw) as c:
        _write(c, first, entries)
    with single_module.open_cache(old, "a", **kw) as c:
        _write(c, second, entries)
        c.close(compact=False)
    twin = tmp_path / "twin"
    shutil.copytree(old, twin)
    with single_module.open_cache(old, "r") as before, open_cache(twin, "r") as after:
        _same(_contents(before), _contents(after))
    with single_module.open_cache(old, "a", **kw):
        pass
    with open_cache(twin, "a", **kw):
        pass
    assert cache_files(old) == cache_files(twin)
