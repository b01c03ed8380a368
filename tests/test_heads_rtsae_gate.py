"""Tests for pipeline/heads/rtsae.py above the attention gate, by hand: the gated DSCNN top
(eqs. 13, 15, 16 and fc7), eq. 14's binary gate whose closed steps are skipped in training as
at test, and the stage 2 / stage 3 objectives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_heads_rtsae import _model, _np, _sigmoid
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.testing import assert_close

from pipeline.heads.rtsae import RTSAE, skipping_lstm

pytestmark = pytest.mark.usefixtures("one_thread")


# --- eqs. 13, 15, 16 and fc7: the DSCNN top above the gate ---------------------------------


def _relu(v: np.ndarray) -> np.ndarray:
    return np.maximum(v, 0)


def _hand_top(model: RTSAE, x: np.ndarray, a: np.ndarray) -> np.ndarray:
    """x (T, D), a (T,) -> the F-Net's per-step features (T, fusion_dim), by hand."""
    streams = np.split(x, 2, axis=-1) if model.two_stream else [x]
    z = []
    for block, s in zip(model.blocks, streams, strict=True):
        gated = s * a[:, None]  # eq. 13: x' = x (*) a-bar_t, on the p2 stand-ins
        zi = _relu(gated @ _np(block.weight).T + _np(block.bias))  # blocks 3-5 + GAP
        z.append(zi / np.abs(zi).max(axis=-1, keepdims=True))  # eq. 15
    if model.two_stream:
        w = float(model.w_f.detach())
        z_f = _relu(z[0] / (1 + w) + w / (1 + w) * z[1])  # eq. 16
    else:
        z_f = z[0]
    return _relu(z_f @ _np(model.fc7.weight).T + _np(model.fc7.bias))  # fc7


@pytest.mark.parametrize("two_stream", [False, True])
def test_the_gate_multiplies_the_p2_stand_ins_before_blocks_fusion_and_fc7(
    two_stream: bool,
) -> None:
    kw = {"in_dim": 6, "stream_dims": [3, 3]} if two_stream else {"in_dim": 3}
    model = _model(**kw)
    if two_stream:
        with torch.no_grad():
            model.log_w_f.fill_(math.log(0.733))  # the w_f of the paper's Sect. 5.3
    x = torch.rand(1, 4, kw["in_dim"]) + 0.1
    a = torch.tensor([[1.0, 0.5, 0.2, 0.0]])
    got = model.top(x, a)[0]
    assert_close(got.double(), torch.from_numpy(_hand_top(model, _np(x[0]), _np(a[0]))))
    # the gate acts before the blocks: a gate of 0.5 is not the half of the open step
    assert not torch.allclose(got[1], 0.5 * model.top(x[:, 1:2], torch.ones(1, 1))[0, 0])


def test_two_stream_fusion_weight_learns() -> None:
    model = _model(in_dim=6, stream_dims=[3, 3])
    model.train().loss(torch.rand(2, 5, 6), torch.tensor([0, 1])).backward()
    assert model.log_w_f.grad is not None and model.log_w_f.grad != 0
    assert not hasattr(_model(), "log_w_f")  # one stream: no fusion weight


# --- eq. 14: closed steps are skipped, in training as at test ------------------------------


def _force_gate(monkeypatch, model: RTSAE, gate: torch.Tensor) -> None:
    real = model.gate

    def forced(x_f):
        _, o, h = real(x_f)
        return gate, o, h

    monkeypatch.setattr(model, "gate", forced)


def _spy(module: nn.Module) -> list:
    seen = []
    module.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    return seen


