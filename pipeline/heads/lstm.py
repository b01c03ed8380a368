"""Vanilla (stacked) LSTM over the frame features, classified at the last step (TS-LSTM Table 3)."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.heads import register_head


@register_head("lstm")
class LSTMHead(nn.Module):
    """x: (B, T, D) -> logits (B, num_classes) from the last step's hidden state (B, hidden)."""

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        hidden: int = 512,
        layers: int = 1,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if not 1 <= layers <= 3:
            raise ValueError(f"lstm: layers must be 1-3, got {layers}")
        self.in_dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            in_dim,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0,
        )
        self.out_dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.in_dropout(x))
        return self.fc(self.out_dropout(out[:, -1]))
