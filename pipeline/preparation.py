"""The prepare stage's work: the dataset's listing (its adapter, or the generated demo), every
video probed, and the manifest, probe.csv and failures.csv written. Videos that cannot be opened
or have no frames, and dataset rows that cannot be one video (two rows giving one id), are
recorded as failures with their reason and left out of the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import assert_never

from pipeline import datasets
from pipeline.config import DatasetConfig
from pipeline.demo import generate_demo
from pipeline.fingerprint import file_sha256
from pipeline.probes import Probe, write_probes
from pipeline.runner import Counts, Failure, finish, map_videos
from pipeline.video import probe


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


def probe_file(path: Path) -> Probe:
    """Decode every frame of ``path`` (raises VideoDecodeError) and hash its bytes."""
    info = probe(path)
    return Probe(info.frames, info.fps, info.width, info.height, file_sha256(path))


def _probe_video(video: datasets.VideoRecord) -> Probe:
    # by record, not by path: the result goes to the record's id without a path -> id lookup
    return probe_file(video.path)


def prepare_dataset(cfg: DatasetConfig, *, out: Path) -> Counts:
    """Write ``out/manifest.csv``, ``out/probe.csv`` and ``out/failures.csv`` (the demo's videos
    under ``out/demo``) -> the counts of probed and failed videos."""
    out.mkdir(parents=True, exist_ok=True)
    listing = build_listing(cfg, out)
    manifest = listing.manifest
    # One failure per id left out, its reason naming every row that gave it.
    failures = [
        Failure(r.video_id, datasets.shown(r.paths[0]), "prepare", r.reason)
        for r in listing.rejected
    ]
    probes: dict[str, Probe] = {}
    for video, info, err in map_videos(
        _probe_video, list(manifest.videos), workers=cfg.probe_workers, desc="probe"
    ):
        if err:
            failures.append(Failure(video.video_id, str(video.path), "prepare", err))
        else:
            probes[video.video_id] = info
    write_probes(out / "probe.csv", probes)
    datasets.write_manifest(manifest.without(f.video_id for f in failures), out / "manifest.csv")
    return finish("prepare", out / "failures.csv", failures, done=len(probes), skipped=0)
