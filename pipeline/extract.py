"""What a features cache holds and how one video becomes its entry: shared by the features
stage (which writes caches and records their settings) and the train stage (which checks them).

One video goes through three steps:
1. ``VideoInputs`` (a Dataset, run in DataLoader workers so decoding overlaps the CNN) decodes
   the frames or reads the flow stacks the sampling asks for and returns the network input:
   (V*n, C, H, W) images for 2D backbones or (V*n, C, s, H, W) clips for 3D ones, V crops.
2. ``forward_batched`` packs the inputs of consecutive videos into fixed-size batches.
3. ``arrange`` turns the outputs back into the entry of the video: (T, D), (V, T, D),
   (T, C, h, w) or (V, T, C, h, w), see ``layout``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.backbones import Backbone, is_3d
from pipeline.cache import FeatureCache, open_cache
from pipeline.config import DecodeConfig, StreamFeaturesConfig
from pipeline.identity import params_identity
from pipeline.inputs import clip_input, flow_clip_input, flow_input, rgb_input
from pipeline.versions import versions
from pipeline.video import clip_windows, read_frames


def cache_attrs(
    cfg: StreamFeaturesConfig,
    bb: Backbone,
    *,
    stream: str,
    precision: str,
    device: str,
    upstream: dict,
) -> dict:
    """The metadata of a features cache: what decides its content (a change starts the cache
    over), including the upstream sampling / flow settings and the library versions."""
    return {
        "kind": "features",
        "stream": stream,
        "params": params_identity(cfg),
        "backbone": cfg.backbone,
        "weights": bb.weights_id,
        "layer": bb.layer,
        "levels": list(bb.levels) if bb.levels else None,
        "crop": cfg.crop,
        "crops": cfg.crops,
        "layout": layout(cfg),
        "dim": bb.dim,
        "dtype": "float16",
        "precision": precision,
        **({"compile": True} if cfg.compile else {}),  # other rounding; caches before it: False
        "device": device,
        "versions": versions(),
        **upstream,
    }


def views_kept(cfg: StreamFeaturesConfig) -> bool:
    """Whether entries have a leading view axis V: kept crops, or MRRN-style clips of per-frame
    2D features (each clip a sequence of its own)."""
    return cfg.crops == "ten_axis" or (cfg.sampling == "clips" and not is_3d(cfg.backbone))


def layout(cfg: StreamFeaturesConfig) -> str:
    """The shape of every entry, as recorded in the cache: '(T, D)', '(V, T, D)',
    '(T, C, H, W)' or '(V, T, C, H, W)'. T may differ between videos (clips, dense sampling)."""
    step = "C, H, W" if cfg.output == "maps" else "D"
    return f"({'V, ' if views_kept(cfg) else ''}T, {step})"


@dataclass(frozen=True)
class Item:
    """One video to extract: ``path`` is the video (rgb) or unused (flow: read from the cache);
    ``points`` the decode plan's frames; ``frames`` the video's frame count (rgb clips);
    ``size`` its (width, height) as probed, (0, 0) where unknown."""

    video_id: str
    path: str
    points: tuple[int, ...] = ()
    frames: int = 0
    size: tuple[int, int] = (0, 0)


class VideoInputs(torch.utils.data.Dataset):
    """Item -> (video id, network input (V*n, ...) float32 or None, n, error or None).

    ``n`` is the number of inputs per view (frames, or clips for 3D). The flow cache is opened
    lazily in each worker process (an HDF5 file handle must not cross a fork)."""

    def __init__(
        self,
        cfg: StreamFeaturesConfig,
        *,
        stream: str,
        items: list[Item],
        decoding: DecodeConfig | None,
        flow_cache: Path | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.cfg, self.stream, self.items = cfg, stream, items
        self.decoding, self.flow_cache = decoding, flow_cache
        self.mean, self.std = mean, std
        self._flow: FeatureCache | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, Tensor | None, int, str | None]:
        item = self.items[i]
        try:
            x, n = self._load(item)
            return item.video_id, x, n, None
        except Exception as e:  # recorded as this video's failure, the others go on
            return item.video_id, None, 0, f"{type(e).__name__}: {e}"

    def _windows(self, length: int) -> np.ndarray:
        c = self.cfg
        return clip_windows(length, length=c.clip_len, stride=c.clip_stride, max_clips=c.max_clips)

    def _frames(self, item: Item, indices: np.ndarray) -> np.ndarray:
        d = self.decoding
        if d is None:
            raise ValueError("the rgb stream reads videos: VideoInputs needs the decode settings")
        return read_frames(
            Path(item.path), indices, short_side=d.short_side, resize=d.resize, size=item.size
        )

    def _load(self, item: Item) -> tuple[Tensor, int]:
        c = self.cfg
        kw = {"crop": c.crop, "mean": self.mean, "std": self.std, "crops": c.crops}
        three_d = is_3d(c.backbone)
        if self.stream == "rgb":
            if c.sampling == "points":
                frames = self._frames(item, np.asarray(item.points))
                return rgb_input(frames, **kw), len(frames)
            w = self._windows(item.frames)
            # each distinct frame is decoded and cropped once, however often the clips repeat it
            needed, inverse = np.unique(w, return_inverse=True)
            frames, w = self._frames(item, needed), inverse.reshape(w.shape)
            if three_d:
                return clip_input(frames, w, **kw), len(w)
            return rgb_input(frames, index=w.reshape(-1), **kw), w.size
        if self._flow is None:
            self._flow = open_cache(self.flow_cache, "r")
        stacks = self._flow.read(item.video_id)  # (P, L, 2, H, W)
        if c.sampling == "points":
            return flow_input(stacks, **kw), len(stacks)
        w = self._windows(len(stacks))
        clips = stacks[w]  # (K, s, L, 2, H, W)
        if three_d:
            if clips.shape[2] != 1:
                raise ValueError(
                    f"3D flow clips need one flow field per step (decode.sampling: dense, "
                    f"flow_pairs: 1); the flow cache has stacks of {clips.shape[2]}"
                )
            return flow_clip_input(clips[:, :, 0], **kw), len(clips)
        return flow_input(clips.reshape(-1, *clips.shape[2:]), **kw), w.size


def forward_batched(
    model: nn.Module, inputs: Iterable[tuple[str, Tensor]], *, batch_size: int
) -> Iterator[tuple[str, Tensor]]:
    """Run ``model`` over per-video inputs (n_i, ...), packing consecutive videos into batches
    of exactly ``batch_size`` (a 25-frame video alone would leave a 64-image batch 60% empty)
    -> (video id, (n_i, ...) float32) in input order.

    Every batch has the same size (the last one is zero-padded) because oneDNN picks its
    kernels by batch size: measured here, a ResNet-50 image gives other bits in a batch of 3
    than in one of 64, but the same bits whatever its position or companions in a batch of 64.
    So a video's features depend on its own input only, and a sharded or resumed run writes
    the same bytes as one uninterrupted process (tests/test_stages.py checks both)."""
    waiting: deque[tuple[str, int]] = deque()  # videos whose outputs are not all computed
    queued: list[Tensor] = []  # inputs not yet run
    n_queued = 0
    outputs: list[Tensor] = []  # outputs not yet handed out

    def run(x: Tensor) -> Tensor:
        n = len(x)
        if n < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
        return model(x)[:n].float()

    def step(final: bool) -> Iterator[tuple[str, Tensor]]:
        nonlocal queued, n_queued, outputs
        if queued:
            x = torch.cat(queued)
            stop = len(x) if final else len(x) - len(x) % batch_size
            outputs += [run(x[i : i + batch_size]) for i in range(0, stop, batch_size)]
            queued, n_queued = ([x[stop:]], len(x) - stop) if stop < len(x) else ([], 0)
        out, used = torch.cat(outputs), 0
        while waiting and used + waiting[0][1] <= len(out):
            vid, n = waiting.popleft()
            yield vid, out[used : used + n]
            used += n
        outputs = [out[used:]] if used < len(out) else []

    for vid, x in inputs:
        waiting.append((vid, len(x)))
        queued.append(x)
        n_queued += len(x)
        if n_queued >= batch_size:
            yield from step(final=False)
    if waiting:
        yield from step(final=True)


def arrange(out: Tensor, *, n: int, cfg: StreamFeaturesConfig) -> np.ndarray:
    """Network outputs of one video (V*n, *F) -> its cache entry, float16:
    (T, *F), or (V, T, *F) with views kept. ten_mean averages the crops (Res-LSTM eq. 5:
    x_t^0 = 1/K_c sum_k A(k, t, :)); 2D clips split n = K*s frames into K views of s."""
    v = len(out) // n
    x = out.reshape(v, n, *out.shape[1:])
    if cfg.crops == "ten_mean":
        x = x.mean(dim=0, keepdim=True)  # eq. (5)
    if cfg.sampling == "clips" and not is_3d(cfg.backbone):
        x = x.reshape(x.shape[0] * (n // cfg.clip_len), cfg.clip_len, *out.shape[1:])
    elif not views_kept(cfg):
        x = x[0]
    return x.cpu().numpy().astype(np.float16)
