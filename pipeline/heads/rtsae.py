"""RTSAE: a recurrent temporal sparse autoencoder picks key time steps for an LSTM classifier
(paper 003, RTSAE-DSCNN), on cached per-frame features."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from pipeline.heads import register_head

_EPS = 1e-6


def p_psi(x: Tensor, sigma: Tensor) -> Tensor:
    """Parameterized radial basis: 1 - exp(-x^2 / sigma), elementwise (eq. 7)."""
    return 1 - torch.exp(-x.square() / sigma)  # eq. (7)


def sparse_projection(rows: int, cols: int, seed: int) -> Tensor:
    """A (rows, cols) sparse measurement matrix: sqrt(3) * {-1, 0, +1} with probabilities
    1/6, 2/3, 1/6 (eq. 18), drawn from its own generator so the global RNG is untouched."""
    u = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sign = (u >= 5 / 6).double() - (u < 1 / 6).double()  # eq. (18): -1 w.p. 1/6, +1 w.p. 1/6
    return (math.sqrt(3) * sign).float()


def max_normalise(z: Tensor) -> Tensor:
    """z: (..., D) divided by its largest entry (eq. 15). The paper's GAP features are >= 0,
    as are the ReLU block outputs it is applied to here; the absolute maximum (equal for them)
    keeps it defined for any input, and it is kept away from zero (an all-zero vector stays 0)."""
    return z / z.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS)  # eq. (15): z / z_max


def nuclear_norm(o: Tensor) -> Tensor:
    """o: (B, T, H) output-gate vectors -> ||O||_* (B,), the sum of singular values (eq. 9)."""
    return torch.linalg.svdvals(o).sum(dim=-1)  # eq. (9)


def attended_first(mask: Tensor) -> Tensor:
    """mask: (B, T) bool -> (B, T) step indices, the masked steps first in time order."""
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)


def reconstruction_error(k: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """sum_i ||k_{st_i} - x_{st_i}||^2 over the attention steps st_i (eq. 12, first term) -> (B,).
    k, x: (B, T, P); mask: (B, T) bool, True at attention steps."""
    return ((k - x).square().sum(dim=-1) * mask).sum(dim=1)


def keyframe_diversity(h: Tensor, mask: Tensor) -> Tensor:
    """sum_i log(1 + ||h_{st_i} - h_{st_{i+1}}||^2) over consecutive attention steps (eq. 12,
    second term, without -mu) -> (B,). h: (B, T, H) encoder hidden states; mask: (B, T) bool."""
    order = attended_first(mask)
    hs = h.gather(1, order[..., None].expand_as(h))  # attention steps first, in time order
    d = (hs[:, 1:] - hs[:, :-1]).square().sum(dim=-1)  # (B, T-1)
    pairs = torch.arange(h.shape[1] - 1, device=h.device) < (mask.sum(dim=1, keepdim=True) - 1)
    return (torch.log1p(d) * pairs).sum(dim=1)


def binary_gate(a: Tensor) -> Tensor:
    """a-bar (B, T) -> a_t (B, T) bool: a-bar_t > 0.5 (eq. 14), and a video whose gate keeps
    no step keeps its most attended one, so that it can still be classified."""
    keep = a > 0.5  # eq. (14): a_t = 1 if a-bar_t > 0.5
    rows = (~keep.any(dim=1)).nonzero().squeeze(1)
    keep[rows, a[rows].argmax(dim=1)] = True
    return keep


class PPsi(nn.Module):
    """p-psi (eq. 7) with a learnable sigma (kept above 1e-4 so the gate stays defined)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))

    def forward(self, x: Tensor) -> Tensor:
        return p_psi(x, self.sigma.clamp_min(1e-4))


