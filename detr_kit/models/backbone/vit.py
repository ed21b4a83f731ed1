"""A plain Vision Transformer as a detection backbone, with ViTDet's simple feature pyramid.

The trunk follows ViT (Dosovitskiy et al. 2021) as torchvision and timm write it: a patch-embedding
convolution, a [CLS] token, learned absolute position embeddings, pre-norm blocks (LayerNorm eps 1e-6,
multi-head self-attention, GELU MLP) and a final LayerNorm. Module names are timm's (``patch_embed.proj``,
``pos_embed``, ``cls_token``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so
timm/DeiT checkpoints load by name, torchvision checkpoints through ``weights.convert_vit_state_dict``, and the
trainer's layer-wise lr decay finds ``backbone.blocks.{i}.``. The patch embedding is a Conv2d with kernel
= stride = patch size: the same linear map as ``rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)")``
followed by a Linear, but with the checkpoints' own weight layout, so loading needs no reshuffling.

Detection additions (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object Detection"):
windowed attention with a few global blocks for large inputs, and a simple feature pyramid built from the
last stride-16 map (stride 8 by a 2x2 transposed convolution, 16 as is, 32 and 64 by max pooling), each
level followed by 1x1 and 3x3 convolutions with channel LayerNorms (``simple_pyramid.py``).

Padding never changes an image's features. Every step is either per position (patch embedding, MLP,
LayerNorm, the pyramid's 1x1 convolutions), or sees only valid positions: attention masks padded keys (in
windows too), the position table is resized to each image's own patch grid, pooling ignores padded cells,
and padded cells are zeroed before the 3x3 convolutions. Level ``s`` of an ``H x W`` input has
``ceil(H / s) x ceil(W / s)`` cells, and a cell is valid when it covers a valid pixel (for strides that
divide the padded size this is the nearest-neighbour resize of the image mask that the ResNet uses).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

from detr_kit.models.backbone.simple_pyramid import PyramidLevel, padding_mask_at_stride
from detr_kit.models.backbone.weights import LoadReport, load_vit_weights, resize_position_embedding
from detr_kit.structures import FeatureMap

logger = logging.getLogger(__name__)

VIT_SIZES: dict[str, tuple[int, int, int]] = {  # size -> (embed_dim, depth, num_heads)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6  # torchvision and timm ViTs


# --------------------------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------------------------


def position_embedding_per_image(
    table: Tensor, src_grid: tuple[int, int], valid_grid: Tensor, size: tuple[int, int]
) -> Tensor:
    """The position table resized to each image's own patch grid, zero beyond it: no image depends on its batch.

    The bicubic resize of ``resize_position_embedding`` (``F.interpolate``, ``align_corners=False``) written as
    ``F.grid_sample`` at each image's sampling positions (output cell i of n samples source position
    ``(i + 0.5) * G / n - 0.5``; bicubic taps clamped at the border, as interpolate's), so that the grid sizes stay
    tensors: no host sync, one graph for every batch.

    Args:
        table: [G_h * G_w, C] row-major over ``src_grid``.
        src_grid: (G_h, G_w), the grid the table was learned at.
        valid_grid: [B, 2] int, (rows, columns) of each image's valid patch grid (0 for an empty image).
        size: (h, w) of the padded patch grid.

    Returns:
        [B, h, w, C], the table's dtype.
    """
    height, width = size
    dtype = torch.promote_types(table.dtype, torch.float32)  # no bicubic sampling in half precision
    rows = valid_grid[:, 0:1].to(dtype)  # [B, 1]
    cols = valid_grid[:, 1:2].to(dtype)  # [B, 1]
    ys = (2 * torch.arange(height, dtype=dtype, device=table.device) + 1) / rows.clamp(min=1) - 1  # [B, h] in -1..1
    xs = (2 * torch.arange(width, dtype=dtype, device=table.device) + 1) / cols.clamp(min=1) - 1  # [B, w]
    batch = valid_grid.shape[0]
    grid = torch.stack([xs[:, None, :].expand(batch, height, width), ys[:, :, None].expand(batch, height, width)], -1)
    source = rearrange(table.to(dtype), "(h w) c -> 1 c h w", h=src_grid[0], w=src_grid[1]).expand(batch, -1, -1, -1)
    out = F.grid_sample(source, grid, mode="bicubic", padding_mode="border", align_corners=False)  # [B, C, h, w]
    inside = (ys < 1)[:, :, None] & (xs < 1)[:, None, :] & (valid_grid.min(-1).values > 0)[:, None, None]  # [B, h, w]
    return rearrange(out, "b c h w -> b h w c").masked_fill(~inside[..., None], 0.0).to(table.dtype)


# --------------------------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------------------------


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
    """Multi-head self-attention with a fused qkv projection and a key-padding mask.

    Args:
        embed_dim: C.
        num_heads: M; C must be a multiple of M.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """Attend over the tokens of each sequence.

        Args:
            x: [B, N, C] tokens.
            key_valid: [B, N] bool, False for tokens that must not be attended to; None = all valid.

        Returns:
            [B, N, C].
        """
        q, k, v = rearrange(self.qkv(x), "b n (three m d) -> three b m n d", three=3, m=self.num_heads)
        attn_mask = None
        if key_valid is not None:
            # A sequence without any valid key (a window of padding) attends to all of its tokens, so its
            # softmax stays finite; those queries are padding themselves and never reach a valid token.
            key_valid = key_valid | ~key_valid.any(dim=1, keepdim=True)  # [B, N]
            attn_mask = key_valid[:, None, None, :]  # [B, 1, 1, N]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, M, N, C / M]
        return self.proj(rearrange(x, "b m n d -> b n (m d)"))  # [B, N, C]


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
    """

    def __init__(self, embed_dim: int, num_heads: int, drop_path: float, window_size: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(embed_dim, num_heads)
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
        x = self._windowed_attention(x, grid, key_valid) if self.window_size else self.attn(x, key_valid)
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
        windows = self.attn(windows, windows_valid)  # [B * rows * cols, s*s, C]
        x = windows.view(batch, rows, cols, size, size, channels).transpose(2, 3).reshape(batch, rows * size, -1, channels)
        return x[:, :h, :w].reshape(batch, h * w, channels)  # [B, h * w, C]


# --------------------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------------------


class ViTBackbone(nn.Module):
    """A plain ViT returning a simple feature pyramid with padding masks.

    Args:
        size: "tiny" (C 192, 3 heads), "small" (C 384, 6 heads) or "base" (C 768, 12 heads); 12 blocks each.
        return_strides: strides to return, any selection of (p/2, p, 2p, 4p) for patch size p, i.e. of
            (8, 16, 32, 64); levels come back in ascending stride order.
        patch_size: p, the patch side in pixels (even when stride p/2 is returned).
        drop_path: stochastic-depth rate of the last block; block i uses drop_path * i / (depth - 1).
        window_size: 0 = global attention in every block; > 0 = attention within windows of this many patches
            in every block not listed in ``global_blocks`` (ViTDet; the grid is padded to a multiple of it).
        global_blocks: indices of the blocks that keep global attention when ``window_size > 0``.
        use_cls_token: run a [CLS] token through the blocks (as in pretraining). Needs ``window_size == 0``.
        pretrain_image_size: the image side the position table is learned for; the table has
            (pretrain_image_size / p)^2 entries and is resized by bicubic interpolation to each image's grid.
        weights: None (random initialisation) or a local file with a torchvision ``vit_*`` or a timm/DeiT
            state dict (optionally under 'model' or 'state_dict'; ``.safetensors`` too). The classification head
            is ignored, the position table is interpolated when its grid differs.
        out_channels: channels of every pyramid level.
        depth: number of blocks; None = 12 (the standard sizes). Fewer blocks make small test models.

    Attributes:
        channels: output channels per returned level.
        strides: output stride per returned level.
        load_report: LoadReport of ``weights`` (trunk keys only: the pyramid is always new), or None.

    Raises:
        ValueError: an unknown size, strides outside (p/2, p, 2p, 4p), bad window/global-block settings, a
            pretrain size not divisible by p, or weights whose tensors do not fit this model.
        FileNotFoundError: ``weights`` names no file.
    """

    def __init__(
        self,
        size: str,
        return_strides: tuple[int, ...] = (16,),
        patch_size: int = 16,
        drop_path: float = 0.1,
        window_size: int = 0,
        global_blocks: tuple[int, ...] = (),
        use_cls_token: bool = True,
        pretrain_image_size: int = 224,
        weights: str | None = None,
        out_channels: int = 256,
        depth: int | None = None,
    ) -> None:
        super().__init__()
        if size not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {size!r}; choose one of {', '.join(VIT_SIZES)}")
        embed_dim, default_depth, num_heads = VIT_SIZES[size]
        depth = default_depth if depth is None else depth
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (or None for {default_depth}), got {depth}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        offered = {patch_size // 2: 0.5, patch_size: 1.0, 2 * patch_size: 2.0, 4 * patch_size: 4.0}
        if patch_size % 2:
            del offered[patch_size // 2]
        strides = tuple(return_strides)
        if not strides or len(set(strides)) != len(strides) or not set(strides) <= set(offered):
            raise ValueError(
                f"return_strides must be a non-empty selection without repeats of {tuple(sorted(offered))} "
                f"(patch_size={patch_size}), got {tuple(return_strides)}"
            )
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        if window_size < 0:
            raise ValueError(f"window_size must be 0 (global attention) or a number of patches > 0, got {window_size}")
        if any(not 0 <= b < depth for b in global_blocks):
            raise ValueError(f"global_blocks must be block indices in 0..{depth - 1}, got {tuple(global_blocks)}")
        if window_size and use_cls_token:
            raise ValueError(
                "use_cls_token=True needs window_size=0: a [CLS] token belongs to no window; set "
                "use_cls_token=False for windowed attention (ViTDet drops [CLS] and keeps its position entry out)"
            )
        if pretrain_image_size % patch_size:
            raise ValueError(f"pretrain_image_size={pretrain_image_size} must be a multiple of patch_size={patch_size}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")

        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_size = patch_size
        self.pretrain_grid = pretrain_image_size // patch_size
        self.use_cls_token = use_cls_token
        self.window_size = window_size
        self.global_blocks = tuple(global_blocks)
        self.strides = tuple(sorted(return_strides))
        self.channels = (out_channels,) * len(self.strides)

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        num_prefix = 1 if use_cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix + self.pretrain_grid**2, embed_dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, rates[i], 0 if i in self.global_blocks else window_size) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.pyramid = nn.ModuleList(PyramidLevel(embed_dim, out_channels, offered[s]) for s in self.strides)
        self._init_weights()

        self.load_report: LoadReport | None = None
        if weights is not None:
            self.load_report = self.load_weights(weights)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------------------------------------- weights

    def load_weights(self, source: str | Path | Mapping[str, Tensor]) -> LoadReport:
        """Load a torchvision or timm/DeiT ViT state dict into the trunk (the pyramid keeps its initialisation).

        Args:
            source: a file path (``.pth``/``.pt``/``.bin`` via torch.load, or ``.safetensors``) or a state dict.

        Returns:
            LoadReport of trunk keys: missing (kept at initialisation), unexpected (ignored) and mismatched
            (always empty: a mismatch raises). Missing or unexpected keys are also logged as a warning.

        Raises:
            FileNotFoundError: the path does not exist.
            ValueError: a tensor's shape does not fit this model, or nothing in the state dict fits it.
        """
        report = load_vit_weights(self, source)
        if report.missing or report.unexpected:
            name = source if isinstance(source, (str, Path)) else "the state dict"
            logger.warning("ViT weights from %s: missing keys %s, unexpected keys %s", name, report.missing,
                           report.unexpected)
        return report

    # ---------------------------------------------------------------------------------------------- forward

    def encode(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the ViT trunk: patch tokens after the final LayerNorm, without [CLS].

        Args:
            images: [B, 3, H, W] float, normalised; H and W need not be multiples of the patch size (the
                images are zero-padded at the bottom/right to the next multiple).
            mask: [B, H, W] bool, True on padding; None means no padding. Valid regions sit at the top-left.

        Returns:
            tokens [B, h, w, C] with h = ceil(H / p), w = ceil(W / p), and the patch padding mask [B, h, w]
            (True where a patch covers no valid pixel).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if mask is not None:
            if mask.shape != (batch, height, width) or mask.dtype != torch.bool:
                expected = [batch, height, width]
                raise ValueError(f"mask must be bool [B, H, W] = {expected}, got {mask.dtype} {list(mask.shape)}")
            images = images.masked_fill(mask[:, None], 0.0)  # partly valid patches see zeros, batched or alone
        p = self.patch_size
        images = F.pad(images, (0, (-width) % p, 0, (-height) % p))  # [B, 3, p*h, p*w]
        x = self.patch_embed(images)  # [B, h, w, C]
        h, w = x.shape[1:3]
        table = self.pos_embed[0, 1:] if self.cls_token is not None else self.pos_embed[0]  # [G*G, C]
        source = (self.pretrain_grid, self.pretrain_grid)
        if mask is None:
            patch_mask = torch.zeros(batch, h, w, dtype=torch.bool, device=images.device)
            pos = resize_position_embedding(table, source, (h, w)).view(1, h, w, -1)  # [1, h, w, C]
            key_valid = None
        else:
            patch_mask = padding_mask_at_stride(mask, p)  # [B, h, w]
            patch_valid = ~patch_mask
            valid_grid = torch.stack([patch_valid.any(dim=2).sum(dim=1), patch_valid.any(dim=1).sum(dim=1)], -1)
            pos = position_embedding_per_image(table, source, valid_grid, (h, w))  # [B, h, w, C]
            key_valid = patch_valid.flatten(1)  # [B, h*w]
        tokens = rearrange(x + pos.to(x.dtype), "b h w c -> b (h w) c")  # [B, h*w, C]
        if self.cls_token is not None:
            cls = self.cls_token + self.pos_embed[:, :1]  # [1, 1, C]
            tokens = torch.cat((cls.expand(batch, -1, -1).to(tokens.dtype), tokens), dim=1)  # [B, 1 + h*w, C]
            if key_valid is not None:
                key_valid = F.pad(key_valid, (1, 0), value=True)  # [B, 1 + h*w]
        for block in self.blocks:
            tokens = block(tokens, (h, w), key_valid)
        tokens = self.norm(tokens)
        tokens = tokens[:, 1:] if self.cls_token is not None else tokens  # [B, h*w, C]
        return rearrange(tokens, "b (h w) c -> b h w c", h=h, w=w), patch_mask

    def forward(self, images: Tensor, mask: Tensor | None = None) -> list[FeatureMap]:
        """Run the ViT and its simple feature pyramid.

        Args:
            images: [B, 3, H, W] float, normalised; any H, W.
            mask: [B, H, W] bool, True on padding; None means no padding.

        Returns:
            One FeatureMap per stride s in ``strides``: features [B, out_channels, ceil(H/s), ceil(W/s)], zero on
            padding, and mask [B, ceil(H/s), ceil(W/s)], True on cells that cover no valid pixel.
        """
        tokens, patch_mask = self.encode(images, mask)  # [B, h, w, C], [B, h, w]
        x = rearrange(tokens, "b h w c -> b c h w").masked_fill(patch_mask[:, None], 0.0)  # [B, C, h, w]
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        outputs: list[FeatureMap] = []
        for stride, level in zip(self.strides, self.pyramid):
            level_mask = patch_mask if stride == self.patch_size else padding_mask_at_stride(mask, stride)
            outputs.append(FeatureMap(level(x, patch_mask, level_mask), level_mask))
        return outputs


__all__ = ["VIT_SIZES", "ViTBackbone", "position_embedding_per_image"]
