"""Convolutional attention: multi-head attention whose heads each look at one neighbouring patch.

Li, Chen, He and Hsieh ("Can Vision Transformers Perform Convolution?", arXiv 2111.01353) show that a multi-head
self-attention layer with relative position encoding can compute any convolution over the pixels of its patch
inputs: head h attends (one-hot) to the patch at a fixed offset Δ_h from the query, its value projection W_V^h
and its slice W_O^h of the output projection then apply the part of the kernel that reads that patch, and the
heads' sum is the convolution. A k x k kernel at patch size P reaches ``r = ceil((k // 2) / P)`` patches in
each direction, so ``(2r + 1)^2`` heads are needed (9 for a 5 x 5 kernel and P >= 2, against 25 on pixels).

``ConvolutionalAttention`` is that layer with the one-hot attention built in: phase 1 of their two-phase
training (CMHSA). It costs a gather instead of an attention matrix, its parameters are the attention's value
and output projections, and ``conv_to_attention.convert_conv_attention`` turns it into an ordinary ``Attention``
with a relative position bias that reproduces it.

Borders and padding: the patch at ``query + Δ_h`` may lie outside the image (or in its padding). The head then
reads the valid patch nearest to that position, i.e. the position clamped to the image's valid patch
rectangle, because that is what softmax attention with the bias ``-β ||offset - Δ_h||^2`` converges to as β
grows (it cannot attend to nothing). Valid patches must form a top-left rectangle in every sequence (detr_kit
pads images at the bottom and right), so every image's output is independent of its batch.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn


def neighbourhood_offsets(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) patch offsets of a (2r + 1) x (2r + 1) neighbourhood, row-major: head h takes entry h."""
    span = range(-radius, radius + 1)
    return [(dy, dx) for dy in span for dx in span]


def patch_radius(kernel_size: int, patch_size: int) -> int:
    """r: how many patches a k x k pixel kernel (k odd, 'same' padding) reaches beyond a patch of side P."""
    return math.ceil((kernel_size // 2) / patch_size)


def heads_for_convolution(kernel_size: int, patch_size: int) -> int:
    """The paper's head count for a k x k convolution on P x P patches: one head per patch the kernel reaches."""
    return (2 * patch_radius(kernel_size, patch_size) + 1) ** 2


class ConvolutionalAttention(nn.Module):
    """Multi-head attention with fixed one-hot weights: head h returns its value at the patch ``query + Δ_h``.

    Args:
        embed_dim: C.
        num_heads: M >= (2 * radius + 1)^2; head h attends to ``neighbourhood_offsets(radius)[h % (2r+1)^2]``.
        radius: r >= 1, the neighbourhood's reach in patches.

    Attributes:
        offsets: [M, 2] int64 (dy, dx) per head.
    """

    def __init__(self, embed_dim: int, num_heads: int, radius: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        neighbourhood = neighbourhood_offsets(radius)
        if radius < 1 or num_heads < len(neighbourhood):
            raise ValueError(
                f"convolutional attention with radius {radius} needs radius >= 1 and num_heads >= "
                f"(2 * radius + 1)^2 = {len(neighbourhood)} (one head per neighbouring patch), got {num_heads} heads"
            )
        self.num_heads = num_heads
        self.radius = radius
        self.value = nn.Linear(embed_dim, embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        offsets = [neighbourhood[h % len(neighbourhood)] for h in range(num_heads)]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor, grid: tuple[int, int], key_valid: Tensor | None = None) -> Tensor:
        """Gather each head's value from its neighbour patch.

        Args:
            x: [B, N, C] tokens of an h x w patch grid, row-major (N = h*w; no prefix tokens).
            grid: (h, w).
            key_valid: [B, N] bool, False on padding; valid tokens form a top-left rectangle. None = all valid.

        Returns:
            [B, N, C].
        """
        batch, num_tokens, _ = x.shape
        height, width = grid
        if num_tokens != height * width:
            raise ValueError(f"convolutional attention takes patch tokens only: {num_tokens} tokens for a {grid} grid")
        values = rearrange(self.value(x), "b n (m d) -> b m n d", m=self.num_heads)  # [B, M, N, C/M]
        if key_valid is None:
            valid_rows = torch.full((batch,), height, device=x.device)
            valid_cols = torch.full((batch,), width, device=x.device)
        else:
            valid = key_valid.view(batch, height, width)
            valid_rows, valid_cols = valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)  # [B], [B]
        rows = self._clamped(height, self.offsets[:, 0], valid_rows)  # [B, M, h]
        cols = self._clamped(width, self.offsets[:, 1], valid_cols)  # [B, M, w]
        index = (rows[..., :, None] * width + cols[..., None, :]).flatten(2)  # [B, M, N]: the key of each query
        gathered = values.gather(2, index[..., None].expand_as(values))  # [B, M, N, C/M]
        return self.proj(rearrange(gathered, "b m n d -> b n (m d)"))  # [B, N, C]

    @staticmethod
    def _clamped(length: int, shifts: Tensor, valid_length: Tensor) -> Tensor:
        """Positions ``i + shift`` for i < length, clamped to 0..valid_length - 1: [M], [B] -> [B, M, length]."""
        positions = torch.arange(length, device=shifts.device)[None, None, :] + shifts[None, :, None]  # [1, M, L]
        last = (valid_length - 1).clamp(min=0)[:, None, None]  # [B, 1, 1]
        return torch.minimum(positions, last).clamp(min=0)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, radius={self.radius}"


__all__ = ["ConvolutionalAttention", "heads_for_convolution", "neighbourhood_offsets", "patch_radius"]
