"""flow: L quantised flow pairs at every sampled point of every planned video, into a pack cache.
Resumable: videos already in the cache (written with the same settings from the same video
bytes, and reading back sound) are skipped; damaged ones are recomputed. Under torchrun every
rank (machine) takes its share of the videos, each with its own process pool."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from pipeline.config import DEFAULT_CACHE, CacheConfig, DecodeConfig, FlowConfig, section
from pipeline.flow import RAFT_ALGORITHMS, flow_settings, raft_model, video_flow
from pipeline.plan import Plan, PlannedVideo, read_plan
from pipeline.runner import Counts, Failure, map_videos
from pipeline.versions import versions


def _one_thread() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would oversubscribe


def _flow(video: PlannedVideo, *, settings: DecodeConfig, cfg: FlowConfig) -> np.ndarray:
    """(N, L, 2, H, W) uint8 flow stacks of one planned video. Only this video travels to the
    worker, not the plan."""
    return video_flow(
        Path(video.path), video.samples(settings), cfg, decoding=video.decoding(settings)
    )


def cache_attrs(plan: Plan, cfg: FlowConfig) -> dict:
    import cv2

    return {
        "kind": "flow",
        "flow": flow_settings(cfg),
        "sampling": plan.identity(),
        "opencv": cv2.__version__,
        "versions": versions(),
        "layout": "(N points, L pairs, 2 [x, y], H, W) uint8, value = (clip(f, -b, b) + b) * 255 / 2b",
    }


def main(
    cfg: FlowConfig, *, plan_path: Path, out: Path, cache_cfg: CacheConfig = DEFAULT_CACHE
) -> Counts:
    # torch only here: the TV-L1 pool's spawned workers import this module and must stay light
    import torch

    from pipeline.distributed import sharded_run
    from pipeline.inference import resolve_device
    from pipeline.world import init_world

    plan = read_plan(plan_path)
    raft = cfg.algorithm in RAFT_ALGORITHMS
    world = init_world(resolve_device(cfg.raft.device) if raft else torch.device("cpu"))
    with sharded_run(
        world,
        out / "cache",
        ids=sorted(plan.videos),
        sources={k: v.source for k, v in plan.videos.items()},
        attrs=cache_attrs(plan, cfg),
        cache_cfg=cache_cfg,
    ) as run:
        # RAFT: one model (on the GPU, or on torch's own threads) in this process, video after
        # video; a CPU process pool would hold one model per process and oversubscribe the cores.
        if raft and run.todo:
            raft_model(cfg)  # weights that do not fit stop the stage before any video
        for video, stacks, err in map_videos(
            partial(_flow, settings=plan.settings, cfg=cfg),
            [plan.videos[k] for k in run.todo],
            workers=1 if raft else world.cores(cfg.workers),
            desc=f"flow ({cfg.algorithm})",
            initializer=None if raft else _one_thread,
        ):
            if err:
                run.fail(Failure(video.video_id, video.path, "flow", err))
            else:
                run.write(video.video_id, stacks, {"source": video.source})
    return run.finish("flow", out / "failures.csv")


if __name__ == "__main__":
    # imported here, not at the top: the TV-L1 pool's spawned workers re-import this module and
    # stay light without torch (pipeline.backbones)
    from pipeline.backbones import WeightsError
    from pipeline.cache import CacheError
    from pipeline.plan import PlanError
    from pipeline.world import SharedDirError
    from stages._cli import parse

    args, params = parse(__doc__, "plan", "out")
    try:
        main(
            section(params, "flow", FlowConfig),
            plan_path=args.plan,
            out=args.out,
            cache_cfg=section(params, "cache", CacheConfig),
        )
    except (CacheError, PlanError, SharedDirError, WeightsError) as e:
        # each names the file and the reason (a damaged cache or full disk, a plan from another
        # decoder, ranks that do not share the output, weights that cannot be had): a trace
        # would only bury it
        raise SystemExit(f"flow: {e}") from None
