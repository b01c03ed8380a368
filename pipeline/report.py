"""The evaluate stage's report: top-1, top-5 and mean-class accuracy per split and mean over
splits for every head x stream and every fusion (metrics.json), a summary of them for `dvc
metrics show` (summary/: one small JSON per model, see ``summary_rows``), per-class accuracy
(per_class.csv), a Markdown results table (results.md), and the confusion matrix of one model
as a DVC plot (confusion.csv: actual/predicted class names) and a PNG (confusion.png).

Every score table is read on its test rows only; a model's numbers over several splits are the
mean of its per-split numbers and their sample standard deviation (ddof = 1; ``std`` is null for
a single split), the "mean +- std over the three splits" of UCF101 and HMDB51 papers.

Class groups (the mean per-class accuracy of named groups of classes) are optional. The demo
dataset declares its own (pipeline/demo.py ``class_groups``, found from the manifest's class
names); ``evaluate.class_groups`` in params.yaml adds the user's own and is empty as shipped. A
group that matches no class of the dataset is left out of the report with a warning naming it,
and a line under results.md's table says so.
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
from pipeline.demo import class_groups as demo_class_groups
from pipeline.metrics import (
    accuracy,
    best_by_top1,
    confusion,
    mean_over_splits,
    per_class_accuracy,
    plot_confusion,
    std_over_splits,
)
from pipeline.scores import ScoreTable, load_score_dir

log = logging.getLogger(__name__)


class ReportError(ValueError):
    """Scores and settings that give no report (no model, or a confusion model that names
    nothing there); names what is missing."""


def _rounded(values: Mapping[str, Any]) -> dict[str, Any]:
    # 4 decimals: metrics.json is diffed by `dvc metrics diff` and read by people
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


def summary(table: ScoreTable, num_classes: int) -> dict[str, Any]:
    """A model's test accuracy -> {top1, top5, mean_class, n (mean over splits, n summed),
    "std": {top1, top5, mean_class} (sample std over splits, ddof = 1) or None for one split,
    "splits": {split: {top1, top5, mean_class, n} of that split}}, fractions rounded to 4
    decimals (the std from the unrounded per-split values). table.scores: (N, C), C ==
    num_classes."""
    per_split = {}
    for split in table.splits():
        t = table.select(split=split, subset="test")
        per_split[split] = accuracy(t.scores, t.label, num_classes=num_classes)
    mean = mean_over_splits(per_split)
    spread = std_over_splits(per_split)
    return {
        **_rounded(asdict(mean)),
        "std": None if spread is None else _rounded(asdict(spread)),
        "splits": {s: _rounded(asdict(a)) for s, a in per_split.items()},
    }


@dataclass(frozen=True)
class ClassGroups:
    """Class groups resolved against a dataset's classes.

    indices: {group: indices into the classes of the classes whose name starts with one of the
    group's prefixes}, groups that match at least one class only. unmatched: {group: its
    prefixes} of the groups that match no class (left out of the report, with a warning).
    """

    indices: dict[str, list[int]]
    unmatched: dict[str, tuple[str, ...]]


def class_groups(classes: tuple[str, ...], spec: Mapping[str, tuple[str, ...]]) -> ClassGroups:
    """The groups of ``spec`` ({group: class-name prefixes}) found among ``classes``.

    A group that matches no class is left out with one warning naming it and its prefixes, not
    an error: the same params.yaml may be run on several datasets (`dvc exp run -S
    dataset.name=hmdb51`), and a crash after hours of training for a report column is the wrong
    trade. It is never dropped silently either (a misspelt prefix would look like "no such
    group"): the warning, and a line under results.md's table, name it.
    """
    indices, unmatched = {}, {}
    for group, prefixes in spec.items():
        idx = [i for i, c in enumerate(classes) if c.startswith(tuple(prefixes))]
        if idx:
            indices[group] = idx
        else:
            unmatched[group] = tuple(prefixes)
            log.warning(
                "evaluate.class_groups.%s %s matches no class of this dataset (%d classes, "
                "e.g. %s): left out of the report",
                group,
                list(prefixes),
                len(classes),
                ", ".join(classes[:3]),
            )
    return ClassGroups(indices, unmatched)


def _cell(acc: Mapping[str, Any], key: str) -> str:
    std = acc.get("std")
    return f"{acc[key]:.3f}" if std is None else f"{acc[key]:.3f} ± {std[key]:.3f}"


def results_table(
    metrics: Mapping[str, Any],
    groups: Mapping[str, list[int]],
    unmatched: Mapping[str, tuple[str, ...]] | None = None,
) -> str:
    """A Markdown table: one row per head and stream or fusion, top-1 and mean-class accuracy
    (mean over splits, "mean ± sample std" when more than one split was run) and the mean
    per-class accuracy of every class group; then a line per ``unmatched`` group."""
    cols = ["top-1", "mean class", *groups]
    lines = ["| head | input | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    several = False
    for kind in ("streams", "fusion"):
        for head in sorted(metrics[kind]):
            for name, acc in sorted(metrics[kind][head].items()):
                several |= acc.get("std") is not None
                label = name if kind == "streams" else f"fused: {name}"
                cells = [_cell(acc, "top1"), _cell(acc, "mean_class")]
                cells += [f"{metrics['class_groups'][f'{head}/{name}'][g]:.3f}" for g in groups]
                lines.append(f"| {head} | {label} | " + " | ".join(cells) + " |")
    if several:
        lines += ["", "Accuracies: mean ± sample standard deviation (ddof = 1) over the splits."]
    for group, prefixes in (unmatched or {}).items():
        lines += [
            "",
            f"Class group `{group}` {list(prefixes)} matches no class of this dataset: left out.",
        ]
    return "\n".join(lines) + "\n"


def _summary_row(acc: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    std = acc.get("std")
    row: dict[str, Any] = {} if model is None else {"model": model}
    for key in ("top1", "mean_class"):
        row[key] = acc[key]
        row[f"{key}_std"] = None if std is None else std[key]  # null: one split, undefined
    return row


def summary_rows(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """metrics.json's content -> the summary metrics, {file stem: row}: "<head>-<stream>" for
    every head and stream (or joint streams, "rgb+flow"); "<head>-fused", the head's best
    fusion; "best", the best model of all (streams and fusions). Best: the highest mean top-1
    over splits, ties to the first name in sorted order; its row names it in "model"
    ("<head>/<fusion or stream>"). Row: top1, top1_std, mean_class, mean_class_std (mean and
    sample std over splits; the std null for one split).

    One small file per model, not one file: `dvc metrics show` prints a file as one row with
    a column per key, so a file of every model is one row hundreds of columns wide, and a
    file per model is a table with a row per model and five columns."""
    rows: dict[str, dict[str, Any]] = {}
    every: dict[str, Mapping[str, Any]] = {}
    for head, accs in sorted(metrics["streams"].items()):
        for stream, acc in sorted(accs.items()):
            rows[f"{head}-{stream}"] = _summary_row(acc)
            every[f"{head}/{stream}"] = acc
    for head, accs in sorted(metrics["fusion"].items()):
        if not accs:
            continue
        method = best_by_top1(accs)
        rows[f"{head}-fused"] = _summary_row(accs[method], f"{head}/{method}")
        every.update({f"{head}/{m}": acc for m, acc in accs.items()})
    if every:
        best = best_by_top1(every)
        rows["best"] = _summary_row(every[best], best)
    return rows


def write_summary(metrics: Mapping[str, Any], folder: Path) -> list[Path]:
    """The summary metrics of ``metrics`` (``summary_rows``) as ``folder``/<stem>.json, one
    file each; JSON files of models no longer there are removed first. Returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):  # a stale row would be shown by `dvc metrics show`
        old.unlink()
    rows = summary_rows(metrics)
    for stem, row in rows.items():
        (folder / f"{stem}.json").write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
    return [folder / f"{stem}.json" for stem in rows]


