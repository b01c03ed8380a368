"""Tests for the summary metrics of pipeline/report.py (``summary_rows``, ``write_summary``):
the few numbers `dvc metrics show` prints, one small JSON per model, from a metrics.json
written by hand."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.report import summary_rows, write_summary


def _acc(top1: float, mean_class: float, std: tuple[float, float] | None = None) -> dict:
    """A model's entry of metrics.json (top5, n and splits are not summarised)."""
    spread = None if std is None else {"top1": std[0], "top5": 0.0, "mean_class": std[1]}
    return {"top1": top1, "top5": 1.0, "mean_class": mean_class, "n": 9, "std": spread}


METRICS = {
    "streams": {
        "lstm": {"rgb": _acc(0.5, 0.45, (0.1, 0.05)), "flow": _acc(0.6, 0.55, (0.2, 0.15))},
        "mean_pool": {"rgb": _acc(0.4, 0.4, (0.0, 0.01)), "rgb+flow": _acc(0.7, 0.65, (0.3, 0.2))},
    },
    "fusion": {
        # lstm: svm and sum tie on top-1 (sum is first by name); mean_pool: product is best
        "lstm": {"svm": _acc(0.65, 0.6, (0.1, 0.1)), "sum": _acc(0.65, 0.5, (0.2, 0.2))},
        "mean_pool": {"product": _acc(0.75, 0.7, (0.05, 0.04)), "sum": _acc(0.7, 0.7, (0, 0))},
    },
    "confusion_of": "mean_pool/product",
}


def test_a_row_per_head_and_stream_the_best_fusion_per_head_and_the_best_model() -> None:
    rows = summary_rows(METRICS)
    assert rows == {
        "lstm-flow": {"top1": 0.6, "top1_std": 0.2, "mean_class": 0.55, "mean_class_std": 0.15},
        "lstm-rgb": {"top1": 0.5, "top1_std": 0.1, "mean_class": 0.45, "mean_class_std": 0.05},
        "mean_pool-rgb": {"top1": 0.4, "top1_std": 0.0, "mean_class": 0.4, "mean_class_std": 0.01},
        "mean_pool-rgb+flow": {
            "top1": 0.7,
            "top1_std": 0.3,
            "mean_class": 0.65,
            "mean_class_std": 0.2,
        },
        "lstm-fused": {
            "model": "lstm/sum",  # a tie on top-1 goes to the first name in sorted order
            "top1": 0.65,
            "top1_std": 0.2,
            "mean_class": 0.5,
            "mean_class_std": 0.2,
        },
        "mean_pool-fused": {
            "model": "mean_pool/product",
            "top1": 0.75,
            "top1_std": 0.05,
            "mean_class": 0.7,
            "mean_class_std": 0.04,
        },
        "best": {
            "model": "mean_pool/product",
            "top1": 0.75,
            "top1_std": 0.05,
            "mean_class": 0.7,
            "mean_class_std": 0.04,
        },
    }


def test_the_best_model_may_be_a_single_stream_and_one_split_has_no_std() -> None:
    metrics = {
        "streams": {"h": {"rgb": _acc(0.9, 0.8), "flow": _acc(0.3, 0.3)}},
        "fusion": {"h": {"sum": _acc(0.6, 0.6)}},
    }
    rows = summary_rows(metrics)
    assert rows["best"] == {
        "model": "h/rgb",
        "top1": 0.9,
        "top1_std": None,  # one split: the sample std is undefined, not 0
        "mean_class": 0.8,
        "mean_class_std": None,
    }
    assert rows["h-fused"]["model"] == "h/sum"


def test_without_fusions_there_is_no_fused_row() -> None:
    rows = summary_rows({"streams": {"h": {"rgb": _acc(0.5, 0.5)}}, "fusion": {}})
    assert sorted(rows) == ["best", "h-rgb"] and rows["best"]["model"] == "h/rgb"


def test_write_summary_writes_a_file_per_row_and_removes_stale_ones(tmp_path: Path) -> None:
    folder = tmp_path / "summary"
    folder.mkdir()
    (folder / "old_head-rgb.json").write_text("{}")  # a model no longer in the run
    (folder / "notes.txt").write_text("mine")  # not a summary file: kept
    paths = write_summary(METRICS, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            "best.json",
            "lstm-flow.json",
            "lstm-fused.json",
            "lstm-rgb.json",
            "mean_pool-fused.json",
            "mean_pool-rgb+flow.json",
            "mean_pool-rgb.json",
            "notes.txt",
        ]
    )
    assert sorted(paths) == sorted(folder.glob("*.json"))
    assert json.loads((folder / "lstm-rgb.json").read_text()) == {
        "top1": 0.5,
        "top1_std": 0.1,
        "mean_class": 0.45,
        "mean_class_std": 0.05,
    }
