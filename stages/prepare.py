"""prepare: build the manifest (video id, path, label, split, group), probe every video, record
the ones that cannot be opened or have no frames, and the dataset rows that cannot be one video
(two rows giving one id), and exclude them."""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict
from pathlib import Path
from typing import assert_never

from pipeline import datasets
from pipeline.config import DatasetConfig, section
from pipeline.demo import generate_demo
from pipeline.fingerprint import file_sha256
from pipeline.runner import Counts, Failure, finish, map_videos
from pipeline.video import probe

log = logging.getLogger("prepare")


def build_listing(cfg: DatasetConfig, out: Path) -> datasets.Listing:
    """The dataset adapter named by ``cfg.name``; the demo is generated under ``out/demo``."""

    def need(value: str | None, key: str) -> Path:
        # DatasetConfig requires the key for this dataset name: this only narrows the type
        assert value, f"dataset.{key} is required for dataset '{cfg.name}'"
        return Path(value)

    if cfg.name == "demo":
        csv_path = generate_demo(out / "demo", cfg.demo)
        return datasets.csv_manifest(
            csv_path=csv_path, root=None, test_fraction=cfg.test_fraction, seed=cfg.seed
        )
    if cfg.name == "ucf101":
        return datasets.ucf101_manifest(
            root=need(cfg.root, "root"),
            splits_dir=need(cfg.splits_dir, "splits_dir"),
            splits=cfg.splits,
        )
    if cfg.name == "hmdb51":
        return datasets.hmdb51_manifest(
            root=need(cfg.root, "root"),
            splits_dir=need(cfg.splits_dir, "splits_dir"),
            splits=cfg.splits,
        )
    if cfg.name == "folder":
        return datasets.folder_manifest(
            root=need(cfg.root, "root"),
            group_pattern=cfg.group_pattern,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
        )
    if cfg.name == "csv":
        return datasets.csv_manifest(
            csv_path=need(cfg.csv, "csv"),
            root=Path(cfg.root) if cfg.root else None,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
            group_pattern=cfg.group_pattern,
        )
    assert_never(cfg.name)  # DatasetConfig allows no other name


def _probe(path: Path) -> dict:
    return {**asdict(probe(path)), "sha256": file_sha256(path)}


def _probe_video(video: datasets.VideoRecord) -> dict:
    # by record, not by path: the result goes to the record's id without a path -> id lookup
    return _probe(video.path)


def main(cfg: DatasetConfig, out: Path) -> Counts:
    out.mkdir(parents=True, exist_ok=True)
    listing = build_listing(cfg, out)
    manifest = listing.manifest
    # One failure per id left out, its reason naming every row that gave it.
    failures = [
        Failure(r.video_id, datasets.shown(r.paths[0]), "prepare", r.reason)
        for r in listing.rejected
    ]
    probes: dict[str, dict] = {}
    for video, info, err in map_videos(
        _probe_video, list(manifest.videos), workers=cfg.probe_workers, desc="probe"
    ):
        if err:
            failures.append(Failure(video.video_id, str(video.path), "prepare", err))
        else:
            probes[video.video_id] = info
    # utf-8 whatever the locale: ids hold any Unicode letter, and decode reads this file back
    with (out / "probe.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["video_id", "frames", "fps", "width", "height", "duration", "sha256"])
        for vid in sorted(probes):
            p = probes[vid]
            dur = p["frames"] / p["fps"] if p["fps"] else 0.0
            w.writerow(
                [
                    vid,
                    p["frames"],
                    f"{p['fps']:.3f}",
                    p["width"],
                    p["height"],
                    f"{dur:.3f}",
                    p["sha256"],
                ]
            )
    datasets.write_manifest(manifest.without(f.video_id for f in failures), out / "manifest.csv")
    return finish("prepare", out / "failures.csv", failures, done=len(probes), skipped=0)


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(__doc__, "out")
    main(section(params, "dataset", DatasetConfig), args.out)
