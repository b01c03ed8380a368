"""Late fusion of per-stream class scores (RGB, optical flow, ...).

Every stream gives softmax scores (N, C) for the same N videos in the same order. The fusions follow
the papers in ../shared/papers:

- ``sum`` and ``product``: Res-LSTM (001), sec. 3.2, ``y = y^c (+) y^f`` and ``y = y^c (.) y^f``.
- ``weighted``: Res-LSTM (001), Table 2, the TSN weights ``(w_flow, w_rgb) = (1.5, 1)``.
- ``svm``: TSRNN (000), sec. IV, "late fusion ... using the SVM" following the two-stream setting of
  its ref. [2]: a linear SVM on the stacked L2-normalised softmax scores of the streams.

``fuse_tables`` and ``fuse_score_dir`` are the fuse stage: every head's per-stream score tables,
fused per split on the test videos every stream has.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from pipeline.config import FusionConfig, RunConfig
from pipeline.scores import ScoreTable, concat, load_score_dir, write_scores

log = logging.getLogger(__name__)

FUSIONS = ("sum", "product", "weighted", "svm")

# Floor for probabilities before the log in the product fusion: a stream that gives a class exactly
# 0 must lower that class a lot, but not to -inf, or one confident stream would veto all others.
PRODUCT_EPS = 1e-12

# Enough iterations for liblinear to converge on a few thousand stacked score vectors; the default
# 1000 emits ConvergenceWarnings for small C on nearly separable data.
_SVM_MAX_ITER = 20_000


def _check_streams(
    streams: Mapping[str, np.ndarray], *, what: str, num_classes: int | None = None
) -> tuple[dict[str, np.ndarray], int, int]:
    """Validate {stream: (N, C)} scores; returns (float64 copies, N, C).

    All streams must be 2-D, finite and share N and C (and C == num_classes when that is given).
    """
    if not streams:
        raise ValueError(f"{what}: no streams given")
    out: dict[str, np.ndarray] = {}
    n_ref: tuple[str, int] | None = None
    c_ref: tuple[str, int] | None = None
    for name in sorted(streams):
        arr = np.asarray(streams[name], dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"{what}: stream {name!r} has shape {arr.shape}, expected (N, C)")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: stream {name!r} has NaN or infinite scores")
        n, c = arr.shape
        if n_ref is None:
            n_ref = (name, n)
        elif n != n_ref[1]:
            raise ValueError(
                f"{what}: stream {name!r} has {n} videos but stream {n_ref[0]!r} has {n_ref[1]}"
            )
        if num_classes is not None and c != num_classes:
            raise ValueError(f"{what}: stream {name!r} has {c} classes, expected {num_classes}")
        if c_ref is None:
            c_ref = (name, c)
        elif c != c_ref[1]:
            raise ValueError(
                f"{what}: stream {name!r} has {c} classes but stream {c_ref[0]!r} has {c_ref[1]}"
            )
        out[name] = arr
    assert n_ref is not None and c_ref is not None
    return out, n_ref[1], c_ref[1]


def sum_fuse(test: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sum of probabilities over streams: {stream: (N, C)} -> (N, C)."""
    streams, _, _ = _check_streams(test, what="sum fusion")
    return np.sum(np.stack(list(streams.values())), axis=0)


def product_fuse(test: Mapping[str, np.ndarray], *, eps: float = PRODUCT_EPS) -> np.ndarray:
    """Product of probabilities over streams, returned in log space: {stream: (N, C)} -> (N, C).

    Returns ``sum_s log(max(p_s, eps))``, the log of the product of the floored probabilities. It
    has the same argmax (and ranking) as the product but never underflows, however many streams
    or however small the probabilities. Negative scores are rejected: they are not probabilities.
    """
    streams, _, _ = _check_streams(test, what="product fusion")
    for name, arr in streams.items():
        if np.any(arr < 0):
            raise ValueError(
                f"product fusion: stream {name!r} has negative scores, not probabilities"
            )
    return np.sum(np.log(np.maximum(np.stack(list(streams.values())), eps)), axis=0)


def weighted_fuse(test: Mapping[str, np.ndarray], *, weights: Mapping[str, float]) -> np.ndarray:
    """Weighted sum of probabilities: {stream: (N, C)} -> sum_s weights[s] * p_s, (N, C).

    Every stream in ``test`` needs a finite weight; weights for streams not in ``test`` are ignored
    (the pipeline default, flow 1.5 : rgb 1, also serves a run that fuses only some streams).
    """
    streams, _, _ = _check_streams(test, what="weighted fusion")
    missing = [name for name in streams if name not in weights]
    if missing:
        raise ValueError(
            f"weighted fusion: no weight for stream(s) {missing}; "
            f"weights given for {sorted(weights)}"
        )
    fused = np.zeros_like(next(iter(streams.values())))
    for name, arr in streams.items():
        w = float(weights[name])
        if not np.isfinite(w):
            raise ValueError(f"weighted fusion: weight for stream {name!r} is {w}")
        fused += w * arr
    return fused


