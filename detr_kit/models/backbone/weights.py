"""Backbone weights: reading state-dict files, matching them against a model, torchvision's named weights, and
ViT checkpoints (torchvision and timm/DeiT layouts, position tables fitted to another patch grid).

The backbones and ``detr_kit.compat`` import this module; it imports neither (a model is only duck-typed here).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Protocol

import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from torch import Tensor


class ViTLike(Protocol):
    """What ``load_vit_weights`` reads of a ViT backbone."""

    cls_token: Tensor | None
    pos_embed: Tensor
    pretrain_grid: int
    embed_dim: int
    depth: int
    patch_size: int

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> Any: ...


# --------------------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------------------


class LoadReport(NamedTuple):
    """What loading a state dict into a backbone body left out: key names, shape mismatches as text."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def read_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    """Read a state dict from a file or mapping.

    Args:
        source: a path to a ``.pth``/``.pt``/``.bin`` file (torch.load, tensors only) or a ``.safetensors`` file,
            or a mapping; either may be the state dict itself or a dict holding it under ``'model'`` or
            ``'state_dict'``.

    Returns:
        The state dict (key -> tensor).

    Raises:
        FileNotFoundError: the path does not exist.
        TypeError: the content is not a state dict.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        source = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise TypeError(f"backbone weights must be a state dict (a mapping), got {type(source).__name__}")
    for key in ("model", "state_dict"):
        if key in source and isinstance(source[key], Mapping):
            source = source[key]
            break
    return {k: v for k, v in source.items() if isinstance(v, Tensor)}


