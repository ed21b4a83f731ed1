"""``MSDeformAttn`` computed with fewer copies and less memory kept for backward; the same function and parameters.

- The queries' positional encoding can be passed apart (``query_pos``): in training both projections of
  ``query + query_pos`` run as one matmul that keeps the two addends (kept by other ops anyway) instead of their sum
  (one ``[B, Lq, C]`` tensor less per layer).
- The sampling offsets are projected with ``sampling_offsets``' rows reordered to x and y planes (``[M, 2, L, P]``
  instead of the checkpoints' ``[M, L, P, 2]``), so that the locations come out as the planes the deformable core
  reads, with no transposing copy and no elementwise op over size-2 rows.
- The padded values are zeroed in place (the value projection's output is not needed by its backward).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from detr_kit.models.deformable.attention import MSDeformAttn, check_inputs, compute_dtype
from detr_kit.models.deformable.levels import level_sizes_wh
from detr_kit.ops.autocast import autocast_dtype
from detr_kit.ops.deform_attn import ms_deform_attn


class LinearOfSum(torch.autograd.Function):
    """``F.linear(a + b, weight, bias)`` that keeps ``a`` and ``b`` (kept by other ops anyway) instead of ``a + b``."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """a, b [..., C] (b may broadcast), weight [N, C], bias [N] -> [..., N]."""
        ctx.save_for_backward(a, b, weight)
        return F.linear(a + b, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        a, b, weight = ctx.saved_tensors
        need_a, need_b, need_weight, need_bias = ctx.needs_input_grad
        grad_rows = grad.reshape(-1, grad.shape[-1])  # [R, N]
        grad_weight = grad_bias = grad_a = grad_b = None
        if need_weight:
            grad_weight = grad_rows.t() @ (a + b).reshape(-1, weight.shape[1])  # [N, C], the sum recomputed
        if need_bias:
            grad_bias = grad_rows.sum(0)  # [N]
        if need_a or need_b:
            grad_x = grad @ weight  # [..., C]
            grad_a = grad_x.sum_to_size(a.shape) if need_a else None
            grad_b = grad_x.sum_to_size(b.shape) if need_b else None
        return grad_a, grad_b, grad_weight, grad_bias


class FastMSDeformAttn(nn.Module):
    """The replacement of one ``MSDeformAttn``: it adopts that module's projections (same state-dict keys).

    Args:
        attn: the plain module.
    """

    def __init__(self, attn: MSDeformAttn) -> None:
        super().__init__()
        self.hidden_dim, self.num_levels = attn.hidden_dim, attn.num_levels
        self.num_heads, self.num_points, self.impl = attn.num_heads, attn.num_points, attn.impl
        self.sampling_offsets = attn.sampling_offsets
        self.attention_weights = attn.attention_weights
        self.value_proj = attn.value_proj
        self.output_proj = attn.output_proj
        heads, levels, points = attn.num_heads, attn.num_levels, attn.num_points
        m, axis, level, point = torch.meshgrid(*(torch.arange(n) for n in (heads, 2, levels, points)), indexing="ij")
        rows = ((m * levels + level) * points + point) * 2 + axis  # [M, 2, L, P] rows of sampling_offsets
        device = attn.sampling_offsets.weight.device
        self.register_buffer("axis_major_rows", rows.flatten().to(device), persistent=False)

    def _project(self, query: Tensor, query_pos: Tensor | None) -> tuple[Tensor, Tensor]:
        """Offsets [B, Lq, M*2*L*P] (axis-major) and attention logits [B, Lq, M*L*P] of ``query + query_pos``."""
        offset_weight = self.sampling_offsets.weight[self.axis_major_rows]  # [M*2*L*P, C]
        offset_bias = self.sampling_offsets.bias[self.axis_major_rows]  # [M*2*L*P]
        if query_pos is not None and torch.is_grad_enabled() and autocast_dtype(query.device.type) is None:
            weight = torch.cat([offset_weight, self.attention_weights.weight])  # [M*L*P*3, C]
            bias = torch.cat([offset_bias, self.attention_weights.bias])  # [M*L*P*3]
            both = LinearOfSum.apply(query, query_pos, weight, bias)
            return both.split([self.sampling_offsets.out_features, self.attention_weights.out_features], dim=-1)
        query = query if query_pos is None else query + query_pos  # [B, Lq, C]
        return F.linear(query, offset_weight, offset_bias), self.attention_weights(query)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        """As ``MSDeformAttn.forward`` for the query ``query + query_pos`` (``query_pos`` [B, Lq, C] or None)."""
        check_inputs(reference_points, spatial_shapes, self.num_levels)
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input)  # [B, S, C]
        if padding_mask is not None:
            value = value.masked_fill_(padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.hidden_dim // heads)  # [B, S, M, Dh]
        dtype = compute_dtype(query)
        offsets, weights = self._project(query, query_pos)
        offsets = offsets.to(dtype).view(batch, num_queries, heads, 2, levels, points)  # x and y planes
        weights = weights.to(dtype).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)  # [B, Lq, M, L, P]
        # Origin and scale are spelled out over the points, so that the addcmul runs over contiguous rows of
        # 2*L*P in every operand (broadcasting them over P left 4-element inner loops).
        reference_points = reference_points.to(dtype).transpose(2, 3)  # [B, Lq, 2 or 4, L]
        per_point = (batch, num_queries, 1, 2, levels, points)
        if reference_points.shape[2] == 2:
            origin = reference_points[:, :, None, :, :, None].expand(per_point).contiguous()  # [B, Lq, 1, 2, L, P]
            sizes = level_sizes_wh(spatial_shapes, offsets).t()  # [2, L] (w, h) rows
            scale = (1.0 / sizes)[:, :, None].expand(2, levels, points).contiguous()  # [2, L, P]
        else:
            origin = reference_points[:, :, None, :2, :, None].expand(per_point).contiguous()  # box centres
            scale = (reference_points[:, :, None, 2:, :, None] * (0.5 / points)).expand(per_point).contiguous()
        # [B, Lq, M, L, P, 2], a view of x and y planes ([B, Lq, M, 2, L, P] in memory)
        locations = torch.addcmul(origin, offsets, scale).permute(0, 1, 2, 4, 5, 3)
        out = ms_deform_attn(value, spatial_shapes, locations, weights, impl=self.impl)  # [B, Lq, C]
        return self.output_proj(out)


__all__ = ["FastMSDeformAttn", "LinearOfSum"]
