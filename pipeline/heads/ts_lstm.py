"""Temporal Segment LSTM (TS-LSTM; Ma et al. 2017, paper 004, section 3.2 and Table 3): split the
steps into S segments, BN, optional FC, max/mean pool each segment, LSTM over the S pooled
vectors, BN and FC on the last step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.heads import register_head

POOLINGS = ("max", "mean", "none")


def segment_bounds(t: int, s: int, *, drop_remainder: bool = True) -> list[tuple[int, int]]:
    """S contiguous segments of T steps -> [(start, end)] (end exclusive).

    ``drop_remainder`` (the authors' RNN/train.lua, ``segmentBasis = floor(T / S)``): every
    segment has n = floor(T / S) steps, segment i = [i n, (i + 1) n), and the last T - S n
    steps are not used (T=25, S=3 -> steps 0-7, 8-15, 16-23; step 24 is dropped). Otherwise
    start_i = floor(i T / S), end_i = floor((i + 1) T / S): every step is used and the longer
    segments come last (T=25, S=3 -> 8, 8, 9 steps).
    T < S (n = 0: the authors' segments would be empty), either way: segment i is the single
    step floor(i T / S), so steps repeat and no segment is empty."""
    if t < 1 or s < 1:
        raise ValueError(f"ts_lstm: segments need T >= 1 and S >= 1, got T={t}, S={s}")
    if drop_remainder and t >= s:
        n = t // s
        return [(i * n, (i + 1) * n) for i in range(s)]
    return [(i * t // s, max(i * t // s + 1, (i + 1) * t // s)) for i in range(s)]


@register_head("ts_lstm")
class TSLSTM(nn.Module):
    """x: (B, T, D) -> S segments -> [BN] -> [FC] -> pool -> (B, S, F) -> LSTM(s) -> last step
    (B, H) -> [BN] -> dropout -> FC -> logits (B, num_classes).

    Rows of the paper's Table 3 (UCF101 split 1; "TS BN FC Pooling BN FC") and their kwargs;
    unlisted kwargs at their defaults (the default is the paper's best row, 94.3%):

    | Table 3 row                    | kwargs                                                 |
    |--------------------------------|--------------------------------------------------------|
    | 1 BN 512 BN 101 (vanilla LSTM) | segments=1, pooling="none"                             |
    | 1 BN (512,512) BN 101          | segments=1, pooling="none", hidden=[512, 512]          |
    | 1 BN (512,512,512) BN 101      | segments=1, pooling="none", hidden=[512, 512, 512]     |
    | 1 BN Max BN 101                | segments=1, hidden=[]                                  |
    | 3 BN Max BN 101                | hidden=[]                                              |
    | 3 BN 512 Max BN 101            | hidden=[], fc_before_pool=True, fc_dim=512             |
    | 3 BN Max + 512 BN 101          | (defaults)                                             |
    | 3 BN Max + (512,512) BN 101    | hidden=[512, 512]                                      |
    | 3 BN Max + (512,512,512) BN 101| hidden=[512, 512, 512]                                 |

    Table 7 (supplement) adds ``input_bn=False`` / ``output_bn=False`` (e.g. "1 LSTM-512
    FC-101": segments=1, pooling="none", input_bn=False, output_bn=False), segments=5 and
    other LSTM widths. ``pooling="mean"`` is the paper's alternative ("performed similarly").
    With ``hidden=[]`` the S pooled vectors are concatenated (B, S*F) before BN and FC, as the
    paper describes for its segment-only rows. ``pooling="none"`` feeds every step to the LSTM
    and needs segments=1 and an LSTM.

    Details the paper leaves open, taken from the authors' public Torch code
    (chihyaoma/Activity-Recognition-with-CNN-and-RNN, RNN/model.lua and RNN/train.lua): every
    segment has floor(T / S) steps and the last T mod S steps are dropped (T=25, S=3: steps
    0-7, 8-15, 16-23; ``drop_remainder=False`` instead spreads all T steps over the segments,
    see ``segment_bounds``); the input BN is one BatchNorm per segment, applied to every step
    of it; the dropout sits between the output BN and the FC (the paper gives no rate; 0.5
    here). The FC before pooling is linear (no activation; the paper does not name one).
    Two-stream input (RGB + flow concatenated, 4096-D in the paper) needs nothing but in_dim.
    As in the paper, the head trains on fixed per-frame features (the paper's come from
    two-stream ResNet-101s fine-tuned on the target dataset).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        segments: int = 3,  # Table 3: 3 segments (5 is statistically no different)
        pooling: str = "max",  # paper: "We use max pooling"
        hidden: Sequence[int] = (512,),  # Table 3: LSTM-512; [] = no LSTM
        fc_before_pool: bool = False,  # Table 3 "Feature integration" row: 512
        fc_dim: int = 512,
        input_bn: bool = True,
        output_bn: bool = True,
        dropout: float = 0.5,  # not in the paper; authors' code has an optional dropout here
        drop_remainder: bool = True,  # authors' code: floor(T / S) steps per segment
    ) -> None:
        super().__init__()
        hidden = list(hidden)
        if segments < 1:
            raise ValueError(f"ts_lstm: segments must be >= 1, got {segments}")
        if pooling not in POOLINGS:
            raise ValueError(f"ts_lstm: pooling must be one of {POOLINGS}, got '{pooling}'")
        if pooling == "none" and (segments != 1 or not hidden):
            raise ValueError(
                f"ts_lstm: pooling 'none' (vanilla LSTM on every step) needs segments=1 and a "
                f"non-empty hidden, got segments={segments}, hidden={hidden}"
            )
        if any(h < 1 for h in hidden):
            raise ValueError(f"ts_lstm: hidden sizes must be >= 1, got {hidden}")
        if fc_dim < 1:
            raise ValueError(f"ts_lstm: fc_dim must be >= 1, got {fc_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ts_lstm: dropout must be in [0, 1), got {dropout}")
        self.segments = segments
        self.pooling = pooling
        self.drop_remainder = drop_remainder
        self.input_bn = (
            nn.ModuleList(nn.BatchNorm1d(in_dim) for _ in range(segments)) if input_bn else None
        )
        self.fc_pre = nn.Linear(in_dim, fc_dim) if fc_before_pool else None
        width = fc_dim if fc_before_pool else in_dim
        self.lstms = nn.ModuleList()
        for h in hidden:
            self.lstms.append(nn.LSTM(width, h, batch_first=True))
            width = h
        if not hidden:
            width *= segments  # the pooled segments are concatenated
        self.output_bn = nn.BatchNorm1d(width) if output_bn else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def _segments(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> pooled segments (B, S, F), or every step (B, T, F) for pooling none."""
        pooled = []
        bounds = segment_bounds(x.shape[1], self.segments, drop_remainder=self.drop_remainder)
        for i, (a, b) in enumerate(bounds):
            seg = x[:, a:b]
            if self.input_bn is not None:
                seg = self.input_bn[i](seg.transpose(1, 2)).transpose(1, 2)  # BN per feature
            if self.fc_pre is not None:
                seg = self.fc_pre(seg)
            if self.pooling == "none":
                return seg  # segments == 1: the whole sequence
            pooled.append(seg.amax(dim=1) if self.pooling == "max" else seg.mean(dim=1))
        return torch.stack(pooled, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D) -> logits (B, num_classes)."""
        h = self._segments(x)
        if self.lstms:
            for lstm in self.lstms:
                h, _ = lstm(h)
            h = h[:, -1]  # the last segment's hidden state
        else:
            h = h.flatten(1)  # (B, S * F)
        return self.fc(self.dropout(self.output_bn(h)))
