"""predict's inputs and outputs: the list of videos (paths, a folder, a CSV) and the
predictions as CSV and JSON."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from pipeline.datasets import VIDEO_EXTENSIONS
from pipeline.predict import TOP_K, Prediction


def folder_videos(folder: Path) -> list[Path]:
    """Every file under ``folder`` with a video extension, sorted; ValueError when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    found = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
    )
    if not found:
        raise ValueError(f"{folder}: no video file ({', '.join(VIDEO_EXTENSIONS)})")
    return found


def csv_videos(path: Path) -> list[Path]:
    """The ``path`` column of a CSV (or its first column without that header), relative paths
    taken from the CSV's folder; ValueError naming the file when it lists none."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and r[0].strip()]
    if rows and "path" in rows[0]:
        col, rows = rows[0].index("path"), rows[1:]
    else:
        col = 0
    videos = [Path(r[col].strip()) for r in rows if len(r) > col]
    if not videos:
        raise ValueError(f"{path}: lists no video")
    return [v if v.is_absolute() else path.parent / v for v in videos]


def csv_columns(streams: Sequence[str]) -> list[str]:
    cols = ["path", "status", "reason", "head", "fusion", "splits", "label", "probability"]
    for k in range(1, TOP_K + 1):
        cols += [f"top{k}", f"top{k}_probability"]
    for s in streams:
        cols += [f"{s}_label", f"{s}_probability"]
    return cols


def write_predictions(predictions: Sequence[Prediction], out: Path) -> tuple[Path, Path]:
    """``out``/predictions.csv (one row per video; probabilities with 6 significant digits)
    and ``out``/predictions.json (the same, full precision) -> their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [p.as_json() for p in predictions]
    streams = sorted(
        {s for r in rows for s in r.get("streams", {})}, key=lambda s: (s.count("+"), s)
    )
    with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(csv_columns(streams))
        for r in rows:
            line = [r["path"], r["status"], r["reason"], r["head"], r["fusion"]]
            line.append("+".join(r["splits"]))
            ok = r["status"] == "ok"
            line += [r["label"], f"{r['probability']:.6g}"] if ok else ["", ""]
            top = r.get("top5", [])
            for k in range(TOP_K):
                line += (
                    [top[k]["class"], f"{top[k]['probability']:.6g}"] if k < len(top) else ["", ""]
                )
            for s in streams:
                st = r.get("streams", {}).get(s)
                line += [st["label"], f"{st['probability']:.6g}"] if st else ["", ""]
            w.writerow(line)
    (out / "predictions.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return out / "predictions.csv", out / "predictions.json"
