"""Res-LSTM (pipeline/heads/res_lstm.py): sigma(t), eq. (1) residual, eq. (2) readout, PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engine import TrainSettings, fit
from pipeline.heads import build_head
from pipeline.heads.res_lstm import ResLSTM, pca_components
from pipeline.steps import sigma

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("k", "t", "expected_1based"),
    [
        (10, 4, [1, 4, 7, 10]),  # 1 + floor((t-1) * 9 / 3)
        (25, 5, [1, 7, 13, 19, 25]),  # 1 + floor((t-1) * 24 / 4)
        (25, 25, list(range(1, 26))),  # T = K: every step once
        (3, 5, [1, 1, 2, 2, 3]),  # K < T: 1 + floor((t-1) * 2 / 4) repeats steps
        (7, 3, [1, 4, 7]),
        (1, 3, [1, 1, 1]),
        (10, 1, [1]),  # T = 1: the formula's 0/0, the first step
    ],
)
def test_sigma_matches_the_hand_table(k: int, t: int, expected_1based: list[int]) -> None:
    assert sigma(k, t) == [i - 1 for i in expected_1based]


def test_forward_reads_the_sigma_subset() -> None:
    torch.manual_seed(0)
    sub = ResLSTM(in_dim=4, num_classes=3, hidden=4, layers=2, steps=4).eval()
    full = ResLSTM(in_dim=4, num_classes=3, hidden=4, layers=2, steps=None).eval()
    full.load_state_dict(sub.state_dict())
    x = torch.randn(2, 10, 4)
    torch.testing.assert_close(sub(x), full(x[:, [0, 3, 6, 9]]))
    assert not torch.allclose(sub(x), full(x))  # the subset is what made them equal


def _layer_io(model: ResLSTM, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each LSTM layer's input x^{l-1} and output m^l, captured by forward hooks."""
    ins, outs = [], []

    def record(_m: torch.nn.Module, i: tuple[torch.Tensor, ...], o: tuple) -> None:
        ins.append(i[0])
        outs.append(o[0])

    hooks = [lstm.register_forward_hook(record) for lstm in model.lstms]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


def test_residual_adds_each_layers_input_to_its_output() -> None:
    torch.manual_seed(0)
    model = ResLSTM(in_dim=5, num_classes=3, hidden=5, layers=3).eval()  # D == H: no projection
    x = torch.randn(2, 6, 5)
    ins, outs = _layer_io(model, x)
    torch.testing.assert_close(ins[0], x)  # x^0
    for layer in (1, 2):  # eq. (1): x_t^l = m_t^l + x_t^{l-1}
        torch.testing.assert_close(ins[layer], outs[layer - 1] + ins[layer - 1])
    # eq. (2): the classifier reads m_T^L, the last layer's hidden state, not x_T^L
    torch.testing.assert_close(model(x), model.fc(outs[2][:, -1]))


def test_residual_false_is_the_plain_stack() -> None:
    torch.manual_seed(0)
    plain = ResLSTM(in_dim=5, num_classes=3, hidden=5, layers=2, residual=False).eval()
    x = torch.randn(2, 6, 5)
    ins, outs = _layer_io(plain, x)
    torch.testing.assert_close(ins[1], outs[0])  # no addition
    res = ResLSTM(in_dim=5, num_classes=3, hidden=5, layers=2, residual=True).eval()
    res.load_state_dict(plain.state_dict())  # same weights, only the switch differs
    assert not torch.allclose(res(x), plain(x))


def test_residual_by_hand_through_the_pca_projection() -> None:
    torch.manual_seed(0)
    model = ResLSTM(in_dim=6, num_classes=3, hidden=3, layers=2).eval()
    x = torch.randn(4, 5, 6)
    model.prepare(x)
    x0 = (x - model.pca_mean) @ model.pca_components  # the fixed PCA map, (B, T, H)
    m1, _ = model.lstms[0](x0)
    m2, _ = model.lstms[1](m1 + x0)
    torch.testing.assert_close(model(x), model.fc(m2[:, -1]))


def test_pca_equals_the_top_principal_components() -> None:
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])  # distinct variances
    x = (torch.randn(50, 4, 8, generator=gen) * scales) @ torch.linalg.qr(
        torch.randn(8, 8, generator=gen)
    ).Q + 3.0
    model = ResLSTM(in_dim=8, num_classes=3, hidden=3)
    model.prepare(x)
    flat = x.reshape(-1, 8)
    centred = flat - flat.mean(0)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    ref = vh[:3].T.float()  # (D, 3): top-3 right singular vectors = principal directions
    got = model.pca_components
    signs = (got * ref).sum(0).sign()  # columns agree up to sign
    torch.testing.assert_close(got, ref * signs, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.pca_mean, flat.mean(0))
    # the sign is fixed (largest-magnitude entry positive), so a refit gives the same map
    assert (got.gather(0, got.abs().argmax(0, keepdim=True)) > 0).all()
    assert bool(model.pca_fitted)
    # forward's projection is the fixed map (x - mean) @ V
    torch.testing.assert_close(
        model.project(x), (x - flat.mean(0)) @ (ref * signs), atol=1e-4, rtol=0
    )


