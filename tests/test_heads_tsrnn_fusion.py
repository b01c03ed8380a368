"""Tests for pipeline/heads/tsrnn.py beyond one stream: attention fusion (Fig. 4c), the staged
training of section IV-C 3 (``phases()``) and the per-recurrence window scores (eq. 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.engine import TrainSettings, fit
from pipeline.heads import build_head
from pipeline.heads.tsrnn import TSRNN

pytestmark = pytest.mark.usefixtures("one_thread")

C, D_RGB, D_FLOW, HID = 3, 4, 5, 6


def _tsrnn(seed: int = 0, **kwargs: object) -> TSRNN:
    torch.manual_seed(seed)
    kwargs = {"in_dim": D_RGB + D_FLOW, "num_classes": C, "hidden": HID, **kwargs}
    model = build_head("tsrnn", **kwargs)  # type: ignore[arg-type]
    assert isinstance(model, TSRNN)
    return model.eval()


def _attention(seed: int = 0, **kwargs: object) -> TSRNN:
    return _tsrnn(seed, fusion="attention", stream_dims=[D_RGB, D_FLOW], **kwargs)


def _gru_step(x: torch.Tensor, h: torch.Tensor, gru: torch.nn.Module) -> torch.Tensor:
    """One eq. (6) step on pooled (1 x 1) input by hand: x (B, in), h (B, hidden) -> h_t."""
    k = gru.conv_x.kernel_size[0] // 2  # the centre tap is all a 1 x 1 map sees
    gx = F.linear(x, gru.conv_x.weight[:, :, k, k], gru.conv_x.bias)
    gh = F.linear(h, gru.conv_h.weight[:, :, k, k])
    z = torch.sigmoid(gh[:, :HID] + gx[:, :HID])
    r = torch.sigmoid(gh[:, HID:] + gx[:, HID : 2 * HID])
    c = torch.tanh(F.linear(r * h, gru.conv_c.weight[:, :, k, k]) + gx[:, 2 * HID :])
    return (1 - z) * h + z * c


def _gate_inputs(model: TSRNN, x: torch.Tensor) -> torch.Tensor:
    """What the RGB temporal context branch (model.gru) is given, via a forward pre-hook."""
    seen: list[torch.Tensor] = []
    assert model.gru is not None
    hook = model.gru.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]


# --- attention fusion (Fig. 4c) ---


def test_attention_masks_the_rgb_features_with_the_flow_memory_by_hand() -> None:
    model = _attention(option=4, kernel_size=3)  # bridge, every step a window, gains 1/M
    assert model.flow_gru is not None and model.attend is not None and model.gru is not None
    assert model.gru.conv_x.in_channels == D_RGB + C  # [a_t . u_t, s_t]: no flow channels
    x = torch.randn(2, 3, D_RGB + D_FLOW)
    rgb, flow = x[..., :D_RGB], x[..., D_RGB:]
    # the flow Conv-GRU's memory h^f_t, step by step, and a_t = sigmoid(W_a h^f_t + b_a)
    h = torch.zeros(2, HID)
    masks = []
    for t in range(3):
        h = _gru_step(flow[:, t], h, model.flow_gru)
        w_a = model.attend.weight[:, :, 0, 0]
        masks.append(torch.sigmoid(F.linear(h, w_a, model.attend.bias)))
    mask = torch.stack(masks, dim=1)  # (B, T, d_rgb)
    s = model.spiking(rgb).softmax(-1)  # type: ignore[misc]  # B1 reads the unmasked RGB
    gate_in = _gate_inputs(model, x)[..., 0, 0]
    torch.testing.assert_close(gate_in, torch.cat([mask * rgb, s], dim=-1))
    # the prediction is the RGB branch's: eq. 8 over its own classifier, from the masked input
    hr, probs = torch.zeros(2, HID), []
    for t in range(3):
        hr = _gru_step(gate_in[:, t], hr, model.gru)
        probs.append(model.classifier(hr).softmax(-1))  # type: ignore[misc]
    torch.testing.assert_close(model(x).exp(), torch.stack(probs, 1).mean(1))


def test_a_closed_mask_zeroes_the_rgb_branch_input_and_the_flow_steers_it() -> None:
    model = _attention(option=2)  # no bridge: the gates see a_t . u_t only
    assert model.attend is not None
    x = torch.randn(2, 6, D_RGB + D_FLOW)
    with torch.no_grad():
        model.attend.weight.zero_()
        model.attend.bias.fill_(-1e4)  # a_t = sigmoid(-1e4) = 0
    assert (_gate_inputs(model, x) == 0).all()
    other_rgb = x.clone()
    other_rgb[..., :D_RGB] = torch.randn(2, 6, D_RGB)
    torch.testing.assert_close(model(other_rgb), model(x))  # nothing of the RGB gets through
    with torch.no_grad():
        model.attend.bias.fill_(1e4)  # a_t = 1: the plain RGB features
    torch.testing.assert_close(_gate_inputs(model, x)[..., 0, 0], x[..., :D_RGB])


@pytest.mark.parametrize("shape", [(2, 7, D_RGB + D_FLOW), (2, 7, D_RGB + D_FLOW, 3, 3)])
@pytest.mark.parametrize("option", [3, 7])
def test_attention_shapes_and_every_parameter_learns(shape: tuple[int, ...], option: int) -> None:
    model = _attention(option=option)
    x, y = torch.randn(*shape), torch.tensor([0, 2])
    out = model(x)
    assert out.shape == (2, C)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))
    assert 0 < model.report()["attention_mean"] < 1
    model.train().loss(x, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any(n.startswith("flow_gru.") for n, _ in model.named_parameters())


def test_flow_changes_the_attention_prediction() -> None:
    model = _attention()
    x = torch.randn(2, 6, D_RGB + D_FLOW)
    other_flow = x.clone()
    other_flow[..., D_RGB:] = torch.randn(2, 6, D_FLOW)
    assert not torch.allclose(model(x), model(other_flow))


def test_early_fusion_ignores_stream_dims() -> None:
    plain = _tsrnn()
    given = _tsrnn(stream_dims=[D_RGB, D_FLOW])  # what the train stage passes for rgb+flow
    assert given.flow_gru is None
    given.load_state_dict(plain.state_dict())  # the same parameters
    x = torch.randn(2, 6, D_RGB + D_FLOW)
    torch.testing.assert_close(given(x), plain(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fusion": "attention"}, "needs two streams"),
        ({"fusion": "attention", "stream_dims": [4, 4]}, "summing to in_dim 9"),
        ({"fusion": "attention", "stream_dims": [4, 5], "option": 1}, "option 1 has none"),
        ({"fusion": "late"}, "tsrnn: fusion must be"),
        ({"stages": "staged", "option": 3}, "option 3 lacks one"),
        ({"stages": "staged", "stage_epochs": [1, 2]}, "tsrnn: stage_epochs must be 3"),
        ({"stages": "staged", "stage_epochs": [0, 0, 0]}, "not all 0"),
        ({"stage_epochs": [1, 1, 1]}, "stage_epochs is for stages 'staged'"),
        ({"stages": "cyclic"}, "tsrnn: stages must be"),
    ],
)
def test_rejects_bad_fusion_and_stage_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_head("tsrnn", in_dim=9, num_classes=C, **kwargs)


# --- staged training (section IV-C 3) ---


def _ids(params: list[torch.nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("fusion", ["early", "attention"])
def test_staged_phases_train_the_paper_branches(fusion: str) -> None:
    model = _attention(stages="staged") if fusion == "attention" else _tsrnn(stages="staged")
    assert model.spiking is not None
    keyframe, temporal, finetune = model.phases()
    assert [keyframe.name, temporal.name, finetune.name] == ["keyframe", "temporal", "finetune"]
    assert [keyframe.epochs, temporal.epochs, finetune.epochs] == [None, None, None]
    assert _ids(keyframe.params) == _ids(list(model.spiking.parameters()))
    named = dict(model.named_parameters())
    expected = {id(p) for n, p in named.items() if not n.startswith("spiking.")}
    assert _ids(temporal.params) == expected
    branches = {n.split(".")[0] for n, p in named.items() if id(p) in expected}
    want = {"gru", "classifier"} | ({"flow_gru", "attend"} if fusion == "attention" else set())
    assert branches == want
    assert _ids(finetune.params) == _ids(list(model.parameters()))
    custom = _tsrnn(stages="staged", stage_epochs=[3, 0, 2]).phases()
    assert [p.epochs for p in custom] == [3, 0, 2]


def test_phase_losses_are_eq2_eq7_and_the_joint_loss_by_hand() -> None:
    model = _tsrnn(stages="staged", keyframe_weight=0.3)  # option 7; eval: no dropout
    keyframe, temporal, finetune = model.phases()
    x, y = torch.randn(2, 10, D_RGB + D_FLOW), torch.tensor([1, 2])  # gamma 5: M = 2
    # eq. 2, per frame, averaged over frames and videos
    logits = model.spiking(x)  # type: ignore[misc]
    eq2 = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(10))
    torch.testing.assert_close(keyframe.loss(x, y), eq2)
    # eq. 7 with gains l/M = 1/2, 1 over the two activated windows
    p, _ = model.window_scores(x)
    eq7 = -(0.5 * p[torch.arange(2), 0, y].log() + 1.0 * p[torch.arange(2), 1, y].log()).mean()
    torch.testing.assert_close(temporal.loss(x, y), eq7)
    torch.testing.assert_close(finetune.loss(x, y), eq7 + 0.3 * eq2)
    torch.testing.assert_close(finetune.loss(x, y), model.loss(x, y))


def test_temporal_phase_computes_no_gradient_for_the_keyframe_branch() -> None:
    model = _tsrnn(stages="staged")
    _, temporal, finetune = model.phases()
    x, y = torch.randn(2, 10, D_RGB + D_FLOW), torch.tensor([1, 2])
    temporal.loss(x, y).backward()
    assert model.spiking is not None and model.gru is not None
    assert model.spiking.weight.grad is None  # fixed, as with the paper's learning rate 0
    assert model.gru.conv_x.weight.grad is not None
    model.zero_grad()
    finetune.loss(x, y).backward()  # fine-tuning: eq. 7 reaches B1 through the bridge again
    assert model.spiking.weight.grad is not None


def test_joint_training_is_one_phase_over_everything() -> None:
    model = _tsrnn()
    (phase,) = model.phases()
    assert phase.epochs is None and _ids(phase.params) == _ids(list(model.parameters()))
    x, y = torch.randn(2, 10, D_RGB + D_FLOW), torch.tensor([1, 2])
    torch.testing.assert_close(phase.loss(x, y), model.loss(x, y))


def _separable(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(n) % C
    x = (rng.normal(size=(C, D_RGB + D_FLOW)) * 2)[y][:, None] + rng.normal(size=(n, 6, 9))
    return x.astype(np.float32), y


@pytest.mark.parametrize(
    ("stage_epochs", "moved"),
    [([0, 2, 0], "temporal"), ([2, 0, 0], "keyframe"), ([0, 0, 1], "both")],
)
def test_fit_runs_the_phases_and_leaves_the_others_alone(
    stage_epochs: list[int], moved: str
) -> None:
    model = _tsrnn(
        stages="staged", stage_epochs=stage_epochs, fusion="attention", stream_dims=[D_RGB, D_FLOW]
    )
    assert model.spiking is not None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _separable()
    fit(model, x, y, TrainSettings(epochs=5, batch_size=4), seed=0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    spiking = {n for n in before if n.startswith("spiking.")}
    if moved == "temporal":
        assert changed == set(before) - spiking  # B1 fixed in stage 2
    elif moved == "keyframe":
        assert changed == spiking
    else:
        assert changed == set(before)


# --- per-recurrence scores (eq. 8; late SVM fusion "for each recurrence") ---


@pytest.mark.parametrize(
    ("kwargs", "m"),
    [
        ({"option": 7}, 3),
        ({"option": 4}, 12),
        ({"option": 1}, 12),
        ({"option": 3}, 3),
        ({"fusion": "attention", "stream_dims": [D_RGB, D_FLOW]}, 3),
    ],
)
def test_window_scores_mix_to_the_prediction(kwargs: dict[str, object], m: int) -> None:
    model = _tsrnn(**kwargs).train()  # the scores are eval-mode ones whatever the mode
    x = torch.randn(2, 12, D_RGB + D_FLOW)  # gamma 5: windows [0..4], [5..9], [10, 11]
    p, w = model.window_scores(x)
    assert model.training  # the mode is restored
    assert p.shape == (2, m, C) and w.shape == (m,)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, m))
    again, _ = model.window_scores(x)
    torch.testing.assert_close(again, p)  # no dropout
    if kwargs.get("option") in (7, None):
        torch.testing.assert_close(w, torch.tensor([1 / 3, 2 / 3, 1.0]))  # eq. (7): l / M
    mix = (w[:, None] * p).sum(1) / w.sum()  # eq. (8), normalised
    torch.testing.assert_close(mix, model.eval()(x).softmax(-1))
    assert not p.requires_grad
