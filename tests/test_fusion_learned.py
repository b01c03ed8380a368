"""The learned fusion (pipeline/fusion_learn.py): stream weights or the SVM chosen by
cross-validation on the training videos' scores, against hand references (numpy grid searches,
sklearn's LinearSVC) on synthetic scores built here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from pipeline.config import FusionConfig, RunConfig
from pipeline.fusing import fuse_score_dir, fuse_scores
from pipeline.fusion_learn import learned_fuse, simplex_grid
from pipeline.scores import ScoreTable, concat, write_scores

PAPER = {"rgb": 1.0, "flow": 1.5}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _top1(s: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(s.argmax(axis=1) == y))


def _one_at_chance(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """5 classes: flow informative, rgb confident noise that knows nothing of the label."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(5), n // 5)
    flow = _softmax(rng.normal(size=(n, 5)) + 1.5 * np.eye(5)[y])
    rgb = _softmax(2.0 * rng.normal(size=(n, 5)))
    return {"rgb": rgb, "flow": flow}, y


def _both_carry_signal(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """20 classes, independent errors: rgb the better stream with soft scores; flow weaker
    but over-confident (sharp scores), so fixed weights that favour flow drown rgb."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(20), n // 20)
    rgb = _softmax(rng.normal(size=(n, 20)) + 2.0 * np.eye(20)[y])
    flow = _softmax(4.0 * (rng.normal(size=(n, 20)) + 1.3 * np.eye(20)[y]))
    return {"rgb": rgb, "flow": flow}, y


def test_simplex_grid_by_hand() -> None:
    np.testing.assert_allclose(
        simplex_grid(2, 0.25), [[0, 1], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1, 0]]
    )
    three = simplex_grid(3, 0.5)
    expected = [[0, 0, 1], [0, 0.5, 0.5], [0, 1, 0], [0.5, 0, 0.5], [0.5, 0.5, 0], [1, 0, 0]]
    np.testing.assert_allclose(three, expected)
    with pytest.raises(ValueError, match="whole number"):
        simplex_grid(2, 0.3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_is_as_good_as_the_better_stream_when_one_is_at_chance(seed: int) -> None:
    train, y = _one_at_chance(300, 2 * seed + 1)
    test, y_test = _one_at_chance(500, 2 * seed + 2)
    fused, chosen = learned_fuse(test, train=train, train_labels=y, prior=PAPER)
    alone = {s: _top1(p, y_test) for s, p in test.items()}
    assert alone["rgb"] < 0.3 < 0.6 < alone["flow"]  # the data are what the name says
    assert _top1(fused, y_test) >= max(alone.values())
    assert chosen.kind == "weighted" and chosen.weights == {"flow": 1.0, "rgb": 0.0}
    # the fixed fusions lose to flow alone here: the paper's weights, and on seed 0 the SVM
    weighted = fuse_scores("weighted", test, weights=PAPER)
    assert _top1(weighted, y_test) < alone["flow"] - 0.05
    if seed == 0:
        svm = fuse_scores("svm", test, train=train, train_labels=y)
        assert _top1(svm, y_test) < alone["flow"]


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_beats_either_stream_when_both_carry_signal(seed: int) -> None:
    train, y = _both_carry_signal(200, 2 * seed + 1)
    test, y_test = _both_carry_signal(600, 2 * seed + 2)
    fused, chosen = learned_fuse(test, train=train, train_labels=y, prior=PAPER)
    best_alone = max(_top1(p, y_test) for p in test.values())
    assert _top1(fused, y_test) > best_alone + 0.05
    assert chosen.kind in ("weighted", "product") and 0 < chosen.weights["flow"] < 1
    # no fixed fusion gets there: the paper's weights lose to rgb alone, the SVM (too few
    # videos per class for its 20 x 40 weights) stays within 5 points of it
    for method in ("sum", "product", "weighted", "svm"):
        s = fuse_scores(method, test, weights=PAPER, train=train, train_labels=y)
        assert _top1(s, y_test) < best_alone + 0.05, method


def test_learned_weights_are_a_hand_grid_search_over_the_same_folds() -> None:
    train, y = _both_carry_signal(200, 7)
    test, _ = _both_carry_signal(40, 8)
    fused, chosen = learned_fuse(
        test, train=train, train_labels=y, kinds=("weighted",), step=0.1, prior=PAPER, folds=3
    )
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(np.zeros(200), y))
    scores = {}
    for i in range(11):
        w_flow = i / 10
        hit = (w_flow * train["flow"] + (1 - w_flow) * train["rgb"]).argmax(1) == y
        scores[w_flow] = np.mean([hit[va].mean() for _, va in folds])
    top = max(scores.values())
    se = np.sqrt(top * (1 - top) / 200)
    assert max(scores[0.0], scores[1.0]) < top - se  # a mixture wins by more than one SE
    prior_flow = 1.5 / 2.5
    best = max((w for w in scores if 0 < w < 1), key=lambda w: (scores[w], -abs(w - prior_flow)))
    assert chosen.weights == {"flow": pytest.approx(best), "rgb": pytest.approx(1 - best)}
    assert chosen.cv_top1["weighted"] == pytest.approx(top)
    np.testing.assert_allclose(fused, best * test["flow"] + (1 - best) * test["rgb"])


def test_learned_picks_the_svm_where_only_it_can_read_the_scores() -> None:
    # each stream puts its mass on a shifted class (label + 1, label + 2): no weighting of the
    # argmax can be right, a linear SVM learns the shift; its decision is sklearn's on the rows
    rng = np.random.default_rng(3)

    def shifted(n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        y = np.tile(np.arange(4), n // 4)
        return {
            "rgb": _softmax(rng.normal(size=(n, 4)) + 3.0 * np.eye(4)[(y + 1) % 4]),
            "flow": _softmax(rng.normal(size=(n, 4)) + 3.0 * np.eye(4)[(y + 2) % 4]),
        }, y

    train, y = shifted(120)
    test, y_test = shifted(40)
    fused, chosen = learned_fuse(
        test, train=train, train_labels=y, c_grid=(0.1, 1.0), prior=PAPER, seed=0
    )
    assert chosen.kind == "svm" and chosen.weights is None and chosen.svm_c in (0.1, 1.0)
    assert chosen.cv_top1["svm"] > 0.9 > 0.3 > max(chosen.cv_top1["rgb"], chosen.cv_top1["flow"])

    def rows(streams: dict[str, np.ndarray]) -> np.ndarray:
        parts = [
            streams[s] / np.linalg.norm(streams[s], axis=1, keepdims=True) for s in sorted(streams)
        ]
        return np.concatenate(parts, axis=1)

    ref = LinearSVC(C=chosen.svm_c, random_state=0, max_iter=20_000).fit(rows(train), y)
    np.testing.assert_allclose(fused, ref.decision_function(rows(test)), rtol=1e-10)
    assert _top1(fused, y_test) > 0.9


def test_the_fuse_stage_writes_the_learned_choice_per_head_and_split(tmp_path: Path) -> None:
    for split, seed in (("1", 0), ("2", 1)):
        train, y = _one_at_chance(100, seed)
        test, y_test = _one_at_chance(50, seed + 10)
        for s in ("rgb", "flow"):
            path = tmp_path / "train" / f"h-{s}" / f"scores_{split}.csv"
            ids = [f"v{i}" for i in range(150)]
            table = concat(
                [
                    ScoreTable([split] * 100, ["train"] * 100, ids[:100], y, train[s]),
                    ScoreTable([split] * 50, ["test"] * 50, ids[100:], y_test, test[s]),
                ]
            )
            write_scores(path, table)
    for s in ("rgb", "flow"):  # one table holding both splits, as the train stage writes
        parts = [tmp_path / "train" / f"h-{s}" / f"scores_{k}.csv" for k in ("1", "2")]
        lines = parts[0].read_text().splitlines() + parts[1].read_text().splitlines()[1:]
        (tmp_path / "train" / f"h-{s}" / "scores.csv").write_text("\n".join(lines) + "\n")
    cfg = FusionConfig(methods=("learned",), learn_kinds=("weighted", "product"))
    fused = fuse_score_dir(
        cfg=cfg,
        run=RunConfig(heads=("h",), streams=("rgb", "flow")),
        scores=tmp_path / "train",
        out=tmp_path / "fuse",
    )
    assert sorted(p.name for p in (tmp_path / "fuse").iterdir()) == [
        "h-learned",
        "learned.json",
        "svm_c.json",
    ]
    record = json.loads((tmp_path / "fuse" / "learned.json").read_text())
    assert record == fused.learned and sorted(record["h"]) == ["1", "2"]
    for split in ("1", "2"):
        r = record["h"][split]
        assert r["kind"] == "weighted" and r["weights"] == {"flow": 1.0, "rgb": 0.0}
        assert r["svm_c"] is None and r["svm_per_recurrence"] is False
        assert set(r["cv_top1"]) == {"weighted", "product", "rgb", "flow"}
    table = fused.tables[("h", "learned")]
    flow = np.concatenate([_one_at_chance(50, k + 10)[0]["flow"] for k in (0, 1)])
    np.testing.assert_allclose(table.scores, flow, atol=1e-6)  # flow alone, as chosen


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learn_step": 0.3}, "learn_step: 1 / learn_step must be a whole number"),
        ({"learn_step": 0.0}, "learn_step: must be > 0"),
        ({"learn_kinds": ()}, "learn_kinds: the learned fusion needs at least one kind"),
        ({"learn_kinds": ("weighted", "max")}, "learn_kinds: unknown 'max'"),
    ],
)
def test_fusion_config_checks_the_learned_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FusionConfig(**kwargs)
    FusionConfig(learn_step=0.25, learn_kinds=("svm",))  # allowed values pass
