"""Tests for pipeline/training.py, the train stage's per-split protocol, on tiny in-memory
features (pipeline.streams.Features) and manifests: no DVC, no subprocess. The cache layouts
and their loading are tested in tests/test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.config import TrainConfig
from pipeline.datasets import read_manifest
from pipeline.engine import predict
from pipeline.heads import build_head
from pipeline.manifest import Manifest, VideoRecord, write_manifest
from pipeline.models import load_model, read_checkpoint
from pipeline.scores import read_scores
from pipeline.streams import Features
from pipeline.training import TrainError, train_head, train_splits
from stages import train as train_stage

pytestmark = pytest.mark.usefixtures("one_thread")

HP = {"epochs": 2, "batch_size": 4, "lr": 0.05}
D = 4


def _manifest(split_names: tuple[str, ...] = ("1", "2"), per_class: int = 6) -> Manifest:
    """2 classes; split 1 tests the last 2 videos of each class, split 2 the first 2."""

    def role(split: str, i: int) -> str:
        test = i >= per_class - 2 if split == "1" else i < 2
        return "test" if test else "train"

    videos = [
        VideoRecord(
            video_id=f"c{c}_v{i}",
            path=Path(f"/x/c{c}_v{i}.avi"),
            label=c,
            group=f"c{c}_v{i}",
            splits=tuple(role(s, i) for s in split_names),
        )
        for c in range(2)
        for i in range(per_class)
    ]
    return Manifest(classes=("a", "b"), split_names=split_names, videos=videos)


def _features(m: Manifest, *, views: bool = False, seed: int = 0) -> Features:
    """(5, D) sequences whose feature ``label`` is raised; with ``views``, 1 to 3 views per
    video, the first carrying the label and the others noise."""
    rng = np.random.default_rng(seed)
    videos = {}
    for k, v in enumerate(m.videos):
        n = 1 + k % 3 if views else 1
        arrs = [rng.normal(size=(5, D)).astype(np.float32) for _ in range(n)]
        arrs[0][:, v.label] += 3.0
        videos[v.video_id] = arrs
    return Features(
        videos=videos,
        dims=[D],
        backbones=["synthetic"],
        views=views,
        maps=False,
        steps=5,
        layouts=["(V, T, D)" if views else "(T, D)"],
    )


def _train(m: Manifest, feats: Features, oof: int = 2) -> object:
    return train_splits(
        head="mean_pool",
        stream="rgb",
        head_params=HP,
        cfg=TrainConfig(oof_folds=oof, threads=1),
        feats=feats,
        manifest=m,
    )


def _model(state: dict) -> torch.nn.Module:
    model = build_head("mean_pool", in_dim=D, num_classes=2)
    model.load_state_dict(state)
    return model.eval()


def test_every_split_gives_weights_and_one_score_row_per_train_and_test_video() -> None:
    m = _manifest()
    t = _train(m, _features(m))
    assert list(t.states) == ["1", "2"]
    for split in ("1", "2"):
        for part in ("train", "test"):
            rows = t.scores.select(split=split, subset=part)
            assert rows.video_id == [v.video_id for v in m.subset(split, part)]
            assert rows.label.tolist() == [v.label for v in m.subset(split, part)]
            np.testing.assert_allclose(rows.scores.sum(1), 1.0, atol=1e-5)  # softmax
        assert t.log["splits"][split]["train_videos"] == 8
        assert t.log["splits"][split]["test_videos"] == 4
    assert t.log["head"] == "mean_pool" and t.log["features"] == ["synthetic"]
    assert "layouts" not in t.log and "resampled" not in t.log  # the defaults are not logged
    assert t.log["steps"] == 5  # the T used is recorded always
    # the log holds no wall-clock time: it is part of a DVC output (tests/test_reproducible.py)
    assert not any("second" in k or "time" in k for k in t.log["splits"]["1"])


def test_test_scores_are_the_saved_models_predictions() -> None:
    m = _manifest()
    feats = _features(m)
    t = _train(m, feats)
    test = t.scores.select(split="2", subset="test")
    x = np.stack([feats.videos[v][0] for v in test.video_id])
    np.testing.assert_allclose(test.scores, predict(_model(t.states["2"]), x), rtol=1e-5)


def test_train_scores_are_out_of_fold_with_folds_and_in_sample_without() -> None:
    m = _manifest()
    feats = _features(m)
    ids = [v.video_id for v in m.subset("1", "train")]
    x = np.stack([feats.videos[v][0] for v in ids])
    oof = _train(m, feats, oof=2)
    insample = _train(m, feats, oof=0)
    # the split's model is the same either way (seeded per split); only the train rows differ
    for k, w in oof.states["1"].items():
        torch.testing.assert_close(w, insample.states["1"][k])
    fitted = predict(_model(insample.states["1"]), x)
    np.testing.assert_allclose(
        insample.scores.select(split="1", subset="train").scores, fitted, rtol=1e-5
    )
    held_out = oof.scores.select(split="1", subset="train").scores
    assert np.abs(held_out - fitted).max() > 1e-3  # models that did not see the video


def test_a_split_does_not_depend_on_the_splits_before_it() -> None:
    both = _manifest(("1", "2"))
    only_2 = _manifest(("2",))
    a, b = _train(both, _features(both)), _train(only_2, _features(only_2))
    for k, w in a.states["2"].items():
        torch.testing.assert_close(w, b.states["2"][k])
    np.testing.assert_array_equal(
        a.scores.select(split="2", subset="test").scores,
        b.scores.select(split="2", subset="test").scores,
    )


def test_views_train_one_row_per_view_and_score_a_video_by_its_views_mean() -> None:
    m = _manifest(("1",))
    feats = _features(m, views=True)
    t = _train(m, feats)
    log = t.log["splits"]["1"]
    train_ids = [v.video_id for v in m.subset("1", "train")]
    assert log["train_views"] == sum(len(feats.videos[v]) for v in train_ids)
    assert t.log["layouts"] == ["(V, T, D)"]
    test = t.scores.select(split="1", subset="test")
    model = _model(t.states["1"])
    for vid, got in zip(test.video_id, test.scores, strict=True):
        want = predict(model, np.stack(feats.videos[vid])).mean(0)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_videos_without_features_are_left_out_and_a_split_left_empty_is_an_error() -> None:
    m = _manifest(("1",))
    feats = _features(m)
    del feats.videos["c0_v0"]
    t = _train(m, feats)
    assert "c0_v0" not in t.scores.video_id and len(t.scores.video_id) == 11
    for v in m.subset("1", "test"):
        del feats.videos[v.video_id]
    with pytest.raises(TrainError, match="split 1 has 7 train and 0 test videos with features"):
        _train(m, feats)


def _cache_dir(tmp: Path, m: Manifest) -> Path:
    feats = _features(m)
    with open_cache(tmp / "rgb" / "cache", "w", attrs={"dim": D, "backbone": "synthetic"}) as c:
        for vid, (x,) in feats.videos.items():
            c.write(vid, x.astype(np.float16), {"source": "x"})
    return tmp / "rgb"


def test_train_head_writes_what_it_returns(tmp_path: Path) -> None:
    m = _manifest()
    write_manifest(m, tmp_path / "manifest.csv")
    out = tmp_path / "out"
    t = train_head(
        head="mean_pool",
        stream="rgb",
        head_params=HP,
        cfg=TrainConfig(oof_folds=2, threads=1),
        features=[_cache_dir(tmp_path, m)],
        manifest=tmp_path / "manifest.csv",
        out=out,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "model_split1.pt",
        "model_split2.pt",
        "scores.csv",
        "train_log.json",
    ]
    for split, state in t.states.items():
        saved = read_checkpoint(out / f"model_split{split}.pt")["state_dict"]
        assert saved.keys() == state.keys()
        for k in state:
            torch.testing.assert_close(saved[k], state[k])
    table = read_scores(out / "scores.csv")
    assert table.video_id == t.scores.video_id and table.subset == t.scores.subset
    np.testing.assert_allclose(table.scores, t.scores.scores, rtol=1e-5)  # %.6g in the CSV
    assert json.loads((out / "train_log.json").read_text()) == t.log
    # each checkpoint describes its model: rebuilt from the file alone it gives the test scores
    model, info = load_model(out / "model_split1.pt")
    assert (info.head, info.stream, info.split) == ("mean_pool", "rgb", "1")
    assert info.classes == m.classes and info.kwargs["num_classes"] == len(m.classes)
    assert info.params == {k: HP[k] for k in sorted(HP)}
    assert [f["stream"] for f in info.features] == ["rgb"]
    assert info.features[0]["layout"] == "(T, D)"
    test = t.scores.select(split="1", subset="test")
    x = np.stack([_features(m).videos[v][0] for v in test.video_id]).astype(np.float16)
    with torch.no_grad():
        probs = model(torch.from_numpy(x.astype(np.float32))).softmax(-1).numpy()
    np.testing.assert_allclose(probs, test.scores, rtol=1e-5, atol=1e-7)


def test_the_stage_turns_an_empty_split_into_one_line_and_writes_nothing(tmp_path: Path) -> None:
    m = _manifest(("1",))
    features = _cache_dir(tmp_path, m)
    # a manifest whose test videos have no features: the caches hold split 1's train videos only
    tests = {v.video_id for v in m.subset("1", "test")}
    shifted = Manifest(
        classes=m.classes,
        split_names=m.split_names,
        videos=[
            VideoRecord(v.video_id + "_x", v.path, v.label, v.group, v.splits)
            if v.video_id in tests
            else v
            for v in m.videos
        ],
    )
    write_manifest(shifted, tmp_path / "manifest.csv")
    assert len(read_manifest(tmp_path / "manifest.csv").videos) == 12
    with pytest.raises(SystemExit) as e:
        train_stage.main(
            "mean_pool",
            "rgb",
            head_params=HP,
            cfg=TrainConfig(oof_folds=0, threads=1),
            features=[features],
            manifest=tmp_path / "manifest.csv",
            out=tmp_path / "out",
        )
    assert str(e.value) == "train: split 1 has 8 train and 0 test videos with features"
    assert not (tmp_path / "out").exists()


# -- heads that score each pooling window (window_scores, TSRNN) ------------------------------


class _WindowHead(torch.nn.Module):
    """A tiny head with TSRNN's window contract: two windows (steps 0-2 and 3-4) each scored by
    one linear layer on its mean feature; eq. 8 gains l/M = (0.5, 1); forward gives the log of
    the gain-weighted mean of the window probabilities."""

    def __init__(self, *, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(in_dim, num_classes)

    def window_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means = torch.stack([x[:, :3].mean(1), x[:, 3:].mean(1)], dim=1)  # (B, 2, D)
        return self.fc(means).softmax(-1), torch.tensor([0.5, 1.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, w = self.window_scores(x)
        return ((p * w[:, None]).sum(1) / w.sum()).log()


def _by_hand(state: dict, x: np.ndarray) -> np.ndarray:
    """numpy reference of _WindowHead.window_scores: x (N, 5, D) -> (N, 2, C)."""
    w, b = state["fc.weight"].numpy(), state["fc.bias"].numpy()
    logits = np.stack([x[:, :3].mean(1), x[:, 3:].mean(1)], axis=1) @ w.T + b
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def window_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_splits builds _WindowHead (not registered: the registry's parametrized tests
    would pick it up)."""
    from pipeline import training

    monkeypatch.setattr(training, "build_head", lambda head, **kw: _WindowHead(**kw))


