"""The ``learned`` fusion: how to fuse a head's streams, chosen on its training videos.

The fixed rules (the paper's TSN weights flow 1.5 : rgb 1, the product, the SVM) lose to the
better single stream when one stream is much weaker: on a held-out set the best fixed fusion beat
the best single stream for 4 of 9 heads and the SVM for 1 of 9. Here the candidates are

- ``weighted``: sum_s w_s p_s with w on a grid of step ``step`` over the simplex, which holds
  each single stream (weight 1 on it, 0 on the others) and the equal weights (the ``sum``);
- ``product``: sum_s w_s log p_s, the weighted geometric mean, same grid (w equal: ``product``);
- ``svm``: the SVM of pipeline/fusion_svm.py for each C of its grid (per recurrence for heads
  with window scores),

and each is scored by its mean held-out top-1 over the same stratified folds of the training
videos' out-of-fold scores (pipeline/training.py: no train score comes from a model that saw its
video). The SVM is fitted on the other folds; a weight vector fits nothing, so its fold accuracy
is already held out.

The choice, by the one-standard-error rule (Hastie et al., ESL sec. 7.10): among the candidates
within one binomial standard error sqrt(a (1 - a) / N) of the best score a, the simplest level
wins (0: a single stream, 1: any other weights, 2: the SVM, which fits S * C * C weights), and
within it the best score. Without the rule, the best of ~30 candidates on a few hundred videos
was often a small weight on a stream at chance, 1-3 points below the good stream alone on the
test videos (tests/test_fusion_learned.py). The winner is refitted (SVM) on all training videos
and applied to the test videos. So the SVM is used only where it beat, on held-out training
videos, every single stream and every weighting by more than the noise: this is how the SVM
avoids losing to a single stream. Each kind picks its setting (w or C) on the folds it is scored
on, so the reported scores are optimistic by a similar selection effect for each kind; they are
not test scores. Ties go to the simpler kind (weighted, product, svm), then to the weights
nearest (L1) the configured ``weights`` (the paper's, as a prior: the data could not tell them
apart), then to the smallest C.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from pipeline.fusion import PRODUCT_EPS, check_streams
from pipeline.fusion_svm import (
    SvmFit,
    SvmRows,
    check_svm_settings,
    cv_splits,
    fit_svm,
    svm_cv,
    svm_features,
)

log = logging.getLogger(__name__)

LEARN_KINDS = ("weighted", "product", "svm")


@dataclass(frozen=True)
class Learned:
    """What the learned fusion chose for one head and split. kind: one of LEARN_KINDS; weights:
    {stream: w} (weighted, product) else None; svm_c: the SVM's C (svm) else None; cv_top1:
    mean held-out top-1 on the training videos of each kind's best setting and of each stream
    alone."""

    kind: str
    weights: dict[str, float] | None
    svm_c: float | None
    cv_top1: dict[str, float]
    # what is applied to new scores (the fuse stage saves it): the weights in sorted stream
    # order exactly as used (``weights`` above is rounded for reading), or the fitted SVM
    exact_weights: tuple[float, ...] | None = None
    svm: SvmFit | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "weights": self.weights,
            "svm_c": self.svm_c,
            "cv_top1": self.cv_top1,
        }


def simplex_grid(streams: int, step: float) -> np.ndarray:
    """(G, streams) every weight vector of non-negative multiples of ``step`` summing to 1, in
    lexicographic order of the integer counts (1 / step must be a whole number)."""
    n = round(1 / step)
    if streams < 1 or n < 1 or abs(n * step - 1) > 1e-9:
        raise ValueError(f"learned fusion: 1 / step must be a whole number, got step {step}")
    # stars and bars: the positions of streams - 1 bars among n + streams - 1 slots
    rows = []
    for bars in combinations(range(n + streams - 1), streams - 1):
        edges = (-1, *bars, n + streams - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(streams)])
    return np.array(rows, dtype=np.float64) / n


def combine(kind: str, stacked: np.ndarray, w: np.ndarray) -> np.ndarray:
    """stacked: (S, N, C) probabilities, w: (S,) -> (N, C): sum_s w_s p_s (weighted) or
    sum_s w_s log max(p_s, eps) (product: the log of the weighted geometric mean)."""
    if kind == "weighted":
        return np.tensordot(w, stacked, axes=1)
    if kind == "product":
        return np.tensordot(w, np.log(np.maximum(stacked, PRODUCT_EPS)), axes=1)
    raise ValueError(f"learned fusion: no weights for kind {kind!r}")


def _prior(names: Sequence[str], weights: Mapping[str, float] | None) -> np.ndarray:
    """The configured weights of ``names`` normalised to sum 1; equal when any is missing."""
    w = np.array([float((weights or {}).get(s, np.nan)) for s in names])
    if not np.all(np.isfinite(w)) or w.sum() <= 0:
        return np.full(len(names), 1 / len(names))
    return w / w.sum()


def learned_fuse(
    test: Mapping[str, np.ndarray],
    *,
    train: Mapping[str, np.ndarray],
    train_labels: np.ndarray,
    step: float = 0.1,
    kinds: Sequence[str] = LEARN_KINDS,
    prior: Mapping[str, float] | None = None,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    folds: int = 3,
    seed: int = 0,
    svm_rows: tuple[SvmRows, SvmRows] | None = None,
    svm_cv_scores: Mapping[float, float] | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, Learned]:
    """{stream: (N, C)} test probabilities -> (fused scores (N, C), what was chosen); see the
    module docstring. ``train``: {stream: (N', C)} out-of-fold probabilities of the training
    videos, labels ``train_labels`` (N',); folds: ``cv_splits(labels, folds=folds, seed=seed)``.
    ``prior``: the weights ties go to (the configured ``fusion.weights``). ``svm_rows``: (train,
    test) rows for the SVM (per-recurrence rows of heads with window scores; default one row
    per video); ``svm_cv_scores``: {C: CV accuracy} already computed on those folds and rows;
    ``workers``: processes for the SVM's fits (``svm_cv``)."""
    test_s, _, num_classes = check_streams(test, what="learned fusion (test)")
    train_s, m, _ = check_streams(train, what="learned fusion (train)", num_classes=num_classes)
    if set(train_s) != set(test_s):
        raise ValueError(
            f"learned fusion: train streams {sorted(train_s)} differ from test {sorted(test_s)}"
        )
    unknown = [k for k in kinds if k not in LEARN_KINDS]
    if not kinds or unknown:
        raise ValueError(f"learned fusion: kinds must be some of {LEARN_KINDS}, got {kinds}")
    y = check_svm_settings(train_labels, m=m, num_classes=num_classes, c_grid=c_grid, folds=folds)
    names = sorted(train_s)
    splits = cv_splits(y, folds=folds, seed=seed)
    grid = simplex_grid(len(names), step)
    stacked = np.stack([train_s[s] for s in names])

    def cv_top1(scores: np.ndarray) -> float:
        hit = scores.argmax(axis=1) == y
        return float(np.mean([hit[va].mean() for _, va in splits]))

    # (level, (score, -kind rank, -distance to the prior, -C), kind, w or C); levels: 0 a
    # single stream, 1 other weights, 2 the SVM (more parameters fitted)
    distance = np.abs(grid - _prior(names, prior)).sum(axis=1)
    single = grid.max(axis=1) == 1
    candidates: list[tuple[int, tuple[float, int, float, float], str, object]] = []
    for rank, kind in enumerate(LEARN_KINDS):
        if kind not in kinds:
            continue
        if kind == "svm":
            if svm_rows is None:
                svm_rows = (
                    SvmRows.per_video(svm_features(train_s)),
                    SvmRows.per_video(svm_features(test_s)),
                )
            cv = svm_cv_scores
            if cv is None:
                cv = svm_cv(
                    svm_rows[0], y, c_grid=c_grid, splits=splits, seed=seed, workers=workers
                )
            for c in sorted(set(float(c) for c in c_grid)):
                if np.isfinite(cv[c]):
                    candidates.append((2, (cv[c], -rank, 0.0, -c), kind, c))
            continue
        for w, dist, one in zip(grid, distance, single, strict=True):
            s = cv_top1(combine(kind, stacked, w))
            candidates.append((0 if one else 1, (s, -rank, -float(dist), 0.0), kind, w))
    if not candidates:
        raise ValueError("learned fusion: no candidate could be scored (no fold with 2 classes)")
    table: dict[str, float] = {}
    for kind in LEARN_KINDS:
        mine = [c[1][0] for c in candidates if c[2] == kind]
        if mine:
            table[kind] = max(mine)
    for name in names:  # each stream alone, for the record
        table[name] = cv_top1(train_s[name])
    # One-standard-error rule: the simplest level within one binomial standard error of the
    # best score, its best candidate. Picking the best of ~30 candidates on a few hundred videos
    # otherwise favours a lucky small weight on a stream at chance (measured: 1-3 points below
    # the good stream alone on test videos, tests/test_fusion_learned.py).
    top = max(c[1][0] for c in candidates)
    se = float(np.sqrt(top * (1 - top) / m))
    level = min(c[0] for c in candidates if c[1][0] >= top - se)
    best = max((c for c in candidates if c[0] == level and c[1][0] >= top - se), key=lambda c: c[1])
    kind, setting = best[2], best[3]
    if kind == "svm":
        assert svm_rows is not None and isinstance(setting, float)
        fit = fit_svm(svm_rows[0], y, c=setting, seed=seed, num_classes=num_classes)
        fused = fit.decision(svm_rows[1])
        chosen = Learned(kind, None, setting, table, svm=fit)
    else:
        w = np.asarray(setting)
        fused = combine(kind, np.stack([test_s[s] for s in names]), w)
        weights = {s: round(float(v), 12) for s, v in zip(names, w, strict=True)}
        chosen = Learned(kind, weights, None, table, exact_weights=tuple(float(v) for v in w))
    log.info(
        "learned fusion: %s %s (cross-validated top-1 on the training videos: %s)",
        kind,
        chosen.weights if chosen.weights is not None else f"C={chosen.svm_c:g}",
        {k: round(v, 4) for k, v in table.items()},
    )
    return fused, chosen
