"""Tests for pipeline/report.py, the evaluate stage's report, on score tables written by hand:
no DVC, no training."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.config import EvaluateConfig, RunConfig, load_params, section
from pipeline.demo import CLASSES as DEMO_CLASSES
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
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


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
    # sample std of (0.5, 1.0): |0.5 - 1.0| / sqrt(2)
    assert s["std"] == {"top1": 0.3536, "top5": 0.0, "mean_class": 0.3536}


def test_summary_gives_the_sample_std_over_three_splits_and_none_for_one() -> None:
    # split 1: 1 of 4 right, split 2: 2 of 4, split 3: 4 of 4 -> top-1 0.25, 0.5, 1.0
    table = concat(
        [
            _table("1", [0, 1, 2, 2], [0, 0, 0, 0]),
            _table("2", [0, 1, 2, 2], [0, 1, 0, 0]),
            _table("3", [0, 1, 2, 2], [0, 1, 2, 2]),
        ]
    )
    s = summary(table, 3)
    assert [s["splits"][k]["top1"] for k in ("1", "2", "3")] == [0.25, 0.5, 1.0]
    # mean 1.75 / 3 = 0.58333; squared deviations 0.111111 + 0.006944 + 0.173611 = 0.291667,
    # / (3 - 1) = 0.145833, sqrt = 0.381881 (the population std would be 0.311805)
    assert s["top1"] == 0.5833 and s["std"]["top1"] == 0.3819
    # mean class per split: (1 + 0 + 0) / 3, (1 + 1 + 0) / 3, 1 -> mean 2 / 3, sample std 1 / 3
    assert s["mean_class"] == 0.6667 and s["std"]["mean_class"] == 0.3333
    assert s["std"]["top5"] == 0.0  # 3 classes: top-5 is always right
    assert (
        summary(table.select(split="2", subset="test"), 3)["std"] is None
    )  # one split: undefined, not 0


def test_class_groups_are_the_classes_of_each_prefix() -> None:
    groups = class_groups(CLASSES, {"motion": ("motion_",), "other": ("look", "order")})
    assert groups.indices == {"motion": [1], "other": [0, 2]} and groups.unmatched == {}


def test_a_group_that_matches_no_class_is_left_out_with_a_warning_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.report"):
        groups = class_groups(CLASSES, {"motion": ("motion_",), "oops": ("moton_",)})
    assert groups.indices == {"motion": [1]} and groups.unmatched == {"oops": ("moton_",)}
    [record] = caplog.records
    assert "evaluate.class_groups.oops ['moton_'] matches no class" in record.getMessage()
    r = _report(groups={"motion": ("motion_",), "oops": ("moton_",)})
    assert list(r.metrics["class_groups"]["h/rgb"]) == ["motion"]
    table = results_table(r.metrics, r.groups.indices, r.groups.unmatched)
    assert table.endswith(
        "Class group `oops` ['moton_'] matches no class of this dataset: left out.\n"
    )


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


def test_results_table_gives_mean_and_std_over_several_splits() -> None:
    r = _report()  # two splits
    table = results_table(r.metrics, {})
    # h/rgb: top-1 0.5 and 1.0 -> 0.75 +- 0.3536; mean class the same
    assert "| h | rgb | 0.750 ± 0.354 | 0.750 ± 0.354 |\n" in table
    assert table.endswith("mean ± sample standard deviation (ddof = 1) over the splits.\n")


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


def test_the_demo_brings_its_own_class_groups() -> None:
    # the demo's six classes, every test video of split 1 right
    n = len(DEMO_CLASSES)
    scores = np.eye(n)
    table = ScoreTable(["1"] * n, ["test"] * n, [f"v{i}" for i in range(n)], np.arange(n), scores)
    r = build_report(
        cfg=EvaluateConfig(), classes=DEMO_CLASSES, streams={"h/rgb": table}, fusions={}
    )
    groups = r.metrics["class_groups"]["h/rgb"]
    assert groups == {"motion-only": 1.0, "order-only": 1.0, "appearance-only": 1.0}
    assert r.metrics["streams"]["h"]["rgb"]["std"] is None  # one split


def _run(tmp: Path, classes: tuple[str, ...] = CLASSES) -> tuple[Path, ...]:
    m = Manifest(
        classes=classes,
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
    # the summary `dvc metrics show` prints: a file per model, the head's best fusion, the best
    summary = {p.name: json.loads(p.read_text()) for p in (out / "summary").iterdir()}
    assert sorted(summary) == ["best.json", "h-flow.json", "h-fused.json", "h-rgb.json"]
    # h/rgb: top-1 0.5 and 1.0 over the two splits, better than h/sum's 3/4 and 2/3
    assert summary["best.json"] == {
        "model": "h/rgb",
        "top1": 0.75,
        "top1_std": 0.3536,
        "mean_class": 0.75,
        "mean_class_std": 0.3536,
    }
    assert summary["h-fused.json"]["model"] == "h/sum"
    assert summary["h-fused.json"]["top1"] == 0.7083


def test_shipped_params_evaluate_a_dataset_that_is_not_the_demo(tmp_path: Path) -> None:
    """The shipped params.yaml's evaluate section on a manifest of other class names (UCF101's,
    say) writes a report; it used to stop on the demo's class groups."""
    scores, fused, manifest = _run(tmp_path, ("ApplyEyeMakeup", "Basketball", "YoYo"))
    cfg = section(load_params(PARAMS), "evaluate", EvaluateConfig, source=str(PARAMS))
    out = tmp_path / "evaluate"
    evaluate_stage.main(
        cfg,
        RunConfig(heads=("h",), streams=("rgb", "flow")),
        scores=scores,
        fused=fused,
        manifest=manifest,
        out=out,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert "class_groups" not in metrics  # no group for these classes, and no warning line
    assert "Class group" not in (out / "results.md").read_text()
    with (out / "per_class.csv").open() as fh:
        assert [row[0] for row in csv.reader(fh)] == [
            "class",
            "ApplyEyeMakeup",
            "Basketball",
            "YoYo",
        ]
    rgb = metrics["streams"]["h"]["rgb"]
    assert rgb["top1"] == 0.75 and rgb["std"]["top1"] == 0.3536


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
