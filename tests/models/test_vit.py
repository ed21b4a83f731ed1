"""ViTBackbone against torchvision and timm ViTs, an independent windowed attention, and padding invariance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from detr_kit.models.backbone.simple_pyramid import padding_mask_at_stride
from detr_kit.models.backbone.vit import Block, ViTBackbone
from detr_kit.models.backbone.weights import convert_vit_state_dict, resize_position_embedding


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- references


def test_torchvision_vit_b16_weights_give_torchvision_tokens():
    torch.manual_seed(0)
    reference = torchvision.models.vit_b_16().eval()
    with torch.no_grad():  # random (non-zero) position table and class token so that both are exercised
        reference.encoder.pos_embedding.normal_(std=0.5)
        reference.class_token.normal_(std=0.5)
    ours = ViTBackbone("base", drop_path=0.0).eval()
    report = ours.load_weights(reference.state_dict())
    assert report.missing == [] and report.unexpected == []  # heads.head.* is dropped silently

    images = _images(1, 224, 224)
    with torch.no_grad():
        x = reference._process_input(images)  # [1, 196, 768]
        x = torch.cat((reference.class_token.expand(1, -1, -1), x), dim=1)
        expected = reference.encoder(x)[:, 1:]  # [1, 196, 768], after encoder.ln, without [CLS]
        tokens, patch_mask = ours.encode(images)
    assert tokens.shape == (1, 14, 14, 768) and not patch_mask.any()
    torch.testing.assert_close(tokens.flatten(1, 2), expected, atol=1e-5, rtol=0)


def test_timm_vit_small_weights_give_timm_tokens():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        reference.pos_embed.normal_(std=0.5)
        reference.cls_token.normal_(std=0.5)
    ours = ViTBackbone("small", drop_path=0.0).eval()
    report = ours.load_weights(reference.state_dict())
    assert report.missing == [] and report.unexpected == []  # head.* is dropped silently

    images = _images(2, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(images)[:, 1:]  # [2, 196, 384]
        tokens, _ = ours.encode(images)
    torch.testing.assert_close(tokens.flatten(1, 2), expected, atol=1e-5, rtol=0)


def test_loading_a_file_interpolates_the_position_table_and_reports_keys(tmp_path):
    torch.manual_seed(0)
    checkpoint = ViTBackbone("tiny", depth=1, drop_path=0.0).state_dict()  # grid 14, with a [CLS] entry
    checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith("pyramid.")}
    checkpoint["dist_token"] = torch.zeros(1, 1, 192)  # DeiT-distilled extra: unexpected
    del checkpoint["norm.weight"]  # missing
    path = tmp_path / "deit_like.pth"
    torch.save({"model": checkpoint}, path)  # DeiT releases wrap the state dict under "model"
    # grid 20 and no [CLS]: the [CLS] position entry is dropped, the grid interpolated
    ours = ViTBackbone("tiny", depth=1, pretrain_image_size=320, use_cls_token=False, weights=str(path))
    report = ours.load_report
    assert report.missing == ["norm.weight"] and report.unexpected == ["dist_token"]

    # a timm-layout file: resized as timm resizes it (antialiased bicubic), unless another convention is named
    table = checkpoint["pos_embed"][0, 1:].reshape(14, 14, 192).permute(2, 0, 1)[None]  # [1, C, 14, 14]
    expected = F.interpolate(table, size=(20, 20), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(ours.pos_embed[0].reshape(20, 20, 192), expected[0].permute(1, 2, 0))
    ours = ViTBackbone("tiny", depth=1, pretrain_image_size=320, use_cls_token=False, weights=str(path),
                       weights_interpolation="detr_kit")
    expected = F.interpolate(table, size=(20, 20), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(ours.pos_embed[0].reshape(20, 20, 192), expected)
    torch.testing.assert_close(ours.patch_embed.proj.weight, checkpoint["patch_embed.proj.weight"], atol=0, rtol=0)


def test_loading_a_different_width_is_an_error():
    checkpoint = ViTBackbone("tiny", depth=1).state_dict()
    with pytest.raises(ValueError, match="shape mismatches"):
        ViTBackbone("small", depth=1).load_weights(checkpoint)
    with pytest.raises(FileNotFoundError):
        ViTBackbone("tiny", depth=1, weights="/nonexistent/deit.pth")


def test_convert_torchvision_names():
    state_dict = {
        "class_token": torch.zeros(1),
        "conv_proj.weight": torch.zeros(1),
        "encoder.pos_embedding": torch.zeros(1),
        "encoder.layers.encoder_layer_3.ln_1.bias": torch.zeros(1),
        "encoder.layers.encoder_layer_3.self_attention.in_proj_weight": torch.zeros(1),
        "encoder.layers.encoder_layer_3.self_attention.out_proj.bias": torch.zeros(1),
        "encoder.layers.encoder_layer_10.mlp.3.weight": torch.zeros(1),
        "encoder.ln.weight": torch.zeros(1),
        "heads.head.weight": torch.zeros(1),
        "module.head.bias": torch.zeros(1),
    }
    assert sorted(convert_vit_state_dict(state_dict)) == sorted([
        "cls_token", "patch_embed.proj.weight", "pos_embed", "blocks.3.norm1.bias", "blocks.3.attn.qkv.weight",
        "blocks.3.attn.proj.bias", "blocks.10.mlp.fc2.weight", "norm.weight",
    ])


# ------------------------------------------------------------------------------------------------- position table


def test_position_table_is_unchanged_at_the_native_grid():
    table = torch.randn(14 * 14, 32)
    torch.testing.assert_close(resize_position_embedding(table, (14, 14), (14, 14)), table, atol=0, rtol=0)


def test_position_table_at_twice_the_grid_is_bicubic_interpolation():
    table = torch.randn(1, 7 * 5, 8, dtype=torch.float64)
    grid = table[0].reshape(7, 5, 8).permute(2, 0, 1)[None]  # [1, C, 7, 5]
    expected = F.interpolate(grid, size=(14, 10), mode="bicubic", align_corners=False)  # [1, C, 14, 10]
    resized = resize_position_embedding(table, (7, 5), (14, 10))  # [140, C]
    torch.testing.assert_close(resized.reshape(14, 10, 8), expected[0].permute(1, 2, 0).to(resized.dtype))


def test_bicubic_resize_matches_a_hand_written_keys_kernel():
    """1-D check on a 4x1 grid -> 8x1: Keys' cubic convolution (a = -0.75) with clamped borders, in float64."""

    def keys(t: float, a: float = -0.75) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    values = [1.0, -2.0, 0.5, 3.0]
    expected = []
    for i in range(8):
        x = (i + 0.5) / 2 - 0.5  # align_corners=False source coordinate
        base = math.floor(x)
        expected.append(sum(values[min(max(base + k, 0), 3)] * keys(x - (base + k)) for k in range(-1, 3)))
    table = torch.tensor(values, dtype=torch.float64)[:, None]  # [4, 1]
    resized = resize_position_embedding(table, (4, 1), (8, 1))[:, 0]
    torch.testing.assert_close(resized, torch.tensor(expected, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------- attention


def test_windowed_attention_matches_a_per_window_loop():
    """Block with 2x2 windows on a 3x5 grid (padded to 4x6) vs. explicit float64 attention over each window."""
    torch.manual_seed(0)
    block = Block(embed_dim=16, num_heads=2, drop_path=0.0, window_size=2).double().eval()
    h, w = 3, 5
    x = torch.randn(2, h * w, 16, dtype=torch.float64)
    key_valid = torch.ones(2, h * w, dtype=torch.bool)
    key_valid.view(2, h, w)[1, :, 3:] = False  # second image: valid width 3
    out = block._windowed_attention(x, (h, w), key_valid)  # [2, 15, 16]

    attn = block.attn
    expected = torch.zeros_like(x)
    for b in range(2):
        for top in range(0, h, 2):
            for left in range(0, w, 2):
                cells = [r * w + c for r in range(top, min(top + 2, h)) for c in range(left, min(left + 2, w))]
                keys_ok = [i for i in cells if key_valid[b, i]]
                if not keys_ok:
                    continue  # padding queries of an all-padding window: only required to stay finite
                q, _, _ = (x[b, cells] @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)  # [n, 16]
                _, k, v = (x[b, keys_ok] @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)
                heads = []
                for m in range(2):
                    s = slice(8 * m, 8 * m + 8)
                    weights = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(8), dim=-1)  # [n, n_valid]
                    heads.append(weights @ v[:, s])
                expected[b, cells] = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[key_valid], expected[key_valid])
    torch.testing.assert_close(out[0], expected[0])  # image 0: padding only from the window grid


