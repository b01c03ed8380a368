"""The frame-exact decoder against decord's random access, and the stages' peak memory.

(1) ms per video to read the decode plan's frames (25 points x 6 frames, the default plan) at
    short side 256 and 128, decoder resize: ``read_frames`` (PyAV, one forward decode keeping
    only the planned frames) against decord 0.6.0 ``get_batch`` (its random access, with its
    scaler: the decoder before), median of 5, on UCF101-like clips from ../shared/testdata;
    (1b) the two ``decode.resize`` choices, ms per frame;
(2) wrong frames of each: every planned frame (points and flow windows) compared with
    OpenCV's sequential read of the whole file (an independent decoder) at short side 64;
(3) peak memory of each stage (the proportional set size of the stage's whole process tree,
    sampled every 20 ms from /proc) on generated 300-frame 320x240 and 1920x1080 XviD AVIs
    (``--4k`` adds a 120-frame 3840x2160 one), running the real stage modules on a two-video
    CSV dataset at the paper settings (short side 256, 25 points, 5 flow pairs, crop 224,
    tvl1_fast flow, EfficientNet-Lite0 features).

    python bench/bench_decode.py [--4k] [--skip-memory]

Needs decord (in the dev extra) for (1) and (2). Prints measured numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import yaml

from pipeline.video import Decoding, probe, read_frames, sample_plan, scaled_size

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "testdata" / "videos"
CLIPS = ["test.avi", "example.avi", "Megamind.avi", "flipping_a_pancake.mkv"]


def _decord_read(path: Path, idx: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The decoder before: decord's random access, frames scaled by its ffmpeg filter to
    ``size`` (the plan recorded the probed size, so it opened the file once)."""
    import decord

    w, h = size
    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), width=w, height=h, num_threads=1)
    return vr.get_batch(idx.tolist()).asnumpy()


def _median_ms(fn, reps: int = 5) -> float:  # noqa: ANN001
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def bench_speed() -> None:
    print("(1) ms per video, the plan's frames (25 points x 6), decoder resize, median of 5")
    print(f"{'clip':<24} {'frames':>6} {'size':>9} {'side':>4} {'exact':>8} {'decord':>8} ratio")
    for name in CLIPS:
        path = VIDEOS / name
        info = probe(path)
        idx = sample_plan(info.frames, num_points=25, pairs=5).needed()
        for side in (256, 128):
            size = scaled_size(info.width, info.height, side)
            exact = _median_ms(
                lambda p=path, i=idx, s=side: read_frames(p, i, decoding=Decoding(short_side=s))
            )
            old = _median_ms(lambda p=path, i=idx, z=size: _decord_read(p, i, z))
            print(
                f"{name:<24} {info.frames:>6} {info.width:>4}x{info.height:<4} {side:>4} "
                f"{exact:>8.1f} {old:>8.1f} {exact / old:.2f}x"
            )


def bench_resize() -> None:
    print("\n(1b) decode.resize: ms per frame, every other frame at short side 128, median of 5")
    for name in CLIPS:
        path = VIDEOS / name
        idx = np.arange(0, probe(path).frames, 2)
        ms = {
            how: _median_ms(
                lambda p=path, i=idx, h=how: read_frames(
                    p, i, decoding=Decoding(short_side=128, resize=h)
                )
            )
            / len(idx)
            for how in ("decoder", "opencv")
        }
        print(
            f"{name:<24} decoder {ms['decoder']:.3f}  opencv {ms['opencv']:.3f}  "
            f"speed-up {ms['opencv'] / ms['decoder']:.2f}x"
        )


def _opencv_sequential(path: Path, side: int) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        h, w = bgr.shape[:2]
        size = scaled_size(w, h, side)
        out.append(
            cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size, interpolation=cv2.INTER_AREA)
        )
    cap.release()
    return np.stack(out).astype(np.float32)


def _wrong(frames: np.ndarray, idx: np.ndarray, ref: np.ndarray) -> int:
    """Frames farther from the reference frame at their index than 3 grey levels, or than the
    best-matching reference frame (+0.5: near-duplicates in static scenes)."""
    flat = ref.reshape(len(ref), -1)
    bad = 0
    for f, i in zip(frames, idx, strict=True):
        d = np.abs(flat - f.reshape(1, -1).astype(np.float32)).mean(axis=1)
        bad += int(d[i] > 3 or d[i] > d.min() + 0.5)
    return bad


