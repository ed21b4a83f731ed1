"""Convolution as attention (Li et al., arXiv 2111.01353): a pixel nn.Conv2d and a trained convolutional-attention
ViT converted to self-attention with a relative position bias, checked in float64 against F.conv2d, replicate
padding and the unconverted model; the head count against the paper's bound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from detr_kit.models.backbone.conv_attention import (
    ConvolutionalAttention,
    heads_for_convolution,
    patch_radius,
)
from detr_kit.models.backbone.conv_to_attention import (
    attention_leak_bound,
    conv2d_as_attention,
    convert_backbone,
    convert_conv_attention,
    convolve_as_attention,
    patch_tokens,
)
from detr_kit.models.backbone.relative_position import RelativePositionBias
from detr_kit.models.backbone.vit import ViTBackbone
from detr_kit.models.backbone.vit_blocks import Attention

# (kernel, patch, C_in, C_out): k > P crosses patch borders (radius 1 or 2), P = 1 is the pixel case
CONVS = [(3, 1, 2, 3), (5, 2, 2, 2), (7, 2, 1, 3), (5, 4, 2, 2), (9, 4, 1, 2), (11, 4, 1, 1), (3, 4, 3, 2)]


def _conv(kernel: int, c_in: int, c_out: int, seed: int) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2).double()
    with torch.no_grad():
        conv.bias.normal_()
    return conv


def _hard_attention(attention: Attention, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax's limit written out: each head takes the value of its best-scoring key (bias from the table,
    indexed here by explicit offsets). Returns (outputs [B, N, out], weight of that key under softmax [B, M, N])."""
    heads, table = attention.num_heads, attention.relative_position.table
    distance = attention.relative_position.max_distance
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # [N]
    dy = (rows[None, :] - rows[:, None]).clamp(-distance, distance) + distance  # [N (query), N (key)]
    dx = (cols[None, :] - cols[:, None]).clamp(-distance, distance) + distance
    bias = table[:, dy, dx]  # [M, N, N]
    q, k, v = rearrange(attention.qkv(tokens), "b n (three m d) -> three b m n d", three=3, m=heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias  # [B, M, N, N]
    best = scores.argmax(-1)  # [B, M, N]
    chosen = v.gather(2, best[..., None].expand(-1, -1, -1, v.shape[-1]))  # [B, M, N, d]
    target_weight = scores.softmax(-1).gather(-1, best[..., None])[..., 0]  # [B, M, N]
    return attention.proj(rearrange(chosen, "b m n d -> b n (m d)")), target_weight


@pytest.mark.parametrize("kernel, patch, expected", [(5, 16, 9), (5, 1, 25), (3, 1, 9), (5, 2, 9), (7, 2, 25),
                                                     (1, 4, 1), (33, 16, 9), (35, 16, 25)])
def test_head_count_is_one_per_patch_the_kernel_reaches(kernel, patch, expected):
    """The paper's examples: 9 heads for a 5x5 kernel on patches, 25 on pixels; (2 ceil((k // 2) / P) + 1)^2."""
    assert heads_for_convolution(kernel, patch) == expected
    if patch <= 4:
        assert conv2d_as_attention(_conv(kernel, 1, 1, 0), patch, 10.0).num_heads == expected


@pytest.mark.parametrize("kernel, patch, c_in, c_out", CONVS)
def test_conv2d_as_hard_attention_is_the_convolution(kernel, patch, c_in, c_out):
    """float64, 1e-8: hard one-hot attention (the argmax of the converted scores) computes F.conv2d exactly."""
    conv = _conv(kernel, c_in, c_out, seed=kernel * 10 + patch)
    attention = conv2d_as_attention(conv, patch, bias_magnitude=10.0)
    radius = patch_radius(kernel, patch)
    images = torch.randn(2, c_in, 3 * patch, 5 * patch, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    padded = F.pad(images, (radius * patch,) * 4)
    grid = (3 + 2 * radius, 5 + 2 * radius)
    with torch.no_grad():
        tokens, _ = _hard_attention(attention, patch_tokens(padded, patch), grid)
        expected = patch_tokens(F.pad(conv(images), (radius * patch,) * 4), patch)
    inside = torch.zeros(grid, dtype=torch.bool)
    inside[radius : radius + 3, radius : radius + 5] = True
    torch.testing.assert_close(tokens[:, inside.flatten()], expected[:, inside.flatten()], atol=1e-8, rtol=0)
    assert attention.num_heads == heads_for_convolution(kernel, patch)
    # every head is needed: each reads a patch the kernel reaches (dropping one changes the result)
    head_width = attention.proj.weight.shape[1] // attention.num_heads
    norms = attention.proj.weight.view(-1, attention.num_heads, head_width).abs().sum(dim=(0, 2))
    assert (norms > 0).all()


@pytest.mark.parametrize("kernel, patch, c_in, c_out", CONVS[:4])
@pytest.mark.parametrize("beta", [4.0, 8.0, 16.0, 40.0])
def test_conv2d_as_softmax_attention_is_within_the_stated_bound(kernel, patch, c_in, c_out, beta):
    """The module's own softmax forward: every head's weight on its target is >= 1 - ε(β), and the output is within
    2 ε max|x| max_i ||W_O[i]||_1 of the convolution (values are the pixels themselves)."""
    conv = _conv(kernel, c_in, c_out, seed=3)
    attention = conv2d_as_attention(conv, patch, bias_magnitude=beta)
    radius = patch_radius(kernel, patch)
    images = torch.randn(2, c_in, 3 * patch, 4 * patch, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grid = (3 + 2 * radius, 4 + 2 * radius)
    leak = attention_leak_bound(beta, grid, radius + 1, radius)
    with torch.no_grad():
        out = convolve_as_attention(attention, images, patch, radius)
        _, target_weight = _hard_attention(attention, patch_tokens(F.pad(images, (radius * patch,) * 4), patch), grid)
        expected = conv(images)
    assert target_weight.min() >= 1 - leak - 1e-12
    bound = 2 * leak * images.abs().max() * attention.proj.weight.abs().sum(dim=1).max()
    error = (out - expected).abs().max()
    assert error <= bound + 1e-12  # + float64 rounding
    if beta >= 40:
        assert error < 1e-8


def test_leak_bound_values():
    """ε ≈ 4 e^-β without clipping; keys beyond a clipped D add n e^(-β (D - r)^2) per axis."""
    assert attention_leak_bound(10.0, (7, 7), 6, 1) == pytest.approx(1 - 1 / (1 + 2 * math.exp(-10) + 2 * math.exp(-40)) ** 2)
    assert attention_leak_bound(10.0, (7, 7), 6, 1) == pytest.approx(4 * math.exp(-10), rel=1e-3)
    clipped_long, clipped, unclipped = (attention_leak_bound(10.0, grid, distance, 1)
                                        for grid, distance in (((20, 7), 2), ((7, 7), 2), ((7, 7), 6)))
    assert clipped_long > clipped > unclipped


def _replicate_reference(module: ConvolutionalAttention, x: torch.Tensor, grid: tuple[int, int],
                         valid: tuple[int, int]) -> torch.Tensor:
    """Convolutional attention as replicate padding of the valid region: head h reads its values shifted by Δ_h."""
    h = grid[0]
    r = module.radius
    values = rearrange(module.value(x), "b (h w) (m d) -> b m d h w", h=h, m=module.num_heads)[..., : valid[0], : valid[1]]
    heads = []
    for head, (dy, dx) in enumerate(module.offsets.tolist()):
        padded = F.pad(values[:, head], (r, r, r, r), mode="replicate")  # [B, d, vh + 2r, vw + 2r]
        heads.append(padded[..., r + dy : r + dy + valid[0], r + dx : r + dx + valid[1]])
    return module.proj(rearrange(torch.stack(heads, 1), "b m d h w -> b (h w) (m d)"))  # [B, vh*vw, C]


def _trained_conv_attention(seed: int = 0) -> ConvolutionalAttention:
    """12 heads of width 4 over a 3x3 neighbourhood, after 30 Adam steps towards a random target."""
    torch.manual_seed(seed)
    module = ConvolutionalAttention(48, 12, radius=1).double()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    x, target = torch.randn(2, 5 * 6, 48, dtype=torch.float64), torch.randn(2, 5 * 6, 48, dtype=torch.float64)
    for _ in range(30):
        loss = (module(x, (5, 6)) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module


def test_convolutional_attention_is_replicate_padded_patch_convolution():
    module = _trained_conv_attention()
    x = torch.randn(2, 5 * 6, 48, dtype=torch.float64)
    key_valid = torch.ones(2, 5, 6, dtype=torch.bool)
    key_valid[1, 3:] = False
    key_valid[1, :, 4:] = False  # image 1: 3 x 4 valid
    with torch.no_grad():
        out = module(x, (5, 6), key_valid.flatten(1)).view(2, 5, 6, 48)
        torch.testing.assert_close(out[0].flatten(0, 1), _replicate_reference(module, x[:1], (5, 6), (5, 6))[0])
        torch.testing.assert_close(out[1, :3, :4].flatten(0, 1), _replicate_reference(module, x[1:], (5, 6), (3, 4))[0])


@pytest.mark.parametrize("grid, distance", [((5, 6), 2), ((3, 3), 2), ((5, 6), 5)])
def test_trained_convolutional_attention_converted_keeps_its_outputs(grid, distance):
    """Global (clipped at D = 2 on a 5x6 grid, or never clipped) and window-sized sequences, with padding."""
    source = _trained_conv_attention()
    target = Attention(48, 12, RelativePositionBias(12, distance)).double()
    x = torch.randn(2, grid[0] * grid[1], 48, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    key_valid = torch.ones(2, *grid, dtype=torch.bool)
    key_valid[1, grid[0] - 1 :] = False
    key_valid[1, :, grid[1] - 1 :] = False
    key_valid = key_valid.flatten(1)
    with torch.no_grad():
        expected = source(x, grid, key_valid)
        values = source.value(x)
        for beta in (8.0, 40.0):
            convert_conv_attention(source, target, bias_magnitude=beta)
            out = target(x, grid, key_valid)
            leak = attention_leak_bound(beta, grid, distance, 1)
            spread = 2 * values.abs().max()
            bound = leak * spread * source.proj.weight.abs().sum(dim=1).max()
            error = (out - expected)[key_valid].abs().max()
            assert error <= bound + 1e-12, (beta, error, bound)  # + float64 rounding
        assert error < 1e-8  # β = 40
    assert torch.all(target.qkv.weight[48:96] == 0) and target.qkv.weight[:48].abs().sum() > 0  # zero keys only


def test_converted_attention_learns_content_attention():
    """Zero keys but random queries: the keys get gradients (zero queries and keys would be a saddle)."""
    source = _trained_conv_attention()
    target = Attention(48, 12, RelativePositionBias(12, 2)).double()
    convert_conv_attention(source, target, bias_magnitude=4.0)
    target(torch.randn(2, 30, 48, dtype=torch.float64), (5, 6)).pow(2).sum().backward()
    assert target.qkv.weight.grad[48:96].abs().max() > 1e-6


def _two_phase_backbones(**kwargs) -> tuple[ViTBackbone, ViTBackbone]:
    common = dict(return_strides=(8, 16, 32), depth=3, drop_path=0.0, use_cls_token=False, num_heads=12,
                  out_channels=16, **kwargs)
    torch.manual_seed(0)
    phase1 = ViTBackbone("tiny", conv_radius=1, **common).double()
    phase2 = ViTBackbone("tiny", relative_position=True, relative_position_max_distance=3, **common).double()
    return phase1, phase2


@pytest.mark.parametrize("window_size, global_blocks", [(0, ()), (4, (1,))])
def test_trained_phase1_backbone_converted_keeps_its_features(window_size, global_blocks):
    phase1, phase2 = _two_phase_backbones(window_size=window_size, global_blocks=global_blocks)
    images = torch.randn(2, 3, 96, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(2, 96, 112, dtype=torch.bool)
    mask[1, 70:] = True
    mask[1, :, 90:] = True
    optimizer = torch.optim.Adam(phase1.parameters(), lr=1e-3)
    for _ in range(5):  # "trained": every weight moved away from its initialisation
        loss = sum(level.features.pow(2).mean() for level in phase1(images, mask))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    convert_backbone(phase1.eval(), phase2.eval(), bias_magnitude=40.0)
    with torch.no_grad():
        for a, b in zip(phase1(images, mask), phase2(images, mask)):
            torch.testing.assert_close(b.features, a.features, atol=1e-8, rtol=0)
            assert torch.equal(a.mask, b.mask)
    # the conversion is what makes them equal: another bias gives other features (the test can fail)
    convert_backbone(phase1, phase2, bias_magnitude=1.0)
    with torch.no_grad():
        assert (phase2(images, mask)[0].features - phase1(images, mask)[0].features).abs().max() > 1e-3


def test_convert_backbone_refuses_a_too_short_global_table():
    phase1, _ = _two_phase_backbones()
    phase2 = ViTBackbone("tiny", depth=3, use_cls_token=False, num_heads=12, relative_position=True,
                         relative_position_max_distance=1, return_strides=(8, 16, 32), out_channels=16).double()
    with pytest.raises(ValueError, match="relative_position_max_distance > conv_radius"):
        convert_backbone(phase1, phase2, 10.0)
    with pytest.raises(TypeError, match="convolutional attention"):
        convert_backbone(phase2, phase2, 10.0)


@pytest.mark.parametrize("window_size, global_blocks", [(0, ()), (3, (1,))])
def test_phase1_backbone_is_padding_invariant(window_size, global_blocks):
    """Convolutional attention reads the nearest valid patch: an image alone equals it batched beside a larger one."""
    torch.manual_seed(0)
    model = ViTBackbone("tiny", return_strides=(16, 32), depth=3, drop_path=0.0, window_size=window_size,
                        global_blocks=global_blocks, use_cls_token=False, num_heads=12, conv_radius=1,
                        out_channels=16).eval()
    small = torch.randn(1, 3, 100, 120, generator=torch.Generator().manual_seed(3))
    batch = torch.randn(2, 3, 160, 200, generator=torch.Generator().manual_seed(4)) * 3
    batch[1, :, :100, :120] = small[0]
    mask = torch.zeros(2, 160, 200, dtype=torch.bool)
    mask[1, 100:] = True
    mask[1, :, 120:] = True
    with torch.no_grad():
        alone, batched = model(small), model(batch, mask)
    for a, b in zip(alone, batched):
        h, w = a.features.shape[-2:]
        torch.testing.assert_close(b.features[1, :, :h, :w], a.features[0], atol=2e-5, rtol=1e-4)
