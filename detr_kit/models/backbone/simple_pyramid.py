"""The simple feature pyramid of ViTDet (Li et al. 2022), built from a plain ViT's stride-p token map.

Stride p/2 comes from a 2x2 transposed convolution, p as is, 2p and 4p from max pooling; each level is then
followed by 1x1 and 3x3 convolutions with channel LayerNorms. Padding never changes an image's features:
pooling ignores padded cells and padded cells are zeroed before every convolution. A cell of a level is
valid when it covers a valid pixel (:func:`padding_mask_at_stride`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every position of a [B, C, H, W] map (no statistics across positions)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H, W]
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PyramidLevel(nn.Module):
    """One level of the simple feature pyramid: resampling of the stride-p map, then 1x1 and 3x3 conv + LayerNorm.

    Args:
        embed_dim: C of the ViT tokens.
        out_channels: channels of the level.
        scale: the level's stride divided by the patch size: 0.5, 1, 2 or 4.
    """

    def __init__(self, embed_dim: int, out_channels: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        in_channels = embed_dim
        self.upsample: nn.Module | None = None
        if scale == 0.5:
            in_channels = embed_dim // 2
            self.upsample = nn.ConvTranspose2d(embed_dim, in_channels, kernel_size=2, stride=2)
        self.lateral = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.lateral_norm = LayerNorm2d(out_channels)
        self.output = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.output_norm = LayerNorm2d(out_channels)

    def forward(self, x: Tensor, patch_mask: Tensor, level_mask: Tensor) -> Tensor:
        """Build the level from the patch-token map.

        Args:
            x: [B, C, h, w] tokens of the patch grid, zero on padding.
            patch_mask: [B, h, w] bool, True on padded patches.
            level_mask: [B, H_l, W_l] bool, True on padded cells of this level.

        Returns:
            [B, out_channels, H_l, W_l], zero on padded cells.
        """
        height, width = level_mask.shape[-2:]
        if self.upsample is not None:
            x = self.upsample(x)[..., :height, :width]  # [B, C / 2, H_l, W_l]; each cell sees one patch only
        elif self.scale > 1:
            kernel = int(self.scale)
            x = x.masked_fill(patch_mask[:, None], torch.finfo(x.dtype).min)  # padding never wins the max
            x = F.max_pool2d(x, kernel, kernel, ceil_mode=True)  # [B, C, H_l, W_l]
        padding = level_mask[:, None]  # [B, 1, H_l, W_l]
        x = x.masked_fill(padding, 0.0)  # all-padding cells hold the dtype's minimum: never let it into a conv
        x = self.lateral_norm(self.lateral(x)).masked_fill(padding, 0.0)  # [B, out, H_l, W_l]
        return self.output_norm(self.output(x)).masked_fill(padding, 0.0)  # [B, out, H_l, W_l]


def padding_mask_at_stride(mask: Tensor, stride: int) -> Tensor:
    """Padding mask of a map with stride ``stride``: a cell is padding when none of its pixels is valid.

    Args:
        mask: [B, H, W] bool, True on padding.
        stride: cell side in pixels.

    Returns:
        [B, ceil(H / stride), ceil(W / stride)] bool, True on padding.
    """
    valid = (~mask)[:, None].float()  # [B, 1, H, W]
    return F.max_pool2d(valid, stride, stride, ceil_mode=True)[:, 0] == 0  # [B, H / s, W / s]


__all__ = ["LayerNorm2d", "PyramidLevel", "padding_mask_at_stride"]
