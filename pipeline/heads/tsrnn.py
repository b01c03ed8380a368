"""TSRNN: a key-frame branch of per-frame spiking signals and a Conv-GRU with a message passing
bridge, entropy temporal pooling and an accumulative loss (paper 000, sections III-IV); early and
attention fusion of two streams (Fig. 4b-c), the paper's staged training (``phases``) and the
per-window scores that late fusion combines (``window_scores``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.engine import Phase
from pipeline.heads import register_head


def entropy(log_probs: Tensor) -> Tensor:
    """log_probs: (..., C) -> (...): c_t = -sum_i s_t,i log s_t,i."""
    return -(log_probs.exp() * log_probs).sum(dim=-1)  # eq. (3)


def entropy_pool(log_probs: Tensor, window: int) -> Tensor:
    """log_probs: (B, T, C) -> (B, M) index of the lowest-entropy step in each window of `window`
    steps, M = ceil(T / window). The last window is ragged (T mod window steps) when T is not a
    multiple of `window`; T < window gives one window over all T steps. Ties go to the earlier step.
    """
    b, t = log_probs.shape[:2]
    m = math.ceil(t / window)
    c = entropy(log_probs)
    c = F.pad(c, (0, m * window - t), value=math.inf)  # padded steps are never picked
    k = c.view(b, m, window).argmin(dim=-1)  # eq. (4): k = argmax_t -c_t within each window
    return k + torch.arange(m, device=c.device) * window


def window_weights(m: int, accumulative: bool, device: torch.device | None = None) -> Tensor:
    """(M,) gains of the M windows: l/M, l = 1..M (eq. 7, not normalised), or 1/M each."""
    if accumulative:
        return torch.arange(1, m + 1, device=device, dtype=torch.float32) / m  # eq. (7): l / M
    return torch.full((m,), 1.0 / m, device=device)


def conv_maps(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(x) for x: (N, C_in, H, W). On 1 x 1 maps a zero-padded 'same' convolution only ever
    sees its centre tap, so it is computed as a matrix product with that tap (same numbers, ~k^2
    times less work for pooled features)."""
    if x.shape[-2:] == (1, 1):
        k = conv.kernel_size[0] // 2
        return F.linear(x.flatten(1), conv.weight[:, :, k, k], conv.bias)[..., None, None]
    return conv(x)


