from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.metrics import (
    Accuracy,
    accuracy,
    confusion,
    mean_over_splits,
    normalise_rows,
    per_class_accuracy,
    plot_confusion,
    std_over_splits,
)

# 4 classes, class 3 never occurs in the labels (but is predicted once).
SCORES = np.array(
    [
        [0.6, 0.2, 0.1, 0.1],  # label 0, predicted 0
        [0.3, 0.4, 0.2, 0.1],  # label 0, predicted 1
        [0.2, 0.5, 0.2, 0.1],  # label 0, predicted 1
        [0.1, 0.7, 0.1, 0.1],  # label 1, predicted 1
        [0.1, 0.1, 0.5, 0.3],  # label 2, predicted 2
        [0.1, 0.1, 0.3, 0.5],  # label 2, predicted 3
    ]
)
LABELS = np.array([0, 0, 0, 1, 2, 2])


def test_accuracy_by_hand_with_absent_class() -> None:
    acc = accuracy(SCORES, LABELS, num_classes=4)
    assert acc.top1 == pytest.approx(3 / 6)
    assert acc.top5 == 1.0  # min(5, 4) = 4 classes always contain the label
    # Per-class recall 1/3, 1, 1/2 over the 3 present classes; class 3 does not count as 0.
    assert acc.mean_class == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    assert acc.n == 6


def test_per_class_accuracy_nan_for_absent_class() -> None:
    per_class = per_class_accuracy(SCORES, LABELS, num_classes=4)
    np.testing.assert_allclose(per_class[:3], [1 / 3, 1.0, 0.5])
    assert np.isnan(per_class[3])


def test_top5_by_hand() -> None:
    descending = np.arange(7, 0, -1) / 28.0  # class 0 best, class 6 worst
    scores = np.stack([descending, descending, descending])
    labels = np.array([0, 4, 5])  # ranks 1, 5 and 6
    acc = accuracy(scores, labels, num_classes=7)
    assert acc.top1 == pytest.approx(1 / 3)
    assert acc.top5 == pytest.approx(2 / 3)


def test_ties_go_to_the_lower_class_like_argmax() -> None:
    acc = accuracy(np.array([[0.5, 0.5, 0.0]]), np.array([1]), num_classes=3)
    assert acc.top1 == 0.0


def test_minus_inf_scores_are_allowed() -> None:
    scores = np.array([[1.0, -np.inf], [-np.inf, 2.0]])
    assert accuracy(scores, np.array([0, 1]), num_classes=2).top1 == 1.0


def test_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected \\(N, 5\\)"):
        accuracy(SCORES, LABELS, num_classes=5)
    with pytest.raises(ValueError, match="outside"):
        accuracy(SCORES, np.array([0, 0, 0, 1, 2, 4]), num_classes=4)
    with pytest.raises(ValueError, match="shape"):
        accuracy(SCORES, LABELS[:-1], num_classes=4)
    with pytest.raises(ValueError, match="NaN"):
        accuracy(np.full((6, 4), np.nan), LABELS, num_classes=4)


def test_confusion_counts() -> None:
    pred = SCORES.argmax(axis=1)
    matrix = confusion(pred, LABELS, num_classes=4)
    expected = np.array([[1, 2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(matrix, expected)
    assert np.issubdtype(matrix.dtype, np.integer)
    with pytest.raises(ValueError, match="pred"):
        confusion(np.array([0, 4]), np.array([0, 1]), num_classes=4)


def test_normalise_rows() -> None:
    frac = normalise_rows(np.array([[1, 3], [0, 0]]))
    np.testing.assert_allclose(frac, [[0.25, 0.75], [0.0, 0.0]])


def test_mean_over_splits() -> None:
    mean = mean_over_splits(
        {
            "split1": Accuracy(top1=0.5, top5=0.9, mean_class=0.4, n=100),
            "split2": Accuracy(top1=0.7, top5=1.0, mean_class=0.6, n=50),
        }
    )
    assert mean.top1 == pytest.approx(0.6)
    assert mean.top5 == pytest.approx(0.95)
    assert mean.mean_class == pytest.approx(0.5)
    assert mean.n == 150
    with pytest.raises(ValueError):
        mean_over_splits({})


def test_std_over_three_splits_is_the_sample_std_by_hand() -> None:
    per_split = {
        "1": Accuracy(top1=0.80, top5=0.95, mean_class=0.70, n=3783),
        "2": Accuracy(top1=0.85, top5=0.95, mean_class=0.75, n=3734),
        "3": Accuracy(top1=0.84, top5=0.98, mean_class=0.80, n=3696),
    }
    spread = std_over_splits(per_split)
    assert spread is not None
    # top-1: mean 0.83; deviations -0.03, 0.02, 0.01 -> (0.0009 + 0.0004 + 0.0001) / (3 - 1)
    # = 0.0007 -> sqrt 0.026458 (population: / 3 -> 0.021602)
    assert spread.top1 == pytest.approx(0.0264575, abs=1e-7)
    # top-5: mean 0.96; deviations -0.01, -0.01, 0.02 -> 0.0006 / 2 = 0.0003 -> 0.017321
    assert spread.top5 == pytest.approx(0.0173205, abs=1e-7)
    # mean class: 0.70, 0.75, 0.80 -> 0.05
    assert spread.mean_class == pytest.approx(0.05)
    assert mean_over_splits(per_split).top1 == pytest.approx(0.83)


def test_std_over_one_split_is_none_and_over_none_an_error() -> None:
    assert std_over_splits({"1": Accuracy(top1=0.5, top5=1.0, mean_class=0.5, n=4)}) is None
    with pytest.raises(ValueError, match="no splits"):
        std_over_splits({})


def test_plot_confusion_writes_readable_png(tmp_path: Path) -> None:
    matrix = confusion(SCORES.argmax(axis=1), LABELS, num_classes=4)
    path = tmp_path / "plots" / "confusion.png"  # parent folder does not exist yet
    plot_confusion(matrix, ["brush_hair", "cartwheel", "catch", "chew"], path, title="rgb")
    assert path.stat().st_size > 0
    image = imread(path)
    height, width, channels = image.shape
    assert channels in (3, 4)
    assert width / height == pytest.approx(1.2, abs=0.01)
    assert height >= 500
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_plot_confusion_rejects_wrong_class_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 class names"):
        plot_confusion(np.eye(4, dtype=int), ["a", "b", "c"], tmp_path / "x.png", title="t")
    assert not (tmp_path / "x.png").exists()
