"""Tests for pipeline/heads/rtsae.py: p-psi (eq. 7), the eq. 12 terms, the sparse projection
(eqs. 17-18), the binary gate that skips steps at test time (eq. 14) and the dual-stream fusion
(eqs. 15-16)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.testing import assert_close

from pipeline.heads import build_head
from pipeline.heads.rtsae import (
    RTSAE,
    PPsi,
    RTSAEOutputs,
    keyframe_diversity,
    nuclear_norm,
    p_psi,
    reconstruction_error,
    sparse_projection,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kwargs) -> RTSAE:
    torch.manual_seed(seed)
    in_dim = kwargs.pop("in_dim", 4)
    kw = {"hidden": 8, "encoder_hidden": 6, "projection_dim": 5, "dropout": 0.0, **kwargs}
    return build_head("rtsae", in_dim=in_dim, num_classes=3, **kw)


# --- eq. 7 ---------------------------------------------------------------------------------


def test_p_psi_values() -> None:
    x = torch.tensor([0.0, 1.0, -2.0, 3.0])
    expected = torch.tensor([0.0, 1 - math.exp(-1 / 2), 1 - math.exp(-4 / 2), 1 - math.exp(-9 / 2)])
    assert_close(p_psi(x, torch.tensor(2.0)), expected)
    assert_close(PPsi(0.5)(torch.tensor([1.0])), torch.tensor([1 - math.exp(-2.0)]))
    # two-sided: closed near 0, open far from it on either side
    assert p_psi(torch.tensor(10.0), torch.tensor(2.98)) > 0.99
    assert p_psi(torch.tensor(-10.0), torch.tensor(2.98)) > 0.99


def test_p_psi_sigma_gradient_is_analytic() -> None:
    gate = PPsi(2.98)
    x = torch.tensor([0.5, 1.5, -2.0])
    gate(x).sum().backward()
    s = 2.98
    # d/dsigma (1 - exp(-x^2/sigma)) = -x^2/sigma^2 exp(-x^2/sigma)
    expected = sum(-(v**2) / s**2 * math.exp(-(v**2) / s) for v in [0.5, 1.5, -2.0])
    assert_close(gate.sigma.grad, torch.tensor(expected))
    assert isinstance(gate.sigma, nn.Parameter)


# --- eq. 12 terms --------------------------------------------------------------------------


def test_nuclear_norm_is_the_sum_of_singular_values() -> None:
    diag = torch.tensor([[3.0, 0.0], [0.0, -4.0]])
    assert_close(nuclear_norm(diag[None]), torch.tensor([7.0]))  # |3| + |-4|
    rank1 = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # (T=3, H=2): sigma = sqrt(6), 0
    assert_close(nuclear_norm(rank1[None]), torch.tensor([math.sqrt(6)]))
    o = torch.tensor([[[0.2, 0.9, 0.1], [0.5, 0.5, 0.0], [0.7, 0.1, 0.3], [0.0, 0.4, 0.8]]])
    assert_close(nuclear_norm(o), torch.linalg.svdvals(o[0]).sum()[None])
    assert_close(nuclear_norm(torch.stack([diag, 2 * diag])), torch.tensor([7.0, 14.0]))


def test_reconstruction_error_counts_only_attention_steps() -> None:
    k = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]])
    x = torch.tensor([[[0.0, 2.0], [5.0, 5.0], [1.0, 1.0]]])
    mask = torch.tensor([[True, False, True]])
    # ||(1, 0)||^2 + ||(2, -2)||^2; step 1 is not an attention step
    assert_close(reconstruction_error(k, x, mask), torch.tensor([1.0 + 8.0]))


def test_keyframe_diversity_uses_consecutive_attention_steps() -> None:
    h = torch.tensor([[[0.0, 0.0], [9.0, 9.0], [1.0, 2.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, False, True, True]])
    # pairs (0, 2) and (2, 3): log(1 + 5) + log(1 + 4); step 1 is skipped
    assert_close(keyframe_diversity(h, mask), torch.tensor([math.log(6) + math.log(5)]))
    assert_close(keyframe_diversity(h, torch.tensor([[False, True, False, False]])), torch.zeros(1))
    assert_close(keyframe_diversity(h, torch.zeros(1, 4, dtype=torch.bool)), torch.zeros(1))
    two = torch.cat([h, h.flip(1)])
    masks = torch.tensor([[True, False, True, True], [True, True, False, False]])
    # second video: reversed h, steps 0 and 1 -> ||(1, 0) - (1, 2)||^2 = 4
    assert_close(keyframe_diversity(two, masks), torch.tensor([math.log(30), math.log(5)]))


def _hand_outputs() -> RTSAEOutputs:
    gate = torch.tensor([[0.9, 0.2, 0.7]])  # steps 0 and 2 are attention steps
    o = torch.tensor([[[0.5, 0.0], [0.25, 0.25], [0.0, 1.0]]])
    h = torch.tensor([[[1.0, 0.0], [5.0, 5.0], [0.0, 2.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]]])
    recon = torch.tensor([[[1.0, 0.0], [3.0, 3.0], [0.0, 0.0]]])
    return RTSAEOutputs(target, gate, o, h, recon, None)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_eq12_terms_and_total_by_hand(reduction: str) -> None:
    model = _model(eq12_reduction=reduction)
    out = _hand_outputs()
    recon = 1.0 + 4.0  # steps 0 and 2
    div = math.log(1 + 1 + 4)  # h_0 - h_2 = (1, -2)
    nuc = float(torch.linalg.svdvals(out.out_gates[0]).sum())
    l1_o = 0.5 + 0.5 + 1.0
    l1_a = 0.9 + 0.2 + 0.7
    if reduction == "mean":  # each sum over its number of summands
        recon, div, nuc, l1_o, l1_a = recon / (2 * 2), div / 1, nuc / 2, l1_o / 6, l1_a / 3
    t = model.eq12_terms(out)
    for name, v in [
        ("reconstruction", recon),
        ("diversity", div),
        ("nuclear", nuc),
        ("l1_o", l1_o),
        ("l1_a", l1_a),
    ]:
        assert_close(t[name], torch.tensor([v]), msg=name)
    # eq. 12 with mu = 0.5, tau = 0.02, lambda = 0.05, phi = 0.8
    total = recon - 0.5 * div + 0.02 * nuc + 0.05 * l1_o + 0.8 * l1_a
    assert_close(model.eq12(out), torch.tensor(total))
    no_decoder = RTSAEOutputs(out.target, out.gate, out.out_gates, out.hidden, None, None)
    assert_close(model.eq12(no_decoder), torch.tensor(total - recon))


def test_eq12_weights_come_from_the_arguments() -> None:
    out = _hand_outputs()
    t = _model().eq12_terms(out)
    model = _model(mu=1.0, tau=0.0, lam=2.0, phi=0.0)
    expected = t["reconstruction"] - t["diversity"] + 2 * t["l1_o"]
    assert_close(model.eq12(out), expected.mean())


# --- eqs. 17-18 ----------------------------------------------------------------------------


def test_sparse_projection_has_the_eq_18_distribution() -> None:
    r = sparse_projection(128, 3000, seed=0)
    s = math.sqrt(3)
    values = torch.tensor([-s, 0.0, s])
    assert torch.isin(r, values).all()
    n = r.numel()
    # binomial std of a fraction here is ~0.0006
    assert abs((r == -s).sum().item() / n - 1 / 6) < 0.005
    assert abs((r == 0).sum().item() / n - 2 / 3) < 0.005
    assert abs((r == s).sum().item() / n - 1 / 6) < 0.005
    assert torch.equal(r, sparse_projection(128, 3000, seed=0))
    assert not torch.equal(r, sparse_projection(128, 3000, seed=1))


def test_projection_is_a_fixed_buffer() -> None:
    model = _model(in_dim=20, projection_dim=16)
    r = model.projection.clone()
    assert r.shape == (16, 20)
    assert all(p is not model.projection for p in model.parameters())
    assert "projection" in model.state_dict()
    assert torch.equal(r, _model(seed=1, in_dim=20, projection_dim=16).projection)  # seeded
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model.loss(torch.randn(2, 5, 20), torch.tensor([0, 1])).backward()
        opt.step()
    assert torch.equal(model.projection, r)  # unchanged by training and by calls
    other = _model(in_dim=20, projection_dim=16, projection_seed=3)
    assert not torch.equal(other.projection, r)


def test_compress_is_eq_17() -> None:
    model = _model(in_dim=6, projection_dim=4, stream_dims=[3, 3])
    xs = torch.tensor([[[1.0, 2.0, 4.0]]])
    xt = torch.tensor([[[3.0, 0.0, 5.0]]])
    # x_f = R (x_s + x_t) / (2 x_max), x_max = 5, and / sqrt(3) (the docstring's scaling)
    expected = model.projection @ torch.tensor([4.0, 2.0, 9.0]) / (2 * 5.0) / math.sqrt(3)
    assert_close(model.compress(torch.cat([xs, xt], -1)), expected[None, None])
    one = _model(in_dim=3, projection_dim=4)
    expected = one.projection @ (xs[0, 0] / 4.0) / math.sqrt(3)
    assert_close(one.compress(xs), expected[None, None])


# --- eqs. 13-14: gating, and skipping at test time ---------------------------------------


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


def _lstm_alone(model: RTSAE, steps: torch.Tensor) -> torch.Tensor:
    """A fresh LSTM with the classifier's weights over the given steps (1, K, D) -> logits."""
    lstm = nn.LSTM(steps.shape[-1], model.classifier.hidden_size, batch_first=True)
    lstm.load_state_dict(model.classifier.state_dict())
    _, (hn, _) = lstm(steps)
    return model.fc(hn[-1])


