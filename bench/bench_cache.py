"""Feature-cache storage: speed of each backend, and how many files and bytes the caches take.

(c) For Zarr (sharded v3) and HDF5: write MB/s of one video at a time (unit packs, durable on
    return), compaction time, then reads of single videos in shuffled order (random) and in id
    order (sequential), as MB/s of uncompressed payload and videos/s, and the compression ratio.
    Two workloads: pooled features (25, 1280) float16 and conv maps (25, 512, 7, 7) float16.
    The data is random normal cast to float16: it compresses worse than real features (whose
    ratio the (d) table shows for the caches found under --data). Reads go through the OS page
    cache (files were just written): this times decoding and the library, not the disk.
(e) What the read checks cost at training read speed: a sequential read of the whole cache
    (every video in id order, as training loads it) without any check, with the default check
    (each pack's files against their size and CRC-32C when first opened), and with each entry's
    sha1 checked too (``read(verify=True)``, what a resumed stage does); MB/s, best and median of
    --rounds interleaved rounds (this machine is shared: single timings move by 10-20%).
(d) For every cache under --data (``**/cache.json``, plus caches of the older per-video layout
    for comparison) and the synthetic caches of (c): videos, files, bytes, bytes per video, and
    an extrapolation to UCF101 (13,320 videos): files = ceil(13320 / videos_per_pack) *
    files_per_pack + 1 (packs hold videos_per_pack videos on average, with content-defined
    boundaries: 206 packs measured for 64, see bench/bench_compaction.py), bytes =
    bytes_per_video * 13320.

    python bench/bench_cache.py [--data data] [--videos 1000] [--videos-per-pack 64]

Prints measured numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

import pipeline.cache.reader
from pipeline.cache import CacheError, open_cache

UCF101 = 13_320
FILES_PER_PACK = {"zarr": 2, "hdf5": 1}  # zarr.json + shard | one .h5


def _files_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def bench_backend(
    root: Path, backend: str, name: str, shape: tuple[int, ...], videos: int, per_pack: int
) -> dict[str, float]:
    """Write ``videos`` random float16 arrays of ``shape``, compact, read them back; timings."""
    rng = np.random.default_rng(0)
    # A few distinct arrays reused round robin: generating 10^8 normals would dominate the run.
    pool = [rng.normal(size=shape).astype(np.float16) for _ in range(16)]
    ids = [f"v_{i:05d}" for i in range(videos)]
    payload = videos * pool[0].nbytes
    path = root / f"{name}-{backend}"
    cache = open_cache(path, "w", attrs={"bench": name}, backend=backend, videos_per_pack=per_pack)
    t = time.perf_counter()
    for i, v in enumerate(ids):
        cache.write(v, pool[i % len(pool)], {"source": v})
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    cache.close()  # the primary writer compacts on close
    t_compact = time.perf_counter() - t
    _, disk = _files_bytes(path / "packs")

    out = {"write": t_write, "compact": t_compact, "payload": payload, "disk": disk}
    for order in ("random", "sequential"):
        reader = open_cache(path, "r")  # fresh: no open packs, empty chunk cache
        todo = list(rng.permutation(ids)) if order == "random" else ids
        t = time.perf_counter()
        for v in todo:
            reader.read(str(v))
        out[order] = time.perf_counter() - t
        reader.close()
    # Spot check: a benchmark of wrong answers is worth nothing.
    with open_cache(path, "r") as reader:
        for i in (0, videos // 2, videos - 1):
            np.testing.assert_array_equal(reader.read(ids[i]), pool[i % len(pool)])
    return out


CHECKS = ("none", "files", "files+sha1")


def bench_checks(path: Path, rounds: int) -> dict[str, list[float]]:
    """Seconds of a sequential read of the cache at ``path`` per check level, ``rounds`` times,
    the levels interleaved so that a slow spell of the machine hits all of them alike."""
    ids = open_cache(path, "r").keys()
    out: dict[str, list[float]] = {k: [] for k in CHECKS}
    try:
        for _ in range(rounds):
            for level in CHECKS:
                # White-box switch: the file check is not optional in the library, the
                # benchmark alone turns it off to time it.
                pipeline.cache.reader.CHECK_FILES = level != "none"
                reader = open_cache(path, "r")  # fresh: nothing opened or checked yet
                t = time.perf_counter()
                for v in ids:
                    reader.read(v, verify=level == "files+sha1")
                out[level].append(time.perf_counter() - t)
                reader.close()
    finally:
        pipeline.cache.reader.CHECK_FILES = True
    return out


def print_checks(rows: list[tuple[str, str, float, dict[str, list[float]]]]) -> None:
    print(
        f"{'workload':<30} {'backend':<7} "
        + " ".join(f"{k + ' MB/s':>22}" for k in CHECKS)
        + f" {'files cost':>10} {'sha1 cost':>9}"
    )
    for name, backend, payload, t in rows:
        best = {k: payload / 1e6 / min(v) for k, v in t.items()}
        med = {k: payload / 1e6 / float(np.median(v)) for k, v in t.items()}
        cells = " ".join(f"{best[k]:>10.0f} (med {med[k]:>5.0f})" for k in CHECKS)
        # cost = how much slower than no check, from the medians
        cost = [1 - med[k] / med["none"] for k in CHECKS[1:]]
        print(f"{name:<30} {backend:<7} {cells} {cost[0]:>10.1%} {cost[1]:>9.1%}")


def print_speed(rows: list[tuple[str, str, dict[str, float]]], videos: dict[str, int]) -> None:
    print(
        f"{'workload':<30} {'backend':<7} {'write MB/s':>10} {'videos/s':>9} "
        f"{'compact s':>9} {'random MB/s':>11} {'videos/s':>9} {'seq MB/s':>9} "
        f"{'videos/s':>9} {'ratio':>6}"
    )
    for name, backend, r in rows:
        mb, n = r["payload"] / 1e6, videos[name]
        print(
            f"{name:<30} {backend:<7} {mb / r['write']:>10.1f} {n / r['write']:>9.0f} "
            f"{r['compact']:>9.2f} {mb / r['random']:>11.1f} {n / r['random']:>9.0f} "
            f"{mb / r['sequential']:>9.1f} {n / r['sequential']:>9.0f} "
            f"{r['payload'] / r['disk']:>6.2f}"
        )


def cache_sizes(roots: list[Path], per_pack: int) -> None:
    """(d): one line per cache directory under each of ``roots``."""
    print(
        f"{'cache':<44} {'layout':<12} {'videos':>6} {'files':>6} {'MB':>8} {'kB/video':>9} "
        f"{'UCF101 files':>12} {'UCF101 GB':>9}"
    )
    for root in roots:
        pack_caches = sorted(p.parent for p in root.glob("**/cache.json"))
        # The older layout: a Zarr group at the cache root, one array directory per video.
        legacy = sorted(
            p.parent
            for p in root.glob("**/zarr.json")
            if p.parent.name == "cache" and not (p.parent / "cache.json").exists()
        )
        for path in pack_caches + legacy:
            files, size = _files_bytes(path)
            if path in pack_caches:
                try:
                    with open_cache(path, "r") as c:
                        videos, layout = len(c), f"packs/{c.backend}"
                except CacheError as e:  # e.g. an older format, until its stage re-runs
                    print(f"{str(path):<44} unreadable: {e}")
                    continue
                ucf_files = math.ceil(UCF101 / per_pack) * FILES_PER_PACK[c.backend] + 1
            else:
                videos = sum(1 for p in path.glob("*/zarr.json"))
                layout = "per-video"
                ucf_files = round((files - 1) / max(videos, 1) * UCF101) + 1
            per_video = size / max(videos, 1)
            print(
                f"{str(path):<44} {layout:<12} {videos:>6} {files:>6} {size / 1e6:>8.2f} "
                f"{per_video / 1e3:>9.1f} {ucf_files:>12} {per_video * UCF101 / 1e9:>9.2f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data"), help="folder searched for caches")
    ap.add_argument("--videos", type=int, default=1000, help="pooled-feature videos (maps: 1/5)")
    ap.add_argument("--videos-per-pack", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the (e) check timings")
    args = ap.parse_args()
    workloads = {
        "pooled (25, 1280) f16": (25, 1280),
        "conv maps (25, 512, 7, 7) f16": (25, 512, 7, 7),
    }
    videos = {"pooled (25, 1280) f16": args.videos}
    videos["conv maps (25, 512, 7, 7) f16"] = max(1, args.videos // 5)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        root = Path(tmp)
        rows, checks = [], []
        for i, (name, shape) in enumerate(workloads.items()):
            for backend in ("zarr", "hdf5"):
                slug = ["pooled", "maps"][i]
                r = bench_backend(root, backend, slug, shape, videos[name], args.videos_per_pack)
                rows.append((name, backend, r))
                t = bench_checks(root / f"{slug}-{backend}", args.rounds)
                checks.append((name, backend, r["payload"], t))
        print(f"(c) speed, random normal float16, videos_per_pack={args.videos_per_pack}")
        print_speed(rows, videos)
        print()
        print(f"(e) sequential read of the whole cache by check, best (median) of {args.rounds}")
        print_checks(checks)
        print()
        print(f"(d) files and bytes per cache; UCF101 = {UCF101} videos at this size")
        roots = [args.data] if args.data.is_dir() else []
        if not roots:
            print(f"    ({args.data} does not exist: synthetic caches of (c) only)")
        cache_sizes([*roots, root], args.videos_per_pack)


if __name__ == "__main__":
    main()
