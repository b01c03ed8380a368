"""Decoding and frame sampling. decord is the decoder; nothing else in the project imports it.

Sampling (``sample_plan``): N points per video, each the start of a window of L+1 consecutive
frames (L flow pairs). Points are the centres of N equal segments of the first n-L frames, so
every window fits inside the video (TSN/TS-LSTM test-time sampling). A video with fewer than N
frames (or no more than L) is *looped*, as MRRN loops short videos: frame k of the plan is
``k mod n``, so the last flow pair of a window may join the last frame to the first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


class VideoDecodeError(RuntimeError):
    """A video cannot be decoded; the message is '<path>: <reason>'."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps > 0 else 0.0


@dataclass(frozen=True)
class SamplePlan:
    """points: (N,) first frame of each window; windows: (N, L+1) frame indices, all < frames."""

    frames: int
    points: np.ndarray
    windows: np.ndarray
    looped: bool

    def needed(self) -> np.ndarray:
        """Sorted unique frame indices the plan decodes."""
        return np.unique(self.windows)

    def pairs(self) -> np.ndarray:
        """(P, 2) unique (a, b) frame-index pairs whose flow the plan needs."""
        a = self.windows[:, :-1].reshape(-1)
        b = self.windows[:, 1:].reshape(-1)
        return np.unique(np.stack([a, b], axis=1), axis=0)


def sample_plan(frames: int, *, num_points: int, pairs: int) -> SamplePlan:
    """Uniform sampling of ``num_points`` windows of ``pairs + 1`` frames in a video of ``frames``."""
    if frames <= 0:
        raise ValueError("a video with no frames has no sampling plan")
    n, big_n, ell = frames, num_points, pairs
    looped = n < big_n or n <= ell
    if looped:
        points = np.arange(big_n) % n
    else:
        span = n - ell  # windows starting in [0, span) end inside the video
        points = np.floor(span * (np.arange(big_n) + 0.5) / big_n).astype(np.int64)
    windows = (points[:, None] + np.arange(ell + 1)[None, :]) % n
    return SamplePlan(frames=n, points=points.astype(np.int64), windows=windows, looped=looped)


def dense_plan(frames: int, *, pairs: int = 1) -> SamplePlan:
    """Every frame as a point: windows (frames - pairs, pairs + 1) of consecutive frames, so the
    flow of every consecutive pair is computed once (for 3D flow clips). Videos of at most
    ``pairs`` frames are looped to one window."""
    if frames <= 0:
        raise ValueError("a video with no frames has no sampling plan")
    looped = frames <= pairs
    points = np.arange(max(frames - pairs, 1), dtype=np.int64)
    windows = (points[:, None] + np.arange(pairs + 1)[None, :]) % frames
    return SamplePlan(frames=frames, points=points, windows=windows, looped=looped)


