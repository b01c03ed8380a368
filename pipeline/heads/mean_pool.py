"""Mean pooling over time + a linear classifier: the two-stream baseline (TS-LSTM Table 3)."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.heads import register_head


@register_head("mean_pool")
class MeanPool(nn.Module):
    """x: (B, T, D) -> logits (B, num_classes). Order of the T steps cannot matter."""

    def __init__(self, *, in_dim: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x.mean(dim=1)))
