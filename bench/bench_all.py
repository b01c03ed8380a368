"""Every benchmark of issue 4 in one run, in this order:

(a) bench_features.py: the features stage against the bare backbone (resnet50, r3d_18), fp32/bf16;
(b) bench_stages.py: decode, flow pairs/s with 1 and 2 processes, tvl1_fast speed-up and EPE,
    RAFT, backbone images/s and bf16 cosine;
(c) and (d) bench_cache.py: Zarr and HDF5 write / random-read MB/s, files and bytes per cache
    (the demo's under data/, extrapolated to UCF101).

    python bench/bench_all.py

Takes about 15 minutes on 2 cores. Prints measured numbers; it asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cache  # noqa: E402
import bench_features  # noqa: E402
import bench_stages  # noqa: E402


def main() -> None:
    for title, module in (
        ("(a) features stage vs bare backbone", bench_features),
        ("(b) stages: decode, flow scaling, fast TV-L1, RAFT, backbones", bench_stages),
        ("(c, d) caches: speed, files and size", bench_cache),
    ):
        print(f"\n=== {title} ===", flush=True)
        t = time.perf_counter()
        sys.argv = [module.__file__]
        module.main()
        print(f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
