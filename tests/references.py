"""Plain reference implementations shared by several test files (written for clarity, not speed)."""

from __future__ import annotations

import torch


def bilinear_reference(value, shapes, locations, weights):
    """Plain deformable attention: explicit 4-corner bilinear interpolation with gather, zero outside the map.

    value [B, S, M, Dh], shapes list of (h, w), locations [B, Q, M, L, P, 2] (x, y) in 0..1, weights [B, Q, M, L, P].
    A location u in 0..1 maps to pixel coordinate u * size - 0.5 (pixel centres at integers, align_corners=False).
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    start = 0
    for level, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w]  # [B, h*w, M, Dh]
        start += h * w
        x = locations[:, :, :, level, :, 0] * w - 0.5  # [B, Q, M, P]
        y = locations[:, :, :, level, :, 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                corner_weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())  # [B, Q, M, P]
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()  # [B, Q, M, P]
                for b in range(batch):
                    for m in range(heads):
                        rows = v[b, :, m][index[b, :, m].reshape(-1)].reshape(queries, points, head_dim)  # [Q, P, Dh]
                        scale = (corner_weight[b, :, m] * inside[b, :, m] * weights[b, :, m, level]).unsqueeze(-1)
                        out[b, :, m] += (rows * scale).sum(1)
    return out.reshape(batch, queries, heads * head_dim)
