"""Multi-scale deformable attention core (Zhu et al. 2021, "Deformable DETR", eq. 3), in pure PyTorch.

Every query samples ``P`` points per head on each of ``L`` feature levels by bilinear interpolation and
returns, per head, the attention-weighted sum of the samples. This op dominates Deformable-DETR's encoder, so
it is written for speed:

Two implementations share the semantics (bilinear, zero padding, ``align_corners=False``):

* **inference** (no input needs a gradient): one ``F.embedding_bag`` call for all levels, heads and points. The
  value stays in its natural ``[B*S*M, Dh]`` row layout (no transpose); each query-head pair is one bag of
  ``4 * L * P`` rows (the four bilinear corners of every sample) whose weights are the bilinear weights times the
  attention weight, zeroed outside the map. Bags come out in ``[B, Lq, M]`` order, so the result is already
  ``[B, Lq, M*Dh]``. The index and weight tensors are built with a handful of vectorised ops over
  ``[B*Lq*M, 2, L*P]`` (contiguous inner dimension, no per-level Python work).
* **training**: heads folded into the batch, one ``F.grid_sample`` per level on a level-major contiguous grid,
  each level's samples weighted and accumulated in place (``grid_sample``'s backward is cheaper on CPU than
  ``embedding_bag``'s, which sorts the indices). Two kernels, chosen by the module-level switch
  ``TRAINING_KERNEL``:

  - ``"recompute"`` (default): a ``torch.autograd.Function`` that saves only its inputs (the value, the grid
    and the attention weights) and recomputes each level's samples in backward, so no ``[B*M, Dh, P, Lq]``
    tensor outlives its level in either pass (~180 MB less per encoder layer at 2x512x512). Backward per level:
    one ``grid_sample`` (for the attention weights' gradient) and one ``grid_sampler_2d_backward``.
  - ``"autograd"``: the same forward recorded by autograd, which keeps every level's samples for backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

TRAINING_KERNEL = "recompute"
"""Kernel of the training path: ``"recompute"`` (low memory, default) or ``"autograd"`` (see the module docstring)."""

_TRAINING_KERNELS = ("recompute", "autograd")

def _shapes_as_list(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(h, w) per level as Python ints (a tensor is read once; pass a list to avoid a device sync)."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must be [L, 2] (h, w) per level, got shape {tuple(spatial_shapes.shape)}")
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level at the given locations and sum the samples with the attention weights.

    Bilinear sampling with zero padding outside each map, ``align_corners=False`` on ``2 * loc - 1``
    (``F.grid_sample``), exactly as the reference implementation. Under ``torch.autocast`` the sampling and the
    weighted sum run in float32 and the result is cast to the autocast dtype.

    Args:
        value: [B, S, M, Dh] values of all levels, flattened row-major per level and concatenated.
        spatial_shapes: [L, 2] int64 (h, w) per level, or a list of L (h, w) pairs (no device sync).
        level_start_index: [L] offset of each level in S. The pure-PyTorch path derives it from
            ``spatial_shapes`` and does not read it; it is kept for the signature that compiled kernels share.
        sampling_locations: [B, Lq, M, L, P, 2] (x, y) normalised to each level's map, 0..1 inside it.
        attention_weights: [B, Lq, M, L, P], usually summing to 1 over (L, P).

    Returns:
        [B, Lq, M * Dh]: head ``m`` fills channels ``m*Dh:(m+1)*Dh``. In training the tensor is a transposed
        view of a [B, M * Dh, Lq] buffer (no copy is made); call ``.contiguous()`` before ``.view`` if you need one.

    Raises:
        ValueError: if the shapes of the inputs do not agree.
    """
    shapes = _shapes_as_list(spatial_shapes)
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, M, Dh], got shape {tuple(value.shape)}")
    batch, total, num_heads, head_dim = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be [B, Lq, M, L, P, 2], got shape {tuple(sampling_locations.shape)}")
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if sampling_locations.shape[:3] != (batch, num_queries, num_heads) or num_levels != len(shapes):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value {tuple(value.shape)} "
            f"and {len(shapes)} levels; expected [B={batch}, Lq, M={num_heads}, L={len(shapes)}, P, 2]"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be [B, Lq, M, L, P] = {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if sum(h * w for h, w in shapes) != total:
        raise ValueError(f"value has S={total} positions but spatial_shapes {shapes} sum to {sum(h * w for h, w in shapes)}")

    device_type = value.device.type
    if torch.is_autocast_enabled(device_type):
        out_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            out = _sample_and_sum(value.float(), shapes, sampling_locations.float(), attention_weights.float())
        return out.to(out_dtype)
    return _sample_and_sum(value, shapes, sampling_locations, attention_weights)


def _sample_and_sum(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    if torch.is_grad_enabled() and (
        value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    ):
        if TRAINING_KERNEL == "recompute":
            return _recompute_sample_and_sum(value, shapes, sampling_locations, attention_weights)
        if TRAINING_KERNEL == "autograd":
            return _grid_sample_and_sum(value, shapes, sampling_locations, attention_weights)
        raise ValueError(f"ms_deform_attn.TRAINING_KERNEL must be one of {_TRAINING_KERNELS}, got {TRAINING_KERNEL!r}")
    return _gather_and_sum(value, shapes, sampling_locations, attention_weights)


def _gather_and_sum(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The inference path: every sample's four bilinear corners as one weighted ``embedding_bag`` per query-head."""
    batch, total, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    num_samples = num_levels * num_points  # K samples per query and head
    bags = batch * num_queries * num_heads
    device, dtype = value.device, value.dtype
    index_dtype = torch.int32 if batch * total * num_heads < 2**31 else torch.int64
    # Per (axis, level, point) constants: the map size (w; h) and the row stride of a step along the axis.
    sizes = torch.tensor([[w for _, w in shapes], [h for h, _ in shapes]], dtype=dtype, device=device)  # [2, L]
    sizes = sizes[:, :, None].expand(2, num_levels, num_points).reshape(2, num_samples)  # [2, K]
    strides = torch.tensor(
        [[num_heads] * num_samples, [w * num_heads for _, w in shapes for _ in range(num_points)]],
        dtype=index_dtype,
        device=device,
    )  # [2, K]: x moves one row of M heads, y one map row
    starts, offset = [], 0
    for height, width in shapes:
        starts.append(offset)
        offset += height * width
    # Row of (image b, level start, head m) in the [B*S*M, Dh] value table.
    base = (
        torch.arange(batch, dtype=index_dtype, device=device).view(batch, 1, 1, 1) * (total * num_heads)
        + torch.arange(num_heads, dtype=index_dtype, device=device).view(1, 1, num_heads, 1)
        + torch.tensor(starts, dtype=index_dtype, device=device).repeat_interleave(num_points) * num_heads
    )  # [B, 1, M, K]

    locations = sampling_locations.to(dtype).reshape(bags, num_samples, 2).transpose(1, 2)  # [Nb, 2, K] (x; y)
    pixels = locations.contiguous() * sizes - 0.5  # [Nb, 2, K] in pixels, centres at integers + 0.5 - 0.5
    low = pixels.floor().nan_to_num_(nan=-2.0)  # [Nb, 2, K]; NaN samples fall outside (weight 0)
    frac = pixels.sub_(low)  # [Nb, 2, K] distance to the lower corner
    weight_low = (1 - frac).masked_fill_((low < 0) | (low >= sizes), 0.0)  # [Nb, 2, K], 0 outside the map
    weight_high = frac.masked_fill_((low < -1) | (low >= sizes - 1), 0.0)  # [Nb, 2, K]
    attention = attention_weights.to(dtype).reshape(bags, num_samples)  # [Nb, K]
    y_low = weight_low[:, 1] * attention  # [Nb, K]
    y_high = weight_high[:, 1] * attention  # [Nb, K]
    x_low, x_high = weight_low[:, 0], weight_high[:, 0]  # [Nb, K]
    weights = torch.stack([x_low * y_low, x_high * y_low, x_low * y_high, x_high * y_high], 1)  # [Nb, 4, K]

    last = sizes - 1
    index_low = torch.minimum(low.clamp(min=0), last).to(index_dtype).mul_(strides)  # [Nb, 2, K] row offsets
    index_high = torch.minimum(low.add_(1).clamp_(min=0), last).to(index_dtype).mul_(strides)  # [Nb, 2, K]
    row_low = (index_low[:, 1].view(batch, num_queries, num_heads, num_samples) + base).view(bags, num_samples)
    row_high = (index_high[:, 1].view(batch, num_queries, num_heads, num_samples) + base).view(bags, num_samples)
    col_low, col_high = index_low[:, 0], index_high[:, 0]  # [Nb, K]
    indices = torch.stack([row_low + col_low, row_low + col_high, row_high + col_low, row_high + col_high], 1)

    out = F.embedding_bag(
        indices.view(bags, 4 * num_samples),
        value.reshape(batch * total * num_heads, head_dim),
        per_sample_weights=weights.view(bags, 4 * num_samples),
        mode="sum",
    )  # [Nb, Dh], bags in (b, q, m) order
    return out.view(batch, num_queries, num_heads * head_dim)  # [B, Lq, M*Dh]


def _grid_sample_and_sum(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The training path: one ``grid_sample`` per level, heads folded into the batch."""
    batch, total, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    bm = batch * num_heads
    # Each input is copied once into the layout the loop reads contiguously. ``.contiguous()`` is explicit: for
    # B = 1 a reshape of the permuted tensor is a strided view, and strided grids and weights are several times
    # slower to read.
    value_t = value.permute(0, 2, 3, 1).contiguous().view(bm, head_dim, total)  # [B*M, Dh, S]
    grid = sampling_locations.permute(3, 0, 2, 4, 1, 5).contiguous().to(value.dtype)  # [L, B, M, P, Lq, 2]
    grid = (grid * 2 - 1).view(num_levels, bm, num_points, num_queries, 2)  # [L, B*M, P, Lq, 2] in -1..1
    weights = attention_weights.permute(3, 4, 0, 2, 1).contiguous().to(value.dtype)  # [L, P, B, M, Lq]
    weights = weights.view(num_levels, num_points, bm, 1, num_queries)  # [L, P, B*M, 1, Lq]
    out: Tensor | None = None
    start = 0
    for level, (height, width) in enumerate(shapes):
        value_l = value_t[:, :, start : start + height * width].view(bm, head_dim, height, width)  # [B*M, Dh, h, w]
        start += height * width
        samples = F.grid_sample(
            value_l, grid[level], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [B*M, Dh, P, Lq]
        # unbind (not indexing) so that backward stacks the P gradients once instead of zero-filling P full copies.
        for point, samples_p in enumerate(samples.unbind(2)):  # [B*M, Dh, Lq] each
            if out is None:
                out = samples_p * weights[level, point]  # [B*M, Dh, Lq]
            else:
                out = out.addcmul_(samples_p, weights[level, point])
    if out is None:
        raise ValueError("ms_deform_attn needs at least one level and one sampling point")
    return out.view(batch, num_heads * head_dim, num_queries).transpose(1, 2)  # [B, Lq, M*Dh]


def _recompute_sample_and_sum(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The low-memory training path: ``_SampleAndSum`` on the layouts its per-level loop reads contiguously."""
    batch, total, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if num_levels * num_points == 0:
        raise ValueError("ms_deform_attn needs at least one level and one sampling point")
    bm = batch * num_heads
    value_t = value.permute(0, 2, 3, 1).contiguous().view(bm, head_dim, total)  # [B*M, Dh, S]
    grid = sampling_locations.permute(3, 0, 2, 4, 1, 5).contiguous().to(value.dtype)  # [L, B, M, P, Lq, 2]
    grid = (grid * 2 - 1).view(num_levels, bm, num_points, num_queries, 2)  # [L, B*M, P, Lq, 2] in -1..1
    out = _SampleAndSum.apply(value_t, grid, attention_weights.to(value.dtype), shapes)  # [B, M*Dh, Lq]
    return out.transpose(1, 2)  # [B, Lq, M*Dh]


def _level_weights(attention_weights: Tensor) -> Tensor:
    """[B, Lq, M, L, P] -> [L, B*M, P, Lq] contiguous (a 1/Dh-sized copy, made in each pass, never saved)."""
    batch, num_queries, num_heads, num_levels, num_points = attention_weights.shape
    weights = attention_weights.permute(3, 0, 2, 4, 1).contiguous()  # [L, B, M, P, Lq]
    return weights.view(num_levels, batch * num_heads, num_points, num_queries)


class _SampleAndSum(torch.autograd.Function):
    """Per-level bilinear sampling and attention-weighted sum that recomputes the samples in backward.

    Saves only its inputs (no ``[B*M, Dh, P, Lq]`` samples): forward and backward each loop over the levels and
    free a level's samples before the next one. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, value_t: Tensor, grid: Tensor, attention_weights: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """value_t [B*M, Dh, S], grid [L, B*M, P, Lq, 2] in -1..1, attention_weights [B, Lq, M, L, P] -> [B, M*Dh, Lq]."""
        bm, head_dim, _ = value_t.shape
        batch, num_queries, num_heads, _, num_points = attention_weights.shape
        weights = _level_weights(attention_weights)  # [L, B*M, P, Lq]
        out = value_t.new_zeros(bm, head_dim, num_queries)  # [B*M, Dh, Lq]
        for level, value_l in enumerate(_level_values(value_t, shapes)):
            samples = F.grid_sample(
                value_l, grid[level], mode="bilinear", padding_mode="zeros", align_corners=False
            )  # [B*M, Dh, P, Lq]
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
        with torch.autocast(value_t.device.type, enabled=False):
            grad_out = grad_out.to(value_t.dtype).reshape(bm, head_dim, 1, num_queries).contiguous()  # [B*M, Dh, 1, Lq]
            weights = _level_weights(attention_weights)  # [L, B*M, P, Lq]
            grad_value = torch.empty_like(value_t) if need_value else None  # [B*M, Dh, S]
            grad_grid = torch.empty_like(grid) if need_grid else None  # [L, B*M, P, Lq, 2]
            grad_weights = weights.new_empty(weights.shape) if need_weights else None  # [L, B*M, P, Lq]
            grad_value_levels = _level_values(grad_value, ctx.shapes) if need_value else None
            for level, value_l in enumerate(_level_values(value_t, ctx.shapes)):
                if need_weights:
                    samples = F.grid_sample(
                        value_l, grid[level], mode="bilinear", padding_mode="zeros", align_corners=False
                    )  # [B*M, Dh, P, Lq]
                    torch.sum(samples.mul_(grad_out), 1, out=grad_weights[level])  # [B*M, P, Lq]
                    del samples
                if need_value or need_grid:
                    grad_samples = grad_out * weights[level, :, None]  # [B*M, Dh, P, Lq]
                    grad_value_l, grad_grid_l = torch.ops.aten.grid_sampler_2d_backward(
                        grad_samples, value_l, grid[level], 0, 0, False, [need_value, need_grid]
                    )  # [B*M, Dh, h, w], [B*M, P, Lq, 2]
                    if need_value:
                        grad_value_levels[level].copy_(grad_value_l)
                    if need_grid:
                        grad_grid[level] = grad_grid_l
                    del grad_samples, grad_value_l, grad_grid_l
        if grad_weights is not None:
            grad_weights = grad_weights.view(num_levels, batch, num_heads, num_points, num_queries).permute(1, 4, 2, 0, 3)
        return grad_value, grad_grid, grad_weights, None  # grad_weights [B, Lq, M, L, P] (a permuted view)


def _level_values(value_t: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """[B*M, Dh, S] -> one [B*M, Dh, h, w] view per level (no copy)."""
    bm, head_dim, _ = value_t.shape
    levels, start = [], 0
    for height, width in shapes:
        levels.append(value_t[:, :, start : start + height * width].view(bm, head_dim, height, width))
        start += height * width
    return levels


__all__ = ["ms_deform_attn", "TRAINING_KERNEL"]
