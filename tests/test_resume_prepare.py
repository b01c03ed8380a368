"""prepare and decode resume after a kill -9 without redoing finished videos, re-probe a file
that changed, and shard over torchrun ranks, always writing the bytes of one uninterrupted
process (pipeline/preparation.py, pipeline/planning.py, pipeline/journal.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pipeline.planning
import pipeline.preparation
from pipeline.config import DatasetConfig, DecodeConfig, DemoConfig
from pipeline.demo import render, write_video
from pipeline.journal import JOURNAL, JournalError
from pipeline.preparation import prepare_dataset
from pipeline.world import World
from stages import decode, prepare

# Every test runs stages (some killed in a subprocess, or under torchrun).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PREPARED = {"manifest.csv", "probe.csv", "failures.csv"}
DECODED = {"plan.json", "failures.csv"}

# The configs of the killed runs (KILLED runs them in a subprocess) and of the resumed ones.
FOLDER = "DatasetConfig(name='folder', root=ROOT, test_fraction=0.5, probe_workers=1)"
DECODE = "DecodeConfig(num_frames=6, flow_pairs=2, short_side=32, workers=1)"
KILLED = f"""
import os, sys
from pathlib import Path
import pipeline.planning, pipeline.preparation
from pipeline.config import DatasetConfig, DecodeConfig
from stages import decode, prepare

stage, k, ROOT, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
module, name = (pipeline.preparation, "probe_file") if stage == "prepare" else (
    pipeline.planning, "read_frames")
real, calls = getattr(module, name), []

def dying(*args, **kw):
    if len(calls) == k:
        os._exit(9)  # as kill -9: no cleanup, nothing buffered in Python is written
    calls.append(args[0])
    return real(*args, **kw)

setattr(module, name, dying)
if stage == "prepare":
    prepare.main({FOLDER}, out)
else:
    decode.main({DECODE}, manifest=out.parent / "prepare/manifest.csv",
                probe=out.parent / "prepare/probe.csv", out=out)
"""


def _clip(path: Path, seed: int, frames: int = 12) -> None:
    bg = np.full((32, 32, 3), 60.0 + seed)
    write_video(path, render("motion_left", np.random.default_rng(seed), bg, frames), 25)


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    """A folder dataset of 8 tiny clips in two classes, and a text file named like a video
    (a/broken: a probe failure, first in id order)."""
    root = tmp_path / "videos"
    for c, cls in enumerate("ab"):
        for k in range(4):
            _clip(root / cls / f"clip_{k}.avi", seed=10 * c + k)
    (root / "a" / "broken.avi").write_text("not a video\n")
    return root


def _kill_after(stage: str, k: int, root: Path, out: Path) -> list[str]:
    """Run ``stage`` on ``root`` in a subprocess killed (os._exit) as it starts its (k+1)-th
    video -> the keys its journal recorded, in order."""
    run = subprocess.run(
        [sys.executable, "-c", KILLED, stage, str(k), str(root), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 9, run.stderr[-3000:]
    import json

    lines = (out / JOURNAL / "rank-0.jsonl").read_text().splitlines()
    return [json.dumps(json.loads(x)["key"], sort_keys=True) for x in lines]


def _count(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[str]:
    """Record the path of every call of ``module.name`` (a probe or a frame read)."""
    real, calls = getattr(module, name), []

    def counted(path: Path, *args: object, **kw: object) -> object:
        calls.append(Path(path).relative_to(Path(path).parents[1]).as_posix())
        return real(path, *args, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


def _folder(root: Path) -> DatasetConfig:
    return DatasetConfig(name="folder", root=str(root), test_fraction=0.5, probe_workers=1)


def _decode_cfg() -> DecodeConfig:
    return DecodeConfig(num_frames=6, flow_pairs=2, short_side=32, workers=1)


def test_a_killed_prepare_resumes_with_the_videos_it_had_not_probed(
    clips: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    file_bytes: Callable[[Path], dict[str, bytes]],
) -> None:
    out = tmp_path / "run" / "prepare"
    recorded = _kill_after("prepare", 3, clips, out)
    # the failure of a/broken is journaled like a probe, then a/clip_0 and a/clip_1
    assert [r.split('"path": ')[1].split(",")[0][-13:-1] for r in recorded] == [
        "a/broken.avi",
        "a/clip_0.avi",
        "a/clip_1.avi",
    ]
    assert not (out / "manifest.csv").exists()

    calls = _count(monkeypatch, pipeline.preparation, "probe_file")
    counts = prepare.main(_folder(clips), out)
    # a corrupt file is not probed again: the same bytes fail the same way
    assert calls == ["a/clip_2.avi", "a/clip_3.avi"] + [f"b/clip_{k}.avi" for k in range(4)]
    assert (counts.done, counts.skipped, counts.failed) == (6, 2, 1)

    fresh = tmp_path / "fresh"
    prepare.main(_folder(clips), fresh)
    assert set(file_bytes(out)) == PREPARED  # the journal is gone: the output has no history
    assert file_bytes(out) == file_bytes(fresh)
    assert "a/broken" in (out / "failures.csv").read_text()


def test_a_file_changed_since_the_killed_run_is_probed_again(
    clips: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    file_bytes: Callable[[Path], dict[str, bytes]],
) -> None:
    """Same path, other mtime (touched) or other size (replaced): the journaled probe is
    stale, and the new bytes' probe (sha256, frames) is what probe.csv says."""
    out = tmp_path / "prepare"
    _kill_after("prepare", 3, clips, out)
    touched, replaced = clips / "a" / "clip_0.avi", clips / "a" / "clip_1.avi"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _clip(replaced, seed=99, frames=9)

    calls = _count(monkeypatch, pipeline.preparation, "probe_file")
    counts = prepare.main(_folder(clips), out)
    assert sorted(calls) == [f"a/clip_{k}.avi" for k in range(4)] + [
        f"b/clip_{k}.avi" for k in range(4)
    ]
    assert (counts.done, counts.skipped, counts.failed) == (8, 0, 1)
    probe = (out / "probe.csv").read_text()
    assert "a/clip_1,9," in probe  # the replaced file's 9 frames, not the journaled 12
    fresh = tmp_path / "fresh"
    prepare.main(_folder(clips), fresh)
    assert file_bytes(out) == file_bytes(fresh)