def test_key_padding_mask_makes_valid_tokens_independent_of_padding():
    """Global attention, trunk only: an image alone vs. batched beside a larger one with garbage in its padding."""
    torch.manual_seed(0)
    model = ViTBackbone("tiny", depth=2, drop_path=0.0).eval()
    small = _images(1, 72, 88, seed=1)  # grid 5x6, last row/column of patches partly padded
    batch = _images(2, 128, 160, seed=2) * 5  # garbage everywhere
    batch[0, :, :72, :88] = small[0]
    mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    mask[0, 72:] = True
    mask[0, :, 88:] = True
    with torch.no_grad():
        alone, alone_mask = model.encode(small)
        batched, batched_mask = model.encode(batch, mask)
    assert not alone_mask.any() and batched_mask[0, :5, :6].logical_not().all() and batched_mask[0].sum() == 8 * 10 - 30
    torch.testing.assert_close(batched[0, :5, :6], alone[0], atol=1e-5, rtol=1e-5)
    # Without the mask the padding leaks into every token: the test can fail.
    with torch.no_grad():
        unmasked, _ = model.encode(batch)
    assert (unmasked[0, :5, :6] - alone[0]).abs().max() > 1e-2


@pytest.mark.parametrize("window_size, global_blocks", [(0, ()), (3, (1,))])
def test_whole_backbone_is_padding_invariant(window_size, global_blocks):
    """All four pyramid levels of an image alone equal its batched features (pooling and 3x3 convs included)."""
    torch.manual_seed(0)
    model = ViTBackbone(
        "tiny", return_strides=(8, 16, 32, 64), depth=3, drop_path=0.0, window_size=window_size,
        global_blocks=global_blocks, use_cls_token=window_size == 0, out_channels=32,
    ).eval()
    small = _images(1, 100, 120, seed=3)
    batch = _images(2, 160, 200, seed=4) * 3
    batch[1, :, :100, :120] = small[0]
    mask = torch.zeros(2, 160, 200, dtype=torch.bool)
    mask[1, 100:] = True
    mask[1, :, 120:] = True
    with torch.no_grad():
        alone = model(small)
        batched = model(batch, mask)
    for stride, a, b in zip(model.strides, alone, batched):
        h, w = a.features.shape[-2:]
        assert (h, w) == (math.ceil(100 / stride), math.ceil(120 / stride))
        assert not a.mask.any()
        assert b.mask[1, :h, :w].logical_not().all() and b.mask[1].sum() == b.mask[1].numel() - h * w
        torch.testing.assert_close(b.features[1, :, :h, :w], a.features[0], atol=2e-5, rtol=1e-4)
        assert b.features[1, :, h:].abs().max() == 0 and b.features[1, :, :, w:].abs().max() == 0


