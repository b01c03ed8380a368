"""flow: L quantised flow pairs at every sampled point of every planned video, into a Zarr cache.
Resumable: videos already in the cache (written with the same settings) are skipped."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from pipeline.cache import open_cache
from pipeline.config import DecodeConfig, FlowConfig, section
from pipeline.flow import RAFT_ALGORITHMS, flow_settings, video_flow
from pipeline.plan import Plan, read_plan
from pipeline.plan import sampling as sampling_of
from pipeline.runner import Counts, Failure, finish, map_videos


def _one_thread() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would oversubscribe


def _flow(item: tuple[str, str, int], *, settings: DecodeConfig, cfg: FlowConfig) -> np.ndarray:
    """item: (video id, path, frames). Only this video travels to the worker, not the plan."""
    _, path, frames = item
    return video_flow(
        Path(path), sampling_of(settings, frames), cfg, short_side=settings.short_side
    )


def cache_attrs(plan: Plan, cfg: FlowConfig) -> dict:
    import cv2

    return {
        "kind": "flow",
        "flow": flow_settings(cfg),
        "sampling": plan.identity(),
        "opencv": cv2.__version__,
        "layout": "(N points, L pairs, 2 [x, y], H, W) uint8, value = (clip(f, -b, b) + b) * 255 / 2b",
    }


def main(cfg: FlowConfig, *, plan_path: Path, out: Path) -> Counts:
    plan = read_plan(plan_path)
    failures = []
    with open_cache(out / "cache", "a", attrs=cache_attrs(plan, cfg)) as cache:
        done = cache.up_to_date({k: v.source for k, v in plan.videos.items()})
        todo = [(k, v.path, v.frames) for k, v in sorted(plan.videos.items()) if k not in done]
        fn = partial(_flow, settings=plan.settings, cfg=cfg)
        written = 0
        # RAFT: one model (on the GPU, or on torch's own threads) in this process, video after
        # video; a CPU process pool would hold one model per process and oversubscribe the cores.
        raft = cfg.algorithm in RAFT_ALGORITHMS
        for (vid, path, _), stacks, err in map_videos(
            fn,
            todo,
            workers=1 if raft else cfg.workers,
            desc=f"flow ({cfg.algorithm})",
            initializer=None if raft else _one_thread,
        ):
            if err:
                failures.append(Failure(vid, path, "flow", err))
            else:
                cache.write(vid, stacks, {"source": plan.videos[vid].source})
                written += 1
    return finish("flow", out / "failures.csv", failures, done=written, skipped=len(done))


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(__doc__, "plan", "out")
    main(section(params, "flow", FlowConfig), plan_path=args.plan, out=args.out)
