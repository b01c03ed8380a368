"""decode: uniform sampling of N points (each with L following frames for flow) per video,
checked by decoding every planned frame. Writes the plan; frames are decoded on demand later."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

from pipeline.config import DecodeConfig, section
from pipeline.datasets import read_manifest
from pipeline.plan import Plan, PlannedVideo, sampling, write_plan
from pipeline.runner import Counts, Failure, finish, map_videos
from pipeline.video import read_frames


def _check(video: PlannedVideo, *, cfg: DecodeConfig) -> PlannedVideo:
    """Decode every planned frame of ``video`` (raises VideoDecodeError): only videos that read
    enter the plan."""
    read_frames(Path(video.path), video.samples(cfg).needed(), decoding=video.decoding(cfg))
    return video


def main(cfg: DecodeConfig, *, manifest: Path, probe: Path, out: Path) -> Counts:
    m = read_manifest(manifest)
    with probe.open(newline="", encoding="utf-8") as fh:  # ids hold any Unicode letter
        rows = {r["video_id"]: r for r in csv.DictReader(fh)}
    candidates = []
    for v in m.videos:
        r = rows[v.video_id]
        # probe.csv holds only videos that decoded at least one frame, so every one has a plan
        sp = sampling(cfg, int(r["frames"]))
        candidates.append(
            PlannedVideo(
                video_id=v.video_id,
                path=str(v.path),
                frames=int(r["frames"]),
                looped=sp.looped,
                points=sp.points.tolist(),
                source=r["sha256"],
                width=int(r["width"]),
                height=int(r["height"]),
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


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(__doc__, "manifest", "probe", "out")
    main(
        section(params, "decode", DecodeConfig),
        manifest=args.manifest,
        probe=args.probe,
        out=args.out,
    )
