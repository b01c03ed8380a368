"""Tests for stages/train.py and pipeline/streams.py on the cache layouts of the features stage:
sequences of unequal length (sigma(t) resampling), views (one sample per view, per-video mean
of softmax scores), conv maps (TSRNN only), and the checks of cache metadata against params.
The per-split protocol itself (pipeline/training.py): tests/test_training.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import streams, training
from pipeline.cache import open_cache
from pipeline.config import StreamFeaturesConfig, TrainConfig
from pipeline.datasets import read_manifest
from pipeline.heads import build_head
from pipeline.identity import params_identity
from pipeline.manifest import Manifest, VideoRecord, write_manifest
from pipeline.models import read_checkpoint
from pipeline.scores import read_scores
from pipeline.streams import StreamError
from stages import train

pytestmark = pytest.mark.usefixtures("one_thread")
# Tests marked slow run the train stage (stages.train.main, or its command line): the
# quick tier (`bash scripts/run.sh quick`) keeps the ones on pipeline/streams.py alone.

ROOT = Path(__file__).resolve().parents[1]
NO_OOF = TrainConfig(oof_folds=0, threads=1)


def _manifest(tmp: Path, *, classes: int = 2, per_class: int = 6, test: int = 2) -> Path:
    """One split: the last ``test`` videos of each class are test videos."""
    videos = [
        VideoRecord(
            video_id=f"c{c}_v{i:02d}",
            path=tmp / f"c{c}_v{i:02d}.avi",
            label=c,
            group=f"c{c}_v{i:02d}",
            splits=("test" if i >= per_class - test else "train",),
        )
        for c in range(classes)
        for i in range(per_class)
    ]
    path = tmp / "manifest.csv"
    m = Manifest(classes=tuple(f"k{c}" for c in range(classes)), split_names=("1",), videos=videos)
    write_manifest(m, path)
    return path


def _ids(manifest: Path, part: str | None = None) -> list[tuple[str, int]]:
    """(id, label) of the manifest's videos, or of its train / test videos."""
    m = read_manifest(manifest)
    return [(v.video_id, v.label) for v in (m.subset("1", part) if part else m.videos)]


def _cache(folder: Path, arrays: dict[str, np.ndarray], **attrs: object) -> Path:
    """A features-stage output folder holding ``arrays`` in ``folder/cache``."""
    some = next(iter(arrays.values()))
    attrs = {"dim": int(some.shape[-1]), "backbone": "synthetic", **attrs}
    with open_cache(folder / "cache", "w", attrs=attrs) as c:
        for vid, a in arrays.items():
            c.write(vid, a.astype(np.float16), {"source": "x"})
    return folder


def _steps_tagged(lengths: dict[str, int], d: int = 4) -> dict[str, np.ndarray]:
    """(K, d) arrays whose column 0 is the step index, so resampled rows can be read back."""
    out = {}
    for vid, k in lengths.items():
        a = np.zeros((k, d), dtype=np.float32)
        a[:, 0] = np.arange(k)
        out[vid] = a
    return out


def _load(
    dirs: list[Path],
    names: str = "rgb",
    steps: int | str = "auto",
    memory_gb: float | None = None,
) -> streams.Features:
    opened = streams.open_streams(dirs, names.split("+"))
    ids = sorted(set.intersection(*(set(s.cache.keys()) for s in opened)))
    return streams.load_features(opened, ids, steps=steps, memory_gb=memory_gb)


# -- item 1: sequences of unequal length ------------------------------------------------------


