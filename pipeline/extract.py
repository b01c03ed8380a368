"""Feature extraction: ``extract_features`` runs a backbone over every planned video (rgb) or
every flow cache entry (flow) into a features cache; the features stage only calls it.

One video goes through three steps:
1. ``VideoInputs`` (a Dataset, run in DataLoader workers so decoding overlaps the CNN) decodes
   the frames or reads the flow stacks the sampling asks for and returns the network input:
   (V*n, C, H, W) images for 2D backbones or (V*n, C, s, H, W) clips for 3D ones, V crops.
2. ``forward_batched`` packs the inputs of consecutive videos into fixed-size batches.
3. ``arrange`` turns the outputs back into the entry of the video: (T, D), (V, T, D),
   (T, C, h, w) or (V, T, C, h, w), see ``layout``.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.backbones import Backbone, build_backbone, is_3d
from pipeline.cache import FeatureCache, open_cache
from pipeline.config import CacheConfig, ConfigError, StreamFeaturesConfig
from pipeline.distributed import sharded_run
from pipeline.identity import params_identity
from pipeline.inference import (
    Compiled,
    inference_context,
    inference_model,
    memory_format,
    resolve_device,
    resolve_precision,
)
from pipeline.inputs import clip_input, flow_clip_input, flow_input, rgb_input
from pipeline.plan import Plan, PlannedVideo, read_plan
from pipeline.runner import Counts, Failure, progress
from pipeline.versions import versions
from pipeline.video import clip_windows, read_frames
from pipeline.world import init_world

log = logging.getLogger(__name__)

_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


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


class VideoInputs(torch.utils.data.Dataset):
    """Video id -> (video id, network input (V*n, ...) float32 or None, n, error or None).

    ``n`` is the number of inputs per view (frames, or clips for 3D). rgb reads the planned
    video ``plan.videos[id]`` as the plan's settings say; flow reads the id's stacks from
    ``flow_cache``, which is opened lazily in each worker process (an HDF5 file handle must not
    cross a fork)."""

    def __init__(
        self,
        cfg: StreamFeaturesConfig,
        *,
        stream: str,
        ids: Sequence[str],
        plan: Plan | None,
        flow_cache: Path | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        if (plan is None) == (stream == "rgb"):
            raise ValueError(f"stream {stream}: the rgb stream reads a plan, flow a flow cache")
        self.cfg, self.stream, self.ids = cfg, stream, list(ids)
        self.plan, self.flow_cache = plan, flow_cache
        self.mean, self.std = mean, std
        self._flow: FeatureCache | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, Tensor | None, int, str | None]:
        vid = self.ids[i]
        try:
            x, n = self._load(vid)
            return vid, x, n, None
        except Exception as e:  # recorded as this video's failure, the others go on
            return vid, None, 0, f"{type(e).__name__}: {e}"

    def _windows(self, length: int) -> np.ndarray:
        c = self.cfg
        return clip_windows(length, length=c.clip_len, stride=c.clip_stride, max_clips=c.max_clips)

    def _frames(self, video: PlannedVideo, indices: np.ndarray) -> np.ndarray:
        """Frames ``indices`` (K,) of ``video`` -> (K, H, W, 3) uint8."""
        return read_frames(Path(video.path), indices, decoding=video.decoding(self.plan.settings))

    def _load(self, vid: str) -> tuple[Tensor, int]:
        c = self.cfg
        kw = {"crop": c.crop, "mean": self.mean, "std": self.std, "crops": c.crops}
        three_d = is_3d(c.backbone)
        if self.stream == "rgb":
            video = self.plan.videos[vid]
            if c.sampling == "points":
                frames = self._frames(video, np.asarray(video.points))
                return rgb_input(frames, **kw), len(frames)
            w = self._windows(video.frames)
            # each distinct frame is decoded and cropped once, however often the clips repeat it
            needed, inverse = np.unique(w, return_inverse=True)
            frames, w = self._frames(video, needed), inverse.reshape(w.shape)
            if three_d:
                return clip_input(frames, w, **kw), len(w)
            return rgb_input(frames, index=w.reshape(-1), **kw), w.size
        if self._flow is None:
            self._flow = open_cache(self.flow_cache, "r")
        stacks = self._flow.read(vid)  # (P, L, 2, H, W)
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


@dataclass(frozen=True)
class FeatureModel:
    """A features backbone ready to run: the Backbone (its weights id, mean and std, kind),
    the module to call and the memory format its inputs take."""

    backbone: Backbone
    model: nn.Module
    fmt: torch.memory_format


def feature_model(
    cfg: StreamFeaturesConfig, *, stream: str, in_channels: int, device: torch.device
) -> FeatureModel:
    """The backbone of ``cfg`` for ``stream`` inputs of ``in_channels`` channels (a stack of L
    flow fields: 2L), as the features stage runs it. Raises WeightsError when the weights
    cannot be had."""
    # a 3D backbone reads 2-channel flow fields per time step, a 2D one a stack of L fields
    bb = build_backbone(
        cfg.backbone,
        weights=cfg.weights,
        in_channels=2 if stream == "flow" and is_3d(cfg.backbone) else in_channels,
        output=cfg.output,
        taps=cfg.taps,
    )
    # batch norms folded into the convolutions, and channels_last, which lets oneDNN (CPU) and
    # cuDNN (GPU) pick their fast NHWC convolution kernels
    model = inference_model(bb.model, kind=bb.kind, in_channels=bb.in_channels, device=device)
    if cfg.compile:
        model = Compiled(model)
    return FeatureModel(bb, model, memory_format(bb.kind))


def video_features(
    fm: FeatureModel,
    inputs: Iterable[tuple[str, Tensor, int]],
    *,
    cfg: StreamFeaturesConfig,
    device: torch.device,
    precision: str,
) -> Iterator[tuple[str, np.ndarray]]:
    """(video id, its input, n) per video (``VideoInputs``' items that decoded) -> (video id,
    its cache entry) in input order: the inputs moved to ``device`` in the backbone's memory
    format, batched (``forward_batched``) and arranged (``arrange``) under ``precision``."""
    sizes: dict[str, int] = {}

    def moved() -> Iterator[tuple[str, Tensor]]:
        for vid, x, n in inputs:
            sizes[vid] = n
            yield vid, x.to(device, non_blocking=True).contiguous(memory_format=fm.fmt)

    with torch.inference_mode(), inference_context(device, precision):
        for vid, feats in forward_batched(fm.model, moved(), batch_size=cfg.batch_size):
            yield vid, arrange(feats, n=sizes.pop(vid), cfg=cfg)


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


@dataclass(frozen=True)
class Upstream:
    """What a stream's features are computed from. rgb: the decode plan (``plan``: the videos
    and how to read them); flow: the flow cache ``made``, read by video id (``plan`` None)."""

    ids: list[str]  # in the order they are extracted
    sources: dict[str, str]  # {id: fingerprint of its input}, recorded with each entry
    identity: dict  # the upstream settings, part of the cache metadata
    in_channels: int  # 3 (rgb), or 2L (a stack of L flow fields)
    made: Path  # the plan or the flow cache, named in errors and failures
    plan: Plan | None


def read_upstream(*, stream: str, source: Path) -> Upstream:
    """The decode stage's output folder ``source`` (rgb: its plan.json) or the flow stage's
    (flow: its cache)."""
    if stream == "rgb":
        plan = read_plan(source / "plan.json")
        return Upstream(
            ids=sorted(plan.videos),
            sources={k: v.source for k, v in plan.videos.items()},
            identity={"sampling": plan.identity()},
            in_channels=3,
            made=source / "plan.json",
            plan=plan,
        )
    if stream == "flow":
        with open_cache(source / "cache", "r") as flow:
            ids, attrs = flow.keys(), flow.attrs
            sources = {k: flow.meta(k)["source"] for k in ids}
        return Upstream(
            ids=list(ids),
            sources=sources,
            identity={"sampling": attrs["sampling"], "flow": attrs["flow"]},
            in_channels=2 * attrs["sampling"]["flow_pairs"],
            made=source / "cache",
            plan=None,
        )
    raise ValueError(f"features: unknown stream '{stream}' (rgb or flow)")


def check_upstream(cfg: StreamFeaturesConfig, *, stream: str, upstream: Upstream) -> None:
    """Refuse, once and before any video, settings that cannot work on the frames or flow
    upstream (its decode settings as recorded in the plan or the flow cache): each video would
    fail alone. Loading params.yaml checks the same against its decode section; this checks what
    was actually made."""
    sampling, made = upstream.identity["sampling"], upstream.made
    short = sampling["short_side"]
    if cfg.crop > short:
        raise ConfigError(
            f"features.{stream}.crop: {cfg.crop} is larger than the short side {short} of the "
            f"frames it crops ({made}: decode.short_side {short})"
        )
    if stream == "flow" and is_3d(cfg.backbone) and sampling["flow_pairs"] != 1:
        raise ConfigError(
            f"features.flow.backbone: {cfg.backbone} is a 3D backbone: its flow clips take one "
            f"flow field per step, and {made} has {sampling['flow_pairs']} per point "
            "(decode.flow_pairs: 1, decode.sampling: dense)"
        )


def extract_features(
    *,
    cfg: StreamFeaturesConfig,
    stream: str,
    source: Path,
    cache: Path,
    failures_file: Path,
    cache_cfg: CacheConfig,
) -> Counts:
    """Features of every video of ``source`` (the decode stage's output for rgb, the flow
    stage's for flow) into the cache at ``cache``: per video (T, D), (V, T, D), (T, C, h, w) or
    (V, T, C, h, w) float16 (``layout``). Resumable (entries already computed from the same
    input with the same settings are kept) and sharded over the ranks of a torchrun world;
    videos that fail are listed in ``failures_file``. Raises ConfigError before any video when
    ``cfg`` does not fit what upstream made, WeightsError when the weights cannot be had."""
    device = resolve_device(cfg.device)
    world = init_world(device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    torch.set_num_threads(world.cores(cfg.threads))
    upstream = read_upstream(stream=stream, source=source)
    check_upstream(cfg, stream=stream, upstream=upstream)
    fm = feature_model(cfg, stream=stream, in_channels=upstream.in_channels, device=device)
    bb = fm.backbone
    precision = resolve_precision(cfg.precision, device)
    attrs = cache_attrs(
        cfg, bb, stream=stream, precision=precision, device=device.type, upstream=upstream.identity
    )
    with sharded_run(
        world, cache, ids=upstream.ids, sources=upstream.sources, attrs=attrs, cache_cfg=cache_cfg
    ) as run:
        todo, plan = run.todo, upstream.plan
        if world.size > 1:
            log.info("rank %d/%d: %d of the videos to extract", world.rank, world.size, len(todo))
        data = VideoInputs(
            cfg,
            stream=stream,
            ids=todo,
            plan=plan,
            flow_cache=upstream.made if stream == "flow" else None,
            mean=bb.mean,
            std=bb.std,
        )
        workers = 1 if len(todo) > 1 else 0
        # fork: the worker starts at once with what this process imported, where a spawned one
        # spent ~2.5 s importing torch and the decoder (measured: the stage went from 0.77x to
        # 0.93x the bare backbone on 16 videos, bench/bench_features.py). The worker uses no CUDA
        # and one torch thread, and cache files are opened per process, so forking is safe here.
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context=_START if workers else None,
            pin_memory=device.type == "cuda",
        )

        def decoded() -> Iterator[tuple[str, Tensor, int]]:
            desc = f"features ({stream}, {cfg.backbone})"
            if world.size > 1:
                desc += f" rank {world.rank}/{world.size}"
            for vid, x, n, err in progress(loader, desc=desc, total=len(todo)):
                if err:
                    # a failure names the video, or for flow the cache its stacks come from
                    path = plan.videos[vid].path if plan else str(upstream.made)
                    run.fail(Failure(vid, path, "features", err))
                    continue
                yield vid, x, n

        for vid, entry in video_features(
            fm, decoded(), cfg=cfg, device=device, precision=precision
        ):
            run.write(vid, entry, {"source": upstream.sources[vid]})
    return run.finish(f"features ({stream})", failures_file)
