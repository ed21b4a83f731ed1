"""The blocks of a plain ViT: patch embedding, multi-head self-attention (optionally with a relative position
bias, or convolutional), the MLP, and the pre-norm block that runs them globally or in windows (ViTDet).

Module names are timm's (``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

from detr_kit.models.backbone.conv_attention import ConvolutionalAttention
from detr_kit.models.backbone.relative_position import RelativePositionBias

MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6  # torchvision and timm ViTs


class PatchEmbed(nn.Module):
    """Cut images into non-overlapping patches and project each to ``embed_dim`` (timm's ``patch_embed``).

    Args:
        patch_size: side of a square patch in pixels.
        embed_dim: C, the token width.
    """

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:  # [B, 3, H, W], H and W multiples of the patch size
        return rearrange(self.proj(images), "b c h w -> b h w c")  # [B, H/p, W/p, C]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, a key-padding mask and an optional relative bias.

    Args:
        embed_dim: C, the width of the input tokens.
        num_heads: M.
        relative_position: a ``RelativePositionBias`` added to the scores of patch-token pairs; None = none.
        head_dim: width of each head; None = C / M (C must then be a multiple of M).
        out_dim: width of the output tokens; None = C.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        relative_position: RelativePositionBias | None = None,
        head_dim: int | None = None,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, embed_dim if out_dim is None else out_dim)
        self.relative_position = relative_position

    def forward(self, x: Tensor, grid: tuple[int, int], key_valid: Tensor | None = None) -> Tensor:
        """Attend over the tokens of each sequence.

        Args:
            x: [B, N, C] tokens: prefix tokens ([CLS]), then an h x w patch grid in row-major order.
            grid: (h, w) of the patch grid (used by the relative position bias).
            key_valid: [B, N] bool, False for tokens that must not be attended to; None = all valid.

        Returns:
            [B, N, out_dim].
        """
        q, k, v = rearrange(self.qkv(x), "b n (three m d) -> three b m n d", three=3, m=self.num_heads)
        attn_mask = None
        if key_valid is not None:
            # A sequence without any valid key (a window of padding) attends to all of its tokens, so its
            # softmax stays finite; those queries are padding themselves and never reach a valid token.
            key_valid = key_valid | ~key_valid.any(dim=1, keepdim=True)  # [B, N]
            attn_mask = key_valid[:, None, None, :]  # [B, 1, 1, N]
        if self.relative_position is not None:
            num_prefix = x.shape[1] - grid[0] * grid[1]
            bias = self.relative_position(grid, num_prefix).to(q.dtype)[None]  # [1, M, N, N]
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))  # [B, M, N, N]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, M, N, head_dim]
        # The attention's output may not be contiguous (with a float bias), which a view under torch.export refuses.
        return self.proj(x.transpose(1, 2).contiguous().flatten(2))  # [B, N, M * head_dim] -> [B, N, out_dim]


class FeedForward(nn.Module):
    """The block's MLP: Linear, GELU, Linear (timm names ``fc1``/``fc2``)."""

    def __init__(self, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C]
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block, optionally attending within non-overlapping windows (ViTDet).

    Args:
        embed_dim: C.
        num_heads: M.
        drop_path: probability of skipping the block's residual branches for a sample (stochastic depth).
        window_size: 0 for global attention, else the side of the square attention windows in patches.
        relative_position_max_distance: None = no relative position bias; else the offset (in patches) where a
            global block's bias is clipped. Windowed blocks clip at ``window_size - 1``, which covers every offset.
        conv_radius: 0 = self-attention; r > 0 = ``ConvolutionalAttention`` over the (2r + 1)^2 neighbouring
            patches (phase 1 of two-phase training; needs no relative position bias).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        drop_path: float,
        window_size: int,
        relative_position_max_distance: int | None = None,
        conv_radius: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.attn: nn.Module
        if conv_radius:
            if relative_position_max_distance is not None:
                raise ValueError("convolutional attention (conv_radius > 0) takes no relative position bias")
            self.attn = ConvolutionalAttention(embed_dim, num_heads, conv_radius)
        else:
            bias = None
            if relative_position_max_distance is not None:
                distance = window_size - 1 if window_size else relative_position_max_distance
                bias = RelativePositionBias(num_heads, distance)
            self.attn = Attention(embed_dim, num_heads, bias)
        self.norm2 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.mlp = FeedForward(embed_dim, MLP_RATIO * embed_dim)
        self.drop_path = drop_path
        self.window_size = window_size

    def forward(self, x: Tensor, grid: tuple[int, int], key_valid: Tensor | None) -> Tensor:
        """Run the block.

        Args:
            x: [B, N, C] tokens; the last h * w are the patch grid in row-major order, any before them are
                prefix tokens ([CLS]); windowed blocks take no prefix tokens.
            grid: (h, w) of the patch grid.
            key_valid: [B, N] bool, False on padding tokens; None = all valid.

        Returns:
            [B, N, C].
        """
        shortcut = x
        x = self.norm1(x)
        x = self._windowed_attention(x, grid, key_valid) if self.window_size else self.attn(x, grid, key_valid)
        x = shortcut + stochastic_depth(x, self.drop_path, "row", self.training)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, "row", self.training)

    def _windowed_attention(self, x: Tensor, grid: tuple[int, int], key_valid: Tensor | None) -> Tensor:
        """Attention within ``size x size`` windows of the patch grid, padded to a multiple of the window.

        The padding keys are always masked out, also when the grid needed none: a branch on the amount of padding
        would be frozen into a trace or an export at the example's size (the masked attention costs the same).
        """
        h, w = grid
        size = self.window_size
        batch, _, channels = x.shape
        pad_h, pad_w = (-h) % size, (-w) % size
        rows, cols = (h + pad_h) // size, (w + pad_w) // size  # windows per column and per row
        valid = x.new_ones(batch, h, w, dtype=torch.bool) if key_valid is None else key_valid.reshape(batch, h, w)
        valid = F.pad(valid, (0, pad_w, 0, pad_h), value=False)  # [B, h', w'], h' and w' multiples of the window
        x = F.pad(x.reshape(batch, h, w, channels), (0, 0, 0, pad_w, 0, pad_h))  # [B, h', w', C]
        windows = x.view(batch, rows, size, cols, size, channels).transpose(2, 3).reshape(-1, size * size, channels)
        windows_valid = valid.view(batch, rows, size, cols, size).transpose(2, 3).reshape(-1, size * size)
        windows = self.attn(windows, (size, size), windows_valid)  # [B * rows * cols, s*s, C]
        x = windows.view(batch, rows, cols, size, size, channels).transpose(2, 3).reshape(batch, rows * size, -1, channels)
        return x[:, :h, :w].reshape(batch, h * w, channels)  # [B, h * w, C]


__all__ = ["LAYER_NORM_EPS", "MLP_RATIO", "Attention", "Block", "FeedForward", "PatchEmbed"]
