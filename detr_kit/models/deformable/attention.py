"""Multi-scale deformable attention (Zhu et al. 2021, "Deformable DETR", eq. 3) as a module.

Every query predicts, per head, ``P`` sampling offsets and attention weights on each of ``L`` levels around its
reference point; the sampled values are summed with the weights (softmax over the ``L * P`` samples of a head).
The sampling itself is ``detr_kit.ops.deform_attn.ms_deform_attn``. Parameter names and initialisation follow the
reference implementation (fundamentalvision/Deformable-DETR), so its checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from detr_kit.models.deformable.levels import level_sizes_wh
from detr_kit.ops.deform_attn import ms_deform_attn


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (sampling locations need it), else the input's own dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def sampling_locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> Tensor:
    """Where each head samples each level: the reference plus the predicted offsets, in 0..1 of the level's map.

    Args:
        reference_points: [B, Lq, L, 2] points (x, y) or [B, Lq, L, 4] boxes (cx, cy, w, h) in 0..1.
        offsets: [B, Lq, M, L, P, 2] predicted offsets (x, y).
        spatial_shapes: (h, w) of each level.

    Returns:
        [B, Lq, M, L, P, 2] (x, y). For points an offset of 1 moves one pixel of the level; for boxes it moves
        ``0.5 * box size / P`` (the reference's scaling).
    """
    points = offsets.shape[-2]
    if reference_points.shape[-1] == 2:
        normalizer = level_sizes_wh(spatial_shapes, offsets)  # [L, 2] (w, h)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[:, None, :]
    centres, extents = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
    return centres + offsets / points * extents * 0.5


def check_inputs(reference_points: Tensor, spatial_shapes: Sequence[tuple[int, int]], num_levels: int) -> None:
    """Raise ValueError unless ``reference_points`` is [B, Lq, L, 2 or 4] with L = ``num_levels`` = the levels in
    ``spatial_shapes``."""
    if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
        raise ValueError(
            f"reference_points must be [B, Lq, L, 2] points or [B, Lq, L, 4] boxes, got {tuple(reference_points.shape)}"
        )
    if reference_points.shape[2] != num_levels or len(spatial_shapes) != num_levels:
        raise ValueError(
            f"MSDeformAttn was built for {num_levels} levels, got reference_points {tuple(reference_points.shape)} "
            f"and {len(spatial_shapes)} spatial shapes"
        )


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        hidden_dim: C; must be divisible by ``num_heads``.
        num_levels: L, feature levels.
        num_heads: M.
        num_points: P, sampling points per head and level.
        impl: the sampling kernel, see ``ms_deform_attn`` ("auto" picks the fastest exact one for the device).

    Raises:
        ValueError: if ``hidden_dim`` is not divisible by ``num_heads`` or a count is < 1.
    """

    def __init__(self, hidden_dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4,
                 impl: str = "auto") -> None:
        super().__init__()
        if min(hidden_dim, num_levels, num_heads, num_points) < 1:
            raise ValueError(
                f"MSDeformAttn needs positive sizes, got hidden_dim={hidden_dim}, num_levels={num_levels}, "
                f"num_heads={num_heads}, num_points={num_points}"
            )
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by num_heads {num_heads}")
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(hidden_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(hidden_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(hidden_dim, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: offsets start on a circle of directions, one per head, at distance 1..P."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)  # [M]
        directions = torch.stack([angles.cos(), angles.sin()], -1)  # [M, 2]
        directions = directions / directions.abs().max(-1, keepdim=True).values  # on the square's border
        grid = directions[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)  # [M, L, P, 2]
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from every query to sampled points of all levels.

        Args:
            query: [B, Lq, C] queries (with their positional encoding added).
            reference_points: [B, Lq, L, 2] points (x, y) or [B, Lq, L, 4] boxes (cx, cy, w, h), normalised to each
                level's padded map (0..1).
            value_input: [B, S, C] flattened features of all levels.
            spatial_shapes: (h, w) of each of the L levels; their areas sum to S.
            padding_mask: [B, S] bool, True on padding (those values are zeroed), or None.

        Returns:
            [B, Lq, C].

        Raises:
            ValueError: if ``reference_points`` is not [B, Lq, L, 2 or 4] or the level count differs.
        """
        check_inputs(reference_points, spatial_shapes, self.num_levels)
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input)  # [B, S, C]
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.hidden_dim // heads)  # [B, S, M, Dh]
        dtype = compute_dtype(query)
        offsets = self.sampling_offsets(query).to(dtype).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).to(dtype).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)  # [B, Lq, M, L, P]
        locations = sampling_locations(reference_points.to(dtype), offsets, spatial_shapes)  # [B, Lq, M, L, P, 2]
        out = ms_deform_attn(value, spatial_shapes, locations, weights, impl=self.impl)  # [B, Lq, C]
        return self.output_proj(out)


__all__ = ["MSDeformAttn", "check_inputs", "compute_dtype", "sampling_locations"]