def test_pca_wider_than_the_input_pads_zero_columns() -> None:
    mean, comps = pca_components(torch.randn(40, 4), 6)
    assert comps.shape == (4, 6)
    torch.testing.assert_close(comps[:, :4].T @ comps[:, :4], torch.eye(4), atol=1e-5, rtol=0)
    assert (comps[:, 4:] == 0).all()


def test_pca_is_saved_in_the_state_dict() -> None:
    torch.manual_seed(0)
    model = ResLSTM(in_dim=6, num_classes=3, hidden=4).eval()
    x = torch.randn(3, 5, 6) * 4 + 1
    model.prepare(x)
    fresh = ResLSTM(in_dim=6, num_classes=3, hidden=4).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))


def test_unfitted_pca_falls_back_to_identity_truncation() -> None:
    x = torch.randn(2, 3, 6)
    narrow = ResLSTM(in_dim=6, num_classes=3, hidden=4)
    torch.testing.assert_close(narrow.project(x), x[..., :4])
    wide = ResLSTM(in_dim=6, num_classes=3, hidden=8)
    torch.testing.assert_close(wide.project(x)[..., :6], x)
    assert (wide.project(x)[..., 6:] == 0).all()


def test_fit_calls_prepare_and_fits_the_pca() -> None:
    model = ResLSTM(in_dim=6, num_classes=2, hidden=3, layers=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4, 6)).astype(np.float32)
    fit(model, x, np.array([0, 1] * 4), TrainSettings(epochs=1, batch_size=4), seed=0)
    assert bool(model.pca_fitted)
    assert model.pca_mean.abs().sum() > 0


def test_learned_projection_is_a_trained_linear_map() -> None:
    model = ResLSTM(in_dim=6, num_classes=3, hidden=4, projection="learned")
    assert isinstance(model.proj, torch.nn.Linear) and model.proj.weight.shape == (4, 6)
    model.prepare(torch.randn(5, 3, 6))  # a no-op for the learned map
    assert not bool(model.pca_fitted)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(model.project(x), model.proj(x))
    model(x).sum().backward()
    assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().sum() > 0


def test_no_projection_when_input_and_hidden_match() -> None:
    model = ResLSTM(in_dim=4, num_classes=3, hidden=4, projection="learned")
    assert not hasattr(model, "proj")
    x = torch.randn(2, 3, 4)
    assert model.project(x) is x


def test_paper_defaults_and_validation() -> None:
    model = build_head("res_lstm", in_dim=16, num_classes=3)
    assert len(model.lstms) == 2 and model.lstms[0].hidden_size == 1024  # section 4.1
    for kwargs, arg in [
        ({"projection": "svd"}, "projection"),
        ({"layers": 0}, "layers"),
        ({"steps": 0}, "steps"),
        ({"hidden": 0}, "hidden"),
        ({"dropout": 1.0}, "dropout"),
    ]:
        with pytest.raises(ValueError, match=f"res_lstm: {arg}"):
            build_head("res_lstm", in_dim=16, num_classes=3, **kwargs)


# --- mid fusion (section 3.2): x^0 = x^c (+) x^f or x^c (.) x^f of per-stream PCA maps ---


def _two_streams(n: int = 30, t: int = 4, d_c: int = 6, d_f: int = 5) -> torch.Tensor:
    """(n, t, d_c + d_f): two streams of distinct per-direction variances and offsets, so each
    stream's top principal directions are well separated and differ from the joint PCA's."""
    gen = torch.Generator().manual_seed(1)
    parts = []
    for d, scale, offset in ((d_c, 4.0, 2.0), (d_f, 1.5, -3.0)):
        var = scale * torch.linspace(1.0, 0.1, d)
        rot = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
        parts.append((torch.randn(n, t, d, generator=gen) * var) @ rot + offset)
    return torch.cat(parts, dim=-1)


def _sklearn_x0(train: torch.Tensor, x: torch.Tensor, d_c: int, k: int) -> list[torch.Tensor]:
    """Each stream of x projected by an sklearn PCA fitted on that stream's training frames,
    with each component's sign fixed as the head fixes it (largest-magnitude entry positive)."""
    from sklearn.decomposition import PCA

    out = []
    for cols in (slice(0, d_c), slice(d_c, train.shape[-1])):
        pca = PCA(n_components=k).fit(train[..., cols].reshape(-1, train[..., cols].shape[-1]))
        comps = pca.components_.T  # (d_s, k)
        comps = comps * np.sign(comps[np.abs(comps).argmax(0), np.arange(k)])
        proj = (x[..., cols].numpy() - pca.mean_) @ comps
        out.append(torch.from_numpy(proj).float())
    return out


def _lstm_input(model: ResLSTM, x: torch.Tensor) -> torch.Tensor:
    return _layer_io(model, x)[0][0]


