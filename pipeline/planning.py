"""The decode stage's work: the sampling plan of every video of the manifest, each checked by
decoding every planned frame; a video that does not decode is recorded as failed with its
reason and left out of the plan. Frames are decoded on demand later (pipeline/plan.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pipeline.config import DecodeConfig
from pipeline.datasets import read_manifest
from pipeline.plan import Plan, PlannedVideo, sampling, write_plan
from pipeline.probes import read_probes
from pipeline.runner import Counts, Failure, finish, map_videos
from pipeline.video import read_frames


def _check(video: PlannedVideo, *, cfg: DecodeConfig) -> PlannedVideo:
    """Decode every planned frame of ``video`` (raises VideoDecodeError): only videos that read
    enter the plan."""
    read_frames(Path(video.path), video.samples(cfg).needed(), decoding=video.decoding(cfg))
    return video


def plan_videos(cfg: DecodeConfig, *, manifest: Path, probe: Path, out: Path) -> Counts:
    """Write ``out/plan.json`` and ``out/failures.csv`` for the videos of ``manifest``, with the
    frame counts and sizes of ``probe`` (probe.csv) -> the counts of planned and failed videos."""
    probes = read_probes(probe)
    candidates = []
    for v in read_manifest(manifest).videos:
        # probe.csv holds only videos that decoded at least one frame, so every one has a plan
        p = probes[v.video_id]
        sp = sampling(cfg, p.frames)
        candidates.append(
            PlannedVideo(
                video_id=v.video_id,
                path=str(v.path),
                frames=p.frames,
                looped=sp.looped,
                points=sp.points.tolist(),
                source=p.sha256,
                width=p.width,
                height=p.height,
            )
        )
    planned, failures = {}, []
    for pv, checked, err in map_videos(
        partial(_check, cfg=cfg), candidates, workers=cfg.workers, desc="decode"
    ):
        if err:
            failures.append(Failure(pv.video_id, pv.path, "decode", err))
        else:
            planned[checked.video_id] = checked
    write_plan(out / "plan.json", Plan(cfg, planned))
    return finish("decode", out / "failures.csv", failures, done=len(planned), skipped=0)
