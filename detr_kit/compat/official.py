"""Official DETR, Deformable-DETR and DINO checkpoints -> detr_kit state dicts.

The detr_kit models keep the official module names (see docs/architecture.md), so the mapping is short and
explicit: every official key is matched by exactly one rule of ``_RULES`` below, or the conversion fails with a
list of the keys no rule knows. What differs:

- the backbone: official ``backbone.0.body.*`` (a ``Joiner`` of backbone and position encoding) is
  ``backbone.body.*``; the learned position encoding ``backbone.1.{row,col}_embed`` is ``position.*``;
- Deformable-DETR's prediction heads: without box refinement the official model keeps one class head and one
  box head repeated in a ModuleList (``class_embed.{i}``, all the same tensors), detr_kit keeps one
  (``class_embed``, ``bbox_embed.layers.{j}``); with refinement / two-stage every decoder layer has its own;
- the refinement / two-stage heads that the official code also hangs on the decoder
  (``transformer.decoder.{bbox_embed,class_embed}.{i}``) alias the top-level heads. detr_kit's decoder holds
  the same modules under the same names, so the copies stay; they are checked to be equal, so that a
  checkpoint whose copies drifted apart is an error instead of a silent choice of one of them.

- DINO (IDEA-Research/DINO) keeps the encoder-proposal heads on the transformer
  (``transformer.enc_out_{class,bbox}_embed``); detr_kit keeps them as the last entry of the two-stage heads, as
  Deformable-DETR does (``class_embed.{D}``, aliased by ``transformer.decoder.class_embed.{D}``). Its decoder heads
  are one module repeated (``class_embed.{i}`` all the same tensors), which detr_kit shares as well
  (``model.deformable.share_heads``); ``label_enc`` is ``denoising.label_enc``.

The variant (DETR, DC5, R101, Deformable single-/multi-scale, +refine, +two-stage, DINO 4-/5-scale) is read from the
keys and shapes; ``detect_official_variant`` returns it as config overrides.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from detr_kit.structures import LabelMap

# COCO 2017 category ids -> names. The official checkpoints predict 91 "slots" (ids 0..90); ids missing here
# are unused slots ("N/A").
COCO_CATEGORY_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}  # fmt: skip
COCO_NUM_SLOTS = 91

# The official defaults the weights cannot tell (argparse defaults of both main.py files).
_DEFAULT_NUM_HEADS = 8
_DEFAULT_TWO_STAGE_QUERIES = 300
# ... and those of DINO's config/DINO/DINO_4scale.py.
_DINO_DEFAULTS = {"dn_number": 100, "dn_label_noise_ratio": 0.5, "dn_box_noise_scale": 0.4, "pe_temperatureH": 20}

_NUM = r"(\d+)"
_WB = r"(weight|bias)"

# (pattern, replacement) pairs; the replacement is a re.sub template or a function of the match.
Rule = tuple[re.Pattern, "str | Callable[[re.Match], str]"]


def _rules(*pairs: tuple[str, "str | Callable[[re.Match], str]"]) -> tuple[Rule, ...]:
    return tuple((re.compile(f"^{pattern}$"), repl) for pattern, repl in pairs)


_RULES: tuple[Rule, ...] = _rules(
    # backbone: torchvision ResNet names under the Joiner's first child
    (r"backbone\.0\.body\.(.+)", r"backbone.body.\1"),
    (r"backbone\.1\.(row_embed|col_embed)\.weight", r"position.\1.weight"),
    # DETR transformer (names identical)
    (rf"transformer\.(encoder|decoder)\.layers\.{_NUM}\.(self_attn|multihead_attn)\.(in_proj_weight|in_proj_bias)", r"\g<0>"),
    (rf"transformer\.(encoder|decoder)\.layers\.{_NUM}\.(self_attn|multihead_attn)\.out_proj\.{_WB}", r"\g<0>"),
    (rf"transformer\.(encoder|decoder)\.layers\.{_NUM}\.(linear1|linear2|norm1|norm2|norm3)\.{_WB}", r"\g<0>"),
    (rf"transformer\.decoder\.norm\.{_WB}", r"\g<0>"),
    # Deformable transformer (names identical)
    (r"transformer\.level_embed", r"\g<0>"),
    (rf"transformer\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.{_WB}", r"\g<0>"),
    (
        rf"transformer\.(encoder\.layers\.{_NUM}\.self_attn|decoder\.layers\.{_NUM}\.cross_attn)\."
        rf"(sampling_offsets|attention_weights|value_proj|output_proj)\.{_WB}",
        r"\g<0>",
    ),
    # detector top level
    (rf"(input_proj|class_embed)\.{_WB}", r"\g<0>"),
    (rf"input_proj\.{_NUM}\.(0|1)\.{_WB}", r"\g<0>"),
    (r"query_embed\.weight", r"\g<0>"),
    (rf"bbox_embed\.layers\.{_NUM}\.{_WB}", r"\g<0>"),
    (rf"class_embed\.{_NUM}\.{_WB}", r"\g<0>"),
    (rf"bbox_embed\.{_NUM}\.layers\.{_NUM}\.{_WB}", r"\g<0>"),
    # the decoder's handles on the refinement / two-stage heads (checked by _check_aliases)
    (rf"transformer\.decoder\.class_embed\.{_NUM}\.{_WB}", r"\g<0>"),
    (rf"transformer\.decoder\.bbox_embed\.{_NUM}\.layers\.{_NUM}\.{_WB}", r"\g<0>"),
    # DINO (names identical, but for the denoising label embedding)
    (rf"transformer\.decoder\.ref_point_head\.layers\.{_NUM}\.{_WB}", r"\g<0>"),
    (r"transformer\.(tgt_embed|refpoint_embed)\.weight", r"\g<0>"),
    (r"label_enc\.weight", r"denoising.label_enc.weight"),
)
# DINO's encoder-proposal heads, moved to the two-stage layout by _move_dino_encoder_heads before the rules apply.
_DINO_ENCODER_HEAD = re.compile(r"^transformer\.enc_out_(class_embed|bbox_embed)\.(.+)$")

# Keys the official code keeps twice (the decoder's handle on the refinement / two-stage heads).
_ALIAS = re.compile(r"^transformer\.decoder\.(bbox_embed|class_embed)\.(.+)$")
# Per-layer heads of the official Deformable-DETR (a ModuleList even when the layers share one head).
_LAYER_HEAD = re.compile(rf"^(class_embed|bbox_embed)\.{_NUM}\.(.+)$")


def coco_label_map() -> LabelMap:
    """COCO's label map in the official checkpoints' 91-slot layout: label == category id, "N/A" when unused."""
    return LabelMap.identity(COCO_CATEGORY_NAMES, COCO_NUM_SLOTS)


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a loaded checkpoint into its state dict and the training arguments stored beside it.

    Args:
        checkpoint: what ``torch.load`` returned: a state dict, or a dict holding one under ``model``
            (official training checkpoints also hold ``optimizer``, ``epoch`` and ``args``).

    Returns:
        (state dict of tensors, the ``args`` entry as a plain dict, empty when absent).

    Raises:
        TypeError: ``checkpoint`` is not a mapping, or its ``model`` entry is not one.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a mapping (state dict or dict with 'model'), got {type(checkpoint).__name__}")
    args: dict[str, Any] = {}
    state = checkpoint
    if "model" in checkpoint and not isinstance(checkpoint["model"], Tensor):
        state = checkpoint["model"]
        if not isinstance(state, Mapping):
            raise TypeError(f"the checkpoint's 'model' entry must be a state dict, got {type(state).__name__}")
        raw_args = checkpoint.get("args")
        if isinstance(raw_args, argparse.Namespace):
            args = dict(vars(raw_args))
        elif isinstance(raw_args, Mapping):
            args = dict(raw_args)
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}, args


def _resnet_name(state_dict: Mapping[str, Tensor], prefix: str) -> str:
    """Which torchvision ResNet the ``prefix``-ed keys describe (from block counts and block type)."""
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"layer3\.(\d+)\.", k))}
    if not blocks:
        raise ValueError(f"no ResNet weights under {prefix!r}; cannot tell the backbone")
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state_dict
    names = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}
    name = names.get((bottleneck, max(blocks) + 1))
    if name is None:
        raise ValueError(
            f"the backbone under {prefix!r} has {max(blocks) + 1} {'bottleneck' if bottleneck else 'basic'} blocks "
            "in layer3; supported: resnet18, resnet34, resnet50, resnet101"
        )
    return name


def _count_layers(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def is_dino_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are IDEA-Research/DINO's (anchor queries: the decoder's ``ref_point_head``)."""
    return any(k.startswith("transformer.decoder.ref_point_head.") for k in state_dict)


