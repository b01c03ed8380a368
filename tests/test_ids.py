"""Video ids of real datasets through the real stages: one file name in two class folders,
Cyrillic names (which the old ids all turned into "___01"), commas and quotes, and a CSV that
lists one file twice. Distinct files must stay distinct videos from prepare to evaluate, and a
duplicate must cost one recorded failure, never the stage."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import CacheError, open_cache
from pipeline.config import (
    DatasetConfig,
    DecodeConfig,
    EvaluateConfig,
    FlowConfig,
    FusionConfig,
    RunConfig,
    StreamFeaturesConfig,
    TrainConfig,
)
from pipeline.datasets import read_manifest
from pipeline.plan import read_plan
from pipeline.scores import read_scores
from stages import decode, evaluate, features, flow, fuse, prepare, train

# Ids that the old rule (file name, everything outside [A-Za-z0-9_.-] as "_") made equal in
# pairs, with a comma and a quote for the CSV files on the way.
NAMES = {
    "walking/clip_01.avi": ("test.avi", "walking/clip_01"),
    "running/clip_01.avi": ("part_0.mp4", "running/clip_01"),
    "running/бег_01.avi": ("test.avi", "running/бег_01"),
    "walking/ход_01.avi": ("part_0.mp4", "walking/ход_01"),
    'walking/a, "b".avi': ("test.avi", 'walking/a, "b"'),
    'running/a, "b".mp4': ("part_0.mp4", 'running/a, "b"'),
}
IDS = {vid for _, vid in NAMES.values()}


def _failures(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def unicode_folder(tmp_path: Path, videos: Path) -> Path:
    """A folder-per-class dataset of real clips under names the old ids could not tell apart."""
    root = tmp_path / "videos"
    for rel, (clip, _) in NAMES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(videos / clip, root / rel)
    return root


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_cache_keeps_ids_with_slashes_and_unicode(tmp_path: Path, backend: str) -> None:
    """Written, compacted into packs, reopened and read back under the same ids."""
    ids = sorted(IDS | {"中文/한글/x y", "v_ApplyEyeMakeup_g08_c01"})
    arrays = {v: np.full((2 + i, 3), i, dtype=np.float16) for i, v in enumerate(ids)}
    with open_cache(tmp_path / "c", "w", attrs={"k": 1}, backend=backend, videos_per_pack=3) as c:
        for v in ids:
            c.write(v, arrays[v], {"source": f"sha-{v}"})
    with open_cache(tmp_path / "c", "r") as c:
        assert sorted(c.keys()) == ids
        for v in ids:
            np.testing.assert_array_equal(c.read(v), arrays[v])
            assert c.meta(v) == {"source": f"sha-{v}"}
        assert c.up_to_date({v: f"sha-{v}" for v in ids}) == set(ids)
    with open_cache(tmp_path / "c", "a", attrs={"k": 1}, backend=backend) as c:
        for bad in ("/a", "a/", "a//b", "a/../b", "a/./b", ".x", "a/.x", "a\nb", "a\udce9"):
            with pytest.raises(CacheError, match="invalid video id"):
                c.write(bad, np.ones(2))
            assert bad not in c


@pytest.mark.slow  # runs every stage
def test_unicode_and_nested_names_go_through_every_stage(
    unicode_folder: Path, tmp_path: Path
) -> None:
    """prepare -> decode -> flow -> features (rgb, flow) -> train -> fuse -> evaluate on the real
    stages: six files, six distinct ids everywhere, nothing failed. The old ids aborted prepare
    ('duplicate video_id')."""
    prep, dec = tmp_path / "prepare", tmp_path / "decode"
    counts = prepare.main(
        DatasetConfig(name="folder", root=str(unicode_folder), test_fraction=0.5, probe_workers=1),
        prep,
    )
    assert (counts.done, counts.failed) == (6, 0)
    m = read_manifest(prep / "manifest.csv")
    assert {v.video_id for v in m.videos} == IDS
    assert {v.path.relative_to(unicode_folder).as_posix(): v.video_id for v in m.videos} == {
        rel: vid for rel, (_, vid) in NAMES.items()
    }
    assert m.classes == ("running", "walking")

    decode.main(
        DecodeConfig(num_frames=4, flow_pairs=1, short_side=32, workers=1),
        manifest=prep / "manifest.csv",
        probe=prep / "probe.csv",
        out=dec,
    )
    assert set(read_plan(dec / "plan.json").videos) == IDS
    got = flow.main(
        FlowConfig(algorithm="farneback", workers=1),
        plan_path=dec / "plan.json",
        out=tmp_path / "flow",
    )
    assert (got.done, got.failed) == (6, 0)
    cfg = StreamFeaturesConfig(
        backbone="resnet18", weights="none", crop=32, batch_size=8, threads=1, device="cpu"
    )
    for stream, source in (("rgb", dec), ("flow", tmp_path / "flow")):
        got = features.main(cfg, stream=stream, source=source, out=tmp_path / "features" / stream)
        assert (got.done, got.failed) == (6, 0)
        with open_cache(tmp_path / "features" / stream / "cache", "r") as c:
            assert set(c.keys()) == IDS

    run = RunConfig(heads=("mean_pool",), streams=("rgb", "flow"))
    for stream in run.streams:
        train.main(
            "mean_pool",
            stream,
            head_params={"epochs": 2, "batch_size": 4},
            cfg=TrainConfig(oof_folds=0, threads=1),
            features=[tmp_path / "features" / stream],
            manifest=prep / "manifest.csv",
            out=tmp_path / "train" / f"mean_pool-{stream}",
        )
        table = read_scores(tmp_path / "train" / f"mean_pool-{stream}" / "scores.csv")
        assert set(table.video_id) == IDS and len(table.video_id) == 6
    fuse.main(FusionConfig(methods=("sum",)), run, scores=tmp_path / "train", out=tmp_path / "fuse")
    fused = read_scores(tmp_path / "fuse" / "mean_pool-sum" / "scores.csv")
    assert sorted(fused.video_id) == sorted(v.video_id for v in m.subset("1", "test"))
    evaluate.main(
        EvaluateConfig(),
        run,
        scores=tmp_path / "train",
        fused=tmp_path / "fuse",
        manifest=prep / "manifest.csv",
        out=tmp_path / "evaluate",
    )
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert set(metrics["streams"]["mean_pool"]) == {"rgb", "flow"}
    per_class = (tmp_path / "evaluate" / "per_class.csv").read_text(encoding="utf-8")
    assert per_class.splitlines()[1].startswith("running,")


@pytest.mark.slow  # runs the prepare stage
def test_csv_listing_a_file_twice_is_one_failure_and_the_rest_goes_on(
    tmp_path: Path, videos: Path
) -> None:
    """A CSV naming one file twice, and two files that differ only in the extension: each is
    one failure in prepare's failures.csv naming the rows, the stage reports it and goes on."""
    root = tmp_path / "data"
    (root / "clips").mkdir(parents=True)
    for name, clip in (
        ("a.avi", "test.avi"),
        ("b.mp4", "part_0.mp4"),
        ("c.avi", "test.avi"),
        ("c.mp4", "part_0.mp4"),
        ("бег_01.avi", "test.avi"),
        ("ход_01.avi", "part_0.mp4"),
    ):
        shutil.copyfile(videos / clip, root / "clips" / name)
    table = root / "videos.csv"
    table.write_text(
        "path,label,split\n"
        "clips/a.avi,walk,train\n"
        "clips/b.mp4,run,train\n"
        "clips/a.avi,walk,test\n"
        "clips/c.avi,run,test\n"
        "clips/c.mp4,run,test\n"
        "clips/бег_01.avi,run,test\n"
        "clips/ход_01.avi,walk,test\n",
        encoding="utf-8",
    )
    out = tmp_path / "prepare"
    counts = prepare.main(DatasetConfig(name="csv", csv=str(table), probe_workers=1), out)
    assert (counts.done, counts.failed) == (3, 2)
    failed = {f["video_id"]: f for f in _failures(out / "failures.csv")}
    assert set(failed) == {"clips/a", "clips/c"}
    twice = failed["clips/a"]
    assert twice["stage"] == "prepare" and twice["path"] == str(root / "clips" / "a.avi")
    assert f"{table}:2" in twice["reason"] and f"{table}:4" in twice["reason"]
    assert "listed more than once" in twice["reason"]
    ext = failed["clips/c"]["reason"]
    assert str(root / "clips" / "c.avi") in ext and str(root / "clips" / "c.mp4") in ext
    m = read_manifest(out / "manifest.csv")
    assert sorted(v.video_id for v in m.videos) == ["clips/b", "clips/бег_01", "clips/ход_01"]
    with (out / "probe.csv").open(newline="", encoding="utf-8") as fh:
        assert sorted(r["video_id"] for r in csv.DictReader(fh)) == sorted(
            v.video_id for v in m.videos
        )
