"""Relative position bias in the ViT's attention: a brute-force float64 reference, padding and windows, and
pretrained ViTs loading unchanged while the tables are zero."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from detr_kit.models.backbone.relative_position import RelativePositionBias
from detr_kit.models.backbone.vit import ViTBackbone
from detr_kit.models.backbone.vit_blocks import Attention


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _randomise_tables(model: torch.nn.Module, std: float = 1.0) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position.table"):
                parameter.normal_(std=std)


def test_attention_with_bias_matches_a_loop_over_query_key_pairs():
    """[CLS] + a 4x5 grid, offsets clipped at D = 2, the second sequence with padded keys; float64 loops."""
    torch.manual_seed(0)
    heads, dim, (h, w), distance = 2, 8, (4, 5), 2
    attention = Attention(dim, heads, RelativePositionBias(heads, distance)).double()
    _randomise_tables(attention)
    x = torch.randn(2, 1 + h * w, dim, dtype=torch.float64)
    key_valid = torch.ones(2, 1 + h * w, dtype=torch.bool)
    key_valid[1, 1:].view(h, w)[:, 3:] = False  # second sequence: 3 valid columns
    out = attention(x, (h, w), key_valid)

    table = attention.relative_position.table
    positions = [None] + [(r, c) for r in range(h) for c in range(w)]  # None = [CLS]
    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).chunk(3, dim=-1)  # [2, N, dim] each
    expected = torch.zeros_like(x)
    for b in range(2):
        heads_out = []
        for m in range(heads):
            part = slice(m * dim // heads, (m + 1) * dim // heads)
            scores = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.float64)
            for i, query in enumerate(positions):
                for j, key in enumerate(positions):
                    bias = 0.0
                    if query is not None and key is not None:
                        dy = max(-distance, min(distance, key[0] - query[0]))
                        dx = max(-distance, min(distance, key[1] - query[1]))
                        bias = table[m, dy + distance, dx + distance]
                    score = q[b, i, part] @ k[b, j, part] / math.sqrt(dim // heads) + bias
                    scores[i, j] = score if key_valid[b, j] else -math.inf
            heads_out.append(torch.softmax(scores, dim=-1) @ v[b, :, part])
        expected[b] = torch.cat(heads_out, dim=-1) @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(out, expected)
    # the bias matters: without it the output differs (the test can fail)
    attention.relative_position = None
    assert (attention(x, (h, w), key_valid) - expected).abs().max() > 1e-3


def test_bias_table_gets_gradients():
    attention = Attention(8, 2, RelativePositionBias(2, 3))
    attention(torch.randn(1, 12, 8), (3, 4)).sum().backward()
    assert attention.relative_position.table.grad.abs().sum() > 0


@pytest.mark.parametrize("window_size, global_blocks", [(0, ()), (3, (1,))])
def test_relative_position_backbone_is_padding_invariant(window_size, global_blocks):
    """Random tables, windowed and global blocks: an image alone equals it batched beside a larger one."""
    torch.manual_seed(0)
    model = ViTBackbone(
        "tiny", return_strides=(16, 32), depth=3, drop_path=0.0, window_size=window_size, global_blocks=global_blocks,
        use_cls_token=window_size == 0, out_channels=32, relative_position=True, relative_position_max_distance=3,
    ).eval()
    _randomise_tables(model)
    small = _images(1, 100, 120, seed=3)  # grid 7x8 > 2 * 3 + 1: offsets are clipped
    batch = _images(2, 160, 200, seed=4) * 3
    batch[1, :, :100, :120] = small[0]
    mask = torch.zeros(2, 160, 200, dtype=torch.bool)
    mask[1, 100:] = True
    mask[1, :, 120:] = True
    with torch.no_grad():
        alone = model(small)
        batched = model(batch, mask)
    for a, b in zip(alone, batched):
        h, w = a.features.shape[-2:]
        torch.testing.assert_close(b.features[1, :, :h, :w], a.features[0], atol=2e-5, rtol=1e-4)


def test_table_sizes_follow_windows_and_max_distance():
    model = ViTBackbone("tiny", depth=3, window_size=4, global_blocks=(2,), use_cls_token=False,
                        relative_position=True, relative_position_max_distance=6)
    assert [tuple(b.attn.relative_position.table.shape) for b in model.blocks] == [(3, 7, 7), (3, 7, 7), (3, 13, 13)]
    default = ViTBackbone("tiny", depth=1, relative_position=True)  # 224 / 16 = 14: D = 13
    assert default.blocks[0].attn.relative_position.max_distance == 13
    assert all(torch.all(b.attn.relative_position.table == 0) for b in model.blocks)


def test_timm_weights_load_unchanged_into_a_relative_position_vit():
    """Zero tables: a timm ViT-S's tokens, exactly as the absolute-position model gives them."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224", depth=3, pretrained=False).eval()
    with torch.no_grad():
        reference.pos_embed.normal_(std=0.5)
    ours = ViTBackbone("small", depth=3, drop_path=0.0, relative_position=True).eval()
    report = ours.load_weights(reference.state_dict())
    assert report.missing == [f"blocks.{i}.attn.relative_position.table" for i in range(3)]
    images = _images(2, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(images)[:, 1:]
        tokens, _ = ours.encode(images)
    torch.testing.assert_close(tokens.flatten(1, 2), expected, atol=1e-5, rtol=0)
    _randomise_tables(ours)  # non-zero tables change the model: the test can fail
    with torch.no_grad():
        assert (ours.encode(images)[0].flatten(1, 2) - expected).abs().max() > 1e-2


def test_torchvision_weights_load_unchanged_into_a_relative_position_vit():
    """Zero tables, global attention with [CLS]: a torchvision ViT-B's own tokens."""
    torch.manual_seed(0)
    reference = torchvision.models.vision_transformer.VisionTransformer(
        image_size=224, patch_size=16, num_layers=2, num_heads=12, hidden_dim=768, mlp_dim=3072
    ).eval()
    with torch.no_grad():
        reference.encoder.pos_embedding.normal_(std=0.5)
        reference.class_token.normal_(std=0.5)
    ours = ViTBackbone("base", depth=2, drop_path=0.0, relative_position=True).eval()
    report = ours.load_weights(reference.state_dict())
    assert report.missing == [f"blocks.{i}.attn.relative_position.table" for i in range(2)] and report.unexpected == []
    images = _images(1, 224, 224)
    with torch.no_grad():
        x = reference._process_input(images)  # [1, 196, 768]
        expected = reference.encoder(torch.cat((reference.class_token, x), dim=1))[:, 1:]  # [1, 196, 768]
        tokens, _ = ours.encode(images)
    torch.testing.assert_close(tokens.flatten(1, 2), expected, atol=1e-5, rtol=0)
    _randomise_tables(ours)  # non-zero tables change the model: the test can fail
    with torch.no_grad():
        assert (ours.encode(images)[0].flatten(1, 2) - expected).abs().max() > 1e-2


def test_torchvision_weights_load_unchanged_into_a_windowed_relative_position_vit():
    """torchvision ViT-B weights in a windowed relative-position ViT equal the same ViT without the bias."""
    torch.manual_seed(0)
    state = torchvision.models.vit_b_16().state_dict()
    kwargs = {"depth": 2, "drop_path": 0.0, "window_size": 4, "global_blocks": (1,), "use_cls_token": False}
    plain = ViTBackbone("base", **kwargs).eval()
    relative = ViTBackbone("base", relative_position=True, **kwargs).eval()
    plain.load_weights(state)
    relative.load_weights(state)
    images = _images(1, 96, 160)
    mask = torch.zeros(1, 96, 160, dtype=torch.bool)
    mask[:, :, 130:] = True
    with torch.no_grad():
        torch.testing.assert_close(relative.encode(images, mask)[0], plain.encode(images, mask)[0], atol=1e-6, rtol=0)
