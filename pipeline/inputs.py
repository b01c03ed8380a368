"""Network inputs from decoded frames and flow stacks: crops and normalisation.

Crops (``crops``): ``centre`` (one view), or Res-LSTM's 10 crops, ``ten_mean`` / ``ten_axis``
(sec. 3.3: four corners and the centre, and their mirrors; ten_mean is eq. (5), the mean of the
10 views' features, taken downstream; ten_axis keeps the view axis). A mirrored flow view has its
horizontal component negated, as flipping an image reverses horizontal motion.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

CROP_SCHEMES = ("centre", "ten_mean", "ten_axis")


def centre_crop(x: np.ndarray, crop: int) -> np.ndarray:
    """(..., H, W) -> (..., crop, crop) taken from the centre; H and W must be >= crop."""
    h, w = x.shape[-2:]
    if h < crop or w < crop:
        raise ValueError(f"frame {h}x{w} is smaller than the crop {crop}")
    top, left = (h - crop) // 2, (w - crop) // 2
    return x[..., top : top + crop, left : left + crop]


def n_views(scheme: str) -> int:
    """Number of crops V a crop ``scheme`` gives: 1 for centre, 10 for the ten-crop schemes."""
    if scheme not in CROP_SCHEMES:
        raise ValueError(f"unknown crop scheme '{scheme}' (choose from {', '.join(CROP_SCHEMES)})")
    return 1 if scheme == "centre" else 10


def crop_views(x: np.ndarray, crop: int, scheme: str) -> np.ndarray:
    """(..., H, W) -> (V, ..., crop, crop), the views of crop ``scheme``.

    centre: V = 1, the centre crop. ten_mean / ten_axis: V = 10, Res-LSTM's ten crops (sec. 3.3,
    "10 crops from four corners and the center of each frame, along with their mirrors"), in the
    order top-left, top-right, bottom-left, bottom-right, centre, then those five flipped
    horizontally (views 5..9 are views 0..4 mirrored, W reversed).
    """
    v = n_views(scheme)
    h, w = x.shape[-2:]
    if h < crop or w < crop:
        raise ValueError(f"frame {h}x{w} is smaller than the crop {crop}")
    if v == 1:
        return centre_crop(x, crop)[None]
    top, left = (h - crop) // 2, (w - crop) // 2
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), (top, left)]
    five = [x[..., r : r + crop, c : c + crop] for r, c in corners]
    return np.stack(five + [f[..., ::-1] for f in five])


def _mirror_flow_u(views: np.ndarray) -> np.ndarray:
    """views (V, N, C, ...) uint8 flow, x/y interleaved along C (x at even indices): in the
    mirrored views (5..9 of a ten-crop) a horizontal flip also flips the direction of horizontal
    motion, so u becomes -u, v is kept. pipeline.flow.quantise maps [-b, b] linearly onto
    [0, 255] (q = (u + b) * 255 / 2b, rounded), so the quantised -u is 255 - q: the reflection
    about the quantised zero 127.5. It is exact except at rounding ties; zero flow, stored as
    round(127.5) = 128, mirrors to 127, one level (2b/255) off."""
    if len(views) == 1:
        return views
    if views.dtype != np.uint8:
        raise ValueError(
            f"mirroring flow needs uint8 quantised flow (255 - q negates it), got {views.dtype}"
        )
    views[5:, :, 0::2] = 255 - views[5:, :, 0::2]
    return views


def _crop_last(frames: np.ndarray, crop: int, scheme: str) -> np.ndarray:
    """(T, H, W, C) -> (V, T, crop, crop, C): crop_views of channels-last frames (a view of
    ``frames`` for the centre crop)."""
    return np.moveaxis(crop_views(np.moveaxis(frames, -1, 0), crop, scheme), 1, -1)


def rgb_input(
    frames: np.ndarray,
    *,
    crop: int,
    mean: tuple,
    std: tuple,
    crops: str = "centre",
    index: np.ndarray | None = None,
) -> Tensor:
    """(T, H, W, 3) uint8 -> (V*T, 3, crop, crop) float32, normalised, view-major (rows
    v*T .. v*T+T-1 are view v); V = n_views(crops). With ``index`` (T',) the inputs are frames
    ``index`` of ``frames`` (T' rows per view): each distinct frame is cropped once however
    often ``index`` repeats it (overlapping clips)."""
    views = _crop_last(frames, crop, crops)  # (V, T, c, c, 3)
    if index is not None:
        views = views[:, np.asarray(index)]
    x = _normalise(views, mean, std)
    return x.reshape(-1, *x.shape[2:]).permute(0, 3, 1, 2)


def flow_input(
    stacks: np.ndarray, *, crop: int, mean: tuple, std: tuple, crops: str = "centre"
) -> Tensor:
    """(T, L, 2, H, W) uint8 flow stacks -> (V*T, 2L, crop, crop) float32, normalised,
    view-major, channels x0, y0, x1, y1, ...; mirrored views have u negated (see _mirror_flow_u)."""
    t, ell, two, h, w = stacks.shape
    views = _mirror_flow_u(crop_views(stacks.reshape(t, ell * two, h, w), crop, crops))
    x = _normalise(np.moveaxis(views, 2, -1), mean, std)  # (V, T, c, c, 2L)
    return x.reshape(-1, *x.shape[2:]).permute(0, 3, 1, 2)


def clip_input(
    frames: np.ndarray,
    windows: np.ndarray,
    *,
    crop: int,
    mean: tuple,
    std: tuple,
    crops: str = "centre",
) -> Tensor:
    """Frames (U, H, W, 3) uint8 and clips ``windows`` (K, s) of indices into them ->
    (V*K, 3, s, crop, crop) float32, normalised, view-major: channels before time, as
    torchvision's video models take them. Each distinct frame is cropped once, however many
    clips share it (stride s/2 clips share every frame)."""
    views = _crop_last(frames, crop, crops)[:, np.asarray(windows)]  # (V, K, s, c, c, 3)
    x = _normalise(views, mean, std)
    return x.reshape(-1, *x.shape[2:]).permute(0, 4, 1, 2, 3)


def flow_clip_input(
    flow: np.ndarray, *, crop: int, mean: tuple, std: tuple, crops: str = "centre"
) -> Tensor:
    """Flow clips (K, s, 2, H, W) uint8 (s flow fields per clip, x then y) -> (V*K, 2, s, crop,
    crop) float32, normalised, view-major; mirrored views have u negated (see _mirror_flow_u)."""
    views = _mirror_flow_u(crop_views(flow.transpose(0, 2, 1, 3, 4), crop, crops))
    x = _normalise(np.moveaxis(views, 2, -1), mean, std)  # (V, K, s, c, c, 2)
    return x.reshape(-1, *x.shape[2:]).permute(0, 4, 1, 2, 3)


def _normalise(x: np.ndarray, mean: tuple, std: tuple) -> Tensor:
    """(..., C) uint8, channels last -> float32 (x / 255 - mean_c) / std_c, contiguous. The
    inputs built from it are channels-last in memory, the format the network runs in, so the
    main process has no copy left to make.

    The arithmetic runs once per channel and byte value, into a 256-entry table per channel,
    and cv2.LUT looks every element up in one pass: the same float32 bits as the arithmetic
    on every element, 4.9x faster on 112x112 crops (bench/bench_stages.py)."""
    if x.dtype != np.uint8:
        raise ValueError(f"network inputs are made from uint8 frames or flow, got {x.dtype}")
    c = x.shape[-1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"{c} input channels, but {len(mean)} means and {len(std)} stds")
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    table = ((torch.arange(256, dtype=torch.float32)[:, None] / 255.0 - m) / s).numpy()
    out = cv2.LUT(np.ascontiguousarray(x).reshape(-1, 1, c), table.reshape(1, 256, c))
    return torch.from_numpy(out.reshape(x.shape))
