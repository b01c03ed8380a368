"""Per-video score tables written by ``train`` and ``fuse`` and read by ``fuse`` and ``evaluate``.

CSV columns: split, subset (train/test), video_id, label, then one column per class score.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ScoreTable:
    split: list[str]
    subset: list[str]
    video_id: list[str]
    label: np.ndarray  # (N,) int
    scores: np.ndarray  # (N, C) float

    def select(self, *, split: str, subset: str) -> ScoreTable:
        keep = [
            i
            for i in range(len(self.video_id))
            if self.split[i] == split and self.subset[i] == subset
        ]
        return ScoreTable(
            [self.split[i] for i in keep],
            [self.subset[i] for i in keep],
            [self.video_id[i] for i in keep],
            self.label[keep],
            self.scores[keep],
        )

    def splits(self) -> list[str]:
        return sorted(set(self.split))


def write_scores(path: Path, table: ScoreTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:  # ids: any Unicode letter
        w = csv.writer(fh)
        w.writerow(
            [
                "split",
                "subset",
                "video_id",
                "label",
                *[f"s{c}" for c in range(table.scores.shape[1])],
            ]
        )
        for i, vid in enumerate(table.video_id):
            row = [f"{v:.6g}" for v in table.scores[i]]
            w.writerow([table.split[i], table.subset[i], vid, int(table.label[i]), *row])


def read_scores(path: Path) -> ScoreTable:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0][:4] != ["split", "subset", "video_id", "label"]:
        raise ValueError(f"{path}: not a score table (header {rows[0][:4] if rows else 'missing'})")
    body = rows[1:]
    ncls = len(rows[0]) - 4
    return ScoreTable(
        [r[0] for r in body],
        [r[1] for r in body],
        [r[2] for r in body],
        np.array([int(r[3]) for r in body], dtype=np.int64),
        np.array([[float(v) for v in r[4:]] for r in body], dtype=np.float64).reshape(-1, ncls),
    )


def concat(tables: list[ScoreTable]) -> ScoreTable:
    return ScoreTable(
        [s for t in tables for s in t.split],
        [s for t in tables for s in t.subset],
        [s for t in tables for s in t.video_id],
        np.concatenate([t.label for t in tables]),
        np.concatenate([t.scores for t in tables]),
    )


def load_score_dir(
    root: Path, models: list[tuple[str, str]] | None = None
) -> dict[tuple[str, str], ScoreTable]:
    """``root/<head>-<name>/scores.csv`` -> {(head, name): table}, for the given ``models`` (a
    missing one is an error naming its path) or, when None, every sub-folder. Train outputs
    share one parent folder, so readers pass the configured models: a folder left by a head
    since removed from params must not reach the metrics."""
    if models is None:
        found = sorted(p for p in Path(root).iterdir() if (p / "scores.csv").is_file())
        models = [tuple(d.name.rpartition("-")[::2]) for d in found]  # type: ignore[misc]
    out = {}
    for head, name in models:
        path = Path(root) / f"{head}-{name}" / "scores.csv"
        if not head or not path.is_file():
            raise FileNotFoundError(f"{path}: no scores (run the stage that writes them)")
        out[(head, name)] = read_scores(path)
    return out
