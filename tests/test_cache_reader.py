"""Tests for pipeline/cache/reader.py, on both backends: reads return what was written, per
process (DataLoader workers) and under a compaction; every damaged file is found, named with its
videos, and recomputed on resume; each entry's sha1 is checked when asked for."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import (
    ATTRS,
    DAMAGE_IDS,
    DAMAGES,
    IDS,
    TARGETS,
    VICTIM,
    cache_files,
    damage_file,
    damaged_part,
    fill,
    forge,
    read_everything,
    resume,
    victim_pack,
    video,
)

from pipeline.cache import CacheError, FeatureCache, open_cache


def test_read_returns_a_copy(cache_path: Path, backend: str) -> None:
    fill(cache_path, ["a", "b"], backend)
    with open_cache(cache_path, "r") as c:
        x = c.read("a")
        x[...] = 0
        np.testing.assert_array_equal(c.read("a"), video("a"))


def test_up_to_date_compares_the_source_fingerprint(cache_path: Path, backend: str) -> None:
    fill(cache_path, ["a", "b", "c"], backend)
    with open_cache(cache_path, "r") as c:
        got = c.up_to_date({"a": "sha-a", "b": "sha-CHANGED", "c": "sha-c", "d": "sha-d"})
    assert got == {"a", "c"}  # b's input changed, d was never written


def test_up_to_date_ignores_entries_without_a_source(cache_path: Path, backend: str) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        c.write("a", np.ones(2))
        assert c.up_to_date({"a": "sha-a"}) == set()


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


@pytest.mark.slow
@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_dataloader_workers_read_a_cache_opened_in_the_parent(
    cache_path: Path, backend: str, context: str
) -> None:
    import torch

    fill(cache_path, IDS[:80], backend, videos_per_pack=16)
    cache = open_cache(cache_path, "r")
    for v in IDS[:80:7]:  # the parent has packs open before the workers start
        np.testing.assert_array_equal(cache.read(v), video(v))
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
        np.testing.assert_array_equal(x, video(v))
    np.testing.assert_array_equal(cache.read(IDS[5]), video(IDS[5]))  # the parent still reads


# -- damaged files: found, named with their videos, recomputed on resume ---------------------

FLIPS = (0.0, 0.13, 0.29, 0.5, 0.71, 0.87, 1.0)  # where in the part a bit is flipped


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("target", TARGETS)
def test_a_damaged_file_is_named_with_its_videos_and_recomputed_on_resume(
    tmp_path: Path, backend: str, target: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    fresh, root = tmp_path / "fresh", tmp_path / "damaged"
    fill(fresh, DAMAGE_IDS, backend, videos_per_pack=8)
    fill(root, DAMAGE_IDS, backend, videos_per_pack=8)
    # a damaged cache.json takes every video with it; a damaged pack, the videos it holds
    affected = DAMAGE_IDS if target == "doc" else victim_pack(root)[1]
    f, lo, hi = damaged_part(root, backend, target)
    original = f.read_bytes()
    for at in FLIPS if how == "flip" else (0.5,):
        f.write_bytes(original)
        damage_file(f, lo, hi, how, at)
        with pytest.raises(CacheError) as e:
            read_everything(root)  # never zeros, other values or a library's trace
        msg = str(e.value)
        assert str(f) in msg, (at, msg)
        assert all(repr(v) in msg for v in affected), (at, msg)

    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        done = resume(root, backend, DAMAGE_IDS)
    assert VICTIM not in done
    assert done == set(DAMAGE_IDS) - set(affected)  # the other packs are kept
    assert str(f) in caplog.text and f"'{VICTIM}'" in caplog.text
    assert cache_files(root) == cache_files(fresh)  # recomputed to the same bytes


def test_the_stored_sha1_is_checked_when_asked_for(
    cache_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    fill(cache_path, ["a", "b"], backend)
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
        c.write("a", video("a"), {"source": "sha-a"})
        forge(c, "a", video("a") + np.float16(1))
        c.close(compact=False)
    with open_cache(cache_path, "r") as c:
        assert c.read("a").shape == video("a").shape  # the file checks alone cannot tell
        with pytest.raises(CacheError, match="'a' does not match its stored sha1") as e:
            c.read("a", verify=True)
        assert "packs/v-" in str(e.value)
        np.testing.assert_array_equal(c.read("b", verify=True), video("b"))
        assert list(c.verify()) == ["a"] and "sha1" in c.verify(["a"])["a"]
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        assert resume(cache_path, backend, ["a", "b"]) == {"b"}
    assert "damaged video 'a'" in caplog.text
    with open_cache(cache_path, "r") as c:
        np.testing.assert_array_equal(c.read("a", verify=True), video("a"))
