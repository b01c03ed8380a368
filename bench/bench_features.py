"""Issue 4 (a): throughput of the `features` stage against the bare backbone on the same frames.

For resnet50 (centre crop 224 of frames at short side 256, the decode plan's 25 points) and
r3d_18 (16-frame clips with stride 8, crop 112 at short side 128) on the real clips in
../shared/testdata/videos, each repeated to make a small dataset:

- stage: `stages.features.main` (decode in a DataLoader worker, batching across videos, cache
  writes) run on the dataset and on one half its size: the marginal throughput (extra inputs
  over extra seconds, so fixed start-up costs cancel, as they do over a real dataset) and the
  end-to-end figure of the larger run (model build, first-batch kernel creation, worker start-up
  and compaction included) -> images/s or clips/s;
- bare: the same network inputs decoded beforehand, timed through the model alone over 8
  batches of the same size, after a warm-up batch: fp32 eager (torchvision's model as built,
  contiguous), and the stage's own network (batch norms folded into the convolutions,
  channels_last) in fp32 and bf16 autocast (the same-precision comparison), and that network
  torch.compile'd (``features.compile: true``) in bf16 (fp32 on a CPU without native bf16);
- the kernel ceiling (r3d_18 only): GFLOP/s of its commonest 3x3x3 convolution in fp32 and bf16,
  whose ratio bounds the bf16 gain of a network made of such convolutions;
- every figure is taken in each of ``--rounds`` interleaved rounds (a slow spell of this shared
  machine then touches all of them alike) and printed as the median and range; ratios are
  taken within a round;
- the cosine similarity of the stage's bf16 features against its fp32 ones (goal >= 0.99).

    python bench/bench_features.py [--copies 4] [--rounds 3] [--only resnet50|r3d_18]

Prints measured numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import extract
from pipeline.backbones import build_backbone
from pipeline.cache import open_cache
from pipeline.config import DatasetConfig, DecodeConfig, StreamFeaturesConfig
from pipeline.inference import Compiled, inference_model, memory_format, resolve_precision
from pipeline.plan import read_plan
from stages import decode, features, prepare

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "testdata" / "videos"
CLIPS = ("test.avi", "example.avi", "part_0.mp4", "flipping_a_pancake.mkv")


def _dataset(root: Path, copies: int, short_side: int) -> Path:
    """A folder dataset of ``copies`` links to each real clip, prepared and decoded."""
    for i in range(copies):
        d = root / "videos" / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        for name in CLIPS:
            (d / f"{i}_{name}").symlink_to(VIDEOS / name)
    prepare.main(
        DatasetConfig(name="folder", root=str(root / "videos"), probe_workers=1), root / "prepare"
    )
    decode.main(
        DecodeConfig(num_frames=25, flow_pairs=5, short_side=short_side, workers=2),
        manifest=root / "prepare/manifest.csv",
        probe=root / "prepare/probe.csv",
        out=root / "decode",
    )
    return root / "decode"


def _inputs(cfg: StreamFeaturesConfig, dec: Path, mean: tuple, std: tuple) -> list[torch.Tensor]:
    """The network inputs the stage computes (its own decoding Dataset), decoded up front: what
    the bare figure runs on."""
    plan = read_plan(dec / "plan.json")
    data = extract.VideoInputs(
        cfg,
        stream="rgb",
        ids=list(plan.videos),
        plan=plan,
        flow_cache=None,
        mean=mean,
        std=std,
    )
    return [x for _, x, _, _ in (data[i] for i in range(len(data)))]


def bare(
    model: torch.nn.Module,
    xs: list[torch.Tensor],
    *,
    batch_size: int,
    precision: str,
    fmt: torch.memory_format,
    batches: int,
) -> float:
    """Inputs per second of ``model`` alone on inputs decoded beforehand, over the first
    ``batches`` batches of ``batch_size`` (after a warm-up batch), in fp32 or bf16 autocast."""
    x = torch.cat(xs)[: batch_size * batches]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), ctx:
        model(x[:batch_size].contiguous(memory_format=fmt))  # warm-up
        t = time.perf_counter()
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size].contiguous(memory_format=fmt))
        return len(x) / (time.perf_counter() - t)


def conv_ceiling() -> dict[str, float]:
    """GFLOP/s of R3D-18's commonest convolution (3x3x3, 64 -> 64 channels, batch 8 of 16x56x56,
    channels_last_3d, oneDNN's best kernel) in fp32 and bf16: the kernel-level bf16 / fp32
    ratio of this CPU, which bounds what bf16 can give a network that is nearly all such
    convolutions (96% of R3D-18's bf16 time is in them)."""
    x = torch.randn(8, 64, 16, 56, 56).contiguous(memory_format=torch.channels_last_3d)
    conv = torch.nn.Conv3d(64, 64, 3, padding=1, bias=False)
    conv = conv.to(memory_format=torch.channels_last_3d).eval()
    flops = 2 * x[:, :1].numel() * 64 * 64 * 27
    out = {}
    for prec in ("fp32", "bf16"):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16")
        with torch.inference_mode(), ctx:
            conv(x)  # warm-up: kernel creation, weight reorder
            t = time.perf_counter()
            conv(x), conv(x)
            out[f"kernel: conv3d 64->64 {prec}"] = 2 * flops / (time.perf_counter() - t) / 1e9
    out["kernel: conv3d 64->64 bf16 / fp32"] = (
        out["kernel: conv3d 64->64 bf16"] / out["kernel: conv3d 64->64 fp32"]
    )
    return out


def stage(cfg: StreamFeaturesConfig, dec: Path, out: Path) -> tuple[int, float, dict]:
    """One run of the whole features stage -> (inputs, seconds, {video id: features})."""
    t = time.perf_counter()
    features.main(cfg, stream="rgb", source=dec, out=out)
    dt = time.perf_counter() - t
    with open_cache(out / "cache", "r") as c:
        feats = {k: c.read(k).astype(np.float32) for k in c.keys()}
    return sum(len(f) for f in feats.values()), dt, feats


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine similarity between matching rows of (T, D) features."""
    return float(
        np.min((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
    )


def _spread(values: list[float]) -> str:
    """median (min-max) of a figure over the rounds."""
    med = statistics.median(values)
    return (
        f"{med:8.2f}  ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{med:8.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--copies", type=int, default=4, help="links to each real clip (resnet50)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (median)")
    ap.add_argument("--only", choices=["resnet50", "r3d_18"], help="run one backbone's case")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    native = resolve_precision("auto", torch.device("cpu")) == "bf16"
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, native bf16: {native}")
    cases = [
        ("resnet50 centre 224", 256, args.copies, StreamFeaturesConfig(
            backbone="resnet50", weights="none", crop=224, batch_size=32, device="cpu")),
        # r3d_18 runs ~2.5 clips/s in fp32 here: half the copies keep the bench in minutes
        ("r3d_18 clips 16/8 112", 128, max(args.copies // 2, 1), StreamFeaturesConfig(
            backbone="r3d_18", weights="none", crop=112, batch_size=8, device="cpu",
            sampling="clips", clip_len=16, clip_stride=8)),
    ]  # fmt: skip
    cases = [c for c in cases if args.only in (None, c[0].split()[0])]
    # (label, precision, torch.compile): the stage's eager-mode network in fp32 and bf16, and
    # compiled (features.compile: true) in the fastest precision
    variants = [("fp32", "fp32", False)]
    variants += [("bf16", "bf16", False), ("bf16+compile", "bf16", True)] if native else []
    variants += [] if native else [("fp32+compile", "fp32", True)]
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, short, copies, cfg in cases:
            key = name.split()[0]
            small = _dataset(Path(tmp) / f"{key}_small", max(copies // 2, 1), short)
            dec = _dataset(Path(tmp) / key, copies, short)
            bb = build_backbone(cfg.backbone, weights=cfg.weights)
            xs = _inputs(cfg, dec, bb.mean, bb.std)
            # bare: the stage's own network (batch norms folded, channels_last; compiled in the
            # +compile variant, once for all rounds); eager: torchvision's model as built
            fast = inference_model(
                bb.model, kind=bb.kind, in_channels=3, device=torch.device("cpu")
            )
            nets = {False: fast, True: Compiled(fast)}
            fmt = memory_format(bb.kind)
            unit = "clips/s" if cfg.sampling == "clips" else "images/s"
            fig: dict[str, list[float]] = {}
            feats: dict[str, dict] = {}
            # rounds interleave every figure, so a slow spell of this shared machine touches
            # them alike; ratios are taken within a round
            for r in range(args.rounds):
                run = {"bare fp32 eager": bare(
                    bb.model, xs, batch_size=cfg.batch_size, precision="fp32",
                    fmt=torch.contiguous_format, batches=8)}  # fmt: skip
                for label, prec, comp in variants:
                    c = dataclasses.replace(cfg, precision=prec, compile=comp)
                    run[f"bare {label}"] = bare(
                        nets[comp], xs, batch_size=cfg.batch_size, precision=prec, fmt=fmt,
                        batches=8,
                    )  # fmt: skip
                    out = Path(tmp) / f"{key}_{label}_{r}"
                    n1, t1, _ = stage(c, small, Path(f"{out}_small"))
                    n2, t2, feats[label] = stage(c, dec, out)
                    run[f"stage {label} end-to-end"] = n2 / t2
                    # the extra inputs of the larger run over its extra time: start-up (model
                    # build and compile, first-batch kernels, worker start) and compaction cancel
                    run[f"stage {label}"] = (n2 - n1) / (t2 - t1)
                    run[f"stage / bare, {label} (goal >= 0.9)"] = (
                        run[f"stage {label}"] / run[f"bare {label}"]
                    )
                    if prec == "bf16" or comp:
                        run[f"stage {label} / bare fp32 eager (goal >= 2.5)"] = (
                            run[f"stage {label}"] / run["bare fp32 eager"]
                        )
                if native:
                    run["bare bf16 / bare fp32 (the network's own bf16 gain)"] = (
                        run["bare bf16"] / run["bare fp32"]
                    )
                if native and cfg.sampling == "clips":
                    run |= conv_ceiling()
                for k, v in run.items():
                    fig.setdefault(k, []).append(v)
            rows.append((name, f"{len(xs)} videos, {sum(len(x) for x in xs)} inputs", "", ""))
            for k, v in fig.items():
                u = "x" if "/" in k else "GFLOP/s" if k.startswith("kernel") else unit
                rows.append((name, k, _spread(v), u))
            for label, *_ in variants[1:]:
                cos = min(_cosine(feats["fp32"][k], feats[label][k]) for k in feats["fp32"])
                rows.append((name, f"{label} vs fp32 feature cosine (min)", f"{cos:8.4f}", ""))
    width = max(len(r[1]) for r in rows)
    print(f"median (min-max) of {args.rounds} interleaved rounds. bare: the stage's network")
    print("(batch norms folded, channels_last; +compile: torch.compile'd) alone on 8 batches of")
    print("inputs decoded beforehand;")
    print("eager: torchvision's model as built, contiguous. stage: marginal throughput of the")
    print("larger run over the smaller one (start-up excluded), and end-to-end of the larger run")
    for case, what, value, unit in rows:
        print(f"{case:<22} {what:<{width}} {value} {unit}")


if __name__ == "__main__":
    main()
