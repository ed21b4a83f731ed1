"""Official DETR / Deformable-DETR checkpoints convert to detr_kit with no missing or unexpected keys.

The official layouts come from tests/compat/official_keys.py (written from the reference code). The models are
built on the meta device, so even the full-size R101 variants cost no memory and little time; strict loading
still checks every name and shape.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_kit import load_config
from detr_kit.build import build_model
from detr_kit.compat import (
    convert_official_checkpoint,
    detect_checkpoint_format,
    detect_official_variant,
    overrides_to_strings,
)
from detr_kit.compat.official import COCO_CATEGORY_NAMES, coco_label_map

from official_keys import VARIANTS, Variant, official_shapes, shared_groups

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detr_r50.yaml"


def official_state_dict(v: Variant) -> dict[str, torch.Tensor]:
    """Meta tensors for the bulk; real, distinct values for the heads that the reference code shares."""
    shapes = official_shapes(v)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    generator = torch.Generator().manual_seed(0)
    for group in shared_groups(v):
        value = torch.randn(shapes[group[0]], generator=generator)
        for key in group:
            state[key] = value  # the same module reached twice: one tensor under both names
    for key in ("class_embed.weight", "class_embed.bias") if v.arch == "detr" else ():
        state[key] = torch.randn(shapes[key], generator=generator)
    return state


def build_detected(checkpoint: dict) -> torch.nn.Module:
    overrides = detect_official_variant(checkpoint)
    cfg = load_config(CONFIG, overrides_to_strings(overrides))
    with torch.device("meta"):
        return build_model(cfg)


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_official_checkpoint_converts_and_loads_strictly(variant: Variant) -> None:
    state = official_state_dict(variant)
    checkpoint = {"model": state, "args": {"dilation": variant.dilation}}
    assert detect_checkpoint_format(checkpoint) == "official"

    overrides = detect_official_variant(checkpoint)
    expected = {
        "model.backbone.name": variant.backbone,
        "model.backbone.dilation": variant.dilation,
        "model.num_classes": variant.num_classes,
        "model.num_queries": variant.num_queries,
        "model.hidden_dim": variant.hidden_dim,
        "model.dim_feedforward": variant.dim_feedforward,
        "model.num_encoder_layers": variant.num_layers,
        "model.num_decoder_layers": variant.num_layers,
    }
    if variant.arch == "deformable_detr":
        expected.update(
            {
                "model.deformable.num_feature_levels": variant.num_feature_levels,
                "model.deformable.box_refine": variant.box_refine,
                "model.deformable.two_stage": variant.two_stage,
                "model.deformable.enc_points": variant.num_points,
                "model.deformable.dec_points": variant.num_points,
            }
        )
    else:
        expected["model.deformable"] = None
    assert {k: overrides[k] for k in expected} == expected

    converted = convert_official_checkpoint(checkpoint)
    model = build_detected(checkpoint)
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys

    # values land under the right names (the tensors are passed through, not copied)
    deepest = max(k for k in state if k.startswith("backbone.0.body.layer3."))
    assert converted[deepest.replace("backbone.0.body.", "backbone.body.")] is state[deepest]
    if variant.arch == "detr":
        assert converted["class_embed.weight"] is state["class_embed.weight"]
    elif variant.box_refine:  # one head per prediction; the decoder's handles on them kept (detr_kit has them too)
        last = variant.num_layers if variant.two_stage else variant.num_layers - 1
        assert converted[f"class_embed.{last}.weight"] is state[f"class_embed.{last}.weight"]
        alias = f"transformer.decoder.bbox_embed.{last}.layers.2.bias"
        assert converted[alias] is state[alias]
    else:  # the repeated shared head folded into one
        assert converted["class_embed.weight"] is state["class_embed.0.weight"]
        assert "class_embed.1.weight" not in converted


def test_unknown_and_inconsistent_keys_are_errors() -> None:
    variant = next(v for v in VARIANTS if v.name == "deformable_refine")
    state = official_state_dict(variant)
    with pytest.raises(ValueError, match="unknown key.*transformer.encoder.extra.weight"):
        convert_official_checkpoint({**state, "transformer.encoder.extra.weight": torch.zeros(1)})
    alias = "transformer.decoder.bbox_embed.2.layers.0.weight"
    broken = {**state, alias: state[alias] + 1}
    with pytest.raises(ValueError, match="values differ"):
        convert_official_checkpoint(broken)
    shared = official_state_dict(next(v for v in VARIANTS if v.name == "deformable_multi_scale"))
    shared["class_embed.3.bias"] = shared["class_embed.3.bias"] + 1
    with pytest.raises(ValueError, match="class_embed.3 differs"):
        convert_official_checkpoint(shared)


def test_num_batches_tracked_is_dropped() -> None:
    variant = VARIANTS[0]
    state = official_state_dict(variant)
    state["backbone.0.body.layer1.0.downsample.1.num_batches_tracked"] = torch.tensor(5)
    converted = convert_official_checkpoint(state)
    assert not any(k.endswith("num_batches_tracked") for k in converted)


def test_coco_label_map_matches_the_annotation_file() -> None:
    import json

    annotations = Path(__file__).resolve().parents[2] / "data" / "coco128" / "annotations" / "instances_val.json"
    categories = {c["id"]: c["name"] for c in json.loads(annotations.read_text())["categories"]}
    assert COCO_CATEGORY_NAMES == categories
    label_map = coco_label_map()
    assert len(label_map) == 91 and label_map.category_ids == tuple(range(91))
    assert label_map.names[1] == "person" and label_map.names[90] == "toothbrush" and label_map.names[12] == "N/A"
