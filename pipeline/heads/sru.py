"""Stacked SRU with pooled per-step predictions, and the multi-level MRRN (paper 002, R-SRU).

The SRU cell (eqs. 2-6) is written in plain torch: the three (four) matrix products of a layer run
once over all time steps, and only the elementwise recurrence of the cell state (eq. 5) is a Python
loop over T, as in Lei & Zhang's design that the paper adopts.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.heads import register_head

POOLINGS = ("mean", "max")
LEVEL_NAMES = ("low", "mid", "high")  # the order of ``levels`` (eq. 7: layer2, 3, 4)


class SRULayer(nn.Module):
    """One SRU layer: x (B, T, in_dim) -> h (B, T, hidden).

    Weight blocks (each (hidden, in_dim), orthogonally initialised, Saxe et al. as in the paper):
    W (eq. 2), W_f (eq. 3), W_r (eq. 4) and, when in_dim != hidden, W_h projecting the highway
    input x_t of eq. 6 to the hidden size (the paper's eq. 6 needs equal sizes; Lei & Zhang's SRU
    adds this projection). ``dropout`` is a variational (one mask per sequence) dropout on the
    input of these linear maps, the paper's "dropout 0.5 for linear transformations".
    """

    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.hidden = hidden
        self.project_highway = in_dim != hidden
        self.blocks = 4 if self.project_highway else 3
        self.weight = nn.Parameter(torch.empty(self.blocks * hidden, in_dim))
        self.bias = nn.Parameter(torch.zeros(2 * hidden))  # b_f (eq. 3), b_r (eq. 4)
        self.dropout = dropout
        for block in self.weight.data.split(hidden):
            nn.init.orthogonal_(block)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, in_dim) -> h: (B, T, hidden)."""
        xd = x
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(keep) / keep
            xd = x * mask  # the same mask at every step (variational dropout)
        u = F.linear(xd, self.weight)  # all time steps at once: (B, T, blocks * hidden)
        parts = u.split(self.hidden, dim=-1)
        x_tilde = parts[0]  # eq. (2): x~_t = W x_t
        b_f, b_r = self.bias.split(self.hidden)
        f = torch.sigmoid(parts[1] + b_f)  # eq. (3): f_t = sigma(W_f x_t + b_f)
        r = torch.sigmoid(parts[2] + b_r)  # eq. (4): r_t = sigma(W_r x_t + b_r)
        highway = parts[3] if self.project_highway else x
        c = x.new_zeros(x.shape[0], self.hidden)
        cs = []
        for t in range(x.shape[1]):  # the only sequential part: elementwise
            c = f[:, t] * c + (1 - f[:, t]) * x_tilde[:, t]  # eq. (5)
            cs.append(c)
        c_all = torch.stack(cs, dim=1)
        return r * torch.tanh(c_all) + (1 - r) * highway  # eq. (6): h_t = r g(c_t) + (1-r) x_t