def test_eval_runs_the_classifier_on_kept_steps_only(monkeypatch) -> None:
    model = _model().eval()
    gate = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.6, 0.0], [0.2, 0.4, 0.1, 0.3, 0.7, 0.2]])
    _force_gate(monkeypatch, model, gate)
    seen = _spy(model.classifier)
    x = torch.randn(2, 6, 4)
    logits = model(x)
    packed = seen[-1]
    assert isinstance(packed, PackedSequence)
    assert packed.data.shape[0] == 3 + 1  # the LSTM steps over 4 kept (video, step) pairs only
    assert_close(logits[0], _lstm_alone(model, x[:1, [0, 2, 4]])[0])
    assert_close(logits[1], _lstm_alone(model, x[1:, [4]])[0])
    assert model.report() == {"kept_fraction": 4 / 12, "empty_gate_fraction": 0.0}
    # what a skipped step holds cannot matter
    y = x.clone()
    y[0, [1, 3, 5]] = 100.0
    y[1, :4] = -100.0
    assert_close(model(y), logits)


def test_an_empty_gate_keeps_the_most_attended_step(monkeypatch) -> None:
    model = _model().eval()
    _force_gate(monkeypatch, model, torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    x = torch.randn(1, 4, 4)
    assert_close(model(x), _lstm_alone(model, x[:, [1]]))
    assert model.report() == {"kept_fraction": 0.25, "empty_gate_fraction": 1.0}


def test_training_gates_every_step_softly(monkeypatch) -> None:
    model = _model().train()
    gate = torch.tensor([[0.9, 0.1, 0.8, 0.3]])
    _force_gate(monkeypatch, model, gate)
    seen = _spy(model.classifier)
    x = torch.randn(1, 4, 4)
    logits = model(x)
    assert_close(seen[-1], x * gate[..., None])  # eq. 13: x' = x (*) a-bar_t, all T steps
    assert_close(logits, _lstm_alone(model, x * gate[..., None]))
    assert model.report() == {}  # nothing to report before an eval forward


def test_eval_does_not_run_the_decoder() -> None:
    model = _model().eval()
    seen = _spy(model.decoder)
    model(torch.randn(2, 5, 4))
    assert seen == []


def test_report_gives_the_kept_fraction_of_the_real_gate() -> None:
    model = _model().eval()
    x = torch.randn(3, 7, 4)
    with torch.no_grad():
        a = model._outputs(x, classify=False, decode=False).gate
        model(x)
    keep = a > 0.5
    keep[~keep.any(1), a[~keep.any(1)].argmax(1)] = True
    assert model.report()["kept_fraction"] == pytest.approx(keep.float().mean().item())


# --- training objectives --------------------------------------------------------------------


def _grads(model: nn.Module, loss: torch.Tensor) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n.split(".")[0]: p.grad is not None for n, p in model.named_parameters()}


