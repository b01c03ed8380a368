"""Optical flow: TV-L1 and Farneback (opencv-contrib), quantisation to uint8 and stacking.

Flow is clipped to +-bound and mapped linearly to [0, 255] (TS-LSTM sec. 4.1, TSRNN sec. IV-A:
TV-L1 clipped at 20 and rescaled), so a stack of L pairs is 2L uint8 images per sampled point.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import FlowConfig, TVL1Config
from pipeline.video import SamplePlan, read_frames

ALGORITHMS = ("tvl1", "tvl1_fast", "farneback")
# tvl1_fast: the tvl1 block with fewer scales, warps and iterations. Measured on test.avi pairs at
# 256x341 (bench/bench_stages.py): 2.98x faster than the defaults, mean end-point error 0.075 px
# against them: under half a quantisation step (2 * 20 / 255 = 0.157 px).
TVL1_FAST = {"scales": 3, "warps": 1, "inner_iterations": 10, "outer_iterations": 5}


def tvl1_settings(cfg: FlowConfig) -> TVL1Config:
    """The TV-L1 settings in effect: the tvl1 block, with the fast preset applied for tvl1_fast."""
    return replace(cfg.tvl1, **TVL1_FAST) if cfg.algorithm == "tvl1_fast" else cfg.tvl1


def make_flow_fn(cfg: FlowConfig):  # noqa: ANN201 - returns a closure (prev, next) -> (H, W, 2)
    """A function computing dense flow between two grey uint8 frames -> (H, W, 2) float32."""
    if cfg.algorithm in ("tvl1", "tvl1_fast"):
        t = tvl1_settings(cfg)
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(
            tau=t.tau,
            lambda_=t.lambda_,
            theta=t.theta,
            nscales=t.scales,
            warps=t.warps,
            epsilon=t.epsilon,
            innnerIterations=t.inner_iterations,  # sic: OpenCV's spelling
            outerIterations=t.outer_iterations,
            scaleStep=t.scale_step,
            medianFiltering=t.median_filtering,
        )
        return lambda a, b: tvl1.calc(a, b, None)
    if cfg.algorithm == "farneback":
        f = cfg.farneback
        return lambda a, b: cv2.calcOpticalFlowFarneback(
            a, b, None, f.pyr_scale, f.levels, f.winsize, f.iterations, f.poly_n, f.poly_sigma, 0
        )
    raise ValueError(f"flow.algorithm: unknown '{cfg.algorithm}' (choose from {ALGORITHMS})")


def quantise(flow: np.ndarray, bound: float) -> np.ndarray:
    """(..., 2) float flow -> uint8, clip to [-bound, bound] then map linearly to [0, 255]."""
    q = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2 * bound))
    return np.round(q).astype(np.uint8)


def dequantise(q: np.ndarray, bound: float) -> np.ndarray:
    """Inverse of quantise (up to rounding): uint8 -> float32 pixels/frame."""
    return q.astype(np.float32) * (2 * bound / 255.0) - bound


def video_flow(path: Path, plan: SamplePlan, cfg: FlowConfig, *, short_side: int) -> np.ndarray:
    """Flow stacks of one video -> (N, L, 2, H, W) uint8: for point i and pair j the flow
    from frame windows[i, j] to windows[i, j+1], x then y.

    Each distinct frame pair is computed once even when windows overlap (short videos, dense
    sampling), which for a 32-frame clip with N=25, L=5 is 31 pairs instead of 125.
    """
    needed = plan.needed()
    frames = read_frames(path, needed, short_side=short_side)
    grey = {
        int(k): cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for k, f in zip(needed, frames, strict=True)
    }
    flow_fn = make_flow_fn(cfg)
    pair_flow = {}
    for a, b in plan.pairs():
        fl = flow_fn(grey[int(a)], grey[int(b)])
        pair_flow[(int(a), int(b))] = quantise(fl, cfg.bound).transpose(2, 0, 1)  # (2, H, W)
    n, l1 = plan.windows.shape
    h, w = frames.shape[1:3]
    out = np.empty((n, l1 - 1, 2, h, w), dtype=np.uint8)
    for i in range(n):
        for j in range(l1 - 1):
            out[i, j] = pair_flow[(int(plan.windows[i, j]), int(plan.windows[i, j + 1]))]
    return out


def flow_settings(cfg: FlowConfig) -> dict:
    """The settings that determine flow values, for cache metadata (workers excluded)."""
    d = asdict(cfg)
    d.pop("workers")
    if cfg.algorithm == "farneback":
        d.pop("tvl1")
    else:
        d.pop("farneback")
        d["tvl1"] = asdict(tvl1_settings(cfg))
    return d
