"""Cache compaction on UCF101's ids: what adding one video rewrites, under the grouping rule
before (runs of ``videos_per_pack`` from the first id) and the content-defined one now.

Builds a real cache (zarr by default) of the 13,320 ids of UCF101 split 1, as the manifest makes
them (``v_ApplyEyeMakeup_g08_c01``), each a small random (T, 64) float16 array (the unit packs
are written once and copied for each rule), compacts it, then adds one video whose id sorts
first and compacts again. For each rule (the rule before is run for real, by putting its
grouping function in place of ``groups``) it prints: packs, videos per pack (mean / min / max),
packs written by the second compaction and the bytes of their files (what DVC would re-hash and
re-push), packs kept with their bytes and inode, and the times of both compactions.

Then, from the grouping alone (no cache written), the same for a flow cache of UCF101 size,
where PACK_BYTES rather than the video count ends packs: (25, 5, 2, 256, 340) uint8 per video
(21.8 MB: 25 points, 5 flow pairs, 256 px short side): packs, and packs replaced by one added
video, first and at 200 random places (mean / max).

    python bench/bench_compaction.py [--splits ../shared/testdata/splits/ucf101_splits]
        [--videos-per-pack 64] [--backend zarr]

Prints measured numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import compaction, open_cache
from pipeline.cache.layout import PACK_BYTES, Group, nbytes
from pipeline.manifest import name_id

ROOT = Path(__file__).resolve().parents[1]
FIRST = "v_AAA_first_g01_c01"  # sorts before every UCF101 id ("v_ApplyEyeMakeup_...")


def consecutive_groups(
    entries: list[tuple[str, dict[str, Any]]], videos_per_pack: int
) -> list[Group]:
    """The rule before content-defined boundaries, as compaction.py had it: consecutive runs of
    the id-sorted entries of at most ``videos_per_pack`` videos, at most PACK_BYTES (a bigger
    video alone) and one dtype."""
    out: list[Group] = []
    cur: Group = []
    size = 0
    for vid, entry in entries:
        n = nbytes(entry)
        if cur and (
            len(cur) >= videos_per_pack
            or size + n > PACK_BYTES
            or entry["dtype"] != cur[0][1]["dtype"]
        ):
            out.append(cur)
            cur, size = [], 0
        cur.append((vid, entry))
        size += n
    if cur:
        out.append(cur)
    return out


def ucf101_ids(splits: Path) -> list[str]:
    """The sorted ids of UCF101 split 1 (trainlist01 + testlist01)."""
    ids = set()
    for f in ["trainlist01.txt", "testlist01.txt"]:
        for line in (splits / f).read_text().splitlines():
            if line.strip():
                ids.add(name_id(Path(line.split()[0]).stem))
    return sorted(ids)


@contextmanager
def rule(grouping: Callable[..., list[Group]]) -> Iterator[None]:
    """Compaction groups with ``grouping`` inside the block."""
    kept = compaction.groups
    compaction.groups = grouping
    try:
        yield
    finally:
        compaction.groups = kept


def pack_files(root: Path) -> dict[str, tuple[int, int, int]]:
    """{pack name: (bytes of its files, inode, mtime_ns) of its top file or folder's data}."""
    out = {}
    for top in (root / "packs").iterdir():
        files = [p for p in top.rglob("*") if p.is_file()] if top.is_dir() else [top]
        data = top / "c" / "0" if top.is_dir() else top
        st = data.stat()
        out[top.name] = (sum(p.stat().st_size for p in files), st.st_ino, st.st_mtime_ns)
    return out


ATTRS = {"bench": "compaction"}
# A few distinct (T, 64) float16 arrays, T from 8 to 23, reused round robin.
POOL = [np.random.default_rng(i).normal(size=(8 + i, 64)).astype(np.float16) for i in range(16)]


def write_units(root: Path, ids: list[str], backend: str) -> float:
    """A cache of one unit pack per id, not compacted (as a killed run leaves it) -> seconds."""
    t = time.perf_counter()
    with open_cache(root, "w", attrs=ATTRS, backend=backend) as c:
        for i, v in enumerate(ids):
            c.write(v, POOL[i % len(POOL)], {"source": v})
        c.close(compact=False)
    return time.perf_counter() - t


def run(root: Path, backend: str, per_pack: int) -> dict[str, Any]:
    """Compact the unit packs at ``root``; add FIRST, compact again -> what the second
    compaction did."""
    kw: dict[str, Any] = {"attrs": ATTRS, "backend": backend, "videos_per_pack": per_pack}
    t = time.perf_counter()
    with open_cache(root, "a", **kw):
        pass  # closing compacts
    first = time.perf_counter() - t
    before = pack_files(root)
    with open_cache(root, "r") as c:
        sizes = {}
        for v in c.keys():
            sizes[c._index[v][0]] = sizes.get(c._index[v][0], 0) + 1  # white-box: its pack
    counts = list(sizes.values())
    t = time.perf_counter()
    with open_cache(root, "a", **kw) as c:
        c.write(FIRST, POOL[3], {"source": FIRST})
    seconds = time.perf_counter() - t
    after = pack_files(root)
    written = set(after) - set(before)
    kept = [n for n in set(before) & set(after) if before[n] == after[n]]
    return {
        "packs": len(counts),
        "mean": statistics.mean(counts),
        "min": min(counts),
        "max": max(counts),
        "written": len(written),
        "written_bytes": sum(after[n][0] for n in written),
        "total_bytes": sum(s for s, _, _ in after.values()),
        "kept": len(kept),
        "packs_after": len(after),
        "first": first,
        "seconds": seconds,
    }


FLOW_SHAPE = [25, 5, 2, 256, 340]  # (T, L, 2, H, W) uint8: UCF101 flow at short_side 256


def replaced(
    grouping: Callable[..., list[Group]], entries: Group, extra: tuple[str, dict[str, Any]], k: int
) -> int:
    """Packs of ``grouping(entries)`` that are not packs once ``extra`` is added."""
    before = {tuple(v for v, _ in g) for g in grouping(entries, k)}
    after = {tuple(v for v, _ in g) for g in grouping(sorted([*entries, extra]), k)}
    return len(before - after)


def flow_sized(ids: list[str], per_pack: int) -> None:
    """Packs and packs replaced per added video, by the grouping alone, at flow size."""
    entry = {"shape": FLOW_SHAPE, "dtype": "|u1"}
    entries = [(v, entry) for v in ids]
    rng = np.random.default_rng(0)
    places = [f"{ids[i]}_x" for i in rng.choice(len(ids), 200, replace=False)]
    print(
        f"flow-sized cache ({nbytes(entry) / 1e6:.1f} MB a video, PACK_BYTES "
        f"{PACK_BYTES >> 20} MiB), grouping only"
    )
    print(
        f"{'rule':<16} {'packs':>6} {'mean':>6} {'min':>4} {'max':>4} {'first':>6} {'random':>12}"
    )
    for name, grouping in {
        "before": consecutive_groups,
        "content (now)": compaction.groups,
    }.items():
        sizes = [len(g) for g in grouping(entries, per_pack)]
        first = replaced(grouping, entries, (FIRST, entry), per_pack)
        anywhere = [replaced(grouping, entries, (v, entry), per_pack) for v in places]
        print(
            f"{name:<16} {len(sizes):>6} {statistics.mean(sizes):>6.1f} {min(sizes):>4} "
            f"{max(sizes):>4} {first:>6} {statistics.mean(anywhere):>6.1f} / {max(anywhere):<3}"
        )
    print("first / random: packs replaced by one added video (random: mean / max of 200)")


def cache_runs(ids: list[str], backend: str, per_pack: int) -> None:
    """The real caches: one per rule, compacted, then one added video compacted again."""
    print(
        f"{len(ids)} UCF101 ids, videos_per_pack={per_pack}, {backend}; "
        f"then one video that sorts first ({FIRST!r}) is added and the cache compacted again"
    )
    header = (
        f"{'rule':<16} {'packs':>6} {'mean':>6} {'min':>4} {'max':>4} {'written':>8} "
        f"{'MB written':>11} {'of MB':>7} {'kept':>6} {'s first':>8} {'s again':>8}"
    )
    rules = {"before": consecutive_groups, "content (now)": compaction.groups}
    with tempfile.TemporaryDirectory(prefix="bench_compaction_") as tmp:
        units = Path(tmp) / "units"
        seconds = write_units(units, ids, backend)
        print(f"{len(ids)} unit packs written in {seconds:.1f} s")
        print(header)
        for name, grouping in rules.items():
            root = Path(tmp) / name.split()[0]
            shutil.copytree(units, root)  # the same unit packs for each rule
            with rule(grouping):
                r = run(root, backend, per_pack)
            print(
                f"{name:<16} {r['packs']:>6} {r['mean']:>6.1f} {r['min']:>4} {r['max']:>4} "
                f"{r['written']:>8} {r['written_bytes'] / 1e6:>11.2f} "
                f"{r['total_bytes'] / 1e6:>7.2f} {r['kept']:>6} {r['first']:>8.2f} "
                f"{r['seconds']:>8.2f}"
            )
    print(
        "written: packs the second compaction wrote (of MB: all packs); kept: packs left with "
        "their bytes and inode; s first / again: seconds of the first compaction and of the one "
        "after the added video"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--splits",
        type=Path,
        default=ROOT.parent / "shared" / "testdata" / "splits" / "ucf101_splits",
        help="folder of UCF101's trainlist01.txt and testlist01.txt",
    )
    ap.add_argument("--videos-per-pack", type=int, default=64)
    ap.add_argument("--backend", choices=["zarr", "hdf5"], default="zarr")
    ap.add_argument("--grouping-only", action="store_true", help="skip the cache runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ids = ucf101_ids(args.splits)
    if not FIRST < ids[0]:
        raise SystemExit(f"{FIRST!r} does not sort before {ids[0]!r}")
    if not args.grouping_only:
        cache_runs(ids, args.backend, args.videos_per_pack)
        print()
    flow_sized(ids, args.videos_per_pack)


if __name__ == "__main__":
    main()