def test_pretrain_is_unsupervised_and_leaves_the_classifier_alone() -> None:
    model = _model().train()
    x = torch.randn(3, 5, 4)
    g = _grads(model, model.pretrain_loss(x))
    assert g["encoder"] and g["attention"] and g["decoder"] and g["readout"]
    assert not g["classifier"] and not g["fc"]
    out = model._outputs(x, classify=False, decode=True)
    assert_close(model.pretrain_loss(x), model.eq12(out))


def test_joint_loss_is_cross_entropy_plus_eq12() -> None:
    model = _model().train()  # _model has dropout 0, so two passes agree
    x, y = torch.randn(3, 5, 4), torch.tensor([0, 1, 2])
    out = model._outputs(x, classify=True, decode=True)
    expected = nn.functional.cross_entropy(out.logits, y) + model.eq12(out)
    assert_close(model.loss(x, y), expected)
    g = _grads(model, model.loss(x, y))
    assert all(g.values())
    apart = _model(joint_reconstruction=False).train()
    g = _grads(apart, apart.loss(x, y))
    assert not g["decoder"] and not g["readout"]  # the decoder is removed in stage 3
    assert g["classifier"] and g["encoder"]


# --- eqs. 15-16 ----------------------------------------------------------------------------


def test_two_stream_normalisation_and_fusion_weight() -> None:
    model = _model(in_dim=6, stream_dims=[3, 3])
    with torch.no_grad():
        model.log_w_f.fill_(math.log(0.733))
    assert_close(model.w_f, torch.tensor(0.733))
    xs = torch.tensor([[[1.0, 2.0, 4.0], [2.0, -3.0, 1.0]]])
    xt = torch.tensor([[[3.0, 0.0, 6.0], [0.0, 0.0, 10.0]]])
    zs = torch.tensor([[0.25, 0.5, 1.0], [2 / 3, -1.0, 1 / 3]])  # eq. 15: z / z_max
    zt = torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 1.0]])
    w = 0.733
    expected = torch.relu(zs / (1 + w) + w / (1 + w) * zt)  # eq. 16
    assert_close(model.features(torch.cat([xs, xt], -1))[0], expected)
    assert (expected[1, 1] == 0) and (zs[1, 1] < 0)  # the ReLU acts
    # the fusion weight learns: it gets a gradient through the joint loss
    model.train().loss(torch.rand(2, 5, 6), torch.tensor([0, 1])).backward()
    assert model.log_w_f.grad is not None and model.log_w_f.grad != 0
    assert not hasattr(_model(), "log_w_f")  # one stream: no fusion weight


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_dim": 6, "stream_dims": [2, 4]}, "two equal dims"),
        ({"in_dim": 6, "stream_dims": [2, 2]}, "must sum to in_dim 6"),
        ({"in_dim": 6, "stream_dims": [2, 2, 2]}, "two equal dims"),
        ({"eq12_reduction": "max"}, "eq12_reduction"),
        ({"phi": -1.0}, "phi must be >= 0"),
        ({"sigma_init": 0.0}, "sigma_init must be > 0"),
        ({"encoder_layers": 0}, "encoder_layers must be >= 1"),
    ],
)
def test_arguments_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        _model(**kwargs)
    assert str(e.value).startswith("rtsae: ")


def test_straight_through_trains_on_the_binary_gate(monkeypatch) -> None:
    model = _model(straight_through=True).train()
    gate = torch.tensor([[0.9, 0.1, 0.8, 0.3]], requires_grad=True)
    _force_gate(monkeypatch, model, gate)
    seen = _spy(model.classifier)
    x = torch.randn(1, 4, 4)
    model(x).sum().backward()
    assert_close(seen[-1], x * torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None])  # eq. 14's a_t
    assert gate.grad is not None and (gate.grad != 0).all()  # a-bar still learns, every step
    closed = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    _force_gate(monkeypatch, model, closed)
    model(x)
    assert_close(seen[-1], x * torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None])  # as in eval
