"""Multi-scale deformable attention core (Zhu et al. 2021, "Deformable DETR", eq. 3), in pure PyTorch.

Every query samples ``P`` points per head on each of ``L`` feature levels by bilinear interpolation and
returns, per head, the attention-weighted sum of the samples. This op dominates Deformable-DETR's encoder, so
it is written for speed:

* heads are folded into the batch, so one ``F.grid_sample`` call per level samples every image and head;
* the sampling grid is laid out level-major (``[L, B*M, P, Lq, 2]``), so each level's grid is one contiguous
  block (``grid_sample`` takes a much slower path on strided grids);
* the samples are never stacked or concatenated: each level's ``[B*M, Dh, P, Lq]`` samples are weighted and
  accumulated in place into one ``[B*M, Dh, Lq]`` buffer, which avoids the reference's stacked copy and its
  ``[B*M, Dh, Lq, L*P]`` product temporary.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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
        [B, Lq, M * Dh]: head ``m`` fills channels ``m*Dh:(m+1)*Dh``. The tensor is a transposed view of a
        [B, M * Dh, Lq] buffer (no copy is made); call ``.contiguous()`` before ``.view`` if you need one.

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


__all__ = ["ms_deform_attn"]
