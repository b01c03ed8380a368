"""Training memory and speed with features held in memory or streamed from the caches
(train.memory_gb, pipeline/streams.py).

(a) Conv maps at UCF101 size: a synthetic cache of --videos (13,320) x 25 x 512 x 7 x 7 float16
    built through the cache API (open_cache "w", write, compaction on close), then TSRNN (its
    params.yaml section) trained in a fresh process on it with train's default memory budget:
    the features do not fit, so they are streamed. Printed: the cache's size on disk, which path
    load_features took, the time of its pass over the cache, steps/s, and the training
    process's peak RSS (ru_maxrss). The optimisation steps are capped (--map-steps, one epoch
    over that many batches): a step of TSRNN on 25 x 512 x 7 x 7 maps takes seconds on a CPU,
    and memory does not grow with the number of steps (every batch is read, used and freed).
(b) Pooled features: --pooled-videos (3,200 = 200 batches of 16) x 25 x 1280 float16; a head
    (default lstm, its params.yaml section) trained for one epoch over every video (an epoch,
    so that each compressed chunk of 16 videos is decoded once, as in real training; a capped
    part of a larger cache would decode a chunk for fewer rows) held in memory (memory_gb 4)
    and streamed (memory_gb 0), each in a fresh process, --rounds interleaved rounds: steps/s of
    the optimisation only (the load and Res-LSTM-style prepare excluded), the ratio, and each
    process's peak RSS. Also the read rate of the streamed rows alone (see ``read_child``).
(c) --part held: the in-memory path at the issue's size, --videos x 25 x 2048 float16 (UCF101
    pooled ResNet-50 features: 1.36 GB as float16, 8.3 GB peak before this change): peak RSS
    of loading them and training --map-steps batches of lstm, held in memory (memory_gb 4).

Both caches are written under --root (default /work/tmp_bench) and deleted at the end (--keep
keeps them). Synthetic data: a pool of distinct random arrays reused round robin (generating
8 x 10^9 normals would dominate the run); compression works per ~1 MiB chunk, so reuse across
videos does not shrink the cache. This machine is shared (2 cores): timings move by 10-20%.

    python bench/bench_train_stream.py [--part maps|pooled|both] [--videos 13320]
        [--map-steps 20] [--pooled-videos 3200] [--head lstm] [--root /work/tmp_bench] [--keep]

Prints measured numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAP_SHAPE = (25, 512, 7, 7)
POOLED_SHAPE = (25, 1280)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _disk_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def build(path: Path, shape: tuple[int, ...], videos: int, layout: str) -> None:
    """A cache of ``videos`` float16 arrays of ``shape``, written as the features stage does."""
    from pipeline.cache import open_cache

    rng = np.random.default_rng(0)
    pool = [np.maximum(rng.normal(size=shape), 0).astype(np.float16) for _ in range(7)]
    attrs = {"layout": layout, "backbone": "synthetic", "dim": shape[1]}
    t = time.perf_counter()
    with open_cache(path, "w", attrs=attrs) as c:
        for i in range(videos):
            c.write(f"v_{i:05d}", pool[i % len(pool)], {"source": "bench"})
    dt = time.perf_counter() - t
    payload = videos * pool[0].nbytes / 1e9
    print(
        f"built {path.name}: {videos} x {shape} float16 = {payload:.2f} GB of values, "
        f"{_disk_gb(path):.2f} GB on disk, {dt:.0f} s ({payload / dt * 1e3:.0f} MB/s); "
        f"builder peak RSS {_peak_rss_gb():.2f} GB",
        flush=True,
    )


def _head(name: str, in_dim: int, num_classes: int):  # noqa: ANN202
    """The head and its training settings from params.yaml's heads.<name>."""
    import yaml

    from pipeline.engine import split_head_params
    from pipeline.heads import build_head

    settings, kwargs = split_head_params(
        yaml.safe_load((ROOT / "params.yaml").read_text())["heads"][name]
    )
    return build_head(name, in_dim=in_dim, num_classes=num_classes, **kwargs), settings


