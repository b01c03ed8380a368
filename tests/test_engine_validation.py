"""The cross-fitting's validation curve (engine.out_of_fold's ``on_epoch``, fit's ``validate``):
each fold model's top-1 on its held-out videos after every epoch, recorded without changing the
training. train_log.json's ``val_top1`` and the curves' val_top1.tsv come from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import slow_cases

from pipeline.engine import EpochLog, TrainSettings, held_out_top1, mean_over_views, out_of_fold
from pipeline.heads import build_head, head_names

pytestmark = pytest.mark.usefixtures("one_thread")

T, D, C = 6, 8, 3
SMALL = {"lstm": {"hidden": 8}, "res_lstm": {"hidden": 8}, "sru": {"hidden": 8}}  # seconds


def _data(seed: int = 0, per_class: int = 6, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), per_class)
    x = signal * rng.normal(size=(C, D))[y][:, None, :] + rng.normal(size=(len(y), T, D))
    return x.astype(np.float32), y


def _maker(name: str):  # noqa: ANN202
    """A head builder; the weights it draws depend on the global RNG, seeded by each test
    before out_of_fold (as the train stage seeds before its models)."""

    def make() -> torch.nn.Module:
        return build_head(name, in_dim=D, num_classes=C, **SMALL.get(name, {}))

    return make


def _settings(name: str) -> TrainSettings:
    pre = {"pretrain_epochs": 1} if name == "rtsae" else {}
    return TrainSettings(epochs=3, batch_size=4, **pre)


@pytest.mark.parametrize("name", slow_cases(head_names(), {"lstm", "rtsae"}))
def test_recording_the_validation_curve_changes_no_score(name: str) -> None:
    """The same out-of-fold scores with the curve recorded as without, for every head (eval
    mode and back must leave dropout, batch norm and the RNG as they were)."""
    x, y = _data()
    torch.manual_seed(0)
    plain = out_of_fold(_maker(name), x, y, _settings(name), folds=2, seed=0, num_classes=C)
    seen: list[tuple[int, EpochLog]] = []
    torch.manual_seed(0)
    traced = out_of_fold(
        _maker(name), x, y, _settings(name), folds=2, seed=0, num_classes=C,
        on_epoch=lambda f, e: seen.append((f, e)),
    )  # fmt: skip
    np.testing.assert_array_equal(traced, plain)
    epochs = 3 + (1 if name == "rtsae" else 0)
    assert [f for f, _ in seen] == [0] * epochs + [1] * epochs
    assert all(e.val is not None and 0.0 <= e.val <= 1.0 for _, e in seen)


def test_the_last_epochs_value_is_the_top1_of_the_scores_the_fold_model_gave() -> None:
    """After its last epoch a fold model is the one that scored its held-out videos: its val
    is their top-1, computed here from those scores."""
    x, y = _data(seed=1, per_class=10, signal=0.3)
    seen: dict[int, list[EpochLog]] = {}
    probs = out_of_fold(
        _maker("lstm"), x, y, TrainSettings(epochs=8, batch_size=4, lr=1e-2), folds=3, seed=0,
        num_classes=C, on_epoch=lambda f, e: seen.setdefault(f, []).append(e),
    )  # fmt: skip
    from pipeline.engine import fold_assignment

    fold = fold_assignment(y, folds=3, seed=0, num_classes=C)
    for f, epochs in seen.items():
        te = fold == f
        assert epochs[-1].val == pytest.approx(float((probs[te].argmax(1) == y[te]).mean()))
    # and it moves as the model trains (a curve, not one value repeated)
    assert len({e.val for es in seen.values() for e in es}) > 1


def test_with_views_the_top1_is_per_video_over_the_mean_of_its_views() -> None:
    """Two views of video 0 (label 0) with probabilities that only their mean gets right, and
    one view of video 1 (label 1)."""

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, :2]  # logits given in the data

    logits = np.log(np.array([[0.6, 0.4], [0.45, 0.55], [0.2, 0.8]], dtype=np.float32))
    x = logits[:, None, :]
    y, groups = np.array([0, 0, 1]), np.array([0, 0, 1])
    probs = mean_over_views(np.exp(logits), groups)
    assert probs.argmax(1).tolist() == [0, 1]
    assert held_out_top1(Fixed(), x=x, y=y, groups=groups) == 1.0
    assert held_out_top1(Fixed(), x=x, y=y) == pytest.approx(2 / 3)  # per row: view 2 wrong
