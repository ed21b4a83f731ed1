"""Resizing a ViT's learned position table to another patch grid, under each library's convention.

The three conventions all resize bicubically and differ in the details, which change every resized entry:

- ``detr_kit``: ``align_corners=False``, no antialias. DeiT's and ViTDet's fine-tuning code; detr_kit's default.
- ``timm``: ``align_corners=False``, ``antialias=True``. timm 1.0's ``resample_abs_pos_embed`` (its default), used
  when timm loads a checkpoint (``checkpoint_filter_fn``) and at run time with ``dynamic_img_size``.
- ``torchvision``: ``align_corners=True``, no antialias. torchvision 0.29's
  ``vision_transformer.interpolate_embeddings``, used when it loads weights for another image size.

``antialias=True`` is not only a low-pass filter for shrinking: PyTorch then uses PIL's cubic (Keys' a = -0.5,
taps outside the grid dropped and the rest renormalised) instead of a = -0.75 with clamped taps, so it differs
when enlarging too. ``resize_position_grid`` is ``F.interpolate`` with the flags above (fixed sizes).
``position_embedding_per_image`` computes the same resize for every image of a batch at once, each to its own
valid patch grid, as two separable resampling matrices built from tensors: no host sync, one graph for every
batch (``F.interpolate`` needs Python sizes). The backbone uses it for every input. (It is also right where
PyTorch 2.14's antialiased bicubic is not: for an output one column wide, ``F.interpolate`` returns the first
source row everywhere.)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

PositionInterpolation = Literal["detr_kit", "timm", "torchvision"]
INTERPOLATION_FLAGS: dict[str, dict[str, bool]] = {
    "detr_kit": {"align_corners": False, "antialias": False},
    "timm": {"align_corners": False, "antialias": True},
    "torchvision": {"align_corners": True, "antialias": False},
}


def _check(interpolation: str) -> None:
    if interpolation not in INTERPOLATION_FLAGS:
        raise ValueError(f"unknown position interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATION_FLAGS)}")


def resize_position_grid(grid: Tensor, size: tuple[int, int], interpolation: PositionInterpolation) -> Tensor:
    """Resize a [1, C, h, w] position grid to ``size`` with ``F.interpolate`` under a named convention.

    Args:
        grid: [1, C, h, w].
        size: (h', w').
        interpolation: "detr_kit", "timm" or "torchvision" (see the module docstring).

    Returns:
        [1, C, h', w'], computed in float32 at least (float64 stays float64), in ``grid``'s dtype.
    """
    _check(interpolation)
    work = grid.to(torch.promote_types(grid.dtype, torch.float32))  # no bicubic in half precision
    return F.interpolate(work, size=tuple(size), mode="bicubic", **INTERPOLATION_FLAGS[interpolation]).to(grid.dtype)


def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel with parameter ``a`` (support 2)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = a * (((x - 5) * x + 8) * x - 4)  # 1 < |x| < 2
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resampling_matrix(
    src_size: int, dst_sizes: Tensor, out_size: int, interpolation: PositionInterpolation, dtype: torch.dtype
) -> Tensor:
    """The 1-D bicubic resize from ``src_size`` to each of ``dst_sizes`` samples as a matrix, as PyTorch computes it.

    Row i of image b holds the weights of the ``src_size`` source samples for output sample i of a resize to
    ``dst_sizes[b]``; rows ``i >= dst_sizes[b]`` are zero. Without antialiasing, output i reads source position
    ``(i + 0.5) * src / dst - 0.5`` (``i * (src - 1) / (dst - 1)`` with aligned corners) through Keys' kernel
    (a = -0.75) with taps clamped to the border; with antialiasing (``timm``), PIL's kernel (a = -0.5) is
    stretched by ``max(src / dst, 1)`` around ``(i + 0.5) * src / dst`` and renormalised over the taps inside.

    Args:
        src_size: G, samples of the source axis.
        dst_sizes: [B] int, the wanted size per image (0 gives an all-zero matrix).
        out_size: n >= max(dst_sizes), rows of the result.
        interpolation: the convention.
        dtype: a floating dtype to compute in.

    Returns:
        [B, n, G].
    """
    _check(interpolation)
    device = dst_sizes.device
    dst = dst_sizes.to(dtype).clamp(min=1)[:, None]  # [B, 1]
    out = torch.arange(out_size, dtype=dtype, device=device)[None]  # [1, n]
    src = torch.arange(src_size, dtype=dtype, device=device)  # [G]
    if INTERPOLATION_FLAGS[interpolation]["antialias"]:
        scale = src_size / dst  # [B, 1]
        stretch = scale.clamp(min=1)
        center = scale * (out + 0.5)  # [B, n]
        weights = _cubic((src + 0.5 - center[..., None]) / stretch[..., None], a=-0.5)  # [B, n, G]
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)  # rows past the grid: 0
    else:
        if INTERPOLATION_FLAGS[interpolation]["align_corners"]:
            position = out * torch.where(dst > 1, (src_size - 1) / (dst - 1).clamp(min=1), torch.zeros_like(dst))
        else:
            position = (out + 0.5) * (src_size / dst) - 0.5  # [B, n]
        base = position.floor()
        frac = position - base
        weights = torch.zeros(dst.shape[0], out_size, src_size, dtype=dtype, device=device)  # [B, n, G]
        for tap in range(-1, 3):
            index = (base + tap).clamp(0, src_size - 1).long()  # [B, n]; border taps clamped
            weights = weights.scatter_add(2, index[..., None], _cubic(frac - tap, a=-0.75)[..., None])
    inside = out < dst_sizes.to(dtype)[:, None]  # [B, n]
    return weights * inside[..., None].to(dtype)


def position_embedding_per_image(
    table: Tensor,
    src_grid: tuple[int, int],
    valid_grid: Tensor,
    size: tuple[int, int],
    interpolation: PositionInterpolation = "detr_kit",
) -> Tensor:
    """The position table resized to each image's own patch grid, zero beyond it: no image depends on its batch.

    Equal to ``resize_position_grid`` of the table to each image's valid grid, then zero-padded to ``size``.

    Args:
        table: [G_h * G_w, C] row-major over ``src_grid``.
        src_grid: (G_h, G_w), the grid the table was learned at.
        valid_grid: [B, 2] int, (rows, columns) of each image's valid patch grid (0 for an empty image).
        size: (h, w) of the padded patch grid.
        interpolation: the convention.

    Returns:
        [B, h, w, C], the table's dtype.
    """
    dtype = torch.promote_types(table.dtype, torch.float32)  # no bicubic in half precision
    rows = resampling_matrix(src_grid[0], valid_grid[:, 0], size[0], interpolation, dtype)  # [B, h, G_h]
    cols = resampling_matrix(src_grid[1], valid_grid[:, 1], size[1], interpolation, dtype)  # [B, w, G_w]
    empty = (valid_grid.min(-1).values > 0).to(dtype)[:, None, None]  # [B, 1, 1]: an empty image gets zeros
    source = rearrange(table.to(dtype), "(h w) c -> h w c", h=src_grid[0], w=src_grid[1])  # [G_h, G_w, C]
    out = torch.einsum("biy,yxc,bjx->bijc", rows * empty, source, cols)  # [B, h, w, C]
    return out.to(table.dtype)


__all__ = [
    "INTERPOLATION_FLAGS",
    "PositionInterpolation",
    "position_embedding_per_image",
    "resampling_matrix",
    "resize_position_grid",
]
