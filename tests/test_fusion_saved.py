"""The fuse stage saves what it fitted (pipeline/fusion_saved.py): applied again to the stored
test scores it gives the stage's fused tables to the last written digit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.svm import LinearSVC

from pipeline.config import FusionConfig, RunConfig
from pipeline.fusing import aligned, aligned_windows, fuse_score_dir
from pipeline.fusion_learn import Learned
from pipeline.fusion_saved import (
    FusionFileError,
    apply_fusion,
    learned_spec,
    read_fusion,
    svm_from_json,
    svm_spec,
    svm_to_json,
)
from pipeline.fusion_svm import SvmRows, fit_svm
from pipeline.scores import (
    ScoreTable,
    WindowScores,
    concat,
    read_scores,
    read_window_scores,
    write_scores,
    write_window_scores,
)

GAINS = np.array([0.5, 1.0, 2.0], dtype=np.float32)
C = 3


def _probs(rng: np.random.Generator, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Softmax scores (*shape, C) leaning to the labels y (shape[0],)."""
    logits = rng.normal(size=(*shape, C))
    logits[np.arange(len(y)), ..., y] += 1.5
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def _score_root(root: Path) -> None:
    """Train-stage outputs of two heads on rgb and flow, splits 1 and 2 (18 train and 6 test
    videos each): 'plain' (scores.csv) and 'win' (also window_scores.npz, 3 windows)."""
    rng = np.random.default_rng(0)
    for head in ("plain", "win"):
        for s in ("rgb", "flow"):
            tables, wins = [], []
            for split in ("1", "2"):
                for subset, n in (("train", 18), ("test", 6)):
                    ids = [f"{subset}{split}_{i}" for i in range(n)]
                    y = np.arange(n) % C
                    w = _probs(rng, y, (n, len(GAINS))).astype(np.float32)
                    p = (w * GAINS[None, :, None]).sum(1) / GAINS.sum()
                    tables.append(ScoreTable([split] * n, [subset] * n, ids, y, p))
                    wins.append(WindowScores([split] * n, [subset] * n, ids, y, w, GAINS))
            write_scores(root / f"{head}-{s}" / "scores.csv", concat(tables))
            if head == "win":
                write_window_scores(
                    root / f"{head}-{s}" / "window_scores.npz",
                    WindowScores(
                        [x for w in wins for x in w.split],
                        [x for w in wins for x in w.subset],
                        [x for w in wins for x in w.video_id],
                        np.concatenate([w.label for w in wins]),
                        np.concatenate([w.scores for w in wins]),
                        GAINS,
                    ),
                )


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))[1:]


def test_saved_fusions_applied_to_the_stored_test_scores_give_the_fused_tables(
    tmp_path: Path,
) -> None:
    root, out = tmp_path / "train", tmp_path / "fuse"
    _score_root(root)
    cfg = FusionConfig(svm_c=(0.1, 1.0), svm_folds=2, workers=1)
    fuse_score_dir(cfg=cfg, run=RunConfig(heads=("plain", "win")), scores=root, out=out)
    rules = set()
    for head in ("plain", "win"):
        tables = {s: read_scores(root / f"{head}-{s}" / "scores.csv") for s in ("rgb", "flow")}
        windows = {
            s: read_window_scores(root / f"{head}-{s}" / "window_scores.npz")
            for s in ("rgb", "flow")
            if head == "win"
        }
        for method in cfg.methods:
            doc = read_fusion(out / f"{head}-{method}" / "fusion.json")
            assert (doc["head"], doc["method"], doc["streams"]) == (head, method, ["flow", "rgb"])
            want = _csv_rows(out / f"{head}-{method}" / "scores.csv")
            got = []
            for split in ("1", "2"):
                spec = doc["splits"][split]
                rules.add((spec["rule"], spec.get("kind"), spec.get("per_recurrence")))
                ids, labels, test = aligned(tables, split, "test")
                kw = {}
                if windows:
                    kw["windows"], kw["window_weights"] = aligned_windows(
                        windows, split, "test", ids, head
                    )
                fused = apply_fusion(spec, test, **kw)
                got += [
                    [split, "test", v, str(lab), *[f"{x:.6g}" for x in row]]
                    for v, lab, row in zip(ids, labels, fused, strict=True)
                ]
            assert got == want, (head, method)
    # every rule was exercised, the SVM per video and per recurrence
    assert {"sum", "product", "weighted", "svm", "learned"} <= {r for r, _, _ in rules}
    assert ("svm", None, True) in rules and ("svm", None, False) in rules


def test_a_saved_svm_decides_as_sklearns_linear_svc() -> None:
    rng = np.random.default_rng(1)
    for classes in (2, 4):
        x, y = rng.normal(size=(40, 6)), np.arange(40) % classes
        rows = SvmRows.per_video(x)
        # num_classes 5: the classes without training videos get -inf
        fit = svm_from_json(
            json.loads(json.dumps(svm_to_json(fit_svm(rows, y, c=0.5, seed=0, num_classes=5))))
        )
        ref = LinearSVC(C=0.5, random_state=0, max_iter=20_000).fit(x, y)
        d = ref.decision_function(x)
        d = np.stack([-d, d], 1) if d.ndim == 1 else d
        got = fit.decision(rows)
        np.testing.assert_array_equal(got[:, :classes], d)
        assert np.all(got[:, classes:] == -np.inf)


def test_a_learned_svm_and_learned_weights_are_applied_as_chosen() -> None:
    rng = np.random.default_rng(2)
    y = np.arange(30) % C
    probs = {"rgb": _probs(rng, y, (30,)), "flow": _probs(rng, y, (30,))}
    rows = SvmRows.per_video(np.concatenate([probs["flow"], probs["rgb"]], 1))
    fit = fit_svm(rows, y, c=1.0, seed=0, num_classes=C)
    spec = learned_spec(Learned("svm", None, 1.0, {}, svm=fit), per_recurrence=False)
    assert spec["rule"] == "learned" and spec["kind"] == "svm"
    # the SVM features are the L2-normalised scores, streams sorted (flow, rgb)
    norm = {s: p / np.linalg.norm(p, axis=1, keepdims=True) for s, p in probs.items()}
    hand = np.concatenate([norm["flow"], norm["rgb"]], 1) @ fit.coef.T + fit.intercept
    np.testing.assert_allclose(apply_fusion(spec, probs), hand, rtol=1e-12)
    w = Learned("product", {"flow": 0.3, "rgb": 0.7}, None, {}, exact_weights=(0.3, 0.7))
    spec = json.loads(json.dumps(learned_spec(w, per_recurrence=False)))
    want = 0.3 * np.log(probs["flow"]) + 0.7 * np.log(probs["rgb"])
    np.testing.assert_allclose(apply_fusion(spec, probs), want, rtol=1e-12)
    with pytest.raises(FusionFileError, match="per-recurrence SVM needs the window scores"):
        apply_fusion(svm_spec(fit, per_recurrence=True), probs)


def test_a_missing_or_foreign_fusion_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FusionFileError, match=r"h-svm/fusion.json: no saved fusion"):
        read_fusion(tmp_path / "h-svm" / "fusion.json")
    bad = tmp_path / "fusion.json"
    bad.write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(FusionFileError, match=r"fusion.json: format 'other/9'"):
        read_fusion(bad)
