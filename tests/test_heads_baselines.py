"""The Table 3 baselines (pipeline/heads/max_pool.py, mean_pool.py, lstm.py) against hand
computations with each module's own weights: max over time, mean over time, and an LSTM run
step by step whose last step is classified."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from pipeline.heads import build_head

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, D, C = 3, 5, 4, 3


def lstm_by_hand(lstm: nn.LSTM, x: Tensor) -> Tensor:
    """x: (B, T, D) -> the last layer's hidden states (B, T, H) of the stacked ``lstm``
    (batch_first, no inter-layer dropout in effect), recomputed step by step from its weights
    with the LSTM equations, PyTorch's gate order (i, f, g, o), zero initial state:
    i, f, o = sigma(W_i x + b_i + U_i h + b'_i), ...; g = tanh(...); c = f c + i g;
    h = o tanh(c)."""
    seq = [x[:, t] for t in range(x.shape[1])]
    for layer in range(lstm.num_layers):
        w_ih = getattr(lstm, f"weight_ih_l{layer}")
        w_hh = getattr(lstm, f"weight_hh_l{layer}")
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        h = x.new_zeros(x.shape[0], lstm.hidden_size)
        c = torch.zeros_like(h)
        out = []
        for x_t in seq:
            i, f, g, o = (x_t @ w_ih.T + h @ w_hh.T + bias).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        seq = out
    return torch.stack(seq, dim=1)


def _x() -> Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))


def _build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return build_head(name, in_dim=D, num_classes=C, **kwargs).eval()


def test_lstm_by_hand_matches_torch() -> None:
    """The reference itself: nn.LSTM's own output, so a wrong gate order would show here."""
    torch.manual_seed(0)
    lstm = nn.LSTM(D, 6, num_layers=2, batch_first=True)
    x = _x()
    torch.testing.assert_close(lstm_by_hand(lstm, x), lstm(x)[0])


def test_max_pool_classifies_the_max_over_time() -> None:
    model = _build("max_pool")
    x = _x()
    pooled = torch.stack(
        [
            torch.tensor([max(x[b, t, d].item() for t in range(T)) for d in range(D)])
            for b in range(B)
        ]
    )  # (B, D), maximum of each feature over the T steps
    torch.testing.assert_close(model(x), pooled @ model.fc.weight.T + model.fc.bias)
    # step 2 made the maximum of every feature: the other steps no longer matter
    x[:, 2] = x.abs().amax() + 1.0
    shrunk = x.clone()
    shrunk[:, [0, 1, 3, 4]] *= 0.5
    torch.testing.assert_close(model(shrunk), model(x))
    torch.testing.assert_close(model(x), model.fc(x[:, 2]))


def test_mean_pool_classifies_the_mean_over_time() -> None:
    model = _build("mean_pool")
    x = _x()
    pooled = sum(x[:, t] for t in range(T)) / T  # (B, D)
    torch.testing.assert_close(model(x), pooled @ model.fc.weight.T + model.fc.bias)
    # moving mass between steps keeps the mean, so the logits (max pool would change)
    moved = x.clone()
    moved[:, 0] += 2.0
    moved[:, 1] -= 2.0
    torch.testing.assert_close(model(moved), model(x))


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_lstm_classifies_the_last_step(layers: int) -> None:
    model = _build("lstm", hidden=6, layers=layers)
    x = _x()
    h = lstm_by_hand(model.lstm, x)
    torch.testing.assert_close(model(x), h[:, -1] @ model.fc.weight.T + model.fc.bias)
    # the output at earlier steps is not read: only the state that reaches the last step
    assert not torch.allclose(h[:, 0], h[:, -1])


def test_lstm_logits_follow_the_state_at_the_last_step_of_any_length() -> None:
    """The first t steps of a video give the logits of the hand LSTM's state at step t."""
    model = _build("lstm", hidden=6)
    x = _x()
    h = lstm_by_hand(model.lstm, x)
    for t in range(1, T + 1):
        expected = h[:, t - 1] @ model.fc.weight.T + model.fc.bias
        torch.testing.assert_close(model(x[:, :t]), expected)


@pytest.mark.parametrize("name", ["max_pool", "mean_pool", "lstm"])
def test_dropout_is_active_in_training_only(name: str) -> None:
    model = _build(name, dropout=0.5)
    x = _x()
    eval_out = model(x)
    model.train()
    torch.manual_seed(3)
    assert not torch.allclose(model(x), eval_out)
    model_off = _build(name, dropout=0.0).train()
    torch.testing.assert_close(model_off(x), _build(name, dropout=0.0)(x))
