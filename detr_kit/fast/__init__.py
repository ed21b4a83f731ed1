"""Fast paths layered over the plain model: ``optimize(model)`` swaps modules for replacements that compute the
same function (float64-tested against the plain modules) with less time and memory, and load the same state dicts.

The model files are the definition: plain ``nn.LayerNorm``, ``nn.Dropout``, residuals and feed-forward blocks, as
the papers write them. ``build_model`` applies ``optimize`` unless ``model.fast`` is false. What it replaces:

- ResNet and torchvision backbones (RegNet, MobileNet, EfficientNet; ConvNeXt and Swin have no batch norm): each
  bias-free convolution applies the frozen batch norm after it (``frozen_norm``), and convolutional bodies (all but
  Swin's) run in channels-last memory (faster convolutions on CPU and with AMP on GPUs).
- Transformer layers (DETR and Deformable-DETR): dropout that keeps a seed instead of a mask, a fused ReLU-dropout
  and a row-chunked feed-forward block, residual sums in place without autograd; Deformable-DETR's encoder norms
  keep their output instead of their input, its feed-forward blocks are optionally recomputed in backward, and its
  deformable attention projects the sampling offsets as x/y planes and keeps ``query`` and ``query_pos`` rather than
  their sum (``layers``, ``deform_attn``).

The deformable sampling kernel itself is chosen inside the op (``detr_kit.ops.deform_attn``), plain or not.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from detr_kit.fast.frozen_norm import fold_frozen_norms
from detr_kit.fast.layers import (
    FastDeformableDecoderLayer,
    FastDeformableEncoderLayer,
    FastTransformerDecoderLayer,
    FastTransformerEncoderLayer,
)
from detr_kit.models.backbone.resnet import ResNetBackbone
from detr_kit.models.backbone.torchvision_backbone import TorchvisionBackbone
from detr_kit.models.deformable import DeformableDecoderLayer, DeformableEncoder, DeformableEncoderLayer
from detr_kit.models.transformer import TransformerDecoderLayer, TransformerEncoderLayer


def _replace_children(module: nn.Module, replacements: dict[type, Callable[[nn.Module], nn.Module]]) -> int:
    """Replace every descendant whose exact type has an entry by what the entry makes of it; returns the count."""
    found = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) in replacements
    ]
    for parent, name, child in found:
        setattr(parent, name, replacements[type(child)](child))
    return len(found)


def optimize(model: nn.Module, ffn_checkpointing: bool = True) -> nn.Module:
    """Replace ``model``'s modules by their fast equivalents, in place; returns ``model``.

    Args:
        model: any module holding detr_kit's backbones and transformer layers (others are left alone).
        ffn_checkpointing: in training, recompute the Deformable-DETR encoder's feed-forward blocks in backward
            (less memory, ~5 % slower step); encoders that checkpoint whole layers skip it.

    Returns:
        ``model``, which computes the same function and loads and saves the same state dicts.
    """
    for backbone in [m for m in model.modules() if type(m) in (ResNetBackbone, TorchvisionBackbone)]:
        fold_frozen_norms(backbone.body)
        if type(backbone) is ResNetBackbone or backbone.convolutional:  # not Swin, which runs on [B, H, W, C] tokens
            backbone.body.to(memory_format=torch.channels_last)
    for encoder in [m for m in model.modules() if type(m) is DeformableEncoder]:
        checkpointed = ffn_checkpointing and not encoder.activation_checkpointing
        _replace_children(encoder, {DeformableEncoderLayer: lambda layer: FastDeformableEncoderLayer(layer, checkpointed)})
    _replace_children(model, {
        DeformableEncoderLayer: lambda layer: FastDeformableEncoderLayer(layer, ffn_checkpointing),
        DeformableDecoderLayer: FastDeformableDecoderLayer,
        TransformerEncoderLayer: FastTransformerEncoderLayer,
        TransformerDecoderLayer: FastTransformerDecoderLayer,
    })
    return model


__all__ = ["optimize"]
