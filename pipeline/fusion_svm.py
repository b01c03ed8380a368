"""Linear-SVM late fusion: TSRNN (000), sec. IV, "late fusion ... using the SVM", following the
two-stream setting of its ref. [2]: a one-vs-rest linear SVM on the stacked L2-normalised softmax
scores of the streams, C chosen by stratified cross-validation on the training videos.

Two forms share one implementation (``SvmRows``: the SVM's rows and how they make up videos):

- ``svm_fuse``: one row per video, the video's scores.
- ``window_svm_fuse``: for heads that score each pooling window (TSRNN's ``window_scores``), one
  row per (video, window), as sec. IV-C (a) asks: "the prediction scores from the temporal context
  branch from both TSRNNs are fused using the SVM for each recurrence". Design: ONE SVM shared by
  every recurrence, trained on all (video, window) rows with the video's label; a video's
  decision is the eq. 8 weighted mean of its windows' decision values, sum_l w_l d_l / sum_l w_l,
  as the head weights its windows' probabilities ("weighted average of the predicted
  probabilities from each pooling window", sec. IV-C 2). Why one SVM rather than one per window
  index l: each of M per-window SVMs would fit S * C * C weights on N rows (a UCF101 split: 202
  features x 101 classes on 9.5k rows per window), the shared one on N * M rows; and a window's
  position already enters through its weight w_l. Cross-validation folds are drawn over videos,
  so no window of a held-out video is trained on.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from joblib import Parallel, delayed
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from pipeline.fusion import check_streams

log = logging.getLogger(__name__)

# Enough iterations for liblinear to converge on a few thousand stacked score vectors; the default
# 1000 emits ConvergenceWarnings for small C on nearly separable data.
_SVM_MAX_ITER = 20_000

# Feature values (rows x features) from which the cross-validation fits run in processes: below
# it starting them (about a second) costs more than the fits (a demo split's take milliseconds).
PARALLEL_MIN_SIZE = 200_000


@dataclass(frozen=True)
class SvmRows:
    """The SVM's rows for n videos: x (R, D) features; video (R,) the (ascending) index in [0, n)
    of each row's video; weight (R,) > 0 the row's weight in its video's decision."""

    x: np.ndarray
    video: np.ndarray
    weight: np.ndarray
    n: int

    @classmethod
    def per_video(cls, x: np.ndarray) -> SvmRows:
        """x: (N, D) -> one row per video, weight 1."""
        n = len(x)
        return cls(x, np.arange(n), np.ones(n), n)

    @classmethod
    def per_window(cls, x: np.ndarray, weights: np.ndarray) -> SvmRows:
        """x: (N, M, D), weights: (M,) eq. 8 gains -> N * M rows, video-major."""
        n, m, d = x.shape
        return cls(x.reshape(n * m, d), np.repeat(np.arange(n), m), np.tile(weights, n), n)

    def videos(self, idx: np.ndarray) -> SvmRows:
        """The rows of videos ``idx`` (ascending), in row order, renumbered 0..len(idx)-1."""
        keep = np.isin(self.video, idx)
        return SvmRows(
            self.x[keep], np.searchsorted(idx, self.video[keep]), self.weight[keep], len(idx)
        )

    def decision(self, model: LinearSVC) -> np.ndarray:
        """(n, K) per video: the weighted mean of its rows' decision values, K =
        len(model.classes_) (two classes: ``[-d, d]``, d > 0 for classes_[1])."""
        d = model.decision_function(self.x)
        if d.ndim == 1:
            d = np.stack([-d, d], axis=1)
        out = np.zeros((self.n, d.shape[1]))
        np.add.at(out, self.video, self.weight[:, None] * d)
        # one row of weight 1 per video leaves d exactly as it is
        return out / np.bincount(self.video, weights=self.weight, minlength=self.n)[:, None]


def svm_features(streams: Mapping[str, np.ndarray]) -> np.ndarray:
    """{stream: (..., C)} -> (..., S * C): each score vector L2-normalised, streams in sorted
    order."""
    parts = []
    for name in sorted(streams):
        arr = streams[name]
        norm = np.linalg.norm(arr, axis=-1, keepdims=True)
        parts.append(arr / np.maximum(norm, 1e-12))  # an all-zero row stays zero
    return np.concatenate(parts, axis=-1)