def bench_correctness() -> None:
    print("\n(2) wrong frames against a sequential decode (OpenCV), short side 64")
    print(f"{'clip':<24} {'points: exact':>14} {'decord':>7} {'windows: exact':>15} {'decord':>7}")
    for name in CLIPS:
        path = VIDEOS / name
        ref = _opencv_sequential(path, 64)
        plan = sample_plan(len(ref), num_points=25, pairs=5)
        row = []
        for idx in (plan.points, plan.windows.reshape(-1)):
            uniq, inv = np.unique(idx, return_inverse=True)
            exact = read_frames(path, uniq, decoding=Decoding(short_side=64, resize="opencv"))[inv]
            import decord

            vr = decord.VideoReader(str(path), num_threads=1)
            old = np.stack(
                [
                    cv2.resize(f, ref.shape[2:0:-1], interpolation=cv2.INTER_AREA)
                    for f in vr.get_batch(uniq.tolist()).asnumpy()
                ]
            )[inv]
            row += [f"{_wrong(exact, idx, ref)}/{len(idx)}", f"{_wrong(old, idx, ref)}/{len(idx)}"]
        print(f"{name:<24} {row[0]:>14} {row[1]:>7} {row[2]:>15} {row[3]:>7}")


# -- (3) peak memory of each stage ---------------------------------------------------------------


def _write_xvid(path: Path, width: int, height: int, frames: int) -> None:
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w", format="avi") as out:
        s = out.add_stream("mpeg4", rate=Fraction(25, 1))
        s.width, s.height, s.pix_fmt, s.codec_tag = width, height, "yuv420p", "XVID"
        s.codec_context.gop_size, s.codec_context.max_b_frames = 60, 2
        s.codec_context.bit_rate = 8_000_000
        for k in range(frames):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0] = (xx + 4 * k) % 256
            img[..., 1] = (yy + 2 * k) % 256
            img[..., 2] = ((xx // 64 + yy // 64 + k // 8) % 2) * 200
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode(None))


def _tree_pss(root: int) -> int:
    """Proportional set size of ``root`` and all its descendants, in bytes, from /proc: a
    shared page counts once over the processes that share it. The stages' processes all map
    torch (~740 MB resident after ``import torch`` here), so summing resident sizes would count
    those pages once per process."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def _peak_rss(cmd: list[str], cwd: Path) -> tuple[int, float]:
    """Run ``cmd``; -> (peak memory of its process tree (PSS), seconds)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_pss(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    _, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return peak, time.perf_counter() - t


def bench_memory(sizes: list[tuple[int, int, int]]) -> None:
    print("\n(3) peak memory (PSS) of each stage's process tree, paper settings")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for width, height, frames in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            big = d / f"big_{height}p.avi"
            t = time.perf_counter()
            _write_xvid(big, width, height, frames)
            print(
                f"{width}x{height} XviD, {frames} frames, {big.stat().st_size / 1e6:.1f} MB "
                f"(written in {time.perf_counter() - t:.0f} s)"
            )
            (d / "data.csv").write_text(
                f"path,label,split\n{big},big,train\n{VIDEOS / 'test.avi'},small,test\n"
            )
            p = base | {
                "dataset": base["dataset"] | {"name": "csv", "csv": str(d / "data.csv")},
                "decode": base["decode"] | {"short_side": 256, "num_frames": 25, "flow_pairs": 5},
                "flow": base["flow"] | {"algorithm": "tvl1_fast"},
                "features": {
                    k: v | {"crop": 224, "batch_size": 32} for k, v in base["features"].items()
                },
            }
            (d / "params.yaml").write_text(yaml.safe_dump(p))
            py, prm = sys.executable, ["--params", str(d / "params.yaml")]
            out = d / "data"
            for stage, args in (
                ("prepare", ["--out", f"{out}/prepare"]),
                (
                    "decode",
                    [
                        "--manifest", f"{out}/prepare/manifest.csv",
                        "--probe", f"{out}/prepare/probe.csv", "--out", f"{out}/decode",
                    ],
                ),
                ("flow", ["--plan", f"{out}/decode/plan.json", "--out", f"{out}/flow"]),
                (
                    "features@rgb",
                    ["--stream", "rgb", "--input", f"{out}/decode", "--out", f"{out}/feat/rgb"],
                ),
                (
                    "features@flow",
                    ["--stream", "flow", "--input", f"{out}/flow", "--out", f"{out}/feat/flow"],
                ),
            ):  # fmt: skip
                module = "stages." + stage.split("@")[0]
                peak, secs = _peak_rss([py, "-m", module, *prm, *args], ROOT)
                print(f"  {stage:<14} peak {peak / 2**20:7.0f} MiB   {secs:5.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--4k", dest="uhd", action="store_true", help="also a 3840x2160 clip")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    bench_speed()
    bench_resize()
    bench_correctness()
    if not args.skip_memory:
        sizes = [(320, 240, 300), (1920, 1080, 300)] + ([(3840, 2160, 120)] if args.uhd else [])
        bench_memory(sizes)


if __name__ == "__main__":
    main()
