"""Tests for pipeline/engine.py: head params, the training loop, prediction, out-of-fold scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline.engine as engine
from pipeline.config import load_params
from pipeline.engine import (
    TrainSettings,
    fit,
    fold_assignment,
    mean_over_views,
    out_of_fold,
    predict,
    split_head_params,
)
from pipeline.heads import build_head

pytestmark = pytest.mark.usefixtures("one_thread")

T, D, C = 4, 8, 3


def _data(n_per_class: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n_per_class)
    x = rng.normal(size=(C, D))[y][:, None, :] * 2 + rng.normal(size=(len(y), T, D))
    return x.astype(np.float32), y


def _mean_pool(seed: int = 0, in_dim: int = D, num_classes: int = C) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_head("mean_pool", in_dim=in_dim, num_classes=num_classes, dropout=0.0)


# -- split_head_params ------------------------------------------------------------------------


def test_split_head_params_separates_training_from_model() -> None:
    params = {"hidden": 64, "layers": 2, "dropout": 0.1, "optimizer": "sgd", "lr": 0.5}
    params |= {"weight_decay": 1e-4, "epochs": 3, "batch_size": 2}
    settings, kwargs = split_head_params(params)
    assert settings == TrainSettings(
        optimizer="sgd", lr=0.5, weight_decay=1e-4, epochs=3, batch_size=2
    )
    assert kwargs == {"hidden": 64, "layers": 2, "dropout": 0.1}


def test_split_head_params_defaults_what_is_missing() -> None:
    settings, kwargs = split_head_params({"dropout": 0.2})
    assert settings == TrainSettings()
    assert kwargs == {"dropout": 0.2}


def test_repo_head_sections_build_their_heads() -> None:
    from pathlib import Path

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    for name, section in params["heads"].items():
        settings, kwargs = split_head_params(section)
        head = build_head(name, in_dim=D, num_classes=C, **kwargs)  # no stray training key
        assert head(torch.randn(2, T, D)).shape == (2, C)
        assert settings.epochs == section["epochs"]


# -- fit and predict --------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "sgd"])
def test_fit_is_deterministic_and_the_loss_decreases(optimizer: str) -> None:
    x, y = _data()
    s = TrainSettings(optimizer=optimizer, lr=1e-2, epochs=15, batch_size=4)
    # Dropout on: the seed must also fix the dropout masks and the batch order.
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_head("mean_pool", in_dim=D, num_classes=C, dropout=0.5)
        runs.append((fit(model, x, y, s, seed=3), model.fc.weight.detach().clone()))
    (losses_a, w_a), (losses_b, w_b) = runs
    assert len(losses_a) == 15
    assert losses_a == losses_b
    torch.testing.assert_close(w_a, w_b, rtol=0, atol=0)
    assert losses_a[-1] < 0.5 * losses_a[0]


def test_fit_seed_changes_the_run() -> None:
    x, y = _data()
    s = TrainSettings(lr=1e-2, epochs=3, batch_size=4)
    assert fit(_mean_pool(), x, y, s, seed=0) != fit(_mean_pool(), x, y, s, seed=1)


def test_predict_returns_probabilities() -> None:
    x, y = _data()
    model = _mean_pool()
    fit(model, x, y, TrainSettings(lr=1e-2, epochs=10, batch_size=4), seed=0)
    p = predict(model, x)
    assert p.shape == (len(y), C)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert (p >= 0).all()
    assert (p.argmax(axis=1) == y).mean() == 1.0
    np.testing.assert_allclose(predict(model, x, batch_size=5), p, rtol=1e-5, atol=1e-7)
    assert not model.training  # predict switches to eval mode (no dropout)


# -- out_of_fold ------------------------------------------------------------------------------


def _spy_on_fit_and_predict(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[set[int]], list[set[int]]]:
    """Record, per call of engine.fit and engine.predict, the tags (x[:, 0, 0]) of the rows
    it was given -> (fitted, scored), filled as out_of_fold runs."""
    fitted: list[set[int]] = []
    scored: list[set[int]] = []
    real_fit, real_predict = engine.fit, engine.predict

    def tags(xs: np.ndarray | engine.Rows) -> set[int]:
        rows = engine.as_rows(xs)  # a fold's rows are an index over x, not a copy
        return set(rows.take(np.arange(len(rows)))[:, 0, 0].astype(int).tolist())

    def spy_fit(model, xs, ys, s, **kw):  # noqa: ANN001, ANN202
        fitted.append(tags(xs))
        return real_fit(model, xs, ys, s, **kw)

    def spy_predict(model, xs, **kw):  # noqa: ANN001, ANN202
        scored.append(tags(xs))
        return real_predict(model, xs, **kw)

    monkeypatch.setattr(engine, "fit", spy_fit)
    monkeypatch.setattr(engine, "predict", spy_predict)
    return fitted, scored


def test_out_of_fold_scores_every_video_once_with_a_model_that_did_not_see_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = _data(n_per_class=6)
    x[:, 0, 0] = np.arange(len(y))  # tag each video so the spies can tell which one they see
    fitted, scored = _spy_on_fit_and_predict(monkeypatch)
    s = TrainSettings(lr=1e-2, epochs=2, batch_size=4)
    probs = out_of_fold(_mean_pool, x, y, s, folds=3, seed=0, num_classes=C)
    assert len(fitted) == len(scored) == 3
    everyone = [v for fold in scored for v in fold]
    assert sorted(everyone) == list(range(len(y)))  # each video scored exactly once
    for train, test in zip(fitted, scored, strict=True):
        assert not train & test
        assert train | test == set(range(len(y)))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_out_of_fold_cannot_be_memorised() -> None:
    # Random labels on random features: a linear head memorises them (D > N), but a model
    # that never saw a video can only guess its label.
    rng = np.random.default_rng(0)
    n, d = 120, 256
    x = rng.normal(size=(n, 2, d)).astype(np.float32)
    y = rng.permutation(np.repeat([0, 1], n // 2))
    s = TrainSettings(lr=1e-2, epochs=60, batch_size=16)

    def make() -> torch.nn.Module:
        return _mean_pool(in_dim=d, num_classes=2)

    in_sample = make()
    fit(in_sample, x, y, s, seed=0)
    assert (predict(in_sample, x).argmax(axis=1) == y).mean() == 1.0
    oof = out_of_fold(make, x, y, s, folds=3, seed=0, num_classes=2)
    assert abs((oof.argmax(axis=1) == y).mean() - 0.5) < 0.15  # 3 sigma at n = 120


def test_out_of_fold_folds_are_capped_by_the_smallest_class() -> None:
    x, y = _data(n_per_class=2)
    s = TrainSettings(epochs=1, batch_size=4)
    probs = out_of_fold(_mean_pool, x, y, s, folds=5, seed=0, num_classes=C)
    assert probs.shape == (len(y), C)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_out_of_fold_needs_two_videos_per_class() -> None:
    x, y = _data(n_per_class=3)
    y[0] = 5  # class 5 has one video
    with pytest.raises(ValueError, match="at least 2 training videos"):
        out_of_fold(_mean_pool, x, y, TrainSettings(epochs=1), folds=3, seed=0, num_classes=6)


# -- views: fold_assignment with groups, mean_over_views ----------------------------------------


def _views(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 18 videos (6 per class) with 1 to 4 views each -> (y per row, video per row)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(C), 6)
    counts = rng.integers(1, 5, size=len(labels))
    groups = np.repeat(np.arange(len(labels)), counts)
    return labels[groups], groups


def test_fold_assignment_without_groups_is_stratified_kfold_as_before() -> None:
    from sklearn.model_selection import StratifiedKFold

    x, y = _data(n_per_class=6)
    want = np.empty(len(y), dtype=int)
    for f, (_, te) in enumerate(StratifiedKFold(3, shuffle=True, random_state=4).split(x, y)):
        want[te] = f
    got = fold_assignment(y, folds=3, seed=4, num_classes=C)
    np.testing.assert_array_equal(got, want)
    # one row per video given as groups: the same folds
    same = fold_assignment(y, folds=3, seed=4, num_classes=C, groups=np.arange(len(y)))
    np.testing.assert_array_equal(same, want)


def test_fold_assignment_keeps_a_videos_views_in_one_fold_and_stratifies_videos() -> None:
    y, groups = _views()
    fold = fold_assignment(y, folds=3, seed=0, num_classes=C, groups=groups)
    assert sorted(set(fold.tolist())) == [0, 1, 2]
    for g in np.unique(groups):
        assert len(set(fold[groups == g].tolist())) == 1
    # stratified over videos: each fold holds 2 of each class's 6 videos, whatever their views
    video_fold = {int(g): int(f) for g, f in zip(groups, fold, strict=True)}
    video_y = {int(g): int(c) for g, c in zip(groups, y, strict=True)}
    for f in range(3):
        per_class = np.bincount([video_y[g] for g, k in video_fold.items() if k == f], minlength=C)
        assert per_class.tolist() == [2, 2, 2]


def test_fold_assignment_counts_videos_not_views_for_the_fold_cap() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # class 0: 1 video of 4 views; class 1: 4 videos
    groups = np.array([0, 0, 0, 0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="at least 2 training videos"):
        fold_assignment(y, folds=3, seed=0, num_classes=2, groups=groups)


def test_fold_assignment_rejects_views_of_one_video_with_different_labels() -> None:
    with pytest.raises(ValueError, match="views of one video carry different labels"):
        fold_assignment(np.array([0, 1, 0, 1]), folds=2, seed=0, num_classes=2, groups=[0, 0, 1, 2])


def test_out_of_fold_with_groups_never_trains_on_a_held_out_videos_views(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    y, groups = _views()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(y), T, D)).astype(np.float32)
    x[:, 0, 0] = groups  # tag each row with its video
    fitted, scored = _spy_on_fit_and_predict(monkeypatch)
    s = TrainSettings(lr=1e-2, epochs=1, batch_size=8)
    probs = out_of_fold(_mean_pool, x, y, s, folds=3, seed=0, num_classes=C, groups=groups)
    assert probs.shape == (len(y), C)  # still one row per view
    assert len(fitted) == 3
    for train, test in zip(fitted, scored, strict=True):
        assert not train & test  # no video has views on both sides
        assert train | test == set(range(18))


def test_mean_over_views_averages_each_videos_rows_in_video_order() -> None:
    probs = np.array([[0.2, 0.8], [1.0, 0.0], [0.6, 0.4], [0.3, 0.7]], dtype=np.float32)
    got = mean_over_views(probs, np.array([1, 0, 1, 1]))
    np.testing.assert_allclose(got, [[1.0, 0.0], [1.1 / 3, 1.9 / 3]], rtol=1e-6)
    assert got.dtype == np.float32
