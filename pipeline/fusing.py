"""The fuse stage's protocol: every head's per-stream score tables (and window scores, where the
head writes them), fused by each configured method per split, on the test videos every stream
has. The fusions themselves: pipeline/fusion.py (sum, product, weighted), pipeline/fusion_svm.py
(svm, per video or per recurrence), pipeline/fusion_learn.py (learned).

The SVM and the learned fusion learn from the train rows of the split they score: out-of-fold
scores (pipeline/training.py). For a head whose every fused stream has window scores (TSRNN), the
``svm`` method (and the learned fusion's svm candidate) is the per-recurrence SVM, as the TSRNN
paper fuses its two streams; other heads' outputs do not change.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import FusionConfig, RunConfig
from pipeline.fusion import FUSIONS, check_streams, product_fuse, sum_fuse, weighted_fuse
from pipeline.fusion_learn import Learned, learned_fuse
from pipeline.fusion_saved import FILE as FUSION_FILE
from pipeline.fusion_saved import fixed_spec, learned_spec, svm_spec, write_fusion
from pipeline.fusion_svm import (
    SvmFit,
    SvmRows,
    check_svm_settings,
    check_windows,
    cv_splits,
    select_svm,
    svm_cv,
    svm_features,
    svm_fuse,
    window_rows,
)
from pipeline.scores import (
    ScoreTable,
    WindowScores,
    concat,
    load_score_dir,
    load_window_scores,
    write_scores,
)

log = logging.getLogger(__name__)


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
    learn_step: float = 0.1,
) -> np.ndarray:
    """Fuse per-stream softmax scores {stream: (N, C)} into (N, C) scores, larger = more likely.

    ``method`` is one of FUSIONS: ``sum`` (sum_fuse), ``product`` (product_fuse: the log of the
    product), ``weighted`` (weighted_fuse, needs ``weights``), ``svm`` (svm_fuse) or ``learned``
    (learned_fuse, ``weights`` its tie prior); the last two need ``train`` and ``train_labels``
    (call them directly to get what they chose). Arguments a method does not use are ignored.
    """
    if method == "sum":
        return sum_fuse(test)
    if method == "product":
        return product_fuse(test)
    if method == "weighted":
        if weights is None:
            raise ValueError("weighted fusion needs weights, e.g. {'flow': 1.5, 'rgb': 1.0}")
        return weighted_fuse(test, weights=weights)
    if method in ("svm", "learned"):
        if train is None or train_labels is None:
            raise ValueError(
                f"{method} fusion needs the training videos' scores (train) and train_labels"
            )
        kw = dict(c_grid=svm_c_grid, folds=svm_folds, seed=seed)
        if method == "svm":
            return svm_fuse(test, train=train, train_labels=train_labels, **kw)[0]
        return learned_fuse(
            test, train=train, train_labels=train_labels, step=learn_step, prior=weights, **kw
        )[0]
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


def aligned_windows(
    windows: Mapping[str, WindowScores], split: str, subset: str, ids: Sequence[str], head: str
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The window scores of videos ``ids`` (in that order) -> ({stream: (N, M, C)}, weights
    (M,)); raises ValueError naming the stream file that lacks a video or whose windows differ."""
    out, weights = {}, None
    for s, w in sorted(windows.items()):
        part = w.select(split=split, subset=subset)
        row = {v: i for i, v in enumerate(part.video_id)}
        lacking = [v for v in ids if v not in row]
        if lacking:
            raise ValueError(
                f"{head}-{s}/window_scores.npz: no {subset} row of split {split} for "
                f"{len(lacking)} video(s) of scores.csv, e.g. {lacking[0]}"
            )
        out[s] = part.scores[[row[v] for v in ids]]
        if weights is not None and not np.array_equal(weights, w.weights):
            raise ValueError(f"{head}: window weights differ between streams {sorted(windows)}")
        weights = w.weights
    assert weights is not None
    return out, weights


@dataclass
class Fused:
    """The fuse stage's result. tables: {(head, method): test rows of every split common to
    the head's streams, scores (N, C)}; svm_c: {head: {split: the C cross-validation chose}};
    learned: {head: {split: the learned fusion's choice, Learned.as_json()}}; fitted: {(head,
    method): {split: what was applied, to apply it again (pipeline/fusion_saved.py)}};
    streams: {head: its fused streams}."""

    tables: dict[tuple[str, str], ScoreTable] = field(default_factory=dict)
    svm_c: dict[str, dict[str, float]] = field(default_factory=dict)
    learned: dict[str, dict[str, dict]] = field(default_factory=dict)
    fitted: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)
    streams: dict[str, list[str]] = field(default_factory=dict)


