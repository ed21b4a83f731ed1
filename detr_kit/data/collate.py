"""Batch images of different sizes into one padded ImageBatch."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from detr_kit.structures import ImageBatch, Target


def collate(batch: Sequence[tuple[Tensor, Target]], size_divisibility: int = 0) -> tuple[ImageBatch, list[Target]]:
    """Pad images to the largest height and width of the batch (bottom/right) and stack them.

    Args:
        batch: (image [3, H_i, W_i], Target) pairs, as a dataset returns them.
        size_divisibility: when > 0, round the padded height and width up to a multiple of it
            (helps strided backbones and channels-last kernels); 0 = no rounding.
    Returns:
        ImageBatch(images [B, 3, H, W], mask [B, H, W] True on padding) and the targets in order.

    Raises:
        ValueError: for an empty batch, a negative ``size_divisibility`` or an image that is not [C, H, W].
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if size_divisibility < 0:
        raise ValueError(f"size_divisibility must be >= 0, got {size_divisibility}")
    images = [image for image, _ in batch]
    for i, image in enumerate(images):
        if image.dim() != 3:
            raise ValueError(f"collate: image {i} has shape {tuple(image.shape)}; expected [C, H, W]")
    channels = images[0].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    if size_divisibility > 0:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    padded = images[0].new_zeros((len(images), channels, height, width))  # [B, 3, H, W]
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)  # [B, H, W]
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        padded[i, :, :h, :w] = image
        mask[i, :h, :w] = False
    return ImageBatch(padded, mask), [target for _, target in batch]


__all__ = ["collate"]
