"""Tests for pipeline/report.py, the evaluate stage's report, on score tables written by hand:
no DVC, no training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.config import EvaluateConfig, RunConfig
from pipeline.manifest import Manifest, VideoRecord, write_manifest
from pipeline.report import (
    ReportError,
    build_report,
    class_groups,
    evaluate,
    results_table,
    summary,
)
from pipeline.scores import ScoreTable, concat, write_scores
from stages import evaluate as evaluate_stage

CLASSES = ("look_a", "motion_b", "order_c")


def _table(split: str, labels: list[int], preds: list[int], subset: str = "test") -> ScoreTable:
    """Rows whose argmax is ``preds`` (0.6 on the predicted class, 0.2 elsewhere)."""
    scores = np.full((len(labels), 3), 0.2)
    scores[np.arange(len(preds)), preds] = 0.6
    n = len(labels)
    ids = [f"{subset}{split}_{i}" for i in range(n)]
    return ScoreTable([split] * n, [subset] * n, ids, np.array(labels), scores)


# split 1: 2 of 4 right (top-1 0.5); split 2: 3 of 3 right; train rows all wrong (not read)
RGB = concat(
    [
        _table("1", [0, 1, 2, 2], [0, 0, 2, 0]),
        _table("1", [0, 1, 2], [1, 2, 0], subset="train"),
        _table("2", [0, 1, 2], [0, 1, 2]),
    ]
)
FLOW = concat([_table("1", [0, 1, 2, 2], [0, 1, 0, 0]), _table("2", [0, 1, 2], [0, 0, 2])])
SUM = concat([_table("1", [0, 1, 2, 2], [0, 1, 2, 0]), _table("2", [0, 1, 2], [0, 1, 1])])


def test_summary_is_the_mean_over_splits_of_the_test_rows() -> None:
    s = summary(RGB, 3)
    # split 1 per class: 1 of 1, 0 of 1, 1 of 2 -> mean class 0.5
    assert s["splits"]["1"] == {"top1": 0.5, "top5": 1.0, "mean_class": 0.5, "n": 4}
    assert s["splits"]["2"]["top1"] == 1.0
    assert s["top1"] == 0.75 and s["n"] == 7  # fractions averaged over splits, n summed
    assert s["mean_class"] == 0.75


def test_class_groups_are_the_classes_of_each_prefix_and_a_typo_is_an_error() -> None:
    groups = class_groups(CLASSES, {"motion": ("motion_",), "other": ("look", "order")})
    assert groups == {"motion": [1], "other": [0, 2]}
    with pytest.raises(ReportError, match=r"evaluate.class_groups.oops \['moton_'\] matches no"):
        class_groups(CLASSES, {"oops": ("moton_",)})


def test_results_table_by_hand() -> None:
    acc = {"top1": 0.5, "mean_class": 0.25}
    metrics = {
        "streams": {"h": {"rgb": acc}},
        "fusion": {"h": {"sum": {"top1": 1.0, "mean_class": 1.0}}},
        "class_groups": {"h/rgb": {"g": 0.125}, "h/sum": {"g": 1.0}},
    }
    assert results_table(metrics, {"g": [0]}) == (
        "| head | input | top-1 | mean class | g |\n"
        "|---|---|---|---|---|\n"
        "| h | rgb | 0.500 | 0.250 | 0.125 |\n"
        "| h | fused: sum | 1.000 | 1.000 | 1.000 |\n"
    )


def _report(confusion: str = "best", fusions: bool = True, groups: dict | None = None):  # noqa: ANN202
    return build_report(
        cfg=EvaluateConfig(confusion=confusion, class_groups=groups or {}),
        classes=CLASSES,
        streams={"h/rgb": RGB, "h/flow": FLOW},
        fusions={"h/sum": SUM} if fusions else {},
    )


def test_best_confusion_is_the_best_fusion_even_when_a_stream_is_better() -> None:
    r = _report()
    assert r.metrics["streams"]["h"]["rgb"]["top1"] == 0.75
    assert r.metrics["fusion"]["h"]["sum"]["top1"] == round((0.75 + 2 / 3) / 2, 4)
    assert r.chosen == "h/sum" and r.metrics["confusion_of"] == "h/sum"
    # its test rows over both splits, in split order
    assert r.true.tolist() == [0, 1, 2, 2, 0, 1, 2] and r.pred.tolist() == [0, 1, 2, 0, 0, 1, 1]
    assert _report(fusions=False).chosen == "h/rgb"  # without fusions: the best model


def test_a_named_confusion_model_is_used_and_one_not_there_is_an_error() -> None:
    assert _report("h/flow").pred.tolist() == [0, 1, 0, 0, 0, 0, 2]
    with pytest.raises(ReportError, match=r"evaluate.confusion 'h/svm' is not one of"):
        _report("h/svm")


def test_per_class_and_group_accuracy_are_means_over_splits() -> None:
    r = _report(groups={"order": ("order_",)})
    # flow, class 2 (order_c): split 1 0 of 2 right, split 2 1 of 1 -> 0.5; class 1: 1 and 0
    np.testing.assert_allclose(r.per_class["h/flow"], [1.0, 0.5, 0.5])
    assert r.metrics["class_groups"]["h/flow"] == {"order": 0.5}
    assert "class_groups" not in _report().metrics  # no groups, no key


def _run(tmp: Path, heads: tuple[str, ...] = ("h",)) -> tuple[Path, ...]:
    m = Manifest(
        classes=CLASSES,
        split_names=("1",),
        videos=[
            VideoRecord(f"v{i}", Path(f"/x/v{i}.avi"), i % 3, f"v{i}", ("test",)) for i in range(3)
        ],
    )
    write_manifest(m, tmp / "manifest.csv")
    for name, table in (("h-rgb", RGB), ("h-flow", FLOW), ("old-rgb", RGB)):
        write_scores(tmp / "train" / name / "scores.csv", table)
    write_scores(tmp / "fuse" / "h-sum" / "scores.csv", SUM)
    return tmp / "train", tmp / "fuse", tmp / "manifest.csv"


def test_evaluate_writes_every_report_file_for_the_runs_models(tmp_path: Path) -> None:
    scores, fused, manifest = _run(tmp_path)
    out = tmp_path / "evaluate"
    r = evaluate(
        cfg=EvaluateConfig(class_groups={"motion": ("motion_",)}),
        run=RunConfig(heads=("h",), streams=("rgb", "flow")),
        scores=scores,
        fused=fused,
        manifest=manifest,
        out=out,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == r.metrics
    assert sorted(metrics["streams"]) == ["h"]  # old-rgb: a folder of a head not in the run
    with (out / "per_class.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["class", "h/flow", "h/rgb", "h/sum"]
    assert [r[0] for r in rows[1:]] == list(CLASSES)
    with (out / "confusion.csv").open() as fh:
        confusion = list(csv.reader(fh))
    assert confusion[0] == ["actual", "predicted"] and confusion[4] == ["order_c", "look_a"]
    assert len(confusion) == 1 + 7
    assert "| h | fused: sum |" in (out / "results.md").read_text()
    assert imread(out / "confusion.png").ndim == 3


def test_the_stage_names_a_missing_score_table_in_one_line(tmp_path: Path) -> None:
    scores, fused, manifest = _run(tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate_stage.main(
            EvaluateConfig(),
            RunConfig(heads=("h", "lstm"), streams=("rgb",)),
            scores=scores,
            fused=fused,
            manifest=manifest,
            out=tmp_path / "out",
        )
    msg = str(e.value)
    assert msg.startswith("evaluate: ") and "lstm-rgb/scores.csv: no scores" in msg
    assert not (tmp_path / "out").exists()
