"""probe.csv: what ``prepare`` learned of each video (frames, fps, size, content hash), read
back by ``decode``. The writer and the reader of the format, in one place."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("video_id", "frames", "fps", "width", "height", "duration", "sha256")


@dataclass(frozen=True)
class Probe:
    """One video as probed: its decodable frame count, fps, (width, height) and sha256."""

    frames: int
    fps: float
    width: int
    height: int
    sha256: str


def write_probes(path: Path, probes: dict[str, Probe]) -> None:
    """One row per video, sorted by id (the same probes give the same bytes); utf-8 whatever the
    locale, since ids hold any Unicode letter."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for vid in sorted(probes):
            p = probes[vid]
            dur = p.frames / p.fps if p.fps else 0.0
            w.writerow([vid, p.frames, f"{p.fps:.3f}", p.width, p.height, f"{dur:.3f}", p.sha256])


def read_probes(path: Path) -> dict[str, Probe]:
    """{video id: Probe} of a probe.csv written by ``write_probes``."""
    with path.open(newline="", encoding="utf-8") as fh:
        return {
            r["video_id"]: Probe(
                frames=int(r["frames"]),
                fps=float(r["fps"]),
                width=int(r["width"]),
                height=int(r["height"]),
                sha256=r["sha256"],
            )
            for r in csv.DictReader(fh)
        }
