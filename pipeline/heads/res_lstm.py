"""Residual stacked LSTM (Res-LSTM; Lakhal et al., ECCV-W 2018, paper 001): sigma(t) sub-sampling,
x_t^l = m_t^l + x_t^{l-1} between layers (eq. 1), softmax on m_T^L at the last step (eq. 2)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.heads import register_head
from pipeline.steps import sigma

log = logging.getLogger(__name__)

PROJECTIONS = ("pca", "learned")
FUSIONS = ("concat", "sum", "product")


class _Moments:
    """Running sum and cross-product of rows (N, D), shifted by the first rows' mean (shifted,
    so that a large common offset does not cancel catastrophically), in float64: one pass over
    streamed batches gives the same PCA as one tensor of all the rows (to float64 rounding),
    with no centred copy."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: Tensor | None = None
        self.total: Tensor | None = None
        self.cross: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        """rows: (N, D), any float dtype."""
        c = rows.to(torch.float64)
        if self.shift is None:
            self.shift = c.mean(dim=0)
            self.total = torch.zeros_like(self.shift)
            self.cross = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64)
        assert self.total is not None and self.cross is not None
        c = c - self.shift
        self.total += c.sum(dim=0)
        self.cross += c.T @ c
        self.n += len(c)

    def components(self, k: int) -> tuple[Tensor, Tensor]:
        """-> (mean (D,), the top-k principal directions as columns (D, k)), see pca_components."""
        if self.shift is None or self.total is None or self.cross is None:
            raise ValueError("res_lstm: PCA needs at least one training row, got none")
        n, d = self.n, len(self.shift)
        mean = self.total / n
        cov = (self.cross - n * torch.outer(mean, mean)) / max(n - 1, 1)
        _, evecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        evecs = evecs.flip(-1)[:, : min(k, d)]
        pivot = evecs.abs().argmax(dim=0)
        evecs = evecs * evecs[pivot, torch.arange(evecs.shape[1])].sign()
        comps = torch.zeros(d, k, dtype=torch.float64)
        comps[:, : evecs.shape[1]] = evecs
        return (self.shift + mean).float(), comps.float()


def stream_pca_components(
    x: Tensor | Iterable[Tensor], k: int, dims: Sequence[int] | None = None, *, chunk: int = 65536
) -> list[tuple[Tensor, Tensor]]:
    """x: (N, D), or batches (N_i, ..., D) that together are the N rows; dims: the widths of the
    streams that the D columns are, in order (None = one stream of all D) -> for each stream,
    (mean (d_s,), components (d_s, k)) of its own columns, all from one pass over x."""
    batches = [x] if isinstance(x, Tensor) else x
    moments: list[_Moments] = []
    bounds: list[tuple[int, int]] = []
    for batch in batches:
        flat = batch.reshape(-1, batch.shape[-1])
        if not moments:
            widths = list(dims) if dims is not None else [flat.shape[1]]
            if sum(widths) != flat.shape[1]:
                raise ValueError(
                    f"res_lstm: stream dims {widths} do not add up to the features' "
                    f"{flat.shape[1]} columns"
                )
            edges = [0, *torch.tensor(widths).cumsum(0).tolist()]
            bounds = list(zip(edges[:-1], edges[1:], strict=True))
            moments = [_Moments() for _ in bounds]
        for i in range(0, len(flat), chunk):
            for (a, b), mom in zip(bounds, moments, strict=True):
                mom.add(flat[i : i + chunk, a:b])
    if not moments:
        raise ValueError("res_lstm: PCA needs at least one training row, got none")
    return [mom.components(k) for mom in moments]


