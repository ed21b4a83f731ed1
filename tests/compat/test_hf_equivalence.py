"""Hugging Face DETR / Deformable-DETR weights, converted, give the same detections in detr_kit.

Small models with random weights (no download: HF_HUB_OFFLINE, use_pretrained_backbone=False). The reference
is the transformers implementation itself, run on the same padded batch of two images.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from detr_kit import load_config
from detr_kit.build import build_model
from detr_kit.compat import (
    convert_hf_checkpoint,
    detect_checkpoint_format,
    detect_hf_variant,
    load_pretrained,
    overrides_to_strings,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detr_r50.yaml"
SMALL = dict(
    d_model=64,
    encoder_layers=1,
    decoder_layers=2,  # transformers' tied-head bookkeeping needs >= 2 decoder layers for Deformable-DETR
    encoder_ffn_dim=96,
    decoder_ffn_dim=96,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_labels=5,
    use_pretrained_backbone=False,
)


def hf_resnet18_config():
    """transformers' own ResNet (use_timm_backbone=False) with torchvision resnet18's layout."""
    return transformers.ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], embedding_size=64,
        out_features=["stage4"],
    )  # fmt: skip


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter and statistic a value that matters (the HF init leaves zeros and ones around).

    Tied parameters are one object, so ties survive.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        fan_in = param[0].numel() if param.ndim > 1 else 1
        scale = 1.0 / fan_in**0.5 if param.ndim > 1 else 0.1
        param.copy_(torch.randn(param.shape, generator=generator) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    for name, buffer in model.named_buffers():
        if name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
        elif name.endswith("running_mean") or (name.endswith(".bias") and "backbone" in name):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
        elif name.endswith(".weight") and "backbone" in name:  # frozen BN scale
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)


def batch(seed: int = 0, size: tuple[int, int] = (128, 128), valid: tuple[tuple[int, int], ...] = ((128, 128), (64, 100))):
    """Two images padded to ``size``; image i is ``valid[i]`` (h, w) with zero padding.

    The default sizes keep every level's mask the same however it is derived; the 321 x 390 batch of
    ``PADDED_321x390`` does not: there the stride-64 level's mask must be the image mask resized with nearest
    interpolation (the reference code and Hugging Face), not every other entry of the C5 mask.
    """
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *size, generator=generator)
    pixel_mask = torch.zeros(2, *size, dtype=torch.long)  # HF: 1 = real pixel
    for index, (height, width) in enumerate(valid):
        pixel_mask[index, :height, :width] = 1
    images *= pixel_mask[:, None]
    return images, pixel_mask


PADDED_321x390 = dict(size=(321, 390), valid=((280, 390), (321, 300)))


def compare(hf_model: torch.nn.Module, hf_config, **batch_kwargs) -> None:
    hf_model.eval()
    state = hf_model.state_dict()
    assert detect_checkpoint_format(state) == "hf"
    overrides = detect_hf_variant(state, hf_config.to_dict())
    model = build_model(load_config(CONFIG, overrides_to_strings(overrides))).eval()
    model.load_state_dict(convert_hf_checkpoint(state), strict=True)
    images, pixel_mask = batch(**batch_kwargs)
    with torch.no_grad():
        expected = hf_model(pixel_values=images, pixel_mask=pixel_mask)
        actual = model(images, ~pixel_mask.bool())  # detr_kit: True = padding
    # the comparison is meaningful only if the outputs vary between queries and images
    assert expected.pred_boxes.std() > 1e-2 and (expected.logits[0] - expected.logits[1]).abs().max() > 1e-2
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(actual.boxes, expected.pred_boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("timm_backbone", [True, False], ids=["timm_resnet18", "hf_resnet18"])
def test_detr_matches_hugging_face(timm_backbone: bool) -> None:
    torch.manual_seed(0)
    if timm_backbone:
        config = transformers.DetrConfig(backbone="resnet18", use_timm_backbone=True, num_queries=12, **SMALL)
    else:
        config = transformers.DetrConfig(backbone_config=hf_resnet18_config(), use_timm_backbone=False, num_queries=12, **SMALL)
    hf_model = transformers.DetrForObjectDetection(config)
    randomize(hf_model, seed=1)
    compare(hf_model, config)


@pytest.mark.parametrize("padding", [{}, PADDED_321x390], ids=["padded_128", "padded_321x390"])
@pytest.mark.parametrize(
    "variant",
    [dict(), dict(with_box_refine=True), dict(with_box_refine=True, two_stage=True)],
    ids=["multi_scale", "refine", "two_stage"],
)
def test_deformable_detr_matches_hugging_face(variant: dict, padding: dict) -> None:
    torch.manual_seed(0)
    config = transformers.DeformableDetrConfig(
        backbone="resnet18", use_timm_backbone=True, num_queries=12, two_stage_num_proposals=12,
        num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, **SMALL, **variant,
    )  # fmt: skip
    hf_model = transformers.DeformableDetrForObjectDetection(config)
    randomize(hf_model, seed=2)
    compare(hf_model, config, **padding)


def test_untied_copies_and_unknown_keys_are_errors() -> None:
    config = transformers.DeformableDetrConfig(
        backbone="resnet18", use_timm_backbone=True, num_queries=12, with_box_refine=True, **SMALL
    )
    state = dict(transformers.DeformableDetrForObjectDetection(config).state_dict())
    state["model.decoder.bbox_embed.1.layers.0.weight"] = state["model.decoder.bbox_embed.1.layers.0.weight"] + 1
    with pytest.raises(ValueError, match="values differ"):
        convert_hf_checkpoint(state)
    with pytest.raises(ValueError, match="unknown key.*model.encoder.surprise"):
        convert_hf_checkpoint({**state, "model.encoder.surprise": torch.zeros(1)})


def test_load_pretrained_reads_a_save_pretrained_folder(tmp_path: Path) -> None:
    config = transformers.DetrConfig(backbone="resnet18", use_timm_backbone=True, num_queries=12, **SMALL)
    hf_model = transformers.DetrForObjectDetection(config)
    randomize(hf_model, seed=3)
    hf_model.save_pretrained(tmp_path)
    overrides = detect_hf_variant(hf_model.state_dict(), config.to_dict())
    model = build_model(load_config(CONFIG, overrides_to_strings(overrides)))
    report = load_pretrained(model, tmp_path, log=None)
    assert report.source_format == "hf"
    assert not (report.missing or report.unexpected or report.mismatched or report.reinitialized)
    torch.testing.assert_close(model.query_embed.weight, hf_model.model.query_position_embeddings.weight)
