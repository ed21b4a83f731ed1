"""DeformableDETR: reference parameter counts, key names, head init, exact padding, bf16 autocast, overfitting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from detr_kit.build import build_criterion, build_model
from detr_kit.config import load_config
from detr_kit.models.deformable import MSDeformAttn
from detr_kit.structures import Target
from tiny_models import TINY_DEFORMABLE

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = TINY_DEFORMABLE


def build(name: str, overrides: list[str]):
    cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
    return cfg, build_model(cfg)


@pytest.mark.parametrize(
    "name,extra,expected",
    [
        ("deformable_detr", [], 40_069_665),
        ("deformable_detr_refine", [], 40_849_660),
        ("deformable_detr_two_stage", [], 41_181_529),
        ("deformable_detr", ["model.deformable.num_feature_levels=1"], 34_066_593),
    ],
    ids=["plain", "refine", "two_stage", "single_scale"],
)
def test_parameter_counts_match_reference(name, extra, expected):
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        _, model = build(name, ["model.num_classes=91", "model.backbone.weights=null", *extra])
    assert sum(p.numel() for p in model.parameters()) == expected


def test_reference_key_names_and_head_init():
    _, plain = build("deformable_detr", [*TINY, "model.deformable.num_feature_levels=4"])
    keys = set(plain.state_dict())
    for key in [
        "transformer.level_embed",
        "transformer.reference_points.weight",
        "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.0.self_attn.attention_weights.bias",
        "transformer.encoder.layers.0.self_attn.value_proj.weight",
        "transformer.encoder.layers.0.self_attn.output_proj.weight",
        "transformer.encoder.layers.0.norm2.weight",
        "transformer.decoder.layers.1.cross_attn.sampling_offsets.bias",
        "transformer.decoder.layers.0.self_attn.in_proj_weight",
        "transformer.decoder.layers.0.self_attn.out_proj.weight",
        "transformer.decoder.layers.0.norm3.bias",
        "input_proj.0.0.weight",
        "input_proj.3.1.bias",
        "query_embed.weight",
        "class_embed.weight",
        "bbox_embed.layers.2.weight",
        "backbone.body.layer4.0.conv1.weight",
    ]:
        assert key in keys, key
    assert plain.query_embed.weight.shape == (20, 128)
    torch.testing.assert_close(plain.class_embed.bias, torch.full((3,), -math.log(99.0)))
    assert plain.bbox_embed.layers[2].weight.abs().sum() == 0
    torch.testing.assert_close(plain.bbox_embed.layers[2].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert plain.input_proj[2][0].kernel_size == (1, 1) and plain.input_proj[2][0].in_channels == 512
    assert plain.input_proj[3][0].kernel_size == (3, 3) and plain.input_proj[3][0].stride == (2, 2)
    assert plain.input_proj[3][0].in_channels == 512  # the first extra level convolves C5

    _, refine = build("deformable_detr_refine", TINY)
    assert len(refine.class_embed) == 2 and refine.class_embed[0] is not refine.class_embed[1]
    torch.testing.assert_close(refine.bbox_embed[0].layers[2].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    torch.testing.assert_close(refine.bbox_embed[1].layers[2].bias, torch.zeros(4))
    assert refine.transformer.decoder.bbox_embed[1] is refine.bbox_embed[1]  # the decoder owns the same heads

    _, two_stage = build("deformable_detr_two_stage", TINY)
    keys = set(two_stage.state_dict())
    assert len(two_stage.class_embed) == 3 and len(two_stage.bbox_embed) == 3
    for key in ["transformer.enc_output.weight", "transformer.enc_output_norm.weight", "transformer.pos_trans.weight",
                "transformer.pos_trans_norm.bias", "class_embed.2.weight", "bbox_embed.2.layers.0.weight"]:
        assert key in keys, key
    assert "query_embed.weight" not in keys and "transformer.reference_points.weight" not in keys
    assert all(head.layers[2].bias.abs().sum() == 0 for head in two_stage.bbox_embed)


def test_single_scale_uses_c5_only():
    _, model = build("deformable_detr", [*TINY, "model.deformable.num_feature_levels=1"])
    assert len(model.input_proj) == 1 and model.input_proj[0][0].in_channels == 512
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 20, 3) and out.boxes.shape == (1, 20, 4)


@pytest.mark.parametrize("name", ["deformable_detr", "deformable_detr_refine", "deformable_detr_two_stage"])
def test_exact_padding_makes_outputs_independent_of_the_batch(name):
    torch.manual_seed(0)
    _, model = build(name, [*TINY, "model.deformable.num_feature_levels=4"])
    for module in model.modules():  # offsets that depend on the input reach across the image
        if isinstance(module, MSDeformAttn):
            torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)
    model.eval()
    image = torch.randn(1, 3, 70, 90)
    other = torch.randn(1, 3, 96, 112)
    batch = torch.zeros(2, 3, 96, 112)
    batch[0, :, :70, :90] = image[0]
    batch[1] = other[0]
    mask = torch.ones(2, 96, 112, dtype=torch.bool)
    mask[0, :70, :90] = False
    mask[1] = False
    with torch.no_grad():
        alone = model(image, exact_padding=True)
        batched = model(batch, mask, exact_padding=True)
    torch.testing.assert_close(batched.logits[:1], alone.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched.boxes[:1], alone.boxes, atol=1e-4, rtol=0)
    for (bl, bb), (al, ab) in zip(batched.aux, alone.aux):
        torch.testing.assert_close(bl[:1], al, atol=1e-4, rtol=0)
        torch.testing.assert_close(bb[:1], ab, atol=1e-4, rtol=0)


def _targets():
    return [
        Target(torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]), torch.tensor([0, 2])),
        Target(torch.tensor([[0.5, 0.5, 0.4, 0.4]]), torch.tensor([1])),
    ]


def test_bf16_autocast_forward_backward_is_finite():
    cfg, model = build("deformable_detr_two_stage", TINY)
    criterion = build_criterion(cfg)
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        loss = criterion(out, _targets())
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(loss.loss)
    loss.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    cfg, model = build("deformable_detr_two_stage", TINY)
    criterion = build_criterion(cfg)
    images = torch.randn(2, 3, 96, 96)
    for b, target in enumerate(_targets()):  # bright boxes on a noisy background
        for (cx, cy, w, h), label in zip(target.boxes.tolist(), target.labels.tolist()):
            x0, y0, x1, y1 = int((cx - w / 2) * 96), int((cy - h / 2) * 96), int((cx + w / 2) * 96), int((cy + h / 2) * 96)
            images[b, label, y0:y1, x0:x1] += 3.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    losses = []
    for _ in range(50):
        loss = criterion(model(images), _targets()).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 2:
            break
    assert losses[-1] < losses[0] / 2, losses


@pytest.mark.parametrize("name", ["deformable_detr", "deformable_detr_two_stage"])
def test_extra_level_masks_follow_the_reference_on_padded_batches(name):
    """The stride-64 level's mask is the image mask resized with nearest interpolation (the reference code's
    formulation, written out here), on a padded batch whose size is no multiple of 64 (321 x 390)."""
    import torch.nn.functional as F

    _, model = build(name, [*TINY, "model.deformable.num_feature_levels=4", "model.backbone.norm=frozen_bn"])
    model = model.double().eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 321, 390, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 321, 390, dtype=torch.bool)
    mask[0, :280, :390] = False
    mask[1, :321, :300] = False
    images = images.masked_fill(mask[:, None], 0.0)
    with torch.no_grad():
        got = model(images, mask)
        # The reference: backbone levels, then each extra level from a stride-2 conv, its mask the image mask
        # resized to the level's size (nearest), GroupNorm over the whole map.
        features = model.backbone(images, mask)
        srcs = [projection(f.features) for projection, f in zip(model.input_proj, features)]
        masks = [f.mask for f in features]
        for index in range(len(features), 4):
            srcs.append(model.input_proj[index](features[-1].features if index == len(features) else srcs[-1]))
            masks.append(F.interpolate(mask[None].float(), size=srcs[-1].shape[-2:])[0].bool())
        expected = model.forward_levels(srcs, masks)
    # the case is one where subsampling the C5 mask would give another mask
    assert not torch.equal(masks[-1], masks[-2][:, ::2, ::2])
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.boxes, expected.boxes, atol=1e-5, rtol=0)
