"""The prepare stage's work: the dataset's listing (its adapter, or the generated demo), every
video probed, and the manifest, probe.csv and failures.csv written. Videos that cannot be opened
or have no frames, and dataset rows that cannot be one video (two rows giving one id), are
recorded as failures with their reason and left out of the manifest.

Probing decodes every frame and hashes every byte: hours for a large dataset. So it resumes
and shards (pipeline/journal.py): each probed video is journaled in ``out/journal``, keyed by
its absolute path, size and mtime_ns (a file changed since is probed again), and under torchrun
each rank probes its share of the videos (sorted by id) while rank 0 lists the dataset (and
writes the demo) before, and writes the outputs after. A finished run's probes stay in a memo
beside the output (pipeline/probe_memo.py), so a run after videos were added, changed or
removed probes only those. Run by DVC, the stage first checks that dvc.yaml lists the
dataset's files as its dependencies (pipeline/dataset_deps.py).
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, assert_never

import pipeline.fingerprint
import pipeline.probes
import pipeline.video
from pipeline import datasets
from pipeline.config import DatasetConfig
from pipeline.dataset_deps import check_declared
from pipeline.demo import generate_demo
from pipeline.fingerprint import file_sha256
from pipeline.journal import (
    JOURNAL,
    clear_outputs,
    code_fingerprint,
    journaled_map,
    on_primary,
    remove_journal,
)
from pipeline.probe_memo import memo_path, seed_journal, write_memo
from pipeline.probes import Probe, write_probes
from pipeline.runner import Counts, Failure, finish
from pipeline.video import decoder_id, probe

if TYPE_CHECKING:  # the distributed module imports torch: spawned probe workers stay light
    from pipeline.world import World

# What the stage writes in its output folder; "demo" is the demo's videos (DEMO).
OUTPUTS = ("manifest.csv", "manifest.csv.tmp", "probe.csv", "failures.csv")
DEMO = "demo"


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


def _probe_video(video: datasets.VideoRecord) -> dict:
    """The journal's result for ``video``: its Probe's fields."""
    return asdict(probe_file(video.path))


def file_key(video: datasets.VideoRecord) -> dict:
    """What a journaled probe of ``video`` is valid for: the file at its absolute path with
    this size and modification time (ns). A copy, an edit or a re-download changes one of
    them (a file changed while it is probed too: the key is taken before). A missing file's
    key has no size: its failure stands until the file appears."""
    path = os.path.abspath(video.path)
    try:
        st = os.stat(path)
    except OSError:
        return {"path": path, "size": None, "mtime_ns": None}
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _code() -> str:
    """The code a journaled probe comes from: the decoder, and the modules that probe."""
    here = sys.modules[__name__]
    return code_fingerprint(
        pipeline.video, pipeline.fingerprint, pipeline.probes, here, extra=decoder_id()
    )


def _prune_demo(demo_dir: Path, csv_path: Path) -> None:
    """Delete files under ``demo_dir`` that the demo just generated did not write (an earlier,
    larger demo's videos): the output persists between runs, and would keep them."""
    with csv_path.open(newline="") as fh:
        keep = {demo_dir / r["path"] for r in csv.DictReader(fh)} | {csv_path}
    for path in sorted(demo_dir.rglob("*"), reverse=True):  # files before their folders
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif path not in keep:
            path.unlink()


def _listing(cfg: DatasetConfig, out: Path, dvc_yaml: Path | None) -> datasets.Listing:
    """The listing, after clearing what an earlier run wrote that this one rewrites (or no
    longer writes: the demo's videos when the dataset is not the demo). The demo's videos are
    written anew every run (new mtimes), so a killed demo run probes them all again: seconds.
    With ``dvc_yaml``, the dataset's files must be dependencies of its prepare stage
    (``check_declared``). The memo of the last run's probes is put in the journal (not the
    demo's)."""
    demo = cfg.name == "demo"
    clear_outputs(out, OUTPUTS if demo else (*OUTPUTS, DEMO), keep=(DEMO,) if demo else ())
    listing = build_listing(cfg, out)
    if dvc_yaml is not None:
        listed = [v.path for v in listing.manifest.videos]
        check_declared(
            cfg, listed + [p for r in listing.rejected for p in r.paths], dvc_yaml=dvc_yaml
        )
    if demo:
        _prune_demo(out / DEMO, out / DEMO / "demo.csv")
    else:  # the demo's videos are new files every run: no memo could match them
        seed_journal(memo_path(out), out / JOURNAL)
    return listing


def prepare_dataset(
    cfg: DatasetConfig, *, out: Path, world: World, dvc_yaml: Path | None = None
) -> Counts:
    """Write ``out/manifest.csv``, ``out/probe.csv`` and ``out/failures.csv`` (the demo's videos
    under ``out/demo``) -> the counts of probed and failed videos (on a rank other than 0: of
    its own share, and it writes nothing but its journal).

    A run killed (or stopped by an error) keeps ``out/journal``, and the next run probes only
    the videos it does not record. A failure is journaled like a probe, so a corrupt file is
    not probed again on resume unless its size or mtime changed: the probe is a function of
    the bytes, and decoding the same bytes again fails again (after as long, on a file that
    fails late), so an uninterrupted run would have recorded the same reason. (A transient
    read error is kept too, as an uninterrupted run would have kept it.) The journal is
    deleted once the outputs are written (the output holds no history); its successful probes
    stay in the memo (pipeline/probe_memo.py, not the demo's), so the next run probes only the
    files new or changed since (size or mtime_ns), the failed ones, and every file when the
    code changed. ``dvc_yaml``:
    the dvc.yaml that runs the stage, whose prepare deps must cover the dataset (DepsError)."""
    from pipeline.world import check_shared_dir

    check_shared_dir(world, out)
    out.mkdir(parents=True, exist_ok=True)
    listing = on_primary(world, lambda: _listing(cfg, out, dvc_yaml))
    run = journaled_map(
        world,
        out / JOURNAL,
        None if listing is None else sorted(listing.manifest.videos, key=lambda v: v.video_id),
        key=file_key,
        work=_probe_video,
        code=_code(),
        name=lambda v: f"{v.video_id} ({datasets.shown(v.path)})",
        workers=world.cores(cfg.probe_workers),
        desc="probe",
    )
    if listing is None:  # not rank 0: its share is journaled, rank 0 writes the outputs
        return run.counts()
    # One failure per id left out, its reason naming every row that gave it.
    failures = [
        Failure(r.video_id, datasets.shown(r.paths[0]), "prepare", r.reason)
        for r in listing.rejected
    ]
    probes: dict[str, Probe] = {}
    resumed = 0
    for video, entry in run.entries:
        if entry.error is not None:
            failures.append(Failure(video.video_id, str(video.path), "prepare", entry.error))
        else:
            probes[video.video_id] = Probe(**entry.result)
            resumed += entry.resumed
    write_probes(out / "probe.csv", probes)
    manifest = listing.manifest.without(f.video_id for f in failures)
    datasets.write_manifest(manifest, out / "manifest.csv")
    # the memo before the journal goes: a kill between them loses nothing
    if cfg.name != "demo":
        keys = (file_key(v) for v in manifest.videos)
        write_memo(memo_path(out), out / JOURNAL, keys, code=_code())
    remove_journal(out / JOURNAL)  # before finish, which stops the stage if none succeeded
    return finish(
        "prepare", out / "failures.csv", failures, done=len(probes) - resumed, skipped=resumed
    )
