"""fuse: late fusion of each head's per-stream scores (sum, product, weighted, SVM), per split,
on the test videos every stream has. Writes fused score tables `<head>-<method>/scores.csv`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline.config import FusionConfig, RunConfig, section
from pipeline.fusion import fuse_scores, svm_fuse
from pipeline.scores import ScoreTable, concat, load_score_dir, write_scores

log = logging.getLogger("fuse")


def _aligned(
    tables: dict[str, ScoreTable], split: str, subset: str
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Videos present in every stream's table, in one order -> (ids, labels, {stream: (N, C)})."""
    parts = {s: t.select(split=split, subset=subset) for s, t in tables.items()}
    common = sorted(set.intersection(*(set(p.video_id) for p in parts.values())))
    first = next(iter(parts.values()))
    label_of = dict(zip(first.video_id, first.label, strict=True))
    streams = {}
    for s, p in parts.items():
        row = {v: i for i, v in enumerate(p.video_id)}
        streams[s] = p.scores[[row[v] for v in common]]
    return common, np.array([label_of[v] for v in common], dtype=np.int64), streams


def main(cfg: FusionConfig, run: RunConfig, *, scores: Path, out: Path) -> None:
    by_head: dict[str, dict[str, ScoreTable]] = {}
    for (head, stream), table in load_score_dir(scores, run.trained()).items():
        if stream in cfg.streams:  # joint-input models (rgb+flow) are already fused inside
            by_head.setdefault(head, {})[stream] = table
    out.mkdir(parents=True, exist_ok=True)
    chosen_c: dict[str, dict[str, float]] = {}
    for head, tables in sorted(by_head.items()):
        if len(tables) < 2:
            log.warning("%s: only stream %s, nothing to fuse", head, list(tables))
            continue
        splits = sorted(set.intersection(*(set(t.splits()) for t in tables.values())))
        for method in cfg.methods:
            fused = []
            for split in splits:
                ids, labels, test = _aligned(tables, split, "test")
                if method == "svm":
                    _, tr_labels, train = _aligned(tables, split, "train")
                    s, c = svm_fuse(
                        test,
                        train=train,
                        train_labels=tr_labels,
                        c_grid=cfg.svm_c,
                        folds=cfg.svm_folds,
                        seed=cfg.seed,
                    )
                    chosen_c.setdefault(head, {})[split] = c
                else:
                    s = fuse_scores(method, test, weights=cfg.weights)
                fused.append(ScoreTable([split] * len(ids), ["test"] * len(ids), ids, labels, s))
            table = concat(fused)
            write_scores(out / f"{head}-{method}" / "scores.csv", table)
            acc = float((table.scores.argmax(1) == table.label).mean())
            log.info(
                "%s %s fusion of %s: test top-1 %.3f", head, method, "+".join(sorted(tables)), acc
            )
    (out / "svm_c.json").write_text(json.dumps(chosen_c, indent=1))


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(__doc__, "scores", "out")
    main(
        section(params, "fusion", FusionConfig),
        section(params, "run", RunConfig),
        scores=args.scores,
        out=args.out,
    )
