"""What each stage costs per video at the papers' settings on real clips, and what that makes
for UCF101, HMDB51 and Kinetics-400: the figures of the README's "Real datasets" section.

It runs the real stages (``python -m stages.<name>``, as dvc.yaml does) on a ``folder`` dataset
of the real clips in ../shared/testdata/videos, with TS-LSTM / TSRNN's settings (paper 004,
000): short side 256, 25 points x 5 flow pairs, TV-L1 (and the fast preset), ResNet-101 at 224
on both streams (random weights: the same work as ImageNet's, which are not on this machine),
pooled features and, for TSRNN, conv maps. Per stage it records the CPU seconds (user + system
of the stage's whole process tree, from ``os.wait4``), the wall time, the peak RSS and the
bytes written. Per-video figures are marginal: the stages run on k clips and on 2k (each clip
twice, under another name), and a video costs the difference over k, so that a process's fixed
cost (importing torch, building ResNet-101, compaction) is not counted per video, as it is not
over a real dataset; bytes are the 2k run's output over 2k. prepare and decode do so little per
video (~0.1 s) next to a process start that the difference is noise: their per-video work
(probe: decode every frame and sha256 the file; check: decode the planned frames at the plan's
size) is timed in this process instead, CPU time, median of 3. Peak RSS is the 2k run's.

Extrapolation (printed with the assumptions): CPU seconds per video are scaled
- for prepare and decode (they decode every frame) by frames per video: the dataset's mean
  frames over the clip's frames, and by pixels for Kinetics (its videos are mostly 340x256+);
- for flow and features by nothing: both do a fixed 25 x 5 pairs / 25 + 25 inputs per video
  at short side 256 whatever the length (the decode part is small next to TV-L1 / ResNet-101);
then divided by the cores (every stage uses them all: probe workers, flow workers, torch
threads), so "hours on N cores" = videos x CPU s/video / N / 3600. Bytes per video are scaled
by the dataset's video count.

    python bench/bench_real_costs.py [--clips test.avi example.avi] [--cores 2 16 64]

About 10 minutes on 2 cores. Prints measured numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "testdata" / "videos"

# Published sizes: video counts of the official lists; mean length from the datasets' papers
# (UCF101: 7.21 s at 25 fps; HMDB51: clips of at least 1 s, ~3.2 s at 30 fps on average;
# Kinetics-400: 10 s clips, ~240k train + 20k val, mostly 25-30 fps, kept at 340x256 by most
# pipelines, which is ~1.13x the pixels of UCF101's 320x240).
DATASETS = {
    "UCF101": {"videos": 13_320, "frames": 186, "pixels": 1.0},
    "HMDB51": {"videos": 6_766, "frames": 96, "pixels": 1.0},
    "Kinetics-400": {"videos": 260_000, "frames": 275, "pixels": 1.13},
}


def params(base: dict, root: Path, *, algorithm: str, output: str) -> dict:
    p = json.loads(json.dumps(base))  # a deep copy
    p["dataset"].update({"name": "folder", "root": str(root), "test_fraction": 0.5})
    p["decode"].update({"num_frames": 25, "flow_pairs": 5, "short_side": 256})
    p["flow"]["algorithm"] = algorithm
    for s in ("rgb", "flow"):
        p["features"][s].update(
            {
                "backbone": "resnet101",
                "weights": "none",
                "crop": 224,
                "precision": "auto",
                "output": output,
                "batch_size": 25,
            }
        )
    return p


def run(cmd: list[str], cwd: Path) -> dict:
    """Run one stage -> {wall, cpu, rss_mb} of its process tree."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 gives the rusage of the stage and of every descendant it waited for (pool workers)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024}


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stage_commands(d: Path) -> dict[str, tuple[list[str], Path]]:
    """{stage: (its command as dvc.yaml runs it, under ``d``; its output)}."""
    m = [sys.executable, "-m"]
    feats = {
        s: [
            *m,
            "stages.features",
            "--stream",
            s,
            "--input",
            str(d / src),
            "--out",
            str(d / f"features/{s}"),
        ]
        for s, src in (("rgb", "decode"), ("flow", "flow"))
    }
    return {
        "prepare": ([*m, "stages.prepare", "--out", str(d / "prepare")], d / "prepare"),
        "decode": (
            [
                *m,
                "stages.decode",
                "--manifest",
                str(d / "prepare/manifest.csv"),
                "--probe",
                str(d / "prepare/probe.csv"),
                "--out",
                str(d / "decode"),
            ],
            d / "decode",
        ),
        "flow": (
            [*m, "stages.flow", "--plan", str(d / "decode/plan.json"), "--out", str(d / "flow")],
            d / "flow",
        ),
        "features@rgb": (feats["rgb"], d / "features/rgb"),
        "features@flow": (feats["flow"], d / "features/flow"),
    }