def _dino_overrides(state_dict: Mapping[str, Tensor], args: Mapping[str, Any], num_decoder_layers: int) -> dict[str, Any]:
    """The DINO options of a DINO checkpoint (what the weights cannot tell from ``args`` or DINO's defaults)."""
    def arg(name: str) -> Any:
        return args.get(name, _DINO_DEFAULTS[name])

    two_stage = "transformer.enc_output.weight" in state_dict
    extra_convs = sum(1 for k, v in state_dict.items() if re.fullmatch(r"input_proj\.\d+\.0\.weight", k) and v.shape[-1] == 3)
    levels = int(state_dict["transformer.level_embed"].shape[0])
    shared = all(
        torch.equal(state_dict[f"{head}.{i}.{param}"], state_dict[f"{head}.0.{param}"])
        for head, param in (("class_embed", "weight"), ("bbox_embed", "layers.0.weight"))
        for i in range(1, num_decoder_layers)
    )
    use_dn = "label_enc.weight" in state_dict and bool(args.get("use_dn", True))
    return {
        "model.deformable.num_backbone_levels": levels - extra_convs,
        "model.deformable.sine_temperature": float(arg("pe_temperatureH")),
        "model.deformable.sine_offset": 0.0,
        "model.deformable.dn_number": int(arg("dn_number")) if use_dn else 0,
        "model.deformable.dn_label_noise_ratio": float(arg("dn_label_noise_ratio")),
        "model.deformable.dn_box_noise_scale": float(arg("dn_box_noise_scale")),
        "model.deformable.mixed_query_selection": two_stage,
        "model.deformable.look_forward_twice": True,  # DINO's decoder always predicts from the undetached boxes
        "model.deformable.share_heads": shared,
        "model.deformable.decoder_norm": "transformer.decoder.norm.weight" in state_dict,
    }


