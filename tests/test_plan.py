"""Tests for pipeline/plan.py: the decode plan's settings, identity and old plans refused."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.config import DecodeConfig
from pipeline.plan import Plan, PlanError, PlannedVideo, decoding, read_plan, write_plan
from pipeline.video import Decoding, decoder_id


def _video(path: Path, width: int = 64, height: int = 48) -> PlannedVideo:
    return PlannedVideo("v", str(path), 12, False, [0, 4, 8], "ab" * 32, width, height)


@pytest.mark.slow  # tiny_demo runs the prepare and decode stages
def test_the_decode_stage_records_each_videos_size_and_the_resize(tiny_demo: Path) -> None:
    plan = read_plan(tiny_demo / "decode/plan.json")
    assert plan.settings.resize == "decoder"
    assert {v.size for v in plan.videos.values()} == {(32, 32)}
    assert plan.identity() == {
        "num_frames": 8, "flow_pairs": 2, "short_side": 32, "resize": "decoder",
        "sampling": "points", "decoder": decoder_id(),
    }  # fmt: skip
    assert decoder_id().startswith("pyav ")


@pytest.mark.parametrize("made_by", [None, "pyav 0.0.1 sequential (libavcodec 1.2.3)"])
def test_a_plan_from_another_decoder_is_refused(tmp_path: Path, made_by: str | None) -> None:
    """A plan from before frame-exact decoding (decord, no decoder recorded) or from another
    decoder version: its frame counts and frames came from that decoder, so the stages that
    read it stop and say to re-run decode, rather than mixing two decoders' frames."""
    write_plan(tmp_path / "plan.json", Plan(DecodeConfig(), {"v": _video(tmp_path)}))
    data = json.loads((tmp_path / "plan.json").read_text())
    if made_by is None:
        del data["decoder"], data["format"]
    else:
        data["decoder"] = made_by
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="run the decode stage again") as e:
        read_plan(tmp_path / "plan.json")
    assert str(e.value).startswith(f"{tmp_path / 'plan.json'}: made by decoder ")
    assert (made_by or "decord") in str(e.value)


def test_the_decoder_is_part_of_the_identity(tmp_path: Path) -> None:
    plan = Plan(DecodeConfig(), {"v": _video(tmp_path)})
    other = replace(plan, decoder="pyav 0.0.1 sequential (libavcodec 1.2.3)")
    assert plan.identity()["decoder"] == decoder_id()
    assert plan.identity() != other.identity()


def test_the_plan_round_trips_the_resize_and_sizes(tmp_path: Path) -> None:
    plan = Plan(DecodeConfig(), {"v": _video(tmp_path, 320, 240)})
    write_plan(tmp_path / "plan.json", plan)
    back = read_plan(tmp_path / "plan.json")
    assert back.settings == plan.settings and back.videos["v"].size == (320, 240)
    assert back.identity() != replace(plan, settings=DecodeConfig(resize="opencv")).identity()


def test_a_planned_video_is_read_with_every_decode_setting_and_its_probed_size(
    tmp_path: Path,
) -> None:
    """The one object every reader gets: short side and resize from the plan's settings (a
    caller that passed only the short side once read with the default resize), and the size."""
    video = _video(tmp_path, 320, 240)
    settings = DecodeConfig(short_side=64, resize="opencv")
    assert video.decoding(settings) == Decoding(short_side=64, resize="opencv", size=(320, 240))
    assert decoding(settings) == Decoding(short_side=64, resize="opencv", size=None)
    # 3 windows of 3 frames in 12 frames: centres of 3 segments of the first 10
    samples = video.samples(replace(settings, num_frames=3, flow_pairs=2))
    assert samples.points.tolist() == [1, 5, 8] and not samples.looped


@pytest.mark.slow  # runs the flow stage's command
def test_the_flow_stage_refuses_a_plan_from_another_decoder_in_one_line(
    tiny_demo: Path, tmp_path: Path
) -> None:
    """The stage command stops before opening any cache, with the file and what to do."""
    data = json.loads((tiny_demo / "decode/plan.json").read_text())
    del data["decoder"], data["format"]
    old = tmp_path / "plan.json"
    old.write_text(json.dumps(data))
    run = subprocess.run(
        [sys.executable, "-m", "stages.flow", "--plan", str(old), "--out", str(tmp_path / "flow")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"flow: {old}: made by decoder 'decord")
    assert "dvc repro decode" in last
    assert not (tmp_path / "flow").exists()


def test_a_plan_with_settings_no_longer_valid_is_refused_naming_it(tmp_path: Path) -> None:
    write_plan(tmp_path / "plan.json", Plan(DecodeConfig(), {"v": _video(tmp_path)}))
    data = json.loads((tmp_path / "plan.json").read_text())
    data["settings"]["short_side"] = 0
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="short_side") as e:
        read_plan(tmp_path / "plan.json")
    assert str(e.value).startswith(f"{tmp_path / 'plan.json'}: not a decode plan")
