"""Hugging Face ``DetrForObjectDetection`` / ``DeformableDetrForObjectDetection`` checkpoints -> detr_kit.

Hugging Face renames the official modules; the rules below rename them back to the official layout, which
``convert_official_checkpoint`` then maps to detr_kit. Both key styles are understood: transformers 5.x
(``self_attn.o_proj``, ``mlp.fc1``, ``model.backbone.model.*``, ``model.position_embedding.*``) and the 4.x
layout the Hub checkpoints are stored in (``self_attn.out_proj``, ``fc1``, ``model.backbone.conv_encoder.model.*``,
``model.backbone.position_embedding.*``).

Backbones: with ``use_timm_backbone=True`` (the default) the backbone is a timm ResNet whose keys already are
torchvision's; with ``use_timm_backbone=False`` it is transformers' own ResNet (``embedder`` / ``encoder.stages``),
mapped to torchvision names here (its bottleneck strides in the 3x3 conv, as torchvision's does).

Attention: Hugging Face splits ``nn.MultiheadAttention``'s ``in_proj_weight`` into ``q_proj``, ``k_proj`` and
``v_proj``; they are stacked back in that order.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from detr_kit.compat.official import (
    convert_official_checkpoint,
    detect_official_variant,
    rename_keys,
    unwrap_checkpoint,
)

_NUM = r"(\d+)"
_WB = r"(weight|bias)"
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_OUT_PROJ = r"(?:o_proj|out_proj)"
_FC1 = r"(?:mlp\.fc1|fc1)"
_FC2 = r"(?:mlp\.fc2|fc2)"
_BACKBONE = r"model\.backbone\.(?:conv_encoder\.)?model\."
_POSITION = r"model\.(?:backbone\.)?position_embedding\."

Rule = tuple[re.Pattern, "str | Callable[[re.Match], str]"]


def _rules(*pairs: tuple[str, "str | Callable[[re.Match], str]"]) -> tuple[Rule, ...]:
    return tuple((re.compile(f"^{pattern}$"), repl) for pattern, repl in pairs)


def _stage(match: re.Match, group: int = 1) -> str:
    return f"layer{int(match.group(group)) + 1}"


# transformers' ResNet (use_timm_backbone=False) -> torchvision ResNet, under official "backbone.0.body."
_HF_RESNET_RULES: tuple[Rule, ...] = _rules(
    (rf"{_BACKBONE}embedder\.embedder\.convolution\.weight", "backbone.0.body.conv1.weight"),
    (rf"{_BACKBONE}embedder\.embedder\.normalization\.{_BN}", r"backbone.0.body.bn1.\1"),
    (
        rf"{_BACKBONE}encoder\.stages\.{_NUM}\.layers\.{_NUM}\.shortcut\.convolution\.weight",
        lambda m: f"backbone.0.body.{_stage(m)}.{m.group(2)}.downsample.0.weight",
    ),
    (
        rf"{_BACKBONE}encoder\.stages\.{_NUM}\.layers\.{_NUM}\.shortcut\.normalization\.{_BN}",
        lambda m: f"backbone.0.body.{_stage(m)}.{m.group(2)}.downsample.1.{m.group(3)}",
    ),
    (
        rf"{_BACKBONE}encoder\.stages\.{_NUM}\.layers\.{_NUM}\.layer\.{_NUM}\.convolution\.weight",
        lambda m: f"backbone.0.body.{_stage(m)}.{m.group(2)}.conv{int(m.group(3)) + 1}.weight",
    ),
    (
        rf"{_BACKBONE}encoder\.stages\.{_NUM}\.layers\.{_NUM}\.layer\.{_NUM}\.normalization\.{_BN}",
        lambda m: f"backbone.0.body.{_stage(m)}.{m.group(2)}.bn{int(m.group(3)) + 1}.{m.group(4)}",
    ),
)

# timm ResNet (use_timm_backbone=True): torchvision names already
_TIMM_RESNET_RULES: tuple[Rule, ...] = _rules(
    (rf"{_BACKBONE}((?:conv1|bn1|layer[1-4])\..+)", r"backbone.0.body.\1"),
)

_DETR_RULES: tuple[Rule, ...] = _rules(
    (rf"{_POSITION}row_embeddings\.weight", "backbone.1.row_embed.weight"),
    (rf"{_POSITION}column_embeddings\.weight", "backbone.1.col_embed.weight"),
    (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
    (rf"model\.input_projection\.{_WB}", r"input_proj.\1"),
    (rf"class_labels_classifier\.{_WB}", r"class_embed.\1"),
    (rf"bbox_predictor\.layers\.{_NUM}\.{_WB}", r"bbox_embed.layers.\1.\2"),
    (rf"model\.decoder\.layernorm\.{_WB}", r"transformer.decoder.norm.\1"),
    # attention projections: q/k/v are stacked into in_proj by _stack_qkv afterwards
    (rf"model\.(encoder|decoder)\.layers\.{_NUM}\.self_attn\.([qkv])_proj\.{_WB}", r"transformer.\1.layers.\2.self_attn.\3.\4"),
    (rf"model\.decoder\.layers\.{_NUM}\.encoder_attn\.([qkv])_proj\.{_WB}", r"transformer.decoder.layers.\1.multihead_attn.\2.\3"),
    (rf"model\.(encoder|decoder)\.layers\.{_NUM}\.self_attn\.{_OUT_PROJ}\.{_WB}", r"transformer.\1.layers.\2.self_attn.out_proj.\3"),
    (rf"model\.decoder\.layers\.{_NUM}\.encoder_attn\.{_OUT_PROJ}\.{_WB}", r"transformer.decoder.layers.\1.multihead_attn.out_proj.\2"),
    (rf"model\.(encoder|decoder)\.layers\.{_NUM}\.{_FC1}\.{_WB}", r"transformer.\1.layers.\2.linear1.\3"),
    (rf"model\.(encoder|decoder)\.layers\.{_NUM}\.{_FC2}\.{_WB}", r"transformer.\1.layers.\2.linear2.\3"),
    (rf"model\.(encoder|decoder)\.layers\.{_NUM}\.self_attn_layer_norm\.{_WB}", r"transformer.\1.layers.\2.norm1.\3"),
    (rf"model\.decoder\.layers\.{_NUM}\.encoder_attn_layer_norm\.{_WB}", r"transformer.decoder.layers.\1.norm2.\2"),
    (rf"model\.encoder\.layers\.{_NUM}\.final_layer_norm\.{_WB}", r"transformer.encoder.layers.\1.norm2.\2"),
    (rf"model\.decoder\.layers\.{_NUM}\.final_layer_norm\.{_WB}", r"transformer.decoder.layers.\1.norm3.\2"),
)

_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)"
_DEFORMABLE_RULES: tuple[Rule, ...] = _rules(
    (r"model\.level_embed", "transformer.level_embed"),
    (rf"model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.{_WB}", r"transformer.\1.\2"),
    (rf"model\.input_proj\.{_NUM}\.(0|1)\.{_WB}", r"input_proj.\1.\2.\3"),
    (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
    (rf"(class_embed)\.{_NUM}\.{_WB}", r"\g<0>"),
    (rf"(bbox_embed)\.{_NUM}\.layers\.{_NUM}\.{_WB}", r"\g<0>"),
    (rf"model\.decoder\.(class_embed\.{_NUM}\.{_WB})", r"transformer.decoder.\1"),
    (rf"model\.decoder\.(bbox_embed\.{_NUM}\.layers\.{_NUM}\.{_WB})", r"transformer.decoder.\1"),
    # encoder layer: MSDeformAttn, then the feed-forward block
    (rf"model\.encoder\.layers\.{_NUM}\.self_attn\.{_MSDA}\.{_WB}", r"transformer.encoder.layers.\1.self_attn.\2.\3"),
    (rf"model\.encoder\.layers\.{_NUM}\.self_attn_layer_norm\.{_WB}", r"transformer.encoder.layers.\1.norm1.\2"),
    (rf"model\.encoder\.layers\.{_NUM}\.final_layer_norm\.{_WB}", r"transformer.encoder.layers.\1.norm2.\2"),
    # decoder layer: the official code names the cross-attention's norm norm1 and the self-attention's norm2
    (rf"model\.decoder\.layers\.{_NUM}\.self_attn\.([qkv])_proj\.{_WB}", r"transformer.decoder.layers.\1.self_attn.\2.\3"),
    (rf"model\.decoder\.layers\.{_NUM}\.self_attn\.{_OUT_PROJ}\.{_WB}", r"transformer.decoder.layers.\1.self_attn.out_proj.\2"),
    (rf"model\.decoder\.layers\.{_NUM}\.self_attn_layer_norm\.{_WB}", r"transformer.decoder.layers.\1.norm2.\2"),
    (rf"model\.decoder\.layers\.{_NUM}\.encoder_attn\.{_MSDA}\.{_WB}", r"transformer.decoder.layers.\1.cross_attn.\2.\3"),
    (rf"model\.decoder\.layers\.{_NUM}\.encoder_attn_layer_norm\.{_WB}", r"transformer.decoder.layers.\1.norm1.\2"),
    (rf"model\.decoder\.layers\.{_NUM}\.final_layer_norm\.{_WB}", r"transformer.decoder.layers.\1.norm3.\2"),
    (rf"model\.(encoder|decoder)\.layers\.{_NUM}\.{_FC1}\.{_WB}", r"transformer.\1.layers.\2.linear1.\3"),
    (rf"model\.(encoder|decoder)\.layers\.{_NUM}\.{_FC2}\.{_WB}", r"transformer.\1.layers.\2.linear2.\3"),
)

_QKV = re.compile(r"^(.+)\.([qkv])\.(weight|bias)$")


def is_hf_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether the keys are those of a Hugging Face DETR / Deformable-DETR detection model."""
    return any(
        k.startswith(("model.backbone.", "model.encoder.layers.", "class_labels_classifier.", "bbox_predictor."))
        for k in state_dict
    )