@dataclass
class Report:
    """What the evaluate stage writes, computed.

    metrics: metrics.json's content. per_class: {model: (C,) test accuracy per class, the mean
    over splits; NaN for a class without test videos}. chosen: the confusion matrix's model;
    true, pred: (N,) its test labels and argmax predictions over every split.
    """

    metrics: dict[str, Any]
    per_class: dict[str, np.ndarray]
    groups: ClassGroups
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
    fusions, the model) with the highest mean top-1, ties to the first name in sorted order.
    Class groups: the demo's own when ``classes`` are the demo's, plus ``cfg.class_groups``."""
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
        chosen = best_by_top1({n: summaries[n] for n in fusions or models})
    else:
        chosen = cfg.confusion
        if chosen not in models:
            # params.yaml's check knows the run, not which fusions had two streams to fuse
            raise ReportError(
                f"params.yaml: evaluate.confusion '{chosen}' is not one of {sorted(models)}"
            )
    metrics["confusion_of"] = chosen
    # The dataset's own groups (the demo's), then the user's; a user group of the same name wins.
    groups = class_groups(classes, {**demo_class_groups(classes), **cfg.class_groups})
    if groups.indices:
        metrics["class_groups"] = {
            name: {
                g: round(float(np.nanmean(per_class[name][idx])), 4)
                for g, idx in groups.indices.items()
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
    """``out``/results.md, metrics.json (every number), summary/ (``write_summary``: the
    few `dvc metrics show` prints), per_class.csv, confusion.csv and confusion.png."""
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(report.metrics, report.groups.indices, report.groups.unmatched)
    (out / "results.md").write_text(table, encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(report.metrics, indent=1))
    write_summary(report.metrics, out / "summary")

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