def test_unequal_lengths_are_resampled_to_the_shortest_by_sigma(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = _cache(tmp_path / "rgb", _steps_tagged({"a": 5, "b": 9, "c": 7}))
    with caplog.at_level(logging.INFO, logger="pipeline.streams"):
        f = _load([d], steps="shortest")
    assert f.steps == 5 and f.resampled
    assert {v: x[0].shape for v, x in f.videos.items()} == {"a": (5, 4), "b": (5, 4), "c": (5, 4)}
    # sigma(t) = 1 + floor((t - 1)(K - 1) / (T - 1)), 0-based: K = 9, T = 5 -> 0, 2, 4, 6, 8
    assert f.videos["b"][0][:, 0].tolist() == [0, 2, 4, 6, 8]
    assert f.videos["c"][0][:, 0].tolist() == [0, 1, 3, 4, 6]  # K = 7: 6 * i // 4
    assert f.videos["a"][0][:, 0].tolist() == [0, 1, 2, 3, 4]
    said = [r.getMessage() for r in caplog.records if "sigma" in r.getMessage()]
    assert len(said) == 1 and "5-9" in said[0] and "5 steps" in said[0]


def test_steps_given_brings_every_video_to_that_many_repeating_for_short_ones(
    tmp_path: Path,
) -> None:
    d = _cache(tmp_path / "rgb", _steps_tagged({"a": 5, "b": 9}))
    f = _load([d], steps=7)
    assert f.steps == 7
    assert f.videos["a"][0][:, 0].tolist() == [0, 0, 1, 2, 2, 3, 4]  # 4 * i // 6: K < T repeats
    assert f.videos["b"][0][:, 0].tolist() == [0, 1, 2, 4, 5, 6, 8]  # 8 * i // 6
    equal = _cache(tmp_path / "eq", _steps_tagged({"a": 6, "b": 6}))
    assert [x[0].shape[0] for x in _load([equal], steps=3).videos.values()] == [3, 3]


def test_equal_lengths_without_steps_stay_as_cached(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {v: rng.normal(size=(6, 4)).astype(np.float16) for v in "ab"}
    f = _load([_cache(tmp_path / "rgb", arrays)])  # steps: auto
    assert f.steps == 6 and not f.resampled
    for v, a in arrays.items():
        np.testing.assert_array_equal(f.videos[v][0], a)


@pytest.mark.slow
def test_joint_streams_of_k_and_k_minus_1_clips_are_each_resampled_then_concatenated(
    tmp_path: Path,
) -> None:
    manifest = _manifest(tmp_path, per_class=4, test=1)
    rng = np.random.default_rng(0)
    lengths = {vid: 6 + i % 3 for i, (vid, _) in enumerate(_ids(manifest))}  # K_v = 6..8
    rgb = _steps_tagged(lengths)
    flow = _steps_tagged({v: k - 1 for v, k in lengths.items()})  # 3D flow clips: K_v - 1
    for vid, label in _ids(manifest):
        rgb[vid][:, 1:] = rng.normal(size=(lengths[vid], 3)) + 2 * label
        flow[vid][:, 1:] = rng.normal(size=(lengths[vid] - 1, 3)) - 2 * label
    dirs = [_cache(tmp_path / "rgb", rgb), _cache(tmp_path / "flow", flow)]
    f = _load(dirs, "rgb+flow", steps="shortest")
    assert f.steps == 5 and f.dims == [4, 4]  # the shortest: flow of a K = 6 video
    x = f.videos["c0_v02"][0]  # K = 8 rgb, 7 flow
    assert x.shape == (5, 8)
    assert x[:, 0].tolist() == [0, 1, 3, 5, 7]  # rgb: 7 * i // 4
    assert x[:, 4].tolist() == [0, 1, 3, 4, 6]  # flow: 6 * i // 4

    out = tmp_path / "out"
    train.main(
        "mean_pool",
        "rgb+flow",
        head_params={"epochs": 2, "batch_size": 4},
        cfg=TrainConfig(oof_folds=2, threads=1, steps="shortest"),
        features=dirs,
        manifest=manifest,
        out=out,
    )
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 5
    assert len(read_scores(out / "scores.csv").video_id) == len(lengths)


# -- item 2: views ----------------------------------------------------------------------------


def _views_cache(tmp: Path, manifest: Path, d: int = 3) -> tuple[Path, dict[str, np.ndarray]]:
    """(V, T, D) with V = 2..4 per video and T = 5 or 6 per view: view 0 carries the label,
    the other views are noise."""
    rng = np.random.default_rng(0)
    arrays = {}
    for i, (vid, label) in enumerate(_ids(manifest)):
        v, t = 2 + i % 3, 5 + i % 2
        a = rng.normal(size=(v, t, d))
        a[0, :, label] += 8.0
        arrays[vid] = a
    return _cache(tmp / "rgb", arrays, layout="(V, T, D)"), arrays


@pytest.mark.slow
def test_views_train_one_sample_per_view_and_score_each_video_by_its_views_mean(
    tmp_path: Path,
) -> None:
    manifest = _manifest(tmp_path, per_class=14, test=4)
    d, arrays = _views_cache(tmp_path, manifest)
    out = tmp_path / "out"
    hp = {"dropout": 0.0, "lr": 0.05, "epochs": 40, "batch_size": 8}
    train.main(
        "mean_pool",
        "rgb",
        head_params=hp,
        cfg=TrainConfig(oof_folds=2, threads=1, steps="shortest"),
        features=[d],
        manifest=manifest,
        out=out,
    )
    log = json.loads((out / "train_log.json").read_text())["splits"]["1"]
    train_ids = [v for v, _ in _ids(manifest, "train")]
    assert log["train_videos"] == 20 and log["train_views"] == sum(
        len(arrays[v]) for v in train_ids
    )
    assert log["test_top1"] == 1.0  # view 0 is informative enough to win the mean
    table = read_scores(out / "scores.csv")
    assert sorted(table.video_id) == sorted(arrays)  # one row per video, train and test

    # By hand: the test score of a video is the mean over its views of the trained model's
    # softmax, each view brought to the shortest T (5) by sigma.
    model = build_head("mean_pool", in_dim=3, num_classes=2, dropout=0.0)
    model.load_state_dict(read_checkpoint(out / "model_split1.pt")["state_dict"])
    model.eval()
    vid = "c0_v13"  # a test video with 3 views of 6 steps
    views = torch.as_tensor(arrays[vid].astype(np.float16).astype(np.float32))
    assert views.shape == (3, 6, 3)
    with torch.no_grad():
        want = model(views[:, [0, 1, 2, 3, 5]]).softmax(-1).mean(0).numpy()
    row = [i for i, v in enumerate(table.video_id) if v == vid and table.subset[i] == "test"]
    np.testing.assert_allclose(table.scores[row[0]], want, rtol=1e-5)


def test_per_video_scores_are_the_mean_softmax_of_the_views() -> None:
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.1, 0.9], [0.6, 0.4]], np.float32)
    groups = np.array([0, 0, 0, 1, 2])
    got = streams.per_video(probs, groups, views=True)
    np.testing.assert_allclose(got, [[1.6 / 3, 1.4 / 3], [0.1, 0.9], [0.6, 0.4]], rtol=1e-6)
    assert streams.per_video(probs, groups, views=False) is probs


