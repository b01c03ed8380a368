"""TS-LSTM (pipeline/heads/ts_lstm.py): segments, pooling, FC before pooling, Table 3 rows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_heads_baselines import lstm_by_hand
from torch import Tensor, nn

from pipeline.heads import build_head
from pipeline.heads.ts_lstm import TSLSTM, segment_bounds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("t", "s", "expected"),
    [
        # the authors' RNN/train.lua: floor(T / S) steps each, the last T mod S steps unused
        (25, 3, [(0, 8), (8, 16), (16, 24)]),  # step 24 (the 25th frame) is dropped
        (25, 5, [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25)]),
        (6, 3, [(0, 2), (2, 4), (4, 6)]),
        (7, 3, [(0, 2), (2, 4), (4, 6)]),
        (26, 3, [(0, 8), (8, 16), (16, 24)]),
        (2, 3, [(0, 1), (0, 1), (1, 2)]),  # T < S: steps repeat, no segment is empty
        (1, 3, [(0, 1), (0, 1), (0, 1)]),
        (25, 1, [(0, 25)]),
    ],
)
def test_segment_bounds_match_the_hand_table(
    t: int, s: int, expected: list[tuple[int, int]]
) -> None:
    assert segment_bounds(t, s) == expected


@pytest.mark.parametrize(
    ("t", "s", "expected"),
    [
        (25, 3, [(0, 8), (8, 16), (16, 25)]),  # floor(25 i / 3) = 0, 8, 16, 25: 8 + 8 + 9 steps
        (7, 3, [(0, 2), (2, 4), (4, 7)]),
        (26, 3, [(0, 8), (8, 17), (17, 26)]),
        (2, 3, [(0, 1), (0, 1), (1, 2)]),
    ],
)
def test_segment_bounds_without_drop_remainder_use_every_step(
    t: int, s: int, expected: list[tuple[int, int]]
) -> None:
    assert segment_bounds(t, s, drop_remainder=False) == expected


# one video, 6 steps, 2 features: segments are steps {0, 1}, {2, 3}, {4, 5}
X = torch.tensor([[[1.0, -1.0], [5.0, -2.0], [2.0, 4.0], [0.0, 4.0], [3.0, 0.0], [3.0, 7.0]]])


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [
        ("max", [[5.0, -1.0], [2.0, 4.0], [3.0, 7.0]]),
        ("mean", [[3.0, -1.5], [1.0, 4.0], [3.0, 3.5]]),
    ],
)
def test_segment_pooling_values(pooling: str, expected: list[list[float]]) -> None:
    model = TSLSTM(in_dim=2, num_classes=3, pooling=pooling, input_bn=False).eval()
    torch.testing.assert_close(model._segments(X), torch.tensor([expected]))


def test_without_lstm_the_pooled_segments_are_concatenated() -> None:
    torch.manual_seed(0)
    model = TSLSTM(in_dim=2, num_classes=3, hidden=[], input_bn=False, output_bn=False).eval()
    assert model.fc.in_features == 3 * 2
    flat = torch.tensor([[5.0, -1.0, 2.0, 4.0, 3.0, 7.0]])  # the max-pooled segments, in order
    torch.testing.assert_close(model(X), model.fc(flat))


def test_lstm_reads_the_pooled_segments_in_order() -> None:
    torch.manual_seed(0)
    model = TSLSTM(in_dim=2, num_classes=3, hidden=[4], input_bn=False, output_bn=False).eval()
    pooled = torch.tensor([[[5.0, -1.0], [2.0, 4.0], [3.0, 7.0]]])
    h, _ = model.lstms[0](pooled)
    torch.testing.assert_close(model(X), model.fc(h[:, -1]))  # the last segment's state


def test_input_bn_is_one_batchnorm_per_segment() -> None:
    model = TSLSTM(in_dim=2, num_classes=3, hidden=[], output_bn=False).train()
    bn = model.input_bn
    assert bn is not None and len(bn) == 3
    x = torch.randn(4, 6, 2) + torch.arange(6.0)[:, None] * 10  # every segment its own level
    model(x)
    for i, (a, b) in enumerate([(0, 2), (2, 4), (4, 6)]):
        # one training step from running_mean = 0 with momentum 0.1: 0.1 * the segment's mean
        seg_mean = x[:, a:b].mean(dim=(0, 1))
        torch.testing.assert_close(bn[i].running_mean, 0.1 * seg_mean)


def test_fc_before_pool_changes_the_parameter_set() -> None:
    plain = TSLSTM(in_dim=8, num_classes=3)
    fc = TSLSTM(in_dim=8, num_classes=3, fc_before_pool=True, fc_dim=5)
    added = {n for n, _ in fc.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert added == {"fc_pre.weight", "fc_pre.bias"}
    assert fc.fc_pre is not None and fc.fc_pre.weight.shape == (5, 8)
    assert fc.lstms[0].input_size == 5 and plain.lstms[0].input_size == 8
    # the FC comes before the pooling: max over segment steps of FC(x)
    fc.eval()
    fc.input_bn = None
    x = torch.randn(2, 6, 8)
    expected = torch.stack([fc.fc_pre(x[:, a:b]).amax(1) for a, b in [(0, 2), (2, 4), (4, 6)]], 1)
    torch.testing.assert_close(fc._segments(x), expected)


# Table 3 of the paper (UCF101 split 1) -> kwargs, as in the TSLSTM docstring
TABLE3 = {
    "1 BN 512 BN 101": {"segments": 1, "pooling": "none"},
    "1 BN (512,512) BN 101": {"segments": 1, "pooling": "none", "hidden": [512, 512]},
    "1 BN (512,512,512) BN 101": {"segments": 1, "pooling": "none", "hidden": [512] * 3},
    "1 BN Max BN 101": {"segments": 1, "hidden": []},
    "3 BN Max BN 101": {"hidden": []},
    "3 BN 512 Max BN 101": {"hidden": [], "fc_before_pool": True, "fc_dim": 512},
    "3 BN Max + 512 BN 101": {},
    "3 BN Max + (512,512) BN 101": {"hidden": [512, 512]},
    "3 BN Max + (512,512,512) BN 101": {"hidden": [512, 512, 512]},
}


def test_table3_variants_build_and_differ() -> None:
    x = torch.randn(2, 25, 16)
    sizes = {}
    for row, kwargs in TABLE3.items():
        model = build_head("ts_lstm", in_dim=16, num_classes=101, **kwargs).eval()
        assert model(x).shape == (2, 101), row
        sizes[row] = sum(p.numel() for p in model.parameters())
    assert len(set(sizes.values())) == len(TABLE3)  # every row is a different network
    default = build_head("ts_lstm", in_dim=16, num_classes=101)
    assert [m.hidden_size for m in default.lstms] == [512] and default.segments == 3
    assert default.pooling == "max" and default.fc_pre is None


def test_vanilla_lstm_row_feeds_every_step() -> None:
    model = TSLSTM(in_dim=2, num_classes=3, segments=1, pooling="none", input_bn=False)
    assert model._segments(X).shape == (1, 6, 2)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"segments": 0}, "segments"),
        ({"pooling": "sum"}, "pooling"),
        ({"pooling": "none"}, "pooling 'none'"),  # needs segments=1
        ({"pooling": "none", "segments": 1, "hidden": []}, "pooling 'none'"),
        ({"hidden": [0]}, "hidden"),
        ({"fc_dim": 0}, "fc_dim"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_invalid_arguments_name_the_head_and_argument(kwargs: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=f"ts_lstm: {arg}"):
        build_head("ts_lstm", in_dim=16, num_classes=3, **kwargs)


# --- the temporal arithmetic of every variant against a hand computation -------------------


@pytest.mark.parametrize(
    ("t", "s", "segment_of"),
    [
        (25, 3, lambda i: i // 8 if i < 24 else None),  # the 25th frame reaches no segment
        (25, 5, lambda i: i // 5),
        (7, 3, lambda i: i // 2 if i < 6 else None),
        (25, 1, lambda i: 0),
    ],
)
def test_a_spike_at_step_i_reaches_only_its_own_segment(
    t: int, s: int, segment_of: Callable[[int], int | None]
) -> None:
    """A spike at one step moves exactly the pooled vector of the segment that holds it (as
    the authors' code cuts them: floor(T / S) steps each), or none, for max and mean."""
    for pooling in ("max", "mean"):
        model = TSLSTM(in_dim=2, num_classes=3, segments=s, pooling=pooling, input_bn=False)
        x = torch.zeros(1, t, 2)
        base = model._segments(x)
        for i in range(t):
            spiked = x.clone()
            spiked[0, i, 0] = 1.0
            moved = (model._segments(spiked) != base).any(dim=2)[0]  # (S,)
            hit = segment_of(i)
            expected = [j == hit for j in range(s)]
            assert moved.tolist() == expected, (pooling, t, s, i)


def test_drop_remainder_false_puts_the_last_step_into_the_last_segment() -> None:
    model = TSLSTM(in_dim=2, num_classes=3, input_bn=False, drop_remainder=False)
    x = torch.zeros(1, 25, 2)
    spiked = x.clone()
    spiked[0, 24, 0] = 1.0
    moved = (model._segments(spiked) != model._segments(x)).any(dim=2)[0]
    assert moved.tolist() == [False, False, True]


def _randomise_batch_norms(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so that an eval-mode BN in the
    wrong place (or over the wrong steps) changes the logits."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(n, generator=g, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g, dtype=m.weight.dtype))
            m.bias.data.copy_(torch.randn(n, generator=g, dtype=m.bias.dtype))


def _bn(m: nn.BatchNorm1d, v: Tensor) -> Tensor:
    """Eval-mode batch norm of the last dim, by hand."""
    return (v - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias


def ts_lstm_by_hand(model: TSLSTM, x: Tensor, kwargs: dict) -> Tensor:
    """x: (B, T, D), T >= S -> logits (B, C) of TS-LSTM as the paper's Table 3 and the authors'
    code define it, computed from the kwargs' structure and the model's weights (eval mode)."""
    s = kwargs.get("segments", 3)
    pooling = kwargs.get("pooling", "max")
    hidden = kwargs.get("hidden", [512])
    n = x.shape[1] // s  # authors: segmentBasis = floor(T / S); the rest is dropped
    segs = [x[:, i * n : (i + 1) * n] for i in range(s)]
    if kwargs.get("input_bn", True):  # one BN per segment, on each of its steps
        segs = [_bn(model.input_bn[i], seg) for i, seg in enumerate(segs)]
    if kwargs.get("fc_before_pool", False):  # the FC is applied to every step, then pooled
        segs = [seg @ model.fc_pre.weight.T + model.fc_pre.bias for seg in segs]
    if pooling == "none":  # the vanilla LSTM: every step of the one segment
        h = segs[0]
    elif pooling == "max":
        h = torch.stack([seg.max(dim=1).values for seg in segs], dim=1)  # (B, S, F)
    else:
        h = torch.stack([seg.sum(dim=1) / seg.shape[1] for seg in segs], dim=1)
    if hidden:
        for lstm in model.lstms:
            h = lstm_by_hand(lstm, h)
        h = h[:, -1]  # the last segment's state
    else:
        h = torch.cat(list(h.unbind(1)), dim=1)  # segment 0's features first
    if kwargs.get("output_bn", True):
        h = _bn(model.output_bn, h)
    return h @ model.fc.weight.T + model.fc.bias


# Table 3 rows, Table 7's BN-less rows, 5 segments and mean pooling
VARIANTS = {
    **TABLE3,
    "1 LSTM-512 FC-101": {"segments": 1, "pooling": "none", "input_bn": False, "output_bn": False},
    "3 Max + 512 FC (no BN)": {"input_bn": False, "output_bn": False},
    "5 BN Max + 512 BN": {"segments": 5},
    "3 BN Mean + 512 BN": {"pooling": "mean"},
    "3 BN 512 Mean BN": {"hidden": [], "fc_before_pool": True, "pooling": "mean", "fc_dim": 7},
}


@pytest.mark.parametrize("row", list(VARIANTS))
@pytest.mark.parametrize("t", [25, 7])
def test_every_variant_matches_the_hand_computation(row: str, t: int) -> None:
    kwargs = VARIANTS[row]
    torch.manual_seed(0)
    model = build_head("ts_lstm", in_dim=6, num_classes=5, **kwargs).double().eval()
    _randomise_batch_norms(model)
    x = torch.randn(2, t, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(model(x), ts_lstm_by_hand(model, x, kwargs))


def test_the_25th_frame_does_not_reach_the_logits_by_default() -> None:
    """T=25, S=3 (the paper's setting): the authors' code drops frame 25; drop_remainder=False
    lets it into the last segment."""
    x = torch.randn(2, 25, 6, generator=torch.Generator().manual_seed(2))
    changed = x.clone()
    changed[:, 24] += 5.0
    torch.manual_seed(0)
    model = build_head("ts_lstm", in_dim=6, num_classes=5).eval()
    _randomise_batch_norms(model)
    torch.testing.assert_close(model(changed), model(x))
    model.drop_remainder = False
    assert not torch.allclose(model(changed), model(x))


def test_input_bn_statistics_leave_out_the_dropped_steps() -> None:
    model = TSLSTM(in_dim=2, num_classes=3, hidden=[], output_bn=False).train()
    x = torch.randn(4, 7, 2) + torch.arange(7.0)[:, None] * 10
    model(x)
    assert model.input_bn is not None
    # one training step from running_mean = 0, momentum 0.1; segment 3 is steps 4, 5 (not 6)
    torch.testing.assert_close(model.input_bn[2].running_mean, 0.1 * x[:, 4:6].mean(dim=(0, 1)))