def detect_official_variant(checkpoint: Mapping[str, Any], dilation: bool | None = None) -> dict[str, Any]:
    """Read the model variant of an official DETR / Deformable-DETR / DINO checkpoint from its keys and shapes.

    What the weights cannot tell (head count, DC5 dilation, two-stage proposal count, DINO's denoising settings and
    position temperature) comes from the checkpoint's ``args`` when it has them, else from the official defaults
    (8 heads, no dilation, 300 proposals; DINO-4scale's config).

    Args:
        checkpoint: a state dict or the raw ``torch.load`` dict with a ``model`` entry.
        dilation: DC5 or not; None = the checkpoint's ``args.dilation``, else False. DC5 weights have exactly
            the shapes of the plain model, so pass True for the ``*dc5*`` checkpoints without ``args``.

    Returns:
        Config overrides as dotted keys (``model.deformable`` (None for DETR) or ``model.deformable.*``,
        ``model.num_classes``, ``model.backbone.name``, ...),
        ready for :func:`overrides_to_strings` / ``Config.replace``.

    Raises:
        ValueError: the keys are not those of an official DETR or Deformable-DETR.
    """
    state_dict, args = unwrap_checkpoint(checkpoint)
    deformable = "transformer.level_embed" in state_dict
    dino = deformable and is_dino_state_dict(state_dict)
    if dino:
        state_dict = _move_dino_encoder_heads(state_dict)
    if not deformable and "transformer.decoder.norm.weight" not in state_dict:
        raise ValueError(
            "not an official DETR / Deformable-DETR state dict: neither 'transformer.level_embed' nor "
            f"'transformer.decoder.norm.weight' found (first keys: {sorted(state_dict)[:5]})"
        )
    num_heads = int(args.get("nheads", _DEFAULT_NUM_HEADS))
    if dilation is None:
        dilation = bool(args.get("dilation", False))
    encoder_linear = state_dict["transformer.encoder.layers.0.linear1.weight"]  # [F, C]
    overrides: dict[str, Any] = {
        "model.hidden_dim": int(encoder_linear.shape[1]),
        "model.num_heads": num_heads,
        "model.num_encoder_layers": _count_layers(state_dict, "transformer.encoder.layers."),
        "model.num_decoder_layers": _count_layers(state_dict, "transformer.decoder.layers."),
        "model.dim_feedforward": int(encoder_linear.shape[0]),
        "model.position_embedding": "learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
        "model.backbone.name": _resnet_name(state_dict, "backbone.0.body."),
        "model.backbone.dilation": dilation,
        "model.backbone.norm": "frozen_bn",
        "model.backbone.weights": None,
    }
    if not deformable:
        overrides["model.deformable"] = None
        overrides["model.num_classes"] = int(state_dict["class_embed.weight"].shape[0]) - 1  # last = no object
        overrides["model.num_queries"] = int(state_dict["query_embed.weight"].shape[0])
        return overrides

    num_levels = int(state_dict["transformer.level_embed"].shape[0])
    two_stage = "transformer.enc_output.weight" in state_dict
    box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state_dict)

    def points(prefix: str) -> int:
        rows = int(state_dict[f"{prefix}.attention_weights.weight"].shape[0])  # M * L * P
        if rows % (num_heads * num_levels):
            raise ValueError(
                f"{prefix}.attention_weights has {rows} rows, not a multiple of heads x levels = "
                f"{num_heads} x {num_levels}; pass the checkpoint with its 'args' (nheads)"
            )
        return rows // (num_heads * num_levels)

    if dino:
        num_queries = int(state_dict["transformer.tgt_embed.weight"].shape[0])
    elif two_stage:
        num_queries = int(args.get("num_queries", _DEFAULT_TWO_STAGE_QUERIES))
    else:
        num_queries = int(state_dict["query_embed.weight"].shape[0])
    if two_stage:
        overrides["model.deformable.num_proposals"] = num_queries
    overrides.update(
        {
            "model.num_classes": int(state_dict["class_embed.0.weight"].shape[0]),
            "model.num_queries": num_queries,
            "model.deformable.num_feature_levels": num_levels,
            "model.deformable.enc_points": points("transformer.encoder.layers.0.self_attn"),
            "model.deformable.dec_points": points("transformer.decoder.layers.0.cross_attn"),
            "model.deformable.box_refine": box_refine or two_stage,
            "model.deformable.two_stage": two_stage,
        }
    )
    if dino:
        overrides.update(_dino_overrides(state_dict, args, overrides["model.num_decoder_layers"]))
    return overrides


