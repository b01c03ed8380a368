"""Optical flow: TV-L1 and Farneback (opencv-contrib) or torchvision's RAFT, quantisation to
uint8 and stacking.

Flow is clipped to +-bound and mapped linearly to [0, 255] (TS-LSTM sec. 4.1, TSRNN sec. IV-A:
TV-L1 clipped at 20 and rescaled), so a stack of L pairs is 2L uint8 images per sampled point.

TV-L1 and Farneback run on the CPU, one grey frame pair at a time (the PyPI OpenCV wheels have no
CUDA). RAFT (raft_small, raft_large) is the GPU path: batches of RGB frame pairs through one model
per process. Its weights (``flow.raft.weights``): ``default``, torchvision's DEFAULT file from the
torch hub cache, downloaded there when absent, and without it and without network the stage stops
naming the file, its URL and the folder (pipeline.backbones.torchvision_weights, as for the
backbones); ``none``, a seeded random init (reproducible, but not optical flow); or a path to a
state-dict file.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.config import FlowConfig, TVL1Config
from pipeline.video import Decoding, SamplePlan, read_frames

if TYPE_CHECKING:  # torch is imported lazily: the TV-L1 worker processes never need it
    from torch import nn

log = logging.getLogger(__name__)

RAFT_ALGORITHMS = ("raft_small", "raft_large")
# tvl1_fast: the tvl1 block with fewer scales, warps and iterations. Measured on 10 pairs of each
# of three real clips at short side 256 (bench/bench_stages.py): 2.6-3.1x faster than the
# defaults, mean end-point error 0.09-0.22 px against them (mean |flow| 0.3-0.65 px), about one
# uint8 quantisation step (2 * 20 / 255 = 0.157 px).
TVL1_FAST = {"scales": 3, "warps": 1, "inner_iterations": 10, "outer_iterations": 5}
# RAFT's 4-level correlation pyramid needs feature maps of at least 16 cells, and its features
# are at 1/8 resolution: inputs are padded to multiples of 8 and to at least 128 px a side.
RAFT_MULTIPLE = 8
RAFT_MIN_SIDE = 128


def tvl1_settings(cfg: FlowConfig) -> TVL1Config:
    """The TV-L1 settings in effect: the tvl1 block, with the fast preset applied for tvl1_fast."""
    return replace(cfg.tvl1, **TVL1_FAST) if cfg.algorithm == "tvl1_fast" else cfg.tvl1


def make_flow_fn(cfg: FlowConfig):  # noqa: ANN201 - returns a closure (prev, next) -> (H, W, 2)
    """A function computing dense flow between two grey uint8 frames -> (H, W, 2) float32.
    OpenCV algorithms only; RAFT takes batches of RGB pairs (``make_pairs_flow_fn``)."""
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
    # raft_small or raft_large: FlowConfig allows no other algorithm
    raise ValueError(f"flow.algorithm '{cfg.algorithm}' takes RGB pairs: use make_pairs_flow_fn")


PairsFlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def make_pairs_flow_fn(cfg: FlowConfig) -> PairsFlowFn:
    """A function (first, second) -> flow: first, second (P, H, W, 3) uint8 RGB frames ->
    (P, H, W, 2) float32, the flow from first[p] to second[p], x then y.

    TV-L1 and Farneback compute pair by pair on grey frames; RAFT runs ``flow.raft.batch_size``
    pairs per forward pass of a model built once per process (first call)."""
    if cfg.algorithm in RAFT_ALGORITHMS:
        return functools.partial(
            raft_flow,
            raft_model(cfg),
            iterations=cfg.raft.iterations,
            batch_size=cfg.raft.batch_size,
        )
    flow_fn = make_flow_fn(cfg)

    def pairwise(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        grey = functools.partial(cv2.cvtColor, code=cv2.COLOR_RGB2GRAY)
        h, w = first.shape[1:3]
        out = np.empty((len(first), h, w, 2), dtype=np.float32)
        for p, (a, b) in enumerate(zip(first, second, strict=True)):
            out[p] = flow_fn(grey(a), grey(b))
        return out

    return pairwise


# -- RAFT -------------------------------------------------------------------------------------


def raft_weights(cfg: FlowConfig) -> tuple[Path | None, str]:
    """The RAFT weights file in effect (None: random init) and its identity for cache metadata:
    ``<DEFAULT enum> sha256:<16 hex>`` for ``default`` (torchvision's file, from the torch hub
    cache or downloaded there), ``random (seed 0)`` for ``none``, ``file <name> sha256:<16 hex>``
    for a path. No directory enters the identity, so the same weights give the same cache on any
    machine.

    Raises WeightsError (pipeline.backbones) naming the file: torchvision's, when it is absent
    and cannot be downloaded, or a configured one that does not exist."""
    import torchvision

    from pipeline.backbones import resolve_weights, torchvision_weights

    def published() -> tuple[Path, str]:
        enum = torchvision.models.get_model_weights(cfg.algorithm).DEFAULT
        return torchvision_weights(enum, setting="flow.raft.weights: default")

    return resolve_weights(
        cfg.raft.weights, default="default", resolve_default=published, setting="flow.raft.weights"
    )


def raft_model(cfg: FlowConfig) -> nn.Module:
    """The eval-mode RAFT of ``cfg`` on its device (flow.raft.device; auto -> cuda when there is
    one), built on the first call and shared by later calls with the same weights."""
    from pipeline.inference import resolve_device

    if cfg.algorithm not in RAFT_ALGORITHMS:
        raise ValueError(f"flow.algorithm '{cfg.algorithm}' is not RAFT ({RAFT_ALGORITHMS})")
    path, weights_id = raft_weights(cfg)
    device = str(resolve_device(cfg.raft.device))
    # The identity (with the file's hash) is part of the key: a rewritten file is reloaded.
    return _raft_model(cfg.algorithm, None if path is None else str(path), weights_id, device)


@functools.lru_cache(maxsize=2)
def _raft_model(algorithm: str, path: str | None, weights_id: str, device: str) -> nn.Module:
    import torch
    from torchvision.models import optical_flow

    from pipeline.backbones import RANDOM_INIT_SEED, load_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = getattr(optical_flow, algorithm)(weights=None)
    if path is None:
        # Chosen (flow.raft.weights: none), yet said aloud: what random RAFT computes is
        # reproducible but is not optical flow.
        log.warning(
            "%s: RANDOM weights (flow.raft.weights: none, seed %d): the flow is reproducible but "
            "not optical flow",
            algorithm,
            RANDOM_INIT_SEED,
        )
    else:
        load_weights(model, Path(path), name=algorithm)
    log.info("%s on %s, weights %s", algorithm, device, weights_id)
    return model.eval().requires_grad_(False).to(device)


def raft_padding(h: int, w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) replicate padding that makes an h x w frame fit RAFT: sides
    multiples of 8 and at least 128. Split evenly, the odd pixel at the bottom / right, so the
    frame stays in the middle of the input."""

    def fit(n: int) -> int:
        return max(-(-n // RAFT_MULTIPLE) * RAFT_MULTIPLE, RAFT_MIN_SIDE) - n

    ph, pw = fit(h), fit(w)
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2


def raft_flow(
    model: nn.Module,
    first: np.ndarray,
    second: np.ndarray,
    *,
    iterations: int,
    batch_size: int,
) -> np.ndarray:
    """first, second: (P, H, W, 3) uint8 RGB -> (P, H, W, 2) float32 flow from first[p] to
    second[p]: the last of ``iterations`` refinements, ``batch_size`` pairs per forward pass.
    Frames are scaled to [-1, 1] (RAFT's input range) and replicate-padded to fit
    (``raft_padding``); the flow is cropped back to H x W."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own convention

    device = next(model.parameters()).device
    p, h, w = first.shape[:3]
    top, bottom, left, right = raft_padding(h, w)
    out = np.empty((p, h, w, 2), dtype=np.float32)

    def prepare(frames: np.ndarray) -> torch.Tensor:
        # uint8 travels to the device (4x less than float), then (B, 3, H', W') in [-1, 1]
        t = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
        x = F.pad(t / 127.5 - 1.0, (left, right, top, bottom), mode="replicate")
        return x.contiguous()  # same layout whether padded or not: same numerics

    bs = max(1, batch_size)
    with torch.inference_mode():
        for s in range(0, p, bs):
            a, b = prepare(first[s : s + bs]), prepare(second[s : s + bs])
            flow = model(a, b, num_flow_updates=iterations)[-1]  # (B, 2, H', W')
            flow = flow[:, :, top : top + h, left : left + w]
            out[s : s + bs] = flow.permute(0, 2, 3, 1).float().cpu().numpy()
    return out


# -- quantisation and stacks ------------------------------------------------------------------


def quantise(flow: np.ndarray, bound: float) -> np.ndarray:
    """(..., 2) float flow -> uint8, clip to [-bound, bound] then map linearly to [0, 255]."""
    q = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2 * bound))
    return np.round(q).astype(np.uint8)


def dequantise(q: np.ndarray, bound: float) -> np.ndarray:
    """Inverse of quantise (up to rounding): uint8 -> float32 pixels/frame."""
    return q.astype(np.float32) * (2 * bound / 255.0) - bound


def video_flow(path: Path, plan: SamplePlan, cfg: FlowConfig, *, decoding: Decoding) -> np.ndarray:
    """Flow stacks of one video -> (N, L, 2, H, W) uint8: for point i and pair j the flow
    from frame windows[i, j] to windows[i, j+1], x then y.

    Each distinct frame pair is computed once even when windows overlap (short videos, dense
    sampling), which for a 32-frame clip with N=25, L=5 is 31 pairs instead of 125. The pairs
    go to the algorithm in batches: one pair for OpenCV, flow.raft.batch_size for RAFT.
    ``decoding`` says how the frames are read (read_frames).
    """
    needed = plan.needed()
    frames = read_frames(path, needed, decoding=decoding)
    row = {int(k): i for i, k in enumerate(needed)}
    pairs = plan.pairs()
    rows = np.array([[row[int(a)], row[int(b)]] for a, b in pairs], dtype=np.int64)
    flow_fn = make_pairs_flow_fn(cfg)
    step = max(1, cfg.raft.batch_size) if cfg.algorithm in RAFT_ALGORITHMS else 1
    pair_flow = {}
    for s in range(0, len(pairs), step):
        fl = flow_fn(frames[rows[s : s + step, 0]], frames[rows[s : s + step, 1]])
        q = quantise(fl, cfg.bound).transpose(0, 3, 1, 2)  # (p, 2, H, W)
        for (a, b), qp in zip(pairs[s : s + step], q, strict=True):
            pair_flow[(int(a), int(b))] = qp
    n, l1 = plan.windows.shape
    h, w = frames.shape[1:3]
    out = np.empty((n, l1 - 1, 2, h, w), dtype=np.uint8)
    for i in range(n):
        for j in range(l1 - 1):
            out[i, j] = pair_flow[(int(plan.windows[i, j]), int(plan.windows[i, j + 1]))]
    return out


def flow_settings(cfg: FlowConfig) -> dict:
    """The settings that determine flow values, for cache metadata: the algorithm, the bound and
    the block of the algorithm in use. workers, and RAFT's batch_size and device, are left out.

    TV-L1 and Farneback give exactly the dict written before RAFT existed, so their caches stay
    valid. RAFT's weights identity hashes the weights file (``raft_weights``)."""
    d: dict = {"algorithm": cfg.algorithm, "bound": cfg.bound}
    if cfg.algorithm == "farneback":
        d["farneback"] = asdict(cfg.farneback)
    elif cfg.algorithm in RAFT_ALGORITHMS:
        d["raft"] = {"iterations": cfg.raft.iterations, "weights": raft_weights(cfg)[1]}
    else:  # tvl1 or tvl1_fast: FlowConfig allows no other algorithm
        d["tvl1"] = asdict(tvl1_settings(cfg))
    return d