class _Split:
    """One head's rows of one split, and the SVM's cross-validation, computed once for the
    svm and learned methods."""

    def __init__(
        self,
        cfg: FusionConfig,
        head: str,
        split: str,
        tables: Mapping[str, ScoreTable],
        windows: Mapping[str, WindowScores] | None,
    ) -> None:
        self.cfg, self.head = cfg, head
        self.ids, self.labels, self.test = aligned(tables, split, "test")
        self.train_ids, self.train_labels, self.train = aligned(tables, split, "train")
        self.windows = windows is not None
        if windows is not None:
            tr, weights = aligned_windows(windows, split, "train", self.train_ids, head)
            te, _ = aligned_windows(windows, split, "test", self.ids, head)
            tr, _ = check_windows(tr, weights, what=f"{head} split {split} window scores (train)")
            te, _ = check_windows(te, weights, what=f"{head} split {split} window scores (test)")
            self.rows = (window_rows(tr, weights), window_rows(te, weights))
        else:
            self.rows = (
                SvmRows.per_video(svm_features(self.train)),
                SvmRows.per_video(svm_features(self.test)),
            )
        self._cv: dict[float, float] | None = None

    def svm_cv(self) -> dict[float, float]:
        if self._cv is None:
            splits = cv_splits(self.train_labels, folds=self.cfg.svm_folds, seed=self.cfg.seed)
            self._cv = svm_cv(
                self.rows[0],
                self.train_labels,
                c_grid=self.cfg.svm_c,
                splits=splits,
                seed=self.cfg.seed,
                workers=self.cfg.workers or os.cpu_count() or 1,  # 0: every core
            )
        return self._cv

    def svm(self) -> tuple[np.ndarray, SvmFit]:
        """The svm method: as svm_fuse (no cross-validation for a single C unless the learned
        fusion needs it anyway), on per-recurrence rows for a head with window scores ->
        (decision values (N, C), the SVM fitted)."""
        need_cv = len(set(self.cfg.svm_c)) > 1 or self._learns_svm()
        num_classes = next(iter(self.test.values())).shape[1]
        if not self.windows:  # svm_fuse's checks of the scores
            check_streams(self.test, what="svm fusion (test)")
            check_streams(self.train, what="svm fusion (train)", num_classes=num_classes)
        check_svm_settings(
            self.train_labels,
            m=len(self.train_labels),
            num_classes=num_classes,
            c_grid=self.cfg.svm_c,
            folds=self.cfg.svm_folds,
        )
        fit = select_svm(
            train=self.rows[0],
            y=self.train_labels,
            num_classes=num_classes,
            c_grid=self.cfg.svm_c,
            folds=self.cfg.svm_folds,
            seed=self.cfg.seed,
            cv=self.svm_cv() if need_cv else None,
        )
        if need_cv:
            self._warn_if_a_stream_beats_the_svm(fit.c)
        return fit.decision(self.rows[1]), fit

    def _warn_if_a_stream_beats_the_svm(self, c: float) -> None:
        """The svm method is the paper's and is kept as it is; when a single stream beat it on
        the held-out training folds, say so (the learned fusion would not have chosen it)."""
        splits = cv_splits(self.train_labels, folds=self.cfg.svm_folds, seed=self.cfg.seed)
        alone = {
            s: float(np.mean([(p.argmax(1) == self.train_labels)[va].mean() for _, va in splits]))
            for s, p in sorted(self.train.items())
        }
        best = max(alone, key=lambda s: alone[s])
        if self.svm_cv()[c] < alone[best]:
            log.warning(
                "%s: svm fusion's cross-validated top-1 on the training videos %.3f is below "
                "stream %s alone (%.3f); the learned fusion would not choose it",
                self.head,
                self.svm_cv()[c],
                best,
                alone[best],
            )

    def _learns_svm(self) -> bool:
        return "learned" in self.cfg.methods and "svm" in self.cfg.learn_kinds

    def learned(self) -> tuple[np.ndarray, Learned]:
        fused, chosen = learned_fuse(
            self.test,
            train=self.train,
            train_labels=self.train_labels,
            step=self.cfg.learn_step,
            kinds=self.cfg.learn_kinds,
            prior=self.cfg.weights,
            c_grid=self.cfg.svm_c,
            folds=self.cfg.svm_folds,
            seed=self.cfg.seed,
            svm_rows=self.rows,
            svm_cv_scores=self.svm_cv() if self._learns_svm() else None,
        )
        return fused, chosen


