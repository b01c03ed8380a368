"""Training on features held in memory or streamed from the caches (train.memory_gb), and the
T sequences are brought to (train.steps: auto = 25, the paper's T, when cached lengths differ).

The streamed path must give the same training to the bit: same batches in the same order, the
same float16 -> float32 conversion, the same PCA for Res-LSTM."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import engine, streams
from pipeline.cache import open_cache
from pipeline.config import ConfigError, TrainConfig, section
from pipeline.engine import ArrayRows, TrainSettings, fit, predict
from pipeline.heads import build_head
from pipeline.heads.res_lstm import ResLSTM, pca_components
from pipeline.manifest import Manifest, VideoRecord, write_manifest
from pipeline.training import train_head

pytestmark = pytest.mark.usefixtures("one_thread")


def _cache(folder: Path, arrays: dict[str, np.ndarray], **attrs: object) -> Path:
    some = next(iter(arrays.values()))
    attrs = {"dim": int(some.shape[-1]), "backbone": "synthetic", **attrs}
    with open_cache(folder / "cache", "w", attrs=attrs, videos_per_pack=4) as c:
        for vid, a in arrays.items():
            c.write(vid, a.astype(np.float16), {"source": "x"})
    return folder


def _manifest(tmp: Path, ids: list[str], labels: list[int], test_every: int = 4) -> Path:
    videos = [
        VideoRecord(
            video_id=v,
            path=tmp / f"{v}.avi",
            label=y,
            group=v,
            splits=("test" if i % test_every == 0 else "train",),
        )
        for i, (v, y) in enumerate(zip(ids, labels, strict=True))
    ]
    path = tmp / "manifest.csv"
    write_manifest(Manifest(classes=("a", "b"), split_names=("1",), videos=videos), path)
    return path


def _load(dirs: list[Path], names: str, **kw: object) -> streams.Features:
    opened = streams.open_streams(dirs, names.split("+"))
    ids = sorted(set.intersection(*(set(s.cache.keys()) for s in opened)))
    return streams.load_features(opened, ids, **kw)  # type: ignore[arg-type]


def _views_and_flow(tmp: Path, n: int = 26) -> tuple[list[Path], list[str], list[int]]:
    """rgb (V, T, D) with V = 1..3 and T = 4..7, flow (T, D) with T one shorter: views, stream
    concatenation and sigma(t) resampling all at once."""
    rng = np.random.default_rng(0)
    ids = [f"v{i:02d}" for i in range(n)]
    labels = [i % 2 for i in range(n)]
    rgb, flow = {}, {}
    for i, (v, y) in enumerate(zip(ids, labels, strict=True)):
        k = 4 + i % 4
        rgb[v] = rng.normal(size=(1 + i % 3, k, 6)) + y
        flow[v] = rng.normal(size=(k - 1, 5)) - y
    dirs = [
        _cache(tmp / "rgb", rgb, layout="(V, T, D)"),
        _cache(tmp / "flow", flow),
    ]
    return dirs, ids, labels


# -- train.steps --------------------------------------------------------------------------------


def test_steps_auto_brings_unequal_lengths_to_25_and_keeps_equal_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    unequal = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=(29, 3))}  # UCF101: 2 clips
    f = _load([_cache(tmp_path / "u", unequal)], "rgb")
    assert f.steps == streams.PAPER_STEPS == 25 and f.resampled
    assert {v: x[0].shape for v, x in f.videos.items()} == {"a": (25, 3), "b": (25, 3)}
    equal = {"a": rng.normal(size=(7, 3)), "b": rng.normal(size=(7, 3))}
    f = _load([_cache(tmp_path / "e", equal)], "rgb")
    assert f.steps == 7 and not f.resampled
    assert _load([_cache(tmp_path / "s", unequal)], "rgb", steps="shortest").steps == 2


def test_train_section_defaults_to_auto_steps_and_rejects_null(tmp_path: Path) -> None:
    assert TrainConfig().steps == "auto"
    assert section({"train": {"steps": 25}}, "train", TrainConfig).steps == 25
    for bad in (None, 0, "longest"):
        with pytest.raises(ConfigError, match="train.steps"):
            section({"train": {"steps": bad}}, "train", TrainConfig)
    with pytest.raises(ConfigError, match="train.memory_gb"):
        section({"train": {"memory_gb": -1}}, "train", TrainConfig)


# -- memory budget: the path taken ---------------------------------------------------------------


def test_the_budget_chooses_the_path_and_the_log_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dirs, _, _ = _views_and_flow(tmp_path)
    with caplog.at_level(logging.INFO, logger="pipeline.streams"):
        held = _load(dirs, "rgb+flow", memory_gb=1.0)
        streamed = _load(dirs, "rgb+flow", memory_gb=0.0)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features:")]
    rows = sum(held.view_count(v) for v in held.ids())
    size = rows * 25 * 11 * 2  # float16 stays float16: 2 bytes a value
    assert said[0].endswith("train.memory_gb 1: held in memory") and f"{rows} rows" in said[0]
    assert "streamed from the caches" in said[1] and f"{size / 1e9:.2f} GB" in said[1]
    assert not held.streamed and {x.dtype for vs in held.videos.values() for x in vs} == {
        np.dtype(np.float16)
    }  # float16 stays float16 in memory
    assert streamed.streamed and streamed.videos == {}
    ids = held.ids()
    assert streamed.ids() == ids
    a, b = held.rows(ids), streamed.rows(ids)
    assert len(a) == len(b) == rows
    order = np.random.default_rng(0).permutation(rows)
    np.testing.assert_array_equal(a.take(order), b.take(order))


def test_the_streamed_path_is_sized_from_the_indexes_without_reading_a_feature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A UCF101 conv-map cache is 16.7 GB: reading it through once only to learn its shapes
    # took 81 s before the first step (bench/bench_train_stream.py).
    dirs, _, _ = _views_and_flow(tmp_path)
    reads: list[str] = []
    real = streams.FeatureCache.read

    def counted(self, video_id: str, **kw: object) -> np.ndarray:  # noqa: ANN001
        reads.append(video_id)
        return real(self, video_id, **kw)

    monkeypatch.setattr(streams.FeatureCache, "read", counted)
    streamed = _load(dirs, "rgb+flow", memory_gb=0.0)
    assert streamed.streamed and reads == []
    held = _load(dirs, "rgb+flow", memory_gb=1.0)
    assert len(reads) == 2 * len(held.ids())  # each video once per stream


def test_features_held_in_memory_are_not_copied_per_subset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"v{i}": rng.normal(size=(1 + i % 3, 5, 4)) for i in range(6)}
    f = _load([_cache(tmp_path / "rgb", arrays, layout="(V, T, D)")], "rgb")
    first = f.videos["v1"][0]
    assert first.base is not None  # a view of the array read from the cache, not a copy
    rows, other = f.rows(["v1", "v2"]), f.rows(["v0"])
    assert isinstance(rows, ArrayRows) and rows.data is other.data  # one list of every row
    assert rows.data[rows.index[0]] is first  # an index into it, not a copy
    sub = rows.subset(np.array([4, 0]))
    assert sub.data is rows.data
    np.testing.assert_array_equal(sub.take(np.arange(2)), rows.take(np.array([4, 0])))
    np.testing.assert_array_equal(sub.take(np.array([1])), first[None])
    assert len(rows) == 2 + 3


# -- the streamed path trains exactly as the in-memory one ----------------------------------------


@pytest.mark.parametrize(
    ("head", "hp"),
    [
        ("res_lstm", {"hidden": 4, "layers": 1, "projection": "pca"}),  # prepare(): the PCA
        ("ts_lstm", {"hidden": [4], "segments": 1}),  # BatchNorm1d: batches of one would raise
    ],
)
def test_streamed_training_equals_in_memory_training(tmp_path: Path, head: str, hp: dict) -> None:
    """Views, rgb+flow, sigma(t) to 25 steps, out-of-fold folds, float16: the weights and
    every score are identical whether the features are held or streamed."""
    dirs, ids, labels = _views_and_flow(tmp_path)
    manifest = _manifest(tmp_path, ids, labels)
    hp = {**hp, "epochs": 2, "batch_size": 4}
    cfg = TrainConfig(oof_folds=2, threads=1)  # steps: auto
    out = {}
    for name, gb in (("held", 4.0), ("streamed", 0.0)):
        out[name] = train_head(
            head=head,
            stream="rgb+flow",
            head_params=hp,
            cfg=dataclasses.replace(cfg, memory_gb=gb),
            features=dirs,
            manifest=manifest,
            out=tmp_path / name,
        )
    held, streamed = out["held"], out["streamed"]
    assert held.log == streamed.log and held.log["steps"] == 25 and held.log["resampled"]
    for k, v in held.states["1"].items():
        torch.testing.assert_close(streamed.states["1"][k], v, rtol=0, atol=0, msg=k)
    np.testing.assert_array_equal(held.scores.scores, streamed.scores.scores)
    if head == "res_lstm":
        assert bool(held.states["1"]["pca_fitted"])
    logged = json.loads((tmp_path / "streamed" / "train_log.json").read_text())
    assert logged["steps"] == 25


def test_streamed_rows_are_read_ahead_in_order_with_the_same_batches() -> None:
    class Slow(ArrayRows):
        streamed = True

    x = np.random.default_rng(0).normal(size=(37, 3, 4)).astype(np.float32)
    order = np.random.default_rng(1).permutation(37)
    bounds = engine.batch_bounds(37, 4)
    got = list(engine.iter_batches(Slow(x), order, bounds))
    want = list(engine.iter_batches(ArrayRows(x), order, bounds))
    assert len(got) == len(want) == 9 and [len(i) for i, _ in got][-1] == 5  # 36 + 1 merged
    for (i, a), (j, b) in zip(got, want, strict=True):
        np.testing.assert_array_equal(i, j)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fit_and_predict_take_rows_as_they_take_arrays() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(21, 5, 4)).astype(np.float16)
    y = np.arange(21) % 3
    s = TrainSettings(epochs=2, batch_size=4)

    def run(data: np.ndarray | engine.Rows) -> tuple[list[float], np.ndarray]:
        torch.manual_seed(0)
        model = build_head("lstm", in_dim=4, num_classes=3, hidden=3)
        return fit(model, data, y, s, seed=0), predict(model, data, batch_size=8)

    class Streamed(ArrayRows):
        streamed = True

    a, b = run(x.astype(np.float32)), run(Streamed(x))
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


# -- Res-LSTM's PCA from batches -------------------------------------------------------------------


def test_pca_from_batches_equals_the_pca_of_all_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2])
    x = torch.randn(40, 5, 6, generator=gen) * scales + 100.0  # a large offset: no cancellation
    mean, comps = pca_components(x.reshape(-1, 6), 3)
    mean_b, comps_b = pca_components(list(x.split(7)), 3)
    torch.testing.assert_close(mean_b, mean, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(comps_b, comps, rtol=0, atol=1e-5)
    flat = x.reshape(-1, 6).double()
    torch.testing.assert_close(mean.double(), flat.mean(0), rtol=1e-6, atol=1e-4)
    a, b = ResLSTM(in_dim=6, num_classes=2, hidden=3), ResLSTM(in_dim=6, num_classes=2, hidden=3)
    a.prepare(x)
    b.prepare(iter(x.split(9)))
    torch.testing.assert_close(a.pca_components, b.pca_components, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="at least one training row"):
        pca_components([], 3)


def test_a_cache_rewritten_under_streamed_training_stops_it_naming_the_video(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    d = _cache(tmp_path / "rgb", {v: rng.normal(size=(5, 4)) for v in ("a", "b", "c")})
    f = _load([d], "rgb", memory_gb=0.0)
    rows = f.rows(["a", "b", "c"])
    assert rows.take(np.array([1])).shape == (1, 5, 4)
    with open_cache(d / "cache", "a", attrs={"dim": 4, "backbone": "synthetic"}) as c:
        c.write("c", rng.normal(size=(7, 4)).astype(np.float16), {"source": "y"})
    with pytest.raises(streams.StreamError, match=r"'c' now reads as \(7, 4\), not \(5, 4\)"):
        rows.take(np.array([2]))
