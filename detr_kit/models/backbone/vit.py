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

Attention options: a learned relative position bias per head and 2-D patch offset (``relative_position.py``),
zero at initialisation so that weights trained without it load unchanged; convolutional attention
(``conv_attention.py``), phase 1 of the two-phase training of Li, Chen, He and Hsieh (arXiv 2111.01353), which
``conv_to_attention.py`` converts into self-attention with a relative position bias for phase 2. The position
table is resized to each input under a named convention (``position_interpolation.py``: detr_kit's, timm's or
torchvision's).

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
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from detr_kit.models.backbone.position_interpolation import (
    INTERPOLATION_FLAGS,
    PositionInterpolation,
    position_embedding_per_image,
)
from detr_kit.models.backbone.simple_pyramid import PyramidLevel, padding_mask_at_stride
from detr_kit.models.backbone.vit_blocks import (
    LAYER_NORM_EPS,
    Attention,
    Block,
    PatchEmbed,
)
from detr_kit.models.backbone.weights import (
    LoadReport,
    checkpoint_interpolation,
    load_vit_weights,
    read_vit_state_dict,
)
from detr_kit.structures import FeatureMap

logger = logging.getLogger(__name__)

VIT_SIZES: dict[str, tuple[int, int, int]] = {  # size -> (embed_dim, depth, num_heads)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


def _check_layout(
    depth: int, default_depth: int, patch_size: int, return_strides: tuple[int, ...], drop_path: float,
    window_size: int, global_blocks: tuple[int, ...], use_cls_token: bool, pretrain_image_size: int, out_channels: int,
) -> dict[int, float]:
    """Check the trunk's and pyramid's settings; return the strides on offer and their scale of the patch grid."""
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
    return offered


def _check_attention_options(
    size: str,
    num_heads: int,
    use_cls_token: bool,
    relative_position: bool,
    relative_position_max_distance: int | None,
    conv_radius: int,
    position_interpolation: str,
    weights_interpolation: str,
) -> None:
    """Raise ValueError for head, relative-position, convolution or interpolation options that do not fit."""
    embed_dim = VIT_SIZES[size][0]
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(f"num_heads must divide the width {embed_dim} of a {size} ViT, got {num_heads}")
    if conv_radius < 0:
        raise ValueError(f"conv_radius must be 0 (self-attention) or a number of patches >= 1, got {conv_radius}")
    if conv_radius and (use_cls_token or relative_position):
        raise ValueError(
            "conv_radius > 0 (convolutional attention) needs use_cls_token=False and relative_position=False: "
            "a [CLS] token has no neighbours, and the conversion to attention creates the relative position tables"
        )
    if relative_position_max_distance is not None and relative_position_max_distance < 0:
        raise ValueError(f"relative_position_max_distance must be >= 0 or None, got {relative_position_max_distance}")
    if position_interpolation not in INTERPOLATION_FLAGS or weights_interpolation not in {"auto", *INTERPOLATION_FLAGS}:
        raise ValueError(
            f"position_interpolation={position_interpolation!r} / weights_interpolation={weights_interpolation!r}: "
            f"choose from {', '.join(INTERPOLATION_FLAGS)} (weights_interpolation also 'auto')"
        )


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
        num_heads: M; None = the size's (3, 6, 12). Convolutional attention needs M >= (2 * conv_radius + 1)^2,
            e.g. 12 heads of width 16 for a tiny ViT.
        relative_position: add a learned bias per head and relative patch offset to every attention score
            (``RelativePositionBias``; zero at initialisation, so weights trained without it load unchanged).
        relative_position_max_distance: D, where global blocks clip offsets; None = the pretraining grid's
            side minus one. Windowed blocks clip at ``window_size - 1``.
        conv_radius: 0 = self-attention; r > 0 = every block's attention is ``ConvolutionalAttention`` over the
            (2r + 1)^2 neighbouring patches (phase 1 of two-phase training, CMHSA in Li et al. 2021; convert with
            ``conv_to_attention``). Needs ``use_cls_token=False`` and no relative position bias.
        position_interpolation: how the position table is resized to each input's patch grid at run time:
            "detr_kit" (bicubic, align_corners=False), "timm" (antialiased) or "torchvision" (align_corners=True);
            see ``position_interpolation.py``.
        weights_interpolation: how ``weights``' position table is resized to the pretraining grid when its grid
            differs: "auto" = the convention of the library that wrote it (``checkpoint_interpolation``), or a
            name as above.

    Attributes:
        channels: output channels per returned level.
        strides: output stride per returned level.
        load_report: LoadReport of ``weights`` (trunk keys only: the pyramid is always new), or None.

    Raises:
        ValueError: an unknown size, strides outside (p/2, p, 2p, 4p), bad window/global-block settings, a
            pretrain size not divisible by p, bad head, relative-position or convolution settings, an unknown
            interpolation, or weights whose tensors do not fit this model.
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
        num_heads: int | None = None,
        relative_position: bool = False,
        relative_position_max_distance: int | None = None,
        conv_radius: int = 0,
        position_interpolation: PositionInterpolation = "detr_kit",
        weights_interpolation: PositionInterpolation | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        if size not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {size!r}; choose one of {', '.join(VIT_SIZES)}")
        embed_dim, default_depth, default_heads = VIT_SIZES[size]
        depth = default_depth if depth is None else depth
        num_heads = default_heads if num_heads is None else num_heads
        offered = _check_layout(depth, default_depth, patch_size, return_strides, drop_path, window_size, global_blocks,
                                use_cls_token, pretrain_image_size, out_channels)
        _check_attention_options(
            size, num_heads, use_cls_token, relative_position, relative_position_max_distance, conv_radius,
            position_interpolation, weights_interpolation,
        )

        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_size = patch_size
        self.pretrain_grid = pretrain_image_size // patch_size
        self.use_cls_token = use_cls_token
        self.window_size = window_size
        self.global_blocks = tuple(global_blocks)
        self.strides = tuple(sorted(return_strides))
        self.channels = (out_channels,) * len(self.strides)
        self.conv_radius = conv_radius
        self.position_interpolation = position_interpolation
        self.relative_position_max_distance: int | None = None
        if relative_position:
            default_distance = self.pretrain_grid - 1
            self.relative_position_max_distance = (
                default_distance if relative_position_max_distance is None else relative_position_max_distance
            )

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        num_prefix = 1 if use_cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix + self.pretrain_grid**2, embed_dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, rates[i], 0 if i in self.global_blocks else window_size,
                self.relative_position_max_distance, conv_radius,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.pyramid = nn.ModuleList(PyramidLevel(embed_dim, out_channels, offered[s]) for s in self.strides)
        self._init_weights()

        self.load_report: LoadReport | None = None
        if weights is not None:
            self.load_report = self.load_weights(weights, weights_interpolation)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------------------------------------- weights

    def load_weights(
        self,
        source: str | Path | Mapping[str, Tensor],
        interpolation: PositionInterpolation | Literal["auto"] = "auto",
    ) -> LoadReport:
        """Load a torchvision or timm/DeiT ViT state dict into the trunk (the pyramid keeps its initialisation).

        Args:
            source: a file path (``.pth``/``.pt``/``.bin`` via torch.load, or ``.safetensors``) or a state dict.
            interpolation: how the checkpoint's position table is resized when its grid differs from the
                pretraining grid: "auto" = the convention of the library that wrote it, or a name.

        Returns:
            LoadReport of trunk keys: missing (kept at initialisation), unexpected (ignored) and mismatched
            (always empty: a mismatch raises). Missing or unexpected keys are also logged as a warning, except
            the relative position tables, which start at zero by design (logged as info).

        Raises:
            FileNotFoundError: the path does not exist.
            ValueError: a tensor's shape does not fit this model, or nothing in the state dict fits it.
        """
        state_dict = read_vit_state_dict(source)
        if interpolation == "auto":
            interpolation = checkpoint_interpolation(state_dict)
        report = load_vit_weights(self, state_dict, interpolation)
        name = source if isinstance(source, (str, Path)) else "the state dict"
        tables = [key for key in report.missing if key.endswith("relative_position.table")]
        missing = [key for key in report.missing if key not in tables]
        if missing or report.unexpected:
            logger.warning("ViT weights from %s: missing keys %s, unexpected keys %s", name, missing, report.unexpected)
        if tables:
            logger.info("ViT weights from %s hold no relative position tables: %d tables start at zero", name, len(tables))
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
            key_valid = None
        else:
            patch_mask = padding_mask_at_stride(mask, p)  # [B, h, w]
            key_valid = (~patch_mask).flatten(1)  # [B, h*w]
        # Each image's valid grid by tensor ops, so that a trace or an export keeps it symbolic; one table unmasked.
        patch_valid = ~patch_mask if mask is not None else ~patch_mask[:1]  # [B or 1, h, w]
        valid_grid = torch.stack([patch_valid.any(dim=2).sum(dim=1), patch_valid.any(dim=1).sum(dim=1)], -1)  # [B|1, 2]
        pos = position_embedding_per_image(table, source, valid_grid, (h, w), self.position_interpolation)
        # pos: [B, h, w, C] ([1, h, w, C] without a mask)
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


__all__ = ["VIT_SIZES", "Attention", "Block", "ViTBackbone"]