def _fit(rows: SvmRows, y: np.ndarray, c: float, seed: int) -> LinearSVC:
    """rows of n videos, y: (n,) their labels -> the SVM fitted on every row."""
    return LinearSVC(C=c, random_state=seed, max_iter=_SVM_MAX_ITER).fit(rows.x, y[rows.video])


def cv_splits(y: np.ndarray, *, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled ``folds``-fold (train, held-out) video indices of labels y: (N,);
    fewer folds when the smallest class has fewer videos (2 at least)."""
    min_count = int(np.bincount(y)[np.unique(y)].min())
    k = max(2, min(folds, min_count, len(y)))
    if k < folds:
        log.info(
            "fusion: %d folds instead of %d (smallest class has %d videos)", k, folds, min_count
        )
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # A class with a single training video cannot be in every fold; sklearn warns, we accept it.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(cv.split(np.zeros((len(y), 1)), y))


def _held_out_top1(
    rows: SvmRows, y: np.ndarray, tr: np.ndarray, va: np.ndarray, c: float, seed: int
) -> float:
    """Top-1 on videos ``va`` of the SVM with ``c`` fitted on the rows of videos ``tr``."""
    model = _fit(rows.videos(tr), y[tr], c, seed)
    pred = model.classes_[rows.videos(va).decision(model).argmax(axis=1)]
    return float(np.mean(pred == y[va]))


def svm_cv(
    rows: SvmRows,
    y: np.ndarray,
    *,
    c_grid: Sequence[float],
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    seed: int,
    workers: int = 1,
) -> dict[float, float]:
    """{C: mean held-out top-1 over ``splits``} of the SVM on ``rows`` (labels y: (n,)); NaN for
    a C no fold could train (a fold with one class, only possible with tiny, lopsided data).

    ``workers`` > 1: the (C, fold) fits run in that many processes (for ``rows`` of at least
    PARALLEL_MIN_SIZE values). Each fit is the same as in
    one process (liblinear seeds its own generator per fit from ``seed``), so the scores are
    identical; measured on UCF101-shaped scores (9,537 x 101 x 2 streams), liblinear's fits are
    3-25 s each, 15 of them, and a fit uses one core."""
    grid = sorted(set(float(c) for c in c_grid))
    # an SVM needs two classes: a fold without them is left out
    jobs = [(c, tr, va) for c in grid for tr, va in splits if np.unique(y[tr]).size >= 2]
    if workers > 1 and len(jobs) > 1 and rows.x.size >= PARALLEL_MIN_SIZE:
        accs = Parallel(n_jobs=min(workers, len(jobs)), backend="loky")(
            delayed(_held_out_top1)(rows, y, tr, va, c, seed) for c, tr, va in jobs
        )
    else:
        accs = [_held_out_top1(rows, y, tr, va, c, seed) for c, tr, va in jobs]
    scores: dict[float, float] = {}
    for c in grid:
        mine = [a for (cj, _, _), a in zip(jobs, accs, strict=True) if cj == c]
        scores[c] = float(np.mean(mine)) if mine else float("nan")
    return scores


def pick_c(scores: Mapping[float, float]) -> float:
    """The C of the best cross-validated accuracy; ties go to the smallest C (the strongest
    regularisation)."""
    valid = {c: s for c, s in scores.items() if np.isfinite(s)}
    if not valid:
        raise ValueError("svm fusion: no cross-validation fold has two classes to train on")
    best = max(valid.values())
    return min(c for c, s in valid.items() if s == best)


def check_svm_settings(
    y: np.ndarray, *, m: int, num_classes: int, c_grid: Sequence[float], folds: int
) -> np.ndarray:
    """Training labels y: (m,) ints in [0, num_classes) of 2 classes or more -> int64 copy;
    raises ValueError naming what is wrong with them or with the C grid or folds."""
    y = np.asarray(y)
    if y.shape != (m,):
        raise ValueError(f"svm fusion: train_labels has shape {y.shape}, expected ({m},)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"svm fusion: train_labels must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"svm fusion: train_labels outside [0, {num_classes})")
    present = np.unique(y)
    if present.size < 2:
        raise ValueError(
            f"svm fusion: needs at least 2 classes in train_labels, got {present.size}"
        )
    if not c_grid:
        raise ValueError("svm fusion: empty svm_c_grid")
    if any(not (float(c) > 0 and np.isfinite(float(c))) for c in c_grid):
        raise ValueError(f"svm fusion: svm_c_grid values must be positive and finite: {c_grid}")
    if folds < 2:
        raise ValueError(f"svm fusion: svm_folds must be >= 2, got {folds}")
    return y.astype(np.int64)


@dataclass(frozen=True)
class SvmFit:
    """A fitted linear SVM as plain arrays, so the fuse stage can save it and predict apply it
    to new videos' scores (pipeline/fusion_saved.py): decision values d = x @ coef.T + intercept (what LinearSVC's
    decision_function computes), for the classes it saw; two classes: coef (1, D), d for
    classes[1] (``[-d, d]``). x: the rows' features (``svm_features``: each stream's scores
    L2-normalised, streams sorted). coef (K, D), intercept (K,), classes (K,) ints."""

    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    c: float
    num_classes: int

    @classmethod
    def of(cls, model: LinearSVC, *, c: float, num_classes: int) -> SvmFit:
        return cls(
            np.asarray(model.coef_, dtype=np.float64),
            np.asarray(model.intercept_, dtype=np.float64),
            np.asarray(model.classes_, dtype=np.int64),
            float(c),
            int(num_classes),
        )

    def decision(self, rows: SvmRows) -> np.ndarray:
        """rows of n videos -> (n, num_classes): per video the weighted mean of its rows'
        decision values (``SvmRows.decision``); classes without training videos ``-inf``."""
        d = rows.x @ self.coef.T + self.intercept  # LinearSVC.decision_function's formula
        if self.coef.shape[0] == 1:
            d = np.stack([-d[:, 0], d[:, 0]], axis=1)
        per = np.zeros((rows.n, d.shape[1]))
        np.add.at(per, rows.video, rows.weight[:, None] * d)
        per /= np.bincount(rows.video, weights=rows.weight, minlength=rows.n)[:, None]
        fused = np.full((rows.n, self.num_classes), -np.inf)
        fused[:, self.classes] = per
        return fused


def fit_svm(train: SvmRows, y: np.ndarray, *, c: float, seed: int, num_classes: int) -> SvmFit:
    """The SVM with ``c`` fitted on ``train`` (labels y: (n,)) -> SvmFit."""
    return SvmFit.of(_fit(train, y, c, seed), c=c, num_classes=num_classes)


def select_svm(
    *,
    train: SvmRows,
    y: np.ndarray,
    num_classes: int,
    c_grid: Sequence[float],
    folds: int,
    seed: int,
    cv: Mapping[float, float] | None = None,
    workers: int = 1,
) -> SvmFit:
    """C by cross-validation on ``train`` in ``workers`` processes (or from ``cv``, {C:
    accuracy} already computed on ``cv_splits(y, folds=folds, seed=seed)``; a grid of one C
    is used without cross-validation), then the SVM with that C fitted on every row of
    ``train`` -> SvmFit."""
    grid = sorted(set(float(c) for c in c_grid))
    if cv is not None:
        chosen, scores = pick_c({c: cv[c] for c in grid}), dict(cv)
    elif len(grid) == 1:
        chosen, scores = grid[0], {}
    else:
        splits = cv_splits(y, folds=folds, seed=seed)
        scores = svm_cv(train, y, c_grid=grid, splits=splits, seed=seed, workers=workers)
        chosen = pick_c(scores)
    log.info("svm fusion: chose C=%g (cross-validated accuracy per C: %s)", chosen, scores)
    return fit_svm(train, y, c=chosen, seed=seed, num_classes=num_classes)


def svm_fuse(
    test: Mapping[str, np.ndarray],
    *,
    train: Mapping[str, np.ndarray],
    train_labels: np.ndarray,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    folds: int = 3,
    seed: int = 0,
    cv: Mapping[float, float] | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, float]:
    """Linear-SVM fusion: {stream: (N, C)} -> (decision values (N, C), chosen C).

    Features are each stream's L2-normalised score vector, concatenated in sorted stream order
    ((N, S * C)). A one-vs-rest linear SVM is trained on the training videos' scores
    (``train``: {stream: (M, C)}, ``train_labels``: (M,) ints in [0, C)) with C picked from
    ``c_grid`` by stratified ``folds``-fold cross-validation on the training videos (fewer folds
    when a class has fewer videos; shuffled with ``seed``), or from ``cv`` when given (see
    ``select_svm``). Returns its decision function on ``test``; for two classes (N, 2) as
    ``[-d, d]``. Classes without training videos get ``-inf``.
    """
    test_s, _, num_classes = check_streams(test, what="svm fusion (test)")
    train_s, m, _ = check_streams(train, what="svm fusion (train)", num_classes=num_classes)
    if set(train_s) != set(test_s):
        raise ValueError(
            f"svm fusion: train streams {sorted(train_s)} differ from test streams {sorted(test_s)}"
        )
    y = check_svm_settings(train_labels, m=m, num_classes=num_classes, c_grid=c_grid, folds=folds)
    fit = select_svm(
        train=SvmRows.per_video(svm_features(train_s)),
        y=y,
        num_classes=num_classes,
        c_grid=c_grid,
        folds=folds,
        seed=seed,
        cv=cv,
        workers=workers,
    )
    return fit.decision(SvmRows.per_video(svm_features(test_s))), fit.c


def check_windows(
    streams: Mapping[str, np.ndarray], weights: np.ndarray, *, what: str
) -> tuple[dict[str, np.ndarray], int]:
    """{stream: (N, M, C) window probabilities}, weights (M,) -> (float64 copies, N); raises
    ValueError naming the stream whose shape differs or whose scores are not finite."""
    if not streams:
        raise ValueError(f"{what}: no streams given")
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ValueError(f"{what}: window weights must be (M,) positive and finite, got {w}")
    out, ref = {}, None
    for name in sorted(streams):
        arr = np.asarray(streams[name], dtype=np.float64)
        if arr.ndim != 3 or arr.shape[1] != len(w):
            raise ValueError(
                f"{what}: stream {name!r} has shape {arr.shape}, expected (N, {len(w)}, C)"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: stream {name!r} has NaN or infinite scores")
        if ref is not None and arr.shape != ref[1]:
            raise ValueError(
                f"{what}: stream {name!r} has shape {arr.shape} but {ref[0]!r} has {ref[1]}"
            )
        ref = (name, arr.shape)
        out[name] = arr
    assert ref is not None
    return out, ref[1][0]


def window_rows(streams: Mapping[str, np.ndarray], weights: np.ndarray) -> SvmRows:
    """{stream: (N, M, C)}, weights (M,) -> the SVM's N * M (video, window) rows."""
    return SvmRows.per_window(svm_features(streams), np.asarray(weights, dtype=np.float64))