class ConvGRUBridge(nn.Module):
    """Conv-GRU with the message passing bridge (eq. 6).

    x: (B, T, in_channels, H, W) -> hidden states (B, T, hidden, H, W), h_0 = 0. With the bridge,
    in_channels = D + num_classes: the feature map u_t stacked with s_t tiled over H x W, so each
    gate's input filter is [W_u, W_s]. Without it, in_channels = D (a standard Conv-GRU).
    """

    def __init__(self, *, in_channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.in_channels, self.hidden = in_channels, hidden
        pad = kernel_size // 2
        # [W_zu, W_zs], [W_ru, W_rs], [W_cu, W_cs] as one filter; it carries the biases
        self.conv_x = nn.Conv2d(in_channels, 3 * hidden, kernel_size, padding=pad)
        # W_zh, W_rh
        self.conv_h = nn.Conv2d(hidden, 2 * hidden, kernel_size, padding=pad, bias=False)
        self.conv_c = nn.Conv2d(hidden, hidden, kernel_size, padding=pad, bias=False)  # W_ch

    def forward(self, x: Tensor) -> Tensor:
        b, t, _, hh, ww = x.shape
        # the input half of every gate, for all steps at once
        gx = conv_maps(self.conv_x, x.flatten(0, 1)).view(b, t, 3 * self.hidden, hh, ww)
        h = x.new_zeros(b, self.hidden, hh, ww)
        out = []
        for step in range(t):
            xz, xr, xc = gx[:, step].chunk(3, dim=1)
            hz, hr = conv_maps(self.conv_h, h).chunk(2, dim=1)
            # eq. (6): z_t = sigma(W_zh * h_{t-1} + [W_zu, W_zs] * [u_t, s_t]), r_t alike
            z = torch.sigmoid(hz + xz)
            r = torch.sigmoid(hr + xr)
            # eq. (6): c_t = tanh(W_ch * (r_t . h_{t-1}) + [W_cu, W_cs] * [u_t, s_t])
            c = torch.tanh(conv_maps(self.conv_c, r * h) + xc)
            h = (1 - z) * h + z * c  # eq. (6): h_t = (1 - z_t) . h_{t-1} + z_t . c_t
            out.append(h)
        return torch.stack(out, dim=1)


# Table 1 of the paper, one row per option: which branches exist and how the windows are weighted.
#   keyframe: the key-frame branch B1 (spiking signals s_t, eq. 1-2)
#   temporal: the temporal context branch B2 (the Conv-GRU, eq. 5-6)
#   bridge:   s_t tiled over space enters the Conv-GRU gates (eq. 6)
#   pooling:  one activated step per window of `window` steps by lowest entropy (eq. 3-4)
#   accumulative: window gains l/M (eq. 7-8); otherwise 1/M each (the paper's "average loss")
OPTIONS: dict[int, dict[str, bool]] = {
    1: dict(keyframe=True, temporal=False, bridge=False, pooling=False, accumulative=False),
    2: dict(keyframe=False, temporal=True, bridge=False, pooling=False, accumulative=False),
    3: dict(keyframe=False, temporal=True, bridge=False, pooling=True, accumulative=False),
    4: dict(keyframe=True, temporal=True, bridge=True, pooling=False, accumulative=False),
    5: dict(keyframe=True, temporal=True, bridge=True, pooling=False, accumulative=True),
    6: dict(keyframe=True, temporal=True, bridge=True, pooling=True, accumulative=False),
    7: dict(keyframe=True, temporal=True, bridge=True, pooling=True, accumulative=True),
}


@dataclass
class TSRNNOutputs:
    spike_log_probs: Tensor | None  # (B, T, C) log s_t (eq. 1); None without the key-frame branch
    hidden: Tensor | None  # (B, T, hidden, H, W) Conv-GRU states; None for option 1
    step_log_probs: Tensor | None  # (B, T, C) log-softmax of the classifier on every h_t
    selected: Tensor | None  # (B, M) the activated step of each window
    window_log_probs: Tensor | None  # (B, M, C) log S_l of the activated outputs h*_l
    weights: Tensor | None  # (M,) window gains (eq. 7-8)
    attention: Tensor | None = None  # (B, T, d_rgb, H, W) flow masks a_t; fusion "attention"


@register_head("tsrnn")
class TSRNN(nn.Module):
    """TSRNN. x: (B, T, D) pooled features, or (B, T, D, H, W) conv maps -> log-probabilities
    (B, num_classes). Pooled input is treated as H = W = 1 maps.

    Branches. Key-frame branch (B1): s_t = softmax(FC(spatial mean of u_t)), trained per frame
    with eq. 2. Temporal context branch (B2): Conv-GRU (eq. 6) whose gates see [u_t, s_t] with
    s_t tiled over H x W (the bridge); its states h_t (B, hidden, H, W) go through the classifier
    FC + softmax after a spatial mean. Pooling (eq. 3-4): windows of `window` (gamma) steps; the
    state at the lowest-entropy spiking signal of each window is activated. With T not divisible
    by gamma the last window is shorter (T mod gamma steps), so the final, most informed state
    always lies in the last window; T < gamma gives a single window (M = 1). Without pooling every
    step is its own window (M = T). Loss: eq. 7 with gains l/M (not normalised, as in the paper)
    plus `keyframe_weight` times eq. 2.

    Output. forward returns log(sum_l w_l p_l / sum_l w_l): the log of eq. 8's weighted mixture of
    window probabilities, normalised to sum to one. Returning log-probabilities rather than the
    weighted sum of logits keeps eq. 8's averaging of probabilities: softmax of the output is
    that mixture exactly, and argmax is eq. 8's label (the normalisation does not move it).
    Option 1 returns log of the mean of s_t over frames (the standard CNN's test-time average).
    ``window_scores`` gives the M window probabilities and gains themselves (late SVM fusion "for
    each recurrence", section III-D (a)).

    `option` selects the row of Table 1:
      1 standard CNN: key-frame branch only (eq. 2; predicts the frame average of s_t)
      2 standard Conv-GRU, all frames: no key-frame branch, no bridge, M = T, gains 1/M
      3 standard Conv-GRU + pooling: as 2 with entropy pooling; without B1 the entropy is that
        of the Conv-GRU's own per-step prediction (the paper does not say which signal it uses)
      4 both branches, spiking signals (bridge), all frames, average loss (gains 1/M)
      5 both branches, bridge, all frames, accumulative loss (l/M)
      6 both branches, bridge + pooling, average loss
      7 both branches, bridge + pooling, accumulative loss: the full TSRNN (the paper's best)
    Table 1's text and its option list disagree on 5 (the list says "spiking signals and
    pooling"); this mapping follows the discussion, which contrasts 4 with 5 for the weighting and
    4 with 6, 5 with 7 for the pooling, and says 4 is option 2 plus the spiking signals.

    `fusion` (two streams, Fig. 4; the train stage passes `stream_dims` [d_rgb, d_flow] for
    "rgb+flow", rgb columns first):
      early: the streams' features stacked along D feed both branches (Fig. 4b); stream_dims is
        not used. Also the mode for a single stream.
      attention (Fig. 4c): "the memory of the temporal context branch of the OF-TSRNN works as
        an attention mask"; its products with the RGB feature tensors are the input of the RGB
        temporal context branch, whose output is the prediction. Here: a flow Conv-GRU (eq. 6,
        no bridge) over the flow features gives states h^f_t; the mask is
        a_t = sigmoid(W_a * h^f_t + b_a), W_a a 1 x 1 convolution to d_rgb channels, and the RGB
        Conv-GRU's gates see [a_t . u_t, s_t]. Choices the paper leaves open: (i) the mask is
        per channel and position with a sigmoid; the paper follows VideoLSTM [9], whose mask is
        one softmax over the H x W positions shared by all channels, which on pooled 1 x 1
        features would be the constant 1, so it would mask nothing. (ii) a_t comes from h^f_t,
        the flow memory after the flow of step t (VideoLSTM also attends with the current
        step's flow). (iii) The key-frame branch reads the unmasked RGB u_t (the paper masks
        only the temporal context branch's input), so the spiking signals, the bridge and the
        entropy pooling are the RGB-TSRNN's. (iv) The flow branch has no key-frame branch,
        bridge or classifier of its own: the paper pre-trains an OF-TSRNN; here the flow
        Conv-GRU and W_a learn only through the RGB branch's eq. 7. It needs a temporal branch
        (options 2-7).

    `stages` (section IV-C 3): joint trains every parameter on `keyframe_weight` * eq. 2 +
    eq. 7. staged (options 4-7, which have both branches): `phases()` gives the paper's three
    stages, each for its `stage_epochs` entry (null = the `epochs` setting): the key-frame
    branch alone on eq. 2; the temporal context branch (with the flow branch and W_a under
    attention fusion) on eq. 7, the key-frame branch fixed (the paper's learning rate 0: its
    parameters are left out of the phase and the spiking signals detached, so no gradient is
    computed for it); then every parameter on the joint loss (the paper's fine-tuning; its
    loss is not stated, the joint one is the sum of the two it names).

    Differences from the paper: (a) it trains end to end through GoogLeNet-BN; here the CNN
    features are cached. In joint training eq. 7's gradient also reaches B1 through the bridge.
    Eq. 2 is averaged over frames (the paper sums) so the two terms have comparable scale
    whatever T. (b) The FCs of the spiking layer and the classifier act on the spatial mean of
    u_t / h_t (GoogLeNet's own head), so any H x W works. (c) Dropout on the inputs and on the
    pooled states is ours; the paper names none. (d) The paper gives no hidden size or kernel
    size; on pooled (1 x 1) input only the centre tap of each k x k filter is used, so
    kernel_size 1 gives the same function with k^2 fewer weights. (e) Late fusion, the paper's
    best, is two single-stream TSRNNs whose window scores are fused outside the head.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        option: int = 7,
        window: int = 5,  # gamma, the paper's value
        hidden: int = 256,
        kernel_size: int = 3,
        keyframe_weight: float = 1.0,
        dropout: float = 0.5,
        fusion: Literal["early", "attention"] = "early",
        stream_dims: list[int] | None = None,  # [d_rgb, d_flow], set by the train stage
        stages: Literal["joint", "staged"] = "joint",
        stage_epochs: list[int] | None = None,  # [keyframe, temporal, finetune]; None = epochs
    ) -> None:
        super().__init__()
        if option not in OPTIONS:
            raise ValueError(f"tsrnn: option must be one of 1-7 (Table 1), got {option}")
        if window < 1:
            raise ValueError(f"tsrnn: window must be >= 1, got {window}")
        if hidden < 1:
            raise ValueError(f"tsrnn: hidden must be >= 1, got {hidden}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"tsrnn: kernel_size must be a positive odd number, got {kernel_size}")
        if keyframe_weight < 0:
            raise ValueError(f"tsrnn: keyframe_weight must be >= 0, got {keyframe_weight}")
        if not 0 <= dropout < 1:
            raise ValueError(f"tsrnn: dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.num_classes = in_dim, num_classes
        self.option, self.window, self.keyframe_weight = option, window, keyframe_weight
        flags = OPTIONS[option]
        self.keyframe, self.temporal = flags["keyframe"], flags["temporal"]
        self.bridge, self.pooling = flags["bridge"], flags["pooling"]
        self.accumulative = flags["accumulative"]
        self.stream_dims = self._check_fusion(fusion, stream_dims, in_dim)
        self.stages = stages
        self.stage_epochs = self._check_stages(stages, stage_epochs)
        rgb_dim = self.stream_dims[0] if self.stream_dims else in_dim  # what both branches read

        self.in_dropout = nn.Dropout(dropout)
        # only the parts the option uses exist, so every parameter is trained by loss()
        self.spiking = nn.Linear(rgb_dim, num_classes) if self.keyframe else None  # f^(s), eq. (1)
        self.gru = (
            ConvGRUBridge(
                in_channels=rgb_dim + (num_classes if self.bridge else 0),
                hidden=hidden,
                kernel_size=kernel_size,
            )
            if self.temporal
            else None
        )
        self.out_dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes) if self.temporal else None
        self.flow_gru: ConvGRUBridge | None = None
        self.attend: nn.Conv2d | None = None
        if self.stream_dims:
            # the OF temporal context branch, and W_a: its memory -> one mask per RGB channel
            self.flow_gru = ConvGRUBridge(
                in_channels=self.stream_dims[1], hidden=hidden, kernel_size=kernel_size
            )
            self.attend = nn.Conv2d(hidden, rgb_dim, 1)
        self._report: dict[str, float] = {}

    def _check_fusion(
        self, fusion: str, stream_dims: list[int] | None, in_dim: int
    ) -> list[int] | None:
        """-> [d_rgb, d_flow] for attention fusion, None for early fusion."""
        if fusion not in ("early", "attention"):
            raise ValueError(f"tsrnn: fusion must be 'early' or 'attention', got '{fusion}'")
        if fusion == "early":
            return None
        if stream_dims is None or len(stream_dims) != 2 or sum(stream_dims) != in_dim:
            raise ValueError(
                f"tsrnn: fusion 'attention' needs two streams: train it on stream 'rgb+flow' "
                f"(stream_dims [d_rgb, d_flow] summing to in_dim {in_dim}), got stream_dims "
                f"{stream_dims}"
            )
        if not self.temporal:
            raise ValueError(
                f"tsrnn: fusion 'attention' masks the temporal context branch's input; option "
                f"{self.option} has none (use options 2-7)"
            )
        return list(stream_dims)

    def _check_stages(self, stages: str, stage_epochs: list[int] | None) -> list[int | None]:
        """-> the epochs of the three stages (None = the head's `epochs` setting)."""
        if stages not in ("joint", "staged"):
            raise ValueError(f"tsrnn: stages must be 'joint' or 'staged', got '{stages}'")
        if stages == "joint":
            if stage_epochs is not None:
                raise ValueError("tsrnn: stage_epochs is for stages 'staged'; set it to null")
            return [None]
        if not (self.keyframe and self.temporal):
            raise ValueError(
                f"tsrnn: stages 'staged' trains the key-frame branch, then the temporal "
                f"context branch; option {self.option} lacks one (use options 4-7)"
            )
        if stage_epochs is None:
            return [None, None, None]
        if len(stage_epochs) != 3 or min(stage_epochs) < 0 or sum(stage_epochs) == 0:
            raise ValueError(
                f"tsrnn: stage_epochs must be 3 epochs >= 0 [keyframe, temporal, finetune], "
                f"not all 0, got {stage_epochs}"
            )
        return list(stage_epochs)

    def _maps(self, x: Tensor) -> Tensor:
        """(B, T, D) or (B, T, D, H, W) -> (B, T, D, H, W)."""
        if x.dim() == 3:
            x = x[..., None, None]
        if x.dim() != 5 or x.shape[2] != self.in_dim:
            raise ValueError(
                f"tsrnn: expected (B, T, {self.in_dim}) or (B, T, {self.in_dim}, H, W), "
                f"got {tuple(x.shape)}"
            )
        return x

    def _spikes(self, u: Tensor) -> Tensor | None:
        """u: (B, T, d_rgb, H, W) -> log s_t (B, T, C), None without the key-frame branch."""
        if self.spiking is None:
            return None
        return self.spiking(u.mean(dim=(-2, -1))).log_softmax(dim=-1)  # eq. (1): s_t = f(u_t)

    def _outputs(self, x: Tensor, *, keyframe_fixed: bool = False) -> TSRNNOutputs:
        """keyframe_fixed: the spiking signals enter the temporal branch detached (stage 2)."""
        u = self.in_dropout(self._maps(x))
        b, t, _, hh, ww = u.shape
        flow = None
        if self.stream_dims:
            u, flow = u.split(self.stream_dims, dim=2)
        spikes = self._spikes(u)
        if self.gru is None or self.classifier is None:
            return TSRNNOutputs(spikes, None, None, None, None, None)
        mask = None
        if self.flow_gru is not None and self.attend is not None and flow is not None:
            memory = self.flow_gru(flow)  # h^f_t: (B, T, hidden, H, W)
            # Fig. 4c: a_t = sigmoid(W_a * h^f_t + b_a), the RGB branch's input a_t . u_t
            mask = torch.sigmoid(conv_maps(self.attend, memory.flatten(0, 1))).view_as(u)
            u = mask * u
        if self.bridge:
            assert spikes is not None
            s = spikes.detach() if keyframe_fixed else spikes
            tiled = s.exp()[..., None, None].expand(-1, -1, -1, hh, ww)  # s_t replicated
            u = torch.cat([u, tiled], dim=2)  # eq. (5): RNN_bridge(h_{t-1}, [s_t, u_t])
        hidden = self.gru(u)
        steps = self.classifier(self.out_dropout(hidden.mean(dim=(-2, -1)))).log_softmax(dim=-1)
        if self.pooling:
            # entropy of s_t; option 3 has no B1 and uses the Conv-GRU's own per-step prediction
            source = spikes if spikes is not None else steps
            selected = entropy_pool(source.detach(), self.window)  # eq. (3)-(4)
        else:
            selected = torch.arange(t, device=u.device).expand(b, t)
        windows = steps.gather(1, selected[..., None].expand(-1, -1, self.num_classes))
        weights = window_weights(selected.shape[1], self.accumulative, device=u.device)
        return TSRNNOutputs(spikes, hidden, steps, selected, windows, weights, mask)

    def forward(self, x: Tensor) -> Tensor:
        o = self._outputs(x)
        if not self.training:
            self._report = self._summary(o)
        if o.window_log_probs is None or o.weights is None:
            assert o.spike_log_probs is not None
            t = o.spike_log_probs.shape[1]
            return o.spike_log_probs.logsumexp(dim=1) - math.log(t)  # log mean_t s_t
        w = o.weights
        # eq. (8): y = argmax_j sum_l (l/M) p_l,j, as log(sum_l w_l p_l / sum_l w_l)
        return (o.window_log_probs + w.log()[:, None]).logsumexp(dim=1) - w.sum().log()

    @torch.no_grad()
    def window_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, D[, H, W]) -> (probabilities p_l of each pooling window (recurrence),
        (B, M, C); their eq. 8 weights w_l, (M,)), in eval mode (the module's mode is restored):
        sum_l w_l p_l / sum_l w_l is softmax(forward(x)). Option 1 has no recurrence: each
        frame's s_t is a window, weighted 1/T (forward's frame average)."""
        was_training = self.training
        self.eval()
        try:
            o = self._outputs(x)
        finally:
            self.train(was_training)
        if o.window_log_probs is None or o.weights is None:
            assert o.spike_log_probs is not None
            t = o.spike_log_probs.shape[1]
            return o.spike_log_probs.exp(), window_weights(t, False, device=x.device)
        return o.window_log_probs.exp(), o.weights

    def _summary(self, o: TSRNNOutputs) -> dict[str, float]:
        out = {}
        if o.spike_log_probs is not None:
            # nats, eq. (3)
            out["spike_entropy"] = float(entropy(o.spike_log_probs.detach()).mean())
        if o.selected is not None and self.pooling:
            starts = torch.arange(o.selected.shape[1], device=o.selected.device) * self.window
            offset = o.selected - starts
            out["activated_offset"] = float(offset.float().mean())  # 0 = first step of a window
        if o.attention is not None:
            out["attention_mean"] = float(
                o.attention.detach().mean()
            )  # 1 = the mask keeps everything
        return out

    def report(self) -> dict[str, float]:
        """The last eval-mode forward: mean entropy of s_t (nats), with pooling the mean
        position of the activated step inside its window (0 = first), with attention fusion
        the mean of the flow masks a_t."""
        return dict(self._report)

    def _keyframe_loss(self, spikes: Tensor, y: Tensor) -> Tensor:
        """spikes: (B, T, C) log s_t, y: (B,) -> eq. 2, averaged over frames."""
        t = spikes.shape[1]
        return -spikes.gather(2, y[:, None, None].expand(-1, t, 1)).mean()  # eq. (2)

    def _temporal_loss(self, o: TSRNNOutputs, y: Tensor) -> Tensor:
        """-> eq. 7: sum_l w_l CE(S_l, y), averaged over the batch."""
        assert o.window_log_probs is not None and o.weights is not None
        m = o.window_log_probs.shape[1]
        nll = -o.window_log_probs.gather(2, y[:, None, None].expand(-1, m, 1)).squeeze(2)
        return (nll * o.weights).sum(dim=1).mean()  # eq. (7): sum_l (l/M) CE_l

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """x: (B, T, D[, H, W]), y: (B,) -> keyframe_weight * eq. 2 (mean over frames) + eq. 7."""
        o = self._outputs(x)
        total = x.new_zeros(())
        if o.spike_log_probs is not None:
            weight = self.keyframe_weight if self.temporal else 1.0
            total = total + weight * self._keyframe_loss(o.spike_log_probs, y)
        if o.window_log_probs is not None:
            total = total + self._temporal_loss(o, y)
        return total

    def phases(self) -> list[Phase]:
        """The supervised training as engine Phases: one over every parameter on ``loss`` for
        stages "joint"; for "staged" the paper's three (section IV-C 3): key-frame branch on
        eq. 2, temporal branch on eq. 7 with the key-frame branch fixed, all on ``loss``."""
        everything = list(self.parameters())
        if self.stages == "joint":
            return [Phase("train", self.stage_epochs[0], everything, self.loss)]
        assert self.spiking is not None
        keyframe = list(self.spiking.parameters())
        ids = {id(p) for p in keyframe}
        temporal = [p for p in everything if id(p) not in ids]
        first, second, third = self.stage_epochs

        def keyframe_loss(x: Tensor, y: Tensor) -> Tensor:
            u = self.in_dropout(self._maps(x))
            if self.stream_dims:
                u = u[:, :, : self.stream_dims[0]]
            spikes = self._spikes(u)
            assert spikes is not None
            return self._keyframe_loss(spikes, y)

        def temporal_loss(x: Tensor, y: Tensor) -> Tensor:
            return self._temporal_loss(self._outputs(x, keyframe_fixed=True), y)

        return [
            Phase("keyframe", first, keyframe, keyframe_loss),
            Phase("temporal", second, temporal, temporal_loss),
            Phase("finetune", third, everything, self.loss),
        ]
