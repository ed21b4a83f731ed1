"""Load torchvision and timm/DeiT ViT checkpoints into :class:`~detr_kit.models.backbone.vit.ViTBackbone`.

The backbone keeps timm's module names, so timm/DeiT state dicts load by name; torchvision ones are renamed
by :func:`convert_vit_state_dict`. Classification heads are dropped, the position table is interpolated to
the model's pretraining grid (:func:`fit_position_table`), and only the trunk is loaded: the feature
pyramid always keeps its initialisation. ``ViTBackbone(weights=...)`` and ``ViTBackbone.load_weights`` call
:func:`load_vit_weights`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor

from detr_kit.models.backbone.resnet import LoadReport, match_state_dict, read_state_dict
from detr_kit.models.backbone.vit import resize_position_embedding

if TYPE_CHECKING:
    from detr_kit.models.backbone.vit import ViTBackbone

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


def load_vit_weights(backbone: ViTBackbone, source: str | Path | Mapping[str, Tensor]) -> LoadReport:
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
    if isinstance(source, (str, Path)) and str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(str(source))
    else:
        state_dict = read_state_dict(source)
    state_dict = convert_vit_state_dict(state_dict)
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


__all__ = ["convert_vit_state_dict", "fit_position_table", "load_vit_weights"]
