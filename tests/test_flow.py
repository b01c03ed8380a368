"""Tests for pipeline/flow.py: quantisation, the two flow algorithms, flow stacks of a video."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import FlowConfig
from pipeline.flow import dequantise, flow_settings, make_flow_fn, quantise, video_flow
from pipeline.video import SamplePlan, read_frames, sample_plan

# -- quantisation -----------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [20.0, 5.0])
def test_quantise_round_trip_error_is_at_most_half_a_step(bound: float) -> None:
    flow = np.random.default_rng(0).uniform(-bound, bound, (64, 64, 2)).astype(np.float32)
    q = quantise(flow, bound)
    assert q.dtype == np.uint8
    back = dequantise(q, bound)
    assert back.dtype == np.float32
    err = np.abs(back - flow).max()
    assert err <= bound / 255 + 1e-5
    assert err > bound / 255 / 4  # not a lossless cast either: 256 levels over 2 * bound


def test_quantise_clips_at_the_bound() -> None:
    bound = 20.0
    flow = np.array([-1000.0, -20.0, -20.5, 0.0, 20.0, 20.5, 1000.0], dtype=np.float32)
    q = quantise(flow, bound)
    assert q.tolist() == [0, 0, 0, 128, 255, 255, 255]
    assert dequantise(np.array([0, 255], dtype=np.uint8), bound).tolist() == [-20.0, 20.0]


def test_quantise_is_monotone() -> None:
    flow = np.linspace(-25, 25, 1001)
    assert np.all(np.diff(quantise(flow, 20.0).astype(int)) >= 0)


# -- flow algorithms --------------------------------------------------------------------------


def _shifted_texture(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 64x64 grey frames of a smooth random texture; the second moved right by ``shift``."""
    noise = np.random.default_rng(1).uniform(0, 255, (20, 20)).astype(np.float32)
    tex = np.clip(cv2.resize(noise, (80, 80), interpolation=cv2.INTER_CUBIC), 0, 255)
    tex = tex.astype(np.uint8)
    return tex[8:72, 8:72].copy(), tex[8:72, 8 - shift : 72 - shift].copy()


@pytest.mark.parametrize("algorithm", ["tvl1", "tvl1_fast", "farneback"])
@pytest.mark.parametrize("shift", [3, -3])
def test_flow_recovers_a_horizontal_shift(algorithm: str, shift: int) -> None:
    a, b = _shifted_texture(shift)
    flow = make_flow_fn(FlowConfig(algorithm=algorithm))(a, b)
    assert flow.shape == (64, 64, 2) and flow.dtype == np.float32
    inner = flow[8:-8, 8:-8]  # borders see texture entering the frame
    mean_x, mean_y = inner[..., 0].mean(), inner[..., 1].mean()
    assert np.sign(mean_x) == np.sign(shift)
    assert abs(mean_x) == pytest.approx(abs(shift), rel=0.25)
    assert abs(mean_y) < 0.3


def test_make_flow_fn_rejects_an_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="unknown 'raft'.*tvl1.*farneback"):
        make_flow_fn(FlowConfig(algorithm="raft"))


# -- video_flow -------------------------------------------------------------------------------

FARNEBACK = FlowConfig(algorithm="farneback")


@pytest.fixture(scope="module")
def part_0(videos: Path) -> Path:
    return videos / "part_0.mp4"


def test_video_flow_shape_and_dtype(part_0: Path) -> None:
    plan = sample_plan(32, num_points=4, pairs=2)
    out = video_flow(part_0, plan, FARNEBACK, short_side=32)
    assert out.dtype == np.uint8
    assert out.shape == (4, 2, 2, 32, 42)  # 340x256 -> 42x32
    assert out.std() > 0  # a real clip moves somewhere


def test_video_flow_entry_is_the_flow_of_its_frame_pair(part_0: Path) -> None:
    plan = sample_plan(32, num_points=4, pairs=2)
    out = video_flow(part_0, plan, FARNEBACK, short_side=32)
    i, j = 2, 1
    a, b = plan.windows[i, j], plan.windows[i, j + 1]
    rgb = read_frames(part_0, np.array([a, b]), short_side=32)
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]
    expected = quantise(make_flow_fn(FARNEBACK)(grey[0], grey[1]), FARNEBACK.bound)
    np.testing.assert_array_equal(out[i, j, 0], expected[..., 0])  # x first
    np.testing.assert_array_equal(out[i, j, 1], expected[..., 1])  # then y


def test_video_flow_shared_pairs_get_identical_entries(part_0: Path) -> None:
    windows = np.array([[0, 1, 2, 3], [2, 3, 4, 5], [10, 11, 12, 13]])
    plan = SamplePlan(frames=32, points=windows[:, 0], windows=windows, looped=False)
    out = video_flow(part_0, plan, FARNEBACK, short_side=32)
    assert out.shape == (3, 3, 2, 32, 42)
    np.testing.assert_array_equal(out[0, 2], out[1, 0])  # pair (2, 3) appears in both windows
    assert not np.array_equal(out[0, 0], out[2, 0])  # different pairs, different flow


def test_video_flow_of_a_looped_video_has_every_window(videos: Path) -> None:
    plan = sample_plan(3, num_points=4, pairs=2)
    out = video_flow(videos / "video_0.mov", plan, FARNEBACK, short_side=32)
    assert out.shape == (4, 2, 2, 32, 57)
    # Windows 0 and 3 are both [0, 1, 2] (points 0, 1, 2, 0).
    np.testing.assert_array_equal(out[0], out[3])


# -- flow_settings ----------------------------------------------------------------------------


def test_flow_settings_keep_only_what_determines_the_values() -> None:
    tvl1 = flow_settings(FlowConfig(algorithm="tvl1", workers=7))
    assert set(tvl1) == {"algorithm", "bound", "tvl1"}
    assert tvl1["tvl1"]["lambda_"] == pytest.approx(0.15)
    farneback = flow_settings(FlowConfig(algorithm="farneback", workers=7))
    assert set(farneback) == {"algorithm", "bound", "farneback"}
    # workers never changes the values, so it must not change the cache identity either.
    assert flow_settings(FlowConfig(workers=1)) == flow_settings(FlowConfig(workers=8))
    assert flow_settings(FlowConfig(bound=10)) != flow_settings(FlowConfig(bound=20))


def test_tvl1_fast_is_the_tvl1_block_with_the_preset_applied() -> None:
    cfg = FlowConfig(algorithm="tvl1_fast")
    s = flow_settings(cfg)["tvl1"]
    assert (s["scales"], s["warps"], s["inner_iterations"], s["outer_iterations"]) == (3, 1, 10, 5)
    assert s["tau"] == cfg.tvl1.tau  # untouched keys come from the block
    assert flow_settings(cfg) != flow_settings(FlowConfig(algorithm="tvl1"))


def test_tvl1_fast_is_close_to_tvl1() -> None:
    a, b = _shifted_texture(2)
    slow = make_flow_fn(FlowConfig(algorithm="tvl1"))(a, b)
    fast = make_flow_fn(FlowConfig(algorithm="tvl1_fast"))(a, b)
    epe = np.linalg.norm(slow - fast, axis=2)[8:-8, 8:-8].mean()
    assert epe < 0.2, epe
