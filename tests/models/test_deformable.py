"""MSDeformAttn and DeformableTransformer: initialisation, offset normalisation, masks and padding invariance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detr_kit.models.deformable import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    DeformableTransformer,
    FeatureLevels,
    MSDeformAttn,
    pixel_grid,
    valid_ratios,
)
from detr_kit.models.deformable_detr import DeformableDETR
from detr_kit.models.heads import deformable_heads, inverse_sigmoid
from detr_kit.models.position import SinePositionEncoding
from references import bilinear_reference


def test_msdeformattn_reference_initialisation():
    heads, levels, points = 8, 4, 4
    attn = MSDeformAttn(256, levels, heads, points)
    bias = attn.sampling_offsets.bias.view(heads, levels, points, 2)
    for m in range(heads):
        angle = 2 * math.pi * m / heads
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for p in range(points):
            expected = direction * (p + 1)
            for level in range(levels):
                torch.testing.assert_close(bias[m, level, p], expected)
    # head 1 points at 45 degrees: (1, 1) scaled by the point index
    torch.testing.assert_close(bias[1, 0, 2], torch.tensor([3.0, 3.0]))
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0
    limit = math.sqrt(6 / (256 + 256))  # xavier uniform bound
    assert attn.value_proj.weight.abs().max() <= limit and attn.output_proj.weight.abs().max() <= limit


def test_msdeformattn_errors():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(30, 2, 8, 4)
    attn = MSDeformAttn(16, 2, 2, 2)
    query, value = torch.randn(1, 3, 16), torch.randn(1, 20, 16)
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, torch.rand(1, 3, 2, 3), value, [(4, 4), (2, 2)])
    with pytest.raises(ValueError, match="levels"):
        attn(query, torch.rand(1, 3, 3, 2), value, [(4, 4), (2, 2)])


def _plain_msdeformattn(attn: MSDeformAttn, query, reference_points, value_input, shapes, padding_mask):
    """The module's formula written out: projections, softmax, offset normalisation, explicit bilinear sampling."""
    batch, num_queries, _ = query.shape
    heads, levels, points = attn.num_heads, attn.num_levels, attn.num_points
    value = attn.value_proj(value_input).masked_fill(padding_mask[..., None], 0.0).view(batch, -1, heads, 16 // heads)
    offsets = attn.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
    weights = attn.attention_weights(query).view(batch, num_queries, heads, levels * points).softmax(-1)
    weights = weights.view(batch, num_queries, heads, levels, points)
    locations = torch.zeros(batch, num_queries, heads, levels, points, 2, dtype=query.dtype)
    for level, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            ref = reference_points[:, :, level, axis][:, :, None, None]  # [B, Q, 1, 1]
            if reference_points.shape[-1] == 2:
                locations[..., level, :, axis] = ref + offsets[..., level, :, axis] / size
            else:
                extent = reference_points[:, :, level, 2 + axis][:, :, None, None]
                locations[..., level, :, axis] = ref + offsets[..., level, :, axis] / points * extent * 0.5
    return attn.output_proj(bilinear_reference(value, shapes, locations, weights))


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_msdeformattn_matches_plain_formula(reference_dim):
    torch.manual_seed(0)
    attn = MSDeformAttn(16, 2, 2, 3).double()
    for module in (attn.sampling_offsets, attn.attention_weights):  # move away from the zero init
        nn.init.normal_(module.weight, std=0.3)
    shapes = [(5, 7), (3, 2)]
    query = torch.randn(2, 4, 16, dtype=torch.float64)
    value_input = torch.randn(2, 41, 16, dtype=torch.float64)
    reference = torch.rand(2, 4, 2, reference_dim, dtype=torch.float64)
    padding_mask = torch.rand(2, 41) < 0.2
    out = attn(query, reference, value_input, shapes, padding_mask)
    expected = _plain_msdeformattn(attn, query, reference, value_input, shapes, padding_mask)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_padding_mask_hides_values():
    torch.manual_seed(0)
    attn = MSDeformAttn(16, 1, 2, 4)
    nn.init.normal_(attn.sampling_offsets.weight, std=1.0)
    query, value = torch.randn(1, 5, 16), torch.randn(1, 36, 16)
    mask = torch.zeros(1, 36, dtype=torch.bool)
    mask[0, 18:] = True
    reference = torch.rand(1, 5, 1, 2)
    out = attn(query, reference, value, [(6, 6)], mask)
    changed = value.clone()
    changed[0, 18:] = 100.0
    torch.testing.assert_close(attn(query, reference, changed, [(6, 6)], mask), out)
    assert not torch.allclose(attn(query, reference, changed, [(6, 6)], None), out)


def test_inverse_sigmoid():
    x = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    expected = torch.log(torch.tensor([1e-5, 0.25, 1.0, 9.0, 1 / 1e-5]))
    torch.testing.assert_close(inverse_sigmoid(x), expected)


class _NoBackbone(nn.Module):
    """Stands in for a backbone in tests that feed projected levels directly."""

    channels = (32, 32, 32)


def tiny_transformer(levels: int = 2, box_refine: bool = False, two_stage: bool = False, num_classes: int = 5,
                     decoder_layers: int = 2) -> tuple[DeformableTransformer, nn.Module, nn.Module]:
    """A DeformableTransformer of width 32 and its heads (class_embed, bbox_embed)."""
    class_embed, bbox_embed = deformable_heads(32, num_classes, decoder_layers, box_refine, two_stage)
    encoder = DeformableEncoder(DeformableEncoderLayer(32, 64, levels, 2, 2, dropout=0.0), 1)
    decoder = DeformableDecoder(
        DeformableDecoderLayer(32, 64, levels, 2, 2, dropout=0.0), decoder_layers,
        bbox_embed=bbox_embed if box_refine else None, class_embed=class_embed if two_stage else None,
    )
    return DeformableTransformer(encoder, decoder, two_stage=two_stage, num_proposals=8), class_embed, bbox_embed


def tiny_detector(box_refine: bool, two_stage: bool, levels: int = 3) -> DeformableDETR:
    torch.manual_seed(0)
    transformer, class_embed, bbox_embed = tiny_transformer(levels, box_refine, two_stage)
    model = DeformableDETR(
        _NoBackbone(), FeatureLevels(_NoBackbone.channels, 32, levels), SinePositionEncoding(16, normalize=True, offset=-0.5),
        transformer, class_embed, bbox_embed, num_queries=8,
    )
    for module in model.modules():  # make offsets and attention weights depend on the input
        if isinstance(module, MSDeformAttn):
            nn.init.normal_(module.sampling_offsets.weight, std=0.2)
            nn.init.normal_(module.attention_weights.weight, std=0.2)
    for head in [model.bbox_embed] if not box_refine else list(model.bbox_embed):
        nn.init.normal_(head.layers[-1].weight, std=0.1)
    return model.eval()


VARIANTS = [(False, False), (True, False), (True, True)]


@pytest.mark.parametrize("box_refine,two_stage", VARIANTS, ids=["plain", "refine", "two_stage"])
def test_transformer_and_heads_ignore_padding(box_refine, two_stage):
    model = tiny_detector(box_refine, two_stage)
    gen = torch.Generator().manual_seed(1)
    alone_shapes = [(10, 13), (5, 7), (3, 4)]
    padded_shapes = [(14, 16), (7, 8), (4, 4)]
    alone = [torch.randn(1, 32, h, w, generator=gen) for h, w in alone_shapes]
    srcs, masks = [], []
    for src, (h, w), (hp, wp) in zip(alone, alone_shapes, padded_shapes):
        padded = torch.randn(2, 32, hp, wp, generator=gen)  # image 1 fills the whole map
        padded[0] = 0.0
        padded[0, :, :h, :w] = src[0]
        mask = torch.zeros(2, hp, wp, dtype=torch.bool)
        mask[0] = True
        mask[0, :h, :w] = False
        srcs.append(padded)
        masks.append(mask)
    with torch.no_grad():
        single = model.forward_levels(alone, [torch.zeros(1, h, w, dtype=torch.bool) for h, w in alone_shapes])
        batched = model.forward_levels(srcs, masks)
    torch.testing.assert_close(batched.logits[:1], single.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched.boxes[:1], single.boxes, atol=1e-4, rtol=0)
    assert len(single.aux) == 1
    for (bl, bb), (sl, sb) in zip(batched.aux, single.aux):
        torch.testing.assert_close(bl[:1], sl, atol=1e-4, rtol=0)
        torch.testing.assert_close(bb[:1], sb, atol=1e-4, rtol=0)
    if two_stage:
        valid = torch.cat([~m[0].flatten() for m in masks])  # the alone image's positions in the padded layout
        torch.testing.assert_close(batched.encoder[0][0, valid], single.encoder[0][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batched.encoder[1][0, valid], single.encoder[1][0], atol=1e-4, rtol=0)
    else:
        assert batched.encoder is None


def test_encoder_reference_points_are_pixel_centres_of_the_valid_region():
    masks = [torch.zeros(1, 4, 6, dtype=torch.bool), torch.zeros(1, 2, 3, dtype=torch.bool)]
    masks[0][0, :, 4:] = True  # valid 4 x 4 of 4 x 6
    masks[1][0, :, 2:] = True  # valid 2 x 2 of 2 x 3
    torch.testing.assert_close(valid_ratios(masks), torch.tensor([[[4 / 6, 1.0], [2 / 3, 1.0]]]))
    centres, levels, sizes = pixel_grid([(4, 6), (2, 3)], torch.device("cpu"))
    assert centres.shape == (30, 2) and levels.tolist() == [0] * 24 + [1] * 6
    torch.testing.assert_close(centres[7], torch.tensor([1.5, 1.5]))  # row 1, column 1 of level 0
    torch.testing.assert_close(sizes, torch.tensor([[6.0, 4.0], [3.0, 2.0]]))


def test_transformer_rejects_wrong_level_count_and_two_stage_without_heads():
    transformer, _, _ = tiny_transformer(levels=2)
    src = torch.randn(1, 32, 4, 4)
    with pytest.raises(ValueError, match="levels"):
        transformer([src], [torch.zeros(1, 4, 4, dtype=torch.bool)], [src], torch.randn(3, 64))
    plain, _, _ = tiny_transformer(levels=2)
    with pytest.raises(ValueError, match="two_stage"):
        DeformableTransformer(plain.encoder, plain.decoder, two_stage=True)


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing encoder activations in backward must not change the loss or any gradient."""
    from detr_kit.build import build_criterion, build_model
    from detr_kit.config import load_config
    from detr_kit.structures import Target

    overrides = ["model.num_classes=3", "model.backbone.weights=null", "model.backbone.name=resnet18",
                 "model.backbone.norm=bn", "model.hidden_dim=32", "model.num_heads=4", "model.dim_feedforward=64",
                 "model.num_encoder_layers=2", "model.num_decoder_layers=2", "model.num_queries=10",
                 "model.deformable.num_feature_levels=3", "model.dropout=0.0"]
    grads = []
    for flag in (False, True):
        cfg = load_config("configs/deformable_detr.yaml", [*overrides, f"model.deformable.activation_checkpointing={str(flag).lower()}"])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        assert model.transformer.encoder.activation_checkpointing is flag
        criterion = build_criterion(cfg)
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        targets = [Target(torch.tensor([[0.5, 0.5, 0.3, 0.4]]), torch.tensor([1])) for _ in range(2)]
        loss = criterion(model(images), targets).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_plain, plain), (loss_ckpt, ckpt) = grads
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
