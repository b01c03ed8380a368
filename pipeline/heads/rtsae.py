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
    """z: (..., D) divided by its largest entry (eq. 15); the paper's GAP features are
    non-negative, so the absolute maximum is used (equal there), kept away from zero."""
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
            i = torch.sigmoid(gi + self.peep[0] * c)  # eq. (1)
            f = torch.sigmoid(gf + self.peep[1] * c)  # eq. (2)
            c = f * c + i * torch.tanh(gc)  # eq. (3)
            o = torch.sigmoid(go + self.peep[2] * c)  # eq. (4): peephole on c_t
            h = o * torch.tanh(c)  # eq. (5)
            hs.append(h)
            os.append(o)
        return torch.stack(hs, dim=1), torch.stack(os, dim=1)


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
    """aLSTM attention (RTSAE) + LSTM classifier. x: (B, T, D) -> logits (B, num_classes).

    Attention path: x_f = R (x_s + x_t) / (2 x_max) (eq. 17, R a fixed seeded sparse projection
    to ``projection_dim``, eq. 18; one stream: R x / x_max) -> a stacked peephole-LSTM encoder
    (eqs. 1-5) whose top layer's output gate o_t gives a-bar_t = p-psi(||W_a o_t + b_a||) (eqs.
    6-7). The decoder (an LSTM reading a-bar_t h_t, with a linear readout k_t) reconstructs x_f.
    Classifier path: features z_t (with ``stream_dims``: each stream max-normalised, eq. 15, and
    fused as ReLU(z_s/(1+w_f) + w_f z_t/(1+w_f)), eq. 16, w_f learnable) are gated by a-bar_t
    (eq. 13) into an LSTM whose last hidden state is classified. In eval mode the gate is
    binarised at 0.5 (eq. 14) and the LSTM runs over the kept steps only; ``report()`` gives the
    fraction kept. ``pretrain_loss`` is eq. 12 (stage 2), ``loss`` cross-entropy + eq. 12
    (stage 3).

    Differences from the paper (end-to-end RTSAE-DSCNN there; cached features here):
    - the CNNs are frozen, so the RTSAE reads the cached (GAP) features instead of the p2 maps,
      nothing before the gate can be saved at test time (the saving is the classifier LSTM's),
      and the gate (eq. 13) is applied after the eq. 15-16 fusion: the per-vector max
      normalisation would cancel a gate applied before it. The F-Net is eq. 16's ReLU only
      (no fc7); ``x_max`` and ``z_max`` use absolute values (features need not be >= 0 here).
    - stage 2 runs on the training videos (the paper uses TRECVID); stage 1 does not exist.
    - stage 3: the paper removes the decoder, yet calls the training multi-task; by default
      (``joint_reconstruction=True``) eq. 12 keeps its reconstruction term, with weight 1
      beside the cross-entropy (the paper gives no weight); False drops the decoder's term.
    - attention steps st_i of eq. 12 are the steps with a-bar_t > 0.5 (eq. 14's threshold); the
      selection passes no gradient, the terms' values do. Eq. 12's sums are per video, averaged
      over the batch. ``eq12_reduction="mean"`` (not in the paper) divides each sum by its
      number of summands: as printed (``"sum"``) lambda sum_t ||o_t||_1 alone is ~80 for
      T = 25, H = 128, against a cross-entropy of ~2, and shuts every gate at once.
    - x_f is also divided by sqrt(D) (see ``compress``); W_a, b_a start with a-bar ~ 0.63.
    - unstated sizes are choices: W_a is (H, H); k_t is a linear readout of the decoder's hidden
      state (x_f is not bounded by tanh); the decoder has the encoder's depth and width;
      peepholes are diagonal (Graves); sigma starts at 2.98 (the value of Fig. 4); the
      classifier's ``hidden`` and ``dropout`` are not given.
    - a video whose gate keeps no step keeps its most attended one, so it is still classified.
    - ``straight_through=True`` (not in the paper, which trains on the soft a-bar_t) feeds the
      classifier the test-time binary gate in training, passing gradients to a-bar_t as if it
      were the identity. With the soft gate, the LSTM rescales its input weights while the L1
      term shrinks a-bar_t everywhere below 0.5, so at test time only the fallback step is left.
    - no temporal augmentation (random inserted frames), no spatial (corner-crop) augmentation:
      both act on frames, and the cache holds one feature sequence per video.
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
        joint_reconstruction: bool = True,
        eq12_reduction: str = "sum",
        straight_through: bool = False,
        stream_dims: list[int] | None = None,
    ) -> None:
        super().__init__()
        for name, v in [
            ("hidden", hidden),
            ("projection_dim", projection_dim),
            ("encoder_hidden", encoder_hidden),
            ("encoder_layers", encoder_layers),
        ]:
            if v < 1:
                raise ValueError(f"rtsae: {name} must be >= 1, got {v}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"rtsae: dropout must be in [0, 1), got {dropout}")
        if sigma_init <= 0:
            raise ValueError(f"rtsae: sigma_init must be > 0, got {sigma_init}")
        for name, v in [("mu", mu), ("tau", tau), ("lam", lam), ("phi", phi)]:
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
        self.eq12_reduction = eq12_reduction
        self.straight_through = straight_through

        # eq. (18): fixed measurement matrix, saved with the model but never trained
        self.register_buffer(
            "projection", sparse_projection(projection_dim, feat_dim, projection_seed)
        )
        dims = [projection_dim] + [encoder_hidden] * encoder_layers
        self.encoder = nn.ModuleList(PeepholeLSTMLayer(a, b) for a, b in pairwise(dims))
        self.attention = nn.Linear(encoder_hidden, encoder_hidden)  # W_a, b_a (eq. 6)
        # Start the gate half open: with o_t ~ 0.5 at init, ||W_a o_t||^2 ~ sigma, so a-bar ~
        # 0.63 and p-psi's slope is large. (PyTorch's default init gives ||.||^2 ~ H / 12, a
        # gate stuck at 1, where p-psi is flat.)
        nn.init.normal_(self.attention.weight, std=2 * math.sqrt(sigma_init) / encoder_hidden)
        nn.init.zeros_(self.attention.bias)
        self.p_psi = PPsi(sigma_init)
        self.decoder = nn.LSTM(encoder_hidden, encoder_hidden, encoder_layers, batch_first=True)
        self.readout = nn.Linear(encoder_hidden, projection_dim)  # k_t
        if self.two_stream:
            self.log_w_f = nn.Parameter(torch.zeros(()))  # w_f = 1: equal streams at the start
        self.classifier = nn.LSTM(feat_dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)
        self._last: dict[str, float] = {}

    @property
    def w_f(self) -> Tensor:
        return self.log_w_f.exp()  # a log keeps w_f > 0, so both weights of eq. 16 are in (0, 1)

    def _streams(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.two_stream:
            xs, xt = x.chunk(2, dim=-1)
            return xs, xt
        return x, None

    def compress(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> x_f (B, T, projection_dim) (eq. 17)."""
        xs, xt = self._streams(x)
        if xt is None:
            x_max = xs.abs().amax(dim=-1, keepdim=True)
            mixed = xs / x_max.clamp_min(_EPS)
        else:
            x_max = torch.maximum(xs.abs().amax(-1, keepdim=True), xt.abs().amax(-1, keepdim=True))
            mixed = (xs + xt) / (2 * x_max.clamp_min(_EPS))
        # eq. (17): x_f = R (x_s + x_t) / (2 x_max), here also / sqrt(D): as printed, x_f's
        # entries grow like sqrt(D) (~36 for D = 1280), saturating the encoder's gates and
        # making eq. 12's reconstruction term dwarf the others (the gate then shuts everywhere)
        return mixed @ self.projection.T / math.sqrt(self.projection.shape[1])

    def features(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> the classifier's per-step features (B, T, feat_dim) (eqs. 15-16)."""
        xs, xt = self._streams(x)
        if xt is None:
            return xs
        w = self.w_f
        # eq. (16): z_f = ReLU(1/(1+w_f) z-bar_s + w_f/(1+w_f) z-bar_t), z-bar from eq. 15
        return F.relu((max_normalise(xs) + w * max_normalise(xt)) / (1 + w))

    def gate(self, x_f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x_f: (B, T, P) -> a-bar (B, T), output gates O (B, T, H), hidden states (B, T, H)."""
        h = x_f
        for layer in self.encoder:
            h, o = layer(h)
        a = self.p_psi(self.attention(o).norm(dim=-1))  # eq. (6): p-psi(||W_a o_t + b_a||)
        return a, o, h

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
                g = a
                if self.straight_through:  # the test-time binary gate, a-bar's gradient
                    g = binary_gate(a.detach()).to(a.dtype) + a - a.detach()
                z = self.features(x) * g[..., None]  # eq. (13): x' = x (*) a-bar_t
                _, (hn, _) = self.classifier(z)
                last = hn[-1]
            else:
                last = self._classify_kept(self.features(x), a)
            logits = self.fc(self.dropout(last))
        return RTSAEOutputs(x_f, a, o, h, recon, logits)

    def _classify_kept(self, z: Tensor, a: Tensor) -> Tensor:
        """Eval: z (B, T, F), a-bar (B, T) -> the classifier's last hidden state (B, hidden),
        stepping each video's LSTM over its kept steps only (skipped steps cost nothing)."""
        keep = binary_gate(a)
        empty = ~(a > 0.5).any(dim=1)
        lengths = keep.sum(dim=1)
        order = attended_first(keep)[:, : int(lengths.max())]
        kept = z.gather(1, order[..., None].expand(-1, -1, z.shape[-1]))  # (B, K, F)
        packed = pack_padded_sequence(kept, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hn, _) = self.classifier(packed)
        self._last = {
            "kept_fraction": keep.sum().item() / keep.numel(),
            "empty_gate_fraction": empty.sum().item() / empty.numel(),
        }
        return hn[-1]

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
        """Stage 3: cross-entropy + eq. 12 (see the class docstring on the decoder)."""
        out = self._outputs(x, classify=True, decode=self.joint_reconstruction)
        assert out.logits is not None
        return F.cross_entropy(out.logits, y) + self.eq12(out)

    def report(self) -> dict[str, float]:
        """Fraction of time steps the gate kept (and of videos it kept none of) in the last
        eval-mode forward; empty before one."""
        return dict(self._last)
