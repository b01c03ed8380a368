"""Tests for pipeline/plan.py: the decode plan's settings, identity and old-plan reading."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import prepare_tiny_demo

from pipeline.config import DecodeConfig
from pipeline.plan import Plan, PlannedVideo, read_plan, write_plan
from stages import decode


def _video(path: Path, **kw: object) -> PlannedVideo:
    return PlannedVideo("v", str(path), 12, False, [0, 4, 8], "ab" * 32, **kw)


def test_the_decode_stage_records_each_videos_size_and_the_resize(tiny_demo: Path) -> None:
    plan = read_plan(tiny_demo / "decode/plan.json")
    assert plan.settings.resize == "decoder"
    assert {v.size for v in plan.videos.values()} == {(32, 32)}
    assert plan.identity() == {
        "num_frames": 8, "flow_pairs": 2, "short_side": 32, "resize": "decoder"
    }  # fmt: skip


def test_a_plan_from_before_the_resize_setting_reads_as_opencv(tmp_path: Path) -> None:
    """Plans (and the caches that record their identity) written when frames were always
    resized with OpenCV keep meaning that, and keep the identity they had."""
    write_plan(tmp_path / "plan.json", Plan(DecodeConfig(resize="opencv"), {"v": _video(tmp_path)}))
    data = json.loads((tmp_path / "plan.json").read_text())
    del data["settings"]["resize"]
    for v in data["videos"].values():
        del v["width"], v["height"]
    (tmp_path / "plan.json").write_text(json.dumps(data))
    old = read_plan(tmp_path / "plan.json")
    assert old.settings.resize == "opencv"
    assert old.videos["v"].size == (0, 0)  # unknown: read_frames opens the video to learn it
    assert "resize" not in old.identity()
    assert old.identity() == {"num_frames": 25, "flow_pairs": 5, "short_side": 256}


def test_the_plan_round_trips_the_resize_and_sizes(tmp_path: Path) -> None:
    plan = Plan(DecodeConfig(), {"v": _video(tmp_path, width=320, height=240)})
    write_plan(tmp_path / "plan.json", plan)
    back = read_plan(tmp_path / "plan.json")
    assert back.settings == plan.settings and back.videos["v"].size == (320, 240)
    assert back.identity() != replace(plan, settings=DecodeConfig(resize="opencv")).identity()


def test_the_decode_stage_refuses_an_unknown_resize(tmp_path: Path) -> None:
    root = prepare_tiny_demo(tmp_path)
    with pytest.raises(ValueError, match="decode.resize: unknown 'cubic'"):
        decode.main(
            DecodeConfig(resize="cubic", workers=1),
            manifest=root / "prepare/manifest.csv",
            probe=root / "prepare/probe.csv",
            out=tmp_path / "dec2",
        )
    assert not (tmp_path / "dec2/plan.json").exists()