class PeepholeLSTMLayer(nn.Module):
    """The LSTM of eqs. 1-5 with (diagonal) peepholes: x (B, T, in) -> h, o (B, T, hidden).
    The input products run once for all steps; the recurrence is a loop over T."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(in_dim, 4 * hidden)  # W_x{i,f,c,o}, b_{i,f,c,o}
        self.hh = nn.Linear(hidden, 4 * hidden, bias=False)  # W_h{i,f,c,o}
        self.peep = nn.Parameter(torch.zeros(3, hidden))  # W_ci, W_cf, W_co (diagonal)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        gx = self.ih(x)
        h = c = x.new_zeros(x.shape[0], self.hidden)
        hs, os = [], []
        for t in range(x.shape[1]):
            gi, gf, gc, go = (gx[:, t] + self.hh(h)).chunk(4, dim=-1)
            i = torch.sigmoid(gi + self.peep[0] * c)  # eq. (1): peephole on c_{t-1}
            f = torch.sigmoid(gf + self.peep[1] * c)  # eq. (2)
            c = f * c + i * torch.tanh(gc)  # eq. (3)
            o = torch.sigmoid(go + self.peep[2] * c)  # eq. (4): peephole on c_t
            h = o * torch.tanh(c)  # eq. (5)
            hs.append(h)
            os.append(o)
        return torch.stack(hs, dim=1), torch.stack(os, dim=1)


def skipping_lstm(lstm: nn.LSTM, u: Tensor, g: Tensor) -> Tensor:
    """Training pass of the classifier LSTM (one layer) over every step, where step t counts
    with weight g_t: (h_t, c_t) = g_t LSTM(u_t, h_{t-1}, c_{t-1}) + (1 - g_t) (h_{t-1}, c_{t-1}).
    u: (B, T, F), g: (B, T) in [0, 1] -> h_T (B, hidden).

    A step with g_t = 0 leaves the state as it was, exactly as the skipped step of the eval
    pass (``kept_lstm``), so both passes agree on a binary gate; a soft g_t is its relaxation,
    through which the classification error reaches the gate of every step (the paper: 'the
    computation of the current time step is stopped' when a_t = 0, eq. 14)."""
    gx = u @ lstm.weight_ih_l0.T + lstm.bias_ih_l0  # the input products of all steps at once
    h = c = u.new_zeros(u.shape[0], lstm.hidden_size)
    for t in range(u.shape[1]):
        gi, gf, gc, go = (gx[:, t] + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0).chunk(4, dim=-1)
        c_new = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gc)  # torch's LSTM
        h_new = torch.sigmoid(go) * torch.tanh(c_new)
        w = g[:, t, None]
        h, c = w * h_new + (1 - w) * h, w * c_new + (1 - w) * c
    return h


def kept_lstm(lstm: nn.LSTM, u: Tensor, lengths: Tensor) -> Tensor:
    """Eval pass: u (B, K, F), each video's kept steps first (``lengths`` (B,) of them) -> the
    LSTM's last hidden state (B, hidden) over the kept steps only (skipped steps cost nothing)."""
    packed = pack_padded_sequence(u, lengths.cpu(), batch_first=True, enforce_sorted=False)
    _, (hn, _) = lstm(packed)
    return hn[-1]


@dataclass
class RTSAEOutputs:
    """What eq. 12 and the classifier need from one pass (B videos, T steps)."""

    target: Tensor  # x_f, the compressed encoder input (B, T, P) (eq. 17)
    gate: Tensor  # a-bar_t, the soft attention gate (B, T) (eq. 6)
    out_gates: Tensor  # O = [o_1 ... o_T] of the top encoder layer, (B, T, H) (eq. 8)
    hidden: Tensor  # h_t of the top encoder layer (B, T, H)
    recon: Tensor | None  # k_t, the decoder's reconstruction of x_f (B, T, P)
    logits: Tensor | None  # (B, C)