def _is_deformable(state_dict: Mapping[str, Any]) -> bool:
    return "model.level_embed" in state_dict


def _stack_qkv(state_dict: dict[str, Tensor]) -> None:
    """Replace ``<attn>.{q,k,v}.{weight,bias}`` by ``<attn>.in_proj_{weight,bias}`` = cat(q, k, v)."""
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key in list(state_dict):
        match = _QKV.match(key)
        if match is not None:
            groups.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = state_dict.pop(key)
    for (prefix, kind), parts in groups.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Hugging Face checkpoint: {prefix} has {sorted(parts)} projections, expected q, k and v")
        state_dict[f"{prefix}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)


def hf_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Hugging Face detection state dict to the official DETR / Deformable-DETR key layout.

    Raises:
        ValueError: listing every key no rule knows.
    """
    state_dict = dict(state_dict)
    uses_hf_resnet = any(re.match(rf"^{_BACKBONE}embedder\.", k) for k in state_dict)
    backbone_rules = _HF_RESNET_RULES if uses_hf_resnet else _TIMM_RESNET_RULES
    head_rules = _DEFORMABLE_RULES if _is_deformable(state_dict) else _DETR_RULES
    official = rename_keys(state_dict, backbone_rules + head_rules, "Hugging Face checkpoint")
    _stack_qkv(official)
    return official


def convert_hf_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """Convert a Hugging Face ``DetrForObjectDetection`` / ``DeformableDetrForObjectDetection`` state dict.

    Args:
        checkpoint: the model's ``state_dict()`` (or a dict holding it under ``model``), in transformers 5.x or
            4.x key style, with a timm or a transformers ResNet backbone.

    Returns:
        A detr_kit state dict that loads strictly into the model of ``detect_hf_variant(checkpoint)``.

    Raises:
        ValueError: listing unknown keys, or tied heads whose copies differ.
    """
    state_dict, _ = unwrap_checkpoint(checkpoint)
    return convert_official_checkpoint(hf_to_official(state_dict))


def detect_hf_variant(checkpoint: Mapping[str, Any], hf_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config overrides of a Hugging Face checkpoint (see ``detect_official_variant``).

    Args:
        checkpoint: the state dict (or a dict holding it under ``model``).
        hf_config: the model's ``config.json`` as a dict (``model.config.to_dict()``); it supplies what the weights
            cannot tell (heads, DC5 dilation, two-stage proposals). Without it the official defaults apply.
    """
    state_dict, _ = unwrap_checkpoint(checkpoint)
    cfg = dict(hf_config or {})
    args: dict[str, Any] = {}
    if "encoder_attention_heads" in cfg:
        args["nheads"] = int(cfg["encoder_attention_heads"])
    if "two_stage_num_proposals" in cfg:
        args["num_queries"] = int(cfg["two_stage_num_proposals"])
    dilation = bool(cfg.get("dilation", False)) if "dilation" in cfg else None
    return detect_official_variant({"model": hf_to_official(state_dict), "args": args}, dilation=dilation)


__all__ = ["convert_hf_checkpoint", "detect_hf_variant", "hf_to_official", "is_hf_state_dict"]