def overrides_to_strings(overrides: Mapping[str, Any]) -> list[str]:
    """``{"model.num_queries": 100}`` -> ``["model.num_queries=100"]`` for ``load_config`` / ``Config.replace``."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def rename_keys(state_dict: Mapping[str, Tensor], rules: tuple[Rule, ...], what: str) -> dict[str, Tensor]:
    """Rename every key by the first rule whose pattern matches it.

    Args:
        state_dict: key -> tensor.
        rules: (compiled full-key pattern, ``re`` template or function of the match) pairs.
        what: names the checkpoint in error messages.

    Raises:
        ValueError: listing every key no rule matches, or when two keys get the same new name.
    """
    renamed: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        for pattern, repl in rules:
            match = pattern.match(key)
            if match:
                new_key = repl(match) if callable(repl) else match.expand(repl)
                if new_key in renamed:
                    raise ValueError(f"{what}: two keys map to {new_key!r} (the second is {key!r})")
                renamed[new_key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} unknown key(s), no conversion rule matches: {sorted(unknown)}")
    return renamed


def _move_dino_encoder_heads(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """DINO's ``transformer.enc_out_{class,bbox}_embed.*`` as the two-stage layout's last heads: ``{head}.{D}.*`` and
    the decoder's handle ``transformer.decoder.{head}.{D}.*`` (one tensor under both names); other keys unchanged."""
    num_layers = _count_layers(state_dict, "transformer.decoder.layers.")
    moved: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        match = _DINO_ENCODER_HEAD.match(key)
        if match is None:
            moved[key] = value
            continue
        head, rest = match.groups()
        for name in (f"{head}.{num_layers}.{rest}", f"transformer.decoder.{head}.{num_layers}.{rest}"):
            if name in state_dict:
                raise ValueError(f"DINO checkpoint: both {key!r} and {name!r} are present")
            moved[name] = value
    return moved


