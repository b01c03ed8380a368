"""TS-LSTM (pipeline/heads/ts_lstm.py): segments, pooling, FC before pooling, Table 3 rows."""

from __future__ import annotations

import pytest
import torch

from pipeline.heads import build_head
from pipeline.heads.ts_lstm import TSLSTM, segment_bounds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("t", "s", "expected"),
    [
        (25, 3, [(0, 8), (8, 16), (16, 25)]),  # floor(25 i / 3) = 0, 8, 16, 25: 8 + 8 + 9 steps
        (25, 5, [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25)]),
        (6, 3, [(0, 2), (2, 4), (4, 6)]),
        (7, 3, [(0, 2), (2, 4), (4, 7)]),
        (2, 3, [(0, 1), (0, 1), (1, 2)]),  # T < S: steps repeat, no segment is empty
        (1, 3, [(0, 1), (0, 1), (0, 1)]),
        (25, 1, [(0, 25)]),
    ],
)
def test_segment_bounds_match_the_hand_table(
    t: int, s: int, expected: list[tuple[int, int]]
) -> None:
    assert segment_bounds(t, s) == expected


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