def window_svm_fuse(
    test: Mapping[str, np.ndarray],
    *,
    weights: np.ndarray,
    train: Mapping[str, np.ndarray],
    train_labels: np.ndarray,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    folds: int = 3,
    seed: int = 0,
    cv: Mapping[float, float] | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, float]:
    """Per-recurrence SVM fusion (module docstring): {stream: window probabilities (N, M, C)},
    ``weights`` (M,) the eq. 8 gains -> (decision values (N, C), chosen C). ``train``:
    {stream: (N', M, C)} with ``train_labels`` (N',); C as in ``svm_fuse``, with folds over
    videos. Row features: each window's per-stream L2-normalised scores, streams stacked."""
    test_s, _ = check_windows(test, weights, what="per-recurrence svm fusion (test)")
    train_s, m = check_windows(train, weights, what="per-recurrence svm fusion (train)")
    if set(train_s) != set(test_s):
        raise ValueError(
            f"svm fusion: train streams {sorted(train_s)} differ from test streams {sorted(test_s)}"
        )
    num_classes = next(iter(test_s.values())).shape[2]
    if next(iter(train_s.values())).shape[2] != num_classes:
        raise ValueError("per-recurrence svm fusion: train and test have different classes")
    y = check_svm_settings(train_labels, m=m, num_classes=num_classes, c_grid=c_grid, folds=folds)
    fit = select_svm(
        train=window_rows(train_s, weights),
        y=y,
        num_classes=num_classes,
        c_grid=c_grid,
        folds=folds,
        seed=seed,
        cv=cv,
        workers=workers,
    )
    return fit.decision(window_rows(test_s, weights)), fit.c
