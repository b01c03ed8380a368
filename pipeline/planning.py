"""The decode stage's work: the sampling plan of every video of the manifest, each checked by
decoding every planned frame; a video that does not decode is recorded as failed with its
reason and left out of the plan. Frames are decoded on demand later (pipeline/plan.py).

The check decodes every planned frame of every video: hours for a large dataset. So it resumes
and shards (pipeline/journal.py): each checked video is journaled in ``out/journal``, keyed by
its whole plan entry (id, path, the probe's sha256, frames and size, the sampled points) and
the decode settings, and under torchrun each rank checks its share (sorted by id) while rank 0
reads the manifest before and writes the plan after.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pipeline.plan
import pipeline.video
from pipeline.config import DecodeConfig
from pipeline.datasets import read_manifest
from pipeline.journal import (
    JOURNAL,
    clear_outputs,
    code_fingerprint,
    journaled_map,
    on_primary,
    remove_journal,
)
from pipeline.plan import Plan, PlannedVideo, write_plan
from pipeline.probe_memo import memo_path, seed_journal, write_memo
from pipeline.probes import read_probes
from pipeline.runner import Counts, Failure, finish
from pipeline.video import read_frames

if TYPE_CHECKING:  # the distributed module imports torch: spawned decode workers stay light
    from pipeline.world import World

OUTPUTS = ("plan.json", "failures.csv")  # what the stage writes in its output folder


def _check(video: PlannedVideo, *, cfg: DecodeConfig) -> None:
    """Decode every planned frame of ``video`` (raises VideoDecodeError): only videos that read
    enter the plan."""
    read_frames(Path(video.path), video.samples(cfg).needed(), decoding=video.decoding(cfg))


def check_key(video: PlannedVideo, *, identity: dict) -> dict:
    """What a journaled check of ``video`` is valid for: its whole plan entry (id, path, the
    sha256 of its bytes as probed, frames, size and the sampled points) and the plan's
    ``identity`` (the decode settings that choose and resize the frames, and the decoder)."""
    return {"video": asdict(video), "settings": identity}


def _code(identity: dict) -> str:
    """The code and settings a journaled check comes from: the modules that plan and read."""
    here = sys.modules[__name__]
    return code_fingerprint(
        pipeline.video, pipeline.plan, here, extra=json.dumps(identity, sort_keys=True)
    )


def _candidates(cfg: DecodeConfig, manifest: Path, probe: Path, out: Path) -> list[PlannedVideo]:
    """The plan entry of every video of ``manifest``, sorted by id, with the frame counts and
    sizes of ``probe``; the outputs of an earlier run are cleared first."""
    clear_outputs(out, OUTPUTS)
    # the last run's checks, reused for entries that did not change (pipeline/probe_memo.py)
    seed_journal(memo_path(out, "checks"), out / JOURNAL)
    probes = read_probes(probe)
    candidates = []
    for v in sorted(read_manifest(manifest).videos, key=lambda v: v.video_id):
        # probe.csv holds only videos that decoded at least one frame, so every one has a plan
        p = probes[v.video_id]
        candidates.append(
            PlannedVideo.probed(
                v.video_id,
                str(v.path),
                cfg,
                frames=p.frames,
                source=p.sha256,
                width=p.width,
                height=p.height,
            )
        )
    return candidates


def plan_videos(
    cfg: DecodeConfig, *, manifest: Path, probe: Path, out: Path, world: World
) -> Counts:
    """Write ``out/plan.json`` and ``out/failures.csv`` for the videos of ``manifest``, with the
    frame counts and sizes of ``probe`` (probe.csv) -> the counts of planned and failed videos
    (on a rank other than 0: of its own share, and it writes nothing but its journal).

    A run killed (or stopped by an error) keeps ``out/journal``, and the next run checks only
    the videos it does not record. A failure is journaled like a success: the same frames of
    the same bytes, read by the same code, fail the same way, as they would have in an
    uninterrupted run. The journal is deleted once the outputs are written; its successful
    checks stay in a memo beside ``out`` (``.decode.checks.jsonl``), so a run after videos were
    added checks only the entries that changed: new videos, or every one when the settings or
    the code changed."""
    from pipeline.world import check_shared_dir

    check_shared_dir(world, out)
    out.mkdir(parents=True, exist_ok=True)
    candidates = on_primary(world, lambda: _candidates(cfg, manifest, probe, out))
    identity = Plan(cfg, {}).identity()
    run = journaled_map(
        world,
        out / JOURNAL,
        candidates,
        key=partial(check_key, identity=identity),
        work=partial(_check, cfg=cfg),
        code=_code(identity),
        name=lambda v: f"{v.video_id} ({v.path})",
        workers=world.cores(cfg.workers),
        desc="decode",
    )
    if candidates is None:  # not rank 0: its share is journaled, rank 0 writes the plan
        return run.counts()
    planned, failures, resumed = {}, [], 0
    for pv, entry in run.entries:
        if entry.error is not None:
            failures.append(Failure(pv.video_id, pv.path, "decode", entry.error))
        else:
            planned[pv.video_id] = pv
            resumed += entry.resumed
    write_plan(out / "plan.json", Plan(cfg, planned))
    # the memo before the journal goes: a kill between them loses nothing
    keys = (check_key(pv, identity=identity) for pv in planned.values())
    write_memo(memo_path(out, "checks"), out / JOURNAL, keys, code=_code(identity))
    remove_journal(out / JOURNAL)  # before finish, which stops the stage if none succeeded
    return finish(
        "decode", out / "failures.csv", failures, done=len(planned) - resumed, skipped=resumed
    )