def test_a_killed_decode_resumes_with_the_videos_it_had_not_checked(
    clips: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    file_bytes: Callable[[Path], dict[str, bytes]],
) -> None:
    run = tmp_path / "run"
    prepare.main(_folder(clips), run / "prepare")
    # a/clip_1 shrinks to 3 frames after it was probed at 12: its planned frames fail to read
    _clip(clips / "a" / "clip_1.avi", seed=1, frames=3)
    out = run / "decode"
    recorded = _kill_after("decode", 3, clips, out)
    assert [r.split('"video_id": ')[1][1:9] for r in recorded] == [
        "a/clip_0",
        "a/clip_1",
        "a/clip_2",
    ]

    calls = _count(monkeypatch, pipeline.planning, "read_frames")
    paths = {"manifest": run / "prepare/manifest.csv", "probe": run / "prepare/probe.csv"}
    counts = decode.main(_decode_cfg(), **paths, out=out)
    # the failed check of a/clip_1 is kept: the same frames of the same bytes fail again
    assert calls == ["a/clip_3.avi"] + [f"b/clip_{k}.avi" for k in range(4)]
    assert (counts.done, counts.skipped, counts.failed) == (5, 2, 1)
    assert "a/clip_1" in (out / "failures.csv").read_text()

    fresh = tmp_path / "fresh"
    decode.main(_decode_cfg(), **paths, out=fresh)
    assert set(file_bytes(out)) == DECODED
    assert file_bytes(out) == file_bytes(fresh)

    # other decode settings: every journaled check is stale (a new kill, then a resume); the
    # finished run's memo would check nothing again at the same settings: the kill needs checks
    from pipeline.probe_memo import memo_path

    memo_path(out, "checks").unlink()
    _kill_after("decode", 2, clips, out)
    calls.clear()
    other = DecodeConfig(num_frames=4, flow_pairs=2, short_side=32, workers=1)
    decode.main(other, **paths, out=out)
    assert len(calls) == 8


