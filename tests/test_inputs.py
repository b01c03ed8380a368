"""Tests for pipeline/inputs.py: crops (centre, Res-LSTM's 10 crops), flow mirroring and
normalisation into network inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.inputs import (
    centre_crop,
    clip_input,
    crop_views,
    flow_clip_input,
    flow_input,
    n_views,
    rgb_input,
)


def test_centre_crop_takes_the_centre() -> None:
    x = np.arange(6 * 10).reshape(6, 10)
    c = centre_crop(x, 4)
    assert c.shape == (4, 4)
    assert c[0, 0] == x[1, 3]  # top = (6 - 4) // 2, left = (10 - 4) // 2
    with pytest.raises(ValueError, match="smaller than the crop"):
        centre_crop(x, 7)


def test_rgb_input_shape_crop_and_normalisation() -> None:
    frames = np.zeros((3, 40, 60, 3), dtype=np.uint8)
    frames[:, 4:36, 14:46] = (255, 0, 0)  # the centre 32x32 is pure red
    x = rgb_input(frames, crop=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], torch.ones(3, 32, 32))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(x[:, 1], -torch.ones(3, 32, 32))  # (0 - 0.25) / 0.25
    torch.testing.assert_close(x[:, 2], torch.zeros(3, 32, 32))


def test_flow_input_shape_and_channel_order() -> None:
    t, ell, h, w = 2, 5, 40, 50
    stacks = np.zeros((t, ell, 2, h, w), dtype=np.uint8)
    for j in range(ell):
        stacks[:, j, 0] = 10 * j  # x of pair j
        stacks[:, j, 1] = 10 * j + 5  # y of pair j
    x = flow_input(stacks, crop=32, mean=(0.0,) * 10, std=(1.0,) * 10)
    assert x.shape == (t, 2 * ell, 32, 32)
    # Channels are x0, y0, x1, y1, ...
    np.testing.assert_allclose(x[0, :, 0, 0].numpy() * 255, [0, 5, 10, 15, 20, 25, 30, 35, 40, 45])


# -- crops ------------------------------------------------------------------------------------


def test_crop_views_ten_crop_geometry() -> None:
    x = np.arange(6 * 8).reshape(6, 8)
    v = crop_views(x, 4, "ten_mean")
    assert v.shape == (10, 4, 4)
    # top-left, top-right, bottom-left, bottom-right, centre (top 1, left 2)
    for i, (r, c) in enumerate([(0, 0), (0, 4), (2, 0), (2, 4), (1, 2)]):
        np.testing.assert_array_equal(v[i], x[r : r + 4, c : c + 4])
        np.testing.assert_array_equal(v[5 + i], x[r : r + 4, c : c + 4][:, ::-1])
    assert v[1, 0, 0] == x[0, 4] and v[6, 0, 0] == x[0, 7]  # the mirror reverses W
    np.testing.assert_array_equal(crop_views(x, 4, "ten_axis"), v)
    # Leading axes are carried, the views go first.
    y = np.arange(2 * 3 * 6 * 8).reshape(2, 3, 6, 8)
    vy = crop_views(y, 4, "ten_axis")
    assert vy.shape == (10, 2, 3, 4, 4)
    np.testing.assert_array_equal(vy[3, 1, 2], y[1, 2, 2:6, 4:8])
    centre = crop_views(y, 4, "centre")
    assert centre.shape == (1, 2, 3, 4, 4)
    np.testing.assert_array_equal(centre[0], centre_crop(y, 4))
    assert [n_views(s) for s in ("centre", "ten_mean", "ten_axis")] == [1, 10, 10]


def test_crop_views_errors_name_the_sizes_and_the_scheme() -> None:
    x = np.zeros((6, 8))
    with pytest.raises(ValueError, match="frame 6x8 is smaller than the crop 7"):
        crop_views(x, 7, "ten_mean")
    with pytest.raises(ValueError, match="unknown crop scheme 'five'"):
        crop_views(x, 4, "five")


def test_rgb_input_centre_is_unchanged() -> None:
    """crops='centre' returns exactly what rgb_input returned before crops existed."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = rgb_input(frames, crop=32, mean=mean, std=std)
    old = centre_crop(frames.transpose(0, 3, 1, 2), 32)
    old = torch.from_numpy(np.ascontiguousarray(old)).float().div_(255.0)
    old = (old - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert torch.equal(x, old)
    assert torch.equal(rgb_input(frames, crop=32, mean=mean, std=std, crops="centre"), old)


def test_rgb_input_ten_crop_is_view_major() -> None:
    t = 3
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (t, 40, 50, 3), dtype=np.uint8)
    kw = {"crop": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    centre = rgb_input(frames, **kw)
    ten = rgb_input(frames, crops="ten_mean", **kw)
    assert ten.shape == (10 * t, 3, 32, 32)
    torch.testing.assert_close(ten[4 * t : 5 * t], centre)  # view 4 is the centre
    torch.testing.assert_close(ten[9 * t : 10 * t], centre.flip(-1))  # view 9 its mirror
    top_left = rgb_input(frames[:, :32, :32], **kw)
    torch.testing.assert_close(ten[:t], top_left)


def test_ten_crop_of_flow_negates_u_and_keeps_v() -> None:
    t, ell, h, w = 2, 3, 6, 8
    rng = np.random.default_rng(2)
    stacks = rng.integers(0, 256, (t, ell, 2, h, w), dtype=np.uint8)
    x = flow_input(stacks, crop=4, mean=(0.0,) * 6, std=(1.0,) * 6, crops="ten_axis")
    assert x.shape == (10 * t, 2 * ell, 4, 4)
    q = (x * 255).round().to(torch.int64).view(10, t, ell, 2, 4, 4).numpy()
    centre = stacks[..., 1:5, 2:6].astype(np.int64)
    np.testing.assert_array_equal(q[4], centre)  # unmirrored views are untouched
    np.testing.assert_array_equal(q[9, :, :, 0], 255 - centre[:, :, 0, :, ::-1])  # u -> -u
    np.testing.assert_array_equal(q[9, :, :, 1], centre[:, :, 1, :, ::-1])  # v kept
    top_right = stacks[..., 0:4, 4:8].astype(np.int64)
    np.testing.assert_array_equal(q[6, :, :, 0], 255 - top_right[:, :, 0, :, ::-1])
    # The centre view with crops="centre" is the same as view 4 of the ten.
    c = flow_input(stacks, crop=4, mean=(0.0,) * 6, std=(1.0,) * 6)
    torch.testing.assert_close(c, x[4 * t : 5 * t])


def test_255_minus_q_is_the_quantised_negated_flow() -> None:
    from pipeline.flow import quantise

    u = np.random.default_rng(3).uniform(-25, 25, 10_000).astype(np.float32)
    q, q_neg = quantise(u, 20.0), quantise(-u, 20.0)
    diff = q_neg.astype(int) - (255 - q.astype(int))
    # Equal except at exact rounding ties (zero flow among them), which are one level apart.
    assert np.abs(diff).max() <= 1 and np.mean(diff != 0) < 1e-3


def test_clip_input_puts_channels_before_time() -> None:
    k, s = 2, 4
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    windows = np.array([[0, 1, 2, 3], [2, 3, 4, 5]])  # clips of stride 2 share frames 2, 3
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    x = clip_input(frames, windows, crop=8, mean=mean, std=std)
    assert x.shape == (k, 3, s, 8, 8) and x.dtype == torch.float32
    for ch in range(3):
        expected = (frames[windows[1, 2], 1:9, 2:10, ch] / 255.0 - mean[ch]) / std[ch]
        np.testing.assert_allclose(x[1, ch, 2].numpy(), expected, rtol=1e-5, atol=1e-6)
    ten = clip_input(frames, windows, crop=8, mean=mean, std=std, crops="ten_mean")
    assert ten.shape == (10 * k, 3, s, 8, 8)
    torch.testing.assert_close(ten[4 * k : 5 * k], x)  # view-major: view 4 is the centre
    torch.testing.assert_close(ten[9 * k : 10 * k], x.flip(-1))


def _arithmetic(x: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """(N, C, ...) uint8 -> the per-element float32 arithmetic (x / 255 - m) / s."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = torch.tensor(mean, dtype=torch.float32).view(shape)
    s = torch.tensor(std, dtype=torch.float32).view(shape)
    return (torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0 - m) / s


@pytest.mark.parametrize("crops", ["centre", "ten_axis"])
def test_inputs_hold_the_bits_of_the_per_element_arithmetic(crops: str) -> None:
    """The table lookup gives exactly the float32 of (x / 255 - mean) / std on every element,
    for images, clips (built from shared frames) and flow stacks of 10 channels."""
    rng = np.random.default_rng(6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    frames = rng.integers(0, 256, (7, 20, 24, 3), dtype=np.uint8)
    views = crop_views(frames.transpose(0, 3, 1, 2), 16, crops)  # (V, T, 3, 16, 16)
    want = _arithmetic(views.reshape(-1, 3, 16, 16), mean, std)
    assert torch.equal(rgb_input(frames, crop=16, mean=mean, std=std, crops=crops), want)

    windows = np.array([[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 0]])
    clips = frames[windows].transpose(0, 4, 1, 2, 3)  # (K, 3, s, H, W), frames repeated
    want = _arithmetic(crop_views(clips, 16, crops).reshape(-1, 3, 4, 16, 16), mean, std)
    got = clip_input(frames, windows, crop=16, mean=mean, std=std, crops=crops)
    assert torch.equal(got, want)

    stacks = rng.integers(0, 256, (3, 5, 2, 20, 24), dtype=np.uint8)
    fm, fs = tuple(rng.uniform(0.3, 0.7, 10)), tuple(rng.uniform(0.1, 0.3, 10))
    views = crop_views(stacks.reshape(3, 10, 20, 24), 16, crops).copy()
    if crops != "centre":
        views[5:, :, 0::2] = 255 - views[5:, :, 0::2]  # mirrored views negate u
    want = _arithmetic(views.reshape(-1, 10, 16, 16), fm, fs)
    assert torch.equal(flow_input(stacks, crop=16, mean=fm, std=fs, crops=crops), want)


def test_inputs_come_channels_last_in_memory() -> None:
    """The network runs channels-last: inputs already in that layout cost the main process no
    copy (``contiguous(memory_format=...)`` returns the tensor itself)."""
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)
    kw = {"crop": 16, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    x = rgb_input(frames, **kw)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x.contiguous(memory_format=torch.channels_last) is x
    c = clip_input(frames, np.array([[0, 1, 2, 3], [2, 3, 4, 5]]), **kw)
    assert c.is_contiguous(memory_format=torch.channels_last_3d)
    stacks = rng.integers(0, 256, (3, 5, 2, 20, 24), dtype=np.uint8)
    f = flow_input(stacks, crop=16, mean=(0.5,) * 10, std=(0.25,) * 10)
    assert f.is_contiguous(memory_format=torch.channels_last)


def test_rgb_input_index_takes_frames_from_the_distinct_ones() -> None:
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    index = np.array([0, 1, 2, 1, 2, 3, 2, 3, 4])
    kw = {"crop": 16, "mean": (0.5,) * 3, "std": (0.25,) * 3, "crops": "ten_axis"}
    assert torch.equal(rgb_input(frames, index=index, **kw), rgb_input(frames[index], **kw))


def test_inputs_refuse_float_frames_and_a_wrong_channel_count() -> None:
    frames = np.zeros((2, 20, 24, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="made from uint8"):
        rgb_input(frames.astype(np.float32), crop=16, mean=(0,) * 3, std=(1,) * 3)
    with pytest.raises(ValueError, match="3 input channels, but 2 means"):
        rgb_input(frames, crop=16, mean=(0, 0), std=(1, 1))


def test_flow_clip_input_shape_and_mirroring() -> None:
    k, s = 2, 4
    rng = np.random.default_rng(5)
    flow = rng.integers(0, 256, (k, s, 2, 10, 12), dtype=np.uint8)
    x = flow_clip_input(flow, crop=8, mean=(0.0, 0.0), std=(1.0, 1.0), crops="ten_axis")
    assert x.shape == (10 * k, 2, s, 8, 8)
    q = (x * 255).round().to(torch.int64).numpy()
    centre = flow[..., 1:9, 2:10].astype(np.int64).transpose(0, 2, 1, 3, 4)  # (K, 2, s, 8, 8)
    np.testing.assert_array_equal(q[4 * k : 5 * k], centre)
    np.testing.assert_array_equal(q[9 * k : 10 * k, 0], 255 - centre[:, 0, ..., ::-1])
    np.testing.assert_array_equal(q[9 * k : 10 * k, 1], centre[:, 1, ..., ::-1])
    # Mirroring by 255 - q is only right for uint8 quantised flow.
    with pytest.raises(ValueError, match="needs uint8 quantised flow"):
        flow_clip_input(flow.astype(np.float32), crop=8, mean=(0, 0), std=(1, 1), crops="ten_mean")
