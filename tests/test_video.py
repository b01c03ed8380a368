"""Tests for pipeline/video.py: the sampling plan, probing, decoding and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.video import (
    Decoding,
    SamplePlan,
    VideoDecodeError,
    clip_windows,
    dense_plan,
    probe,
    read_frames,
    sample_plan,
)

# -- sample_plan ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "big_n", "ell"), [(164, 25, 5), (32, 25, 5), (30, 25, 5), (7, 3, 1)])
def test_plan_windows_fit_inside_the_video(n: int, big_n: int, ell: int) -> None:
    plan = sample_plan(n, num_points=big_n, pairs=ell)
    assert not plan.looped
    assert plan.points.shape == (big_n,)
    assert plan.windows.shape == (big_n, ell + 1)
    assert plan.points.min() >= 0 and plan.points.max() < n - ell
    # Each window is L+1 consecutive frames starting at its point, and all of them exist.
    np.testing.assert_array_equal(plan.windows, plan.points[:, None] + np.arange(ell + 1))
    assert plan.windows.max() < n
    assert np.all(np.diff(plan.points) >= 0)


def test_plan_points_spread_uniformly() -> None:
    n, big_n, ell = 164, 25, 5
    plan = sample_plan(n, num_points=big_n, pairs=ell)
    # Exactly one point in each of the N equal segments of the usable span [0, n - L).
    segment = np.floor(plan.points / ((n - ell) / big_n)).astype(int)
    assert segment.tolist() == list(range(big_n))
    gaps = np.diff(plan.points)
    assert set(gaps.tolist()) <= {6, 7}  # 159 / 25 = 6.36


def test_plan_loops_a_video_shorter_than_n_points() -> None:
    plan = sample_plan(3, num_points=25, pairs=5)
    assert plan.looped
    assert plan.points.tolist() == [i % 3 for i in range(25)]
    assert plan.windows[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert plan.windows[1].tolist() == [1, 2, 0, 1, 2, 0]
    np.testing.assert_array_equal(plan.windows, (plan.points[:, None] + np.arange(6)) % 3)
    assert plan.windows.max() < 3
    assert plan.needed().tolist() == [0, 1, 2]


def test_plan_loops_when_a_window_cannot_fit() -> None:
    plan = sample_plan(5, num_points=3, pairs=5)  # n >= N but n <= L
    assert plan.looped
    assert plan.windows.max() < 5
    assert plan.windows[0].tolist() == [0, 1, 2, 3, 4, 0]


def test_plan_rejects_an_empty_video() -> None:
    with pytest.raises(ValueError, match="no frames"):
        sample_plan(0, num_points=25, pairs=5)


def test_pairs_dedupe_overlapping_windows() -> None:
    plan = sample_plan(32, num_points=25, pairs=5)
    pairs = plan.pairs()
    # Windows start at 0..26 and overlap: the 125 pairs they contain are the 31 pairs (k, k+1).
    assert pairs.shape == (31, 2)
    np.testing.assert_array_equal(pairs, np.stack([np.arange(31), np.arange(1, 32)], axis=1))
    assert plan.needed().tolist() == list(range(32))


def test_pairs_of_a_looped_plan_join_last_to_first() -> None:
    pairs = {tuple(p) for p in sample_plan(3, num_points=25, pairs=5).pairs().tolist()}
    assert pairs == {(0, 1), (1, 2), (2, 0)}


def test_needed_is_sorted_unique() -> None:
    plan = SamplePlan(
        frames=10,
        points=np.array([4, 1]),
        windows=np.array([[4, 5, 6], [1, 2, 3]]),
        looped=False,
    )
    assert plan.needed().tolist() == [1, 2, 3, 4, 5, 6]


# -- probe and read_frames on real clips ------------------------------------------------------


def test_probe_test_avi(videos: Path) -> None:
    info = probe(videos / "test.avi")
    assert (info.frames, info.width, info.height) == (164, 320, 240)
    assert info.fps == pytest.approx(25.0)
    assert info.duration == pytest.approx(164 / 25)


def test_read_frames_is_rgb_uint8_with_short_side_resized(videos: Path) -> None:
    frames = read_frames(
        videos / "test.avi", np.array([0, 10, 20]), decoding=Decoding(short_side=60)
    )
    assert frames.dtype == np.uint8
    assert frames.shape == (3, 60, 80, 3)  # 320x240 -> 80x60, aspect kept
    full = read_frames(videos / "test.avi", np.array([10]))
    assert full.shape == (1, 240, 320, 3)


def test_read_frames_is_rgb_not_bgr(videos: Path) -> None:
    import cv2

    path = videos / "test.avi"
    cap = cv2.VideoCapture(str(path))
    ok, bgr = cap.read()
    cap.release()
    assert ok
    rgb = read_frames(path, np.array([0]))[0].astype(np.int16)
    # The channels differ on this clip, so a swapped order would be far off.
    assert np.abs(rgb - bgr[..., ::-1].astype(np.int16)).mean() < 3
    assert np.abs(rgb - bgr.astype(np.int16)).mean() > 3


def test_decoding_output_size_scales_the_probed_size_else_the_first_frames() -> None:
    assert Decoding(short_side=120, size=(320, 240)).output_size(640, 480) == (160, 120)
    assert Decoding(short_side=120).output_size(480, 640) == (120, 160)
    assert Decoding(short_side=120, size=(0, 0)).output_size(480, 640) == (120, 160)
    assert Decoding(size=(320, 240)).output_size(640, 480) == (320, 240)
    assert Decoding().output_size(640, 480) == (640, 480)


def test_read_frames_honours_repeated_and_unsorted_indices(videos: Path) -> None:
    path = videos / "test.avi"
    got = read_frames(path, np.array([163, 0, 5, 5]), decoding=Decoding(short_side=60))
    ref = read_frames(path, np.array([0, 5, 163]), decoding=Decoding(short_side=60))
    assert got.shape == (4, 60, 80, 3)
    np.testing.assert_array_equal(got[0], ref[2])
    np.testing.assert_array_equal(got[1], ref[0])
    np.testing.assert_array_equal(got[2], ref[1])
    np.testing.assert_array_equal(got[3], ref[1])
    assert not np.array_equal(ref[0], ref[2])  # the frames themselves differ


def test_read_frames_out_of_range_names_the_file(videos: Path) -> None:
    path = videos / "test.avi"
    with pytest.raises(VideoDecodeError, match=r"frame 164 requested, video has 164") as e:
        read_frames(path, np.array([0, 164]))
    assert str(e.value).startswith(str(path))


def test_video_0_mov_has_three_frames(videos: Path) -> None:
    info = probe(videos / "video_0.mov")
    assert info.frames == 3
    plan = sample_plan(info.frames, num_points=25, pairs=5)
    assert plan.looped
    frames = read_frames(videos / "video_0.mov", plan.needed(), decoding=Decoding(short_side=32))
    assert frames.shape == (3, 32, 57, 3)  # 568x320 -> 57x32


def test_gif_is_decoded_like_any_video(videos: Path) -> None:
    path = videos / "v_CricketShot_g04_c01_rgb.gif"
    info = probe(path)
    assert (info.frames, info.width, info.height) == (79, 224, 224)
    frames = read_frames(path, np.array([78, 0, 78]), decoding=Decoding(short_side=32))
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[0], frames[2])
    assert not np.array_equal(frames[0], frames[1])


# -- errors: VideoDecodeError whose message starts with the path -------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.avi"
    text.write_text("this is not a video\n" * 20)
    return {"missing": tmp_path / "missing.avi", "empty": empty, "text": text, "dir": tmp_path}


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "no such file"),
        ("empty", "empty file"),
        ("text", "not a decodable video"),
        ("dir", "is a directory"),
    ],
)
def test_probe_errors_name_the_file(tmp_path: Path, kind: str, reason: str) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(VideoDecodeError, match=reason) as e:
        probe(path)
    assert str(e.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("missing", "no such file"), ("empty", "empty file"), ("text", "not a decodable video")],
)
def test_read_frames_errors_name_the_file(tmp_path: Path, kind: str, reason: str) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(VideoDecodeError, match=reason) as e:
        read_frames(path, np.array([0]))
    assert str(e.value).startswith(f"{path}: ")


def test_corrupted_video_is_refused_by_the_probe_and_by_reads(videos: Path) -> None:
    """corrupted.mp4's index claims 50 frames; its 29th packet fails to decode. The probe
    decodes every frame, so it refuses the file (prepare records it); a read that reaches the
    damage refuses it too, naming where it failed."""
    path = videos / "corrupted.mp4"
    with pytest.raises(VideoDecodeError, match=r"decoding failed after 28 frames \(Invalid data"):
        probe(path)
    with pytest.raises(VideoDecodeError, match="decoding failed after 28 frames") as e:
        read_frames(path, np.array([0, 40]), decoding=Decoding(short_side=32))
    assert str(e.value).startswith(f"{path}: ")
    # frames before the damage decode: a read that stops before it is not refused
    assert read_frames(path, np.array([0, 27]), decoding=Decoding(short_side=32)).shape == (
        2,
        32,
        57,
        3,
    )


@pytest.mark.parametrize("indices", [[], [-1, 0]])
def test_read_frames_rejects_empty_or_negative_indices(videos: Path, indices: list[int]) -> None:
    with pytest.raises(ValueError, match="test.avi: frame indices"):
        read_frames(videos / "test.avi", np.array(indices, dtype=np.int64))


@pytest.mark.parametrize("frames", [17, 32, 33, 39, 40, 187])
def test_clip_windows_give_res_lstm_k_v(frames: int) -> None:
    w = clip_windows(frames, length=16, stride=8)
    # Res-LSTM sec. 3.1: K_v = floor(l_v / r) - 1 clips of s = 16 frames with stride r = 8
    assert w.shape == (frames // 8 - 1, 16)
    assert (w[:, 0] == np.arange(len(w)) * 8).all()
    assert (np.diff(w, axis=1) == 1).all()
    assert w.max() < frames


def test_clip_windows_mrrn_caps_at_max_clips_and_loops_short_videos() -> None:
    w = clip_windows(400, length=30, stride=8, max_clips=20)
    assert w.shape == (20, 30) and w[-1, 0] == 19 * 8
    short = clip_windows(12, length=30, stride=8, max_clips=20)
    assert short.shape == (1, 30)
    assert short[0].tolist() == [i % 12 for i in range(30)]


def test_clip_windows_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no frames"):
        clip_windows(0, length=16, stride=8)
    with pytest.raises(ValueError, match=">= 1"):
        clip_windows(10, length=16, stride=0)


def test_dense_plan_takes_every_consecutive_pair_once() -> None:
    p = dense_plan(6)
    assert p.points.tolist() == [0, 1, 2, 3, 4]
    assert p.pairs().tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
    assert not p.looped
    one = dense_plan(1)
    assert one.looped and one.windows.tolist() == [[0, 0]]


# -- resize: in the decoder (default) or with OpenCV after decoding -----------------------------


def test_the_decoder_resize_is_close_to_opencv_area_resize(videos: Path) -> None:
    """FFmpeg's scaler (area averaging) and cv2's INTER_AREA give the same size and
    nearly the same pixels: a few grey levels apart, where a different frame is tens apart."""
    path, idx = videos / "test.avi", np.array([0, 80, 163])
    dec = read_frames(path, idx, decoding=Decoding(short_side=120, resize="decoder")).astype(
        np.int16
    )
    ocv = read_frames(path, idx, decoding=Decoding(short_side=120, resize="opencv")).astype(
        np.int16
    )
    assert dec.shape == ocv.shape == (3, 120, 160, 3)
    for i in range(3):
        assert np.abs(dec[i] - ocv[i]).mean() < 3
    assert np.abs(dec[0] - ocv[2]).mean() > 10
    assert not np.array_equal(dec, ocv)  # the decoder did the resizing


def test_the_probed_size_spares_an_open_and_changes_nothing(videos: Path) -> None:
    path, idx = videos / "flipping_a_pancake.mkv", np.array([3, 1, 3])
    known = read_frames(path, idx, decoding=Decoding(short_side=128, size=(426, 240)))
    assert known.shape == (3, 128, 227, 3)  # 426x240 -> 227x128
    np.testing.assert_array_equal(known, read_frames(path, idx, decoding=Decoding(short_side=128)))
    np.testing.assert_array_equal(
        known, read_frames(path, idx, decoding=Decoding(short_side=128, size=(0, 0)))
    )


def test_no_resize_at_the_native_short_side(videos: Path) -> None:
    path, idx = videos / "test.avi", np.array([5])
    full = read_frames(path, idx)
    np.testing.assert_array_equal(
        read_frames(path, idx, decoding=Decoding(short_side=240, resize="decoder")), full
    )
    np.testing.assert_array_equal(
        read_frames(path, idx, decoding=Decoding(short_side=240, resize="opencv")), full
    )


# -- memory and damaged files ---------------------------------------------------------------------


def _write_big(path: Path, frames: int = 40, size: tuple[int, int] = (1280, 720)) -> None:
    import av

    w, h = size
    with av.open(str(path), "w", format="avi") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for k in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[:, (k * 16) % w :] = 200
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode(None))


@pytest.mark.parametrize("resize", ["decoder", "opencv"])
def test_reading_keeps_only_the_planned_frames_at_the_output_size(
    tmp_path: Path, resize: str
) -> None:
    """40 frames of 1280x720 are 110 MB as RGB; reading them all at short side 64 holds the
    40 small frames (1 MB) and at most a full-size frame or two, never the whole video."""
    import tracemalloc

    path = tmp_path / "big.avi"
    _write_big(path)
    tracemalloc.start()
    try:
        frames = read_frames(path, np.arange(40), decoding=Decoding(short_side=64, resize=resize))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frames.shape == (40, 64, 114, 3)
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_a_damaged_file_is_refused_the_same_way_every_time(tmp_path: Path, videos: Path) -> None:
    """Bytes flipped inside test.avi: the decoder conceals the damage and flags the frames.
    The file is refused, with the first damaged frame, by the probe and by a read that reaches
    it; frames before the damage still read, the same bytes each time."""
    data = bytearray((videos / "test.avi").read_bytes())
    rng = np.random.default_rng(0)
    for k in rng.integers(len(data) // 2, len(data), 40):
        data[k] ^= 0xFF
    path = tmp_path / "damaged.avi"
    path.write_bytes(bytes(data))
    errors = set()
    for _ in range(2):
        with pytest.raises(VideoDecodeError, match="is damaged") as e:
            probe(path)
        errors.add(str(e.value))
        with pytest.raises(VideoDecodeError, match="is damaged") as e:
            read_frames(path, np.array([0, 163]), decoding=Decoding(short_side=32))
        errors.add(str(e.value))
    assert len(errors) == 1, errors
    (msg,) = errors
    first_bad = int(msg.split("frame ")[1].split()[0])
    assert msg.startswith(f"{path}: frame ") and first_bad > 0
    a = read_frames(path, np.arange(first_bad), decoding=Decoding(short_side=32))
    np.testing.assert_array_equal(
        a, read_frames(path, np.arange(first_bad), decoding=Decoding(short_side=32))
    )
