"""Prediction heads shared by DETR and Deformable-DETR."""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLP(nn.Module):
    """A stack of Linear layers with ReLU between them (DETR's box head is MLP(C, C, 4, num_layers=3)).

    Args:
        in_dim: input features.
        hidden_dim: features of every hidden layer.
        out_dim: output features.
        num_layers: number of Linear layers (>= 1).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:  # [..., in_dim] -> [..., out_dim]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


def focal_prior_bias(prior_prob: float = 0.01) -> float:
    """Class-logit bias so that every class starts at probability ``prior_prob`` (RetinaNet / Deformable-DETR)."""
    return -math.log((1 - prior_prob) / prior_prob)
