"""The features stage on a tiny demo: every extraction choice of issue 4 gives entries of the
shape its layout says, kill -9 resumes to the same bytes, and two torchrun ranks (gloo, CPU)
write the same cache as one process."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import kill_when_cached, prepare_tiny_demo

from pipeline.cache import open_cache
from pipeline.config import (
    CacheConfig,
    ConfigError,
    DatasetConfig,
    DecodeConfig,
    FlowConfig,
    StreamFeaturesConfig,
    TrainConfig,
)
from pipeline.identity import params_identity
from stages import decode, features, flow, prepare, train

# Every test runs the features stage (on the tiny demo; two under kill -9 or torchrun).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
R18 = StreamFeaturesConfig(backbone="resnet18", weights="none", crop=32, batch_size=16, threads=1)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same videos with dense sampling and Farneback flow of every consecutive pair."""
    cfg = DecodeConfig(short_side=32, flow_pairs=1, sampling="dense", workers=1)
    root = prepare_tiny_demo(tmp_path_factory.mktemp("dense"), cfg)
    flow.main(
        FlowConfig(algorithm="farneback", workers=1),
        plan_path=root / "decode/plan.json",
        out=root / "flow",
    )
    return root


def _entries(cache: Path) -> dict[str, np.ndarray]:
    with open_cache(cache, "r") as c:
        return {k: c.read(k) for k in c.keys()}


def test_pooled_rgb_entries_and_metadata(tiny_demo: Path, tmp_path: Path) -> None:
    counts = features.main(R18, stream="rgb", source=tiny_demo / "decode", out=tmp_path / "rgb")
    assert (counts.done, counts.skipped, counts.failed) == (24, 0, 0)
    with open_cache(tmp_path / "rgb/cache", "r") as c:
        a = c.attrs
        x = c.read(c.keys()[0])
    assert x.shape == (8, 512) and x.dtype == np.float16
    assert a["layout"] == "(T, D)" and a["layer"] and a["crops"] == "centre"
    assert a["params"]["backbone"] == "resnet18" and a["weights"].startswith("random")
    assert a["versions"]["torch"] and a["versions"]["av"]
    assert a["sampling"]["num_frames"] == 8


def test_mrrn_multi_level_taps_on_looped_clips(tiny_demo: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        R18,
        backbone="resnet34",
        output="taps",
        sampling="clips",
        clip_len=6,
        clip_stride=4,
        max_clips=2,
    )
    features.main(cfg, stream="rgb", source=tiny_demo / "decode", out=tmp_path / "taps")
    with open_cache(tmp_path / "taps/cache", "r") as c:
        assert c.attrs["layout"] == "(V, T, D)" and c.attrs["levels"] == [128, 256, 512]
        assert c.attrs["dim"] == 896
        x = c.read(c.keys()[0])
    # 12 frames: clips start at 0 and 4 (a third at 8 would pass the end), 6 frames each
    assert x.shape == (2, 6, 896)


def test_conv_maps_for_tsrnn(tiny_demo: Path, tmp_path: Path) -> None:
    dec = tiny_demo / "decode"
    features.main(
        dataclasses.replace(R18, output="maps"), stream="rgb", source=dec, out=tmp_path / "maps"
    )
    features.main(R18, stream="rgb", source=dec, out=tmp_path / "pooled")
    maps, pool = _entries(tmp_path / "maps/cache"), _entries(tmp_path / "pooled/cache")
    with open_cache(tmp_path / "maps/cache", "r") as c:
        assert c.attrs["layout"] == "(T, C, H, W)" and c.attrs["dim"] == 512
    k = sorted(maps)[0]
    assert maps[k].shape == (8, 512, 1, 1)  # 32 px crops; 7 x 7 at 224 (tests/test_backbones.py)
    np.testing.assert_allclose(
        maps[k].astype(np.float32).mean((2, 3)), pool[k].astype(np.float32), atol=2e-3
    )


def test_ten_crop_mean_is_the_mean_of_the_kept_crops(tiny_demo: Path, tmp_path: Path) -> None:
    dec = tiny_demo / "decode"
    axis = dataclasses.replace(R18, crop=24, crops="ten_axis")
    mean = dataclasses.replace(R18, crop=24, crops="ten_mean")
    features.main(axis, stream="rgb", source=dec, out=tmp_path / "axis")
    features.main(mean, stream="rgb", source=dec, out=tmp_path / "mean")
    a, m = _entries(tmp_path / "axis/cache"), _entries(tmp_path / "mean/cache")
    k = sorted(a)[0]
    assert a[k].shape == (10, 8, 512) and m[k].shape == (8, 512)
    # eq. (5); float16 storage of both sides
    np.testing.assert_allclose(a[k].astype(np.float32).mean(0), m[k], rtol=1e-2, atol=1e-2)
    assert not np.allclose(a[k][0], a[k][5])  # a crop and its mirror differ


