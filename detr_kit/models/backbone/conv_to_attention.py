"""Convolution as self-attention: convolutional attention, and a pixel ``nn.Conv2d``, turned into ordinary
multi-head self-attention with a relative position bias (Li, Chen, He and Hsieh, arXiv 2111.01353, Theorem 1).

The construction. Head h must attend to the patch at offset Δ_h from its query and nowhere else. Its scores
are ``q·k / sqrt(d) + bias_h(offset)``; the content term is made zero (the key projection is zero) and the bias
is ``bias_h(δ) = -β ||δ - Δ_h||^2`` (the quadratic encoding of Cordonnier et al. 2020). Among the keys present,
the maximum is then at the key nearest to ``query + Δ_h``, strictly (squared distances are integers, so every
other key scores at least β lower), and softmax tends to the one-hot weights as β grows. Value projection and
output projection carry the convolution's weights: ``W_O^h W_V^h`` is the part of the kernel that reads the
patch at Δ_h.

How close softmax gets (``attention_leak_bound``): per axis the other keys' score deficits are at least u^2 β
for the u-th key away from the target, so the target's weight is at least ``1 / S(β)^2`` with
``S(β) = Σ_u exp(-β u^2) = 1 + 2 e^-β + 2 e^-4β + ...``: the weight off the target is ε ≤ 1 - 1/S(β)^2
(about 4 e^-β: 1.8e-4 at β = 10). Offsets clipped at D (global blocks) share the border entry; keys beyond it
add at most ``n exp(-β (D - r)^2)`` per axis of length n, which is why a global block needs D > r. A head's
output then moves by at most ε times the spread of its values.

The softmax cannot attend to nothing, so at image borders and next to padding a head reads the valid patch
nearest to ``query + Δ_h`` (``ConvolutionalAttention`` does the same, so the conversion is exact there too).
A pixel convolution's zero padding is reproduced by surrounding the patch grid with r rings of zero patches,
whose values are zero (``convolve_as_attention``).

Phase 2 of the two-phase recipe trains the converted attention further. The query projection keeps the target
module's random initialisation: with a zero key projection the content scores are zero whatever the queries
are, while the keys receive gradients through the queries (zero queries and zero keys would leave both at a
saddle where neither ever gets a gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from detr_kit.models.backbone.conv_attention import (
    ConvolutionalAttention,
    neighbourhood_offsets,
    patch_radius,
)
from detr_kit.models.backbone.relative_position import RelativePositionBias
from detr_kit.models.backbone.vit_blocks import Attention


def one_hot_bias_table(offsets: Tensor, max_distance: int, bias_magnitude: float) -> Tensor:
    """The bias table that makes head h attend to offset Δ_h: ``-β ||δ - Δ_h||^2`` for every δ in [-D, D]^2.

    Args:
        offsets: [M, 2] (dy, dx) per head.
        max_distance: D.
        bias_magnitude: β > 0.

    Returns:
        [M, 2D + 1, 2D + 1] float64 (cast it to the table's dtype).
    """
    span = torch.arange(-max_distance, max_distance + 1, dtype=torch.float64)  # [2D+1]
    dy = span[None, :, None] - offsets[:, 0, None, None].to(torch.float64)  # [M, 2D+1, 1]
    dx = span[None, None, :] - offsets[:, 1, None, None].to(torch.float64)  # [M, 1, 2D+1]
    return -bias_magnitude * (dy**2 + dx**2)  # [M, 2D+1, 2D+1]


def attention_leak_bound(bias_magnitude: float, grid: tuple[int, int], max_distance: int, radius: int) -> float:
    """ε: the most weight a converted head puts off its target patch, on an h x w grid (see the module docstring).

    Args:
        bias_magnitude: β.
        grid: (h, w) of the sequence's patch grid (the window's in windowed blocks).
        max_distance: D of the bias table; offsets up to max(h, w) - 1 <= D are never clipped.
        radius: r, the largest |Δ| per axis.

    Returns:
        ε in [0, 1).
    """
    beta = bias_magnitude
    excess = []  # per axis: the normaliser's excess over the target's own term, S - 1
    for length in grid:
        series = 2 * sum(math.exp(-beta * u * u) for u in range(1, length + 1))  # S(β) - 1, enough terms
        clipped = length * math.exp(-beta * (max_distance - radius) ** 2) if length - 1 > max_distance else 0.0
        excess.append(series + clipped)
    rows, cols = excess
    return (rows + cols + rows * cols) / ((1 + rows) * (1 + cols))  # 1 - 1 / (S_rows S_cols), without cancellation


@torch.no_grad()
def convert_conv_attention(source: ConvolutionalAttention, target: Attention, bias_magnitude: float) -> None:
    """Write into ``target`` the self-attention that reproduces ``source`` (phase 1 -> phase 2 of one block).

    The key projection becomes zero (content scores zero), values and output projection are ``source``'s, the
    bias table is ``one_hot_bias_table`` with β = ``bias_magnitude``, and the query projection keeps ``target``'s
    initialisation. ``target`` must have ``source``'s width and heads and a relative position bias whose table
    covers its sequences without clipping (windows) or with D > r (global attention).

    Raises:
        ValueError: the modules do not fit each other.
    """
    width = source.value.in_features
    bias = target.relative_position
    if bias is None or target.num_heads != source.num_heads or target.qkv.weight.shape != (3 * width, width):
        raise ValueError(
            f"convolutional attention ({source.num_heads} heads, width {width}) converts into self-attention with "
            f"a relative position bias, the same heads and width; got {target.num_heads} heads, qkv "
            f"{tuple(target.qkv.weight.shape)}, relative position {'on' if bias is not None else 'off'}"
        )
    target.qkv.weight[width : 2 * width] = 0.0  # keys: content scores q·k are exactly zero
    target.qkv.bias[width : 2 * width] = 0.0
    target.qkv.weight[2 * width :] = source.value.weight
    target.qkv.bias[2 * width :] = source.value.bias
    target.proj.load_state_dict(source.proj.state_dict())
    table = one_hot_bias_table(source.offsets.cpu(), bias.max_distance, bias_magnitude)
    bias.table.copy_(table.to(bias.table))


def convert_backbone(source: nn.Module, target: nn.Module, bias_magnitude: float) -> None:
    """Fill a self-attention ViT (phase 2) from a convolutional-attention ViT (phase 1) of the same shape.

    Every tensor outside the attention modules is copied; each block's ``ConvolutionalAttention`` is converted
    by ``convert_conv_attention``. Both are ``ViTBackbone``s; ``target`` has ``relative_position=True`` and
    ``conv_radius=0``.

    Raises:
        TypeError: a block of ``source`` without convolutional attention, or of ``target`` without self-attention.
        ValueError: the backbones differ elsewhere, or a global block's D is not above the radius.
    """
    own = target.state_dict()
    shared = {key: value for key, value in source.state_dict().items() if ".attn." not in key}
    misfits = [key for key, value in shared.items() if key not in own or own[key].shape != value.shape]
    if misfits or len(source.blocks) != len(target.blocks):
        raise ValueError(f"phase-1 and phase-2 backbones differ outside attention: {misfits[:6]}")
    target.load_state_dict(shared, strict=False)
    for index, (phase1, phase2) in enumerate(zip(source.blocks, target.blocks)):
        if not isinstance(phase1.attn, ConvolutionalAttention) or not isinstance(phase2.attn, Attention):
            raise TypeError(f"block {index}: phase 1 must use convolutional attention and phase 2 self-attention")
        distance = phase2.attn.relative_position.max_distance if phase2.attn.relative_position is not None else -1
        if phase2.window_size == 0 and distance <= phase1.attn.radius:
            raise ValueError(
                f"block {index} attends globally with relative positions clipped at {distance}: the conversion needs "
                f"relative_position_max_distance > conv_radius = {phase1.attn.radius}"
            )
        convert_conv_attention(phase1.attn, phase2.attn, bias_magnitude)


# ------------------------------------------------------------------------------------------------- Conv2d


@torch.no_grad()
def conv2d_as_attention(conv: nn.Conv2d, patch_size: int, bias_magnitude: float) -> Attention:
    """Self-attention over P x P pixel patches that computes ``conv`` (stride 1, 'same' zero padding).

    Tokens are flattened patches in (p1, p2, channel) order (``patch_tokens``). Head h of the
    ``heads_for_convolution(k, P)`` heads copies the patch at ``neighbourhood_offsets(r)[h]`` (value projection:
    the identity, head width P*P*C_in) and the output projection applies the part of the kernel that reads it,
    found by convolving unit impulses placed in that patch. Use it through ``convolve_as_attention``.

    Args:
        conv: a square, odd-sized kernel, stride 1, dilation 1, one group, ``padding=k // 2``, zero padding mode.
        patch_size: P.
        bias_magnitude: β of the one-hot bias (``attention_leak_bound`` says how close softmax gets).

    Returns:
        Attention with tokens of width P*P*C_in in and P*P*C_out out, and a relative position bias clipped
        at r + 1, in ``conv``'s dtype and device.

    Raises:
        ValueError: a convolution of another kind.
    """
    kernel = conv.kernel_size[0]
    if (
        conv.kernel_size != (kernel, kernel) or kernel % 2 == 0 or conv.stride != (1, 1) or conv.dilation != (1, 1)
        or conv.groups != 1 or conv.padding != (kernel // 2, kernel // 2) or conv.padding_mode != "zeros"
    ):
        raise ValueError(f"convert a square odd kernel, stride 1, dilation 1, one group, padding k // 2; got {conv}")
    radius = patch_radius(kernel, patch_size)
    offsets = neighbourhood_offsets(radius)
    width_in = patch_size * patch_size * conv.in_channels
    width_out = patch_size * patch_size * conv.out_channels
    factory = {"dtype": conv.weight.dtype, "device": conv.weight.device}
    attention = Attention(
        width_in, len(offsets), RelativePositionBias(len(offsets), radius + 1), head_dim=width_in, out_dim=width_out
    ).to(**factory)
    attention.qkv.weight.zero_()
    attention.qkv.bias.zero_()
    values = attention.qkv.weight[2 * width_in * len(offsets) :].view(len(offsets), width_in, width_in)
    values.copy_(torch.eye(width_in, **factory).expand_as(values))  # every head copies its patch
    side = (2 * radius + 1) * patch_size
    for head, (dy, dx) in enumerate(offsets):
        impulses = torch.eye(width_in, **factory).view(width_in, patch_size, patch_size, conv.in_channels)
        canvas = torch.zeros(width_in, conv.in_channels, side, side, **factory)  # [P*P*C_in, C_in, side, side]
        top, left = (radius + dy) * patch_size, (radius + dx) * patch_size
        canvas[:, :, top : top + patch_size, left : left + patch_size] = impulses.permute(0, 3, 1, 2)
        response = F.conv2d(canvas, conv.weight, padding=kernel // 2)  # [P*P*C_in, C_out, side, side]
        centre = response[..., radius * patch_size : (radius + 1) * patch_size, radius * patch_size : (radius + 1) * patch_size]
        block = slice(head * width_in, (head + 1) * width_in)
        attention.proj.weight[:, block] = rearrange(centre, "j o p1 p2 -> (p1 p2 o) j")  # [P*P*C_out, P*P*C_in]
    conv_bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, **factory)
    attention.proj.bias.copy_(conv_bias.repeat(patch_size * patch_size))  # (p1 p2 o) order
    table = one_hot_bias_table(torch.tensor(offsets), radius + 1, bias_magnitude)
    attention.relative_position.table.copy_(table.to(attention.relative_position.table))
    return attention


def patch_tokens(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] (H, W multiples of P) -> [B, H/P * W/P, P*P*C] in (p1, p2, c) order, patches row-major."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def convolve_as_attention(attention: Attention, images: Tensor, patch_size: int, radius: int) -> Tensor:
    """Run a ``conv2d_as_attention`` layer on images: r rings of zero patches (the zero padding), attention, crop.

    Args:
        attention: from ``conv2d_as_attention``.
        images: [B, C_in, H, W], H and W multiples of P.
        patch_size: P.
        radius: r = ``patch_radius(k, P)``.

    Returns:
        [B, C_out, H, W].
    """
    height, width = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    margin = radius * patch_size
    padded = F.pad(images, (margin, margin, margin, margin))  # zero patches: zero values (the value bias is zero)
    grid = (height + 2 * radius, width + 2 * radius)
    out = attention(patch_tokens(padded, patch_size), grid)  # [B, grid_h * grid_w, P*P*C_out]
    out = rearrange(out, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid[0], p1=patch_size, p2=patch_size)
    return out[..., margin : margin + height * patch_size, margin : margin + width * patch_size]


__all__ = [
    "attention_leak_bound",
    "conv2d_as_attention",
    "convert_backbone",
    "convert_conv_attention",
    "convolve_as_attention",
    "one_hot_bias_table",
    "patch_tokens",
]
