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

from official_keys import (
    DINO_VARIANTS,
    VARIANTS,
    DinoVariant,
    Variant,
    dino_parameter_count,
    dino_shapes,
    dino_shared_groups,
    official_shapes,
    shared_groups,
)

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


def dino_state_dict(v: DinoVariant, device: str = "meta") -> dict[str, torch.Tensor]:
    """A state dict in IDEA-Research/DINO's layout: the shared decoder heads one tensor under all their names."""
    shapes = dino_shapes(v)
    generator = torch.Generator().manual_seed(0)
    make = (lambda s: torch.empty(s, device="meta")) if device == "meta" else (lambda s: torch.randn(s, generator=generator))
    state = {k: make(s) for k, s in shapes.items()}
    for group in dino_shared_groups(v):
        value = torch.randn(shapes[group[0]], generator=generator)
        for key in group:
            state[key] = value
    for key in [k for k in shapes if k.startswith(("transformer.enc_out_", "label_enc"))]:
        state[key] = torch.randn(shapes[key], generator=generator)  # real values: checked after the move
    return state


@pytest.mark.parametrize("variant", DINO_VARIANTS, ids=[v.name for v in DINO_VARIANTS])
def test_dino_checkpoint_converts_and_loads_strictly(variant: DinoVariant) -> None:
    state = dino_state_dict(variant)
    checkpoint = {"model": state}
    assert detect_checkpoint_format(checkpoint) == "official"
    overrides = detect_official_variant(checkpoint)
    expected = {
        "model.num_classes": 91, "model.num_queries": 900, "model.hidden_dim": 256, "model.dim_feedforward": 2048,
        "model.deformable.num_feature_levels": variant.num_feature_levels,
        "model.deformable.num_backbone_levels": variant.num_backbone_levels,
        "model.deformable.two_stage": True, "model.deformable.box_refine": True,
        "model.deformable.mixed_query_selection": True, "model.deformable.look_forward_twice": True,
        "model.deformable.share_heads": True, "model.deformable.decoder_norm": True,
        "model.deformable.dn_number": 100, "model.deformable.sine_temperature": 20.0,
    }
    assert {k: overrides[k] for k in expected} == expected
    converted = convert_official_checkpoint(checkpoint)
    model = build_detected(checkpoint)
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert converted["denoising.label_enc.weight"] is state["label_enc.weight"]
    # DINO's encoder-proposal heads become the two-stage layout's last heads (index D)
    last = variant.num_layers
    assert converted[f"class_embed.{last}.weight"] is state["transformer.enc_out_class_embed.weight"]
    assert converted[f"bbox_embed.{last}.layers.2.bias"] is state["transformer.enc_out_bbox_embed.layers.2.bias"]


@pytest.mark.parametrize("variant,config", zip(DINO_VARIANTS, ("dino_r50_4scale.yaml", "dino_r50_5scale.yaml")),
                         ids=[v.name for v in DINO_VARIANTS])
def test_dino_configs_have_the_reference_parameter_count(variant: DinoVariant, config: str) -> None:
    """The recipe configs build DINO's model: its parameter count, from the released layout (every tensor once,
    frozen batch norm not counted), is the paper's 47M (46,893,182 for 4-scale, 47,255,806 for 5-scale)."""
    cfg = load_config(CONFIG.with_name(config), ["model.num_classes=91", "model.backbone.weights=null"])
    with torch.device("meta"):
        model = build_model(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == dino_parameter_count(variant)
    assert count == {"dino_4scale": 46_893_182, "dino_5scale": 47_255_806}[variant.name]
    assert round(count / 1e6) == 47


def test_dino_checkpoint_through_convert_tool_and_init_from(tmp_path: Path) -> None:
    """A small DINO in the official layout (real values) -> tools/convert.py -> a strict load; and the same file as
    train.init_from loads every tensor (class heads and label embedding re-initialised for 3 classes)."""
    import importlib.util

    from detr_kit.config import config_from_dict
    from detr_kit.engine.setup import load_init_weights

    spec = importlib.util.spec_from_file_location("convert_tool", CONFIG.parents[1] / "tools" / "convert.py")
    convert_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_tool)
    small = DinoVariant("dino_small", hidden_dim=64, num_layers=2, num_queries=30, dim_feedforward=128)
    state = dino_state_dict(small, device="cpu")
    source = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": state, "args": {"nheads": 8}}, source)
    assert convert_tool.main([str(source), "--out", str(tmp_path / "dino.pth")]) == 0

    converted = torch.load(tmp_path / "dino.pth", weights_only=True)
    cfg = config_from_dict(converted["config"])
    d = cfg.model.deformable
    assert (d.dn_number, d.mixed_query_selection, d.look_forward_twice, d.share_heads, d.decoder_norm) == (100, True, True, True, True)
    assert (cfg.model.num_queries, cfg.model.hidden_dim, cfg.model.num_decoder_layers) == (30, 64, 2)
    model = build_model(cfg)
    model.load_state_dict(converted["model"], strict=True)
    torch.testing.assert_close(model.denoising.label_enc.weight, state["label_enc.weight"])
    torch.testing.assert_close(model.transformer.tgt_embed.weight, state["transformer.tgt_embed.weight"])

    fresh = build_model(cfg.replace(["model.num_classes=3"]))
    report = load_init_weights(fresh, source, trusted=False)
    assert "denoising.label_enc.weight" in report.reinitialized and "class_embed.0.weight" in report.reinitialized
    assert not report.mismatched and not report.unexpected
    torch.testing.assert_close(fresh.transformer.decoder.ref_point_head.layers[0].weight,
                               state["transformer.decoder.ref_point_head.layers.0.weight"])
