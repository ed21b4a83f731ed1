"""The CPU gather kernel: every sample's four bilinear corners gathered as value rows by ``F.embedding_bag``.

Forward: the value stays in its natural ``[B*S*M, Dh]`` row layout (no transpose); each query-head pair is one
bag of ``4 * K`` rows (``K = L * P`` samples, four corners each) whose per-row weights are the bilinear weights
times the attention weight (``geometry.py``'s pair form: zero padding without masks). Bags come out in
``[B, Lq, M]`` order, so the result is already ``[B, Lq, M*Dh]``. The bags are built and summed in cache-sized
chunks (``CHUNK_SAMPLES``), so the corner rows and weights never exist for all bags at once. On the CPU this
beats ``grid_sample``, which reads channel-first maps (each channel of each corner in another cache line).

Backward (``_GatherSampleAndSum``) saves only the inputs and rebuilds the corners chunk by chunk: every corner's
value-row . output-gradient dot product with one ``torch.sparse.sampled_addmm`` on the bags' pattern (location
and attention gradients follow in closed form), and the value gradient as four CSR sparse-dense matmuls, one per
corner, over the pairs' first pixels sorted per (level, image, head) segment (``_scatter_to_value``). No
``[B*M, Dh, P, Lq]`` tensor and no global sort of all ``4 * N`` corner rows.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from detr_kit.ops.deform_attn.geometry import (
    CORNERS,
    AxisConstants,
    axis_constants,
    corner_products,
    pair_geometry,
    pixel_gradient,
)
from detr_kit.ops.autocast import float32_region

CHUNK_SAMPLES = 65536
"""Samples per chunk: the intermediates of a chunk stay in the CPU's cache."""


def gather_sample_and_sum(
    value: Tensor,
    shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    chunk_samples: int = CHUNK_SAMPLES,
) -> Tensor:
    """Deformable attention by the gather kernel (differentiable once in every input).

    Args:
        value: [B, S, M, Dh].
        shapes: (h, w) per level, L of them.
        sampling_locations: [B, Lq, M, L, P, 2] (x, y) in 0..1, in the value's dtype.
        attention_weights: [B, Lq, M, L, P], in the value's dtype.
        chunk_samples: samples per chunk of bags (at least one bag per chunk).

    Returns:
        [B, Lq, M * Dh].
    """
    return _GatherSampleAndSum.apply(value, sampling_locations, attention_weights, list(shapes), chunk_samples)


class _TableLayout(NamedTuple):
    """Where the corners of the pair form sit in the ``[B*S*M, Dh]`` value table; index dtype."""

    strides: Tensor  # [2, 1, K] table rows per pixel along x (M) and y (w * M)
    steps: Tensor  # [2, K] rows from the pair's first to its second pixel (the stride, 0 where size == 1)
    level_rows: Tensor  # [K] first row of each sample's level (level start * M)
    bag_rows: Tensor  # [Nb] row of (image b, head m) of each bag in (b, q, m) order: b * S * M + m


def _table_layout(
    value_shape: torch.Size, shapes: Sequence[tuple[int, int]], num_queries: int, axes: AxisConstants
) -> _TableLayout:
    """The ``_TableLayout`` of a value of ``value_shape`` for ``num_queries`` queries."""
    batch, total, num_heads, _ = value_shape
    num_points = axes.sizes.shape[-1] // len(shapes)
    device = axes.sizes.device
    index_dtype = torch.int32 if batch * total * num_heads < 2**31 else torch.int64
    strides = torch.tensor(
        [[num_heads for _ in shapes], [w * num_heads for _, w in shapes]], dtype=index_dtype, device=device
    ).repeat_interleave(num_points, 1)[:, None]  # [2, 1, K]
    starts, offset = [], 0
    for height, width in shapes:
        starts.append(offset * num_heads)
        offset += height * width
    level_rows = torch.tensor(starts, dtype=index_dtype, device=device).repeat_interleave(num_points)  # [K]
    bag = torch.arange(batch * num_queries * num_heads, dtype=index_dtype, device=device)  # [Nb]
    bag_rows = bag.div(num_queries * num_heads, rounding_mode="floor").mul_(total * num_heads).add_(bag % num_heads)
    steps = (strides * axes.second_cap.to(index_dtype))[:, 0]  # [2, K]
    return _TableLayout(strides, steps, level_rows, bag_rows)


