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


def _check(item: tuple[str, str, int, str, int, int], cfg: DecodeConfig) -> PlannedVideo:
    vid, path, frames, source, w, h = item
    sp = sampling(cfg, frames)
    # raises VideoDecodeError
    read_frames(Path(path), sp.needed(), short_side=cfg.short_side, resize=cfg.resize, size=(w, h))
    return PlannedVideo(vid, path, frames, sp.looped, sp.points.tolist(), source, w, h)


def main(cfg: DecodeConfig, *, manifest: Path, probe: Path, out: Path) -> Counts:
    m = read_manifest(manifest)
    with probe.open(newline="", encoding="utf-8") as fh:  # ids hold any Unicode letter
        rows = {r["video_id"]: r for r in csv.DictReader(fh)}
    items = []
    for v in m.videos:
        r = rows[v.video_id]
        size = int(r["width"]), int(r["height"])
        items.append((v.video_id, str(v.path), int(r["frames"]), r["sha256"], *size))
    planned, failures = {}, []
    for item, pv, err in map_videos(
        partial(_check, cfg=cfg), items, workers=cfg.workers, desc="decode"
    ):
        if err:
            failures.append(Failure(item[0], item[1], "decode", err))
        else:
            planned[pv.video_id] = pv
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
