"""Tests for pipeline/runner.py: the failures CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.runner import Failure, read_failures, write_failures


def test_failures_name_videos_inside_the_project_by_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clone at another path writes the same bytes (the reason carries the path the decoder
    was given, an absolute one); a video outside the project keeps its absolute path."""
    monkeypatch.chdir(tmp_path)
    inside = tmp_path / "data" / "raw" / "бег_01.avi"
    outside = Path("/elsewhere/x.avi")
    write_failures(
        tmp_path / "failures.csv",
        [
            Failure("b", str(inside), "prepare", f"{inside}: empty file (0 bytes)"),
            Failure("a", str(outside), "decode", f"{outside}: no such file"),
        ],
    )
    rows = read_failures(tmp_path / "failures.csv")
    assert [(r.video_id, r.path, r.reason) for r in rows] == [
        ("a", "/elsewhere/x.avi", "/elsewhere/x.avi: no such file"),
        ("b", "data/raw/бег_01.avi", "data/raw/бег_01.avi: empty file (0 bytes)"),
    ]
    assert str(tmp_path) not in (tmp_path / "failures.csv").read_text(encoding="utf-8")
