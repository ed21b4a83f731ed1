"""Deformable-DETR's encoder: deformable self-attention of every position of every level (Zhu et al. 2021, §4.1).

Module names follow the reference implementation: ``layers.{i}.{self_attn,norm1,linear1,linear2,norm2}``.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from detr_kit.models.deformable.attention import MSDeformAttn
from detr_kit.models.deformable.levels import level_sizes_wh


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then a ReLU feed-forward block.

    Args:
        hidden_dim: C.
        dim_feedforward: hidden size of the feed-forward block (reference: 1024).
        num_levels: L.
        num_heads: M.
        num_points: P.
        dropout: dropout on the residual branches (reference: 0.1).
        activation_dropout: dropout after the feed-forward ReLU; None = ``dropout``.
        impl: the deformable sampling kernel (see ``MSDeformAttn``).
    """

    def __init__(
        self,
        hidden_dim: int,
        dim_feedforward: int,
        num_levels: int,
        num_heads: int,
        num_points: int,
        dropout: float = 0.1,
        activation_dropout: float | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(hidden_dim, num_levels, num_heads, num_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout if activation_dropout is None else activation_dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None,
    ) -> Tensor:
        """src [B, S, C], pos [B, S, C], reference_points [B, S, L, 2], padding_mask [B, S] or None -> [B, S, C]."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)  # [B, S, C]
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.dropout2(F.relu(self.linear1(src)))  # [B, S, dim_feedforward]
        return self.norm2(src + self.dropout3(self.linear2(hidden)))


class DeformableEncoder(nn.Module):
    """``num_layers`` copies of ``layer`` (post-norm: no final norm).

    Args:
        layer: the layer to copy.
        num_layers: encoder depth.
        activation_checkpointing: in training, keep only each layer's input and recompute the layer in the
            backward pass (``torch.utils.checkpoint``): the least memory, a slower step.
    """

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int, activation_checkpointing: bool = False) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DeformableEncoder needs num_layers >= 1, got {num_layers}")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.activation_checkpointing = activation_checkpointing
        self.hidden_dim = layer.self_attn.hidden_dim
        self.num_levels = layer.self_attn.num_levels

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None,
    ) -> Tensor:
        """src [B, S, C], pos [B, S, C], reference_points [B, S, L, 2], padding_mask [B, S] -> memory [B, S, C]."""
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                src = checkpoint(layer, src, pos, reference_points, spatial_shapes, padding_mask, use_reentrant=False)
            else:
                src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


def pixel_grid(spatial_shapes: Sequence[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The pixel centres of every level, made afresh for each call.

    Nothing is cached across calls: a kept tensor would carry the mode that made it (one made under
    ``torch.inference_mode`` cannot be saved for backward by a later training step).

    Returns:
        centres [S, 2] (x, y) in pixels of their level, the level of each position [S] int64 and (w, h) per level
        [L, 2] float32.
    """
    centres, levels = [], []
    for level, (height, width) in enumerate(spatial_shapes):
        ys = torch.arange(height, dtype=torch.float32, device=device) + 0.5  # [h]
        xs = torch.arange(width, dtype=torch.float32, device=device) + 0.5  # [w]
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # [h*w, 2] (x, y)
        centres.append(grid)
        levels.append(torch.full((height * width,), level, dtype=torch.int64, device=device))
    centres = torch.cat(centres)  # [S, 2]
    return centres, torch.cat(levels), level_sizes_wh(spatial_shapes, centres)


__all__ = ["DeformableEncoder", "DeformableEncoderLayer", "pixel_grid"]
