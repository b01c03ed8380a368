"""Tests for pipeline/cache/compaction.py, on both backends: unit packs per write, compaction into
few content-named packs (deterministic, keeping unchanged packs, never copying a damaged entry,
never losing a concurrent write), crash leftovers, a killed writer, two writing processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import (
    ATTRS,
    DAMAGE_IDS,
    IDS,
    ROOT,
    VICTIM,
    cache_files,
    damage_file,
    fill,
    forge,
    pack_names,
    resume,
    suffix,
    video,
)

from pipeline.cache import CacheError, compaction, open_cache
from pipeline.cache.compaction import groups, starts_pack
from pipeline.cache.layout import Group, unit_name

# -- packing and compaction -------------------------------------------------------------------


def _packs_for(ids: list[str], videos_per_pack: int) -> int:
    """Packs of small videos (no run near a limit): one per content run (the first id, and each
    id that starts a pack; the rule is tested in tests/test_cache_incremental.py)."""
    return 1 + sum(starts_pack(v, videos_per_pack) for v in sorted(ids)[1:])


def test_compaction_leaves_few_files(cache_path: Path, backend: str) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend, videos_per_pack=64) as c:
        for v in IDS:
            c.write(v, video(v), {"source": f"sha-{v}"})
        assert len(pack_names(cache_path)) == 200  # one unit pack per finished video
    per_pack = 2 if backend == "zarr" else 1  # zarr.json + shard | .h5
    packs = _packs_for(IDS, 64)
    assert packs <= 10  # 200 videos, 64 a pack on average
    assert len(cache_files(cache_path)) == packs * per_pack + 1  # the packs + cache.json
    assert not (cache_path / ".tmp").exists()
    with open_cache(cache_path, "r") as c:
        assert c.keys() == IDS
        for v in IDS:
            np.testing.assert_array_equal(c.read(v), video(v))
            assert c.meta(v) == {"source": f"sha-{v}"}


@pytest.mark.slow
def test_compaction_is_deterministic(tmp_path: Path, backend: str) -> None:
    """The same entries give byte-identical packs, whatever order and sessions wrote them."""
    one, two = tmp_path / "one", tmp_path / "two"
    fill(one, IDS, backend, videos_per_pack=64)
    # Reversed, in two sessions: the first compacts 100 videos into other packs, the second
    # adds the rest, so its compaction must regroup and drop the first one's packs.
    rev = IDS[::-1]
    fill(two, rev[:100], backend, videos_per_pack=64)
    with open_cache(two, "a", attrs=ATTRS, backend=backend, videos_per_pack=64) as c:
        for v in rev[100:]:
            c.write(v, video(v), {"source": f"sha-{v}"})
    a, b = cache_files(one), cache_files(two)
    assert sorted(a) == sorted(b)
    assert len(a) == _packs_for(IDS, 64) * (2 if backend == "zarr" else 1) + 1
    for name in a:
        assert a[name] == b[name], name


def test_compaction_keeps_unchanged_packs(cache_path: Path, backend: str) -> None:
    fill(cache_path, IDS, backend, videos_per_pack=64)
    inodes = {p: (cache_path / "packs" / p).stat().st_ino for p in pack_names(cache_path)}
    with open_cache(cache_path, "a", attrs=ATTRS, backend=backend, videos_per_pack=64) as c:
        c.write("v_200", video("v_200"), {"source": "sha-v_200"})  # sorts last
    after = {p: (cache_path / "packs" / p).stat().st_ino for p in pack_names(cache_path)}
    kept = set(inodes) & set(after)
    assert all(inodes[p] == after[p] for p in kept)
    # Only the last pack changed: v_200 joined it, or (a content boundary) got its own.
    assert len(kept) == len(inodes) - (0 if starts_pack("v_200", 64) else 1)
    assert len(after) == len(kept) + 1
    assert open_cache(cache_path, "r").keys() == [*IDS, "v_200"]


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
                c.write(v, video(v))
            raise KeyError("boom")
    assert (
        all(p.startswith("v-") for p in pack_names(cache_path)) and len(pack_names(cache_path)) == 5
    )
    with open_cache(cache_path, "r") as c:
        assert c.keys() == IDS[:5]
        np.testing.assert_array_equal(c.read(IDS[3]), video(IDS[3]))


def test_a_write_during_compaction_is_not_lost(
    cache_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compaction deletes a unit pack only if it still holds what was absorbed."""
    fill(cache_path, IDS[:20], backend, videos_per_pack=8)
    primary = open_cache(cache_path, "a", attrs=ATTRS, backend=backend, videos_per_pack=8)
    primary.write(IDS[3], np.zeros(5))
    other = open_cache(cache_path, "a", attrs=ATTRS, backend=backend, primary=False)
    name_of = compaction.compact_name

    def late_writes(group: Group, codec: str) -> str:
        # Another rank's writes land after compaction indexed the cache: a new video, and a
        # newer version of the video compaction is absorbing.
        if "late" not in other:
            other.write("late", np.ones(3))
            other.write(IDS[3], np.full(5, 2.0))
        return name_of(group, codec)

    monkeypatch.setattr(compaction, "compact_name", late_writes)
    primary.close()
    with open_cache(cache_path, "r") as c:
        assert c.keys() == sorted([*IDS[:20], "late"])
        np.testing.assert_array_equal(c.read("late"), np.ones(3))
        np.testing.assert_array_equal(c.read(IDS[3]), np.full(5, 2.0))


