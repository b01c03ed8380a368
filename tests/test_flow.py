"""Tests for pipeline/flow.py: quantisation, the OpenCV flow algorithms and RAFT, flow stacks of
a video, and the flow stage with RAFT."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import hub_server
import numpy as np
import pytest
import torch
from torchvision.models import optical_flow

from pipeline.backbones import WeightsError
from pipeline.cache import open_cache
from pipeline.config import ConfigError, DecodeConfig, FlowConfig, RaftConfig, build
from pipeline.fingerprint import file_sha256
from pipeline.flow import (
    _raft_model,
    dequantise,
    flow_settings,
    make_flow_fn,
    make_pairs_flow_fn,
    quantise,
    raft_model,
    raft_padding,
    video_flow,
)
from pipeline.plan import Plan, PlannedVideo, write_plan
from pipeline.video import Decoding, SamplePlan, probe, read_frames, sample_plan
from stages import flow as flow_stage

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


# -- video_flow -------------------------------------------------------------------------------

FARNEBACK = FlowConfig(algorithm="farneback")


@pytest.fixture(scope="module")
def part_0(videos: Path) -> Path:
    return videos / "part_0.mp4"


def test_video_flow_shape_and_dtype(part_0: Path) -> None:
    plan = sample_plan(32, num_points=4, pairs=2)
    out = video_flow(part_0, plan, FARNEBACK, decoding=Decoding(short_side=32))
    assert out.dtype == np.uint8
    assert out.shape == (4, 2, 2, 32, 42)  # 340x256 -> 42x32
    assert out.std() > 0  # a real clip moves somewhere


def test_video_flow_entry_is_the_flow_of_its_frame_pair(part_0: Path) -> None:
    plan = sample_plan(32, num_points=4, pairs=2)
    out = video_flow(part_0, plan, FARNEBACK, decoding=Decoding(short_side=32))
    i, j = 2, 1
    a, b = plan.windows[i, j], plan.windows[i, j + 1]
    rgb = read_frames(part_0, np.array([a, b]), decoding=Decoding(short_side=32))
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]
    expected = quantise(make_flow_fn(FARNEBACK)(grey[0], grey[1]), FARNEBACK.bound)
    np.testing.assert_array_equal(out[i, j, 0], expected[..., 0])  # x first
    np.testing.assert_array_equal(out[i, j, 1], expected[..., 1])  # then y


def test_video_flow_shared_pairs_get_identical_entries(part_0: Path) -> None:
    windows = np.array([[0, 1, 2, 3], [2, 3, 4, 5], [10, 11, 12, 13]])
    plan = SamplePlan(frames=32, points=windows[:, 0], windows=windows, looped=False)
    out = video_flow(part_0, plan, FARNEBACK, decoding=Decoding(short_side=32))
    assert out.shape == (3, 3, 2, 32, 42)
    np.testing.assert_array_equal(out[0, 2], out[1, 0])  # pair (2, 3) appears in both windows
    assert not np.array_equal(out[0, 0], out[2, 0])  # different pairs, different flow


def test_video_flow_of_a_looped_video_has_every_window(videos: Path) -> None:
    plan = sample_plan(3, num_points=4, pairs=2)
    out = video_flow(videos / "video_0.mov", plan, FARNEBACK, decoding=Decoding(short_side=32))
    assert out.shape == (4, 2, 2, 32, 57)
    # Windows 0 and 3 are both [0, 1, 2] (points 0, 1, 2, 0).
    np.testing.assert_array_equal(out[0], out[3])


# -- flow_settings ----------------------------------------------------------------------------


# What flow_settings wrote before RAFT existed (data/flow/cache of the demo holds the tvl1 one):
# a different dict would start every existing TV-L1 / Farneback cache over.
TVL1_SETTINGS = {
    "algorithm": "tvl1",
    "bound": 20.0,
    "tvl1": {
        "tau": 0.25,
        "lambda_": 0.15,
        "theta": 0.3,
        "scales": 5,
        "warps": 5,
        "epsilon": 0.01,
        "inner_iterations": 30,
        "outer_iterations": 10,
        "scale_step": 0.5,
        "median_filtering": 5,
    },
}
FARNEBACK_SETTINGS = {
    "algorithm": "farneback",
    "bound": 20.0,
    "farneback": {
        "pyr_scale": 0.5,
        "levels": 3,
        "winsize": 15,
        "iterations": 3,
        "poly_n": 5,
        "poly_sigma": 1.2,
    },
}


def test_flow_settings_of_opencv_algorithms_are_unchanged_by_raft() -> None:
    assert flow_settings(FlowConfig(algorithm="tvl1", workers=7)) == TVL1_SETTINGS
    assert flow_settings(FlowConfig(algorithm="farneback", workers=7)) == FARNEBACK_SETTINGS
    # The raft block never enters an OpenCV identity.
    other_raft = FlowConfig(raft=RaftConfig(weights="nowhere.pth", iterations=3))
    assert flow_settings(other_raft) == TVL1_SETTINGS


def test_flow_settings_keep_only_what_determines_the_values() -> None:
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


# -- RAFT -------------------------------------------------------------------------------------
# These tests run seeded random weights (flow.raft.weights: none, or files of random weights):
# they check shapes, padding, batching, weight loading and the cache identity, never flow
# quality. No test reaches the internet: the enum's URL is pointed at 127.0.0.1.

RAFT_SMALL = FlowConfig(
    algorithm="raft_small", raft=RaftConfig(weights="none", iterations=4, device="cpu")
)
RAFT_SMALL_DEFAULT = dataclasses.replace(
    RAFT_SMALL, raft=dataclasses.replace(RAFT_SMALL.raft, weights="default")
)


@pytest.fixture
def hub(tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty torch hub cache (so a developer's real one cannot change the results) and no
    RAFT model left over from an earlier test; yields its checkpoints folder (not created)."""
    # through monkeypatch, which restores torch's state, where torch.hub.set_dir(before) would
    # pin the hub dir for the rest of the session and hide TORCH_HOME from later tests
    checkpoints = hub_server.empty_hub(monkeypatch, tmp_path / "torch")
    _raft_model.cache_clear()
    try:
        yield checkpoints
    finally:
        _raft_model.cache_clear()


