"""evaluate: top-1, top-5 and mean-class accuracy per split and mean over splits for every
head x stream and every fusion (metrics.json), per-class accuracy (CSV), and the confusion
matrix of one model as a PNG and as a DVC plot (CSV of actual/predicted class names)."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.config import EvaluateConfig, RunConfig, section
from pipeline.datasets import read_manifest
from pipeline.metrics import (
    accuracy,
    confusion,
    mean_over_splits,
    per_class_accuracy,
    plot_confusion,
)
from pipeline.scores import ScoreTable, load_score_dir

log = logging.getLogger("evaluate")


def _summary(table: ScoreTable, num_classes: int) -> dict:
    per_split = {}
    for split in table.splits():
        t = table.select(split=split, subset="test")
        per_split[split] = accuracy(t.scores, t.label, num_classes=num_classes)
    mean = mean_over_splits(per_split)
    return {
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(mean).items()},
        "splits": {
            s: {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(a).items()}
            for s, a in per_split.items()
        },
    }


def class_groups(
    classes: tuple[str, ...], spec: dict[str, tuple[str, ...]]
) -> dict[str, list[int]]:
    """{group: indices of the classes whose name starts with one of its prefixes}; a group that
    matches no class is an error (a typo would otherwise report NaN quietly)."""
    out = {}
    for group, prefixes in spec.items():
        idx = [i for i, c in enumerate(classes) if c.startswith(tuple(prefixes))]
        if not idx:
            raise SystemExit(
                f"params.yaml: evaluate.class_groups.{group} {list(prefixes)} matches no class"
            )
        out[group] = idx
    return out


def results_table(metrics: dict, groups: dict[str, list[int]]) -> str:
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


def main(
    cfg: EvaluateConfig, run: RunConfig, *, scores: Path, fused: Path, manifest: Path, out: Path
) -> None:
    classes = read_manifest(manifest).classes
    c = len(classes)
    fusions = {f"{h}/{m}": t for (h, m), t in load_score_dir(fused).items()}
    models = {
        **{f"{h}/{s}": t for (h, s), t in load_score_dir(scores, run.trained()).items()},
        **fusions,
    }
    if not models:
        raise SystemExit(f"evaluate: no scores under {scores} or {fused}")
    summaries = {name: _summary(table, c) for name, table in models.items()}
    metrics: dict = {"streams": {}, "fusion": {}}
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
            raise SystemExit(
                f"params.yaml: evaluate.confusion '{chosen}' is not one of {sorted(models)}"
            )
    metrics["confusion_of"] = chosen
    out.mkdir(parents=True, exist_ok=True)
    groups = class_groups(classes, cfg.class_groups)
    if groups:
        metrics["class_groups"] = {
            name: {
                g: round(float(np.nanmean(per_class[name][idx])), 4) for g, idx in groups.items()
            }
            for name in sorted(per_class)
        }
    (out / "results.md").write_text(results_table(metrics, groups), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    names = sorted(per_class)
    with (out / "per_class.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["class", *names])
        for k, cls in enumerate(classes):
            w.writerow([cls, *[f"{per_class[n][k]:.4f}" for n in names]])

    table = models[chosen]
    tests = [table.select(split=s, subset="test") for s in table.splits()]
    pred = np.concatenate([t.scores.argmax(1) for t in tests])
    true = np.concatenate([t.label for t in tests])
    with (out / "confusion.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["actual", "predicted"])
        w.writerows([classes[a], classes[p]] for a, p in zip(true, pred, strict=True))
    plot_confusion(
        confusion(pred, true, num_classes=c),
        classes,
        out / "confusion.png",
        title=f"{chosen} (test, all splits)",
    )
    log.info(
        "evaluate: %d models; confusion matrix of %s (top-1 %.3f)",
        len(models),
        chosen,
        float((pred == true).mean()),
    )


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(__doc__, "scores", "fused", "manifest", "out")
    main(
        section(params, "evaluate", EvaluateConfig),
        section(params, "run", RunConfig),
        scores=args.scores,
        fused=args.fused,
        manifest=args.manifest,
        out=args.out,
    )
