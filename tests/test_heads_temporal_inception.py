"""Temporal-Inception (pipeline/heads/temporal_inception.py): halving, multi-flow branches,
BN before ReLU, the Table 4 variants."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from pipeline.heads import build_head
from pipeline.heads.temporal_inception import (
    TCL,
    HalveTime,
    MultiFlow,
    TemporalConv,
    TemporalInception,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D, C = 16, 3


def _build(**kwargs: object) -> TemporalInception:
    torch.manual_seed(0)
    return build_head("temporal_inception", in_dim=D, num_classes=C, **kwargs).eval()


def _outputs(modules: list[nn.Module], run: Callable[[], object]) -> list[torch.Tensor]:
    """The outputs of ``modules`` during ``run()``, in call order."""
    got: list[torch.Tensor] = []

    def record(_m: nn.Module, _i: tuple, o: torch.Tensor) -> None:
        got.append(o)

    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize(
    ("t", "lengths"),
    [
        (25, [13, 7, 4, 2]),  # ceil(25/2)=13, ceil(13/2)=7, ceil(7/2)=4, 4/2=2
        (6, [3, 2, 1, 1]),
        (1, [1, 1, 1, 1]),  # never below length 1
        (32, [16, 8, 4, 2]),
    ],
)
@pytest.mark.parametrize("variant", ["inception", "temporal_vgg", "multiflow_vgg"])
def test_each_layer_halves_time(variant: str, t: int, lengths: list[int]) -> None:
    model = _build(variant=variant)
    tcls = [m for m in model.temporal.modules() if isinstance(m, TCL)]
    outs = _outputs(tcls, lambda: model(torch.randn(2, t, D)))
    per_flow = 1 if variant == "temporal_vgg" else 2
    assert len(outs) == 4 * per_flow
    got = [o.shape[2] for o in outs]
    if variant == "inception":  # flows of a module run side by side
        assert got == [n for n in lengths for _ in range(2)]
    else:  # each stack runs its 4 layers in turn
        assert got == lengths * per_flow
    # the final max over the remaining steps gives the FC a (B, D) input for any T
    assert model(torch.randn(2, t, D)).shape == (2, C)


def test_halve_time_is_ceil_mode_max_pooling() -> None:
    for t in (1, 2, 5, 25):
        x = torch.randn(2, 3, t, 4)
        ref = nn.functional.max_pool2d(x, (2, 1), (2, 1), ceil_mode=True)
        torch.testing.assert_close(HalveTime()(x), ref)
    x = torch.tensor([1.0, 3.0, 2.0, 0.0, 5.0]).view(1, 1, 5, 1)
    assert HalveTime()(x).flatten().tolist() == [3.0, 2.0, 5.0]  # the odd last step kept


@pytest.mark.parametrize("k", [5, 7])
@pytest.mark.parametrize("t", [1, 6, 25])
def test_temporal_conv_is_a_1d_conv_shared_by_every_feature_row(k: int, t: int) -> None:
    torch.manual_seed(0)
    conv = TemporalConv(3, 2, k)
    x = torch.randn(4, 3, t, 5)  # (B, C, T, D)
    rows = x.permute(0, 3, 1, 2).reshape(4 * 5, 3, t)  # every (video, feature row) separately
    ref = nn.functional.conv1d(rows, conv.weight, conv.bias, padding=k // 2)
    ref = ref.view(4, 5, 2, t).permute(0, 2, 3, 1)
    torch.testing.assert_close(conv(x), ref)


def test_modules_have_kernel_5_and_7_flows_concatenated_before_the_1x1_fusion() -> None:
    model = _build()
    modules = list(model.temporal)
    assert len(modules) == 4 and all(isinstance(m, MultiFlow) for m in modules)
    widths_in, widths_out = [1, 2, 4, 8], [1, 2, 4, 8]
    for m, c_in, c_out in zip(modules, widths_in, widths_out, strict=True):
        convs = [b[0] for b in m.branches]
        assert [c.kernel_size for c in convs] == [(5,), (7,)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [(c_in, c_out)] * 2
    x = torch.randn(2, 25, D)
    last_branches = _outputs(list(modules[-1].branches), lambda: model(x))
    fusion_in = _outputs([model.temporal], lambda: model(x))[0]
    assert [o.shape[1] for o in last_branches] == [8, 8]
    assert fusion_in.shape == (2, 16, 2, D)  # 8 + 8 channels, 2 steps, D feature rows
    torch.testing.assert_close(fusion_in, torch.cat(last_branches, dim=1))  # concatenation
    convs = [m for m in model.fusion if isinstance(m, TemporalConv)]  # 1x1 convs
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (16, 4, (1,)),
        (4, 2, (1,)),
        (2, 1, (1,)),
    ]
    assert model.classifier[1].in_features == D * 1 and model.classifier[1].out_features == 1024


def _leaves(model: nn.Module) -> list[nn.Module]:
    """Leaf modules in registration order, which is the forward order of this head."""
    return [m for m in model.modules() if not list(m.children())]


@pytest.mark.parametrize("variant", ["inception", "temporal_vgg", "multiflow_vgg"])
def test_batch_norm_precedes_every_relu(variant: str) -> None:
    leaves = _leaves(_build(variant=variant))
    relus = [i for i, m in enumerate(leaves) if isinstance(m, nn.ReLU)]
    assert len(relus) == (8 if variant != "temporal_vgg" else 4) + 3 + 1  # TCLs, fusion, FC
    for i in relus:
        assert isinstance(leaves[i - 1], nn.BatchNorm1d | nn.BatchNorm2d), leaves[i - 1]
    without = _leaves(_build(variant=variant, batch_norm=False))
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in without)


def test_dropout_before_and_after_the_fc_1024() -> None:
    cls = _build(dropout=0.3).classifier
    kinds = [type(m) for m in cls]
    assert kinds == [nn.Dropout, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert cls[0].p == cls[4].p == 0.3 and cls[1].out_features == 1024


def test_vgg_variants_build_and_differ() -> None:
    inc, vgg, mf = (_build(variant=v) for v in ("inception", "temporal_vgg", "multiflow_vgg"))
    # Temporal-VGG {T,T,T,T}: one stack, kernel 5, ends with 8 channels
    vgg_convs = [m for m in vgg.temporal.modules() if isinstance(m, TemporalConv)]
    assert [c.kernel_size[0] for c in vgg_convs] == [5] * 4
    assert [c.out_channels for c in vgg_convs] == [1, 2, 4, 8]
    assert vgg.fusion[0].in_channels == 8
    # multi-flow VGG ({T,T,T,T},{T,T,T,T}): two stacks, concatenated only at the end
    assert isinstance(mf.temporal, MultiFlow) and len(mf.temporal.branches) == 2
    for stack, k in zip(mf.temporal.branches, (5, 7), strict=True):
        convs = [m for m in stack.modules() if isinstance(m, TemporalConv)]
        assert [c.kernel_size[0] for c in convs] == [k] * 4
        assert [c.in_channels for c in convs] == [1, 1, 2, 4]  # no concatenation in between
    assert mf.fusion[0].in_channels == 16
    # Temporal-Inception concatenates after every module: inputs 1, 2, 4, 8
    inc_convs = [m for m in inc.temporal.modules() if isinstance(m, TemporalConv)]
    assert [c.in_channels for c in inc_convs] == [1, 1, 2, 2, 4, 4, 8, 8]
    sizes = {sum(p.numel() for p in m.parameters()) for m in (inc, vgg, mf)}
    assert len(sizes) == 3
    x = torch.randn(2, 25, D)
    assert not torch.allclose(inc(x), mf(x)) and not torch.allclose(inc(x), vgg(x))


def test_table4_rows_build() -> None:
    rows = [
        {"variant": "temporal_vgg", "channels": [1], "reduction": []},  # 1L: T
        {"variant": "inception", "channels": [1], "reduction": []},  # 1L: (T,T)
        {"variant": "temporal_vgg", "channels": [1, 2], "reduction": []},  # 2L: {T,T}
        {"variant": "inception", "channels": [1, 2], "reduction": []},  # 2L: {(T,T),(T,T)}
        {"batch_norm": False, "dropout": 0.0},  # Temporal-Inception without BN and dropout
        {"fc_dim": 2048},
    ]
    for kwargs in rows:
        assert _build(**kwargs)(torch.randn(2, 25, D)).shape == (2, C), kwargs


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"variant": "resnet"}, "variant"),
        ({"kernel_sizes": [4, 7]}, "kernel_sizes"),
        ({"kernel_sizes": []}, "kernel_sizes"),
        ({"channels": []}, "channels"),
        ({"reduction": [0]}, "reduction"),
        ({"fc_dim": 0}, "fc_dim"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_invalid_arguments_name_the_head_and_argument(kwargs: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=f"temporal_inception: {arg}"):
        build_head("temporal_inception", in_dim=D, num_classes=C, **kwargs)


# --- the temporal arithmetic of every variant against a hand computation -------------------


def _randomise_batch_norms(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters (eval mode), so that a BN over
    the wrong map, or a max taken at the wrong place, changes the logits. The BN scales and
    shifts (and the conv biases where there is no BN) are positive, so that the 1-channel maps
    do not die at a ReLU: a network whose logits are constant would pass any check."""
    g = torch.Generator().manual_seed(5)

    def rand(n: int, dt: torch.dtype) -> torch.Tensor:
        return torch.rand(n, generator=g, dtype=dt)

    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            n, dt = m.num_features, m.running_mean.dtype
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=dt) * 0.1)
            m.running_var.copy_(rand(n, dt) + 0.5)
            m.weight.data.copy_(rand(n, dt) + 0.5)
            m.bias.data.copy_(rand(n, dt) * 0.5 + 0.2)
        elif isinstance(m, TemporalConv) and m.bias is not None:
            m.bias.data.copy_(rand(m.out_channels, m.bias.dtype) * 0.5 + 0.2)


