"""Run one command and append its wall time and peak memory to a JSON-lines file.

    python bench/stage_meter.py --log times.jsonl -- python -m stages.flow --plan ... --out ...

bench_real_shape.py puts this in front of every stage's ``cmd`` in a copy of dvc.yaml, so that
``dvc repro`` records each stage it runs. One line per run:

    {"stage": "train@lstm-rgb", "wall_s": 41.2, "cpu_s": 70.3, "max_rss_mb": 912.4,
     "tree_peak_rss_mb": 1530.0, "rc": 0, "cmd": [...]}

- ``max_rss_mb``: ``ru_maxrss`` of ``os.wait4`` on the command, which on Linux is the largest
  peak RSS of any one process of its tree (the command or a descendant it waited for), not a sum.
- ``tree_peak_rss_mb``: the highest sum of RSS over the command's live process tree, sampled
  every 0.2 s from /proc with psutil: what the stage held at once (DataLoader and pool workers
  together). Sampling can miss a peak shorter than 0.2 s, and shared pages (torch's libraries,
  forked workers) count once per process, so it overstates what the tree needs.
- ``cpu_s``: user + system CPU of the command and its waited-for descendants.

The command's exit status is passed on, so a failing stage still fails ``dvc repro``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def stage_name(cmd: list[str]) -> str:
    """``python -m stages.train --head lstm --stream rgb ...`` -> ``train@lstm-rgb``, the name
    dvc gives the stage (features: ``features@rgb``; a joint head: ``train_joint@ts_lstm``)."""
    if "-m" not in cmd:
        return " ".join(cmd)
    module = cmd[cmd.index("-m") + 1].removeprefix("stages.")

    def arg(flag: str) -> str | None:
        return cmd[cmd.index(flag) + 1] if flag in cmd else None

    head, stream = arg("--head"), arg("--stream")
    if module == "train" and head:
        return f"train_joint@{head}" if stream == "rgb+flow" else f"train@{head}-{stream}"
    if module == "features" and stream:
        return f"features@{stream}"
    return module


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a worker that ended between listing and reading
            pass
    return total


def run(cmd: list[str], log: Path) -> int:
    """Run ``cmd``, wait for it, append its record to ``log``; -> its exit status."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not done.is_set():
            peak = max(peak, _tree_rss(root))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    record = {
        "stage": stage_name(cmd),
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "max_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "tree_peak_rss_mb": round(peak / 2**20, 1),
        "rc": rc,
        "cmd": cmd,
    }
    with log.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return rc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines file to append to")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given after --")
    code = run(cmd, args.log)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