def test_3d_clips_rgb_and_flow(dense: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        R18, backbone="r3d_18", sampling="clips", clip_len=8, clip_stride=4, batch_size=4
    )
    features.main(cfg, stream="rgb", source=dense / "decode", out=tmp_path / "rgb3d")
    features.main(cfg, stream="flow", source=dense / "flow", out=tmp_path / "flow3d")
    with open_cache(tmp_path / "rgb3d/cache", "r") as c:
        assert c.attrs["layout"] == "(T, D)" and c.attrs["dim"] == 512
        rgb = c.read(c.keys()[0])
    with open_cache(tmp_path / "flow3d/cache", "r") as c:
        assert c.attrs["flow"]["algorithm"] == "farneback"
        fl = c.read(c.keys()[0])
    # K = floor((l - s) / r) + 1: 12 frames -> 2 clips; 11 flow fields -> 1 clip
    assert rgb.shape == (2, 512) and fl.shape == (1, 512)


def test_3d_flow_refuses_stacked_flow_once_before_any_video(
    tiny_demo: Path, tmp_path: Path
) -> None:
    """Stacks of 2 flow fields per point cannot make 3D flow clips: the stage stops once, naming
    the flow cache, where it used to fail every video on its own."""
    flow.main(
        FlowConfig(algorithm="farneback", workers=1),
        plan_path=tiny_demo / "decode/plan.json",
        out=tmp_path / "flow",
    )
    cfg = dataclasses.replace(R18, backbone="r3d_18", sampling="clips", clip_len=4, clip_stride=2)
    with pytest.raises(ConfigError) as e:
        features.main(cfg, stream="flow", source=tmp_path / "flow", out=tmp_path / "f3d")
    assert str(e.value) == (
        "features.flow.backbone: r3d_18 is a 3D backbone: its flow clips take one flow field per "
        f"step, and {tmp_path / 'flow/cache'} has 2 per point (decode.flow_pairs: 1, "
        "decode.sampling: dense)"
    )
    assert not (tmp_path / "f3d").exists()


def test_hdf5_backend_holds_the_same_features(tiny_demo: Path, tmp_path: Path) -> None:
    dec = tiny_demo / "decode"
    features.main(R18, stream="rgb", source=dec, out=tmp_path / "z")
    features.main(
        R18, stream="rgb", source=dec, out=tmp_path / "h", cache_cfg=CacheConfig(backend="hdf5")
    )
    z, h = _entries(tmp_path / "z/cache"), _entries(tmp_path / "h/cache")
    assert sorted(z) == sorted(h) and len(z) == 24
    for k in z:
        np.testing.assert_array_equal(z[k], h[k])
    assert any(p.suffix == ".h5" for p in (tmp_path / "h/cache").rglob("*"))


def _stage_cmd(params: Path, source: Path, out: Path) -> list[str]:
    return ["-m", "stages.features", "--params", str(params), "--stream", "rgb",
            "--input", str(source), "--out", str(out)]  # fmt: skip


PARAMS = """features:
  rgb: {backbone: resnet18, weights: none, crop: 32, batch_size: 16, threads: 1, device: cpu}
cache: {backend: zarr, videos_per_pack: 8}
"""


def test_killed_mid_run_resumes_to_the_same_bytes(
    tiny_demo: Path, tmp_path: Path, file_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.replace("batch_size: 16", "batch_size: 4"))
    out = tmp_path / "killed"
    finished = kill_when_cached(_stage_cmd(params, tiny_demo / "decode", out), out / "cache")
    assert 3 <= finished < 24
    cfg = dataclasses.replace(R18, batch_size=4)
    packs = CacheConfig(videos_per_pack=8)
    again = features.main(cfg, stream="rgb", source=tiny_demo / "decode", out=out, cache_cfg=packs)
    assert (again.skipped, again.done, again.failed) == (finished, 24 - finished, 0)
    fresh = tmp_path / "fresh"
    features.main(cfg, stream="rgb", source=tiny_demo / "decode", out=fresh, cache_cfg=packs)
    assert file_bytes(out / "cache") == file_bytes(fresh / "cache")
    # cache.json + 4 packs (zarr.json + shard each): the 24 demo ids' content runs at 8 a pack
    assert len(file_bytes(fresh / "cache")) <= 1 + 2 * 4