def _bn(m: nn.Module, h: torch.Tensor, dim: int) -> torch.Tensor:
    """Eval-mode BN of the channels at ``dim`` by hand; identity where there is no BN."""
    if not isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        return h
    shape = [1] * h.dim()
    shape[dim] = -1
    mean, var = m.running_mean.view(shape), m.running_var.view(shape)
    return (h - mean) / torch.sqrt(var + m.eps) * m.weight.view(shape) + m.bias.view(shape)


def _tcl_by_hand(tcl: nn.Module, h: torch.Tensor, pool: str) -> torch.Tensor:
    """One (1 x k) conv + BN + ReLU + time pool on h: (B, C, L, D), with conv1d on every
    (video, feature row). pool: "floor" (authors: pool 2, an odd last step dropped), "ceil"
    (this head: pool 2, an odd last step kept) or "all" (the authors' last module: pool by the
    whole remaining length, 3 -> 1)."""
    conv, bn = tcl[0], tcl[1]
    b, c, length, d = h.shape
    rows = h.permute(0, 3, 1, 2).reshape(b * d, c, length)
    y = nn.functional.conv1d(rows, conv.weight, conv.bias, padding=conv.kernel_size[0] // 2)
    y = y.view(b, d, -1, length).permute(0, 2, 3, 1)  # (B, O, L, D)
    y = torch.relu(_bn(bn, y, 1))
    if pool == "all":
        return y.max(dim=2, keepdim=True).values
    steps = [y[:, :, i : i + 2].max(dim=2).values for i in range(0, length, 2)]
    if pool == "floor" and length % 2:
        steps = steps[:-1]
    return torch.stack(steps, dim=2)


def inception_by_hand(
    model: TemporalInception, x: torch.Tensor, kw: dict, pool: str
) -> torch.Tensor:
    """x: (B, T, D) -> logits, from the kwargs' structure and the model's weights (eval).
    pool="floor": the authors' arithmetic (25 -> 12 -> 6 -> 3 -> 1: pool 2 in every module but
    the last, which pools the rest); pool="ceil": this head's (halve with ceil in every
    module, then the max over what is left). Either way time is 1 step before the fusion."""
    variant = kw.get("variant", "inception")
    layers, flows = len(kw.get("channels", [1, 2, 4, 8])), len(kw.get("kernel_sizes", [5, 7]))

    def pool_of(layer: int) -> str:
        return ("all" if pool == "floor" else "ceil") if layer == layers - 1 else pool

    h = x.unsqueeze(1)  # (B, 1, T, D): the feature matrix, one channel
    if variant == "inception":  # flows concatenated after every module
        for i in range(layers):
            h = torch.cat(
                [_tcl_by_hand(model.temporal[i].branches[f], h, pool_of(i)) for f in range(flows)],
                dim=1,
            )
    else:  # one stack per flow (one flow for temporal_vgg), concatenated at the end
        stacks = model.temporal.branches if variant == "multiflow_vgg" else [model.temporal]
        outs = []
        for stack in stacks:
            s = h
            for i in range(layers):
                s = _tcl_by_hand(stack[i], s, pool_of(i))
            outs.append(s)
        h = torch.cat(outs, dim=1)
    h = h.max(dim=2, keepdim=True).values  # (B, C, 1, D); a no-op after the "all" pool
    convs = [m for m in model.fusion if isinstance(m, TemporalConv)]
    bns = [m for m in model.fusion if not isinstance(m, TemporalConv | nn.ReLU)]
    assert len(convs) == len(kw.get("reduction", [4, 2, 1]))
    for i, conv in enumerate(convs):  # 1x1 convs: a channel mix at every (step, feature row)
        h = torch.einsum("oc,bcld->bold", conv.weight[:, :, 0], h)
        h = h if conv.bias is None else h + conv.bias.view(1, -1, 1, 1)
        h = torch.relu(_bn(bns[i], h, 1))
    h = h.flatten(1)  # (B, C' * D), channel-major
    _, fc1, bn, _, _, fc2 = model.classifier  # dropout, FC-1024, BN, ReLU, dropout, FC
    h = h @ fc1.weight.T + (0 if fc1.bias is None else fc1.bias)
    h = torch.relu(_bn(bn, h, 1))
    return h @ fc2.weight.T + fc2.bias


# Table 4 rows (and the three Fig. 4 variants) -> kwargs, as in the TemporalInception docstring
TABLE4 = {
    "1L T": {"variant": "temporal_vgg", "channels": [1], "reduction": []},
    "1L (T,T)": {"variant": "inception", "channels": [1], "reduction": []},
    "2L {T,T}": {"variant": "temporal_vgg", "channels": [1, 2], "reduction": []},
    "2L {(T,T),(T,T)}": {"variant": "inception", "channels": [1, 2], "reduction": []},
    "Temporal-VGG": {"variant": "temporal_vgg"},
    "multi-flow VGG": {"variant": "multiflow_vgg"},
    "Temporal-Inception": {},
    "Temporal-Inception, no BN, no dropout": {"batch_norm": False, "dropout": 0.0},
    "Temporal-Inception, FC-2048": {"fc_dim": 2048},
}


def _double(kw: dict) -> TemporalInception:
    torch.manual_seed(0)
    model = build_head("temporal_inception", in_dim=D, num_classes=C, **kw).double().eval()
    _randomise_batch_norms(model)
    return model


@pytest.mark.parametrize("row", list(TABLE4))
def test_every_variant_matches_the_authors_arithmetic_at_t24(row: str) -> None:
    """T=24 halves alike in floor and ceil mode down to 3 steps (24 -> 12 -> 6 -> 3), so the
    head must give the authors' network exactly: their last module pools 3 -> 1 before the
    1x1 fusion."""
    kw = TABLE4[row]
    model = _double(kw)
    x = torch.randn(2, 24, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = model(x)
    torch.testing.assert_close(out, inception_by_hand(model, x, kw, pool="floor"))
    assert not torch.allclose(out[0], out[1])  # not a constant (dead) network


@pytest.mark.parametrize("row", list(TABLE4))
@pytest.mark.parametrize("t", [25, 7, 1])
def test_every_variant_matches_the_ceil_arithmetic_at_any_t(row: str, t: int) -> None:
    kw = TABLE4[row]
    model = _double(kw)
    x = torch.randn(2, t, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = model(x)
    torch.testing.assert_close(out, inception_by_hand(model, x, kw, pool="ceil"))
    assert not torch.allclose(out[0], out[1])  # not a constant (dead) network


@pytest.mark.parametrize("t", [25, 24, 20])
def test_the_fusion_sees_one_step(t: int) -> None:
    """The final max over time comes before the 1x1 fusion convs (the authors' last module
    pools time to length 1), not after them."""
    model = _build()
    fusion_in = _outputs([model.temporal], lambda: model(torch.randn(2, t, D)))[0]
    assert fusion_in.shape[2] > 1  # the modules leave more than one step ...
    convs = [m for m in model.fusion if isinstance(m, TemporalConv)]
    seen = []
    hooks = [c.register_forward_pre_hook(lambda _m, i: seen.append(i[0].shape)) for c in convs]
    model(torch.randn(2, t, D))
    for h in hooks:
        h.remove()
    assert [s[2] for s in seen] == [1, 1, 1]  # ... and every 1x1 conv gets one


def test_a_step_beyond_the_last_pair_is_kept() -> None:
    """Ceil mode (a documented difference from the authors' floor pooling): at T=25 the 25th
    step still reaches the map that is max-pooled before the fusion."""
    model = _double({})
    x = torch.randn(2, 25, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    changed = x.clone()
    changed[:, 24] += 5.0
    assert not torch.allclose(model.features(changed).amax(2), model.features(x).amax(2))
