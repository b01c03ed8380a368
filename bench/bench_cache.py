"""Feature-cache storage: speed of each backend, and how many files and bytes the caches take.

(c) For Zarr (sharded v3) and HDF5: write MB/s of one video at a time (unit packs, durable on
    return), compaction time, then reads of single videos in shuffled order (random) and in id
    order (sequential), as MB/s of uncompressed payload and videos/s, and the compression ratio.
    Two workloads: pooled features (25, 1280) float16 and conv maps (25, 512, 7, 7) float16.
    The data is random normal cast to float16: it compresses worse than real features (whose
    ratio the (d) table shows for the caches found under --data). Reads go through the OS page
    cache (files were just written): this times decoding and the library, not the disk.
(d) For every cache under --data (``**/cache.json``, plus caches of the older per-video layout
    for comparison) and the synthetic caches of (c): videos, files, bytes, bytes per video, and
    an extrapolation to UCF101 (13,320 videos): files = ceil(13320 / videos_per_pack) *
    files_per_pack + 1, bytes = bytes_per_video * 13320.

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

from pipeline.cache import open_cache

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
                with open_cache(path, "r") as c:
                    videos, layout = len(c), f"packs/{c.backend}"
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
    args = ap.parse_args()
    workloads = {
        "pooled (25, 1280) f16": (25, 1280),
        "conv maps (25, 512, 7, 7) f16": (25, 512, 7, 7),
    }
    videos = {"pooled (25, 1280) f16": args.videos}
    videos["conv maps (25, 512, 7, 7) f16"] = max(1, args.videos // 5)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        root = Path(tmp)
        rows = []
        for i, (name, shape) in enumerate(workloads.items()):
            for backend in ("zarr", "hdf5"):
                slug = ["pooled", "maps"][i]
                r = bench_backend(root, backend, slug, shape, videos[name], args.videos_per_pack)
                rows.append((name, backend, r))
        print(f"(c) speed, random normal float16, videos_per_pack={args.videos_per_pack}")
        print_speed(rows, videos)
        print()
        print(f"(d) files and bytes per cache; UCF101 = {UCF101} videos at this size")
        roots = [args.data] if args.data.is_dir() else []
        if not roots:
            print(f"    ({args.data} does not exist: synthetic caches of (c) only)")
        cache_sizes([*roots, root], args.videos_per_pack)


if __name__ == "__main__":
    main()