def clip_windows(
    length_v: int, *, length: int, stride: int, max_clips: int | None = None
) -> np.ndarray:
    """Clips of ``length`` consecutive steps every ``stride`` steps -> (K, length) indices.

    K = floor((l - s) / r) + 1, which for s = 2r is Res-LSTM's K_v = floor(l_v / r) - 1 (sec. 3.1),
    the first ``max_clips`` of them (MRRN sec. 4.1: 30-frame clips, stride 8, at most 20). A video
    shorter than one clip is looped (MRRN: "we will loop the video if necessary")."""
    if length_v <= 0:
        raise ValueError("a video with no frames has no clips")
    if length < 1 or stride < 1:
        raise ValueError(f"clip length and stride must be >= 1, got {length}, {stride}")
    k = max((length_v - length) // stride + 1, 1)
    if max_clips is not None:
        k = min(k, max_clips)
    starts = np.arange(k, dtype=np.int64) * stride
    return (starts[:, None] + np.arange(length, dtype=np.int64)[None, :]) % length_v


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(f"{path}: no such file")
    if path.is_dir():
        raise VideoDecodeError(f"{path}: is a directory, not a video")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    msg = text[-1] if text else type(e).__name__
    return msg[-300:]


def _open_decord(path: Path, size: tuple[int, int] | None = None):  # noqa: ANN202 - untyped
    """A decord reader of ``path``; ``size`` = (width, height) has the decoder scale every frame
    (ffmpeg's scale filter, swscale's default bicubic, anti-aliased when shrinking)."""
    import decord

    w, h = size if size else (-1, -1)
    return decord.VideoReader(str(path), ctx=decord.cpu(0), width=w, height=h, num_threads=1)


def probe(path: Path) -> VideoInfo:
    """Open ``path`` and read its frame count, fps and size; raises VideoDecodeError."""
    path = Path(path)
    _check_file(path)
    try:
        vr = _open_decord(path)
        n = len(vr)
        h, w = vr[0].shape[:2] if n > 0 else (0, 0)
        fps = float(vr.get_avg_fps())
    except Exception as e:  # decord raises its own DECORDError and sometimes RuntimeError
        try:  # containers decord cannot index (animated GIF, some broken indexes)
            frames = _read_all_opencv(path)
        except VideoDecodeError:
            raise VideoDecodeError(f"{path}: not a decodable video ({_first_line(e)})") from e
        n, (h, w) = len(frames), frames[0].shape[:2]
        fps = _opencv_fps(path)
    if n <= 0:
        raise VideoDecodeError(f"{path}: no frames")
    return VideoInfo(frames=n, fps=fps, width=int(w), height=int(h))


RESIZES = ("decoder", "opencv")


def check_resize(resize: str) -> None:
    """Refuse an unknown ``decode.resize`` before any video is read."""
    if resize not in RESIZES:
        raise ValueError(f"decode.resize: unknown '{resize}' (choose from {', '.join(RESIZES)})")


def read_frames(
    path: Path,
    indices: np.ndarray,
    *,
    short_side: int | None = None,
    resize: str = "decoder",
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode frames ``indices`` of ``path`` -> (K, H, W, 3) uint8 RGB, short side resized.

    ``resize`` is how: ``decoder`` has ffmpeg's scaler resize each frame while decoding (its
    colour conversion then runs at the small size too: 1.2x (320x240) to 1.6x (426x240)
    cheaper than ``opencv`` at short side 128, measured in bench/bench_stages.py); ``opencv``
    decodes at full size and resizes with cv2 (INTER_AREA down, INTER_LINEAR up). ``size`` = (width, height) of the
    video as probed saves opening it twice to learn it. A video decord cannot index is read by
    OpenCV and resized with cv2 whatever ``resize`` says.

    Raises VideoDecodeError naming the file when any requested frame cannot be decoded.
    """
    path = Path(path)
    check_resize(resize)
    _check_file(path)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0 or idx.min() < 0:
        raise ValueError(f"{path}: frame indices must be a non-empty list of indices >= 0")
    uniq, inverse = np.unique(idx, return_inverse=True)
    try:
        vr, scaled = _reader(path, short_side if resize == "decoder" else None, size)
        if len(uniq) and uniq[-1] >= len(vr):
            raise VideoDecodeError(f"{path}: frame {uniq[-1]} requested, video has {len(vr)}")
        frames = vr.get_batch(uniq.tolist()).asnumpy()
    except VideoDecodeError:
        raise
    except Exception as e:
        try:
            every = _read_all_opencv(path)
        except VideoDecodeError:
            raise VideoDecodeError(f"{path}: decoding failed ({_first_line(e)})") from e
        if len(uniq) and uniq[-1] >= len(every):
            raise VideoDecodeError(
                f"{path}: decoding failed ({_first_line(e)}); only {len(every)} frames are "
                f"decodable and frame {uniq[-1]} is needed"
            ) from e
        frames, scaled = every[uniq], False
    if short_side and not scaled:
        frames = resize_short_side(frames, short_side)
    if len(uniq) == len(idx) and np.array_equal(uniq, idx):
        return frames  # sorted distinct indices: no copy
    return frames[inverse.reshape(-1)]


def _reader(path: Path, short_side: int | None, size: tuple[int, int] | None):  # noqa: ANN202
    """A decord reader of ``path`` -> (reader, whether its frames already have ``short_side``).
    With ``short_side`` the decoder scales; ``size`` (width, height) is the probed size, and
    where it is unknown ((0, 0), None) the first frame of a native-size reader tells it."""
    if not short_side:
        return _open_decord(path), False
    native = None
    if not (size and all(size)):
        native = _open_decord(path)
        size = native[0].shape[1::-1]
    target = scaled_size(*size, short_side)
    if target != tuple(size):
        return _open_decord(path, target), True
    return (_open_decord(path) if native is None else native), True


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the short side is ``short_side``, aspect kept."""
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    """(K, H, W, C) -> (K, H', W', C) with min(H', W') == short_side, aspect kept (cv2)."""
    h, w = frames.shape[1:3]
    size = scaled_size(w, h, short_side)
    if size == (w, h):
        return frames
    interp = cv2.INTER_AREA if size[1] < h else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, size, interpolation=interp) for f in frames])


def _opencv_fps(path: Path) -> float:
    cap = cv2.VideoCapture(str(path))
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    return float(fps) if fps and fps > 0 else 0.0


def _read_all_opencv(path: Path) -> np.ndarray:
    """Sequential OpenCV decode of every frame: the fallback for what decord cannot index."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        if not cap.isOpened():
            raise VideoDecodeError(f"{path}: OpenCV cannot open it either")
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        raise VideoDecodeError(f"{path}: no decodable frames")
    log.debug("%s: decoded %d frames with the OpenCV fallback", path, len(frames))
    return np.stack(frames)
