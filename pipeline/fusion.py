"""Late fusion of per-stream class scores (RGB, optical flow, ...): the fixed rules.

Every stream gives softmax scores (N, C) for the same N videos in the same order. The fusions follow
the papers in ../shared/papers:

- ``sum`` and ``product``: Res-LSTM (001), sec. 3.2, ``y = y^c (+) y^f`` and ``y = y^c (.) y^f``.
- ``weighted``: Res-LSTM (001), Table 2, the TSN weights ``(w_flow, w_rgb) = (1.5, 1)``.
- ``svm``: TSRNN (000), sec. IV, a linear SVM on the stacked L2-normalised scores (and per
  recurrence for heads that give window scores): pipeline/fusion_svm.py.
- ``learned``: stream weights or the SVM chosen by cross-validation on the training videos'
  out-of-fold scores: pipeline/fusion_learn.py.

The fuse stage (every head's tables, per split): pipeline/fusing.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FUSIONS = ("sum", "product", "weighted", "svm", "learned")

# Floor for probabilities before the log in the product fusion: a stream that gives a class exactly
# 0 must lower that class a lot, but not to -inf, or one confident stream would veto all others.
PRODUCT_EPS = 1e-12


def check_streams(
    streams: Mapping[str, np.ndarray], *, what: str, num_classes: int | None = None
) -> tuple[dict[str, np.ndarray], int, int]:
    """Validate {stream: (N, C)} scores; returns (float64 copies, N, C).

    All streams must be 2-D, finite and share N and C (and C == num_classes when that is given).
    """
    if not streams:
        raise ValueError(f"{what}: no streams given")
    out: dict[str, np.ndarray] = {}
    n_ref: tuple[str, int] | None = None
    c_ref: tuple[str, int] | None = None
    for name in sorted(streams):
        arr = np.asarray(streams[name], dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"{what}: stream {name!r} has shape {arr.shape}, expected (N, C)")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: stream {name!r} has NaN or infinite scores")
        n, c = arr.shape
        if n_ref is None:
            n_ref = (name, n)
        elif n != n_ref[1]:
            raise ValueError(
                f"{what}: stream {name!r} has {n} videos but stream {n_ref[0]!r} has {n_ref[1]}"
            )
        if num_classes is not None and c != num_classes:
            raise ValueError(f"{what}: stream {name!r} has {c} classes, expected {num_classes}")
        if c_ref is None:
            c_ref = (name, c)
        elif c != c_ref[1]:
            raise ValueError(
                f"{what}: stream {name!r} has {c} classes but stream {c_ref[0]!r} has {c_ref[1]}"
            )
        out[name] = arr
    assert n_ref is not None and c_ref is not None
    return out, n_ref[1], c_ref[1]


def sum_fuse(test: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sum of probabilities over streams: {stream: (N, C)} -> (N, C)."""
    streams, _, _ = check_streams(test, what="sum fusion")
    return np.sum(np.stack(list(streams.values())), axis=0)


def product_fuse(test: Mapping[str, np.ndarray], *, eps: float = PRODUCT_EPS) -> np.ndarray:
    """Product of probabilities over streams, returned in log space: {stream: (N, C)} -> (N, C).

    Returns ``sum_s log(max(p_s, eps))``, the log of the product of the floored probabilities. It
    has the same argmax (and ranking) as the product but never underflows, however many streams
    or however small the probabilities. Negative scores are rejected: they are not probabilities.
    """
    streams, _, _ = check_streams(test, what="product fusion")
    for name, arr in streams.items():
        if np.any(arr < 0):
            raise ValueError(
                f"product fusion: stream {name!r} has negative scores, not probabilities"
            )
    return np.sum(np.log(np.maximum(np.stack(list(streams.values())), eps)), axis=0)


def weighted_fuse(test: Mapping[str, np.ndarray], *, weights: Mapping[str, float]) -> np.ndarray:
    """Weighted sum of probabilities: {stream: (N, C)} -> sum_s weights[s] * p_s, (N, C).

    Every stream in ``test`` needs a finite weight; weights for streams not in ``test`` are ignored
    (the pipeline default, flow 1.5 : rgb 1, also serves a run that fuses only some streams).
    """
    streams, _, _ = check_streams(test, what="weighted fusion")
    missing = [name for name in streams if name not in weights]
    if missing:
        raise ValueError(
            f"weighted fusion: no weight for stream(s) {missing}; "
            f"weights given for {sorted(weights)}"
        )
    fused = np.zeros_like(next(iter(streams.values())))
    for name, arr in streams.items():
        w = float(weights[name])
        if not np.isfinite(w):
            raise ValueError(f"weighted fusion: weight for stream {name!r} is {w}")
        fused += w * arr
    return fused
