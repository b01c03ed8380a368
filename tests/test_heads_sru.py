"""Tests for pipeline/heads/sru.py: the SRU equations (2-6), pooling (8-9) and MRRN fusion (10)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from pipeline.heads import build_head
from pipeline.heads.sru import SRUHead, SRULayer

pytestmark = pytest.mark.usefixtures("one_thread")


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def _layer(w: list[list[float]], bias: list[float], in_dim: int, hidden: int) -> SRULayer:
    layer = SRULayer(in_dim, hidden, dropout=0.0).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w))
        layer.bias.copy_(torch.tensor(bias))
    return layer


# D = H = 2: rows 0-1 are W (eq. 2), 2-3 W_f (eq. 3), 4-5 W_r (eq. 4)
W = [[1.0, 0.0], [0.5, -1.0], [0.2, 0.3], [-0.4, 0.1], [0.0, 1.0], [1.0, 1.0]]
BIAS = [0.1, -0.2, 0.3, 0.0]  # b_f, b_r


def _step(x: list[float], c_prev: list[float]) -> tuple[list[float], list[float]]:
    """Eqs. 2-6 for one step, by hand (scalar arithmetic)."""
    c, h = [], []
    for j in range(2):
        x_tilde = W[j][0] * x[0] + W[j][1] * x[1]  # eq. 2
        f = _sig(W[2 + j][0] * x[0] + W[2 + j][1] * x[1] + BIAS[j])  # eq. 3
        r = _sig(W[4 + j][0] * x[0] + W[4 + j][1] * x[1] + BIAS[2 + j])  # eq. 4
        c.append(f * c_prev[j] + (1 - f) * x_tilde)  # eq. 5
        h.append(r * math.tanh(c[j]) + (1 - r) * x[j])  # eq. 6
    return c, h


def test_one_sru_step_matches_eqs_2_to_6() -> None:
    layer = _layer(W, BIAS, 2, 2)
    x = [0.7, -1.3]
    _, h = _step(x, [0.0, 0.0])
    assert_close(layer(torch.tensor([[x]])), torch.tensor([[h]]))


def test_recurrence_over_three_steps() -> None:
    layer = _layer(W, BIAS, 2, 2)
    xs = [[0.7, -1.3], [0.2, 0.5], [-1.0, 2.0]]
    c, hs = [0.0, 0.0], []
    for x in xs:
        c, h = _step(x, c)
        hs.append(h)
    assert_close(layer(torch.tensor([xs])), torch.tensor([hs]))
    # the state carries over: the third step alone gives another output
    assert not torch.allclose(layer(torch.tensor([xs[2:]]))[0, 0], torch.tensor(hs[2]))


def test_highway_is_projected_when_in_dim_differs() -> None:
    # D = 3, H = 2: a fourth block W_h maps x_t to the hidden size in eq. 6
    w = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    layer = _layer(w.tolist(), [0.0] * 4, 3, 2)
    x = torch.tensor([[[0.5, -1.0, 2.0]]])
    x_tilde, f_pre, r_pre, hw = (x[0, 0] @ w.T).split(2)
    f, r = torch.sigmoid(f_pre), torch.sigmoid(r_pre)
    c = (1 - f) * x_tilde
    assert_close(layer(x)[0, 0], r * torch.tanh(c) + (1 - r) * hw)


def test_weight_blocks_are_orthogonal() -> None:
    torch.manual_seed(0)
    square = SRULayer(8, 8, dropout=0.5)  # 3 square blocks
    assert square.weight.shape == (24, 8)
    for block in square.weight.detach().split(8):
        assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)
    wide = SRULayer(16, 4, dropout=0.5)  # 4 blocks (4, 16): orthonormal rows
    for block in wide.weight.detach().split(4):
        assert_close(block @ block.T, torch.eye(4), atol=1e-5, rtol=0)
    assert not torch.allclose(wide.weight[:4], wide.weight[4:8])  # blocks drawn separately


def test_dropout_is_one_mask_per_sequence_on_the_linear_maps(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = SRULayer(64, 64, dropout=0.5)
    seen = []
    real_linear = torch.nn.functional.linear

    def spy(inp, weight, bias=None):
        seen.append(inp)
        return real_linear(inp, weight, bias)

    monkeypatch.setattr("pipeline.heads.sru.F.linear", spy)
    x = torch.rand(2, 5, 64) + 1.0  # no zeros of its own
    layer.train()(x)
    dropped = seen[-1] == 0
    assert 0.3 < dropped.float().mean() < 0.7
    assert (dropped == dropped[:, :1]).all()  # the same units at every step (variational)
    assert not (dropped[0] == dropped[1]).all()  # a fresh mask per sequence
    kept = ~dropped
    assert_close(seen[-1][kept], 2 * x[kept])  # inverted dropout scaling
    layer.eval()(x)
    assert torch.equal(seen[-1], x)  # no dropout at test time


def test_mean_and_max_pooling_of_step_predictions(monkeypatch) -> None:
    steps = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [2.0, 2.0]]])  # (B=1, T=3, C=2)
    for pooling, pooled in [("mean", [2.0, 2.0]), ("max", [3.0, 5.0])]:
        head = SRUHead(in_dim=4, num_classes=2, hidden=3, layers=1, pooling=pooling).eval()
        monkeypatch.setattr(head.stacks[0], "step_logits", lambda x: steps)
        probs = head(torch.zeros(1, 3, 4)).softmax(-1)
        # eq. 8: softmax((1/N) sum_t W_j h_t); eq. 9: softmax(max_t W_j h_t)
        p = torch.tensor(pooled).exp()
        assert_close(probs, (p / p.sum())[None])


def test_step_predictions_are_a_linear_map_of_tanh_h() -> None:
    torch.manual_seed(0)
    head = SRUHead(in_dim=4, num_classes=3, hidden=5, layers=2).eval()
    stack = head.stacks[0]
    x = torch.randn(2, 6, 4)
    h = stack.layers[1](stack.layers[0](x))
    assert_close(stack.step_logits(x), torch.tanh(h) @ stack.fc.weight.T + stack.fc.bias)
    # mean pooling of a shared linear map of the steps, so the pooled logit uses every step
    assert_close(head(x), stack.step_logits(x).mean(1))


def test_multi_level_fusion_applies_eq_10_weights(monkeypatch) -> None:
    head = SRUHead(in_dim=6, num_classes=2, hidden=3, layers=1, levels=[1, 2, 3]).eval()
    logits = {  # softmax: low [.5, .5], mid [.75, .25], high [.2, .8]
        0: torch.tensor([[0.0, 0.0]]),
        1: torch.tensor([[math.log(3), 0.0]]),
        2: torch.tensor([[0.0, math.log(4)]]),
    }
    widths = {}
    for i, stack in enumerate(head.stacks):

        def fake(x, i=i):
            widths[i] = x.shape[-1]
            return logits[i]

        monkeypatch.setattr(stack, "forward", fake)
    probs = head(torch.zeros(1, 4, 6)).softmax(-1)
    # eq. 10: P = 0.7 P_H + 0.2 P_M + 0.1 P_L
    expected = 0.1 * torch.tensor([0.5, 0.5]) + 0.2 * torch.tensor([0.75, 0.25])
    expected = expected + 0.7 * torch.tensor([0.2, 0.8])
    assert_close(probs, expected[None])
    assert_close(expected, torch.tensor([0.34, 0.66]))
    assert widths == {0: 1, 1: 2, 2: 3}  # low, mid, high slices in that order

    other = SRUHead(
        in_dim=6, num_classes=2, hidden=3, layers=1, levels=[1, 2, 3], level_weights=[0, 0, 1]
    ).eval()
    for i, stack in enumerate(other.stacks):
        monkeypatch.setattr(stack, "forward", lambda x, i=i: logits[i])
    assert_close(other(torch.zeros(1, 4, 6)).softmax(-1), torch.tensor([[0.2, 0.8]]))


def test_multi_level_slices_the_features_per_level() -> None:
    torch.manual_seed(0)
    head = SRUHead(in_dim=6, num_classes=2, hidden=3, layers=1, levels=[1, 2, 3]).eval()
    x = torch.randn(2, 4, 6)
    low, mid, high = head.level_logits(x)
    assert_close(low, head.stacks[0](x[..., :1]))
    assert_close(mid, head.stacks[1](x[..., 1:3]))
    assert_close(high, head.stacks[2](x[..., 3:]))
    y = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy
    assert_close(head.loss(x, y), ce(low, y) + ce(mid, y) + ce(high, y))  # levels train apart


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"levels": [2, 2, 3]}, "levels .* sum to 7, but in_dim is 6"),
        ({"levels": [1, 2, 3], "level_weights": [0.5, 0.5]}, "one weight per level"),
        ({"levels": [1, 2, 3], "level_weights": [0.2, 0.2, 0.2]}, "sum to 1"),
        ({"levels": [1, 2, 3], "level_weights": [-0.1, 0.4, 0.7]}, ">= 0"),
        ({"levels": [0, 6]}, "positive"),
        ({"pooling": "last"}, "pooling must be one of"),
        ({"layers": 0}, "layers must be >= 1"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_arguments_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        build_head("sru", in_dim=6, num_classes=2, hidden=3, **kwargs)
    assert str(e.value).startswith("sru: ")  # the message names the head


def test_defaults_are_the_papers() -> None:
    defaults = {k: p.default for k, p in inspect.signature(SRUHead).parameters.items()}
    assert defaults["hidden"] == 1024 and defaults["layers"] == 3  # sec. 5.1: 3 x 1024
    assert defaults["pooling"] == "mean" and defaults["dropout"] == 0.5
    multi = build_head("sru", in_dim=896, num_classes=5, hidden=4, levels=[128, 256, 512])
    assert_close(multi.level_weights, torch.tensor([0.1, 0.2, 0.7]))
    assert [len(s.layers) for s in multi.stacks] == [3, 3, 3]
    assert [s.layers[0].dropout for s in multi.stacks] == [0.5, 0.5, 0.5]
