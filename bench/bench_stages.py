"""Per-stage throughput on this machine: decode (videos/s), flow (pairs/s), backbone (images/s).

Two inputs: the built-in demo (generated with the settings in params.yaml) and the real UCF101
clip ../shared/testdata/videos/test.avi at the real-data settings (short side 256, crop 224).
It times the inputs' normalisation (table lookup against arithmetic). On real clips it also
compares the two ``decode.resize`` choices (ms per frame decoded and
resized to short side 128: in the decoder, or at full size then cv2 INTER_AREA).

    python bench/bench_stages.py [--flow-videos 24]

Prints measured numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np

# torch is imported inside the functions that need it: the flow pool's spawned workers re-import
# this module, and a torch import in each of them would be timed as flow work.
from pipeline.config import (
    DatasetConfig,
    DecodeConfig,
    FlowConfig,
    StreamFeaturesConfig,
    load_params,
    section,
)
from pipeline.demo import generate_demo
from pipeline.flow import video_flow
from pipeline.plan import decoding, sampling
from pipeline.runner import map_videos
from pipeline.video import Decoding, probe, read_frames

ROOT = Path(__file__).resolve().parents[1]
TEST_AVI = ROOT.parent / "shared" / "testdata" / "videos" / "test.avi"


def _timed(fn, *args, **kw):  # noqa: ANN001, ANN202
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def _flow_one(path: str, *, dec: DecodeConfig, cfg: FlowConfig) -> int:
    cv2.setNumThreads(1)
    info = probe(Path(path))
    plan = sampling(dec, info.frames)
    # as the flow stage reads a planned video: every decode setting, and the probed size
    video_flow(Path(path), plan, cfg, decoding=decoding(dec, size=(info.width, info.height)))
    return len(plan.pairs())


def bench_flow(
    paths: list[str], dec: DecodeConfig, cfg: FlowConfig, workers: int
) -> tuple[float, float]:
    fn = partial(_flow_one, dec=dec, cfg=cfg)
    t = time.perf_counter()
    pairs = sum(
        r
        for _, r, err in map_videos(fn, paths, workers=workers, desc=f"flow x{workers}")
        if not err
    )
    dt = time.perf_counter() - t
    return pairs / dt, len(paths) / dt


def bench_backbone(name: str, weights: str, x, in_channels: int, repeats: int = 3) -> float:  # noqa: ANN001
    """Best of ``repeats`` timed forward passes of the whole batch ``x``, after a warm-up pass:
    torchvision's model as built, fp32, on contiguous (NCHW) input (the stage's inputs come
    channels-last, which alone would make this a faster figure than eager)."""
    import torch

    from pipeline.backbones import build_backbone

    bb = build_backbone(name, weights=weights, in_channels=in_channels)
    x = x.contiguous()
    best = float("inf")
    with torch.inference_mode():
        bb.model(x)  # warm-up: allocations, oneDNN primitive creation
        for _ in range(repeats):
            t = time.perf_counter()
            bb.model(x)
            best = min(best, time.perf_counter() - t)
    return len(x) / best


def bench_normalise(frames: int = 160) -> list[tuple[str, str, float, str]]:
    """ms per frame to normalise 112x112x3 uint8 crops into float32 inputs: the per-channel
    table lookup the stage uses (pipeline.inputs, cv2.LUT) against the per-element arithmetic
    (x / 255 - mean) / std in torch, on one thread as in the decode worker; best of 5."""
    import torch

    from pipeline.inputs import _normalise

    torch.set_num_threads(1)
    x = np.random.default_rng(0).integers(0, 256, (frames, 112, 112, 3), dtype=np.uint8)
    mean, std = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)
    m, sd = torch.tensor(mean), torch.tensor(std)

    def arithmetic() -> torch.Tensor:
        return torch.from_numpy(x).float().div_(255.0).sub_(m).div_(sd)

    ms = {}
    for what, fn in (
        ("table lookup", lambda: _normalise(x, mean, std)),
        ("arithmetic", arithmetic),
    ):
        ms[what] = min(_timed(fn)[1] for _ in range(5)) / frames * 1000
    torch.set_num_threads(os.cpu_count() or 1)
    return [
        ("synthetic", f"normalise 112x112 crops, {w}", v, "ms/frame") for w, v in ms.items()
    ] + [("synthetic", "table lookup speed-up", ms["arithmetic"] / ms["table lookup"], "x")]


def bench_bf16(x) -> list[tuple[str, str, float, str]]:  # noqa: ANN001
    """fp32 eager against the stage's network (batch norms folded, channels_last) under bf16
    autocast on real frames: throughput and the cosine similarity of the features (what
    features.<stream>.precision: bf16 does)."""
    import torch

    from pipeline.backbones import build_backbone
    from pipeline.inference import inference_context, inference_model, resolve_precision

    cpu = torch.device("cpu")
    if resolve_precision("auto", cpu) != "bf16":
        return [("test.avi", "bf16: this CPU has no native bf16, skipped", 0.0, "")]
    rows = []
    for name, weights in (("resnet50", "none"), ("efficientnet_lite0", "imagenet")):
        bb = build_backbone(name, weights=weights)
        with torch.inference_mode():
            ref = bb.model(x)
            model = inference_model(bb.model, kind="2d", in_channels=3, device=cpu)
            xc = x.contiguous(memory_format=torch.channels_last)
            with inference_context(cpu, "bf16"):
                model(xc)  # warm-up
                best = float("inf")
                for _ in range(2):
                    t = time.perf_counter()
                    low = model(xc).float()
                    best = min(best, time.perf_counter() - t)
        cos = float(torch.nn.functional.cosine_similarity(ref, low, dim=1).min())
        rows.append(
            (
                "test.avi",
                f"backbone {name} rgb 224px bf16, folded, channels_last",
                len(x) / best,
                "images/s",
            )
        )
        rows.append(("test.avi", f"{name} bf16 vs fp32 feature cosine (min)", cos, ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--flow-videos", type=int, default=24, help="demo videos timed for flow")
    args = ap.parse_args()
    import torch

    from pipeline.inputs import flow_input, rgb_input

    torch.set_num_threads(os.cpu_count() or 1)
    params = load_params(ROOT / "params.yaml")
    ds = section(params, "dataset", DatasetConfig)
    dec = section(params, "decode", DecodeConfig)
    fcfg = section(params, "flow", FlowConfig)
    feat = section(params, "features.rgb", StreamFeaturesConfig)
    rows: list[tuple[str, str, float, str]] = []
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, opencv {cv2.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        csv_path, gen_s = _timed(generate_demo, Path(tmp), ds.demo)
        paths = sorted(str(p) for p in Path(tmp).rglob("*.avi"))
        rows.append(("demo", "generate", len(paths) / gen_s, "videos/s"))
        t = time.perf_counter()
        for p in paths:
            info = probe(Path(p))
            plan = sampling(dec, info.frames)
            size = info.width, info.height
            read_frames(Path(p), plan.needed(), decoding=decoding(dec, size=size))
        rows.append(
            (
                "demo",
                "decode (probe + planned frames)",
                len(paths) / (time.perf_counter() - t),
                "videos/s",
            )
        )
        sub = paths[:: max(1, len(paths) // args.flow_videos)][: args.flow_videos]
        for w in (1, 2):
            pps, vps = bench_flow(sub, dec, fcfg, w)
            rows.append(
                (
                    "demo",
                    f"flow {fcfg.algorithm} {dec.short_side}px, {w} proc",
                    pps,
                    f"pairs/s ({vps:.2f} videos/s)",
                )
            )
        frames = read_frames(Path(paths[0]), np.arange(dec.num_frames), decoding=decoding(dec))
        x = rgb_input(
            np.concatenate([frames] * 3), crop=feat.crop, mean=(0.5,) * 3, std=(0.25,) * 3
        )
        rows.append(
            (
                "demo",
                f"backbone {feat.backbone} rgb {feat.crop}px",
                bench_backbone(feat.backbone, feat.weights, x, 3),
                "images/s",
            )
        )
        stacks = np.random.default_rng(0).integers(
            0, 255, (len(x), dec.flow_pairs, 2, feat.crop, feat.crop), dtype=np.uint8
        )
        xf = flow_input(stacks, crop=feat.crop, mean=(0.5,) * 10, std=(0.226,) * 10)
        rows.append(
            (
                "demo",
                f"backbone {feat.backbone} flow {feat.crop}px",
                bench_backbone(feat.backbone, feat.weights, xf, 2 * dec.flow_pairs),
                "images/s",
            )
        )

    if TEST_AVI.exists():
        real = DecodeConfig(num_frames=25, flow_pairs=5, short_side=256, workers=1)
        plan = sampling(real, probe(TEST_AVI).frames)
        _, dt = _timed(read_frames, TEST_AVI, plan.needed(), decoding=decoding(real))
        rows.append(("test.avi", "decode 150 planned frames at 256px", 1 / dt, "videos/s"))
        # decode.resize: the decoder's scaler against decoding at full size and cv2 INTER_AREA,
        # every other frame at short side 128 (Res-LSTM's clips)
        for clip in ("test.avi", "flipping_a_pancake.mkv"):
            path = TEST_AVI.parent / clip
            idx = np.arange(0, probe(path).frames, 2)
            ms = {}
            for how in ("decoder", "opencv"):  # best of 3: this shared machine has slow spells
                dt = min(
                    _timed(read_frames, path, idx, decoding=Decoding(short_side=128, resize=how))[1]
                    for _ in range(3)
                )
                ms[how] = dt / len(idx) * 1000
                rows.append((clip, f"decode + resize to 128 ({how})", ms[how], "ms/frame"))
            rows.append(
                (clip, "resize in the decoder: speed-up", ms["opencv"] / ms["decoder"], "x")
            )
        from pipeline.flow import make_flow_fn

        cv2.setNumThreads(1)
        # 10 consecutive pairs from the middle of three real clips with little to more motion
        for clip in ("test.avi", "example.avi", "flipping_a_pancake.mkv"):
            path = TEST_AVI.parent / clip
            mid = probe(path).frames // 2
            frames = read_frames(path, np.arange(mid, mid + 11), decoding=decoding(real))
            grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
            size = "x".join(map(str, grey[0].shape))
            flows, speed = {}, {}
            for algo in ("tvl1", "tvl1_fast", "farneback"):
                fn = make_flow_fn(FlowConfig(algorithm=algo))
                t = time.perf_counter()
                flows[algo] = [fn(a, b) for a, b in zip(grey[:-1], grey[1:], strict=True)]
                speed[algo] = 10 / (time.perf_counter() - t)
                rows.append((clip, f"flow {algo} {size}, 1 thread", speed[algo], "pairs/s"))
            pairs = zip(flows["tvl1_fast"], flows["tvl1"], strict=True)
            epe = np.mean([np.linalg.norm(f - r, axis=2).mean() for f, r in pairs])
            mag = np.mean([np.linalg.norm(r, axis=2).mean() for r in flows["tvl1"]])
            fast = speed["tvl1_fast"] / speed["tvl1"]
            rows.append((clip, "tvl1_fast speed-up over tvl1", fast, "x"))
            rows.append((clip, f"tvl1_fast EPE vs tvl1 (mean |flow| {mag:.2f} px)", epe, "px"))
        cv2.setNumThreads(-1)
        x = rgb_input(
            read_frames(TEST_AVI, plan.points, decoding=decoding(real)),
            crop=224,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
        )
        for name, weights in (("resnet50", "none"), ("efficientnet_lite0", "imagenet")):
            ips = bench_backbone(name, weights, x, 3, repeats=2)
            rows.append(("test.avi", f"backbone {name} rgb 224px fp32", ips, "images/s"))
        rows += bench_normalise()
        rows += bench_bf16(x)
        rows += bench_raft(TEST_AVI)
    else:
        print(f"(skipping test.avi: {TEST_AVI} not found)")

    width = max(len(r[1]) for r in rows)
    print(f"\n{'input':<22} {'stage':<{width}}  throughput")
    for inp, stage, value, unit in rows:
        digits = 4 if unit in ("", "px", "ms/frame") else 2  # cosines, EPEs, small times
        print(f"{inp:<22} {stage:<{width}}  {value:8.{digits}f} {unit}")


def bench_raft(video: Path, pairs: int = 8) -> list[tuple[str, str, float, str]]:
    """raft_small on the CPU (torch's threads, batches of flow.raft.batch_size) at short side 64
    (padded to RAFT's 128 px minimum, so it costs what 128x128 costs) and 256. Random weights
    (flow.raft.weights: none): the speed does not depend on their values, and the benchmark
    then runs on a machine without network or torchvision's file."""
    from pipeline.config import RaftConfig
    from pipeline.flow import make_pairs_flow_fn

    cfg = FlowConfig(algorithm="raft_small", raft=RaftConfig(weights="none", device="cpu"))
    flow = make_pairs_flow_fn(cfg)
    rows = []
    for side in (64, 256):
        frames = read_frames(video, np.arange(pairs + 1), decoding=Decoding(short_side=side))
        flow(frames[:1], frames[1:2])  # warm-up: first-call allocations
        _, dt = _timed(flow, frames[:-1], frames[1:])
        h, w = frames.shape[1:3]
        what = f"flow raft_small {h}x{w} cpu, batch {cfg.raft.batch_size}, {cfg.raft.iterations} it"
        rows.append((video.name, what, pairs / dt, "pairs/s"))
    return rows


if __name__ == "__main__":
    main()
