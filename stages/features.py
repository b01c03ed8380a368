"""features: a 2D or 3D CNN per stream (rgb frames or clips, stacked flow or flow clips), written
per video as float16 into a pack cache: pooled (T, D), multi-level taps, or conv maps, with
centre or 10-crops. Resumable like flow (damaged entries recomputed), and sharded over ranks
under torchrun:

    torchrun --nproc_per_node 4 -m stages.features --stream rgb --input data/decode --out data/features/rgb
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline import extract
from pipeline.backbones import WeightsError, build_backbone, is_3d
from pipeline.cache import CacheError, open_cache
from pipeline.config import (
    DEFAULT_CACHE,
    CacheConfig,
    ConfigError,
    DecodeConfig,
    StreamFeaturesConfig,
    section,
)
from pipeline.distributed import close_world, collect, init_world, open_shared_cache
from pipeline.inference import (
    Compiled,
    inference_context,
    inference_model,
    memory_format,
    resolve_device,
    resolve_precision,
)
from pipeline.plan import PlanError, read_plan
from pipeline.runner import Counts, Failure, finish, progress

log = logging.getLogger("features")


_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _upstream(
    stream: str, source: Path
) -> tuple[list[extract.Item], dict, dict, int, DecodeConfig | None]:
    """-> (items, {id: source fingerprint}, upstream metadata, input channels, decode settings
    (rgb: how to decode the videos; flow: None, the stacks are read from the flow cache))."""
    if stream == "rgb":
        plan = read_plan(source / "plan.json")
        items = [
            extract.Item(k, v.path, tuple(v.points), v.frames, v.size)
            for k, v in sorted(plan.videos.items())
        ]
        sources = {k: v.source for k, v in plan.videos.items()}
        return items, sources, {"sampling": plan.identity()}, 3, plan.settings
    if stream == "flow":
        with open_cache(source / "cache", "r") as flow:
            ids, attrs = flow.keys(), flow.attrs
            sources = {k: flow.meta(k)["source"] for k in ids}
        upstream = {"sampling": attrs["sampling"], "flow": attrs["flow"]}
        pairs = attrs["sampling"]["flow_pairs"]
        items = [extract.Item(k, str(source / "cache")) for k in ids]
        return items, sources, upstream, 2 * pairs, None
    raise SystemExit(f"features: unknown stream '{stream}' (rgb or flow)")


def _check_upstream(cfg: StreamFeaturesConfig, *, stream: str, sampling: dict, made: Path) -> None:
    """Refuse, once and before any video, settings that cannot work on the frames or flow
    upstream (``sampling``: the decode settings recorded in ``made``, the plan or the flow
    cache): each video would fail alone. Loading params.yaml checks the same against its decode
    section; this checks what was actually made."""
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


def main(
    cfg: StreamFeaturesConfig,
    *,
    stream: str,
    source: Path,
    out: Path,
    cache_cfg: CacheConfig = DEFAULT_CACHE,
) -> Counts:
    device = resolve_device(cfg.device)
    world = init_world(device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    torch.set_num_threads(world.cores(cfg.threads))
    items, sources, upstream, in_ch, decoding = _upstream(stream, source)
    made = source / ("plan.json" if stream == "rgb" else "cache")
    _check_upstream(cfg, stream=stream, sampling=upstream["sampling"], made=made)
    # a 3D backbone reads 2-channel flow fields per time step, a 2D one a stack of L fields
    bb = build_backbone(
        cfg.backbone,
        weights=cfg.weights,
        in_channels=2 if stream == "flow" and is_3d(cfg.backbone) else in_ch,
        output=cfg.output,
        taps=cfg.taps,
    )
    precision = resolve_precision(cfg.precision, device)
    # batch norms folded into the convolutions, and channels_last, which lets oneDNN (CPU) and
    # cuDNN (GPU) pick their fast NHWC convolution kernels
    fmt = memory_format(bb.kind)
    model = inference_model(bb.model, kind=bb.kind, in_channels=bb.in_channels, device=device)
    if cfg.compile:
        model = Compiled(model)
    attrs = extract.cache_attrs(
        cfg, bb, stream=stream, precision=precision, device=device.type, upstream=upstream
    )
    cache, done = open_shared_cache(
        world,
        out / "cache",
        sources=sources,
        attrs=attrs,
        backend=cache_cfg.backend,
        videos_per_pack=cache_cfg.videos_per_pack,
    )
    failures: list[Failure] = []
    with cache:
        todo = world.shard([it for it in items if it.video_id not in done])
        paths = {it.video_id: it.path for it in todo}
        if world.size > 1:
            log.info("rank %d/%d: %d of the videos to extract", world.rank, world.size, len(todo))
        data = extract.VideoInputs(
            cfg,
            stream=stream,
            items=todo,
            decoding=decoding,
            flow_cache=source / "cache" if stream == "flow" else None,
            mean=bb.mean,
            std=bb.std,
        )
        workers = 1 if len(todo) > 1 else 0
        # fork: the worker starts at once with what this process imported, where a spawned one
        # spent ~2.5 s importing torch and the decoder (measured: the stage went from 0.77x to 0.93x
        # the bare backbone on 16 videos, bench/bench_features.py). The worker uses no CUDA and
        # one torch thread, and cache files are opened per process, so forking is safe here.
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context=_START if workers else None,
            pin_memory=device.type == "cuda",
        )
        sizes: dict[str, int] = {}

        def decoded() -> Iterator[tuple[str, torch.Tensor]]:
            desc = f"features ({stream}, {cfg.backbone})"
            if world.size > 1:
                desc += f" rank {world.rank}/{world.size}"
            for vid, x, n, err in progress(loader, desc=desc, total=len(todo)):
                if err:
                    failures.append(Failure(vid, paths[vid], "features", err))
                    continue
                sizes[vid] = n
                yield vid, x.to(device, non_blocking=True).contiguous(memory_format=fmt)

        written = 0
        with torch.inference_mode(), inference_context(device, precision):
            for vid, feats in extract.forward_batched(model, decoded(), batch_size=cfg.batch_size):
                # a failed write (full disk: CacheError naming the file) stops the stage; the
                # videos written stay, for the resume
                cache.write(
                    vid, extract.arrange(feats, n=sizes.pop(vid), cfg=cfg), {"source": sources[vid]}
                )
                written += 1
        failures, written = collect(world, failures, written)
    # leaving the with block: the primary compacts, now that every rank's videos are in
    close_world(world)
    if not world.primary:
        return Counts(done=written, skipped=len(done), failed=len(failures))
    return finish(
        f"features ({stream})", out / "failures.csv", failures, done=written, skipped=len(done)
    )


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(
        __doc__, "input", "out", extra={"stream": {"required": True, "choices": ["rgb", "flow"]}}
    )
    try:
        main(
            section(params, f"features.{args.stream}", StreamFeaturesConfig),
            stream=args.stream,
            source=args.input,
            out=args.out,
            cache_cfg=section(params, "cache", CacheConfig),
        )
    except (CacheError, ConfigError, PlanError, WeightsError) as e:
        # each names the file and the reason (a damaged cache or full disk, settings that do
        # not fit the frames upstream, a plan from another decoder, weights that cannot be had):
        # a trace would only bury it
        raise SystemExit(f"features ({args.stream}): {e}") from None
