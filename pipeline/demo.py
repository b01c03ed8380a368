"""The built-in demo dataset: deterministic synthetic action videos written as real video files.

Six classes in three pairs. Within a pair, exactly one cue tells the classes apart:

- ``motion_left`` / ``motion_right``: the same grey square slides left or right. Every frame of
  one class could belong to the other (the positions visited are the same), so only motion
  direction separates them: optical flow, or the order of frames.
- ``order_red_green`` / ``order_green_red``: a static disc turns from red to green, or green to
  red, half-way through. Both contain the same frames in different order, and the two colours
  have the same luma, so flow (computed on grey frames) sees nothing: only a temporal model of
  the RGB stream separates them. Mean pooling over time cannot.
- ``look_blue`` / ``look_orange``: a square rises; the classes differ only in hue, again at equal
  luma, so their grey videos (what flow sees) are statistically identical: only appearance
  (RGB) separates them.

The action plays over the first ``frames - TAIL`` frames and then holds still: the sampler
places its N points in the first n - L frames (L = 5 by default), and the action must be
symmetric over that span, or the proportion of red frames (or the positions visited) would
give away the class to a model that ignores order.

Backgrounds are static random textures chosen by (group, clip) and never by class, so every
background appears in every class and cannot give a class away. The train/test split keeps
groups apart (like UCF101's gXX groups): test videos are seen on unseen backgrounds.

The three pair families are the demo's class groups in the evaluate report (``class_groups``):
the demo declares them itself, so params.yaml carries no demo-only setting.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import DemoConfig

log = logging.getLogger(__name__)

CLASSES = (
    "look_blue",
    "look_orange",
    "motion_left",
    "motion_right",
    "order_green_red",
    "order_red_green",
)
FAMILIES = {"motion": "motion-only", "order": "order-only", "look": "appearance-only"}
GROUPS_PER_CLASS = 4  # the last group of every class is the test set (25%)
_LUMA = np.array([0.299, 0.587, 0.114])


def family(class_name: str) -> str:
    """The cue that separates a demo class from its twin: motion-only, order-only, appearance-only."""
    return FAMILIES[class_name.split("_", 1)[0]]


def class_groups(classes: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The demo's class groups for the evaluate report, {family: (class-name prefix,)} in
    FAMILIES order, when ``classes`` are the demo's classes (CLASSES, in order); {} otherwise.

    The demo declares its groups here, beside the classes they group, rather than in
    params.yaml: a setting in params.yaml applies to every dataset, and these prefixes name no
    class of UCF101, HMDB51 or the user's own data. The evaluate stage recognises the demo by
    the class names of the manifest it already reads, so it needs no new input or setting.
    """
    if tuple(classes) != CLASSES:
        return {}
    return {fam: (f"{prefix}_",) for prefix, fam in FAMILIES.items()}


def _at_luma(rgb: tuple[int, int, int], luma: float) -> np.ndarray:
    """Scale a colour so its luma (what grey-level flow sees) equals ``luma``."""
    c = np.asarray(rgb, dtype=np.float64)
    return np.clip(c * luma / float(c @ _LUMA), 0, 255)


TAIL = 5  # = the default flow_pairs L; see the module docstring
_TARGET_LUMA = 90.0  # low enough that no colour channel clips, which would change its luma
RED = _at_luma((220, 30, 30), _TARGET_LUMA)
GREEN = _at_luma((30, 200, 30), _TARGET_LUMA)
BLUE = _at_luma((40, 90, 255), _TARGET_LUMA)
ORANGE = _at_luma((255, 140, 10), _TARGET_LUMA)
GREY = np.full(3, 220.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Static smooth texture, mid-grey, so flow has structure to lock on to."""
    noise = rng.uniform(0, 1, (size // 4 + 1, size // 4 + 1, 3))
    tex = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(60 + 50 * tex, 0, 255)


def _square(frame: np.ndarray, cx: float, cy: float, half: float, colour: np.ndarray) -> None:
    h, w = frame.shape[:2]
    y0, y1 = int(round(cy - half)), int(round(cy + half))
    x0, x1 = int(round(cx - half)), int(round(cx + half))
    frame[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = colour


def _disc(frame: np.ndarray, cx: float, cy: float, r: float, colour: np.ndarray) -> None:
    yy, xx = np.mgrid[: frame.shape[0], : frame.shape[1]]
    frame[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


def render(class_name: str, rng: np.random.Generator, bg: np.ndarray, frames: int) -> np.ndarray:
    """One video of ``class_name`` -> (frames, S, S, 3) uint8 RGB."""
    size = bg.shape[0]
    half = size * 0.1
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    kind, detail = class_name.split("_", 1)
    travel = size * rng.uniform(0.55, 0.7)
    lane = rng.uniform(size * 0.25, size * 0.75)
    start = (size - travel) / 2 + rng.uniform(-2, 2)
    span = max(2, frames - TAIL)
    switch = rng.uniform(0.3, 0.7)
    for t in range(frames):
        f = bg.copy()
        s = min(1.0, t / (span - 1))
        if kind == "motion":
            x = start + travel * (s if detail == "right" else 1 - s)
            _square(f, x, lane, half, GREY)
        elif kind == "order":
            first, second = (RED, GREEN) if detail == "red_green" else (GREEN, RED)
            _disc(f, lane, size / 2, half * 1.3, first if s < switch else second)
        else:  # look: rise with a hue that only RGB can see
            y = start + travel * (1 - s)
            _square(f, lane, y, half, BLUE if detail == "blue" else ORANGE)
        out[t] = np.clip(np.round(f), 0, 255).astype(np.uint8)
    return out


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """(T, H, W, 3) uint8 RGB -> Motion-JPEG AVI (decodable by every FFmpeg build)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write Motion-JPEG AVI here")
    try:
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def generate_demo(out_dir: Path, cfg: DemoConfig) -> Path:
    """Write the demo videos under ``out_dir/videos`` and ``out_dir/demo.csv``
    (path,label,split,group); return the CSV path. Same config -> same files."""
    if cfg.videos_per_class < GROUPS_PER_CLASS or cfg.videos_per_class % GROUPS_PER_CLASS:
        raise ValueError(
            f"dataset.demo.videos_per_class must be a multiple of {GROUPS_PER_CLASS} "
            f"(one test group in {GROUPS_PER_CLASS}), got {cfg.videos_per_class}"
        )
    per_group = cfg.videos_per_class // GROUPS_PER_CLASS
    rows = []
    for ci, name in enumerate(CLASSES):
        for g in range(GROUPS_PER_CLASS):
            for k in range(per_group):
                bg = _background(np.random.default_rng([cfg.seed, g, k]), cfg.size)
                rng = np.random.default_rng([cfg.seed, ci, g, k, 1])
                rel = Path("videos") / name / f"{name}_g{g:02d}_c{k:02d}.avi"
                write_video(out_dir / rel, render(name, rng, bg, cfg.frames), cfg.fps)
                split = "test" if g == GROUPS_PER_CLASS - 1 else "train"
                rows.append((rel.as_posix(), name, split, f"g{g:02d}"))
    csv_path = out_dir / "demo.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label", "split", "group"))
        w.writerows(rows)
    log.info("demo: wrote %d videos to %s", len(rows), out_dir)
    return csv_path