@pytest.mark.parametrize("oof", [2, 0])
def test_a_window_head_gives_window_scores_of_the_same_rows_and_models(
    window_head: None, oof: int
) -> None:
    m = _manifest()
    feats = _features(m)
    t = _train(m, feats, oof=oof)
    w = t.windows
    assert w is not None
    assert (w.split, w.subset, w.video_id) == (t.scores.split, t.scores.subset, t.scores.video_id)
    np.testing.assert_array_equal(w.label, t.scores.label)
    assert w.scores.shape == (len(w.video_id), 2, 2) and w.weights.tolist() == [0.5, 1.0]
    # eq. 8: the gain-weighted mean of the windows is the video's score, on the test rows (the
    # split's model) and on the train rows (out of fold: the same fold models made both)
    mean = (w.scores * w.weights[:, None]).sum(1) / w.weights.sum()
    np.testing.assert_allclose(mean, t.scores.scores, rtol=1e-5)
    for split in ("1", "2"):
        for part in ("test", "train"):
            rows = w.select(split=split, subset=part)
            x = np.stack([feats.videos[v][0] for v in rows.video_id])
            hand = _by_hand(t.states[split], x)
            if part == "test" or oof == 0:  # the split's own model
                np.testing.assert_allclose(rows.scores, hand, rtol=1e-5, atol=1e-7)
            else:  # held out: models that did not see the video
                assert np.abs(rows.scores - hand).max() > 1e-3


