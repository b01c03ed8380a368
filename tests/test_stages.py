"""Stage behaviour on real and bad inputs: failures recorded with reasons, the rest goes on;
interrupted flow/features resume without recomputing finished videos."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import kill_when_cached, prepare_tiny_demo

from pipeline.cache import open_cache
from pipeline.config import (
    CacheConfig,
    DatasetConfig,
    DecodeConfig,
    DemoConfig,
    FlowConfig,
    StreamFeaturesConfig,
)
from pipeline.datasets import read_manifest
from pipeline.demo import render, write_video
from pipeline.models import read_checkpoint
from pipeline.plan import Plan, read_plan, write_plan
from stages import decode, features, flow, prepare

# Every test runs stages (some under kill -9 or torchrun).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY_DEMO = DemoConfig(videos_per_class=4, frames=12, size=32)


def _failures(path: Path) -> dict[str, str]:
    with path.open(newline="") as fh:
        return {r["video_id"]: r["reason"] for r in csv.DictReader(fh)}


@pytest.fixture
def bad_folder(tmp_path: Path, testdata: Path) -> Path:
    """A folder-per-class dataset mixing good clips with every kind of bad input."""
    v = testdata / "videos"
    root = tmp_path / "videos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    for cls, name in [
        ("a", "test.avi"),
        ("a", "video_0.mov"),
        ("b", "part_0.mp4"),
        ("b", "corrupted.mp4"),
    ]:
        (root / cls / name).symlink_to(v / name)
    (root / "a" / "empty.avi").write_bytes(b"")
    (root / "b" / "notes.avi").write_text("this is a text file, not a video\n")
    return root


def test_bad_inputs_are_recorded_and_the_rest_goes_on(bad_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepare"
    counts = prepare.main(
        DatasetConfig(name="folder", root=str(bad_folder), test_fraction=0.5, probe_workers=1), out
    )
    failed = _failures(out / "failures.csv")
    assert counts.failed == 3 and counts.done == 3
    assert set(failed) == {"a/empty", "b/notes", "b/corrupted"}
    assert "empty file (0 bytes)" in failed["a/empty"] and "empty.avi" in failed["a/empty"]
    assert "not a decodable video" in failed["b/notes"] and "notes.avi" in failed["b/notes"]
    # corrupted.mp4 opens, but the probe decodes every frame and its 29th packet fails
    assert "corrupted.mp4: decoding failed after 28 frames" in failed["b/corrupted"]
    manifest_ids = {v.video_id for v in read_manifest(out / "manifest.csv").videos}
    assert manifest_ids == {"a/test", "a/video_0", "b/part_0"}

    dec = tmp_path / "decode"
    cfg = DecodeConfig(num_frames=25, flow_pairs=5, short_side=64, workers=1)
    counts = decode.main(cfg, manifest=out / "manifest.csv", probe=out / "probe.csv", out=dec)
    assert counts.failed == 0 and counts.done == 3
    plan = read_plan(dec / "plan.json")
    assert set(plan.videos) == {"a/test", "a/video_0", "b/part_0"}
    # the 3-frame clip is looped to 25 points, as MRRN loops short videos
    short = plan.videos["a/video_0"]
    assert short.looped and short.points[:6] == [0, 1, 2, 0, 1, 2]
    assert not plan.videos["a/test"].looped


def _params(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flow_killed_mid_run_resumes_without_recomputing(
    tiny_demo: Path, tmp_path: Path, file_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    plan = tiny_demo / "decode" / "plan.json"
    params = _params(
        tmp_path / "params.yaml",
        "flow:\n  algorithm: tvl1\n  workers: 1\ncache:\n  videos_per_pack: 8\n",
    )
    out = tmp_path / "flow"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["-m", "stages.flow", "--params", str(params), "--plan", str(plan), "--out", str(out)]
    cache_dir = out / "cache"
    finished = kill_when_cached(cmd, cache_dir, env=env)
    total = len(read_plan(plan).videos)
    assert 3 <= finished < total

    cfg, packs = FlowConfig(algorithm="tvl1", workers=1), CacheConfig(videos_per_pack=8)
    counts = flow.main(cfg, plan_path=plan, out=out, cache_cfg=packs)
    # finished videos are kept, not recomputed
    assert (counts.skipped, counts.done, counts.failed) == (finished, total - finished, 0)

    # The resumed cache equals an uninterrupted run, file for file and byte for byte.
    fresh = tmp_path / "fresh"
    flow.main(cfg, plan_path=plan, out=fresh, cache_cfg=packs)
    assert file_bytes(cache_dir) == file_bytes(fresh / "cache")
    # cache.json + 4 packs (zarr.json + shard each): the 24 demo ids' content runs at 8 a pack
    assert len(file_bytes(cache_dir)) <= 1 + 2 * 4


def test_changed_video_is_recomputed_not_resumed(tmp_path: Path) -> None:
    """Same id, same settings, other bytes: a finished entry from the old file is stale."""
    root = tmp_path
    demo = DemoConfig(videos_per_class=4, frames=12, size=32)
    prep = root / "prepare"
    prepare.main(DatasetConfig(name="demo", demo=demo, probe_workers=1), prep)
    dec_cfg = DecodeConfig(num_frames=6, flow_pairs=2, short_side=32, workers=1)
    decode.main(
        dec_cfg, manifest=prep / "manifest.csv", probe=prep / "probe.csv", out=root / "decode"
    )
    cfg = FlowConfig(algorithm="farneback", workers=1)
    flow.main(cfg, plan_path=root / "decode/plan.json", out=root / "flow")

    # Regenerating the demo writes identical files: nothing to recompute.
    prepare.main(DatasetConfig(name="demo", demo=demo, probe_workers=1), prep)
    decode.main(
        dec_cfg, manifest=prep / "manifest.csv", probe=prep / "probe.csv", out=root / "decode"
    )
    same = flow.main(cfg, plan_path=root / "decode/plan.json", out=root / "flow")
    assert (same.done, same.skipped) == (0, 24)

    # Now one video gets other content under the same name.
    plan = read_plan(root / "decode/plan.json")
    vid = sorted(plan.videos)[0]
    frames = render("motion_right", np.random.default_rng(99), np.full((32, 32, 3), 90.0), 12)
    write_video(Path(plan.videos[vid].path), frames, 25)
    # prepare would regenerate the demo; re-probe by hand so the new bytes are what the plan sees
    from pipeline.preparation import probe_file

    rows = list(csv.DictReader((prep / "probe.csv").open()))
    for r in rows:
        if r["video_id"] == vid:
            r["sha256"] = probe_file(Path(plan.videos[vid].path)).sha256
    with (prep / "probe.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    decode.main(
        dec_cfg, manifest=prep / "manifest.csv", probe=prep / "probe.csv", out=root / "decode"
    )
    changed = flow.main(cfg, plan_path=root / "decode/plan.json", out=root / "flow")
    assert (changed.done, changed.skipped) == (1, 23)


def test_videos_no_longer_planned_leave_the_persisted_caches(
    tiny_demo: Path, tmp_path: Path, file_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    """flow and features keep their outputs between runs (persist: true). A video the plan no
    longer lists leaves both caches, so features@flow, which reads the flow cache's videos,
    computes exactly the planned ones, and the caches equal a run on the smaller plan alone."""
    full = read_plan(tiny_demo / "decode/plan.json")
    gone = sorted(full.videos)[:3]
    smaller = tmp_path / "decode/plan.json"
    write_plan(
        smaller, Plan(full.settings, {k: v for k, v in full.videos.items() if k not in gone})
    )
    cfg = FlowConfig(algorithm="farneback", workers=1)
    feat = dataclasses.replace(
        StreamFeaturesConfig(), backbone="resnet18", weights="none", crop=32, threads=1
    )
    out = tmp_path / "run"
    flow.main(cfg, plan_path=tiny_demo / "decode/plan.json", out=out / "flow")
    features.main(feat, stream="flow", source=out / "flow", out=out / "feat")
    again = flow.main(cfg, plan_path=smaller, out=out / "flow")
    assert (again.done, again.skipped) == (0, 21)
    counts = features.main(feat, stream="flow", source=out / "flow", out=out / "feat")
    assert (counts.done, counts.skipped) == (0, 21)
    for cache in (out / "flow/cache", out / "feat/cache"):
        with open_cache(cache, "r") as c:
            assert c.keys() == sorted(set(full.videos) - set(gone))
    alone = tmp_path / "alone"
    flow.main(cfg, plan_path=smaller, out=alone / "flow")
    features.main(feat, stream="flow", source=alone / "flow", out=alone / "feat")
    assert file_bytes(out / "flow/cache") == file_bytes(alone / "flow/cache")
    assert file_bytes(out / "feat/cache") == file_bytes(alone / "feat/cache")


def test_flow_settings_change_starts_the_cache_over(tiny_demo: Path, tmp_path: Path) -> None:
    plan = tiny_demo / "decode" / "plan.json"
    out = tmp_path / "flow"
    flow.main(FlowConfig(algorithm="farneback", workers=1), plan_path=plan, out=out)
    again = flow.main(
        FlowConfig(algorithm="farneback", bound=10.0, workers=1), plan_path=plan, out=out
    )
    assert again.skipped == 0 and again.done == 24
    with open_cache(out / "cache", "r") as c:
        assert c.attrs["flow"]["bound"] == 10.0


def test_features_precision_is_recorded_and_a_change_restarts(
    tiny_demo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rgb"
    fp32 = StreamFeaturesConfig(
        backbone="resnet18", weights="none", crop=32, batch_size=16, threads=1, device="cpu"
    )
    features.main(fp32, stream="rgb", source=tiny_demo / "decode", out=out)
    with open_cache(out / "cache", "r") as c:
        assert (c.attrs["precision"], c.attrs["device"]) == ("fp32", "cpu")
        ref = c.read(c.keys()[0]).astype(np.float32)
    bf16 = dataclasses.replace(fp32, precision="bf16")
    again = features.main(bf16, stream="rgb", source=tiny_demo / "decode", out=out)
    assert again.skipped == 0 and again.done == 24  # other numerics: never mixed with fp32 rows
    with open_cache(out / "cache", "r") as c:
        assert c.attrs["precision"] == "bf16"
        low = c.read(c.keys()[0]).astype(np.float32)
    cos = (ref * low).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(low, axis=1))
    assert cos.min() > 0.98 and not np.array_equal(ref, low)


def test_features_compile_is_recorded_and_gives_the_eager_features(
    tiny_demo: Path, tmp_path: Path
) -> None:
    """features.compile: true runs the torch.compile'd network (checked against the eager one
    on the first batch); its other rounding restarts the cache, like a precision change."""
    cfg = StreamFeaturesConfig(
        backbone="resnet18", weights="none", crop=32, batch_size=16, threads=1, device="cpu"
    )
    out = tmp_path / "rgb"
    features.main(cfg, stream="rgb", source=tiny_demo / "decode", out=out)
    with open_cache(out / "cache", "r") as c:
        eager = {k: c.read(k).astype(np.float32) for k in c.keys()}
    again = features.main(
        dataclasses.replace(cfg, compile=True), stream="rgb", source=tiny_demo / "decode", out=out
    )
    assert again.skipped == 0 and again.done == 24
    with open_cache(out / "cache", "r") as c:
        assert c.attrs["compile"] is True
        for k, ref in eager.items():
            got = c.read(k).astype(np.float32)
            np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_joint_training_concatenates_streams_and_logs_the_head_report(
    tiny_demo: Path, tmp_path: Path
) -> None:
    """train on rgb+flow: features concatenated along D, stream_dims passed to a head that takes
    it (RTSAE, eqs. 15-16), and the head's report (fraction of steps kept) logged."""
    import json

    from pipeline.config import TrainConfig
    from stages import train

    m = read_manifest(tiny_demo / "prepare" / "manifest.csv")
    rng = np.random.default_rng(0)
    dirs = []
    for stream in ("rgb", "flow"):
        d = tmp_path / stream
        with open_cache(d / "cache", "w", attrs={"dim": 8, "backbone": "synthetic"}) as c:
            for v in m.videos:
                c.write(v.video_id, (rng.normal(size=(5, 8)) + v.label).astype(np.float16))
        dirs.append(d)
    params = {"hidden": 8, "encoder_hidden": 8, "projection_dim": 4, "epochs": 2, "batch_size": 8}
    out = tmp_path / "out"
    train.main(
        "rtsae",
        "rgb+flow",
        head_params=params,
        cfg=TrainConfig(oof_folds=0, threads=1),
        features=dirs,
        manifest=tiny_demo / "prepare" / "manifest.csv",
        out=out,
    )
    log = json.loads((out / "train_log.json").read_text())
    assert log["features"] == ["synthetic", "synthetic"]
    assert 0.0 < log["splits"]["1"]["test_kept_fraction"] <= 1.0
    state = read_checkpoint(out / "model_split1.pt")["state_dict"]
    assert "log_w_f" in state  # the two-stream fusion weight of eq. 16 exists only with stream_dims
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + len(m.videos) and rows[0].startswith("split,subset,video_id,label")