def pca_components(
    x: Tensor | Iterable[Tensor], k: int, *, chunk: int = 65536
) -> tuple[Tensor, Tensor]:
    """x: (N, D), or batches (N_i, ..., D) that together are the N rows -> (mean (D,),
    components (D, k)), the top-k principal directions as columns.

    One pass in float64 (see _Moments), so features streamed in batches get the same PCA as a
    tensor of all of them. k > D pads with zero columns (no direction left). The sign of each
    column is fixed (largest-magnitude entry positive) so a refit is reproducible."""
    return stream_pca_components(x, k, chunk=chunk)[0]


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
    - ``fusion`` (two streams, section 3.2): ``"concat"``: x^0 is the projection of the streams'
      features side by side (one PCA over all D), as for one stream. ``"sum"`` / ``"product"``:
      the paper's mid fusion x_t^0 = x_t^c (+) x_t^f / x_t^c (.) x_t^f. It needs
      ``stream_dims`` [d_rgb, d_flow] (the train stage passes it for "rgb+flow"; the rgb columns
      come first): each stream gets its own map to the common width H (``projection``: its own
      PCA, fitted on the training frames in ``prepare``, or its own ``nn.Linear``), and the two
      H-vectors are added or multiplied elementwise. The paper reduces its 4,096-d features by
      PCA to the LSTM's width for the residual (section 4.1) but does not say where, relative to
      the fusion; projecting each stream first is the order that makes x^c and x^f the same size
      whatever the two backbones' widths (ours may differ). The common width is H, so H must not
      exceed either stream's dim (a stream's PCA beyond its dim would be zero columns: a
      product with them is zero). Component i of one stream meets component i of the other,
      both ranked by variance. Both streams are always projected in this mode (even a stream of
      width H), so they are centred alike.

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
        fusion: Literal["concat", "sum", "product"] = "concat",
        stream_dims: list[int] | None = None,  # [d_rgb, d_flow], set by the train stage
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
        if fusion not in FUSIONS:
            raise ValueError(f"res_lstm: fusion must be one of {FUSIONS}, got '{fusion}'")
        if stream_dims is not None and sum(stream_dims) != in_dim:
            raise ValueError(f"res_lstm: stream_dims {stream_dims} must sum to in_dim {in_dim}")
        self.fusion = fusion
        self.stream_dims: list[int] | None = None
        if fusion != "concat":
            if stream_dims is None or len(stream_dims) != 2:
                raise ValueError(
                    f"res_lstm: fusion '{fusion}' (mid fusion) needs two streams: train it on "
                    f"stream 'rgb+flow' (stream_dims [d_rgb, d_flow]), got stream_dims "
                    f"{stream_dims}; a single stream takes fusion 'concat'"
                )
            if hidden > min(stream_dims):
                raise ValueError(
                    f"res_lstm: fusion '{fusion}' projects each stream to hidden={hidden}, "
                    f"which must not exceed either stream's dim {stream_dims}"
                )
            self.stream_dims = list(stream_dims)
        self.steps = steps
        self.residual = residual
        # mid fusion always projects (each stream to H); in_dim = d_c + d_f > H there anyway
        self.projection = projection if in_dim != hidden or self.stream_dims else None
        if self.projection == "learned":
            if self.stream_dims is None:
                self.proj = nn.Linear(in_dim, hidden)
            else:
                self.stream_proj = nn.ModuleList(nn.Linear(d, hidden) for d in self.stream_dims)
        # PCA buffers exist in every mode with in_dim != hidden so state_dicts stay uniform;
        # until prepare() fits them they are identity-truncation. With mid fusion the rows of
        # each stream hold that stream's own map: pca_mean[a:b] its mean, pca_components[a:b]
        # its (d_s, H) components (same shapes as one map over all D).
        self.register_buffer("pca_mean", torch.zeros(in_dim))
        eyes = [torch.eye(d, hidden) for d in (self.stream_dims or [in_dim])]
        self.register_buffer("pca_components", torch.cat(eyes))
        self.register_buffer("pca_fitted", torch.tensor(False))
        self.lstms = nn.ModuleList(nn.LSTM(hidden, hidden, batch_first=True) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)  # W_y of eq. (2)
        self._warned = False

    @torch.no_grad()
    def prepare(self, x: Tensor | Iterable[Tensor]) -> None:
        """x: (N, T, D), every training video, or batches (B, T, D) of them (streamed from the
        cache): fits the PCA map on every frame (projection="pca" only); with mid fusion one
        PCA per stream, on that stream's columns, in the same single pass."""
        if self.projection != "pca":
            return
        maps = stream_pca_components(x, self.pca_components.shape[1], self.stream_dims)
        self.pca_mean.copy_(torch.cat([mean for mean, _ in maps]))
        self.pca_components.copy_(torch.cat([comps for _, comps in maps]))
        self.pca_fitted.fill_(True)

    def _stream_slices(self) -> list[slice]:
        assert self.stream_dims is not None
        d = self.stream_dims[0]
        return [slice(0, d), slice(d, d + self.stream_dims[1])]

    def project(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> x^0: (B, T, H); with mid fusion x^c (+) x^f or x^c (.) x^f of the
        two streams' own projections."""
        if self.projection is None:
            return x
        if self.projection == "pca" and not self.pca_fitted and not self._warned:
            log.warning("res_lstm: PCA not fitted (prepare() not called); using the first dims")
            self._warned = True
        if self.stream_dims is None:
            if self.projection == "learned":
                return self.proj(x)
            return (x - self.pca_mean) @ self.pca_components
        if self.projection == "learned":
            c, f = (
                p(x[..., s]) for p, s in zip(self.stream_proj, self._stream_slices(), strict=True)
            )
        else:
            c, f = (
                (x[..., s] - self.pca_mean[s]) @ self.pca_components[s]
                for s in self._stream_slices()
            )
        # section 3.2, mid fusion: x_t^0 = x_t^c (+) x_t^f, or x_t^c (.) x_t^f
        return c + f if self.fusion == "sum" else c * f

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
