"""Every head trains at the real datasets' training-set sizes: the official UCF101 and HMDB51
split files give N, and N % batch_size == 1 (UCF101 split 1: 9,537 = 596 x 16 + 1) once left a
last mini-batch of one row, on which BatchNorm in training mode raises (TS-LSTM, temporal
inception). Tiny synthetic features (T=3, D=4; 4 x 2 x 2 maps for TSRNN) keep it to seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import slow_cases

from pipeline.engine import TrainSettings, batch_bounds, fit, out_of_fold
from pipeline.heads import build_head, head_names

pytestmark = pytest.mark.usefixtures("one_thread")

C = 3
# The smallest sizes each head takes, so that one epoch over ~10k rows takes seconds.
TINY: dict[str, dict] = {
    "lstm": {"hidden": 4},
    "max_pool": {},
    "mean_pool": {},
    "res_lstm": {"hidden": 4, "layers": 1},
    "rtsae": {"hidden": 4, "projection_dim": 4, "encoder_hidden": 4, "encoder_layers": 1},
    "sru": {"hidden": 4, "layers": 1},
    "temporal_inception": {"fc_dim": 4, "channels": (1, 1, 1, 1), "kernel_sizes": (3,)},
    "ts_lstm": {"hidden": (4,), "segments": 1},
    "tsrnn": {"hidden": 2, "window": 1},
}


def _train_sizes(testdata: Path) -> dict[str, int]:
    """{dataset split: number of training videos} from the official split files."""
    ucf = testdata / "splits" / "ucf101_splits"
    hmdb = testdata / "splits" / "hmdb51_splits"
    if not ucf.is_dir() or not hmdb.is_dir():
        pytest.skip(f"{ucf} or {hmdb} is absent")
    sizes = {}
    for k in (1, 2, 3):
        lines = (ucf / f"trainlist0{k}.txt").read_text().split()
        sizes[f"ucf101/{k}"] = sum(1 for w in lines if w.endswith(".avi"))
        roles = [
            line.split()[1]
            for f in sorted(hmdb.glob(f"*_test_split{k}.txt"))
            for line in f.read_text().splitlines()
            if line.strip()
        ]
        sizes[f"hmdb51/{k}"] = roles.count("1")  # 1 = train, 2 = test, 0 = unused
    return sizes


def _one_bs(n: int) -> int | None:
    """A batch size in 17..128 with n % batch_size == 1 (the last batch holds one row); None
    when n - 1 has no divisor there."""
    return next((b for b in range(17, 129) if n % b == 1), None)


def _data(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    shape = (n, 3, 4, 2, 2) if name == "tsrnn" else (n, 3, 4)
    return rng.standard_normal(shape).astype(np.float32), np.arange(n) % C


def test_the_split_files_give_the_sizes_of_the_papers(testdata: Path) -> None:
    sizes = _train_sizes(testdata)
    assert sizes["ucf101/1"] == 9537 and sizes["ucf101/1"] % 16 == 1
    assert sizes["hmdb51/1"] == 3570


@pytest.mark.parametrize(
    ("n", "bs"), [(9537, 16), (17, 16), (33, 16), (16, 16), (1, 16), (2, 16), (5, 1), (7, 3)]
)
def test_batch_bounds_cover_every_row_once_and_leave_no_batch_of_one(n: int, bs: int) -> None:
    bounds = batch_bounds(n, bs)
    assert [a for a, _ in bounds] == [0] + [b for _, b in bounds[:-1]]  # contiguous
    assert bounds[-1][1] == n
    sizes = [b - a for a, b in bounds]
    if bs > 1 and n > 1:
        assert min(sizes) >= 2
    assert max(sizes) <= bs + 1


@pytest.mark.parametrize("name", slow_cases(head_names(), {"rtsae", "sru", "tsrnn"}))
def test_every_head_trains_an_epoch_at_every_real_split_size(name: str, testdata: Path) -> None:
    sizes = _train_sizes(testdata)
    # each N once, at batch 16 where that leaves one row over (UCF101 split 1: 9,537 = 596 x 16
    # + 1), else at a batch size that does (HMDB51 split 1: 3,570 = 83 x 43 + 1), else at 16
    cases = [(n, 16 if n % 16 == 1 else _one_bs(n) or 16) for n in sorted(set(sizes.values()))]
    assert sum(n % bs == 1 for n, bs in cases) >= 3
    for n, bs in cases:
        x, y = _data(name, n)
        torch.manual_seed(0)
        model = build_head(name, in_dim=4, num_classes=C, **TINY[name])
        s = TrainSettings(
            epochs=1, batch_size=bs, pretrain_epochs=1 if hasattr(model, "pretrain_loss") else 0
        )
        losses = fit(model, x, y, s, seed=0, desc=f"{name} N={n}")
        assert len(losses) == 1 and np.isfinite(losses[0]), (name, n, bs, losses)


@pytest.mark.parametrize("name", ["ts_lstm", "temporal_inception"])
def test_out_of_fold_folds_with_a_last_batch_of_one_train(name: str) -> None:
    """2 folds of 34 rows: each fold trains on 17 = 16 + 1 rows at batch 16."""
    x, y = _data(name, 34)
    probs = out_of_fold(
        lambda: build_head(name, in_dim=4, num_classes=C, **TINY[name]),
        x,
        y,
        TrainSettings(epochs=1, batch_size=16),
        folds=2,
        seed=0,
        num_classes=C,
    )
    assert probs.shape == (34, C) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
