"""Tests for pipeline/heads/tsrnn.py: entropy pooling (eq. 3-4), the Conv-GRU bridge (eq. 6),
the accumulative weights (eq. 7-8) and the Table 1 options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.engine import TrainSettings, fit, predict
from pipeline.heads import build_head
from pipeline.heads.tsrnn import TSRNN, conv_maps, entropy, entropy_pool, window_weights

pytestmark = pytest.mark.usefixtures("one_thread")

C = 3


def _tsrnn(in_dim: int, seed: int = 0, **kwargs: object) -> TSRNN:
    torch.manual_seed(seed)
    model = build_head("tsrnn", in_dim=in_dim, num_classes=C, hidden=6, **kwargs)
    assert isinstance(model, TSRNN)
    return model.eval()


def _h(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p)


# hand-made spiking vectors (C = 4) and their entropies, lowest first
PEAKY = [0.97, 0.01, 0.01, 0.01]
FIRM = [0.7, 0.1, 0.1, 0.1]
SPLIT = [0.45, 0.45, 0.05, 0.05]
FLAT = [0.25, 0.25, 0.25, 0.25]


def test_entropy_is_eq3() -> None:
    s = torch.tensor([PEAKY, FIRM, SPLIT, FLAT])
    expected = torch.tensor([_h(PEAKY), _h(FIRM), _h(SPLIT), math.log(4)])
    torch.testing.assert_close(entropy(s.log()), expected)
    assert _h(PEAKY) < _h(FIRM) < _h(SPLIT) < _h(FLAT)


def test_entropy_pool_picks_the_lowest_entropy_step_of_each_window() -> None:
    # T = 8, gamma = 3: windows [0, 1, 2], [3, 4, 5] and a ragged last one [6, 7]
    video0 = [FLAT, FIRM, SPLIT, PEAKY, FLAT, FIRM, SPLIT, FIRM]  # -> 1, 3, 7
    video1 = [SPLIT, FLAT, PEAKY, FIRM, SPLIT, FLAT, FIRM, FLAT]  # -> 2, 3, 6
    s = torch.tensor([video0, video1]).log()
    assert entropy_pool(s, 3).tolist() == [[1, 3, 7], [2, 3, 6]]
    # gamma = 5: [0..4], [5, 6, 7]
    assert entropy_pool(s, 5).tolist() == [[3, 5], [2, 6]]  # FIRM ties at 5 and 7: the earlier
    # T < gamma: one window over every step; gamma = 1: every step is kept
    assert entropy_pool(s[:, :2], 5).tolist() == [[1], [0]]
    assert entropy_pool(s, 1).tolist() == [list(range(8))] * 2
    # a tie goes to the earlier step
    assert entropy_pool(torch.tensor([[FIRM, PEAKY, PEAKY]]).log(), 3).tolist() == [[1]]


@pytest.mark.parametrize("t", [1, 3, 7, 10, 12])
def test_head_activates_the_lowest_entropy_state_per_window(t: int) -> None:
    model = _tsrnn(4)  # option 7, gamma = 5
    o = model._outputs(torch.randn(2, t, 4))
    assert o.spike_log_probs is not None and o.step_log_probs is not None
    assert o.selected is not None and o.window_log_probs is not None
    c = -(o.spike_log_probs.exp() * o.spike_log_probs).sum(-1)
    expected = [
        [start + int(c[b, start : start + 5].argmin()) for start in range(0, t, 5)]
        for b in range(2)
    ]
    assert o.selected.tolist() == expected
    assert o.selected.shape[1] == math.ceil(t / 5)
    for b in range(2):
        for slot, step in enumerate(expected[b]):
            torch.testing.assert_close(o.window_log_probs[b, slot], o.step_log_probs[b, step])


def test_window_weights_are_l_over_m() -> None:
    # eq. (7) gains, not normalised (they sum to (M + 1) / 2)
    torch.testing.assert_close(window_weights(4, True), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(window_weights(4, False), torch.full((4,), 0.25))
    torch.testing.assert_close(window_weights(1, True), torch.tensor([1.0]))


def test_loss_and_prediction_weight_the_windows_by_l_over_m() -> None:
    model = _tsrnn(4, keyframe_weight=0.3)  # option 7; eval mode: no dropout
    x, y = torch.randn(2, 20, 4), torch.tensor([0, 2])  # gamma = 5 -> M = 4
    o = model._outputs(x)
    assert o.window_log_probs is not None and o.spike_log_probs is not None
    p = o.window_log_probs.exp()  # (2, 4, C)
    gains = [1 / 4, 2 / 4, 3 / 4, 4 / 4]
    # eq. (8): weighted sum of window probabilities; forward returns its normalised log
    mix = sum(g * p[:, w] for w, g in enumerate(gains))
    torch.testing.assert_close(model(x), torch.log(mix / 2.5))
    torch.testing.assert_close(model(x).softmax(-1), mix / 2.5)
    assert model(x).argmax(-1).tolist() == mix.argmax(-1).tolist()
    # eq. (7) + 0.3 * eq. (2) averaged over the 20 frames
    ce_windows = [-torch.log(p[b, w, y[b]]) for b in range(2) for w in range(4)]
    eq7 = sum(gains[i % 4] * ce for i, ce in enumerate(ce_windows)) / 2
    eq2 = -o.spike_log_probs[torch.arange(2), :, y].mean()
    torch.testing.assert_close(model.loss(x, y), eq7 + 0.3 * eq2)
    # the average-loss options use 1/M instead
    model.accumulative = False
    torch.testing.assert_close(model(x), torch.log(p.mean(dim=1)))
    eq7_avg = sum(ce / 4 for ce in ce_windows) / 2
    torch.testing.assert_close(model.loss(x, y), eq7_avg + 0.3 * eq2)


def test_option_1_predicts_the_frame_average_of_the_spiking_signals() -> None:
    model = _tsrnn(4, option=1)
    x, y = torch.randn(2, 6, 4), torch.tensor([1, 0])
    s = model.spiking(x).softmax(-1)  # type: ignore[misc]  # eq. (1), H = W = 1
    torch.testing.assert_close(model(x), s.mean(dim=1).log())
    torch.testing.assert_close(
        model.loss(x, y), F.cross_entropy(model.spiking(x).flatten(0, 1), y.repeat_interleave(6))
    )  # type: ignore[misc]


@pytest.mark.parametrize(
    ("shape", "in_dim", "hw"), [((2, 5, 4, 3, 3), 4, (3, 3)), ((2, 5, 8), 8, (1, 1))]
)
def test_conv_gru_gates_see_the_tiled_spiking_vector(
    shape: tuple[int, ...], in_dim: int, hw: tuple[int, int]
) -> None:
    model = _tsrnn(in_dim)
    assert model.gru is not None
    assert model.gru.conv_x.weight.shape == (3 * 6, in_dim + C, 3, 3)  # [W_u, W_s] for z, r, c
    assert model.gru.conv_h.weight.shape == (2 * 6, 6, 3, 3)
    seen: list[torch.Tensor] = []
    model.gru.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.randn(*shape)
    o = model._outputs(x)
    assert o.hidden is not None and o.spike_log_probs is not None
    assert o.hidden.shape == (2, 5, 6, *hw)  # h_t: (B, hidden, H, W) per step
    gate_in = seen[0]
    assert gate_in.shape == (2, 5, in_dim + C, *hw)
    torch.testing.assert_close(gate_in[:, :, :in_dim], x.view(2, 5, in_dim, *hw))
    tiled = o.spike_log_probs.exp()[..., None, None].expand(-1, -1, -1, *hw)
    torch.testing.assert_close(gate_in[:, :, in_dim:], tiled)
    assert model(x).shape == (2, C)


def test_conv_gru_step_is_eq6() -> None:
    model = _tsrnn(4, option=2)  # no bridge: the gates see u_t only
    gru = model.gru
    assert gru is not None
    x = torch.randn(1, 2, 4, 3, 3)
    wx, bx = gru.conv_x.weight, gru.conv_x.bias
    wh, wc = gru.conv_h.weight, gru.conv_c.weight
    h = torch.zeros(1, 6, 3, 3)
    for t in range(2):
        gx = F.conv2d(x[:, t], wx, bx, padding=1)
        gh = F.conv2d(h, wh, padding=1)
        z = torch.sigmoid(gh[:, :6] + gx[:, :6])
        r = torch.sigmoid(gh[:, 6:] + gx[:, 6:12])
        c = torch.tanh(F.conv2d(r * h, wc, padding=1) + gx[:, 12:])
        h = (1 - z) * h + z * c
    torch.testing.assert_close(gru(x)[:, -1], h)


def test_one_by_one_maps_use_the_centre_tap_exactly() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    x = torch.randn(4, 5, 1, 1)
    torch.testing.assert_close(conv_maps(conv, x), conv(x))


# (B1 present, gate input channels for D = 4, windows M for T = 6 and gamma = 5, gains)
TABLE1 = {
    1: (True, None, None, None),
    2: (False, 4, 6, "average"),
    3: (False, 4, 2, "average"),
    4: (True, 4 + C, 6, "average"),
    5: (True, 4 + C, 6, "accumulative"),
    6: (True, 4 + C, 2, "average"),
    7: (True, 4 + C, 2, "accumulative"),
}


@pytest.mark.parametrize("option", sorted(TABLE1))
@pytest.mark.parametrize("shape", [(2, 6, 4), (2, 6, 4, 3, 3)])
def test_table1_options_build_run_and_differ(option: int, shape: tuple[int, ...]) -> None:
    keyframe, gate_channels, m, gains = TABLE1[option]
    model = _tsrnn(4, option=option)
    assert (model.spiking is not None) == keyframe
    x, y = torch.randn(*shape), torch.tensor([0, 2])
    o = model._outputs(x)
    if gate_channels is None:
        assert model.gru is None and model.classifier is None and o.selected is None
    else:
        assert model.gru is not None and model.gru.conv_x.in_channels == gate_channels
        assert o.selected is not None and o.weights is not None
        assert o.selected.shape == (2, m)
        expected = window_weights(m, gains == "accumulative")
        torch.testing.assert_close(o.weights, expected)
        if m == 6:
            assert o.selected.tolist() == [list(range(6))] * 2  # all frames
        else:
            # pooled by the entropy of s_t, or of the Conv-GRU's own prediction without B1
            source = o.spike_log_probs if keyframe else o.step_log_probs
            assert source is not None
            assert o.selected.tolist() == entropy_pool(source, 5).tolist()
    out = model(x)
    assert out.shape == (2, C)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))  # log-probabilities
    model.train().loss(x, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("option", sorted(TABLE1))
def test_every_option_fits_a_separable_set(option: int) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(C), 8)
    x = (rng.normal(size=(C, 16)) * 2)[y][:, None, :] + rng.normal(scale=0.5, size=(24, 6, 16))
    torch.manual_seed(0)
    model = build_head("tsrnn", in_dim=16, num_classes=C, option=option, hidden=32)
    losses = fit(
        model, x.astype(np.float32), y, TrainSettings(lr=3e-3, epochs=20, batch_size=8), seed=0
    )
    assert losses[-1] < losses[0]
    assert (predict(model, x).argmax(axis=1) == y).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"option": 8}, "tsrnn: option"),
        ({"window": 0}, "tsrnn: window"),
        ({"kernel_size": 2}, "tsrnn: kernel_size"),
        ({"dropout": 1.0}, "tsrnn: dropout"),
        ({"keyframe_weight": -1.0}, "tsrnn: keyframe_weight"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_head("tsrnn", in_dim=4, num_classes=C, **kwargs)


def test_rejects_features_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"tsrnn: expected \(B, T, 4\)"):
        _tsrnn(4)(torch.randn(2, 6, 5))


def test_report_describes_the_last_eval_forward() -> None:
    model = _tsrnn(4)
    x = torch.randn(2, 7, 4)  # windows [0..4], [5, 6]
    with torch.no_grad():
        model(x)
        o = model._outputs(x)
        model.train()(torch.randn(2, 7, 4))  # a training forward leaves the report alone
    assert o.spike_log_probs is not None and o.selected is not None
    offsets = (o.selected - torch.tensor([0, 5])).float().mean()
    rep = model.report()
    assert rep["spike_entropy"] == pytest.approx(float(entropy(o.spike_log_probs).mean()))
    assert rep["activated_offset"] == pytest.approx(float(offsets))
    m4 = _tsrnn(4, option=4)
    m4(x)
    assert set(m4.report()) == {"spike_entropy"}  # no pooling, no activated steps