def train_child(path: Path, head: str, memory_gb: float, steps: int, threads: int) -> None:
    """In a fresh process: load the features as the train stage does, fit ``steps`` batches,
    predict a few; print one JSON line of measurements."""
    import dataclasses

    import torch

    from pipeline.config import TrainConfig
    from pipeline.engine import fit, predict
    from pipeline.streams import load_features, open_streams

    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s")
    torch.set_num_threads(threads)
    cfg = TrainConfig()
    t = time.perf_counter()
    opened = open_streams([path.parent], ["rgb"])
    ids = opened[0].cache.keys()
    feats = load_features(opened, ids, steps=cfg.steps, memory_gb=memory_gb)
    load_s = time.perf_counter() - t
    rss_load = _peak_rss_gb()
    rows = feats.rows(ids)
    in_dim = feats.dims[0]
    model, s = _head(head, in_dim, 101)
    s = dataclasses.replace(s, epochs=1, pretrain_epochs=0)
    n = min(len(rows), steps * s.batch_size)
    order = np.random.default_rng(0).permutation(len(rows))[:n]
    sub = rows.subset(order)
    y = np.arange(n) % 101
    t = time.perf_counter()
    losses = fit(
        model, sub, y, s, seed=0, desc=f"{head} {'streamed' if feats.streamed else 'held'}"
    )
    fit_s = time.perf_counter() - t
    n_steps = len(range(0, n, s.batch_size)) - (n % s.batch_size == 1)
    t = time.perf_counter()
    probs = predict(model, rows.subset(order[: 4 * s.batch_size]))
    predict_s = time.perf_counter() - t
    print(
        json.dumps(
            {
                "streamed": feats.streamed,
                "rows": len(rows),
                "steps": n_steps,
                "batch_size": s.batch_size,
                "load_s": load_s,
                "fit_s": fit_s,
                "steps_per_s": n_steps / fit_s,
                "predict_rows_per_s": len(probs) / predict_s,
                "loss": losses[0],
                "peak_rss_after_load_gb": rss_load,
                "peak_rss_gb": _peak_rss_gb(),
            }
        ),
        flush=True,
    )


