"""What making the dataset a DVC dependency of prepare costs (dvc.yaml's prepare deps,
pipeline/dataset_deps.py): ``dvc status`` and ``dvc repro`` times on a synthetic dataset tree.

A throwaway DVC project whose one stage depends on the tree (an absolute path outside the
project, as a dataset usually is) is reproduced once (DVC hashes every byte: md5), then
``dvc status`` is timed twice (DVC's state database holds each file's hash by inode, size and
mtime: only a stat per file), then after one file is added and one rewritten (only those two
are hashed again).

    python bench/bench_dataset_deps.py [--files 13320] [--kb 490] [--classes 101]

UCF101: 13,320 files, 6.5 GB (490 KB a file on average); Kinetics-400: ~650k files, ~450 GB,
too big to write here: run ``--files 200000 --kb 1`` for the stat-bound part and scale. With
RAM to hold the tree, the first hash reads from the page cache: it measures md5, not the disk.
Prints measured numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def dvc(args: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    t = time.perf_counter()
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(
            f"dvc {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return time.perf_counter() - t, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=13_320)
    ap.add_argument("--kb", type=int, default=490)
    ap.add_argument("--classes", type=int, default=101)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench_deps_"))
    try:
        tree, repo = base / "dataset", base / "repo"
        block = os.urandom(args.kb * 1024)
        t = time.perf_counter()
        for i in range(args.files):
            d = tree / f"Class{i % args.classes:03d}"
            if i < args.classes:
                d.mkdir(parents=True)
            # distinct bytes per file (its index up front), so md5 work is not deduplicated
            (d / f"v_{i:06d}.avi").write_bytes(i.to_bytes(8, "little") + block[8:])
        size = args.files * args.kb * 1024
        print(f"{args.files} files, {size / 1e9:.2f} GB written in {time.perf_counter() - t:.0f} s")
        repo.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        dvc(["init", "-q"], repo)
        (repo / "dvc.yaml").write_text(
            f"stages:\n  prepare:\n    cmd: echo listed > out.txt\n"
            f"    deps:\n      - {tree}\n    outs:\n      - out.txt\n"
        )
        s, _ = dvc(["repro", "-q"], repo)
        print(f"dvc repro (hashes every file): {s:.1f} s = {size / s / 1e6:.0f} MB/s")
        for k in (1, 2):
            s, out = dvc(["status"], repo)
            print(f"dvc status #{k} (state database): {s:.2f} s ({out.strip().splitlines()[-1]})")
        shutil.copy(tree / "Class000" / "v_000000.avi", tree / "Class000" / "new.avi")
        (tree / "Class001" / "v_000001.avi").write_bytes(os.urandom(args.kb * 1024))
        s, out = dvc(["status"], repo)
        changed = "prepare:" in out
        print(f"dvc status after 1 added + 1 rewritten: {s:.2f} s (prepare reported: {changed})")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