@pytest.fixture(scope="module")
def frames64(part_0: Path) -> np.ndarray:
    """Frames 0 and 2 of part_0.mp4 -> (2, 64, 85, 3) uint8 RGB."""
    return read_frames(part_0, np.array([0, 2]), decoding=Decoding(short_side=64))


def _saved_raft(path: Path, name: str, seed: int) -> torch.nn.Module:
    """A randomly initialised RAFT (other weights than the seed-0 default) saved to ``path``."""
    torch.manual_seed(seed)
    model = getattr(optical_flow, name)(weights=None).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def _direct_flow(
    model: torch.nn.Module, a: np.ndarray, b: np.ndarray, iterations: int
) -> np.ndarray:
    """(H, W, 3) uint8 frames with H, W multiples of 8, >= 128 -> (H, W, 2): torchvision's RAFT
    called as its docs say (RGB in [-1, 1], the last prediction), with no padding of ours."""

    def x(f: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(f).permute(2, 0, 1)[None].float() / 127.5 - 1.0

    with torch.inference_mode():
        return model(x(a), x(b), num_flow_updates=iterations)[-1][0].permute(1, 2, 0).numpy()


def test_raft_padding_gives_multiples_of_8_of_at_least_128() -> None:
    assert raft_padding(60, 85) == (34, 34, 21, 22)  # 60x85 -> 128x128, frame in the middle
    assert raft_padding(136, 250) == (0, 0, 3, 3)  # 250 -> 256; 136 already fits
    assert raft_padding(128, 128) == (0, 0, 0, 0)


def test_raft_flow_of_an_unfit_size_is_the_crop_of_the_padded_flow(
    hub: Path, frames64: np.ndarray
) -> None:
    small = frames64[:, 2:62]  # (2, 60, 85, 3): neither side a multiple of 8, both under 128
    flow = make_pairs_flow_fn(RAFT_SMALL)(small[:1], small[1:])
    assert flow.shape == (1, 60, 85, 2) and flow.dtype == np.float32
    assert np.isfinite(flow).all() and flow.std() > 0
    # Edge-pad to 128x128 by hand (RAFT then needs no padding of ours) and crop the flow back.
    padded = np.pad(small, ((0, 0), (34, 34), (21, 22), (0, 0)), mode="edge")
    full = make_pairs_flow_fn(RAFT_SMALL)(padded[:1], padded[1:])
    np.testing.assert_allclose(flow, full[:, 34:94, 21:106], atol=1e-5)


def test_raft_loads_a_state_dict_file_and_names_it_in_the_identity(
    hub: Path, tmp_path: Path, frames64: np.ndarray
) -> None:
    path = tmp_path / "my_raft.pth"
    saved = _saved_raft(path, "raft_small", seed=1)
    cfg = dataclasses.replace(
        RAFT_SMALL, raft=dataclasses.replace(RAFT_SMALL.raft, weights=str(path))
    )
    assert flow_settings(cfg)["raft"] == {
        "iterations": 4,
        "weights": f"file my_raft.pth sha256:{file_sha256(path)[:16]}",
    }
    padded = np.pad(frames64, ((0, 0), (32, 32), (21, 22), (0, 0)), mode="edge")  # 128x128
    flow = make_pairs_flow_fn(cfg)(padded[:1], padded[1:])[0]
    np.testing.assert_allclose(flow, _direct_flow(saved, padded[0], padded[1], 4), atol=1e-5)
    seed0 = make_pairs_flow_fn(RAFT_SMALL)(padded[:1], padded[1:])[0]
    assert np.abs(flow - seed0).mean() > 0.1  # the file's weights, not the random default


def test_raft_weights_null_of_an_older_params_file_is_refused() -> None:
    """null used to mean "the hub file if there, else random"; it must not now pass silently as
    one of the explicit choices."""
    with pytest.raises(ConfigError, match=r"flow\.raft\.weights: expected a string, got None"):
        build(FlowConfig, {"raft": {"weights": None}}, where="params.yaml:flow")
    assert FlowConfig().raft.weights == "default"


def test_raft_weights_none_is_seeded_random_and_says_so(
    hub: Path, frames64: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.flow"):
        random_flow = make_pairs_flow_fn(RAFT_SMALL)(frames64[:1], frames64[1:])
    assert flow_settings(RAFT_SMALL)["raft"]["weights"] == "random (seed 0)"
    assert "RANDOM weights (flow.raft.weights: none" in caplog.text
    _raft_model.cache_clear()
    again = make_pairs_flow_fn(RAFT_SMALL)(frames64[:1], frames64[1:])
    np.testing.assert_array_equal(random_flow, again)  # seeded: a rebuilt model is the same


def test_raft_default_loads_torchvisions_file_prepared_in_the_hub_cache(
    hub: Path, frames64: np.ndarray
) -> None:
    """A file put under torchvision's name by hand is used as it is (torch checks the hash
    prefix in the name only while downloading), and its own sha256 is the identity."""
    path = hub / "raft_small_C_T_V2-01064c6d.pth"  # Raft_Small_Weights.DEFAULT's file name
    saved = _saved_raft(path, "raft_small", seed=1)
    identity = flow_settings(RAFT_SMALL_DEFAULT)["raft"]["weights"]
    assert identity == f"Raft_Small_Weights.C_T_V2 sha256:{file_sha256(path)[:16]}"
    model = raft_model(RAFT_SMALL_DEFAULT)
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_raft_default_without_the_file_or_network_stops_naming_file_url_and_folder(
    hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enum = optical_flow.Raft_Small_Weights.DEFAULT
    built: list[str] = []
    monkeypatch.setattr(optical_flow, "raft_small", lambda **kw: built.append("raft_small"))
    with hub_server.refusing() as base:
        url = f"{base}/{hub_server.file_name(enum)}"
        hub_server.point_at(monkeypatch, enum, url)
        for call in (flow_settings, make_pairs_flow_fn):
            start = time.perf_counter()
            with pytest.raises(WeightsError) as e:
                call(RAFT_SMALL_DEFAULT)
            assert time.perf_counter() - start < 5
            message = str(e.value)
            assert message.startswith(str(hub / "raft_small_C_T_V2-01064c6d.pth"))
            assert url in message and f"in {hub}/" in message
            assert "'flow.raft.weights: default'" in message
    assert built == []  # nothing random was built
    assert list(hub.iterdir()) == []


def test_raft_default_is_downloaded_into_the_hub_cache(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = tmp_path / "served"
    saved = _saved_raft(served / "staged.pth", "raft_small", seed=2)
    sha = file_sha256(served / "staged.pth")
    name = f"raft_small_C_T_V2-{sha[:8]}.pth"  # torchvision's naming: the sha256 prefix
    (served / "staged.pth").rename(served / name)
    with hub_server.serving(served) as base:
        hub_server.point_at(monkeypatch, optical_flow.Raft_Small_Weights.DEFAULT, f"{base}/{name}")
        identity = flow_settings(RAFT_SMALL_DEFAULT)["raft"]["weights"]
    assert identity == f"Raft_Small_Weights.C_T_V2 sha256:{sha[:16]}"
    assert (hub / name).read_bytes() == (served / name).read_bytes()
    model = raft_model(RAFT_SMALL_DEFAULT)  # from the hub cache now, server gone
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a state dict")


def _raft_large_state(path: Path) -> None:
    _saved_raft(path, "raft_large", seed=0)


def _resnet_like_state(path: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (None, "not found"),
        (_garbage, "not a loadable state dict"),
        (_raft_large_state, "does not fit raft_small"),
        (_resnet_like_state, "does not fit raft_small"),
    ],
)
def test_raft_refuses_a_bad_weights_file_naming_it(
    hub: Path, tmp_path: Path, write, reason
) -> None:  # noqa: ANN001
    path = tmp_path / "bad.pth"
    if write is not None:
        write(path)
    cfg = dataclasses.replace(RAFT_SMALL, raft=RaftConfig(weights=str(path), device="cpu"))
    with pytest.raises(WeightsError, match=re.escape(str(path)) + ".*" + reason):
        make_pairs_flow_fn(cfg)


def test_raft_settings_hold_what_changes_the_values_only(hub: Path) -> None:
    s = flow_settings(RAFT_SMALL)
    assert s == {
        "algorithm": "raft_small",
        "bound": 20.0,
        "raft": {"iterations": 4, "weights": "random (seed 0)"},
    }
    batch = dataclasses.replace(RAFT_SMALL.raft, batch_size=1, device="auto")
    assert flow_settings(dataclasses.replace(RAFT_SMALL, raft=batch, workers=3)) == s
    more = dataclasses.replace(RAFT_SMALL.raft, iterations=12)
    assert flow_settings(dataclasses.replace(RAFT_SMALL, raft=more)) != s
    assert flow_settings(dataclasses.replace(RAFT_SMALL, algorithm="raft_large")) != s


def _near(a: np.ndarray, b: np.ndarray) -> None:
    """uint8 flow equal up to rare one-step rounding flips: batched and single convolutions may
    sum in another order, and a last-bit difference can cross a quantisation boundary."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_raft_video_flow_batched_equals_pair_by_pair(hub: Path, part_0: Path) -> None:
    plan = sample_plan(32, num_points=4, pairs=2)  # 8 distinct pairs: batches of 3, 3, 2
    batched = dataclasses.replace(
        RAFT_SMALL, raft=dataclasses.replace(RAFT_SMALL.raft, batch_size=3)
    )
    single = dataclasses.replace(
        RAFT_SMALL, raft=dataclasses.replace(RAFT_SMALL.raft, batch_size=1)
    )
    out = video_flow(part_0, plan, batched, decoding=Decoding(short_side=32))
    assert out.dtype == np.uint8 and out.shape == (4, 2, 2, 32, 42)
    assert out.std() > 0
    _near(out, video_flow(part_0, plan, single, decoding=Decoding(short_side=32)))
    # Entry (i, j) is the flow from windows[i, j] to windows[i, j + 1], x then y.
    i, j = 2, 1
    a, b = plan.windows[i, j], plan.windows[i, j + 1]
    rgb = read_frames(part_0, np.array([a, b]), decoding=Decoding(short_side=32))
    expected = quantise(make_pairs_flow_fn(single)(rgb[:1], rgb[1:])[0], single.bound)
    _near(out[i, j], expected.transpose(2, 0, 1))
    assert not np.array_equal(out[i, j], out[i, j - 1])


# -- the flow stage with RAFT -----------------------------------------------------------------


@pytest.mark.slow  # runs the flow stage
def test_flow_stage_runs_raft_in_process_with_failures_recorded(
    hub: Path, videos: Path, tmp_path: Path
) -> None:
    settings = DecodeConfig(num_frames=3, flow_pairs=2, short_side=32, workers=1)
    planned = {}
    for vid, name in [("part_0", "part_0.mp4"), ("video_0", "video_0.mov")]:
        path = videos / name
        info = probe(path)
        s = sample_plan(info.frames, num_points=3, pairs=2)
        planned[vid] = PlannedVideo(
            vid, str(path), info.frames, s.looped, s.points.tolist(), file_sha256(path),
            info.width, info.height,
        )  # fmt: skip
    text = tmp_path / "notes.avi"
    text.write_text("this is a text file, not a video\n")
    planned["notes"] = PlannedVideo(
        "notes", str(text), 10, False, [0, 3, 6], file_sha256(text), 32, 32
    )
    write_plan(tmp_path / "plan.json", Plan(settings, planned))
    cfg = dataclasses.replace(RAFT_SMALL, workers=2)  # RAFT ignores workers: no process pool

    counts = flow_stage.main(cfg, plan_path=tmp_path / "plan.json", out=tmp_path / "flow")
    assert (counts.done, counts.skipped, counts.failed) == (2, 0, 1)
    # One model for both videos, built in this process (a pool would build it elsewhere).
    assert _raft_model.cache_info().misses == 1 and _raft_model.cache_info().hits >= 1
    failures = (tmp_path / "flow" / "failures.csv").read_text()
    assert "notes" in failures and "notes.avi" in failures
    with open_cache(tmp_path / "flow" / "cache", "r") as c:
        assert c.attrs["flow"] == flow_settings(cfg)
        assert c.keys() == ["part_0", "video_0"]
        for vid in ("part_0", "video_0"):
            p = planned[vid]
            want = video_flow(
                Path(p.path),
                sample_plan(p.frames, num_points=3, pairs=2),
                cfg,
                decoding=Decoding(short_side=32),
            )
            got = c.read(vid)
            assert got.dtype == np.uint8 and got.shape == want.shape and got.shape[:3] == (3, 2, 2)
            _near(got, want)

    again = flow_stage.main(cfg, plan_path=tmp_path / "plan.json", out=tmp_path / "flow")
    assert (again.done, again.skipped) == (0, 2)