def read_child(path: Path, rows_to_read: int) -> None:
    """Read rate of streamed rows alone (rows/s), no model: batches of 16 in shuffled order
    read one batch at a time (one chunk decoded per row), the same batches through
    engine.iter_batches (what training does: windows of READ_AHEAD_BYTES read in cache order
    by a background thread), and rows in cache order."""
    from pipeline.engine import batch_bounds, iter_batches
    from pipeline.streams import load_features, open_streams

    opened = open_streams([path.parent], ["rgb"])
    ids = opened[0].cache.keys()
    rows = load_features(opened, ids, memory_gb=0.0).rows(ids)
    n = min(rows_to_read, len(rows))
    shuffled = np.random.default_rng(1).permutation(len(rows))[:n]
    out = {}
    t = time.perf_counter()
    for i in range(0, n, 16):
        rows.take(shuffled[i : i + 16])
    out["shuffled, batch by batch"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in iter_batches(rows, shuffled, batch_bounds(n, 16)):
        pass
    out["shuffled, read-ahead windows (training)"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(0, n, 16):
        rows.take(np.arange(i, min(i + 16, n)))
    out["cache order"] = n / (time.perf_counter() - t)
    print(json.dumps(out), flush=True)


def _run(*args: str) -> dict:
    """This script with ``args`` in a fresh process -> its last JSON line (logs pass through)."""
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT
    )
    for line in proc.stderr.splitlines():
        if line.startswith("  pipeline"):
            print(line)
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        raise SystemExit(f"child {args} failed with {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("maps", "pooled", "both", "held"), default="both")
    ap.add_argument("--videos", type=int, default=13_320)
    ap.add_argument("--map-steps", type=int, default=20)
    ap.add_argument("--pooled-videos", type=int, default=3200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10**9)  # children: the cap on batches
    ap.add_argument("--head", default="lstm")
    ap.add_argument("--threads", type=int, default=1)  # 2 shared cores: 1 thread is 3-9x faster
    ap.add_argument("--root", type=Path, default=Path("/work/tmp_bench"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", choices=("train", "read"))
    ap.add_argument("--path", type=Path)
    ap.add_argument("--memory-gb", type=float, default=4.0)
    args = ap.parse_args()
    if args.child == "train":
        train_child(args.path, args.head, args.memory_gb, args.steps, args.threads)
        return
    if args.child == "read":
        read_child(args.path, args.steps)
        return

    from pipeline.config import TrainConfig

    default_gb = TrainConfig().memory_gb
    args.root.mkdir(parents=True, exist_ok=True)
    try:
        if args.part in ("maps", "both"):
            path = args.root / "maps" / "cache"
            build(path, MAP_SHAPE, args.videos, "(T, C, H, W)")
            r = _run(
                "--child", "train", "--path", str(path), "--head", "tsrnn", "--steps",
                str(args.map_steps), "--memory-gb", str(default_gb), "--threads", str(args.threads),
            )  # fmt: skip
            print(
                f"(a) tsrnn on conv maps, train.memory_gb {default_gb:g}: "
                f"{'streamed' if r['streamed'] else 'HELD IN MEMORY'}; {r['rows']} rows; "
                f"pass over the cache {r['load_s']:.0f} s (peak RSS {r['peak_rss_after_load_gb']:.2f} GB); "
                f"{r['steps']} steps of batch {r['batch_size']} (capped at --map-steps "
                f"{args.map_steps}) {r['steps_per_s']:.3f} steps/s; predict "
                f"{r['predict_rows_per_s']:.1f} rows/s; loss {r['loss']:.3f}; "
                f"training peak RSS {r['peak_rss_gb']:.2f} GB",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(path.parent)
        if args.part == "held":
            path = args.root / "held" / "cache"
            build(path, (25, 2048), args.videos, "(T, D)")
            r = _run(
                "--child", "train", "--path", str(path), "--head", "lstm", "--steps",
                str(args.map_steps), "--memory-gb", str(default_gb), "--threads", str(args.threads),
            )  # fmt: skip
            print(
                f"(c) lstm on pooled (25, 2048), train.memory_gb {default_gb:g}: "
                f"{'streamed' if r['streamed'] else 'held in memory'}; {r['rows']} rows; load "
                f"{r['load_s']:.0f} s (peak RSS {r['peak_rss_after_load_gb']:.2f} GB); {r['steps']} "
                f"steps {r['steps_per_s']:.2f} steps/s; training peak RSS {r['peak_rss_gb']:.2f} GB",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(path.parent)
        if args.part in ("pooled", "both"):
            path = args.root / "pooled" / "cache"
            build(path, POOLED_SHAPE, args.pooled_videos, "(T, D)")
            common = ["--path", str(path), "--head", args.head, "--threads", str(args.threads)]
            res = {}
            for _ in range(args.rounds):  # interleaved rounds: the machine is shared
                for name, gb in (("held", "4"), ("streamed", "0")):
                    r = _run(
                        "--child", "train", "--steps", str(args.steps), "--memory-gb", gb, *common
                    )
                    res.setdefault(name, []).append(r)
            for name, rs in res.items():
                best = max(rs, key=lambda r: r["steps_per_s"])
                print(
                    f"(b) {args.head} on pooled {POOLED_SHAPE}, {name}: "
                    f"{'streamed' if best['streamed'] else 'held'}; steps/s "
                    f"{', '.join(format(r['steps_per_s'], '.2f') for r in rs)} (best {best['steps_per_s']:.2f}; "
                    f"{best['steps']} steps of batch {best['batch_size']}); load {best['load_s']:.1f} s; "
                    f"peak RSS {best['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
            best = {k: max(r["steps_per_s"] for r in rs) for k, rs in res.items()}
            median = {k: float(np.median([r["steps_per_s"] for r in rs])) for k, rs in res.items()}
            print(
                f"(b) streamed / held steps/s: {best['streamed'] / best['held']:.2f} (best of "
                f"{args.rounds} rounds each), {median['streamed'] / median['held']:.2f} (medians)",
                flush=True,
            )
            rd = _run("--child", "read", "--path", str(path), "--steps", str(args.pooled_videos))
            print(
                "(b) streamed rows read alone (16 a batch, no model): "
                + ", ".join(f"{k} {v:.0f} rows/s" for k, v in rd.items()),
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(path.parent)
    finally:
        if not args.keep and args.root.exists() and not any(args.root.iterdir()):
            args.root.rmdir()


if __name__ == "__main__":
    main()