def _svm_features(streams: Mapping[str, np.ndarray]) -> np.ndarray:
    """{stream: (N, C)} -> (N, S * C): rows L2-normalised per stream, streams in sorted order."""
    parts = []
    for name in sorted(streams):
        arr = streams[name]
        norm = np.linalg.norm(arr, axis=1, keepdims=True)
        parts.append(arr / np.maximum(norm, 1e-12))  # an all-zero row stays zero
    return np.concatenate(parts, axis=1)


def _svm(c: float, seed: int) -> LinearSVC:
    return LinearSVC(C=c, random_state=seed, max_iter=_SVM_MAX_ITER)


def _choose_c(
    x: np.ndarray, y: np.ndarray, *, c_grid: Sequence[float], folds: int, seed: int
) -> tuple[float, dict[float, float]]:
    """Pick C by stratified k-fold accuracy on (x: (N, D), y: (N,)); returns (C, {C: mean acc}).

    Ties go to the smallest C (the strongest regularisation).
    """
    grid = sorted(set(float(c) for c in c_grid))
    if len(grid) == 1:
        return grid[0], {}
    min_count = int(np.bincount(y)[np.unique(y)].min())
    k = max(2, min(folds, min_count, len(y)))
    if k < folds:
        log.info(
            "svm fusion: %d folds instead of %d (smallest class has %d videos)", k, folds, min_count
        )
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # A class with a single training video cannot be in every fold; sklearn warns, we accept it.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(cv.split(x, y))
    scores: dict[float, float] = {}
    for c in grid:
        accs = []
        for tr, va in splits:
            if np.unique(y[tr]).size < 2:
                continue  # an SVM needs two classes; only possible with tiny, lopsided data
            model = _svm(c, seed).fit(x[tr], y[tr])
            accs.append(float(np.mean(model.predict(x[va]) == y[va])))
        scores[c] = float(np.mean(accs)) if accs else float("nan")
    valid = {c: s for c, s in scores.items() if np.isfinite(s)}
    if not valid:
        raise ValueError("svm fusion: no cross-validation fold has two classes to train on")
    best = max(valid.values())
    chosen = min(c for c, s in valid.items() if s == best)
    return chosen, scores