def test_a_stage_where_every_video_fails_stops_and_says_where_the_reasons_are(
    tmp_path: Path,
) -> None:
    root = tmp_path / "videos"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / f"empty_{cls}.avi").write_bytes(b"")
        (root / cls / f"notes_{cls}.avi").write_text("not a video\n")
    out = tmp_path / "prepare"
    cfg = DatasetConfig(name="folder", root=str(root), test_fraction=0.5, probe_workers=1)
    with pytest.raises(
        SystemExit, match=r"prepare: no video succeeded \(4 failed; reasons in .*failures.csv\)"
    ):
        prepare.main(cfg, out)
    assert len(_failures(out / "failures.csv")) == 4  # the reasons were written before stopping


def test_flow_under_two_torchrun_ranks_equals_one_process(
    tiny_demo: Path,
    tmp_path: Path,
    torchrun: Callable[[int], list[str]],
    file_bytes: Callable[[Path], dict[str, bytes]],
) -> None:
    plan = tiny_demo / "decode" / "plan.json"
    params = _params(
        tmp_path / "params.yaml",
        "flow:\n  algorithm: farneback\n  workers: 1\ncache:\n  videos_per_pack: 8\n",
    )
    out = tmp_path / "ranks"
    stage = ["-m", "stages.flow", "--params", str(params), "--plan", str(plan), "--out", str(out)]
    cmd = [*torchrun(2), *stage]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "flow: 24 done" in run.stderr  # rank 0 reports both ranks' videos
    single = tmp_path / "single"
    cfg = FlowConfig(algorithm="farneback", workers=1)
    flow.main(cfg, plan_path=plan, out=single, cache_cfg=CacheConfig(videos_per_pack=8))
    assert file_bytes(out / "cache") == file_bytes(single / "cache")


def test_a_clone_at_another_path_writes_the_same_prepare_and_decode_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_bytes: Callable
) -> None:
    """DVC hashes what prepare and decode write: two clones of the project at other paths must
    write the same bytes, or a teammate's `dvc pull` + `dvc repro` would re-run every stage.
    Each clone reads its own videos."""
    for clone in ("a", "b"):
        (tmp_path / clone).mkdir()
        monkeypatch.chdir(tmp_path / clone)
        prepare_tiny_demo(Path("data"))  # relative paths, as dvc.yaml passes them
    # the stage outputs: decode's memo beside them (.decode.checks.jsonl) is this machine's,
    # with absolute paths, like DVC's state database, and is not an output
    a, b = (
        {k: v for k, v in file_bytes(tmp_path / c / "data").items() if not k.startswith(".")}
        for c in "ab"
    )
    assert a.keys() == b.keys() and a["decode/plan.json"] == b["decode/plan.json"]
    assert a == b
    plan = read_plan(tmp_path / "b/data/decode/plan.json")  # read in clone b
    paths = [Path(v.path) for v in plan.videos.values()]
    assert all(p.is_relative_to(tmp_path / "b") and p.is_file() for p in paths)