def run_all(clips: list[str], copies: int, work: Path, *, algorithm: str, output: str) -> dict:
    """Every stage once on ``clips`` x ``copies`` -> {stage: {wall, cpu, rss_mb, bytes}}."""
    root = work / "videos"
    for k in range(copies):
        for i, c in enumerate(clips):  # two classes, so the folder dataset has a split
            d = root / f"class_{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{k}_{c}").symlink_to(VIDEOS / c)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    pfile = work / "params.yaml"
    pfile.write_text(yaml.safe_dump(params(base, root, algorithm=algorithm, output=output)))
    got = {}
    for name, (cmd, out) in stage_commands(work / "data").items():
        got[name] = {**run([*cmd, "--params", str(pfile)], ROOT), "bytes": size(out)}
    return got


def measure(clips: list[str], work: Path, *, algorithm: str, output: str) -> dict[str, dict]:
    """Every stage on k = len(clips) and on 2k videos -> {stage: per video (marginal): wall,
    cpu, bytes; rss_mb of the 2k run}."""
    one = run_all(clips, 1, work / "k", algorithm=algorithm, output=output)
    two = run_all(clips, 2, work / "2k", algorithm=algorithm, output=output)
    k = len(clips)
    got = {}
    inproc = per_video_work(clips)
    for name in one:
        g = {x: (two[name][x] - one[name][x]) / k for x in ("wall", "cpu")}
        if name in inproc:
            g["cpu"] = g["wall"] = inproc[name]
        g["bytes"] = two[name]["bytes"] / (2 * k)
        g["rss_mb"] = two[name]["rss_mb"]
        got[name] = g
        print(
            f"  {name:14s} {g['cpu']:8.2f} CPU s/video  {g['wall']:7.2f} wall s/video  "
            f"peak RSS {g['rss_mb']:6.0f} MB  {g['bytes'] / 1e6:8.3f} MB/video",
            flush=True,
        )
    return got


def per_video_work(clips: list[str]) -> dict[str, float]:
    """CPU seconds per video of prepare's probe and decode's check, in this process."""
    from pipeline.config import DecodeConfig
    from pipeline.plan import decoding, sampling
    from pipeline.preparation import probe_file
    from pipeline.video import read_frames

    dec = DecodeConfig(num_frames=25, flow_pairs=5, short_side=256)
    times: dict[str, list[float]] = {"prepare": [], "decode": []}
    for c in clips:
        path = VIDEOS / c
        runs: dict[str, list[float]] = {"prepare": [], "decode": []}
        for _ in range(3):
            t = time.process_time()
            info = probe_file(path)
            runs["prepare"].append(time.process_time() - t)
            t = time.process_time()
            plan = sampling(dec, info.frames)
            read_frames(
                path,
                plan.needed(),
                decoding=decoding(dec, size=(info.width, info.height)),
            )
            runs["decode"].append(time.process_time() - t)
        for k, v in runs.items():
            times[k].append(sorted(v)[1])  # the median of 3
    return {k: sum(v) / len(v) for k, v in times.items()}


def frames_of(clips: list[str]) -> float:
    from pipeline.video import probe

    return sum(probe(VIDEOS / c).frames for c in clips) / len(clips)


def extrapolate(got: dict[str, dict], clip_frames: float, cores: list[int], title: str) -> None:
    print(f"\n{title}: extrapolated (see the module docstring for the method)")
    head = "| dataset | stage | CPU h | " + " | ".join(f"h on {c} cores" for c in cores)
    print(head + " | disk |")
    print("|" + "---|" * (4 + len(cores)))
    for ds, spec in DATASETS.items():
        for stage, g in got.items():
            scale = 1.0
            if stage in ("prepare", "decode"):
                scale = spec["frames"] / clip_frames * spec["pixels"]
            cpu_h = g["cpu"] * scale * spec["videos"] / 3600
            disk = g["bytes"] * spec["videos"]
            disk_s = f"{disk / 1e9:.1f} GB" if disk > 1e9 else f"{disk / 1e6:.0f} MB"
            hours = " | ".join(f"{cpu_h / c:.1f}" for c in cores)
            print(f"| {ds} | {stage} | {cpu_h:.1f} | {hours} | {disk_s} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", nargs="+", default=["test.avi", "example.avi"])
    ap.add_argument("--cores", nargs="+", type=int, default=[2, 16, 64])
    args = ap.parse_args()
    clip_frames = frames_of(args.clips)
    print(f"clips: {', '.join(args.clips)} (mean {clip_frames:.0f} frames, 320x240)")
    for algorithm, output in (("tvl1", "pooled"), ("tvl1_fast", "maps")):
        title = f"flow {algorithm}, features resnet101 {output}"
        print(f"\n{title}: measured per video")
        with tempfile.TemporaryDirectory(dir=ROOT.parent) as tmp:
            got = measure(args.clips, Path(tmp), algorithm=algorithm, output=output)
        extrapolate(got, clip_frames, args.cores, title)


if __name__ == "__main__":
    main()
