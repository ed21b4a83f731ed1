"""Run a backbone on a padded batch, optionally so that padding cannot change any image's features.

A convolution near the border of an image sees the batch's padding (and, with stride, a different sampling grid),
so a padded image's features differ from those of the same image alone. This is why DETR-DC5 loses AP at batch
sizes above one. ``run_backbone(..., exact=True)`` runs the backbone on each image's valid region alone and pads
the features afterwards, which makes every image's features independent of the rest of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_kit.structures import FeatureMap


def checked_image_mask(images: Tensor, mask: Tensor | None) -> Tensor:
    """The padding mask of a backbone's input: ``mask`` itself, or all False when None.

    Args:
        images: [B, 3, H, W] float.
        mask: [B, H, W] bool, True on padding, or None (no padding).

    Returns:
        [B, H, W] bool.

    Raises:
        ValueError: ``images`` is not [B, 3, H, W].
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if mask is None:
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
    return mask


def valid_sizes(mask: Tensor) -> list[tuple[int, int]]:
    """(h, w) of each image's valid (unpadded) region; images sit at the top-left of the padded batch.

    Args:
        mask: [B, H, W] bool, True on padding.

    Returns:
        B pairs (h, w).
    """
    valid = ~mask  # [B, H, W]
    heights = valid.any(dim=2).sum(dim=1)  # [B]
    widths = valid.any(dim=1).sum(dim=1)  # [B]
    return list(zip(heights.tolist(), widths.tolist()))


def run_backbone(backbone: nn.Module, images: Tensor, mask: Tensor | None, exact: bool) -> list[FeatureMap]:
    """Run ``backbone`` on a padded batch.

    Args:
        backbone: any module with ``forward(images [B,3,H,W], mask [B,H,W] | None) -> list[FeatureMap]``.
        images: [B, 3, H, W] float, padded to the largest image.
        mask: [B, H, W] bool, True on padding; None means no padding.
        exact: False: one batched call. True: each image cropped to its valid region is run alone (images of the
            same size together), and every level's features are zero-padded to the largest per-image size of that
            level, with masks True outside each image's features. Use it in evaluation: in training mode a
            BatchNorm backbone would see per-image statistics.

    Returns:
        One FeatureMap per backbone level: features [B, C_l, H_l, W_l], mask [B, H_l, W_l].

    Raises:
        ValueError: exact=True and an image has no valid pixel.
    """
    if not exact or mask is None:
        return backbone(images, mask)
    sizes = valid_sizes(mask)
    if any(h == 0 or w == 0 for h, w in sizes):
        raise ValueError(f"exact padding needs every image to have valid pixels; valid (h, w) per image: {sizes}")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)

    per_group: list[tuple[list[int], list[FeatureMap]]] = []
    for (h, w), indices in groups.items():
        crop = images[indices, :, :h, :w]  # [G, 3, h, w]
        per_group.append((indices, backbone(crop, None)))

    num_levels = len(per_group[0][1])
    batch = images.shape[0]
    outputs: list[FeatureMap] = []
    for level in range(num_levels):
        level_maps = [maps[level].features for _, maps in per_group]
        height = max(f.shape[-2] for f in level_maps)
        width = max(f.shape[-1] for f in level_maps)
        reference = level_maps[0]
        features = reference.new_zeros(batch, reference.shape[1], height, width)  # [B, C_l, H_l, W_l]
        level_mask = torch.ones(batch, height, width, dtype=torch.bool, device=reference.device)  # [B, H_l, W_l]
        for (indices, _), group_features in zip(per_group, level_maps):
            h, w = group_features.shape[-2:]
            index = torch.as_tensor(indices, device=reference.device)
            features[index] = F.pad(group_features, (0, width - w, 0, height - h))
            level_mask[index, :h, :w] = False
        outputs.append(FeatureMap(features, level_mask))
    return outputs


__all__ = [
    "checked_image_mask",
    "run_backbone",
    "valid_sizes",
]