@pytest.mark.slow
def test_views_oof_folds_keep_each_videos_views_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path, per_class=8, test=3)
    d, arrays = _views_cache(tmp_path, manifest)
    seen: dict = {}
    real = training.out_of_fold

    def spy(make, x, y, s, **kw):  # noqa: ANN001, ANN202
        seen.update(kw, x=x)
        return real(make, x, y, s, **kw)

    monkeypatch.setattr(training, "out_of_fold", spy)
    train.main(
        "mean_pool",
        "rgb",
        head_params={"epochs": 1, "batch_size": 8},
        cfg=TrainConfig(oof_folds=2, threads=1),
        features=[d],
        manifest=manifest,
        out=tmp_path / "out",
    )
    train_ids = [v for v, _ in _ids(manifest, "train")]
    groups = seen["groups"]  # the video of each training row
    assert groups.tolist() == np.repeat(np.arange(10), [len(arrays[v]) for v in train_ids]).tolist()
    assert len(seen["x"]) == len(groups)
    from pipeline.engine import fold_assignment

    y = np.repeat([0] * 5 + [1] * 5, np.bincount(groups))
    fold = fold_assignment(y, folds=2, seed=0, num_classes=2, groups=groups)
    for g in np.unique(groups):
        assert len(set(fold[groups == g].tolist())) == 1  # all views of a video in one fold


def test_unequal_view_counts_across_streams_pair_views_and_repeat_a_single_view(
    tmp_path: Path,
) -> None:
    rgb = {"a": np.stack([np.full((4, 2), k) for k in range(3)]).astype(np.float32)}  # V = 3
    flow = {"a": np.full((4, 2), 9.0, np.float32)}  # no view axis
    flow_views = {"a": np.stack([np.full((4, 2), 10 + k) for k in range(2)]).astype(np.float32)}
    dr = _cache(tmp_path / "rgb", rgb, layout="(V, T, D)")
    f = _load([dr, _cache(tmp_path / "flow", flow)], "rgb+flow")
    assert [v[0].tolist() for v in f.videos["a"]] == [[0, 0, 9, 9], [1, 1, 9, 9], [2, 2, 9, 9]]
    fv = _cache(tmp_path / "flow_v", flow_views, layout="(V, T, D)")
    f = _load([dr, fv], "rgb+flow")
    assert [v[0].tolist() for v in f.videos["a"]] == [[0, 0, 10, 10], [1, 1, 11, 11]]


# -- item 3: conv maps ------------------------------------------------------------------------


