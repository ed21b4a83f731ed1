"""Multi-scale deformable attention as the paper defines it (Zhu et al. 2021, "Deformable DETR", eq. 3).

Every query samples ``P`` points per head on each of ``L`` feature levels by bilinear interpolation and returns,
per head, the attention-weighted sum of the ``L * P`` samples. This is the plain ``grid_sample`` formulation of
the paper's reference code: the op's definition, its path while tracing, exporting or compiling, and the oracle
the faster kernels (``gather.py``, ``recompute.py``) are tested against. Sampling is bilinear with zeros outside
each map and ``align_corners=False``: a location ``u`` in 0..1 on an axis of ``size`` pixels is the pixel
coordinate ``u * size - 0.5`` (pixel centres at integers).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor, shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Sample every level at the given locations and sum the samples with the attention weights.

    Args:
        value: [B, S, M, Dh] values of all levels, each flattened row-major, concatenated (S = sum of h * w).
        shapes: (h, w) per level, L of them.
        sampling_locations: [B, Lq, M, L, P, 2] (x, y) normalised to each level's map, 0..1 inside it.
        attention_weights: [B, Lq, M, L, P].

    Returns:
        [B, Lq, M * Dh]: head ``m`` fills channels ``m*Dh:(m+1)*Dh``.
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_levels = value.split([height * width for height, width in shapes], dim=1)  # L x [B, h*w, M, Dh]
    grids = 2 * sampling_locations - 1  # [B, Lq, M, L, P, 2] in grid_sample's -1..1
    samples = []
    for level, (height, width) in enumerate(shapes):
        value_l = value_levels[level].flatten(2).transpose(1, 2)  # [B, M*Dh, h*w]
        value_l = value_l.reshape(batch * num_heads, head_dim, height, width)  # [B*M, Dh, h, w]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*M, Lq, P, 2]
        samples.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [B*M, Dh, Lq, P]
    samples = torch.stack(samples, dim=-2).flatten(-2)  # [B*M, Dh, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    out = (samples * weights).sum(-1)  # [B*M, Dh, Lq]
    return out.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()  # [B, Lq, M*Dh]