def fuse_tables(
    cfg: FusionConfig,
    by_head: Mapping[str, Mapping[str, ScoreTable]],
    windows: Mapping[str, Mapping[str, WindowScores]] | None = None,
) -> Fused:
    """{head: {stream: its score table}} -> every ``cfg.methods`` fusion of each head with two
    or more streams (a head with one stream is skipped with a warning). ``windows``: {head:
    {stream: window scores}}; a head with them for every fused stream gets the per-recurrence
    SVM. The SVM and learned fusions learn from the train rows of the split they score."""
    out = Fused()
    for head, tables in sorted(by_head.items()):
        if len(tables) < 2:
            log.warning("%s: only stream %s, nothing to fuse", head, list(tables))
            continue
        mine = (windows or {}).get(head, {})
        per_window = {s: mine[s] for s in tables} if set(tables) <= set(mine) else None
        splits = sorted(set.intersection(*(set(t.splits()) for t in tables.values())))
        rows = {split: _Split(cfg, head, split, tables, per_window) for split in splits}
        out.streams[head] = sorted(tables)
        per_rec = per_window is not None
        for method in cfg.methods:
            fused = []
            fitted = out.fitted.setdefault((head, method), {})
            for split, r in rows.items():
                if method == "svm":
                    s, fit = r.svm()
                    out.svm_c.setdefault(head, {})[split] = fit.c
                    fitted[split] = svm_spec(fit, per_recurrence=per_rec)
                elif method == "learned":
                    s, chosen = r.learned()
                    out.learned.setdefault(head, {})[split] = {
                        **chosen.as_json(),
                        "svm_per_recurrence": per_rec,
                    }
                    fitted[split] = learned_spec(chosen, per_recurrence=per_rec)
                else:
                    s = fuse_scores(method, r.test, weights=cfg.weights)
                    fitted[split] = fixed_spec(method, weights=cfg.weights, streams=list(tables))
                n = len(r.ids)
                fused.append(ScoreTable([split] * n, ["test"] * n, r.ids, r.labels, s))
            table = concat(fused)
            out.tables[(head, method)] = table
            acc = float((table.scores.argmax(1) == table.label).mean())
            log.info(
                "%s %s fusion of %s: test top-1 %.3f", head, method, "+".join(sorted(tables)), acc
            )
    return out


def fuse_score_dir(*, cfg: FusionConfig, run: RunConfig, scores: Path, out: Path) -> Fused:
    """The fuse stage: the train stages' tables ``scores``/<head>-<stream>/scores.csv (and
    window_scores.npz where a head wrote them) of the models of ``run`` on the streams
    ``cfg.streams`` (a joint-input model, rgb+flow, is already fused inside) ->
    ``out``/<head>-<method>/scores.csv with what was fitted beside it (fusion.json,
    pipeline/fusion_saved.py), ``out``/svm_c.json and, with the learned method,
    ``out``/learned.json; returned too."""
    by_head: dict[str, dict[str, ScoreTable]] = {}
    for (head, stream), table in load_score_dir(scores, run.trained()).items():
        if stream in cfg.streams:
            by_head.setdefault(head, {})[stream] = table
    models = [(h, s) for h, s in run.trained() if s in cfg.streams]
    windows: dict[str, dict[str, WindowScores]] = {}
    if "svm" in cfg.methods or "learned" in cfg.methods:
        for (head, stream), w in load_window_scores(scores, models).items():
            windows.setdefault(head, {})[stream] = w
    fused = fuse_tables(cfg, by_head, windows)
    out.mkdir(parents=True, exist_ok=True)
    for (head, method), table in fused.tables.items():
        write_scores(out / f"{head}-{method}" / "scores.csv", table)
        write_fusion(
            out / f"{head}-{method}" / FUSION_FILE,
            head=head,
            method=method,
            streams=fused.streams[head],
            splits=fused.fitted[(head, method)],
        )
    (out / "svm_c.json").write_text(json.dumps(fused.svm_c, indent=1))
    if "learned" in cfg.methods:
        (out / "learned.json").write_text(json.dumps(fused.learned, indent=1))
    return fused
