"""Max pooling over time + a linear classifier (TS-LSTM Table 3 baseline)."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.heads import register_head


@register_head("max_pool")
class MaxPool(nn.Module):
    """x: (B, T, D) -> logits (B, num_classes); the per-dimension maximum over the T steps."""

    def __init__(self, *, in_dim: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x.amax(dim=1)))
