"""Temporal-ConvNet / Temporal-Inception (Ma et al. 2017, paper 004, section 3.3, Fig. 3-4,
Tables 4, 8-10): 1-D temporal convolutions on the (D x T) feature matrix, multi-flow modules of
kernel 5 and 7 that halve time, 1x1 conv fusion, FC-1024."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from pipeline.heads import register_head

VARIANTS = ("inception", "temporal_vgg", "multiflow_vgg")


class TemporalConv(nn.Conv1d):
    """nn.Conv1d along time with 'same' zero padding, applied with one shared kernel to every
    feature row d of a (B, C, T, D) map: out[..., d] = conv1d(x[..., d]), -> (B, O, T, D).

    Same parameters, initialisation and result as nn.Conv1d, computed as one matmul with the
    kernel's banded (Toeplitz) matrix, (O*T, C*T) @ (B, C*T, D): with these 1-16 channels that
    is several times faster on CPU than conv1d / conv2d (10x for the 1-channel first layer)."""

    def __init__(self, c_in: int, c_out: int, k: int, *, bias: bool = True) -> None:
        super().__init__(c_in, c_out, k, padding=k // 2, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, d = x.shape
        k = self.kernel_size[0]
        steps = torch.arange(t, device=x.device)
        tap = steps[None, :] - steps[:, None] + k // 2  # [t_out, s_in]: the tap linking s to t
        band = (tap >= 0) & (tap < k)
        m = self.weight[:, :, tap.clamp(0, k - 1)] * band  # (O, C, T_out, T_in)
        m = m.permute(0, 2, 1, 3).reshape(-1, c * t)  # (O*T_out, C*T_in)
        # bmm with the matrix broadcast over the batch: torch.matmul would copy x transposed
        y = torch.bmm(m.expand(b, -1, -1), x.reshape(b, c * t, d)).view(b, -1, t, d)
        return y if self.bias is None else y + self.bias[:, None, None]


class HalveTime(nn.Module):
    """Max pool 2 along time in ceil mode: (B, C, T, D) -> (B, C, ceil(T / 2), D). An odd T
    pools its last step with itself, so no step is dropped and T = 1 stays 1. Same result as
    nn.MaxPool2d((2, 1), ceil_mode=True), which is ~1.4x slower here."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, d = x.shape
        if t % 2:
            x = torch.cat([x, x[:, :, -1:]], dim=2)
        return x.view(b, c, -1, 2, d).amax(dim=3)


class TCL(nn.Sequential):
    """One Temporal-ConvNet layer on (B, C, T, D): a temporal convolution shared by every
    feature row -> BN -> ReLU -> max pool 2 along time.

    The pool uses ceil mode, so time goes L -> ceil(L / 2) (25 -> 13 -> 7 -> 4 -> 2) and never
    below 1: a length-1 input stays length 1 (T=1 works)."""

    def __init__(self, c_in: int, c_out: int, k: int, *, batch_norm: bool) -> None:
        super().__init__(
            TemporalConv(c_in, c_out, k, bias=not batch_norm),  # bias is redundant before BN
            nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(),  # BN right before ReLU
            nn.ReLU(),
            HalveTime(),
        )