def _hand_classifier(model: RTSAE, u: np.ndarray, g: np.ndarray) -> np.ndarray:
    """u (T, F) the F-Net's features, g (T,) step weights -> logits (C,): torch's LSTM
    equations stepped by hand, each step's new state mixed with the old one by g_t."""
    lstm, n = model.classifier, model.classifier.hidden_size
    wi, wh = _np(lstm.weight_ih_l0), _np(lstm.weight_hh_l0)
    b = _np(lstm.bias_ih_l0) + _np(lstm.bias_hh_l0)
    h, c = np.zeros(n), np.zeros(n)
    for ut, gt in zip(u, g, strict=True):
        pre = wi @ ut + wh @ h + b
        i, f, cc, o = (pre[k * n : (k + 1) * n] for k in range(4))
        c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(cc)
        h_new = _sigmoid(o) * np.tanh(c_new)
        h, c = gt * h_new + (1 - gt) * h, gt * c_new + (1 - gt) * c
    return h @ _np(model.fc.weight).T + _np(model.fc.bias)


def test_eval_runs_the_top_and_classifier_on_kept_steps_only(monkeypatch) -> None:
    model = _model().eval()
    gate = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.6, 0.0], [0.2, 0.4, 0.1, 0.3, 0.7, 0.2]])
    _force_gate(monkeypatch, model, gate)
    seen_lstm, seen_block = _spy(model.classifier), _spy(model.blocks[0])
    x = torch.randn(2, 6, 4)
    logits = model(x)
    packed = seen_lstm[-1]
    assert isinstance(packed, PackedSequence)
    assert packed.data.shape[0] == 3 + 1  # the LSTM steps over 4 kept (video, step) pairs only
    assert seen_block[-1].shape[1] == 3  # the blocks see each video's kept steps, padded to 3
    for v, kept in [(0, [0, 2, 4]), (1, [4])]:
        ones = np.ones(len(kept))
        u = _hand_top(model, _np(x[v, kept]), ones)
        assert_close(logits[v].double(), torch.from_numpy(_hand_classifier(model, u, ones)))
    report = model.report()
    assert report["kept_fraction"] == 4 / 12 and report["empty_gate_fraction"] == 0.0
    assert report["gate_mean_kept"] == pytest.approx((0.9 + 0.8 + 0.6 + 0.7) / 4)
    assert report["gate_mean_dropped"] == pytest.approx((gate.sum().item() - 3.0) / 8)
    # what a skipped step holds cannot matter
    y = x.clone()
    y[0, [1, 3, 5]] = 100.0
    y[1, :4] = -100.0
    assert_close(model(y), logits)


