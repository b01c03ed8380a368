"""Accuracy metrics and confusion matrices for video classification scores."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accuracy:
    """Accuracies as fractions in [0, 1] over ``n`` videos.

    top1: argmax is the label. top5: the label is among the min(5, C) highest scores.
    mean_class: mean over the classes present in the labels of the per-class recall.
    """

    top1: float
    top5: float
    mean_class: float
    n: int


def _check_labels(labels: np.ndarray, *, n: int, num_classes: int, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"{what} has shape {y.shape}, expected ({n},)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{what} has values outside [0, {num_classes})")
    return y.astype(np.int64)


def _check_scores(
    scores: np.ndarray, labels: np.ndarray, *, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != num_classes:
        raise ValueError(f"scores have shape {s.shape}, expected (N, {num_classes})")
    if s.shape[0] == 0:
        raise ValueError("scores are empty: accuracy over no videos is undefined")
    # -inf is allowed: the SVM fusion gives it to classes it never saw in training.
    if np.any(np.isnan(s)) or np.any(s == np.inf):
        raise ValueError("scores contain NaN or +inf")
    y = _check_labels(labels, n=s.shape[0], num_classes=num_classes, what="labels")
    return s, y


def _ranking(scores: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, C) class indices, best first; ties go to the lower index, as in argmax."""
    return np.argsort(-scores, axis=1, kind="stable")


def per_class_accuracy(scores: np.ndarray, labels: np.ndarray, *, num_classes: int) -> np.ndarray:
    """scores (N, C), labels (N,) -> (C,) top-1 recall per class; NaN for classes not in labels."""
    s, y = _check_scores(scores, labels, num_classes=num_classes)
    correct = _ranking(s)[:, 0] == y
    totals = np.bincount(y, minlength=num_classes)
    hits = np.bincount(y, weights=correct.astype(np.float64), minlength=num_classes)
    out = np.full(num_classes, np.nan)
    present = totals > 0
    out[present] = hits[present] / totals[present]
    return out


def accuracy(scores: np.ndarray, labels: np.ndarray, *, num_classes: int) -> Accuracy:
    """scores (N, C), labels (N,) ints in [0, C) -> Accuracy (top-5 uses min(5, C))."""
    s, y = _check_scores(scores, labels, num_classes=num_classes)
    ranked = _ranking(s)
    k = min(5, num_classes)
    top1 = float(np.mean(ranked[:, 0] == y))
    top5 = float(np.mean(np.any(ranked[:, :k] == y[:, None], axis=1)))
    mean_class = float(np.nanmean(per_class_accuracy(s, y, num_classes=num_classes)))
    return Accuracy(top1=top1, top5=top5, mean_class=mean_class, n=int(y.size))


def confusion(pred: np.ndarray, labels: np.ndarray, *, num_classes: int) -> np.ndarray:
    """pred (N,), labels (N,) -> (C, C) int64 counts; rows = true class, columns = predicted."""
    p = np.asarray(pred)
    if p.ndim != 1:
        raise ValueError(f"pred has shape {p.shape}, expected (N,)")
    p = _check_labels(p, n=p.shape[0], num_classes=num_classes, what="pred")
    y = _check_labels(labels, n=p.shape[0], num_classes=num_classes, what="labels")
    flat = np.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """(C, C) counts -> (C, C) float, each row divided by its sum; rows summing to 0 stay 0."""
    m = np.asarray(matrix, dtype=np.float64)
    totals = m.sum(axis=1, keepdims=True)
    return np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, *, title: str) -> None:
    """Save a (C, C) confusion matrix (rows = true) as a PNG at ``path``.

    Colours are the row-normalised fractions (per-class recall on the diagonal), the cells show
    the raw counts (zeros left blank so large matrices stay readable). The figure grows with C and
    is always 6:5 (width:height), the extra width holding the colour bar.
    """
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{path}: confusion matrix has shape {m.shape}, expected (C, C)")
    c = m.shape[0]
    if len(classes) != c:
        raise ValueError(f"{path}: {len(classes)} class names for a {c}x{c} confusion matrix")
    frac = normalise_rows(m)

    height = max(5.0, 0.25 * c + 2.5)  # inches; about 0.25 in per class for 51 or 101 classes
    fig = Figure(figsize=(1.2 * height, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="fraction of true class")

    # About 80% of the height is the matrix; a font ~40% of the cell pitch fits labels and counts.
    cell_pt = 0.8 * height * 72.0 / c
    fontsize = float(np.clip(0.4 * cell_pt, 5.0, 10.0))
    for i, j in zip(*np.nonzero(m), strict=True):
        ax.text(
            j,
            i,
            str(int(m[i, j])),
            ha="center",
            va="center",
            fontsize=fontsize,
            color="white" if frac[i, j] > 0.5 else "black",
        )
    ticks = np.arange(c)
    ax.set_xticks(ticks, labels=list(classes), rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels=list(classes), fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    log.debug("wrote %dx%d confusion matrix to %s", c, c, path)


def mean_over_splits(per_split: Mapping[str, Accuracy]) -> Accuracy:
    """{split: Accuracy} -> Accuracy with each fraction averaged over splits and n summed."""
    if not per_split:
        raise ValueError("mean_over_splits: no splits given")
    accs = list(per_split.values())
    return Accuracy(
        top1=float(np.mean([a.top1 for a in accs])),
        top5=float(np.mean([a.top5 for a in accs])),
        mean_class=float(np.mean([a.mean_class for a in accs])),
        n=int(sum(a.n for a in accs)),
    )


@dataclass(frozen=True)
class Spread:
    """The sample standard deviation over splits of each fraction of an ``Accuracy``."""

    top1: float
    top5: float
    mean_class: float


def std_over_splits(per_split: Mapping[str, Accuracy]) -> Spread | None:
    """{split: Accuracy} -> the **sample** standard deviation (ddof = 1, divisor k - 1 for k
    splits) of top1, top5 and mean_class over the splits; None for a single split, whose sample
    std is undefined (0 would claim a spread was measured).

    Sample, not population, std: the three official UCF101 / HMDB51 splits are a sample of the
    ways the data could have been split, and the papers' "mean +- std over the 3 splits" is
    the sample std (numpy.std(ddof=1)); the population std of 3 values is sqrt(2/3) = 0.82 of it.
    """
    if not per_split:
        raise ValueError("std_over_splits: no splits given")
    accs = list(per_split.values())
    if len(accs) == 1:
        return None

    def std(values: list[float]) -> float:
        return float(np.std(values, ddof=1))

    return Spread(
        top1=std([a.top1 for a in accs]),
        top5=std([a.top5 for a in accs]),
        mean_class=std([a.mean_class for a in accs]),
    )


def best_by_top1(accs: Mapping[str, Mapping]) -> str:
    """{name: accuracy summary with "top1"} -> the name of the highest top-1, ties to the
    first name in sorted order: the evaluation's "best" model (evaluate.confusion), the
    summary's best fusion and best model, and predict's default fusion of a head."""
    return max(sorted(accs), key=lambda n: accs[n]["top1"])