class MultiFlow(nn.Module):
    """Parallel branches (each a TCL or a stack of TCLs) whose outputs are concatenated along
    channels: (B, C, T, D) -> (B, sum of branch widths, T', D)."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


@register_head("temporal_inception")
class TemporalInception(nn.Module):
    """x: (B, T, D) -> feature matrix (B, 1, T, D) -> temporal conv layers (halving T each) ->
    max over the remaining time (B, 16, 1, D) -> 1x1 conv fusion (16 -> 4 -> 2 -> 1 channels)
    -> (B, 1 * D) -> dropout -> FC-1024 -> BN -> ReLU -> dropout -> FC -> logits
    (B, num_classes).

    TemConv(x) = H(G(F(F(F(F(x, W1), W2), W3), W4))) (section 3.3): F is one multi-flow module,
    G the 1x1 fusion and FC-1024, H the softmax (left to the loss).

    ``variant`` (Fig. 4, Table 4), with ``channels`` = the width of each TCL per layer:
    - ``"inception"`` (Temporal-Inception, {(T,T),(T,T),(T,T),(T,T)}): each layer is a
      multi-flow module, one TCL per kernel in ``kernel_sizes`` (5 and 7), concatenated; with
      channels (1, 2, 4, 8) the modules give 2, 4, 8, 16 channels.
    - ``"multiflow_vgg"`` (({T,T,T,T},{T,T,T,T})): one stack of TCLs per kernel, concatenated
      only after the last layer (8 + 8 = 16 channels).
    - ``"temporal_vgg"`` ({T,T,T,T}): a single stack with kernel ``kernel_sizes[0]`` (5, the
      paper's single-flow size); ends with channels[-1] = 8 channels.
    Table 4's 1L / 2L rows: ``channels=[1]`` / ``[1, 2]`` with ``reduction=[]`` (T and {T,T}:
    temporal_vgg; (T,T) and {(T,T),(T,T)}: inception). Its BN / Dropout / FC columns are
    ``batch_norm``, ``dropout`` (0 = none) and ``fc_dim`` (512 / 1024 / 2048 / 4096).
    ``reduction`` is Table 9's "Conv fusion" chain of 1x1 convs (the paper's f_i in
    R^{1x1xD_i1xD_i2}) after all modules: Table 9 finds reducing after every module worse
    (92.8) and Conv1,4 Conv1,2 Conv1,1 after all of them best (94.2, = Table 4's
    Temporal-Inception), so the default is (4, 2, 1); each 1x1 conv is followed by BN and ReLU;
    () skips it.

    From the authors' public Torch code (chihyaoma/Activity-Recognition-with-CNN-and-RNN,
    Temporal-ConvNet/model-Conv-Inception-v1.lua), since the paper's text gives no sizes: the
    feature matrix is a 1-channel (D x T) image and every kernel is (1 x k), i.e. one temporal
    filter shared by all D feature rows ("1D kernels ... applying convolution along the spatial
    direction may alter the learned spatial characteristics"); the widths (1, 2, 4, 8); the
    (4, 2, 1) fusion; FC-1024 with BN; dropout 0.2 before and after it.

    Time, as in the authors' code, reaches length 1 before G: their modules go 25 -> 12 -> 6 ->
    3 -> 1, the last one pooling by 3, so the 1x1 fusion sees one step. Here every module halves
    with ceil (25 -> 13 -> 7 -> 4 -> 2, no step dropped, T=1 allowed; the authors' fixed pool
    sizes fit T=25 only) and a max over the remaining steps, right after the last module and
    before G, gives the length-1 map for any T. Where both halve alike (T=24: 24 -> 12 -> 6 ->
    3, the ceil pool of 3 steps then the max = their pool by 3) the result is the authors'.
    Differences: at an odd length the authors' floor pooling drops the last step (T=25 -> 12).
    For the 1L / 2L rows the paper's text implies the leftover time is flattened into the FC
    ("still leave the temporal direction to have a high dimensionality, and thus result in
    larger numbers of parameters"); here it is max-pooled as well. Their dropout before the FC
    is SpatialDropout on a 1-channel map (it drops a sample's whole input); here it is
    element-wise dropout. The VGG variants' widths are not published; they reuse ``channels``.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        variant: str = "inception",
        kernel_sizes: Sequence[int] = (5, 7),  # Table 10: 5 and 7 are best
        channels: Sequence[int] = (1, 2, 4, 8),  # per-TCL widths of the 4 layers (authors' code)
        reduction: Sequence[int] = (4, 2, 1),  # Table 9: Conv1,4 Conv1,2 Conv1,1
        fc_dim: int = 1024,  # Table 4: FC-1024
        batch_norm: bool = True,
        dropout: float = 0.2,  # authors' code: dropout1 = dropout2 = 0.2
    ) -> None:
        super().__init__()
        kernel_sizes, channels, reduction = list(kernel_sizes), list(channels), list(reduction)
        if variant not in VARIANTS:
            raise ValueError(
                f"temporal_inception: variant must be one of {VARIANTS}, got '{variant}'"
            )
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(
                f"temporal_inception: kernel_sizes must be odd and >= 1 ('same' padding), "
                f"got {kernel_sizes}"
            )
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"temporal_inception: channels must be >= 1 each, got {channels}")
        if any(c < 1 for c in reduction):
            raise ValueError(f"temporal_inception: reduction must be >= 1 each, got {reduction}")
        if fc_dim < 1:
            raise ValueError(f"temporal_inception: fc_dim must be >= 1, got {fc_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"temporal_inception: dropout must be in [0, 1), got {dropout}")

        def stack(k: int) -> nn.Sequential:
            widths = [1, *channels]
            return nn.Sequential(
                *(TCL(a, b, k, batch_norm=batch_norm) for a, b in pairwise(widths))
            )

        if variant == "inception":
            layers, c_in = [], 1
            for c in channels:
                layers.append(
                    MultiFlow([TCL(c_in, c, k, batch_norm=batch_norm) for k in kernel_sizes])
                )
                c_in = c * len(kernel_sizes)  # concatenation of the flows
            self.temporal = nn.Sequential(*layers)
            width = c_in
        elif variant == "multiflow_vgg":
            self.temporal = MultiFlow([stack(k) for k in kernel_sizes])
            width = channels[-1] * len(kernel_sizes)
        else:
            self.temporal = stack(kernel_sizes[0])
            width = channels[-1]

        fusion: list[nn.Module] = []  # G, part 1: 1x1 convs reduce the filter dimension
        for c in reduction:
            fusion += [
                TemporalConv(width, c, 1, bias=not batch_norm),  # a 1x1 conv
                nn.BatchNorm2d(c) if batch_norm else nn.Identity(),
                nn.ReLU(),
            ]
            width = c
        self.fusion = nn.Sequential(*fusion)
        self.classifier = nn.Sequential(  # G, part 2: FC-1024 between dropouts; then the FC
            nn.Dropout(dropout),
            nn.Linear(in_dim * width, fc_dim, bias=not batch_norm),
            nn.BatchNorm1d(fc_dim) if batch_norm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(fc_dim, num_classes),
        )

    def features(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> the last module's map (B, C, T', D), before the max over time."""
        return self.temporal(x.unsqueeze(1))  # the (T x D) matrix, 1 channel

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> logits (B, num_classes)."""
        # The max over the remaining steps comes before the fusion, as the authors' last module
        # pools time to 1 step: the 1x1 convs mix channels with signed weights, so the max
        # taken after them would give other logits (up to 2.8e-2 apart at T=24).
        h = self.features(x).amax(dim=2, keepdim=True)  # (B, C, 1, D)
        return self.classifier(self.fusion(h).flatten(1))  # (B, C' * D)