def test_an_empty_gate_keeps_the_most_attended_step(monkeypatch) -> None:
    model = _model().eval()
    _force_gate(monkeypatch, model, torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    x = torch.randn(1, 4, 4)
    want = _hand_classifier(model, _hand_top(model, _np(x[0, [1]]), np.ones(1)), np.ones(1))
    assert_close(model(x)[0].double(), torch.from_numpy(want))
    assert model.report()["kept_fraction"] == 0.25
    assert model.report()["empty_gate_fraction"] == 1.0


@pytest.mark.parametrize("straight_through", [False, True])
def test_train_and_eval_agree_on_a_binary_gate(monkeypatch, straight_through: bool) -> None:
    """Closed steps are skipped in training too (the state does not advance), so on a gate
    that is already 0/1 the training pass and eq. 14's test pass give the same logits."""
    model = _model(straight_through=straight_through)
    gate = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    _force_gate(monkeypatch, model, gate)
    x = torch.randn(2, 5, 4)
    train = model.train()(x)
    assert_close(train, model.eval()(x))
    # and a closed step's content cannot matter in training either
    y = x.clone()
    y[0, 1] = 50.0
    assert_close(model.train()(y), train)


def test_training_weights_every_step_by_the_soft_gate(monkeypatch) -> None:
    model = _model().train()
    gate = torch.tensor([[0.9, 0.1, 0.8, 0.3]])
    _force_gate(monkeypatch, model, gate)
    x = torch.randn(1, 4, 4)
    g = _np(gate[0])
    want = _hand_classifier(model, _hand_top(model, _np(x[0]), g), g)
    assert_close(model(x)[0].double(), torch.from_numpy(want))
    u = model.top(x, gate)
    assert_close(model.fc(skipping_lstm(model.classifier, u, gate)), model(x))
    assert model.report() == {}  # nothing to report before an eval forward


def test_straight_through_trains_on_the_binary_gate(monkeypatch) -> None:
    model = _model(straight_through=True).train()
    gate = torch.tensor([[0.9, 0.1, 0.8, 0.3]], requires_grad=True)
    _force_gate(monkeypatch, model, gate)
    x = torch.randn(1, 4, 4)
    logits = model(x)
    g = _np(gate[0])
    # eq. 13 with the soft a-bar_t, the steps counted by eq. 14's a_t = (1, 0, 1, 0)
    want = _hand_classifier(model, _hand_top(model, _np(x[0]), g), np.array([1.0, 0, 1, 0]))
    assert_close(logits[0].double(), torch.from_numpy(want))
    logits.sum().backward()
    assert gate.grad is not None and (gate.grad != 0).all()  # a-bar still learns, every step


def test_report_gives_the_kept_fraction_of_the_real_gate() -> None:
    model = _model().eval()
    x = torch.randn(3, 7, 4)
    with torch.no_grad():
        a = model._outputs(x, classify=False, decode=False).gate
        model(x)
    keep = a > 0.5
    keep[~keep.any(1), a[~keep.any(1)].argmax(1)] = True
    report = model.report()
    assert report["kept_fraction"] == pytest.approx(keep.float().mean().item())
    assert report["gate_mean"] == pytest.approx(a.mean().item())


def test_eval_does_not_run_the_decoder() -> None:
    model = _model().eval()
    seen = _spy(model.decoder)
    model(torch.randn(2, 5, 4))
    assert seen == []


# --- training objectives --------------------------------------------------------------------


def _grads(model: nn.Module, loss: torch.Tensor) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    got: dict[str, bool] = {}
    for n, p in model.named_parameters():
        got[n.split(".")[0]] = got.get(n.split(".")[0], False) or p.grad is not None
    return got


def test_pretrain_is_unsupervised_and_leaves_the_classifier_alone() -> None:
    model = _model().train()
    x = torch.randn(3, 5, 4)
    g = _grads(model, model.pretrain_loss(x))
    assert g["encoder"] and g["attention"] and g["decoder"] and g["readout"]
    assert not g["classifier"] and not g["fc"] and not g["blocks"] and not g["fc7"]
    out = model._outputs(x, classify=False, decode=True)
    assert_close(model.pretrain_loss(x), model.eq12(out))


def test_stage_3_drops_the_decoder_as_the_paper() -> None:
    model = _model(joint_weight=0.3).train()  # _model has dropout 0, so two passes agree
    x, y = torch.randn(3, 5, 4), torch.tensor([0, 1, 2])
    out = model._outputs(x, classify=True, decode=False)
    t = model.eq12_terms(out)
    assert "reconstruction" not in t
    eq12 = -0.5 * t["diversity"] + 0.02 * t["nuclear"] + 0.05 * t["l1_o"] + 0.8 * t["l1_a"]
    expected = nn.functional.cross_entropy(out.logits, y) + 0.3 * eq12.mean()
    assert_close(model.loss(x, y), expected)
    g = _grads(model, model.loss(x, y))
    assert not g["decoder"] and not g["readout"]  # the decoder is removed in stage 3
    assert g["classifier"] and g["encoder"] and g["attention"] and g["blocks"] and g["fc7"]
    old = _model(joint_reconstruction=True).train()  # the option: keep the decoder's term
    out = old._outputs(x, classify=True, decode=True)
    expected = nn.functional.cross_entropy(out.logits, y) + old.eq12(out)
    assert_close(old.loss(x, y), expected)
    assert all(_grads(old, old.loss(x, y)).values())