@register_head("rtsae")
class RTSAE(nn.Module):
    """RTSAE attention + the DSCNN above it + an LSTM classifier, on cached per-frame features.
    x: (B, T, D) -> logits (B, num_classes); with ``stream_dims`` x is [x_s | x_t] (RGB | flow).

    The paper embeds the RTSAE after the p2 pooling layer of both CNN streams. The CNNs here
    are frozen and their features cached, so:
    - "p2 features" are the cached features of each stream: the RTSAE's input (eq. 17) and
      what its gate multiplies (eq. 13);
    - blocks 3-5 + GAP of each stream (S-Net, T-Net) are one trainable ReLU layer each
      (``block_dim``; Table 1's GAP: 1024), trained in stage 3 as the paper's are. Something
      must sit between the gate and eq. 15: z / z_max would cancel a soft gate applied to it;
    - the F-Net is eq. 16's ReLU and fc7 (``fusion_dim``; Table 1: 1024, ReLU), read by an LSTM
      (``hidden``) whose last hidden state is classified.

    Per step t: x_f = R (x_s + x_t) / (2 x_max) (eq. 17 as printed, R fixed and seeded, eq.
    18; one stream: R x / x_max) -> a peephole LSTM encoder (eqs. 1-5, ``encoder_layers``)
    -> a-bar_t = p-psi(||W_a o_t + b_a||) from the top layer's output gate o_t (eqs. 6-7);
    x' = a-bar_t x (eq. 13) -> z = ReLU(block(x')) -> z-bar = z / z_max (eq. 15) -> z_f =
    ReLU(z-bar_s / (1 + w_f) + w_f z-bar_t / (1 + w_f)) (eq. 16, w_f learnt; one stream:
    z-bar_s) -> u_t = ReLU(fc7 z_f) -> the LSTM.
    Eval: a_t = [a-bar_t > 0.5] (eq. 14) and only the kept steps go through the layers above
    the gate and the LSTM (the RTSAE itself reads every step). Training: the LSTM runs over all
    steps with (h_t, c_t) = g_t LSTM(u_t, h_{t-1}, c_{t-1}) + (1 - g_t) (h_{t-1}, c_{t-1}), so a
    step with g_t = 0 is skipped exactly as at test (a 0/1 gate gives the same logits in both
    modes); g_t = a-bar_t, the paper's soft gate, or with ``straight_through`` see below.
    ``report()`` (eval) gives the kept fraction and the mean a-bar on kept and dropped steps.

    Stage 2, ``pretrain_loss``: eq. 12 with the decoder (an LSTM reading a-bar_t h_t and a
    linear readout k_t that reconstructs x_f), on the training videos (the paper: TRECVID).
    Stage 3, ``loss``: cross-entropy + ``joint_weight`` x eq. 12 without its reconstruction
    term, as the paper removes the decoder (``joint_reconstruction=True`` keeps it).

    Why the gate is selective, measured on tests/test_rtsae_selective.py's set (T = 20, D = 48,
    3-5 clean steps per video = class prototype + noise, the others noise or blank; held-out
    videos, seeds 0-7; joint_weight 0.02, 60 epochs unless said):
    - eq. 12 alone cannot open a gate: its attention steps st_i are the steps with a-bar > 0.5
      and that selection passes no gradient, so phi ||a-bar||_1 is the only term acting on the
      gate and stage 2 closes every step (mean a-bar 0.48 -> 0.01 in 35 Adam steps at lr 1e-3;
      then M = 0 and the reconstruction and diversity terms are 0: eq. 12's trivial minimum).
      The selection is learnt in stage 3, from the classification error through eqs. 13-14.
    - beside the cross-entropy, eq. 12 at weight 1 (mean reduction) shuts the gate: a-bar
      0.18-0.23 on clean steps, 0.01-0.02 on the others, so at test each video keeps its
      fallback step only (5% kept, recall 0.25; seeds 0-3, 40 epochs). The paper gives no
      weight; ``joint_weight`` sets it (0.1: recall 0.71-0.99, 79-99% of the noise dropped,
      40 epochs; 0.02: below).
    - the soft gate alone (the paper, ``straight_through=False``) ranks the steps right (96-98%
      of the noise dropped) but the L1 term holds the clean steps near eq. 14's 0.5 (mean a-bar
      0.44-0.66): nothing in the soft pass rewards crossing 0.5, the LSTM uses a step at a-bar
      0.45 too. At test up to 30% of the videos keep no step (the fallback) and the clean-step
      recall is 0.42-0.83.
    - the binary gate alone (straight-through) sets the level, but did not learn the ranking
      on every seed: recall 0.50-0.98, noise dropped 31-92% (seed 7: a-bar 0.65 on clean steps
      vs 0.67 on the others), accuracy 0.70-1.00.
    - so ``straight_through=True`` (not in the paper) averages the cross-entropies of both
      passes: the soft one (the ranking) and the binary one, eq. 14's a_t as at test with
      a-bar_t's gradient passed straight through (the level). Recall 0.80-1.00, noise dropped
      85-99%, accuracy 0.97-1.00 (chance 0.25), a-bar 0.57-0.80 on clean steps vs 0.12-0.29.
      Eq. 13 always scales x by the soft a-bar_t, so a closed step's gradient still depends
      on what it holds.

    Other differences and choices:
    - ``eq12_reduction="mean"`` (not in the paper) divides each eq. 12 sum by its number of
      summands: as printed (``"sum"``) lambda sum_t ||o_t||_1 alone is ~80 for T = 25, H = 128.
    - eq. 17's x_f has entries of size ~ sqrt(D) rms(x / x_max): the first encoder layer's
      input weights start sqrt(D) smaller than torch's default (eq. 17 itself is as printed).
      x_max and eq. 15's z_max use absolute values (equal for >= 0 features).
    - W_a, b_a start with a-bar ~ 0.5; W_a is (H, H); peepholes are diagonal (Graves); sigma
      starts at 2.98 (Fig. 4); the decoder has the encoder's depth and width; the classifier's
      ``hidden`` and ``dropout`` are not given.
    - a video whose gate keeps no step keeps its most attended one (eval and the binary pass).
    - no temporal (inserted frames) or spatial (corner-crop) augmentation: both act on frames.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        hidden: int = 512,
        dropout: float = 0.5,
        projection_dim: int = 128,
        projection_seed: int = 0,
        encoder_hidden: int = 128,
        encoder_layers: int = 2,
        sigma_init: float = 2.98,
        mu: float = 0.5,
        tau: float = 0.02,
        lam: float = 0.05,
        phi: float = 0.8,
        joint_reconstruction: bool = False,
        joint_weight: float = 1.0,
        eq12_reduction: str = "sum",
        straight_through: bool = False,
        block_dim: int = 1024,
        fusion_dim: int = 1024,
        stream_dims: list[int] | None = None,
    ) -> None:
        super().__init__()
        for name, v in [
            ("hidden", hidden),
            ("projection_dim", projection_dim),
            ("encoder_hidden", encoder_hidden),
            ("encoder_layers", encoder_layers),
            ("block_dim", block_dim),
            ("fusion_dim", fusion_dim),
        ]:
            if v < 1:
                raise ValueError(f"rtsae: {name} must be >= 1, got {v}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"rtsae: dropout must be in [0, 1), got {dropout}")
        if sigma_init <= 0:
            raise ValueError(f"rtsae: sigma_init must be > 0, got {sigma_init}")
        for name, v in [
            ("mu", mu),
            ("tau", tau),
            ("lam", lam),
            ("phi", phi),
            ("joint_weight", joint_weight),
        ]:
            if v < 0:
                raise ValueError(f"rtsae: {name} must be >= 0, got {v}")
        if eq12_reduction not in ("sum", "mean"):
            raise ValueError(
                f"rtsae: eq12_reduction must be 'sum' or 'mean', got '{eq12_reduction}'"
            )
        if stream_dims is not None:
            if len(stream_dims) != 2 or stream_dims[0] != stream_dims[1]:
                raise ValueError(
                    f"rtsae: stream_dims must be two equal dims (eqs. 16-17 add the streams), "
                    f"got {stream_dims}"
                )
            if sum(stream_dims) != in_dim:
                raise ValueError(f"rtsae: stream_dims {stream_dims} must sum to in_dim {in_dim}")
        self.two_stream = stream_dims is not None
        feat_dim = in_dim // 2 if self.two_stream else in_dim
        self.mu, self.tau, self.lam, self.phi = mu, tau, lam, phi
        self.joint_reconstruction = joint_reconstruction
        self.joint_weight = joint_weight
        self.eq12_reduction = eq12_reduction
        self.straight_through = straight_through

        # --- the RTSAE (eqs. 1-12, 17-18) ---
        # eq. (18): fixed measurement matrix, saved with the model but never trained
        self.register_buffer(
            "projection", sparse_projection(projection_dim, feat_dim, projection_seed)
        )
        dims = [projection_dim] + [encoder_hidden] * encoder_layers
        self.encoder = nn.ModuleList(PeepholeLSTMLayer(a, b) for a, b in pairwise(dims))
        # eq. 17's x_f has entries of size ~ ||x / x_max|| ~ sqrt(D) (see compress): the first
        # layer's input weights start sqrt(D) smaller than torch's default, so its gates start
        # unsaturated. An initialisation only; eq. 17 is computed as printed.
        with torch.no_grad():
            self.encoder[0].ih.weight.div_(math.sqrt(feat_dim))
        self.attention = nn.Linear(encoder_hidden, encoder_hidden)  # W_a, b_a (eq. 6)
        # Start the gate half open: with o_t ~ 0.5 at init, ||W_a o_t||^2 ~ sigma, so a-bar ~
        # 0.5-0.6 (0.48 measured) and p-psi's slope is large. (PyTorch's default init gives ||.||^2 ~ H / 12, a
        # gate stuck at 1, where p-psi is flat.)
        nn.init.normal_(self.attention.weight, std=2 * math.sqrt(sigma_init) / encoder_hidden)
        nn.init.zeros_(self.attention.bias)
        self.p_psi = PPsi(sigma_init)
        self.decoder = nn.LSTM(encoder_hidden, encoder_hidden, encoder_layers, batch_first=True)
        self.readout = nn.Linear(encoder_hidden, projection_dim)  # k_t

        # --- the DSCNN above p2 and the classifier (eqs. 13-16) ---
        n_streams = 2 if self.two_stream else 1
        # Blocks 3-5 + GAP of each stream (S-Net, T-Net): one ReLU layer each (see the docstring)
        self.blocks = nn.ModuleList(nn.Linear(feat_dim, block_dim) for _ in range(n_streams))
        if self.two_stream:
            self.log_w_f = nn.Parameter(torch.zeros(()))  # w_f = 1: equal streams at the start
        self.fc7 = nn.Linear(block_dim, fusion_dim)  # the F-Net's fully connected layer
        self.classifier = nn.LSTM(fusion_dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)
        self._last: dict[str, float] = {}

    @property
    def w_f(self) -> Tensor:
        return self.log_w_f.exp()  # a log keeps w_f > 0, so both weights of eq. 16 are in (0, 1)

    def _streams(self, x: Tensor) -> list[Tensor]:
        return list(x.chunk(2, dim=-1)) if self.two_stream else [x]

    def compress(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> x_f (B, T, projection_dim) (eq. 17, as printed)."""
        streams = self._streams(x)
        # x_max: the largest entry of x_s and x_t (absolute: equal for >= 0 features)
        x_max = torch.stack([s.abs().amax(-1) for s in streams]).amax(0)[..., None]
        if len(streams) == 2:
            mixed = (streams[0] + streams[1]) / (2 * x_max.clamp_min(_EPS))
        else:  # one stream: eq. 17 with x_t = x_s
            mixed = streams[0] / x_max.clamp_min(_EPS)
        return mixed @ self.projection.T  # eq. (17): x_f = R (x_s + x_t) / (2 x_max)

    def gate(self, x_f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x_f: (B, T, P) -> a-bar (B, T), output gates O (B, T, H), hidden states (B, T, H)
        of the top encoder layer."""
        h = x_f
        for layer in self.encoder:
            h, o = layer(h)  # eqs. (1)-(5)
        a = self.p_psi(self.attention(o).norm(dim=-1))  # eq. (6): p-psi(||W_a o_t + b_a||)
        return a, o, h

    def top(self, x: Tensor, a: Tensor) -> Tensor:
        """x: (B, T, D) the p2 stand-ins, a: (B, T) their gate -> the F-Net's per-step
        features (B, T, fusion_dim) (eqs. 13, 15, 16 and fc7)."""
        z = [
            F.relu(block(s * a[..., None]))  # eq. (13): x' = x (*) a-bar_t; then blocks 3-5, GAP
            for block, s in zip(self.blocks, self._streams(x), strict=True)
        ]
        z = [max_normalise(zi) for zi in z]  # eq. (15): z-bar = z / z_max
        if self.two_stream:
            w = self.w_f
            # eq. (16): z_f = ReLU(1/(1+w_f) z-bar_s + w_f/(1+w_f) z-bar_t)
            z_f = F.relu((z[0] + w * z[1]) / (1 + w))
        else:
            z_f = z[0]  # eq. 16 with the S-Net alone (z-bar >= 0: the ReLU is the identity)
        return F.relu(self.fc7(z_f))  # the F-Net's fc7 (Table 1: 1024)

    def _outputs(self, x: Tensor, *, classify: bool, decode: bool) -> RTSAEOutputs:
        x_f = self.compress(x)
        a, o, h = self.gate(x_f)
        recon = None
        if decode:
            k, _ = self.decoder(a[..., None] * h)  # the decoder sees the sparse encoder output
            recon = self.readout(k)
        logits = None
        if classify:
            if self.training:
                last = self._classify_train(x, a, binary=self.straight_through)
            else:
                last = self._classify_kept(x, a)
            logits = self.fc(self.dropout(last))
        return RTSAEOutputs(x_f, a, o, h, recon, logits)

    def _classify_train(self, x: Tensor, a: Tensor, *, binary: bool) -> Tensor:
        """Training: x (B, T, D), a-bar (B, T) -> the classifier's last hidden state (B, hidden).
        Eq. 13 scales the p2 stand-ins by the soft a-bar_t (the paper); each step then counts
        in the LSTM with weight a-bar_t (``skipping_lstm``), or, ``binary``, with eq. 14's a_t
        (a-bar_t's gradient passed straight through), so a closed step is skipped as at test."""
        g = a
        if binary:
            g = binary_gate(a.detach()).to(a.dtype) + a - a.detach()
        return skipping_lstm(self.classifier, self.top(x, a), g)

    def _classify_kept(self, x: Tensor, a: Tensor) -> Tensor:
        """Eval: x (B, T, D), a-bar (B, T) -> the classifier's last hidden state (B, hidden).
        Only the kept steps (eq. 14) go through the layers above the gate and the LSTM."""
        keep = binary_gate(a)
        lengths = keep.sum(dim=1)
        order = attended_first(keep)[:, : int(lengths.max())]
        kept = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        u = self.top(kept, torch.ones(kept.shape[:2], dtype=x.dtype, device=x.device))  # a_t = 1
        opened = a > 0.5
        dropped = ~keep
        self._last = {
            "kept_fraction": keep.sum().item() / keep.numel(),
            "empty_gate_fraction": (~opened.any(dim=1)).sum().item() / keep.shape[0],
            "gate_mean": a.mean().item(),
        }
        if keep.any():
            self._last["gate_mean_kept"] = a[keep].mean().item()
        if dropped.any():
            self._last["gate_mean_dropped"] = a[dropped].mean().item()
        return kept_lstm(self.classifier, u, lengths)

    def forward(self, x: Tensor) -> Tensor:
        out = self._outputs(x, classify=True, decode=False)
        assert out.logits is not None
        return out.logits

    def eq12_terms(self, out: RTSAEOutputs) -> dict[str, Tensor]:
        """The five sums of eq. 12, per video (B,), unweighted; with ``eq12_reduction="mean"``
        each sum is divided by its number of summands (a mean over what it sums)."""
        attended = out.gate.detach() > 0.5  # attention steps st_i (eq. 14's threshold)
        o = out.out_gates
        terms = {
            "diversity": keyframe_diversity(out.hidden, attended),
            "nuclear": nuclear_norm(o),
            "l1_o": o.abs().sum(dim=(1, 2)),  # sum_t ||o_t||_1
            "l1_a": out.gate.abs().sum(dim=1),  # ||a-bar||_1
        }
        if out.recon is not None:
            terms["reconstruction"] = reconstruction_error(out.recon, out.target, attended)
        if self.eq12_reduction == "mean":
            m = attended.sum(dim=1)
            counts = {
                "diversity": (m - 1).clamp_min(1),  # consecutive attention-step pairs
                "nuclear": min(o.shape[1], o.shape[2]),  # singular values
                "l1_o": o.shape[1] * o.shape[2],
                "l1_a": o.shape[1],
                "reconstruction": m.clamp_min(1) * out.target.shape[-1],
            }
            terms = {k: v / counts[k] for k, v in terms.items()}
        return terms

    def eq12(self, out: RTSAEOutputs) -> Tensor:
        """Eq. 12 averaged over the batch (the reconstruction term only when decoded)."""
        t = self.eq12_terms(out)
        # eq. (12): sum_i [||k - x||^2 - mu log(1 + ||h_i - h_i+1||^2)] + tau ||O||_*
        #           + lambda sum_t ||o_t||_1 + phi ||a-bar||_1
        loss = (
            -self.mu * t["diversity"]
            + self.tau * t["nuclear"]
            + self.lam * t["l1_o"]
            + self.phi * t["l1_a"]
        )
        if "reconstruction" in t:
            loss = loss + t["reconstruction"]
        return loss.mean()

    def pretrain_loss(self, x: Tensor) -> Tensor:
        """Stage 2: the unsupervised autoencoder objective, eq. 12."""
        return self.eq12(self._outputs(x, classify=False, decode=True))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Stage 3: cross-entropy + ``joint_weight`` x eq. 12 without the decoder's term (the
        paper removes the decoder; ``joint_reconstruction=True`` keeps it). With
        ``straight_through`` the cross-entropy is the mean of the binary pass's (eq. 14, as at
        test) and the soft pass's (the paper's), see the class docstring."""
        out = self._outputs(x, classify=True, decode=self.joint_reconstruction)
        assert out.logits is not None
        ce = F.cross_entropy(out.logits, y)
        if self.straight_through:
            soft = self.fc(self.dropout(self._classify_train(x, out.gate, binary=False)))
            ce = (ce + F.cross_entropy(soft, y)) / 2
        return ce + self.joint_weight * self.eq12(out)

    def report(self) -> dict[str, float]:
        """About the last eval-mode forward (empty before one): the fraction of time steps the
        gate kept, of videos it kept none of (kept their most attended step), and the mean
        a-bar over all, kept and dropped steps (the last two only when there are such steps)."""
        return dict(self._last)