def test_window_scores_of_views_are_the_mean_of_the_views(window_head: None) -> None:
    m = _manifest(("1",))
    feats = _features(m, views=True)
    t = _train(m, feats)
    test = t.windows.select(split="1", subset="test")
    for vid, got in zip(test.video_id, test.scores, strict=True):
        want = _by_hand(t.states["1"], np.stack(feats.videos[vid])).mean(0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_train_head_writes_window_scores_byte_identical_on_a_rerun(
    tmp_path: Path, window_head: None
) -> None:
    from pipeline.scores import read_window_scores

    m = _manifest()
    write_manifest(m, tmp_path / "manifest.csv")
    features = [_cache_dir(tmp_path, m)]
    runs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        t = train_head(
            head="fake",
            stream="rgb",
            head_params=HP,
            cfg=TrainConfig(oof_folds=2, threads=1),
            features=features,
            manifest=tmp_path / "manifest.csv",
            out=out,
        )
        runs.append((out / "window_scores.npz").read_bytes())
    assert runs[0] == runs[1]  # no time stamp in the file: it is part of a DVC output
    back = read_window_scores(out / "window_scores.npz")
    assert back.video_id == t.windows.video_id and back.subset == t.windows.subset
    assert back.split == t.windows.split
    np.testing.assert_array_equal(back.scores, t.windows.scores)
    np.testing.assert_array_equal(back.weights, [0.5, 1.0])


def test_the_log_records_the_learning_rate_of_every_epoch_as_the_schedule_gives_it() -> None:
    """lr halved every 2 epochs (step schedule) -> the log holds 1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3."""
    m = _manifest()
    params = {**HP, "lr": 0.01, "epochs": 5, "schedule": "step", "step_size": 2, "gamma": 0.5}
    t = train_splits(
        head="mean_pool",
        stream="rgb",
        head_params=params,
        cfg=TrainConfig(oof_folds=0, threads=1),
        feats=_features(m),
        manifest=m,
    )
    for split in ("1", "2"):
        got = t.log["splits"][split]["epochs"]
        assert [(e["stage"], e["epoch"]) for e in got] == [("train", i) for i in range(5)]
        np.testing.assert_allclose([e["lr"] for e in got], [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3])
        # each epoch's mean loss, the first and last of which the log also gives
        loss = [e["loss"] for e in got]
        assert loss[0] == t.log["splits"][split]["loss_first"]
        assert loss[-1] == t.log["splits"][split]["loss_last"]


@pytest.mark.parametrize("views", [False, True])
def test_the_log_gives_the_out_of_fold_models_validation_top1_per_epoch(views: bool) -> None:
    """val_top1 after the last epoch is the mean over the folds of the top-1 of the out-of-fold
    scores each fold model gave its held-out videos (computed here from the score table and the
    folds); without out-of-fold models there is no val_top1."""
    from pipeline.engine import fold_assignment

    m = _manifest(per_class=8)
    t = _train(m, _features(m, views=views), oof=2)
    table = t.scores
    for split in ("1", "2"):
        epochs = t.log["splits"][split]["epochs"]
        assert all(0.0 <= e["val_top1"] <= 1.0 for e in epochs)
        train = [
            i
            for i, (s, p) in enumerate(zip(table.split, table.subset, strict=True))
            if (s, p) == (split, "train")
        ]
        y = table.label[train]
        right = table.scores[train].argmax(1) == y
        # the train stage's folds: over videos (views kept together), seed train.seed 0
        fold = fold_assignment(y, folds=2, seed=0, num_classes=2)
        want = np.mean([right[fold == f].mean() for f in range(2)])
        assert epochs[-1]["val_top1"] == pytest.approx(want)
    plain = _train(m, _features(m, views=views), oof=0)
    assert all("val_top1" not in e for e in plain.log["splits"]["1"]["epochs"])
