"""The feature levels Deformable-DETR attends over: the backbone's levels projected to the model width, plus extra
levels made by stride-2 convolutions, each with its padding mask (Zhu et al. 2021, appendix A.2).

Module names follow the reference (``input_proj.{l}.{0,1}``: conv, GroupNorm), which is why the detector registers
this module under that name.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_kit.structures import FeatureMap

GROUP_NORM_GROUPS = 32  # the input projections' GroupNorm, as the reference


def backbone_level_count(num_levels: int) -> int:
    """How many of the backbone's C3-C5 levels a model of ``num_levels`` levels uses (the rest are extra levels):
    C5 alone for a single-scale model, else the deepest min(L, 3) of C3, C4, C5."""
    return 1 if num_levels == 1 else min(num_levels, 3)


def level_sizes_wh(spatial_shapes: Sequence[tuple[int, int]], like: Tensor) -> Tensor:
    """[L, 2] (w, h) of every level, with ``like``'s dtype and device.

    The sizes come as plain ints in eager mode, symbolic ints under ``torch.export`` and ``torch.compile``, and
    0-dim tensors under ``torch.jit.trace``. Multiplying a tensor by them is recorded in all three (``torch.tensor``
    and ``float()`` would freeze the traced numbers), so an exported graph takes them from its input's size.
    """
    one = like.new_ones(())
    return torch.stack([torch.stack([one * w, one * h]) for h, w in spatial_shapes])


def masked_group_norm(x: Tensor, mask: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm whose statistics come from the valid (unpadded) positions only.

    Args:
        x: [B, C, H, W].
        mask: [B, H, W] bool, True on padding.
        norm: supplies groups, eps and the affine parameters.

    Returns:
        [B, C, H, W]; equal to ``norm(x)`` wherever no position is padded.
    """
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    x_float = x.float().view(batch, groups, channels // groups, height * width)  # [B, G, C/G, HW]
    valid = (~mask).view(batch, 1, 1, height * width).to(x_float.dtype)  # [B, 1, 1, HW]
    count = valid.sum(-1, keepdim=True).clamp(min=1) * (channels // groups)  # [B, 1, 1, 1]
    mean = (x_float * valid).sum((-1, -2), keepdim=True) / count  # [B, G, 1, 1]
    var = (((x_float - mean) ** 2) * valid).sum((-1, -2), keepdim=True) / count  # [B, G, 1, 1]
    out = ((x_float - mean) * torch.rsqrt(var + norm.eps)).view(batch, channels, height, width).to(x.dtype)
    if norm.affine:
        out = out * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    return out


def extra_level_mask(image_mask: Tensor | None, previous_mask: Tensor, size: Sequence[int], exact_padding: bool) -> Tensor:
    """The padding mask of an extra level made by a 3x3 stride-2 convolution.

    The reference code resizes the *image* mask to the level's size with nearest interpolation; batched forward
    passes do the same here. With ``exact_padding`` every image must get the level it would get alone: a 3x3
    stride-2 conv with padding 1 maps a valid extent n to ceil(n / 2), every other entry of the previous level's
    mask. The two differ on padded batches whose size is no multiple of the level's stride.

    Args:
        image_mask: [B, H, W] bool, True on padding, or None (no padding).
        previous_mask: [B, H_prev, W_prev] the previous level's mask.
        size: (H_l, W_l) of the new level.
        exact_padding: whether the backbone ran on each image alone (see ``run_backbone``).

    Returns:
        [B, H_l, W_l] bool, True on padding.
    """
    if exact_padding:
        return previous_mask[:, ::2, ::2]
    if image_mask is None:
        return previous_mask.new_zeros(previous_mask.shape[0], *size)
    return F.interpolate(image_mask[None].float(), size=tuple(size))[0].bool()


class FeatureLevels(nn.ModuleList):
    """The L levels of Deformable-DETR from the backbone's: one (conv, GroupNorm) pair per level.

    The backbone's levels go through a 1x1 conv; each extra level is a 3x3 stride-2 conv of the deepest backbone
    level (the first) or of the previous extra level (the others).

    Args:
        in_channels: channels of the backbone levels this model uses, shallowest first.
        hidden_dim: C, a multiple of 32.
        num_levels: L >= len(in_channels).

    Raises:
        ValueError: for a width GroupNorm cannot split, or more backbone levels than ``num_levels``.
    """

    def __init__(self, in_channels: Sequence[int], hidden_dim: int, num_levels: int) -> None:
        if hidden_dim % GROUP_NORM_GROUPS:
            raise ValueError(f"hidden_dim must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm groups), got {hidden_dim}")
        if not 1 <= len(in_channels) <= num_levels:
            raise ValueError(f"need 1..num_levels={num_levels} backbone levels, got {len(in_channels)}")
        projections = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(GROUP_NORM_GROUPS, hidden_dim))
            for c in in_channels
        ]
        previous = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            conv = nn.Conv2d(previous, hidden_dim, kernel_size=3, stride=2, padding=1)
            projections.append(nn.Sequential(conv, nn.GroupNorm(GROUP_NORM_GROUPS, hidden_dim)))
            previous = hidden_dim
        super().__init__(projections)
        self.num_backbone_levels = len(in_channels)
        for conv, _ in self:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)

    def forward(
        self, features: Sequence[FeatureMap], image_mask: Tensor | None, exact_padding: bool = False
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Project the backbone levels and add the extra ones.

        Args:
            features: the backbone's levels this model uses, shallowest first.
            image_mask: [B, H, W] bool, True on padding, or None.
            exact_padding: the backbone ran on each image alone: normalise over valid positions only and let the
                extra levels see zeros beyond each image, so that no image depends on the batch.

        Returns:
            L maps [B, C, H_l, W_l] and L masks [B, H_l, W_l] (True on padding).
        """
        srcs, masks = [], []
        for index, (conv, norm) in enumerate(self):
            if index < self.num_backbone_levels:
                x, mask = conv(features[index].features), features[index].mask  # [B, C, H_l, W_l]
            else:
                previous = features[-1].features if index == self.num_backbone_levels else srcs[-1]
                if exact_padding:  # the stride-2 conv must see zeros beyond the image, as it would alone
                    previous = previous.masked_fill(masks[-1][:, None], 0.0)
                x = conv(previous)  # [B, C, H_l, W_l]
                mask = extra_level_mask(image_mask, masks[-1], x.shape[-2:], exact_padding)
            srcs.append(masked_group_norm(x, mask, norm) if exact_padding else norm(x))
            masks.append(mask)
        return srcs, masks


__all__ = [
    "FeatureLevels",
    "GROUP_NORM_GROUPS",
    "backbone_level_count",
    "extra_level_mask",
    "level_sizes_wh",
    "masked_group_norm",
]