@pytest.mark.parametrize("damage", ["flip", "sha1"])
def test_compaction_does_not_copy_a_damaged_entry(
    tmp_path: Path, backend: str, damage: str
) -> None:
    fresh, root = tmp_path / "fresh", tmp_path / "damaged"
    fill(fresh, DAMAGE_IDS, backend, videos_per_pack=8)
    with open_cache(root, "w", attrs=ATTRS, backend=backend, videos_per_pack=8) as c:
        for v in DAMAGE_IDS:
            c.write(v, video(v), {"source": f"sha-{v}"})
        if damage == "sha1":
            forge(c, VICTIM, video(VICTIM) * 2)
        c.close(compact=False)  # unit packs, as a killed run leaves them
    if damage == "flip":
        # white-box: the unit pack's name is a hash of the id
        unit = root / "packs" / (unit_name(VICTIM) + suffix(backend))
        f = unit / "c" / "0" if backend == "zarr" else unit
        damage_file(f, 0, f.stat().st_size, "flip")
    with pytest.raises(CacheError, match="damaged entries found while compacting") as e:
        with open_cache(root, "a", attrs=ATTRS, backend=backend, videos_per_pack=8):
            pass  # closing compacts
    assert f"'{VICTIM}'" in str(e.value) and "packs/v-" in str(e.value)
    with open_cache(root, "r") as c:  # compacted without it; every other video is there
        assert c.keys() == [v for v in DAMAGE_IDS if v != VICTIM]
        for v in c.keys():
            np.testing.assert_array_equal(c.read(v, verify=True), video(v))
    assert resume(root, backend, DAMAGE_IDS) == set(DAMAGE_IDS) - {VICTIM}
    assert cache_files(root) == cache_files(fresh)


# -- crashes and several processes -----------------------------------------------------------


def test_leftovers_of_a_crash_are_ignored_then_cleaned(
    tmp_path: Path, cache_path: Path, backend: str
) -> None:
    fill(cache_path, ["a", "b"], backend)
    # A compaction killed before it wrote cache.json leaves an unlisted pack behind; a write
    # killed midway leaves a file in .tmp/.
    ghost = tmp_path / "ghost"
    fill(ghost, ["ghost"], backend)
    (pack,) = pack_names(ghost)
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
        np.testing.assert_array_equal(c.read("b"), video("b"))


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
    entries = [(v, {"shape": [20, 300], "dtype": "|u1"}) for v in done]
    assert len(pack_names(cache_path)) == len(groups(entries, 64))


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
        c.write(v, video(v), {"source": f"sha-{v}"})
    if primary:
        assert done.wait(60)
    c.close()
    if not primary:
        done.set()


@pytest.mark.slow
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
            np.testing.assert_array_equal(c.read(v), video(v))
    single = tmp_path / "single"
    fill(single, ids, backend, videos_per_pack=16)
    assert cache_files(shared) == cache_files(single)
    assert len(pack_names(shared)) == _packs_for(ids, 16)
