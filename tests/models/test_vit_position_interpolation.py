"""Position-table resizing under each named convention, against F.interpolate, timm and torchvision themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from detr_kit.models.backbone.position_interpolation import (
    INTERPOLATION_FLAGS,
    position_embedding_per_image,
    resampling_matrix,
)
from detr_kit.models.backbone.vit import ViTBackbone
from detr_kit.models.backbone.weights import (
    checkpoint_interpolation,
    resize_position_embedding,
)

CONVENTIONS = list(INTERPOLATION_FLAGS)


def _interpolate(grid: torch.Tensor, size: tuple[int, int], convention: str) -> torch.Tensor:
    """F.interpolate with the convention's flags, written out here: the reference. [1, C, h, w] -> [1, C, h', w']."""
    flags = {"detr_kit": {"align_corners": False}, "timm": {"align_corners": False, "antialias": True},
             "torchvision": {"align_corners": True}}[convention]
    return F.interpolate(grid, size=size, mode="bicubic", **flags)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_resampling_matrix_equals_interpolate_up_and_down(convention):
    """Every source size 1..14 to every destination 1..29, float64: the matrix is PyTorch's 1-D resize."""
    torch.manual_seed(0)
    worst = 0.0
    for src in (1, 2, 3, 5, 7, 14):
        # Two identical columns: PyTorch 2.14's antialiased bicubic is wrong when the output is one column wide
        # (it returns the first row everywhere); the matrix is right there too.
        values = torch.randn(1, 1, src, 1, dtype=torch.float64).expand(1, 1, src, 2)
        dsts = torch.arange(1, 30)
        matrices = resampling_matrix(src, dsts, 29, convention, torch.float64)  # [29, 29, src]
        for dst, matrix in zip(dsts.tolist(), matrices):
            expected = _interpolate(values, (dst, 2), convention)[0, 0, :, 0]
            got = matrix @ values[0, 0, :, 0]
            assert torch.all(got[dst:] == 0)  # rows past the destination size are zero
            worst = max(worst, (got[:dst] - expected).abs().max().item())
    assert worst < 1e-12


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_per_image_resize_is_each_image_resized_alone(convention):
    """Three images with different valid grids (one empty) in one padded 9x11 grid, from a 5x4 table."""
    torch.manual_seed(0)
    table = torch.randn(5 * 4, 6, dtype=torch.float64)
    valid = torch.tensor([[9, 11], [3, 7], [0, 0]])
    out = position_embedding_per_image(table, (5, 4), valid, (9, 11), convention)  # [3, 9, 11, 6]
    grid = table.reshape(5, 4, 6).permute(2, 0, 1)[None]  # [1, C, 5, 4]
    for index, (rows, cols) in enumerate(valid.tolist()):
        if rows:
            expected = _interpolate(grid, (rows, cols), convention)[0].permute(1, 2, 0)
            torch.testing.assert_close(out[index, :rows, :cols], expected, atol=1e-12, rtol=0)
        assert torch.all(out[index, rows:] == 0) and torch.all(out[index, :, cols:] == 0)


def test_conventions_differ():
    """The three conventions give different tables when enlarging 7x7 to 10x10: the choice matters."""
    table = torch.randn(49, 4, generator=torch.Generator().manual_seed(0))
    resized = [resize_position_embedding(table, (7, 7), (10, 10), name) for name in CONVENTIONS]
    for first in range(3):
        for second in range(first + 1, 3):
            assert (resized[first] - resized[second]).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(7, 7), (20, 20), (10, 17)])
def test_timm_convention_is_timms_resample_abs_pos_embed(size):
    timm = pytest.importorskip("timm")
    table = torch.randn(1, 14 * 14, 32, generator=torch.Generator().manual_seed(1))
    expected = timm.layers.resample_abs_pos_embed(table, new_size=list(size), old_size=[14, 14], num_prefix_tokens=0)
    torch.testing.assert_close(resize_position_embedding(table, (14, 14), size, "timm"), expected[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("image_size", [160, 320])
def test_torchvision_convention_is_torchvisions_interpolate_embeddings(image_size):
    from torchvision.models.vision_transformer import interpolate_embeddings

    pos = torch.randn(1, 1 + 14 * 14, 32, generator=torch.Generator().manual_seed(2))
    expected = interpolate_embeddings(image_size, 16, {"encoder.pos_embedding": pos})["encoder.pos_embedding"]
    grid = image_size // 16
    got = resize_position_embedding(pos[:, 1:], (14, 14), (grid, grid), "torchvision")
    torch.testing.assert_close(got, expected[0, 1:], atol=1e-6, rtol=0)


def test_checkpoint_interpolation_names_the_writer():
    torch.manual_seed(0)
    assert checkpoint_interpolation(torchvision.models.vit_b_16().state_dict()) == "torchvision"
    assert checkpoint_interpolation({"module.class_token": torch.zeros(1)}) == "torchvision"  # DDP-saved
    assert checkpoint_interpolation({"pos_embed": torch.zeros(1), "blocks.0.attn.qkv.weight": torch.zeros(1)}) == "timm"
    assert checkpoint_interpolation(ViTBackbone("tiny", depth=1).state_dict()) == "detr_kit"


def test_torchvision_weights_at_another_grid_load_as_torchvision_resizes_them():
    """ViT-B/16 weights loaded for 320 px pretraining: the table is torchvision's own interpolate_embeddings."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    torch.manual_seed(0)
    state = torchvision.models.vit_b_16().state_dict()
    state["encoder.pos_embedding"].normal_()
    expected = interpolate_embeddings(320, 16, dict(state))["encoder.pos_embedding"]  # [1, 1 + 400, 768]
    ours = ViTBackbone("base", depth=1, pretrain_image_size=320, weights=None)
    ours.load_weights({k: v for k, v in state.items() if not k.startswith("encoder.layers.encoder_layer_")
                       or k.startswith("encoder.layers.encoder_layer_0.")})
    torch.testing.assert_close(ours.pos_embed.detach(), expected, atol=1e-6, rtol=0)


def test_timm_weights_and_timm_resizing_give_timms_dynamic_size_tokens():
    """timm's ViT with dynamic_img_size at 160x256 (grid 10x16 from a 14x14 table) vs ours with the timm convention:
    both the loading (a 224 checkpoint into a 288 model) and the per-input resize follow timm."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", depth=2, pretrained=False)
    with torch.no_grad():
        source.pos_embed.normal_(std=0.5)
    reference = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=288, dynamic_img_size=True).eval()
    reference.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(source.state_dict(), reference))
    ours = ViTBackbone("tiny", depth=2, drop_path=0.0, pretrain_image_size=288, position_interpolation="timm").eval()
    ours.load_weights(source.state_dict())  # auto: the timm layout is resized as timm resizes it
    torch.testing.assert_close(ours.pos_embed.detach(), reference.pos_embed.detach(), atol=1e-6, rtol=0)

    images = torch.randn(2, 3, 160, 256, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 160, 256, dtype=torch.bool)
    with torch.no_grad():
        expected = reference.forward_features(images)[:, 1:]  # [2, 160, 192]
        tokens, _ = ours.encode(images)
        masked_tokens, _ = ours.encode(images, mask)  # the per-image (matrix) path
    torch.testing.assert_close(tokens.flatten(1, 2), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(masked_tokens.flatten(1, 2), expected, atol=1e-4, rtol=0)
    ours.position_interpolation = "detr_kit"  # the default convention is a different model: the test can fail
    with torch.no_grad():
        assert (ours.encode(images)[0].flatten(1, 2) - expected).abs().max() > 1e-3
