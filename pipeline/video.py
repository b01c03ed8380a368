"""Decoding and frame sampling. PyAV (FFmpeg) is the decoder; nothing else in the project
imports it.

Frame k of a video is the k-th frame of a sequential decode in presentation order: what
``ffmpeg -vsync passthrough`` or PyAV's demux-and-decode of every frame yields. Reads decode
forward from the first frame, keep only the requested frames, convert them at the requested
size, and stop after the last one. No seeking: in AVI files (UCF101, HMDB51) the timestamps a
decoder hands back are in *decode* order (test.avi: 1, 2, 4, 3, 5, ...), so after a seek nothing
says which presentation index a frame has; decord's random access gets exactly that wrong on
XviD with B-frames (Megamind.avi: index 100 gives frame 2). Decoding is cheap next to the colour
conversion, which runs only on kept frames: a whole 164-frame 320x240 UCF101 clip decodes in
~8 ms (bench/bench_decode.py has the figures against decord).

Sampling (``sample_plan``): N points per video, each the start of a window of L+1 consecutive
frames (L flow pairs). Points are the centres of N equal segments of the first n-L frames, so
every window fits inside the video (TSN/TS-LSTM test-time sampling). A video with fewer than N
frames (or no more than L) is *looped*, as MRRN loops short videos: frame k of the plan is
``k mod n``, so the last flow pair of a window may join the last frame to the first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

if TYPE_CHECKING:  # the choices only: decode.resize is checked when params.yaml is loaded
    from pipeline.config import Resize

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
class Decoding:
    """How to read one video's frames; every reader takes this one object (built from the plan:
    ``PlannedVideo.decoding``). ``short_side`` None keeps the decoded size. ``resize``: decoder
    (swscale area averaging while converting to RGB) or opencv (convert at full size, then cv2).
    ``size``: (width, height) as probed, which fixes the output size (None or (0, 0): the first
    decoded frame's size), so every frame comes out alike after a mid-stream resolution change."""

    short_side: int | None = None
    resize: Resize = "decoder"
    size: tuple[int, int] | None = None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the frames read, given the first decoded frame's size."""
        src = self.size if self.size and all(self.size) else (width, height)
        return scaled_size(*src, self.short_side) if self.short_side else tuple(src)


NATIVE = Decoding()  # decoded size, no resize


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


def decoder_id() -> str:
    """The decoder and its versions, for the plan and cache identity: frames decoded by another
    decoder (or another FFmpeg) may differ, so a change redoes the plan and every cache."""
    codec = ".".join(str(v) for v in av.library_versions["libavcodec"])
    return f"pyav {av.__version__} sequential (libavcodec {codec})"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(f"{path}: no such file")
    if path.is_dir():
        raise VideoDecodeError(f"{path}: is a directory, not a video")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")


def _reason(e: Exception) -> str:
    """FFmpeg's own words ('Invalid data found when processing input'), without the errno."""
    text = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
    return text.splitlines()[-1][-300:]


def _open(path: Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """The container and its first video stream, decoded on one thread: the workers of a stage
    already use every core, and one thread makes a damaged file decode the same way each run."""
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{path}: not a decodable video ({_reason(e)})") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "NONE"
    stream.codec_context.thread_count = 1
    return container, stream


def _decoded(
    path: Path, container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> Iterator[av.VideoFrame]:
    """Every frame of ``stream`` in presentation order (the decoder's output order; the final
    empty packet flushes the frames it holds back for B-frame reordering).

    A decoder error or a frame the decoder flags as damaged (concealed errors) raises
    VideoDecodeError: such a file is refused rather than read as whatever concealment drew."""
    k = 0
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                if frame.is_corrupt:
                    raise VideoDecodeError(
                        f"{path}: frame {k} is damaged (the decoder flagged it corrupt)"
                    )
                yield frame
                k += 1
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: decoding failed after {k} frames ({_reason(e)})") from e


def probe(path: Path) -> VideoInfo:
    """Decode every frame of ``path`` (no colour conversion) and count them; raises
    VideoDecodeError. The count is of frames that decode, not the container's claim, which
    can be wrong (corrupted.mp4 claims 50) or absent (Matroska)."""
    path = Path(path)
    _check_file(path)
    container, stream = _open(path)
    with container:
        n, width, height = 0, stream.codec_context.width, stream.codec_context.height
        for frame in _decoded(path, container, stream):
            if n == 0:
                width, height = frame.width, frame.height
            n += 1
        rate = stream.average_rate or stream.guessed_rate
    if n <= 0:
        raise VideoDecodeError(f"{path}: no frames")
    return VideoInfo(frames=n, fps=float(rate) if rate else 0.0, width=width, height=height)


def read_frames(path: Path, indices: np.ndarray, *, decoding: Decoding = NATIVE) -> np.ndarray:
    """Frames ``indices`` (K,) of ``path`` -> (K, H, W, 3) uint8 RGB, read as ``decoding`` says
    (short side, resize method, probed size: see Decoding).

    Frame k is the k-th frame of a sequential decode in presentation order (module docstring).
    The file is decoded forward to the last requested frame; only requested frames are converted
    and kept, at the output size, so memory is K output frames whatever the video's resolution.
    ``decoder`` resizing runs the conversion at the small size too; ``opencv`` converts at full
    size and resizes with cv2 (INTER_AREA down, INTER_LINEAR up).

    Raises VideoDecodeError naming the file when a requested frame is past the end, or when
    the file fails to decode (or a frame is flagged damaged) before the last requested frame.
    """
    path = Path(path)
    _check_file(path)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0 or idx.min() < 0:
        raise ValueError(f"{path}: frame indices must be a non-empty list of indices >= 0")
    uniq, inverse = np.unique(idx, return_inverse=True)
    frames = _read_sorted(path, uniq, decoding=decoding)
    if len(uniq) == len(idx) and np.array_equal(uniq, idx):
        return frames  # sorted distinct indices: no copy
    return frames[inverse.reshape(-1)]


def _read_sorted(path: Path, wanted: np.ndarray, *, decoding: Decoding) -> np.ndarray:
    """Sorted distinct ``wanted`` frame indices -> (K, H, W, 3) uint8, in one forward decode."""
    reformatter = VideoReformatter()
    out: np.ndarray | None = None
    j, n = 0, 0
    container, stream = _open(path)
    with container:
        for frame in _decoded(path, container, stream):
            n += 1
            if n - 1 != wanted[j]:
                continue
            if out is None:
                w, h = decoding.output_size(frame.width, frame.height)
                out = np.empty((len(wanted), h, w, 3), dtype=np.uint8)
            out[j] = _convert(frame, reformatter, out.shape[2], out.shape[1], decoding.resize)
            j += 1
            if j == len(wanted):
                return out
    raise VideoDecodeError(f"{path}: frame {wanted[j]} requested, video has {n}")


def _convert(
    frame: av.VideoFrame, reformatter: VideoReformatter, width: int, height: int, resize: Resize
) -> np.ndarray:
    """One decoded frame -> (height, width, 3) uint8 RGB. The reformatter is reused across a
    video's frames and runs on one thread: by default swscale starts threads for every call,
    which made conversion 2-3x slower than the decode itself (measured on test.avi)."""
    if resize == "decoder" or (frame.width, frame.height) == (width, height):
        rgb = reformatter.reformat(
            frame, width, height, "rgb24", interpolation=Interpolation.AREA, threads=1
        )
        return rgb.to_ndarray()
    rgb = reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
    return resize_short_side(rgb[None], min(width, height))[0]


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
