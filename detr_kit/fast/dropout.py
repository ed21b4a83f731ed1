"""``nn.Dropout`` with the cheap mask of ``ops.dropout.dropout`` (a seed kept for backward, not a mask)."""

from __future__ import annotations

from torch import Tensor, nn

from detr_kit.ops.dropout import dropout


class SeededDropout(nn.Module):
    """Zero each element with probability ``p`` in training and scale the rest by ``1 / (1 - p)``, as ``nn.Dropout``.

    Args:
        p: drop probability in [0, 1) (on the CPU quantised to a multiple of 2**-16).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:  # [...] -> [...]
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


__all__ = ["SeededDropout"]