# ------------------------------------------------------------------------------------------------- shapes, masks


def test_input_not_a_multiple_of_the_patch_size():
    torch.manual_seed(0)
    model = ViTBackbone("tiny", return_strides=(8, 16, 32, 64), depth=1, out_channels=32).eval()
    assert model.strides == (8, 16, 32, 64) and model.channels == (32,) * 4
    images = _images(2, 100, 120)
    mask = torch.zeros(2, 100, 120, dtype=torch.bool)
    mask[1, 40:] = True  # second image: 40 x 120 valid
    with torch.no_grad():
        levels = model(images, mask)
        _, patch_mask = model.encode(images, mask)
    assert [tuple(level.features.shape) for level in levels] == [
        (2, 32, 13, 15), (2, 32, 7, 8), (2, 32, 4, 4), (2, 32, 2, 2)
    ]
    assert patch_mask.shape == (2, 7, 8) and not patch_mask[0].any()
    assert patch_mask[1, :3].logical_not().all() and patch_mask[1, 3:].all()  # rows 48.. hold no valid pixel
    for level, stride in zip(levels, (8, 16, 32, 64)):
        valid_rows = math.ceil(40 / stride)
        assert not level.mask[1, :valid_rows].any() and level.mask[1, valid_rows:].all()
        assert level.features[1, :, valid_rows:].abs().max() == 0 if valid_rows < level.mask.shape[1] else True