def _corner_rows(table: _TableLayout, first: Tensor, bag_rows: Tensor) -> Tensor:
    """first [2, n, K] pair pixels, bag_rows [n] -> [n, 4, K] value-table rows of the corners, as ``CORNERS``."""
    offsets = first.to(table.strides.dtype).mul_(table.strides)  # [2, n, K] row offsets along x and y
    row_first = offsets[1].add_(table.level_rows).add_(bag_rows[:, None])  # [n, K] rows of the pair's first y
    pair_rows = (row_first, row_first + table.steps[1])  # (first, second) y, each [n, K]
    indices = offsets.new_empty(first.shape[1], len(CORNERS), first.shape[2])  # [n, 4, K]
    for dy in (0, 1):
        x_first = indices[:, CORNERS.index((0, dy))]  # [n, K]
        torch.add(pair_rows[dy], offsets[0], out=x_first)
        torch.add(x_first, table.steps[0], out=indices[:, CORNERS.index((1, dy))])
    return indices


def _gather_forward(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor,
    chunk_samples: int,
) -> Tensor:
    """[B, S, M, Dh], L shapes, [B, Lq, M, L, P, 2], [B, Lq, M, L, P] -> [B, Lq, M*Dh], chunk by chunk."""
    batch, total, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    num_bags, num_samples = batch * num_queries * num_heads, num_levels * num_points
    table = value.reshape(batch * total * num_heads, head_dim)  # [B*S*M, Dh]
    axes = axis_constants(shapes, num_points, value.dtype, value.device)
    layout = _table_layout(value.shape, shapes, num_queries, axes)
    locations = sampling_locations.reshape(num_bags, num_samples, 2)  # [Nb, K, 2] (x, y)
    attention = attention_weights.reshape(num_bags, num_samples)  # [Nb, K]
    out = value.new_empty(num_bags, head_dim)  # [Nb, Dh], bags in (b, q, m) order
    chunk = max(1, chunk_samples // num_samples)
    for start in range(0, num_bags, chunk):
        rows = slice(start, min(start + chunk, num_bags))
        geometry = pair_geometry(axes, locations[rows])  # [2, n, K] each
        weights = corner_products(
            (geometry.weight_first[0], geometry.weight_second[0]),
            (geometry.weight_first[1].mul_(attention[rows]), geometry.weight_second[1].mul_(attention[rows])),
        )  # [n, 4, K] bilinear weight times attention weight
        indices = _corner_rows(layout, geometry.first, layout.bag_rows[rows])  # [n, 4, K]
        out[rows] = F.embedding_bag(
            indices.flatten(1), table, per_sample_weights=weights.flatten(1), mode="sum"
        )  # [n, Dh]
    return out.view(batch, num_queries, num_heads * head_dim)  # [B, Lq, M*Dh]


class _GatherSampleAndSum(torch.autograd.Function):
    """The gather kernel's forward, with a backward that rebuilds the corners chunk by chunk.

    Location gradients follow ``grid_sample``'s one-sided convention at integer pixel positions
    (``geometry.axis_slopes``). Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx, value: Tensor, sampling_locations: Tensor, attention_weights: Tensor, shapes: list[tuple[int, int]],
        chunk_samples: int,
    ) -> Tensor:
        """value [B, S, M, Dh], locations [B, Lq, M, L, P, 2], attention weights [B, Lq, M, L, P] -> [B, Lq, M*Dh]."""
        ctx.shapes, ctx.chunk_samples = shapes, chunk_samples
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        return _gather_forward(value, shapes, sampling_locations, attention_weights, chunk_samples)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        """grad_out [B, Lq, M*Dh] -> gradients of the value, the sampling locations and the attention weights."""
        value, sampling_locations, attention_weights = ctx.saved_tensors
        need_value, need_locations, need_weights = ctx.needs_input_grad[:3]
        batch, total, num_heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        num_bags, num_samples = batch * num_queries * num_heads, num_levels * num_points
        with float32_region(value.device.type):
            grad_bags = grad_out.to(value.dtype).reshape(num_bags, head_dim).contiguous()  # [Nb, Dh]
            table = value.reshape(batch * total * num_heads, head_dim)  # [B*S*M, Dh]
            axes = axis_constants(ctx.shapes, num_points, value.dtype, value.device)
            layout = _table_layout(value.shape, ctx.shapes, num_queries, axes)
            locations = sampling_locations.reshape(num_bags, num_samples, 2)  # [Nb, K, 2] (x, y)
            attention = attention_weights.reshape(num_bags, num_samples)  # [Nb, K]
            grads = _ChunkGradients(
                value.new_empty(num_bags, num_samples, dtype=torch.int32) if need_value else None,
                value.new_empty(num_bags, len(CORNERS), num_samples) if need_value else None,
                value.new_empty(num_bags, num_samples, 2) if need_locations else None,
                value.new_empty(num_bags, num_samples) if need_weights else None,
            )
            chunk = max(1, ctx.chunk_samples // num_samples)
            for start in range(0, num_bags, chunk):
                rows = slice(start, min(start + chunk, num_bags))
                _chunk_backward(
                    axes, layout, locations[rows], attention[rows], layout.bag_rows[rows], grad_bags[rows], table,
                    grads.rows(rows),
                )
            grad_value = grad_locations = grad_weights = None
            if need_value:
                grad_value = _scatter_to_value(
                    grad_bags, grads.keys, grads.weights, value.shape, ctx.shapes, num_queries
                )  # [B, S, M, Dh]
            if need_locations:
                grad_locations = grads.pixels.view(sampling_locations.shape)  # [B, Lq, M, L, P, 2]
            if need_weights:
                grad_weights = grads.attention.view(attention_weights.shape)  # [B, Lq, M, L, P]
        return grad_value, grad_locations, grad_weights, None, None


class _ChunkGradients(NamedTuple):
    """What the backward's chunks write, for all bags (None where not needed)."""

    keys: Tensor | None  # [Nb, K] int32 first pixel ``y * w + x`` of each sample's pair within its level
    weights: Tensor | None  # [Nb, 4, K] corner weights times attention, for the value gradient
    pixels: Tensor | None  # [Nb, K, 2] d loss / d location (x, y)
    attention: Tensor | None  # [Nb, K] d loss / d attention weight

    def rows(self, rows: slice) -> _ChunkGradients:
        """The views of a run of bags."""
        return _ChunkGradients(*(None if tensor is None else tensor[rows] for tensor in self))


def _chunk_backward(
    axes: AxisConstants,
    layout: _TableLayout,
    locations: Tensor,
    attention: Tensor,
    bag_rows: Tensor,
    grad_bags: Tensor,
    table: Tensor,
    out: _ChunkGradients,
) -> None:
    """One chunk of the backward: writes ``out`` for ``n`` bags.

    Args:
        axes, layout: the constants of the pair form and of the value table.
        locations: [n, K, 2] (x, y) in 0..1.
        attention: [n, K] attention weights.
        bag_rows: [n] (image, head) row of each bag in the table.
        grad_bags: [n, Dh] output gradient of each bag.
        table: [B*S*M, Dh] the value rows.
        out: the chunk's views of the gradient buffers.
    """
    num_bags = locations.shape[0]
    geometry = pair_geometry(axes, locations)  # [2, n, K] each
    bilinear = corner_products(
        (geometry.weight_first[0], geometry.weight_second[0]), (geometry.weight_first[1], geometry.weight_second[1])
    )  # [n, 4, K]
    if out.weights is not None:
        torch.mul(bilinear, attention[:, None], out=out.weights)  # [n, 4, K]
        out.keys.copy_(geometry.first[1].mul(axes.sizes[0]).add_(geometry.first[0]))  # [n, K] exact small integers
    if out.pixels is None and out.attention is None:
        return
    indices = _corner_rows(layout, geometry.first, bag_rows)  # [n, 4, K]
    dots = _corner_dots(grad_bags, table, indices.view(num_bags, -1)).view(indices.shape)  # [n, 4, K]
    if out.attention is not None:
        torch.sum(dots * bilinear, 1, out=out.attention)  # [n, K]
    if out.pixels is not None:
        grad = pixel_gradient(dots, geometry, axes.second_cap)  # [n, K, 2] d loss / d pixel, per unit attention
        torch.mul(grad.mul_(attention[:, :, None]), axes.sizes[:, 0].t(), out=out.pixels)  # d pixel / d location


def _corner_dots(grad_bags: Tensor, table: Tensor, indices: Tensor) -> Tensor:
    """Dot product of every corner's value row with its bag's output gradient.

    Args:
        grad_bags: [Nb, Dh] output gradient per bag.
        table: [R, Dh] value rows.
        indices: [Nb, 4*K] rows of ``table`` in each bag (int32 or int64).

    Returns:
        [Nb, 4*K] dot products.
    """
    num_bags, bag_size = indices.shape
    if bag_size <= table.shape[0]:
        # A sampled dense-dense product on the bags' sparsity pattern (about 3x faster than embedding_bag's
        # per-sample-weight backward). The CPU kernel rejects patterns with more entries per row than columns.
        row_start = torch.arange(0, num_bags * bag_size + 1, bag_size, dtype=indices.dtype, device=indices.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                row_start,
                indices.reshape(-1),
                grad_bags.new_zeros(indices.numel()),
                size=(num_bags, table.shape[0]),
                check_invariants=False,
            )
            return torch.sparse.sampled_addmm(pattern, grad_bags, table.t(), beta=0.0).values().view(num_bags, bag_size)
    bag = torch.arange(num_bags, dtype=indices.dtype, device=indices.device)  # [Nb]
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_bags, table, indices.reshape(-1), bag * bag_size, bag.repeat_interleave(bag_size), 0, -1
    ).view(num_bags, bag_size)  # mode 0 = "sum", no padding index