def match_state_dict(
    state_dict: Mapping[str, Tensor], own: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Sort a checkpoint's entries against a model's own state dict.

    Returns:
        ``(usable, unexpected, mismatched)``: the entries whose key and shape fit, the keys the model does not
        have, and ``"key: checkpoint (shape) vs model (shape)"`` for keys whose shapes differ.
    """
    usable: dict[str, Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        if key not in own:
            unexpected.append(key)
        elif own[key].shape != value.shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            usable[key] = value
    return usable, unexpected, mismatched


def torchvision_state_dict(name: str, weights: str) -> dict[str, Tensor]:
    """Download (or read from torch's cache) the torchvision weights ``weights`` of ``name``."""
    enum = torchvision.models.get_model_weights(name)
    try:
        member = enum[weights]
    except KeyError:
        valid = ["DEFAULT", *enum.__members__]
        raise ValueError(
            f"weights={weights!r} is neither an existing file nor a torchvision weights name of {name}; "
            f"valid names: {', '.join(dict.fromkeys(valid))}"
        ) from None
    return member.get_state_dict(progress=True)


# --------------------------------------------------------------------------------------------------------------
# ViT checkpoints
# --------------------------------------------------------------------------------------------------------------


def resize_position_embedding(table: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """Resize a table of patch position embeddings to another patch grid by bicubic interpolation.

    Args:
        table: [src_h * src_w, C] or [1, src_h * src_w, C], row-major over the grid, without [CLS] entries.
        src_grid: (src_h, src_w), the grid the table was learned at.
        dst_grid: (dst_h, dst_w), the grid wanted.

    Returns:
        [dst_h * dst_w, C]; equal to the table when the grids are equal (at scale 1 the bicubic weights are
        exactly 1 on the cell itself and 0 elsewhere; there is no shortcut for that case, because a branch on
        the grid size would be frozen into an export). Interpolation is bicubic with ``align_corners=False`` and
        no antialiasing (as timm and torchvision resize ViT position embeddings), computed in float32 at least
        (float64 stays float64).

    Raises:
        ValueError: the table's length is not src_h * src_w.
    """
    table = table.reshape(-1, table.shape[-1])  # [N, C]
    src_h, src_w = src_grid
    if table.shape[0] != src_h * src_w:
        raise ValueError(f"position table has {table.shape[0]} entries, not {src_h}x{src_w} = {src_h * src_w}")
    grid = rearrange(table, "(h w) c -> 1 c h w", h=src_h, w=src_w)  # [1, C, src_h, src_w]
    grid = grid.to(torch.promote_types(grid.dtype, torch.float32))  # no bicubic in half precision
    grid = F.interpolate(grid, size=tuple(dst_grid), mode="bicubic", align_corners=False)  # [1, C, dst_h, dst_w]
    return rearrange(grid, "1 c h w -> (h w) c").to(table.dtype)  # [dst_h * dst_w, C]


_HEAD_PREFIXES = ("head.", "heads.", "head_dist.", "fc_norm.", "pre_logits.")  # classification heads, never loaded
_TORCHVISION_BLOCK_NAMES = {
    "ln_1": "norm1",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    # torchvision < 0.13 named the MLP layers linear_1/linear_2
    "mlp.linear_1": "mlp.fc1",
    "mlp.linear_2": "mlp.fc2",
}


def convert_vit_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision or timm/DeiT ViT state dict to ViTBackbone's (timm's) names, dropping the head.

    torchvision: ``class_token``, ``conv_proj``, ``encoder.pos_embedding``,
    ``encoder.layers.encoder_layer_{i}.{ln_1, self_attention.{in_proj_*, out_proj}, ln_2, mlp.{0,3}}``,
    ``encoder.ln``. timm/DeiT: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm`` (kept as they are). A
    ``module.`` prefix (DDP) is removed. Keys of neither layout pass through unchanged.

    Args:
        state_dict: key -> tensor.

    Returns:
        A new dict in ViTBackbone's names, without classification-head keys; tensors are not copied.
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(_HEAD_PREFIXES):
            continue
        if key == "class_token":
            key = "cls_token"
        elif key.startswith("conv_proj."):
            key = "patch_embed.proj." + key.removeprefix("conv_proj.")
        elif key == "encoder.pos_embedding":
            key = "pos_embed"
        elif key.startswith("encoder.ln."):
            key = "norm." + key.removeprefix("encoder.ln.")
        elif key.startswith("encoder.layers.encoder_layer_"):
            index, rest = key.removeprefix("encoder.layers.encoder_layer_").split(".", 1)
            for old, new in _TORCHVISION_BLOCK_NAMES.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            key = f"blocks.{index}.{rest}"
        converted[key] = value
    return converted


def _split_prefix(pos_embed: Tensor) -> tuple[Tensor, Tensor, int]:
    """Split a checkpoint's [1, N, C] table into its prefix-token entries ([CLS], distillation) and a square grid.

    Returns:
        (prefix [1, N - G*G, C], patches [1, G*G, C], G).
    """
    num = pos_embed.shape[1]
    side = math.isqrt(num)
    return pos_embed[:, : num - side * side], pos_embed[:, num - side * side :], side


def fit_position_table(pos_embed: Tensor, grid: int, cls_entry: Tensor | None) -> Tensor:
    """Fit a checkpoint's position table to a ViTBackbone: prefix entries fitted, patch grid interpolated.

    Args:
        pos_embed: [1, N, C] (or [N, C]) checkpoint table: prefix-token entries ([CLS], distillation) followed by
            a square patch grid.
        grid: G, the side of the model's patch grid (``pretrain_image_size / patch_size``).
        cls_entry: [1, 1, C], the model's own [CLS] position entry, used when the checkpoint's table has none;
            None for a model without a [CLS] token (the checkpoint's prefix entries are then dropped).

    Returns:
        [1, G*G, C] without a [CLS] token, else [1, 1 + G*G, C].
    """
    prefix, patches, side = _split_prefix(pos_embed.reshape(1, -1, pos_embed.shape[-1]))
    patches = resize_position_embedding(patches, (side, side), (grid, grid))[None]
    if cls_entry is None:
        return patches  # [1, G*G, C]
    if prefix.shape[1] == 0:  # a table without a [CLS] entry: keep the model's
        prefix = cls_entry.to(patches.dtype)
    return torch.cat((prefix[:, :1], patches), dim=1)  # [1, 1 + G*G, C]


def load_vit_weights(backbone: ViTLike, source: str | Path | Mapping[str, Tensor]) -> LoadReport:
    """Load a torchvision or timm/DeiT ViT state dict into ``backbone``'s trunk (the pyramid is left as it is).

    Args:
        backbone: the model to load into.
        source: a file path (``.pth``/``.pt``/``.bin`` via torch.load, or ``.safetensors``) or a state dict.

    Returns:
        LoadReport of trunk keys: missing (kept at initialisation), unexpected (ignored) and mismatched
        (always empty: a mismatch raises).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a tensor's shape does not fit the model, or nothing in the state dict fits it.
    """
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(
            f"ViT weights {str(source)!r} is not a file; ViT backbones load local torchvision or timm/DeiT "
            "state dict files only (weight names such as IMAGENET1K_V1 are not downloaded)"
        )
    state_dict = convert_vit_state_dict(read_state_dict(source))
    if "pos_embed" in state_dict:
        cls_entry = None if backbone.cls_token is None else backbone.pos_embed.detach()[:, :1]  # [1, 1, C]
        state_dict["pos_embed"] = fit_position_table(state_dict["pos_embed"], backbone.pretrain_grid, cls_entry)
    if backbone.cls_token is None:
        state_dict.pop("cls_token", None)

    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith("pyramid.")}
    usable, unexpected, mismatched = match_state_dict(state_dict, own)
    name = source if isinstance(source, (str, Path)) else "the state dict"
    if mismatched or not usable:
        raise ValueError(
            f"ViT weights from {name} do not fit a ViT with C={backbone.embed_dim}, {backbone.depth} blocks, "
            f"patch {backbone.patch_size}: shape mismatches {mismatched[:6]}"
            f"{'' if usable else f'; no key fits (first keys: {list(state_dict)[:6]})'}"
        )
    backbone.load_state_dict(usable, strict=False)
    missing = [key for key in own if key not in usable]
    return LoadReport(missing, unexpected, [])


__all__ = [
    "LoadReport",
    "ViTLike",
    "convert_vit_state_dict",
    "fit_position_table",
    "load_vit_weights",
    "match_state_dict",
    "read_state_dict",
    "resize_position_embedding",
    "torchvision_state_dict",
]
