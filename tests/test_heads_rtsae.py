"""Tests for pipeline/heads/rtsae.py (and its parts, _rtsae_parts.py): the aLSTM encoder and its
attention gate against a hand computation of eqs. 1-7, the eq. 12 terms, the sparse projection
(eqs. 17-18) and the arguments. What the gate feeds (eqs. 13-16, eq. 14's skipped steps, the
objectives): tests/test_heads_rtsae_gate.py; its selectivity: tests/test_rtsae_selective.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
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
    kw = {
        "hidden": 8,
        "encoder_hidden": 6,
        "projection_dim": 5,
        "block_dim": 7,
        "fusion_dim": 5,
        "dropout": 0.0,
        **kwargs,
    }
    model = build_head("rtsae", in_dim=in_dim, num_classes=3, **kw)
    assert isinstance(model, RTSAE)
    return model


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


# --- eqs. 1-7: the aLSTM, by hand ----------------------------------------------------------


def _hand_alstm_layer(layer: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (T, in) -> h, o (T, H), stepping eqs. 1-5 one line each with the layer's weights."""
    n = layer.hidden
    w, b, u, p = _np(layer.ih.weight), _np(layer.ih.bias), _np(layer.hh.weight), _np(layer.peep)
    wx = {g: w[k * n : (k + 1) * n] for k, g in enumerate("ifco")}
    wh = {g: u[k * n : (k + 1) * n] for k, g in enumerate("ifco")}
    bb = {g: b[k * n : (k + 1) * n] for k, g in enumerate("ifco")}
    h, c, hs, os = np.zeros(n), np.zeros(n), [], []
    for xt in x:
        i = _sigmoid(wx["i"] @ xt + wh["i"] @ h + p[0] * c + bb["i"])  # eq. 1: W_ci c_{t-1}
        f = _sigmoid(wx["f"] @ xt + wh["f"] @ h + p[1] * c + bb["f"])  # eq. 2
        c = f * c + i * np.tanh(wx["c"] @ xt + wh["c"] @ h + bb["c"])  # eq. 3
        o = _sigmoid(wx["o"] @ xt + wh["o"] @ h + p[2] * c + bb["o"])  # eq. 4: W_co c_t
        h = o * np.tanh(c)  # eq. 5
        hs.append(h)
        os.append(o)
    return np.array(hs), np.array(os)


@pytest.mark.parametrize("layers", [1, 2])
def test_encoder_and_attention_gate_are_eqs_1_to_7(layers: int) -> None:
    model = _model(encoder_layers=layers, sigma_init=1.7)
    with torch.no_grad():  # non-zero peepholes and gate bias, so that each one shows
        for layer in model.encoder:
            layer.peep.normal_(0, 0.5)
        model.attention.bias.normal_(0, 0.5)
        model.attention.weight.normal_(0, 0.5)
    x_f = torch.randn(2, 5, 5)
    a, o, h = model.gate(x_f)
    sigma = 1.7
    for v in range(2):
        hh = _np(x_f[v])
        for layer in model.encoder:  # stacked: h of one layer is the next one's x
            hh, oo = _hand_alstm_layer(layer, hh)
        assert_close(o[v].double(), torch.from_numpy(oo))  # O of the top layer (eq. 8)
        assert_close(h[v].double(), torch.from_numpy(hh))
        # eq. 6-7: a-bar_t = p-psi(||W_a o_t + b_a||) = 1 - exp(-||.||^2 / sigma), from o_t
        r = np.linalg.norm(oo @ _np(model.attention.weight).T + _np(model.attention.bias), axis=1)
        assert_close(a[v].double(), torch.from_numpy(1 - np.exp(-(r**2) / sigma)))


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
    assert torch.isin(r, torch.tensor([-s, 0.0, s])).all()
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


def test_compress_is_eq_17_as_printed() -> None:
    model = _model(in_dim=6, projection_dim=4, stream_dims=[3, 3])
    xs = torch.tensor([[[1.0, 2.0, 4.0]]])
    xt = torch.tensor([[[3.0, 0.0, 5.0]]])
    # x_f = R (x_s + x_t) / (2 x_max), x_max = 5 (the largest entry of x_s and x_t)
    expected = model.projection @ torch.tensor([4.0, 2.0, 9.0]) / (2 * 5.0)
    assert_close(model.compress(torch.cat([xs, xt], -1)), expected[None, None])
    one = _model(in_dim=3, projection_dim=4)
    expected = one.projection @ (xs[0, 0] / 4.0)  # one stream: x_t = x_s
    assert_close(one.compress(xs), expected[None, None])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_dim": 6, "stream_dims": [2, 4]}, "two equal dims"),
        ({"in_dim": 6, "stream_dims": [2, 2]}, "must sum to in_dim 6"),
        ({"in_dim": 6, "stream_dims": [2, 2, 2]}, "two equal dims"),
        ({"eq12_reduction": "max"}, "eq12_reduction"),
        ({"phi": -1.0}, "phi must be >= 0"),
        ({"joint_weight": -1.0}, "joint_weight must be >= 0"),
        ({"sigma_init": 0.0}, "sigma_init must be > 0"),
        ({"encoder_layers": 0}, "encoder_layers must be >= 1"),
        ({"block_dim": 0}, "block_dim must be >= 1"),
    ],
)
def test_arguments_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        _model(**kwargs)
    assert str(e.value).startswith("rtsae: ")