def svm_fuse(
    test: Mapping[str, np.ndarray],
    *,
    train: Mapping[str, np.ndarray],
    train_labels: np.ndarray,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    folds: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Linear-SVM fusion: {stream: (N, C)} -> (decision values (N, C), chosen C).

    Features are each stream's L2-normalised score vector, concatenated in sorted stream order
    ((N, S * C)). A one-vs-rest linear SVM is trained on the training videos' scores
    (``train``: {stream: (M, C)}, ``train_labels``: (M,) ints in [0, C)) with C picked from
    ``c_grid`` by stratified ``folds``-fold cross-validation on the training videos (fewer folds
    when a class has fewer videos; shuffled with ``seed``). Returns its decision function on
    ``test``; for two classes (N, 2) as ``[-d, d]``. Classes without training videos get ``-inf``.
    """
    test_s, _, num_classes = _check_streams(test, what="svm fusion (test)")
    train_s, m, _ = _check_streams(train, what="svm fusion (train)", num_classes=num_classes)
    if set(train_s) != set(test_s):
        raise ValueError(
            f"svm fusion: train streams {sorted(train_s)} differ from test streams {sorted(test_s)}"
        )
    y = np.asarray(train_labels)
    if y.shape != (m,):
        raise ValueError(f"svm fusion: train_labels has shape {y.shape}, expected ({m},)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"svm fusion: train_labels must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"svm fusion: train_labels outside [0, {num_classes})")
    y = y.astype(np.int64)
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

    x_train = _svm_features(train_s)
    chosen, cv_scores = _choose_c(x_train, y, c_grid=c_grid, folds=folds, seed=seed)
    log.info("svm fusion: chose C=%g (cross-validated accuracy per C: %s)", chosen, cv_scores)
    model = _svm(chosen, seed).fit(x_train, y)
    decision = model.decision_function(_svm_features(test_s))
    if decision.ndim == 1:  # binary: sklearn returns d > 0 for classes_[1]
        decision = np.stack([-decision, decision], axis=1)
    fused = np.full((decision.shape[0], num_classes), -np.inf)
    fused[:, model.classes_] = decision
    return fused, chosen


def fuse_scores(
    method: str,
    test: Mapping[str, np.ndarray],
    *,
    weights: Mapping[str, float] | None = None,
    train: Mapping[str, np.ndarray] | None = None,
    train_labels: np.ndarray | None = None,
    svm_c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    svm_folds: int = 3,
    seed: int = 0,
) -> np.ndarray:
    """Fuse per-stream softmax scores {stream: (N, C)} into (N, C) scores, larger = more likely.

    ``method`` is one of FUSIONS: ``sum`` (sum_fuse), ``product`` (product_fuse: the log of the
    product), ``weighted`` (weighted_fuse, needs ``weights``) or ``svm`` (svm_fuse, needs ``train``
    and ``train_labels``; call svm_fuse directly to get the chosen C as well). Arguments a method
    does not use are ignored.
    """
    if method == "sum":
        return sum_fuse(test)
    if method == "product":
        return product_fuse(test)
    if method == "weighted":
        if weights is None:
            raise ValueError("weighted fusion needs weights, e.g. {'flow': 1.5, 'rgb': 1.0}")
        return weighted_fuse(test, weights=weights)
    if method == "svm":
        if train is None or train_labels is None:
            raise ValueError(
                "svm fusion needs the training videos' scores (train) and train_labels"
            )
        fused, _ = svm_fuse(
            test,
            train=train,
            train_labels=train_labels,
            c_grid=svm_c_grid,
            folds=svm_folds,
            seed=seed,
        )
        return fused
    raise ValueError(f"unknown fusion {method!r}; expected one of {FUSIONS}")


def aligned(
    tables: Mapping[str, ScoreTable], split: str, subset: str
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """The rows of ``split``/``subset`` of the videos present in every stream's table, in one
    (sorted id) order -> (ids (N,), labels (N,) int64, {stream: scores (N, C)})."""
    parts = {s: t.select(split=split, subset=subset) for s, t in tables.items()}
    common = sorted(set.intersection(*(set(p.video_id) for p in parts.values())))
    first = next(iter(parts.values()))
    label_of = dict(zip(first.video_id, first.label, strict=True))
    streams = {}
    for s, p in parts.items():
        row = {v: i for i, v in enumerate(p.video_id)}
        streams[s] = p.scores[[row[v] for v in common]]
    return common, np.array([label_of[v] for v in common], dtype=np.int64), streams


@dataclass
class Fused:
    """The fuse stage's result. tables: {(head, method): test rows of every split common to
    the head's streams, scores (N, C)}; svm_c: {head: {split: the C cross-validation chose}}."""

    tables: dict[tuple[str, str], ScoreTable] = field(default_factory=dict)
    svm_c: dict[str, dict[str, float]] = field(default_factory=dict)


def fuse_tables(cfg: FusionConfig, by_head: Mapping[str, Mapping[str, ScoreTable]]) -> Fused:
    """{head: {stream: its score table}} -> every ``cfg.methods`` fusion of each head with two
    or more streams (a head with one stream is skipped with a warning). The SVM learns from the
    train rows of the split it scores (out-of-fold scores, see pipeline/training.py)."""
    out = Fused()
    for head, tables in sorted(by_head.items()):
        if len(tables) < 2:
            log.warning("%s: only stream %s, nothing to fuse", head, list(tables))
            continue
        splits = sorted(set.intersection(*(set(t.splits()) for t in tables.values())))
        for method in cfg.methods:
            fused = []
            for split in splits:
                ids, labels, test = aligned(tables, split, "test")
                if method == "svm":
                    _, tr_labels, train = aligned(tables, split, "train")
                    s, c = svm_fuse(
                        test,
                        train=train,
                        train_labels=tr_labels,
                        c_grid=cfg.svm_c,
                        folds=cfg.svm_folds,
                        seed=cfg.seed,
                    )
                    out.svm_c.setdefault(head, {})[split] = c
                else:
                    s = fuse_scores(method, test, weights=cfg.weights)
                fused.append(ScoreTable([split] * len(ids), ["test"] * len(ids), ids, labels, s))
            table = concat(fused)
            out.tables[(head, method)] = table
            acc = float((table.scores.argmax(1) == table.label).mean())
            log.info(
                "%s %s fusion of %s: test top-1 %.3f", head, method, "+".join(sorted(tables)), acc
            )
    return out


def fuse_score_dir(*, cfg: FusionConfig, run: RunConfig, scores: Path, out: Path) -> Fused:
    """The fuse stage: the train stages' tables ``scores``/<head>-<stream>/scores.csv of the
    models of ``run`` on the streams ``cfg.streams`` (a joint-input model, rgb+flow, is already
    fused inside) -> ``out``/<head>-<method>/scores.csv and ``out``/svm_c.json; returned too."""
    by_head: dict[str, dict[str, ScoreTable]] = {}
    for (head, stream), table in load_score_dir(scores, run.trained()).items():
        if stream in cfg.streams:
            by_head.setdefault(head, {})[stream] = table
    fused = fuse_tables(cfg, by_head)
    out.mkdir(parents=True, exist_ok=True)
    for (head, method), table in fused.tables.items():
        write_scores(out / f"{head}-{method}" / "scores.csv", table)
    (out / "svm_c.json").write_text(json.dumps(fused.svm_c, indent=1))
    return fused