def _check_aliases(state_dict: Mapping[str, Tensor], what: str) -> None:
    """Check that ``transformer.decoder.{bbox,class}_embed.*`` equal the top-level heads they alias."""
    for key in list(state_dict):
        match = _ALIAS.match(key)
        if match is None:
            continue
        target = f"{match.group(1)}.{match.group(2)}"
        if target not in state_dict:
            raise ValueError(f"{what}: {key!r} aliases {target!r}, which the checkpoint lacks")
        if not torch.equal(state_dict[key], state_dict[target]):
            raise ValueError(f"{what}: {key!r} should be the same tensor as {target!r} but the values differ")


def _fold_shared_heads(state_dict: dict[str, Tensor], what: str) -> None:
    """Turn the official ModuleList of one shared head (``class_embed.{i}``) into a single head."""
    per_layer: dict[str, dict[int, Tensor]] = {}
    for key in list(state_dict):
        match = _LAYER_HEAD.match(key)
        if match is None:
            continue
        per_layer.setdefault(f"{match.group(1)}.{match.group(3)}", {})[int(match.group(2))] = state_dict.pop(key)
    for key, layers in per_layer.items():
        first = layers[min(layers)]
        for index, value in layers.items():
            if not torch.equal(value, first):
                raise ValueError(
                    f"{what}: without box refinement every decoder layer shares one head, but "
                    f"{key.split('.')[0]}.{index} differs from {key.split('.')[0]}.{min(layers)}"
                )
        state_dict[key] = first


def convert_official_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """Convert an official DETR / Deformable-DETR checkpoint to detr_kit key names.

    Covers DETR (R50, R101, DC5), Deformable-DETR single- and multi-scale, with box refinement and two-stage, and
    DINO (4- and 5-scale).

    Args:
        checkpoint: the state dict, or the raw ``torch.load`` dict holding it under ``model``.

    Returns:
        A state dict that loads strictly into the detr_kit model built from the config of
        ``detect_official_variant(checkpoint)``. Tensors are shared with the input, not copied.

    Raises:
        ValueError: listing keys that no rule knows, or aliased / shared heads whose copies differ.
    """
    state_dict, _ = unwrap_checkpoint(checkpoint)
    what = "official checkpoint"
    if is_dino_state_dict(state_dict):
        state_dict = _move_dino_encoder_heads(state_dict)
    # num_batches_tracked is a BatchNorm counter that frozen batch norm has no use for
    state_dict = {k: v for k, v in state_dict.items() if not (k.startswith("backbone.") and k.endswith("num_batches_tracked"))}
    converted = rename_keys(state_dict, _RULES, what)
    _check_aliases(converted, what)
    refine = "transformer.level_embed" in converted and (
        "transformer.enc_output.weight" in converted
        or any(k.startswith("transformer.decoder.bbox_embed.") for k in state_dict)
    )
    if not refine:
        _fold_shared_heads(converted, what)
    return converted


__all__ = [
    "COCO_CATEGORY_NAMES",
    "COCO_NUM_SLOTS",
    "coco_label_map",
    "convert_official_checkpoint",
    "detect_official_variant",
    "is_dino_state_dict",
    "overrides_to_strings",
    "rename_keys",
    "unwrap_checkpoint",
]
