"""Per-video score tables written by ``train`` and ``fuse`` and read by ``fuse`` and ``evaluate``.

CSV columns: split, subset (train/test), video_id, label, then one column per class score.
Heads that score each pooling window also write ``window_scores.npz`` (``WindowScores``), read by
the per-recurrence SVM fusion.
"""

from __future__ import annotations

import csv
import zipfile
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


# -- per-window scores of heads that score each pooling window (TSRNN's window_scores) --------

WINDOW_SCORES = "window_scores.npz"
# Fixed zip member times: np.savez stamps the current time, and this file is part of a DVC
# output whose hash must depend on the inputs and params only.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass
class WindowScores:
    """One row per (split, subset, video) as in a ScoreTable; scores (N, M, C) the probability
    of each of the M pooling windows (recurrences), weights (M,) their eq. 8 gains (the video's
    probability is sum_l w_l p_l / sum_l w_l)."""

    split: list[str]
    subset: list[str]
    video_id: list[str]
    label: np.ndarray  # (N,) int
    scores: np.ndarray  # (N, M, C) float32
    weights: np.ndarray  # (M,)

    def select(self, *, split: str, subset: str) -> WindowScores:
        keep = [
            i
            for i in range(len(self.video_id))
            if self.split[i] == split and self.subset[i] == subset
        ]
        return WindowScores(
            [self.split[i] for i in keep],
            [self.subset[i] for i in keep],
            [self.video_id[i] for i in keep],
            self.label[keep],
            self.scores[keep],
            self.weights,
        )


def write_window_scores(path: Path, w: WindowScores) -> None:
    """``path`` (.npz): arrays split, subset, video_id (str), label (N,), scores (N, M, C)
    float32, weights (M,) float32; byte-identical for identical content."""
    arrays = {
        "split": np.array(w.split, dtype=str),
        "subset": np.array(w.subset, dtype=str),
        "video_id": np.array(w.video_id, dtype=str),
        "label": np.asarray(w.label, dtype=np.int64),
        "scores": np.asarray(w.scores, dtype=np.float32),
        "weights": np.asarray(w.weights, dtype=np.float32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:  # probabilities barely compress
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            with zf.open(info, "w", force_zip64=True) as fh:  # as np.savez: members may pass 2 GiB
                np.lib.format.write_array(fh, arr, allow_pickle=False)


def read_window_scores(path: Path) -> WindowScores:
    with np.load(path, allow_pickle=False) as z:
        missing = {"split", "subset", "video_id", "label", "scores", "weights"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: not a window score file (no {sorted(missing)})")
        w = WindowScores(
            z["split"].tolist(),
            z["subset"].tolist(),
            z["video_id"].tolist(),
            z["label"],
            z["scores"],
            z["weights"],
        )
    n = len(w.video_id)
    if w.scores.ndim != 3 or len(w.scores) != n or w.scores.shape[1] != len(w.weights):
        raise ValueError(
            f"{path}: scores {w.scores.shape} do not match {n} rows and {len(w.weights)} windows"
        )
    return w


def load_window_scores(
    root: Path, models: list[tuple[str, str]]
) -> dict[tuple[str, str], WindowScores]:
    """``root/<head>-<name>/window_scores.npz`` -> {(head, name): scores} for the ``models``
    that have one (heads without window scores write none)."""
    out = {}
    for head, name in models:
        path = Path(root) / f"{head}-{name}" / WINDOW_SCORES
        if path.is_file():
            out[(head, name)] = read_window_scores(path)
    return out