def _scatter_to_value(
    grad_bags: Tensor, keys: Tensor, weights: Tensor, value_shape: torch.Size, shapes: list[tuple[int, int]],
    num_queries: int,
) -> Tensor:
    """Value gradient: every corner's weight times its bag's gradient, summed per value row, without sorting 4 * N.

    The four corners of a sample share the pair's first pixel, so per level the gradient is four shifted copies of
    ``T_c = A_c^T @ grad_bags``, where ``A_c`` [first-pixel keys, Nb] holds corner ``c``'s weights and all four
    share one sparsity pattern. Keys index a level's h x w map, per (level, image, head) segment. Sorting each
    segment's ``Lq * P`` keys (a batched sort of short rows, cache resident) gives ``A^T`` in CSR form directly;
    its four products are sparse-dense matmuls.

    Args:
        grad_bags: [Nb, Dh] gradient of each query-head's output, bags in (b, q, m) order.
        keys: [Nb, K] int32 first pixel ``y * w + x`` of each sample's pair within its level.
        weights: [Nb, 4, K] corner weights times attention, corners as ``CORNERS``.
        value_shape: (B, S, M, Dh).
        shapes: (h, w) per level.
        num_queries: Lq.

    Returns:
        [B, S, M, Dh] gradient of the value.
    """
    batch, _, num_heads, _ = value_shape
    num_bags = grad_bags.shape[0]
    num_levels = len(shapes)
    num_points = weights.shape[-1] // num_levels
    device = grad_bags.device
    areas = [h * w for h, w in shapes]  # first-pixel keys per level map
    num_keys = batch * num_heads * sum(areas)
    index_dtype = torch.int32 if max(num_keys, weights.numel(), num_bags) < 2**31 else torch.int64
    # Segments (level, image, head), each of Lq * P samples.
    keys = keys.view(batch, num_queries, num_heads, num_levels, num_points).permute(3, 0, 2, 1, 4)
    keys, order = keys.reshape(num_levels * batch * num_heads, num_queries * num_points).sort(1)  # [LBM, Lq*P]
    level_start = [0]
    for area in areas[:-1]:
        level_start.append(level_start[-1] + batch * num_heads * area)
    segment = torch.arange(batch * num_heads, dtype=index_dtype, device=device)  # [B*M] (b, m)
    segment_start = (
        torch.tensor(level_start, dtype=index_dtype, device=device)[:, None]
        + segment * torch.tensor(areas, dtype=index_dtype, device=device)[:, None]
    )  # [L, B*M] first key of each segment
    keys = keys.to(index_dtype).view(num_levels, batch * num_heads, -1).add_(segment_start[:, :, None]).view(-1)
    crow = torch.zeros(num_keys + 1, dtype=index_dtype, device=device)
    torch.cumsum(torch.bincount(keys, minlength=num_keys), 0, out=crow[1:])  # [num_keys + 1]
    # Corner weights in segment order: [Nb, 4, K] -> [4, L, B, M, Lq, P], gathered along each segment.
    corner_weights = weights.view(batch, num_queries, num_heads, len(CORNERS), num_levels, num_points)
    corner_weights = corner_weights.permute(3, 4, 0, 2, 1, 5).reshape(len(CORNERS), num_levels * batch * num_heads, -1)
    corner_weights = corner_weights.gather(2, order.expand(len(CORNERS), -1, -1)).view(len(CORNERS), -1)  # [4, N]
    # Bag of each sorted sample: bag (b, q, m) = (b * Lq + q) * M + m, with q = order // P.
    segment_bag = (segment // num_heads) * (num_queries * num_heads) + segment % num_heads  # [B*M]
    columns = order.div_(num_points, rounding_mode="floor").to(index_dtype).mul_(num_heads)  # [LBM, Lq*P] q * M
    columns = columns.view(num_levels, batch * num_heads, -1).add_(segment_bag[:, None]).view(-1)  # [N]
    del order, keys
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        per_corner = [
            torch.sparse_csr_tensor(crow, columns, corner_weights[c], size=(num_keys, num_bags), check_invariants=False)
            @ grad_bags
            for c in range(len(CORNERS))
        ]  # 4 x [num_keys, Dh], indexed by the pair's first pixel
    return _add_shifted_corners(per_corner, level_start, value_shape, shapes)


def _add_shifted_corners(
    per_corner: list[Tensor], level_start: list[int], value_shape: torch.Size, shapes: list[tuple[int, int]]
) -> Tensor:
    """Value gradient from the per-corner products, each indexed by the pair's first pixel.

    Args:
        per_corner: 4 x [sum over levels of B*M*h*w, Dh], corners as ``CORNERS``, keys ordered (level, b, m, y, x).
        level_start: first key of each level.
        value_shape: (B, S, M, Dh).
        shapes: (h, w) per level.

    Returns:
        [B, S, M, Dh].
    """
    batch, _, num_heads, head_dim = value_shape
    grad_value = per_corner[0].new_empty(value_shape)  # [B, S, M, Dh]
    start = 0
    for level, (height, width) in enumerate(shapes):
        grad_level = grad_value[:, start : start + height * width].view(batch, height, width, num_heads, head_dim)
        start += height * width
        maps = [
            corner[level_start[level] : level_start[level] + batch * num_heads * height * width]
            .view(batch, num_heads, height, width, head_dim)
            .permute(0, 2, 3, 1, 4)
            for corner in per_corner
        ]  # 4 x [B, h, w, M, Dh]
        # Pixel (x, y) is corner (dx, dy) of the pairs whose first pixel is (x - dx, y - dy).
        grad_level.copy_(maps[CORNERS.index((0, 0))])
        for corner, (dx, dy) in enumerate(CORNERS):
            if (dx, dy) != (0, 0):
                grad_level[:, dy:, dx:].add_(maps[corner][:, : height - dy, : width - dx])
    return grad_value
