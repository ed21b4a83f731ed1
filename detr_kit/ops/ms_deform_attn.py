"""Multi-scale deformable attention core (Zhu et al. 2021, "Deformable DETR", eq. 3), in pure PyTorch.

Every query samples ``P`` points per head on each of ``L`` feature levels by bilinear interpolation and
returns, per head, the attention-weighted sum of the samples. This op dominates Deformable-DETR's encoder, so
it is written for speed:

Two implementations share the semantics (bilinear, zero padding, ``align_corners=False``):

* **inference** (no input needs a gradient) on the CPU: one ``F.embedding_bag`` call for all levels, heads and
  points (other devices run the ``grid_sample`` forward described under training: its Python loop is per level,
  while the gather's chunk loop would launch many small GPU kernels). The
  value stays in its natural ``[B*S*M, Dh]`` row layout (no transpose); each query-head pair is one bag of
  ``4 * L * P`` rows (the four bilinear corners of every sample) whose weights are the bilinear weights times the
  attention weight, zeroed outside the map. Bags come out in ``[B, Lq, M]`` order, so the result is already
  ``[B, Lq, M*Dh]``. The bags are built and summed in cache-sized chunks (``_pair_bags``: float-only ops on
  axis-major planes, no boolean masks, no per-level Python work); the gather kernel's backward rebuilds them in
  the same chunks (``_pair_backward``).
* **training**: three kernels, chosen by the module-level switch ``TRAINING_KERNEL`` (``"auto"``, the default,
  picks ``"gather"`` on the CPU and ``"recompute"`` on other devices):

  - ``"gather"``: a ``torch.autograd.Function`` whose forward is the inference ``embedding_bag`` path and that saves
    only its inputs. Backward rebuilds the corner rows and weights, takes every corner's value-row . output-gradient
    dot product with one ``torch.sparse.sampled_addmm`` on the bags' pattern (location and attention gradients
    follow in closed form), and forms the value gradient as four CSR sparse-dense matmuls, one per corner, over
    the first pixels of the samples' pairs, sorted per (level, image, head) segment (``_scatter_to_value``). No
    ``[B*M, Dh, P, Lq]`` tensor and no global sort of all ``4 * N`` corner rows.
  - ``"recompute"``: heads folded into the batch, one ``F.grid_sample`` per level on a level-major contiguous
    grid, saving only its inputs and recomputing each level's samples in backward (one ``grid_sample`` for the
    attention weights' gradient and one ``grid_sampler_2d_backward``). ``grid_sample``'s backward is cheaper than
    ``embedding_bag``'s on the CPU (which sorts all indices), but scatters into the channels-first value with a
    per-sample loop; on CUDA it is the fast path.
  - ``"autograd"``: the grid_sample forward recorded by autograd, which keeps every level's samples for backward.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

TRAINING_KERNEL = "auto"
"""Kernel of the training path: ``"auto"`` (default: ``"gather"`` on CPU, ``"recompute"`` on other devices),
``"gather"``, ``"recompute"`` or ``"autograd"`` (see the module docstring)."""

_TRAINING_KERNELS = ("auto", "gather", "recompute", "autograd")

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
    exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if not exporting and torch.is_grad_enabled() and (
        value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    ):
        kernel = TRAINING_KERNEL
        if kernel == "auto":
            kernel = "gather" if value.device.type == "cpu" else "recompute"
        if kernel == "gather":
            if sampling_locations.shape[3] * sampling_locations.shape[4] == 0:
                raise ValueError("ms_deform_attn needs at least one level and one sampling point")
            return _GatherSampleAndSum.apply(value, sampling_locations, attention_weights, shapes)
        if kernel == "recompute":
            return _recompute_sample_and_sum(value, shapes, sampling_locations, attention_weights)
        if kernel == "autograd":
            return _grid_sample_and_sum(value, shapes, sampling_locations, attention_weights)
        raise ValueError(f"ms_deform_attn.TRAINING_KERNEL must be one of {_TRAINING_KERNELS}, got {TRAINING_KERNEL!r}")
    if value.device.type != "cpu" and not exporting:
        # On a GPU one grid_sample per level beats the chunked gather, whose Python loop launches many small
        # kernels (H100, Deformable-DETR at 800x1066: 0.10 s per image with the gather; docs/benchmarks.md).
        return _grid_sample_and_sum(value, shapes, sampling_locations, attention_weights)
    return _gather_and_sum(value, shapes, sampling_locations, attention_weights)


class _Bags(NamedTuple):
    """The four bilinear corners of every sample, bags of ``4 * K`` rows per query-head (``K = L * P`` samples).

    Corners are ordered (x low, y low), (x high, y low), (x low, y high), (x high, y high).
    """

    indices: Tensor  # [Nb, 4, K] rows of the [B*S*M, Dh] value table (clamped into the map)
    weights: Tensor  # [Nb, 4, K] bilinear weight times attention weight, 0 for corners outside the map


def _bilinear_bags(
    value_shape: torch.Size,
    shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    dtype: torch.dtype,
) -> _Bags:
    """Corner rows and weights of every sample, built with a handful of vectorised ops over ``[Nb, 2, K]``.

    Args:
        value_shape: (B, S, M, Dh) of the value.
        shapes: (h, w) per level.
        sampling_locations: [B, Lq, M, L, P, 2] (x, y) in 0..1.
        attention_weights: [B, Lq, M, L, P].
        dtype: floating dtype of the weights (the value's).

    Returns:
        The ``_Bags``.
    """
    batch, total, num_heads, _ = value_shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    num_samples = num_levels * num_points  # K samples per query and head
    bags = batch * num_queries * num_heads
    device = sampling_locations.device
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
    low_outside = (low < 0) | (low >= sizes)  # [Nb, 2, K]
    weight_low = (1 - frac).masked_fill_(low_outside, 0.0)  # [Nb, 2, K], 0 outside the map
    high_outside = (low < -1) | (low >= sizes - 1)  # [Nb, 2, K]
    weight_high = frac.masked_fill_(high_outside, 0.0)  # [Nb, 2, K]
    attention = attention_weights.to(dtype).reshape(bags, num_samples)  # [Nb, K]
    y_low = weight_low[:, 1] * attention  # [Nb, K]
    y_high = weight_high[:, 1] * attention  # [Nb, K]
    x_low, x_high = weight_low[:, 0], weight_high[:, 0]  # [Nb, K]
    weights = torch.stack([x_low * y_low, x_high * y_low, x_low * y_high, x_high * y_high], 1)  # [Nb, 4, K]

    last = sizes - 1
    index_low = torch.minimum(low.clamp(min=0), last).to(index_dtype).mul_(strides)  # [Nb, 2, K] row offsets
    low.add_(1).clamp_(min=0)  # [Nb, 2, K] lower corner + 1, at least 0
    index_high = torch.minimum(low, last).to(index_dtype).mul_(strides)  # [Nb, 2, K]
    row_low = (index_low[:, 1].view(batch, num_queries, num_heads, num_samples) + base).view(bags, num_samples)
    row_high = (index_high[:, 1].view(batch, num_queries, num_heads, num_samples) + base).view(bags, num_samples)
    col_low, col_high = index_low[:, 0], index_high[:, 0]  # [Nb, K]
    indices = torch.stack([row_low + col_low, row_low + col_high, row_high + col_low, row_high + col_high], 1)
    return _Bags(indices, weights)


class _PairLayout(NamedTuple):
    """Per-sample constants of the inference bags (``_pair_bags``), shared by every chunk; axis-major (x; y)."""

    sizes: Tensor  # [2, 1, K] (w; h) of each sample's level, in the value's dtype
    offsets: Tensor  # [2, 1, K] -0.5: pixel centres sit at integers + 0.5
    zeros: Tensor  # [2, 1, K] 0, the lower bound of the pair's first pixel
    last_first: Tensor  # [2, 1, K] max(size - 2, 0), the upper bound of the pair's first pixel
    second_cap: Tensor  # [2, 1, K] 1 where size > 1, else 0: the pair's second pixel exists
    strides: Tensor  # [2, 1, K] table rows per pixel along x (M) and y (w * M), index dtype
    steps: Tensor  # [2, K] rows from the pair's first to its second pixel (the stride, 0 where size == 1)
    level_rows: Tensor  # [K] first row of each sample's level (level start * M), index dtype
    bag_rows: Tensor  # [Nb] row of (image b, head m) of each bag: b * S * M + m, index dtype


def _pair_layout(
    value_shape: torch.Size, shapes: list[tuple[int, int]], num_queries: int, num_points: int, dtype: torch.dtype,
    device: torch.device,
) -> _PairLayout:
    """The constants ``_pair_bags`` needs for a value of ``value_shape`` and ``num_queries`` queries."""
    batch, total, num_heads, _ = value_shape
    index_dtype = torch.int32 if batch * total * num_heads < 2**31 else torch.int64
    sizes = torch.tensor([[w for _, w in shapes], [h for h, _ in shapes]], dtype=dtype, device=device)  # [2, L]
    sizes = sizes.repeat_interleave(num_points, 1)[:, None]  # [2, 1, K]
    strides = torch.tensor(
        [[num_heads for _ in shapes], [w * num_heads for _, w in shapes]], dtype=index_dtype, device=device
    ).repeat_interleave(num_points, 1)[:, None]  # [2, 1, K]
    starts, offset = [], 0
    for height, width in shapes:
        starts.append(offset * num_heads)
        offset += height * width
    level_rows = torch.tensor(starts, dtype=index_dtype, device=device).repeat_interleave(num_points)  # [K]
    bag = torch.arange(batch * num_queries * num_heads, dtype=index_dtype, device=device)  # [Nb], (b, q, m) order
    bag_rows = bag.div(num_queries * num_heads, rounding_mode="floor").mul_(total * num_heads).add_(bag % num_heads)
    has_second = sizes > 1  # [2, 1, K]
    return _PairLayout(
        sizes,
        torch.full_like(sizes, -0.5),
        torch.zeros_like(sizes),
        (sizes - 2).clamp_(min=0),
        has_second.to(dtype),
        strides,
        (strides * has_second)[:, 0],
        level_rows,
        bag_rows,
    )


def _pair_bags(layout: _PairLayout, locations: Tensor, attention: Tensor, bag_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Corner rows and weights of a run of bags for the inference path, without boolean masks.

    Per axis every sample reads a pair of adjacent pixels ``(first, first + 1)`` with ``first`` the lower
    corner clamped to ``0..size - 2``, weighted by the bilinear hat ``max(0, 1 - |pixel - corner|)``. Inside the
    map this is the usual bilinear pair; near or beyond a border the pair stays in the map and the hat gives
    the pixels outside the sample's reach weight 0, which is exactly zero padding (a level of size 1 has no
    second pixel: its weight is capped at 0 and its row is the first's). On the CPU, comparisons and masked
    writes (bool tensors) and strided inner loops are several times slower than contiguous float ops, so the
    (x, y) pairs are split into axis-major planes once, by one transposing copy.

    Args:
        layout: the constants from ``_pair_layout``.
        locations: [n, K, 2] (x, y) in 0..1 of each bag's samples, in the value's dtype.
        attention: [n, K] attention weight of each sample.
        bag_rows: [n] row of each bag's (image, head) in the value table (a slice of ``layout.bag_rows``).

    Returns:
        indices [n, 4, K] rows of the value table and weights [n, 4, K] (bilinear weight times attention weight),
        corners ordered (x first, y first), (x second, y first), (x first, y second), (x second, y second).
    """
    num_bags, num_samples, _ = locations.shape
    first, _, weight_first, weight_second = _pair_geometry(layout, locations)
    y_first = weight_first[1].mul_(attention)  # [n, K]
    y_second = weight_second[1].mul_(attention)  # [n, K]
    weights = attention.new_empty(num_bags, 4, num_samples)  # [n, 4, K]
    torch.mul(weight_first[0], y_first, out=weights[:, 0])
    torch.mul(weight_second[0], y_first, out=weights[:, 1])
    torch.mul(weight_first[0], y_second, out=weights[:, 2])
    torch.mul(weight_second[0], y_second, out=weights[:, 3])
    return _pair_rows(layout, first, bag_rows), weights


def _pair_geometry(layout: _PairLayout, locations: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pixel pairs of a run of bags' samples, per axis (axis-major planes; see ``_pair_bags``).

    Args:
        layout: the constants from ``_pair_layout``.
        locations: [n, K, 2] (x, y) in 0..1, in the value's dtype.

    Returns:
        ``(first, distance, weight_first, weight_second)``, each [2, n, K] (x; y): the pair's first pixel, the
        sample's pixel coordinate minus it, and the hat weights of the pair's first and second pixel.
    """
    num_bags, num_samples, _ = locations.shape
    pixels = locations.new_empty(2, num_bags, num_samples).copy_(locations.permute(2, 0, 1))  # [2, n, K] (x; y)
    torch.addcmul(layout.offsets, pixels, layout.sizes, out=pixels)  # [2, n, K] in pixels
    # NaN samples land on pixel -2, two pixels outside the map (weight 0); +-inf become finite, far outside.
    pixels.nan_to_num_(nan=-2.0)
    first = torch.clamp(pixels.floor(), layout.zeros, layout.last_first)  # [2, n, K] first pixel of the pair
    distance = pixels.sub_(first)  # [2, n, K] pixel - first, any sign
    weight_first = distance.abs().clamp_(max=1.0).neg_().add_(1.0)  # [2, n, K] max(0, 1 - |d|)
    weight_second = (distance - 1.0).abs_().clamp_(max=1.0).neg_().add_(1.0).mul_(layout.second_cap)  # [2, n, K]
    return first, distance, weight_first, weight_second


def _pair_rows(layout: _PairLayout, first: Tensor, bag_rows: Tensor) -> Tensor:
    """first [2, n, K] pair pixels, bag_rows [n] -> [n, 4, K] value-table rows of the four corners, ordered as
    ``_pair_bags``'s weights."""
    offsets = first.to(layout.strides.dtype).mul_(layout.strides)  # [2, n, K] row offsets along x and y
    row_first = offsets[1].add_(layout.level_rows).add_(bag_rows[:, None])  # [n, K]
    row_second = row_first + layout.steps[1]  # [n, K]
    indices = offsets.new_empty(first.shape[1], 4, first.shape[2])  # [n, 4, K]
    torch.add(row_first, offsets[0], out=indices[:, 0])
    torch.add(indices[:, 0], layout.steps[0], out=indices[:, 1])
    torch.add(row_second, offsets[0], out=indices[:, 2])
    torch.add(indices[:, 2], layout.steps[0], out=indices[:, 3])
    return indices


_CHUNK_SAMPLES = 65536
"""Samples per chunk of the inference path: the intermediates of a chunk stay in the CPU's cache."""


def _gather_and_sum(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The inference path: every sample's four bilinear corners as one weighted ``embedding_bag`` per query-head.

    The bags are built and summed in chunks of about ``_CHUNK_SAMPLES`` samples, so the corner rows and weights
    never exist for all bags at once (no large fresh tensors to page in, no passes over main memory).
    """
    batch, total, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    num_bags, num_samples = batch * num_queries * num_heads, num_levels * num_points
    table = value.reshape(batch * total * num_heads, head_dim)  # [B*S*M, Dh]
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        # A traced export: all bags at once with plain ops (no chunk loop whose count depends on the batch, no
        # out= writes, which have no ONNX form).
        bags = _bilinear_bags(value.shape, shapes, sampling_locations, attention_weights, value.dtype)
        out = F.embedding_bag(
            bags.indices.view(num_bags, -1), table, per_sample_weights=bags.weights.view(num_bags, -1), mode="sum"
        )  # [Nb, Dh]
        return out.view(batch, num_queries, num_heads * head_dim)
    layout = _pair_layout(value.shape, shapes, num_queries, num_points, value.dtype, value.device)
    locations = sampling_locations.to(value.dtype).reshape(num_bags, num_samples, 2)  # [Nb, K, 2] (x, y)
    attention = attention_weights.to(value.dtype).reshape(num_bags, num_samples)  # [Nb, K]
    out = value.new_empty(num_bags, head_dim)  # [Nb, Dh], bags in (b, q, m) order
    chunk = max(1, _CHUNK_SAMPLES // num_samples)
    for start in range(0, num_bags, chunk):
        stop = min(start + chunk, num_bags)
        indices, weights = _pair_bags(layout, locations[start:stop], attention[start:stop], layout.bag_rows[start:stop])
        out[start:stop] = F.embedding_bag(
            indices.view(stop - start, -1), table, per_sample_weights=weights.view(stop - start, -1), mode="sum"
        )  # [n, Dh]
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


class _GatherSampleAndSum(torch.autograd.Function):
    """The gather kernel: the inference ``embedding_bag`` forward with a backward in the value's row layout.

    Saves only its inputs and rebuilds the corner rows and weights in backward, chunk by chunk as the forward
    builds them (``_pair_backward``): the four corner dot products of every sample with its query-head's output
    gradient (``torch.sparse.sampled_addmm`` on the chunk's pattern), the location and attention gradients from
    them in closed form, and the value gradient as a sparse (CSR) matrix product over all chunks' corner weights
    (``_scatter_to_value``). Location gradients follow ``grid_sample``'s one-sided convention at integer pixel
    positions. Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx, value: Tensor, sampling_locations: Tensor, attention_weights: Tensor, shapes: list[tuple[int, int]]
    ) -> Tensor:
        """value [B, S, M, Dh], sampling_locations [B, Lq, M, L, P, 2], attention_weights [B, Lq, M, L, P] -> [B, Lq, M*Dh]."""
        ctx.shapes = shapes
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        return _gather_and_sum(value, shapes, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        """grad_out [B, Lq, M*Dh] -> gradients of the value, the sampling locations and the attention weights."""
        value, sampling_locations, attention_weights = ctx.saved_tensors
        need_value, need_locations, need_weights = ctx.needs_input_grad[:3]
        batch, total, num_heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        num_bags, num_samples = batch * num_queries * num_heads, num_levels * num_points
        dtype = value.dtype
        with torch.autocast(value.device.type, enabled=False):
            grad_bags = grad_out.to(dtype).reshape(num_bags, head_dim).contiguous()  # [Nb, Dh]
            table = value.reshape(batch * total * num_heads, head_dim)  # [B*S*M, Dh]
            layout = _pair_layout(value.shape, ctx.shapes, num_queries, num_points, dtype, value.device)
            locations = sampling_locations.to(dtype).reshape(num_bags, num_samples, 2)  # [Nb, K, 2] (x, y)
            attention = attention_weights.to(dtype).reshape(num_bags, num_samples)  # [Nb, K]
            keys = torch.empty(num_bags, num_samples, dtype=torch.int32, device=value.device) if need_value else None
            weights = value.new_empty(num_bags, 4, num_samples) if need_value else None
            grad_pixels = value.new_empty(num_bags, num_samples, 2) if need_locations else None  # [Nb, K, (x, y)]
            grad_attention = value.new_empty(num_bags, num_samples) if need_weights else None  # [Nb, K]
            chunk = max(1, _CHUNK_SAMPLES // num_samples)
            for start in range(0, num_bags, chunk):
                rows = slice(start, min(start + chunk, num_bags))
                _pair_backward(
                    layout, locations[rows], attention[rows], layout.bag_rows[rows], grad_bags[rows], table,
                    None if keys is None else keys[rows], None if weights is None else weights[rows],
                    None if grad_pixels is None else grad_pixels[rows],
                    None if grad_attention is None else grad_attention[rows],
                )
            grad_value = _scatter_to_value(grad_bags, keys, weights, value.shape, ctx.shapes, num_queries) if need_value else None
            grad_locations = grad_weights = None
            if need_locations:
                grad_locations = grad_pixels.view(sampling_locations.shape).to(sampling_locations.dtype)
            if need_weights:
                grad_weights = grad_attention.view(attention_weights.shape).to(attention_weights.dtype)
        return grad_value, grad_locations, grad_weights, None


def _axis_slopes(distance: Tensor, second_cap: Tensor) -> tuple[Tensor, Tensor]:
    """d(weight)/d(pixel) of a pair's two hat weights, with ``grid_sample``'s one-sided convention at integers.

    ``distance`` = pixel - first pixel of the pair. The first pixel's weight rises (+1) for distance in [-1, 0)
    and falls (-1) in [0, 1); the second's rises in [0, 1) and falls in [1, 2) (where the pair sits against the
    map's far border); both are 0 elsewhere (and the second's wherever the level has no second pixel).
    """
    steps = [(distance >= edge).to(distance.dtype) for edge in (-1.0, 0.0, 1.0, 2.0)]  # [2, n, K] each
    slope_first = steps[0].sub_(steps[1]).sub_(steps[1]).add_(steps[2])
    slope_second = steps[1].sub_(steps[2]).sub_(steps[2]).add_(steps[3]).mul_(second_cap)
    return slope_first, slope_second


def _pair_backward(
    layout: _PairLayout,
    locations: Tensor,
    attention: Tensor,
    bag_rows: Tensor,
    grad_bags: Tensor,
    table: Tensor,
    keys: Tensor | None,
    weights: Tensor | None,
    grad_pixels: Tensor | None,
    grad_attention: Tensor | None,
) -> None:
    """One chunk of the gather kernel's backward, in the inference bags' pair form (``_pair_bags``).

    Writes, for the chunk's ``n`` bags: ``keys`` [n, K] (the pair's first pixel, ``y * w + x`` within its level)
    and ``weights`` [n, 4, K] (corner weights times attention) for the value gradient, ``grad_pixels`` [n, K, 2]
    (d loss / d location, x and y) and ``grad_attention`` [n, K]. Corner dot products come from one
    ``torch.sparse.sampled_addmm`` over the chunk's bags; everything else is elementwise over ``[2, n, K]``.
    """
    num_bags = locations.shape[0]
    first, distance, weight_first, weight_second = _pair_geometry(layout, locations)  # [2, n, K] each
    bilinear = torch.stack(
        [weight_first[0] * weight_first[1], weight_second[0] * weight_first[1],
         weight_first[0] * weight_second[1], weight_second[0] * weight_second[1]], 1
    )  # [n, 4, K] corners (x first, y first), (x second, y first), (x first, y second), (x second, y second)
    corner_weights = bilinear * attention[:, None]  # [n, 4, K]
    if weights is not None:
        weights.copy_(corner_weights)
        keys.copy_(first[1].mul(layout.sizes[0]).add_(first[0]))  # [n, K] exact small integers
    if grad_pixels is None and grad_attention is None:
        return
    indices = _pair_rows(layout, first, bag_rows)  # [n, 4, K]
    dots = _corner_dots(grad_bags, table, indices.view(num_bags, -1)).view(indices.shape)  # [n, 4, K]
    if grad_attention is not None:
        torch.sum(dots * bilinear, 1, out=grad_attention)  # [n, K]
    if grad_pixels is not None:
        slope_first, slope_second = _axis_slopes(distance, layout.second_cap)  # [2, n, K] each
        # Gradient of the loss w.r.t. each axis' (first, second) weight, the other axis' weights folded in.
        x_first = dots[:, 0] * weight_first[1] + dots[:, 2] * weight_second[1]  # [n, K]
        x_second = dots[:, 1] * weight_first[1] + dots[:, 3] * weight_second[1]
        y_first = dots[:, 0] * weight_first[0] + dots[:, 1] * weight_second[0]
        y_second = dots[:, 2] * weight_first[0] + dots[:, 3] * weight_second[0]
        grad = torch.stack(
            [x_first * slope_first[0] + x_second * slope_second[0], y_first * slope_first[1] + y_second * slope_second[1]],
            2,
        )  # [n, K, 2] d loss / d pixel
        sizes = layout.sizes[:, 0].t()  # [K, 2] (w, h): d pixel / d location
        torch.mul(grad.mul_(attention[:, :, None]), sizes, out=grad_pixels)


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
        weights: [Nb, 4, K] corner weights times attention, corners as ``_pair_bags`` orders them.
        value_shape: (B, S, M, Dh).
        shapes: (h, w) per level.
        num_queries: Lq.

    Returns:
        [B, S, M, Dh] gradient of the value.
    """
    batch, total, num_heads, head_dim = value_shape
    num_bags = grad_bags.shape[0]
    num_levels = len(shapes)
    num_samples = weights.shape[-1]
    num_points = num_samples // num_levels
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
    corner_weights = weights.view(batch, num_queries, num_heads, 4, num_levels, num_points)
    corner_weights = corner_weights.permute(3, 4, 0, 2, 1, 5).reshape(4, num_levels * batch * num_heads, -1)
    corner_weights = corner_weights.gather(2, order.expand(4, -1, -1)).view(4, -1)  # [4, N] sorted
    # Bag of each sorted sample: bag (b, q, m) = (b * Lq + q) * M + m, with q = order // P.
    segment_bag = (segment // num_heads) * (num_queries * num_heads) + segment % num_heads  # [B*M]
    columns = order.div_(num_points, rounding_mode="floor").to(index_dtype).mul_(num_heads)  # [LBM, Lq*P] q * M
    columns = columns.view(num_levels, batch * num_heads, -1).add_(segment_bag[:, None]).view(-1)  # [N]
    del order, keys
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        corners = [
            torch.sparse_csr_tensor(crow, columns, corner_weights[c], size=(num_keys, num_bags), check_invariants=False)
            @ grad_bags
            for c in range(4)
        ]  # 4 x [num_keys, Dh]: (x first, y first), (x second, y first), (x first, y second), (x second, y second)
    grad_value = grad_bags.new_empty(value_shape)  # [B, S, M, Dh]
    start = 0
    for level, (height, width) in enumerate(shapes):
        grad_level = grad_value[:, start : start + height * width].view(batch, height, width, num_heads, head_dim)
        start += height * width
        maps = [
            corner[level_start[level] : level_start[level] + batch * num_heads * areas[level]]
            .view(batch, num_heads, height, width, head_dim)
            .permute(0, 2, 3, 1, 4)
            for corner in corners
        ]  # 4 x [B, h, w, M, Dh] indexed by the pair's first pixel
        # Pixel (x, y) is corner (dx, dy) of the pairs whose first pixel is (x - dx, y - dy).
        grad_level.copy_(maps[0])
        grad_level[:, :, 1:].add_(maps[1][:, :, :-1])
        grad_level[:, 1:].add_(maps[2][:, :-1])
        grad_level[:, 1:, 1:].add_(maps[3][:, :-1, :-1])
    return grad_value


def _level_values(value_t: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """[B*M, Dh, S] -> one [B*M, Dh, h, w] view per level (no copy)."""
    bm, head_dim, _ = value_t.shape
    levels, start = [], 0
    for height, width in shapes:
        levels.append(value_t[:, :, start : start + height * width].view(bm, head_dim, height, width))
        start += height * width
    return levels


__all__ = ["ms_deform_attn", "TRAINING_KERNEL"]