def _maps_cache(tmp: Path, manifest: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for vid, label in _ids(manifest):
        a = rng.normal(size=(4, 8, 3, 3))
        a[:, label] += 3.0
        arrays[vid] = a
    return _cache(tmp / "rgb", arrays, layout="(T, C, H, W)", dim=8)


@pytest.mark.slow
def test_conv_maps_train_tsrnn_end_to_end(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, per_class=4, test=1)
    out = tmp_path / "out"
    train.main(
        "tsrnn",
        "rgb",
        head_params={"hidden": 4, "window": 2, "epochs": 2, "batch_size": 4},
        cfg=TrainConfig(oof_folds=2, threads=1),
        features=[_maps_cache(tmp_path, manifest)],
        manifest=manifest,
        out=out,
    )
    state = read_checkpoint(out / "model_split1.pt")["state_dict"]
    # in_dim = C: the Conv-GRU sees the C = 8 map channels plus the 2 tiled spiking signals
    assert state["gru.conv_x.weight"].shape[1:] == (8 + 2, 3, 3)
    assert state["spiking.weight"].shape == (2, 8)
    table = read_scores(out / "scores.csv")
    assert len(table.video_id) == 8 and np.allclose(table.scores.sum(1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_conv_maps_with_a_vector_head_fail_before_training_naming_head_and_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path, per_class=4, test=1)
    d = _maps_cache(tmp_path, manifest)

    def no_fit(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("training started")

    monkeypatch.setattr(training, "fit", no_fit)
    with pytest.raises(SystemExit, match=r"head 'lstm'.*conv maps \(layout \(T, C, H, W\)\)"):
        train.main(
            "lstm",
            "rgb",
            head_params={"hidden": 4, "epochs": 1},
            cfg=NO_OOF,
            features=[d],
            manifest=manifest,
            out=tmp_path / "out",
        )


# -- item 4: cache metadata against params ----------------------------------------------------


@pytest.mark.slow
def test_cache_written_with_other_features_params_fails_naming_path_setting_and_values(
    tmp_path: Path,
) -> None:
    manifest = _manifest(tmp_path, per_class=3, test=1)
    rng = np.random.default_rng(0)
    arrays = {vid: rng.normal(size=(3, 4)) for vid, _ in _ids(manifest)}
    d = _cache(
        tmp_path / "rgb", arrays, params=params_identity(StreamFeaturesConfig(backbone="resnet50"))
    )
    kw = dict(head_params={"epochs": 1}, cfg=NO_OOF, features=[d], manifest=manifest)
    with pytest.raises(SystemExit) as e:
        train.main(
            "mean_pool",
            "rgb",
            **kw,
            out=tmp_path / "out",
            expected=[params_identity(StreamFeaturesConfig(backbone="resnet34"))],
        )
    msg = str(e.value)
    assert str(d / "cache") in msg and "backbone" in msg and "features.rgb" in msg
    assert "'resnet50' -> 'resnet34'" in msg  # cached -> params
    # the same params pass
    train.main(
        "mean_pool",
        "rgb",
        **kw,
        out=tmp_path / "ok",
        expected=[params_identity(StreamFeaturesConfig(backbone="resnet50"))],
    )
    assert (tmp_path / "ok" / "scores.csv").exists()


@pytest.mark.slow
def test_cli_params_check_compares_with_params_yaml_features_sections(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, per_class=3, test=1)
    arrays = {vid: np.zeros((3, 4)) for vid, _ in _ids(manifest)}
    d = _cache(
        tmp_path / "rgb", arrays, params=params_identity(StreamFeaturesConfig(backbone="resnet50"))
    )
    params = tmp_path / "params.yaml"
    params.write_text(
        "train: {oof_folds: 0, threads: 1}\nheads: {mean_pool: {epochs: 1}}\n"
        "features: {rgb: {backbone: resnet34}}\n"
    )
    cmd = [sys.executable, "-m", "stages.train", "--params", str(params), "--head", "mean_pool"]
    cmd += ["--stream", "rgb", "--features", str(d), "--manifest", str(manifest)]
    cmd += ["--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([*cmd, "--params-check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "'resnet50' -> 'resnet34'" in r.stderr
    assert not (tmp_path / "out").exists()  # stopped before training


def test_expected_params_come_from_each_streams_features_section() -> None:
    params = {"features": {"rgb": {"backbone": "resnet34"}, "flow": {"sampling": "clips"}}}
    rgb, flow = train.expected_params(params, "rgb+flow", 2)
    assert rgb["backbone"] == "resnet34" and "clip_len" not in rgb
    assert flow["sampling"] == "clips" and flow["clip_len"] == 16
    with pytest.raises(SystemExit, match="features.flow"):
        train.expected_params({"features": {"rgb": {}}}, "rgb+flow", 2)


def _taps_cache(tmp: Path, manifest: Path, levels: list[int] | None) -> Path:
    rng = np.random.default_rng(0)
    arrays = {vid: rng.normal(size=(3, 16)) + label for vid, label in _ids(manifest)}
    return _cache(tmp / "rgb", arrays, levels=levels)


@pytest.mark.parametrize(
    ("cached", "match"),
    [([8, 4, 4], r"levels is \[4, 4, 8\].*has levels \[8, 4, 4\]"), (None, "has no levels")],
)
@pytest.mark.slow
def test_sru_levels_that_contradict_the_cache_fail(
    tmp_path: Path, cached: list[int] | None, match: str
) -> None:
    manifest = _manifest(tmp_path, per_class=3, test=1)
    d = _taps_cache(tmp_path, manifest, cached)
    with pytest.raises(SystemExit, match=match) as e:
        train.main(
            "sru",
            "rgb",
            head_params={"hidden": 4, "layers": 1, "levels": [4, 4, 8], "epochs": 1},
            cfg=NO_OOF,
            features=[d],
            manifest=manifest,
            out=tmp_path / "out",
        )
    assert str(d / "cache") in str(e.value) and "heads.sru.levels" in str(e.value)


@pytest.mark.parametrize("levels", [[4, 4, 8], None])
@pytest.mark.slow
def test_sru_levels_equal_to_the_cache_or_null_train(tmp_path: Path, levels: list | None) -> None:
    manifest = _manifest(tmp_path, per_class=3, test=1)
    d = _taps_cache(tmp_path, manifest, [4, 4, 8])
    out = tmp_path / "out"
    train.main(
        "sru",
        "rgb",
        head_params={"hidden": 4, "layers": 1, "levels": levels, "epochs": 1, "batch_size": 4},
        cfg=NO_OOF,
        features=[d],
        manifest=manifest,
        out=out,
    )
    stacks = {k.split(".")[1] for k in read_checkpoint(out / "model_split1.pt")["state_dict"]}
    assert len(stacks) == (3 if levels else 1)  # one SRU stack per level, or one over all D


def test_array_not_matching_its_layout_or_dim_fails_naming_the_cache(tmp_path: Path) -> None:
    d = _cache(tmp_path / "rgb", {"a": np.zeros((3, 4, 2))}, layout="(T, D)")
    with pytest.raises(StreamError, match=r"rgb/cache: 'a' has shape \(3, 4, 2\).*\(T, D\)"):
        _load([d])
    d = _cache(tmp_path / "bad", {"a": np.zeros((3, 4))}, dim=5)
    with pytest.raises(StreamError, match=r"bad/cache: 'a' has 4 features, the cache says dim 5"):
        _load([d])


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
@pytest.mark.slow
def test_training_on_a_cache_with_a_lost_data_file_stops_naming_it(
    tmp_path: Path, backend: str
) -> None:
    """Before, a deleted Zarr shard read as all-zero features and training exited 0 on them
    (mean_pool top-1 1.000 -> 0.417). Now train stops with one line naming the file."""
    manifest = _manifest(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {vid: rng.standard_normal((5, 8)) for vid, _ in _ids(manifest)}
    folder = tmp_path / "feats"
    with open_cache(folder / "cache", "w", attrs={"dim": 8}, backend=backend) as c:
        for vid, a in arrays.items():
            c.write(vid, a.astype(np.float16), {"source": "x"})
    data = [p for p in (folder / "cache").rglob("*") if p.is_file() and p.name != "cache.json"]
    data = [p for p in data if p.suffix == ".h5" or "/c/" in str(p) or p.parent.name == "c"]
    assert data, sorted((folder / "cache").rglob("*"))
    data[0].unlink()
    with pytest.raises(SystemExit) as e:
        train.main(
            "mean_pool",
            "rgb",
            head_params={"epochs": 1},
            cfg=NO_OOF,
            features=[folder],
            manifest=manifest,
            out=tmp_path / "out",
        )
    msg = str(e.value.code)
    assert msg.startswith("train: ") and data[0].name in msg, msg
    assert not (tmp_path / "out" / "scores.csv").exists()
