"""Batch norms folded into the convolutions before them (pipeline.inference.fold_batchnorm):
the bare network's throughput with and without folding, channels_last, fp32 and bf16 autocast,
for resnet50 (batch 32 at 224) and r3d_18 (batch 8 of 16 x 112 x 112 clips), on random input,
with the largest relative difference of the folded features.

    python bench/bench_fold.py [--repeats 3]

Prints measured numbers (the median of ``--repeats`` timed batches after a warm-up one); it
asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from pipeline.backbones import build_backbone
from pipeline.inference import inference_model, memory_format, resolve_precision


def _rate(model: torch.nn.Module, x: torch.Tensor, bf16: bool, repeats: int) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), ctx:
        model(x)  # warm-up: oneDNN primitive creation
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return len(x) / sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cpu = torch.device("cpu")
    bf16 = resolve_precision("auto", cpu) == "bf16"
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, native bf16: {bf16}")
    g = torch.Generator().manual_seed(0)
    for name, shape, unit in (
        ("resnet50", (32, 3, 224, 224), "images/s"),
        ("r3d_18", (8, 3, 16, 112, 112), "clips/s"),
    ):
        bb = build_backbone(name, weights="none")
        fmt = memory_format(bb.kind)
        x = torch.randn(*shape, generator=g).contiguous(memory_format=fmt)
        plain = copy.deepcopy(bb.model).to(memory_format=fmt)
        folded = inference_model(bb.model, kind=bb.kind, in_channels=3, device=cpu)
        with torch.inference_mode():
            want, got = bb.model(x[:2]), folded(x[:2])
        diff = float((want - got).abs().max() / want.abs().max())
        for prec in ("fp32", "bf16") if bf16 else ("fp32",):
            a = _rate(plain, x, prec == "bf16", args.repeats)
            b = _rate(folded, x, prec == "bf16", args.repeats)
            print(
                f"{name:<9} {prec}  batch norms kept {a:6.2f}  folded {b:6.2f} {unit}"
                f"  ({b / a:.2f}x)"
            )
        print(f"{name:<9} folded vs kept, fp32 features: max relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