class SRUStack(nn.Module):
    """Stacked SRU + per-step classifier + temporal pooling: (B, T, D) -> pooled logits (B, C)."""

    def __init__(
        self, in_dim: int, num_classes: int, hidden: int, layers: int, dropout: float, pooling: str
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * layers
        # dropout 0 between RNN layers: only the linear maps' inputs are dropped (paper sec. 4.2)
        self.layers = nn.ModuleList(SRULayer(a, b, dropout) for a, b in pairwise(dims))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)  # W_j of eqs. 8-9, shared by the time steps
        self.pooling = pooling

    def step_logits(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> per-step predictions W_j tanh(h_t) (B, T, C)."""
        h = x
        for layer in self.layers:
            h = layer(h)
        # "hyperbolic tangent activate layers on the top of stacked SRUs for predictions at each
        # time step" (sec. 4.2)
        return self.fc(self.dropout(torch.tanh(h)))

    def forward(self, x: Tensor) -> Tensor:
        s = self.step_logits(x)
        if self.pooling == "mean":
            return s.mean(dim=1)  # eq. (8): softmax of (1/N) sum_t W_j h_t
        return s.amax(dim=1)  # eq. (9): softmax of max_t W_j h_t


@register_head("sru")
class SRUHead(nn.Module):
    """Stacked SRU (R-SRU / RRN) or multi-level MRRN. x: (B, T, D) -> logits (B, num_classes).

    ``levels=None``: one stack over the D-dim features; the logits are the per-step predictions
    pooled over time (eq. 8 mean or eq. 9 max, before the softmax).

    ``levels=[d_low, d_mid, d_high]`` (summing to D, the features concatenated in that order, e.g.
    [128, 256, 512] from ResNet-34 layer2/3/4 spatially averaged, eq. 7): one independent stack per
    level; the output is log P_final with P_final = sum_l w_l softmax(logits_l) (eq. 10), so
    softmax(forward(x)) is exactly P_final. ``loss`` sums each level's own cross-entropy: the paper
    trains the three models separately and only fuses their softmax scores.

    Differences from the paper (end-to-end there; here on cached features):
    - the ResNet-34 is frozen (the cache); clips of 30 frames with stride 8 (at most 20 per video,
      softmax-averaged) become the cached T steps of one video.
    - eq. 6's highway term x_t needs in_dim == hidden; where they differ (the first layer) x_t is
      projected by a fourth orthogonal block W_h, as in Lei & Zhang's SRU implementation.
    - W_jt of eqs. 8-9 is one classifier shared by all steps, so any T works.
    - the per-level learning rates (1e-4 for low/mid, 1e-5 for high) are the training settings
      ``lr: 1.0e-5`` and ``group_lr: {low: 1.0e-4, mid: 1.0e-4}`` (``param_groups``).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        hidden: int = 1024,
        layers: int = 3,
        pooling: str = "mean",
        dropout: float = 0.5,
        levels: list[int] | None = None,
        # eq. 10's c, b, a = 0.1, 0.2, 0.7 for low, mid, high (used only with levels)
        level_weights: list[float] = [0.1, 0.2, 0.7],  # noqa: B006 (copied, never mutated)
    ) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"sru: hidden must be >= 1, got {hidden}")
        if layers < 1:
            raise ValueError(f"sru: layers must be >= 1, got {layers}")
        if pooling not in POOLINGS:
            raise ValueError(f"sru: pooling must be one of {POOLINGS}, got '{pooling}'")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"sru: dropout must be in [0, 1), got {dropout}")
        if levels is None:
            dims = [in_dim]
            weights = [1.0]
        else:
            if not levels or any(d < 1 for d in levels):
                raise ValueError(f"sru: levels must be positive dims, got {levels}")
            if sum(levels) != in_dim:
                raise ValueError(
                    f"sru: levels {levels} sum to {sum(levels)}, but in_dim is {in_dim}"
                )
            weights = [float(w) for w in level_weights]
            if len(weights) != len(levels):
                raise ValueError(
                    f"sru: level_weights {weights} must have one weight per level {levels}"
                )
            if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
                raise ValueError(f"sru: level_weights must be >= 0 and sum to 1, got {weights}")
            dims = list(levels)
        self.dims = dims
        self.single = levels is None
        self.register_buffer("level_weights", torch.tensor(weights), persistent=False)
        self.stacks = nn.ModuleList(
            SRUStack(d, num_classes, hidden, layers, dropout, pooling) for d in dims
        )

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{level: its stack's parameters}: "low", "mid", "high" for three ``levels`` (eq. 10's
        P_L, P_M, P_H), "level0", "level1", ... for another number; {} without ``levels`` (one
        stack). The training setting ``group_lr`` gives a level its own learning rate (the
        paper trains low and mid at 1e-4, high at 1e-5)."""
        if self.single:
            return {}
        names = (
            LEVEL_NAMES if len(self.stacks) == 3 else [f"level{i}" for i in range(len(self.stacks))]
        )
        return {n: list(s.parameters()) for n, s in zip(names, self.stacks, strict=True)}

    def level_logits(self, x: Tensor) -> list[Tensor]:
        """x: (B, T, D) -> one pooled-logit tensor (B, C) per level (low -> high)."""
        return [
            stack(part) for stack, part in zip(self.stacks, x.split(self.dims, dim=-1), strict=True)
        ]

    def _fuse(self, logits: list[Tensor]) -> Tensor:
        if len(logits) == 1:
            return logits[0]
        # eq. (10): P_final = a P_H + b P_M + c P_L; returned as log P_final (logsumexp is stable)
        logp = torch.stack([F.log_softmax(z, dim=-1) for z in logits])  # (L, B, C)
        return torch.logsumexp(logp + self.level_weights.log()[:, None, None], dim=0)

    def forward(self, x: Tensor) -> Tensor:
        return self._fuse(self.level_logits(x))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Sum of each level's cross-entropy: the levels train as independent models."""
        return sum(F.cross_entropy(z, y) for z in self.level_logits(x))
