"""Residual stacked LSTM (Res-LSTM; Lakhal et al., ECCV-W 2018, paper 001): sigma(t) sub-sampling,
x_t^l = m_t^l + x_t^{l-1} between layers (eq. 1), softmax on m_T^L at the last step (eq. 2)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from pipeline.heads import register_head
from pipeline.steps import sigma

log = logging.getLogger(__name__)

PROJECTIONS = ("pca", "learned")


def pca_components(
    x: Tensor | Iterable[Tensor], k: int, *, chunk: int = 65536
) -> tuple[Tensor, Tensor]:
    """x: (N, D), or batches (N_i, ..., D) that together are the N rows -> (mean (D,),
    components (D, k)), the top-k principal directions as columns.

    One pass in float64: the sum and the cross-product of the rows shifted by the first
    batch's mean (shifted, so that a large common offset does not cancel catastrophically), so
    features streamed in batches get the same PCA as a tensor of all of them (to float64
    rounding), with no centred copy. k > D pads with zero columns (no direction left). The sign
    of each column is fixed (largest-magnitude entry positive) so a refit is reproducible."""
    batches = [x] if isinstance(x, Tensor) else x
    n, shift, total, cross = 0, None, None, None
    for batch in batches:
        flat = batch.reshape(-1, batch.shape[-1])
        for i in range(0, len(flat), chunk):
            c = flat[i : i + chunk].to(torch.float64)
            if shift is None:
                shift = c.mean(dim=0)
                total = torch.zeros_like(shift)
                cross = torch.zeros(len(shift), len(shift), dtype=torch.float64)
            c = c - shift
            total += c.sum(dim=0)
            cross += c.T @ c
            n += len(c)
    if shift is None or total is None or cross is None:
        raise ValueError("res_lstm: PCA needs at least one training row, got none")
    d = len(shift)
    mean = total / n
    cov = (cross - n * torch.outer(mean, mean)) / max(n - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    evecs = evecs.flip(-1)[:, : min(k, d)]
    pivot = evecs.abs().argmax(dim=0)
    evecs = evecs * evecs[pivot, torch.arange(evecs.shape[1])].sign()
    comps = torch.zeros(d, k, dtype=torch.float64)
    comps[:, : evecs.shape[1]] = evecs
    return (shift + mean).float(), comps.float()


@register_head("res_lstm")
class ResLSTM(nn.Module):
    """Residual stacked LSTM, classified from the last layer's last step.

    x: (B, K, D) -> x^0: (B, T, H) (sigma sub-sampling, then the projection D -> H when D != H)
    -> L LSTM layers of width H, x^l = m^l + x^{l-1} -> logits W_y m_T^L: (B, num_classes).

    - ``steps``: T, the number of steps sigma(t) takes from the K given (None = all K).
    - ``projection``: how x^0 gets the hidden width H when D != H (unused when D == H).
      ``"pca"`` (the paper's): the top-H principal directions of the training frames, fitted in
      ``prepare`` and kept as buffers (a fixed map (x - mean) @ V). If ``prepare`` was never
      called, the map is identity-truncation (the first H input dims, zero-padded when D < H)
      and a warning is logged once. For H > D the PCA map is padded with zero columns.
      ``"learned"``: an ``nn.Linear(D, H)`` trained with the rest.
    - ``residual``: False gives the plain stacked LSTM of the paper's ablation (Fig. 3), on the
      same projected input.

    Differences from the paper: the paper feeds 3D-CNN clip features (C3D / TSN, 10-crop mean,
    eq. 5); here any cached per-frame feature is x^0. The paper gives no dropout; ``dropout``
    (default 0) is applied to each m^l and before W_y when set. The softmax of eq. (2) is left
    to the loss / predict (forward returns logits).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        hidden: int = 1024,  # paper section 4.1: h = 1024
        layers: int = 2,  # paper: 2 layers work best with 3D-CNN features (Fig. 3b-c)
        steps: int | None = None,  # paper: T = 25 (Table 1); None = all K cached steps
        projection: str = "pca",
        residual: bool = True,
        dropout: float = 0.0,  # not in the paper
    ) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"res_lstm: hidden must be >= 1, got {hidden}")
        if layers < 1:
            raise ValueError(f"res_lstm: layers must be >= 1, got {layers}")
        if steps is not None and steps < 1:
            raise ValueError(f"res_lstm: steps must be >= 1 or null, got {steps}")
        if projection not in PROJECTIONS:
            raise ValueError(
                f"res_lstm: projection must be one of {PROJECTIONS}, got '{projection}'"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"res_lstm: dropout must be in [0, 1), got {dropout}")
        self.steps = steps
        self.residual = residual
        self.projection = projection if in_dim != hidden else None
        if self.projection == "learned":
            self.proj = nn.Linear(in_dim, hidden)
        # PCA buffers exist in every mode with in_dim != hidden so state_dicts stay uniform;
        # until prepare() fits them they are identity-truncation.
        self.register_buffer("pca_mean", torch.zeros(in_dim))
        self.register_buffer("pca_components", torch.eye(in_dim, hidden))
        self.register_buffer("pca_fitted", torch.tensor(False))
        self.lstms = nn.ModuleList(nn.LSTM(hidden, hidden, batch_first=True) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)  # W_y of eq. (2)
        self._warned = False

    @torch.no_grad()
    def prepare(self, x: Tensor | Iterable[Tensor]) -> None:
        """x: (N, T, D), every training video, or batches (B, T, D) of them (streamed from the
        cache): fits the PCA map on every frame (projection="pca" only)."""
        if self.projection != "pca":
            return
        mean, comps = pca_components(x, self.pca_components.shape[1])
        self.pca_mean.copy_(mean)
        self.pca_components.copy_(comps)
        self.pca_fitted.fill_(True)

    def project(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> x^0: (B, T, H)."""
        if self.projection is None:
            return x
        if self.projection == "learned":
            return self.proj(x)
        if not self.pca_fitted and not self._warned:
            log.warning("res_lstm: PCA not fitted (prepare() not called); using the first dims")
            self._warned = True
        return (x - self.pca_mean) @ self.pca_components

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, K, D) -> logits (B, num_classes)."""
        if self.steps is not None:
            x = x[:, sigma(x.shape[1], self.steps)]  # x_t^0 = a_sigma(t)
        h = self.project(x)
        for lstm in self.lstms:
            m, _ = lstm(h)  # c_t^l, m_t^l = LSTM_l(c_{t-1}^l, m_{t-1}^l, x_t^{l-1})
            m = self.dropout(m)
            h = m + h if self.residual else m  # eq. (1): x_t^l = m_t^l + x_t^{l-1}
        return self.fc(m[:, -1])  # eq. (2): softmax((m_T^L)^T W_y), softmax left to the loss