@pytest.mark.parametrize("fusion", ["sum", "product"])
def test_mid_fusion_feeds_the_lstm_the_fused_per_stream_pca(fusion: str) -> None:
    torch.manual_seed(0)
    train = _two_streams()
    model = build_head(
        "res_lstm", in_dim=11, num_classes=3, hidden=3, fusion=fusion, stream_dims=[6, 5]
    ).eval()
    assert isinstance(model, ResLSTM)
    model.prepare(iter(train.split(7)))  # streamed: a pass over batches, as fit gives them
    x = _two_streams(n=2, t=5)
    c, f = _sklearn_x0(train, x, 6, 3)
    expected = c + f if fusion == "sum" else c * f  # x_t^c (+) x_t^f, x_t^c (.) x_t^f
    torch.testing.assert_close(_lstm_input(model, x), expected, atol=1e-4, rtol=1e-4)
    # and one PCA over the 11 columns side by side (concat) is a different input
    joint = build_head("res_lstm", in_dim=11, num_classes=3, hidden=3, stream_dims=[6, 5])
    assert isinstance(joint, ResLSTM)
    joint.prepare(train)
    assert not torch.allclose(_lstm_input(joint.eval(), x), expected, atol=1e-2)


def test_mid_fusion_pca_of_batches_equals_that_of_one_tensor() -> None:
    train = _two_streams()
    kwargs = dict(in_dim=11, num_classes=3, hidden=3, fusion="product", stream_dims=[6, 5])
    whole, streamed = ResLSTM(**kwargs), ResLSTM(**kwargs)  # type: ignore[arg-type]
    whole.prepare(train)
    streamed.prepare(b for b in train.split(4))
    torch.testing.assert_close(streamed.pca_mean, whole.pca_mean)
    torch.testing.assert_close(streamed.pca_components, whole.pca_components, atol=1e-5, rtol=0)
    # each stream's rows of the buffers hold its own mean
    flat = train.reshape(-1, 11)
    torch.testing.assert_close(whole.pca_mean, flat.mean(0))


def test_mid_fusion_through_fit_fits_both_stream_maps() -> None:
    train = _two_streams(n=8)
    model = ResLSTM(in_dim=11, num_classes=2, hidden=3, layers=1, fusion="sum", stream_dims=[6, 5])
    fit(model, train.numpy(), np.array([0, 1] * 4), TrainSettings(epochs=1, batch_size=4), seed=0)
    assert bool(model.pca_fitted)
    c, f = _sklearn_x0(train, train[:2], 6, 3)
    torch.testing.assert_close(model.eval().project(train[:2]), c + f, atol=1e-4, rtol=1e-4)


def test_mid_fusion_learned_projection_is_one_linear_map_per_stream() -> None:
    torch.manual_seed(0)
    model = ResLSTM(
        in_dim=11,
        num_classes=3,
        hidden=4,
        projection="learned",
        fusion="product",
        stream_dims=[6, 5],
    )
    assert [p.weight.shape for p in model.stream_proj] == [(4, 6), (4, 5)]
    x = torch.randn(2, 3, 11)
    expected = model.stream_proj[0](x[..., :6]) * model.stream_proj[1](x[..., 6:])
    torch.testing.assert_close(_lstm_input(model, x), expected)
    model(x).sum().backward()
    assert all(p.weight.grad is not None for p in model.stream_proj)


def test_mid_fusion_state_dict_keeps_the_shapes_of_one_map() -> None:
    fused = ResLSTM(in_dim=11, num_classes=3, hidden=3, fusion="sum", stream_dims=[6, 5])
    fused.prepare(_two_streams())
    plain = ResLSTM(in_dim=11, num_classes=3, hidden=3)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    fresh = ResLSTM(in_dim=11, num_classes=3, hidden=3, fusion="sum", stream_dims=[6, 5])
    fresh.load_state_dict(fused.state_dict())
    x = _two_streams(n=2)
    torch.testing.assert_close(fresh.eval()(x), fused.eval()(x))


def test_unfitted_mid_fusion_truncates_each_stream() -> None:
    model = ResLSTM(in_dim=11, num_classes=3, hidden=3, fusion="sum", stream_dims=[6, 5])
    x = torch.randn(2, 3, 11)
    torch.testing.assert_close(model.project(x), x[..., :3] + x[..., 6:9])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fusion": "product"}, "needs two streams"),  # a single stream
        ({"fusion": "sum", "stream_dims": [11]}, "needs two streams"),
        ({"fusion": "sum", "stream_dims": [6, 5], "hidden": 6}, "must not exceed"),
        ({"fusion": "sum", "stream_dims": [6, 4]}, "must sum to in_dim 11"),
        ({"fusion": "max"}, "res_lstm: fusion must be one of"),
    ],
)
def test_mid_fusion_refusals(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_head("res_lstm", in_dim=11, num_classes=3, **{"hidden": 3, **kwargs})
