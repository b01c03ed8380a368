"""Every benchmark of issue 4 in one run, in this order:

(a) bench_features.py: the features stage against the bare backbone (resnet50, r3d_18), fp32,
    bf16 and bf16 compiled, and the kernel-level bf16 / fp32 ceiling;
    bench_fold.py: the bare network with batch norms kept and folded;
(b) bench_stages.py: decode (and the two resize choices), flow pairs/s with 1 and 2 processes, tvl1_fast speed-up and EPE,
    RAFT, backbone images/s and bf16 cosine;
(c) and (d) bench_cache.py: Zarr and HDF5 write / random-read MB/s, files and bytes per cache
    (the demo's under data/, extrapolated to UCF101);
(e) bench_decode.py: the frame-exact decoder against decord's random access (ms per video,
    wrong frames) and each stage's peak memory on 240p and 1080p clips.

Each runs in its own Python process: the flow pool's spawned workers re-import the main module,
and one that had imported torch (as bench_features does) would time torch imports as flow.

    python bench/bench_all.py

Takes about 30 minutes on 2 cores. Prints measured numbers; it asserts nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    for title, script in (
        ("(a) features stage vs bare backbone", "bench_features.py"),
        ("(a) batch norms folded into the convolutions", "bench_fold.py"),
        ("(b) stages: decode, flow scaling, fast TV-L1, RAFT, backbones", "bench_stages.py"),
        ("(e) frame-exact decoder vs decord, and stage memory", "bench_decode.py"),
        ("(c, d) caches: speed, files and size", "bench_cache.py"),
    ):
        print(f"\n=== {title} ===", flush=True)
        t = time.perf_counter()
        # progress bars go to stderr; the measured numbers to stdout
        subprocess.run([sys.executable, str(HERE / script)], cwd=ROOT, check=True)
        print(f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
