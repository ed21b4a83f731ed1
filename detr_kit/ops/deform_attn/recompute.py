"""The recompute kernel: one ``F.grid_sample`` per level that keeps no samples for backward.

Heads are folded into the batch and each input is copied once into the layout the per-level loop reads
contiguously (value ``[B*M, Dh, S]``, grid ``[L, B*M, P, Lq, 2]``). Autograd through the reference keeps every
level's ``[B*M, Dh, Lq, P]`` samples; this kernel saves only its inputs and recomputes each level's samples in
backward (one ``grid_sample`` for the attention weights' gradient and one ``grid_sampler_2d_backward``), freeing
a level's before the next. On CUDA it is the training path; on the CPU ``grid_sample``'s backward scatters into
the channels-first value with a per-sample loop, and the gather kernel is faster.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from detr_kit.ops.autocast import float32_region


def recompute_sample_and_sum(
    value: Tensor, shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Deformable attention by the recompute kernel (differentiable once in every input).

    Args:
        value: [B, S, M, Dh].
        shapes: (h, w) per level, L of them.
        sampling_locations: [B, Lq, M, L, P, 2] (x, y) in 0..1, in the value's dtype.
        attention_weights: [B, Lq, M, L, P], in the value's dtype.

    Returns:
        [B, Lq, M * Dh], a transposed view of a [B, M * Dh, Lq] buffer (no copy is made).
    """
    batch, total, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    bm = batch * num_heads
    # ``.contiguous()`` is explicit: for B = 1 a reshape of the permuted tensor is a strided view, and strided
    # grids are several times slower to read.
    value_t = value.permute(0, 2, 3, 1).contiguous().view(bm, head_dim, total)  # [B*M, Dh, S]
    grid = sampling_locations.permute(3, 0, 2, 4, 1, 5).contiguous()  # [L, B, M, P, Lq, 2]
    grid = (grid * 2 - 1).view(num_levels, bm, num_points, num_queries, 2)  # [L, B*M, P, Lq, 2] in -1..1
    out = _SampleAndSum.apply(value_t, grid, attention_weights, list(shapes))  # [B, M*Dh, Lq]
    return out.transpose(1, 2)  # [B, Lq, M*Dh]


def _level_values(value_t: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """[B*M, Dh, S] -> one [B*M, Dh, h, w] view per level (no copy)."""
    bm, head_dim, _ = value_t.shape
    levels, start = [], 0
    for height, width in shapes:
        levels.append(value_t[:, :, start : start + height * width].view(bm, head_dim, height, width))
        start += height * width
    return levels


def _level_weights(attention_weights: Tensor) -> Tensor:
    """[B, Lq, M, L, P] -> [L, B*M, P, Lq] contiguous (a 1/Dh-sized copy, made in each pass, never saved)."""
    batch, num_queries, num_heads, num_levels, num_points = attention_weights.shape
    weights = attention_weights.permute(3, 0, 2, 4, 1).contiguous()  # [L, B, M, P, Lq]
    return weights.view(num_levels, batch * num_heads, num_points, num_queries)


def _sample(value_l: Tensor, grid_l: Tensor) -> Tensor:
    """value_l [B*M, Dh, h, w], grid_l [B*M, P, Lq, 2] in -1..1 -> [B*M, Dh, P, Lq] (the reference's sampling)."""
    return F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)


class _SampleAndSum(torch.autograd.Function):
    """Per-level bilinear sampling and attention-weighted sum that recomputes the samples in backward.

    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, value_t: Tensor, grid: Tensor, attention_weights: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """value_t [B*M, Dh, S], grid [L, B*M, P, Lq, 2] in -1..1, weights [B, Lq, M, L, P] -> [B, M*Dh, Lq]."""
        bm, head_dim, _ = value_t.shape
        batch, num_queries, num_heads, _, num_points = attention_weights.shape
        weights = _level_weights(attention_weights)  # [L, B*M, P, Lq]
        out = value_t.new_zeros(bm, head_dim, num_queries)  # [B*M, Dh, Lq]
        for level, value_l in enumerate(_level_values(value_t, shapes)):
            samples = _sample(value_l, grid[level])  # [B*M, Dh, P, Lq]
            for point in range(num_points):
                out.addcmul_(samples[:, :, point], weights[level, :, point, None])  # [B*M, Dh, Lq]
        ctx.shapes = shapes
        ctx.save_for_backward(value_t, grid, attention_weights)
        return out.view(batch, num_heads * head_dim, num_queries)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        """grad_out [B, M*Dh, Lq] -> gradients of value_t, grid and attention_weights, level by level."""
        value_t, grid, attention_weights = ctx.saved_tensors
        need_value, need_grid, need_weights = ctx.needs_input_grad[:3]
        bm, head_dim, _ = value_t.shape
        batch, num_queries, num_heads, num_levels, num_points = attention_weights.shape
        with float32_region(value_t.device.type):
            grad_out = grad_out.to(value_t.dtype).reshape(bm, head_dim, 1, num_queries).contiguous()  # [B*M, Dh, 1, Lq]
            weights = _level_weights(attention_weights)  # [L, B*M, P, Lq]
            grad_value = torch.empty_like(value_t) if need_value else None  # [B*M, Dh, S]
            grad_grid = torch.empty_like(grid) if need_grid else None  # [L, B*M, P, Lq, 2]
            grad_weights = weights.new_empty(weights.shape) if need_weights else None  # [L, B*M, P, Lq]
            grad_value_levels = _level_values(grad_value, ctx.shapes) if need_value else None
            for level, value_l in enumerate(_level_values(value_t, ctx.shapes)):
                if need_weights:
                    samples = _sample(value_l, grid[level])  # [B*M, Dh, P, Lq]
                    torch.sum(samples.mul_(grad_out), 1, out=grad_weights[level])  # [B*M, P, Lq]
                    del samples
                if need_value or need_grid:
                    grad_samples = grad_out * weights[level, :, None]  # [B*M, Dh, P, Lq]
                    grad_value_l, grad_grid_l = torch.ops.aten.grid_sampler_2d_backward(
                        grad_samples, value_l, grid[level], 0, 0, False, [need_value, need_grid]
                    )  # [B*M, Dh, h, w], [B*M, P, Lq, 2]; modes: bilinear, zeros, align_corners=False
                    if need_value:
                        grad_value_levels[level].copy_(grad_value_l)
                    if need_grid:
                        grad_grid[level] = grad_grid_l
                    del grad_samples, grad_value_l, grad_grid_l
        if grad_weights is not None:
            grad_weights = grad_weights.view(num_levels, batch, num_heads, num_points, num_queries)
            grad_weights = grad_weights.permute(1, 4, 2, 0, 3)  # [B, Lq, M, L, P]
        return grad_value, grad_grid, grad_weights, None  # grad_weights [B, Lq, M, L, P] (a permuted view)
