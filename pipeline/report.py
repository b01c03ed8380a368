"""The evaluate stage's report: top-1, top-5 and mean-class accuracy per split and mean over
splits for every head x stream and every fusion (metrics.json), per-class accuracy
(per_class.csv), a Markdown results table (results.md), and the confusion matrix of one model
as a DVC plot (confusion.csv: actual/predicted class names) and a PNG (confusion.png).

Every score table is read on its test rows only; a model's numbers over several splits are the
mean of its per-split numbers (the protocol of UCF101 and HMDB51's three splits).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import EvaluateConfig, RunConfig
from pipeline.datasets import read_manifest
from pipeline.metrics import (
    accuracy,
    confusion,
    mean_over_splits,
    per_class_accuracy,
    plot_confusion,
)
from pipeline.scores import ScoreTable, load_score_dir

log = logging.getLogger(__name__)


class ReportError(ValueError):
    """Scores and settings that give no report (no model, a class group or a confusion model
    that names nothing there); names what is missing."""


def _rounded(values: Mapping[str, Any]) -> dict[str, Any]:
    # 4 decimals: metrics.json is diffed by `dvc metrics diff` and read by people
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


def summary(table: ScoreTable, num_classes: int) -> dict[str, Any]:
    """A model's test accuracy -> {top1, top5, mean_class, n (mean over splits, n summed),
    "splits": {split: the same for that split}}, fractions rounded to 4 decimals.
    table.scores: (N, C) with C == num_classes."""
    per_split = {}
    for split in table.splits():
        t = table.select(split=split, subset="test")
        per_split[split] = accuracy(t.scores, t.label, num_classes=num_classes)
    mean = mean_over_splits(per_split)
    return {
        **_rounded(asdict(mean)),
        "splits": {s: _rounded(asdict(a)) for s, a in per_split.items()},
    }


def class_groups(
    classes: tuple[str, ...], spec: Mapping[str, tuple[str, ...]]
) -> dict[str, list[int]]:
    """{group: indices of the classes whose name starts with one of its prefixes}; a group that
    matches no class is a ReportError (a typo would otherwise report NaN quietly)."""
    out = {}
    for group, prefixes in spec.items():
        idx = [i for i, c in enumerate(classes) if c.startswith(tuple(prefixes))]
        if not idx:
            raise ReportError(
                f"params.yaml: evaluate.class_groups.{group} {list(prefixes)} matches no class"
            )
        out[group] = idx
    return out


def results_table(metrics: Mapping[str, Any], groups: Mapping[str, list[int]]) -> str:
    """A Markdown table: one row per head and stream or fusion, top-1 and mean-class accuracy
    (mean over splits) and the mean per-class accuracy of every class group."""
    cols = ["top-1", "mean class", *groups]
    lines = ["| head | input | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for kind in ("streams", "fusion"):
        for head in sorted(metrics[kind]):
            for name, acc in sorted(metrics[kind][head].items()):
                label = name if kind == "streams" else f"fused: {name}"
                cells = [f"{acc['top1']:.3f}", f"{acc['mean_class']:.3f}"]
                cells += [f"{metrics['class_groups'][f'{head}/{name}'][g]:.3f}" for g in groups]
                lines.append(f"| {head} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class Report:
    """What the evaluate stage writes, computed.

    metrics: metrics.json's content. per_class: {model: (C,) test accuracy per class, the mean
    over splits; NaN for a class without test videos}. chosen: the confusion matrix's model;
    true, pred: (N,) its test labels and argmax predictions over every split.
    """

    metrics: dict[str, Any]
    per_class: dict[str, np.ndarray]
    groups: dict[str, list[int]]
    chosen: str
    true: np.ndarray
    pred: np.ndarray


def build_report(
    *,
    cfg: EvaluateConfig,
    classes: tuple[str, ...],
    streams: Mapping[str, ScoreTable],
    fusions: Mapping[str, ScoreTable],
) -> Report:
    """Score tables {"<head>/<stream>": table} and {"<head>/<fusion>": table}, scores (N, C)
    with C = len(classes) -> Report. ``cfg.confusion`` "best" picks the fusion (or, without
    fusions, the model) with the highest mean top-1, ties to the first name in sorted order."""
    c = len(classes)
    models = {**streams, **fusions}
    if not models:
        raise ReportError("no scores to evaluate")
    summaries = {name: summary(table, c) for name, table in models.items()}
    metrics: dict[str, Any] = {"streams": {}, "fusion": {}}
    per_class = {}
    for name, table in sorted(models.items()):
        head, kind = name.split("/")
        metrics["fusion" if name in fusions else "streams"].setdefault(head, {})[kind] = summaries[
            name
        ]
        tests = [table.select(split=s, subset="test") for s in table.splits()]
        per_class[name] = np.nanmean(
            [per_class_accuracy(t.scores, t.label, num_classes=c) for t in tests], axis=0
        )
    if cfg.confusion == "best":
        chosen = max(sorted(fusions or models), key=lambda n: summaries[n]["top1"])
    else:
        chosen = cfg.confusion
        if chosen not in models:
            # params.yaml's check knows the run, not which fusions had two streams to fuse
            raise ReportError(
                f"params.yaml: evaluate.confusion '{chosen}' is not one of {sorted(models)}"
            )
    metrics["confusion_of"] = chosen
    groups = class_groups(classes, cfg.class_groups)
    if groups:
        metrics["class_groups"] = {
            name: {
                g: round(float(np.nanmean(per_class[name][idx])), 4) for g, idx in groups.items()
            }
            for name in sorted(per_class)
        }
    table = models[chosen]
    tests = [table.select(split=s, subset="test") for s in table.splits()]
    return Report(
        metrics=metrics,
        per_class=per_class,
        groups=groups,
        chosen=chosen,
        true=np.concatenate([t.label for t in tests]),
        pred=np.concatenate([t.scores.argmax(1) for t in tests]),
    )


def write_report(report: Report, classes: tuple[str, ...], out: Path) -> None:
    """``out``/results.md, metrics.json, per_class.csv, confusion.csv and confusion.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(results_table(report.metrics, report.groups), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(report.metrics, indent=1))

    names = sorted(report.per_class)
    with (out / "per_class.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["class", *names])
        for k, cls in enumerate(classes):
            w.writerow([cls, *[f"{report.per_class[n][k]:.4f}" for n in names]])

    with (out / "confusion.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["actual", "predicted"])
        w.writerows([classes[a], classes[p]] for a, p in zip(report.true, report.pred, strict=True))
    plot_confusion(
        confusion(report.pred, report.true, num_classes=len(classes)),
        classes,
        out / "confusion.png",
        title=f"{report.chosen} (test, all splits)",
    )


def evaluate(
    *, cfg: EvaluateConfig, run: RunConfig, scores: Path, fused: Path, manifest: Path, out: Path
) -> Report:
    """The evaluate stage: the train stages' score tables under ``scores`` (the models of
    ``run``), every fused table under ``fused``, the class names of the manifest file
    ``manifest`` -> the report written to ``out`` (see ``write_report``), and returned."""
    classes = read_manifest(manifest).classes
    fusions = {f"{h}/{m}": t for (h, m), t in load_score_dir(fused).items()}
    streams = {f"{h}/{s}": t for (h, s), t in load_score_dir(scores, run.trained()).items()}
    if not streams and not fusions:
        raise ReportError(f"no scores under {scores} or {fused}")
    report = build_report(cfg=cfg, classes=classes, streams=streams, fusions=fusions)
    write_report(report, classes, out)
    log.info(
        "evaluate: %d models; confusion matrix of %s (top-1 %.3f)",
        len(streams) + len(fusions),
        report.chosen,
        float((report.pred == report.true).mean()),
    )
    return report