def test_padding_mask_at_stride_matches_nearest_resize_for_exact_multiples():
    mask = torch.zeros(3, 64, 96, dtype=torch.bool)
    mask[1, 37:] = True
    mask[2, :, 50:] = True
    for stride in (8, 16, 32):
        nearest = F.interpolate(mask[None].float(), size=(64 // stride, 96 // stride))[0].bool()
        assert torch.equal(padding_mask_at_stride(mask, stride), nearest)


def test_drop_path_is_linear_in_depth_and_off_in_eval():
    model = ViTBackbone("tiny", depth=4, drop_path=0.3)
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    model.eval()
    images = _images(1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images)[0].features, model(images)[0].features, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": "huge"}, "unknown ViT size"),
        ({"size": "tiny", "return_strides": (4,)}, "return_strides"),
        ({"size": "tiny", "return_strides": (16, 16)}, "return_strides"),
        ({"size": "tiny", "window_size": 7}, "use_cls_token"),
        ({"size": "tiny", "window_size": 7, "use_cls_token": False, "global_blocks": (12,)}, "global_blocks"),
        ({"size": "tiny", "pretrain_image_size": 200}, "multiple of patch_size"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViTBackbone(**kwargs)


@pytest.mark.parametrize(
    "depth, global_blocks",
    [pytest.param(2, (1,), id="2-blocks"), pytest.param(12, (2, 5, 8, 11), id="12-blocks", marks=pytest.mark.slow)],
)
def test_vit_small_windowed_at_detection_sizes(depth, global_blocks):
    """ViT-S with 14x14 windows at 512x800 (32x50 patches) and 800x1333 (50x84: windows need grid padding)."""
    torch.manual_seed(0)
    model = ViTBackbone(
        "small", return_strides=(8, 16, 32), window_size=14, global_blocks=global_blocks, use_cls_token=False,
        depth=depth,
    ).eval()
    for height, width in ((512, 800), (800, 1333)):
        with torch.no_grad():
            levels = model(_images(1, height, width))
        expected = [(math.ceil(height / s), math.ceil(width / s)) for s in (8, 16, 32)]
        assert [tuple(level.features.shape[-2:]) for level in levels] == expected
        assert all(torch.isfinite(level.features).all() and not level.mask.any() for level in levels)


# ------------------------------------------------------------------------------------------------- detectors


def _vit_detector(arch: str, exact_padding: bool, extra: tuple[str, ...] = ()):
    from detr_kit.build import build_model
    from detr_kit.config import load_config

    path = {"detr": "configs/detr_vit.yaml", "deformable_detr": "configs/deformable_detr_vit.yaml"}[arch]
    cfg = load_config(
        __file__.rsplit("/tests/", 1)[0] + "/" + path,
        [
            "model.backbone.name=vit_tiny", "model.backbone.vit.drop_path=0.0", "model.hidden_dim=32",
            "model.num_heads=2", "model.num_encoder_layers=1", "model.num_decoder_layers=1",
            "model.dim_feedforward=64", "model.num_queries=10", "model.dropout=0.0", *extra,
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3).eval()
    return lambda images, mask=None: model(images, mask, exact_padding=exact_padding)


@pytest.mark.parametrize("exact_padding", [False, True])
def test_vit_detr_output_does_not_depend_on_the_batch(exact_padding):
    """A ViT DETR gives an image the same detections alone and batched beside a larger image.

    With exact_padding the backbone sees the image alone anyway; without it, the ViT's masks keep the padding
    out of the features, and DETR's transformer sees the same features zero-padded with a mask.
    """
    model = _vit_detector("detr", exact_padding)
    small = _images(1, 72, 90, seed=5)
    batch = _images(2, 96, 128, seed=6)
    batch[0] = 0.0
    batch[0, :, :72, :90] = small[0]
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[0, 72:] = True
    mask[0, :, 90:] = True
    with torch.no_grad():
        alone = model(small)
        batched = model(batch, mask)
    torch.testing.assert_close(batched.logits[0], alone.logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched.boxes[0], alone.boxes[0], atol=1e-4, rtol=1e-4)


def test_tiny_vit_deformable_detr_overfits_a_fixed_batch():
    """ViT-tiny (2 blocks) + Deformable-DETR (hidden 64, 2+2 layers, 3 levels): the loss halves in 50 CPU steps."""
    from detr_kit.models import deformable as parts
    from detr_kit.models.criterion import SetCriterion
    from detr_kit.models.deformable_detr import DeformableDETR
    from detr_kit.models.heads import deformable_heads
    from detr_kit.models.matcher import HungarianMatcher
    from detr_kit.models.position import SinePositionEncoding
    from detr_kit.structures import Target

    torch.manual_seed(0)
    backbone = ViTBackbone("tiny", return_strides=(8, 16, 32), depth=2, drop_path=0.0, out_channels=64)
    class_embed, bbox_embed = deformable_heads(64, 3, 2, box_refine=False, two_stage=False)
    transformer = parts.DeformableTransformer(
        parts.DeformableEncoder(parts.DeformableEncoderLayer(64, 128, 3, 4, 4, dropout=0.0), 2),
        parts.DeformableDecoder(parts.DeformableDecoderLayer(64, 128, 3, 4, 4, dropout=0.0), 2),
    )
    model = DeformableDETR(
        backbone, parts.FeatureLevels(backbone.channels, 64, 3), SinePositionEncoding(32, normalize=True, offset=-0.5),
        transformer, class_embed, bbox_embed, num_queries=20,
    )
    criterion = SetCriterion(
        3, HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, focal=True), class_weight=2, bbox_weight=5,
        giou_weight=2, focal=True,
    )
    # Two images (64x96 and 80x64) with bright rectangles on noise, padded to 80x96.
    images = torch.randn(2, 3, 80, 96, generator=torch.Generator().manual_seed(7)) * 0.3
    mask = torch.zeros(2, 80, 96, dtype=torch.bool)
    mask[0, 64:] = True
    mask[1, :, 64:] = True
    boxes_xyxy = [
        torch.tensor([[8.0, 8.0, 40.0, 30.0], [50.0, 20.0, 90.0, 60.0]]),
        torch.tensor([[10.0, 30.0, 50.0, 70.0]]),
    ]
    sizes = [(64, 96), (80, 64)]
    targets = []
    for index, (boxes, labels, (h, w)) in enumerate(zip(boxes_xyxy, ([0, 2], [1]), sizes)):
        for (x0, y0, x1, y1), label in zip(boxes.int().tolist(), labels):
            images[index, label, y0:y1, x0:x1] += 2.0  # the class is the colour channel
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        cxcywh = torch.cat(((boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]), dim=1) / scale
        targets.append(Target(cxcywh, torch.tensor(labels), size=(h, w)))
    images = images.masked_fill(mask[:, None], 0.0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    model.train()
    losses = []
    for _ in range(50):
        loss = criterion(model(images, mask), targets).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, f"loss went {losses[0]:.2f} -> {losses[-1]:.2f}"


@pytest.mark.parametrize("arch", ["detr", "deformable_detr"])
def test_vit_configs_build_and_run(arch):
    from detr_kit.build import build_model
    from detr_kit.config import load_config

    root = __file__.rsplit("/tests/", 1)[0]
    cfg = load_config(f"{root}/configs/{arch}_vit.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3).eval()
    backbone = model.backbone
    assert isinstance(backbone, ViTBackbone) and backbone.embed_dim == 384 and len(backbone.blocks) == 12
    assert backbone.strides == ((16,) if arch == "detr" else (8, 16, 32))
    with torch.no_grad():
        output = model(_images(1, 64, 80))
    assert output.boxes.shape == (1, cfg.model.num_queries, 4) and torch.isfinite(output.logits).all()