def test_two_torchrun_ranks_write_the_same_cache_as_one_process(
    tiny_demo: Path,
    tmp_path: Path,
    torchrun: Callable[[int], list[str]],
    file_bytes: Callable[[Path], dict[str, bytes]],
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    out = tmp_path / "ranks"
    cmd = [*torchrun(2), *_stage_cmd(params, tiny_demo / "decode", out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 1/2" in run.stderr and "rank 0/2" in run.stderr  # both ranks worked
    single = tmp_path / "single"
    features.main(
        R18,
        stream="rgb",
        source=tiny_demo / "decode",
        out=single,
        cache_cfg=CacheConfig(videos_per_pack=8),
    )
    assert file_bytes(out / "cache") == file_bytes(single / "cache")
    assert len(_entries(out / "cache")) == 24


# -- the papers' feature choices feed their heads -----------------------------------------------


def _train(
    head: str, params: dict, feats: Path, root: Path, out: Path, cfg: StreamFeaturesConfig
) -> dict:
    train.main(
        head,
        "rgb",
        head_params={"epochs": 2, "batch_size": 8, **params},
        cfg=TrainConfig(oof_folds=0, threads=1),
        features=[feats],
        manifest=root / "prepare/manifest.csv",
        out=out,
        expected=[params_identity(cfg)],
    )
    return json.loads((out / "train_log.json").read_text())


def test_mrrn_taps_train_the_three_level_sru_and_a_contradiction_stops(
    tiny_demo: Path, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(
        R18, backbone="resnet34", output="taps", sampling="clips", clip_len=6, clip_stride=4
    )
    features.main(cfg, stream="rgb", source=tiny_demo / "decode", out=tmp_path / "taps")
    sru = {"hidden": 8, "layers": 1, "levels": [128, 256, 512]}
    log = _train("sru", sru, tmp_path / "taps", tiny_demo, tmp_path / "sru", cfg)
    assert log["splits"]["1"]["train_views"] == 2 * log["splits"]["1"]["train_videos"]
    scores = (tmp_path / "sru/scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 24  # one row per video, not per clip
    other = dataclasses.replace(cfg, backbone="resnet18")
    with pytest.raises(SystemExit, match="params.backbone: 'resnet34' -> 'resnet18'"):
        _train("sru", sru, tmp_path / "taps", tiny_demo, tmp_path / "bad", other)


def test_res_lstm_on_3d_clips_of_real_videos_of_unequal_length(
    testdata: Path, tmp_path: Path
) -> None:
    """Res-LSTM's K_v = floor(l_v / 8) - 1 clips differ per video; train brings each video to
    train.steps steps with sigma(t)."""
    videos = tmp_path / "videos"
    for cls, name in [
        ("a", "test.avi"),
        ("a", "video_0.mov"),
        ("b", "part_0.mp4"),
        ("b", "example.avi"),
    ]:
        (videos / cls).mkdir(parents=True, exist_ok=True)
        (videos / cls / name).symlink_to(testdata / "videos" / name)
    prepare.main(
        DatasetConfig(name="folder", root=str(videos), test_fraction=0.5, probe_workers=1),
        tmp_path / "prepare",
    )
    decode.main(
        DecodeConfig(num_frames=4, flow_pairs=1, short_side=32, workers=1),
        manifest=tmp_path / "prepare/manifest.csv",
        probe=tmp_path / "prepare/probe.csv",
        out=tmp_path / "decode",
    )
    cfg = dataclasses.replace(
        R18, backbone="r3d_18", sampling="clips", clip_len=16, clip_stride=8, crops="ten_mean",
        crop=24, batch_size=8,
    )  # fmt: skip
    features.main(cfg, stream="rgb", source=tmp_path / "decode", out=tmp_path / "r3d")
    with open_cache(tmp_path / "r3d/cache", "r") as c:
        lengths = {k: c.read(k).shape for k in c.keys()}
    # 164, 3 (looped to one clip), 32 and 131 frames
    assert lengths == {  # ids are paths under the folder dataset's root
        "a/test": (19, 512),
        "a/video_0": (1, 512),
        "b/part_0": (3, 512),
        "b/example": (15, 512),
    }
    res = {"hidden": 16, "layers": 2, "steps": None, "projection": "learned"}
    train.main(
        "res_lstm",
        "rgb",
        head_params={"epochs": 2, "batch_size": 2, **res},
        cfg=TrainConfig(oof_folds=0, threads=1, steps=5),
        features=[tmp_path / "r3d"],
        manifest=tmp_path / "prepare/manifest.csv",
        out=tmp_path / "train",
        expected=[params_identity(cfg)],
    )
    log = json.loads((tmp_path / "train/train_log.json").read_text())
    assert log["steps"] == 5
    assert len((tmp_path / "train/scores.csv").read_text().splitlines()) == 1 + 4


def test_stacked_flow_with_taps_and_ten_crops(tiny_demo: Path, tmp_path: Path) -> None:
    """Every 2D choice works on the flow stream too: 2L = 4 channel stacks, cross-modality init."""
    flow.main(
        FlowConfig(algorithm="farneback", workers=1),
        plan_path=tiny_demo / "decode/plan.json",
        out=tmp_path / "flow",
    )
    cfg = dataclasses.replace(R18, backbone="resnet34", output="taps", crop=24, crops="ten_axis")
    features.main(cfg, stream="flow", source=tmp_path / "flow", out=tmp_path / "f")
    with open_cache(tmp_path / "f/cache", "r") as c:
        assert c.attrs["layout"] == "(V, T, D)" and c.attrs["flow"]["algorithm"] == "farneback"
        x = c.read(c.keys()[0])
    assert x.shape == (10, 8, 896)