def test_a_video_no_rank_recorded_is_an_error_naming_it_and_the_rerun_does_only_it(
    clips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 of two whose partner's journal never reaches rank 0's folder (another machine
    without a shared filesystem): rank 0 probes its share, then finds the other share
    missing, names it and keeps the journal; the next run probes only the missing videos."""

    class Alone(World):  # rank 0 of 2; the collectives answer as if rank 1 agreed
        def barrier(self) -> None:
            pass

        def broadcast(self, obj: object) -> object:
            return obj

        def gather(self, obj: object) -> list[object]:
            return [obj, obj]

    out = tmp_path / "prepare"
    calls = _count(monkeypatch, pipeline.preparation, "probe_file")
    with pytest.raises(JournalError) as e:
        prepare_dataset(_folder(clips), out=out, world=Alone(rank=0, size=2))
    ids = ["a/broken", *(f"{c}/clip_{k}" for c in "ab" for k in range(4))]
    assert len(calls) == 5  # rank 0's share: ids 0, 2, 4, 6, 8 of the 9
    msg = str(e.value)
    assert msg.startswith(f"{out / JOURNAL}: 4 of 9 videos have no record")
    assert all(f"{v} (" in msg for v in ids[1::2]) and "shared filesystem" in msg
    assert not (out / "manifest.csv").exists() and (out / JOURNAL).is_dir()

    calls.clear()
    counts = prepare.main(_folder(clips), out)
    assert sorted(calls) == sorted(f"{v}.avi" for v in ids[1::2])
    assert (counts.done, counts.skipped, counts.failed) == (4, 4, 1)


def test_a_persisted_output_keeps_nothing_of_an_earlier_run(
    clips: Path, tmp_path: Path, file_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    """DVC no longer empties data/prepare (persist: true): a smaller demo leaves none of the
    bigger one's videos, and a dataset that is not the demo leaves no demo at all."""
    out = tmp_path / "prepare"
    small = DatasetConfig(
        name="demo", demo=DemoConfig(videos_per_class=4, frames=12, size=32), probe_workers=1
    )
    prepare.main(small, out)
    alone = file_bytes(out)
    shutil.rmtree(out)
    big = DatasetConfig(
        name="demo", demo=DemoConfig(videos_per_class=8, frames=12, size=32), probe_workers=1
    )
    prepare.main(big, out)
    prepare.main(small, out)
    assert file_bytes(out) == alone
    prepare.main(_folder(clips), out)
    assert set(file_bytes(out)) == PREPARED


def test_prepare_and_decode_under_two_torchrun_ranks_equal_one_process(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    torchrun: Callable[[int], list[str]],
    file_bytes: Callable[[Path], dict[str, bytes]],
) -> None:
    """Rank 0 writes the demo, both ranks probe (then check) half of its 24 videos, and rank 0
    writes the outputs: byte for byte those of one process, at the same paths."""
    params = tmp_path / "params.yaml"
    params.write_text(
        "dataset:\n  name: demo\n  probe_workers: 1\n"
        "  demo:\n    videos_per_class: 4\n    frames: 12\n    size: 32\n"
        "decode:\n  num_frames: 8\n  flow_pairs: 2\n  short_side: 32\n  workers: 1\n"
    )
    data = tmp_path / "data"
    prep, dec = data / "prepare", data / "decode"
    stages = [
        ["-m", "stages.prepare", "--out", str(prep)],
        [
            "-m", "stages.decode", "--manifest", str(prep / "manifest.csv"),
            "--probe", str(prep / "probe.csv"), "--out", str(dec),
        ],
    ]  # fmt: skip
    for stage, desc, name in zip(stages, ("probe", "decode"), ("prepare", "decode"), strict=True):
        cmd = [*torchrun(2), *stage, "--params", str(params)]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"{desc}: rank 0 of 2: 12 videos to do" in run.stderr
        assert f"{desc}: rank 1 of 2: 12 videos to do" in run.stderr
        assert f"{name}: 24 done, 0 already done" in run.stderr  # rank 0 counts both shares
    # the stage outputs; decode's memo of checks beside them (.decode.checks.jsonl) holds this
    # machine's absolute paths, and is not an output
    ranks = {k: v for k, v in file_bytes(data).items() if not k.startswith(".")}
    assert {k for k in ranks if not k.startswith("prepare/demo/")} == {
        *(f"prepare/{n}" for n in PREPARED),
        *(f"decode/{n}" for n in DECODED),
    }

    shutil.rmtree(data)
    monkeypatch.chdir(ROOT)  # where the subprocesses ran: paths are written the same
    cfg = DatasetConfig(
        name="demo", demo=DemoConfig(videos_per_class=4, frames=12, size=32), probe_workers=1
    )
    prepare.main(cfg, prep)
    decode.main(
        DecodeConfig(num_frames=8, flow_pairs=2, short_side=32, workers=1),
        manifest=prep / "manifest.csv",
        probe=prep / "probe.csv",
        out=dec,
    )
    assert {k: v for k, v in file_bytes(data).items() if not k.startswith(".")} == ranks


def test_a_decode_after_a_video_was_added_checks_only_that_video(
    tiny_demo: Path, tmp_path: Path
) -> None:
    """The decode stage's memo of frame checks: after the dataset gained a video, decode checks
    that one and reuses the rest; the plan equals a fresh run's byte for byte; a changed
    setting checks every video again."""
    from pipeline.datasets import read_manifest
    from pipeline.manifest import write_manifest

    manifest, probe = tiny_demo / "prepare/manifest.csv", tiny_demo / "prepare/probe.csv"
    full = read_manifest(manifest)
    fewer = tmp_path / "fewer.csv"
    write_manifest(full.without([full.videos[0].video_id]), fewer)
    cfg = DecodeConfig(num_frames=8, flow_pairs=2, short_side=32, workers=1)
    out = tmp_path / "decode"
    first = decode.main(cfg, manifest=fewer, probe=probe, out=out)
    assert (first.done, first.skipped) == (len(full.videos) - 1, 0)
    again = decode.main(cfg, manifest=manifest, probe=probe, out=out)
    assert (again.done, again.skipped) == (1, len(full.videos) - 1)
    fresh = decode.main(cfg, manifest=manifest, probe=probe, out=tmp_path / "fresh")
    assert (fresh.done, fresh.skipped) == (len(full.videos), 0)
    for name in ("plan.json", "failures.csv"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert not (out / JOURNAL).exists()  # the output holds no history; the memo is beside it
    other = DecodeConfig(num_frames=6, flow_pairs=2, short_side=32, workers=1)
    changed = decode.main(other, manifest=manifest, probe=probe, out=out)
    assert (changed.done, changed.skipped) == (len(full.videos), 0)
