"""Frozen batch norms applied by the convolutions before them: one pass instead of two.

A frozen batch norm is affine, so ``norm(conv(x, W)) == conv(x, W * scale) + shift``: one convolution with a
scaled weight and the shift as its bias, instead of a convolution and a full pass over its output (and, in
training, a second pass over its gradient). ``fold_frozen_norms`` replaces each bias-free ``Conv2d`` followed by a
``FrozenBatchNorm2d`` with a ``FrozenNormConv2d`` (the same weight) and the norm with a ``FoldedFrozenBatchNorm2d``
that keeps the statistics (the same buffers and state-dict keys) and passes its input through. The pairs are those
whose convolution output feeds the norm alone: ResNet blocks' ``convN``/``bnN``, and adjacent children of an
``nn.Sequential`` (ResNet's ``downsample``; torchvision's ``Conv2dNormActivation``, which RegNet, MobileNet and
EfficientNet are built of; MobileNetV2's projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_kit.models.backbone.resnet import FrozenBatchNorm2d
from detr_kit.ops.autocast import autocast_dtype


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d that the convolution before it applies: the same buffers, an identity forward."""

    def __init__(self, norm: FrozenBatchNorm2d) -> None:
        nn.Module.__init__(self)
        self.num_features, self.eps = norm.num_features, norm.eps
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(norm, name))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W], already normalised by the convolution
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, applied by the preceding convolution"


class _ScaledConvolution(torch.autograd.Function):
    """``conv2d(x, W * scale, bias=shift)`` for a trained W and fixed ``scale``/``shift``.

    Saves ``x`` and ``W`` (a parameter, kept anyway), not the scaled weight: backward scales ``W`` again (one pass
    over the weights, not over activations) and takes both gradients from one ``convolution_backward``. Under
    autocast the convolution runs in the autocast dtype, as ``F.conv2d`` would, and the weight gradient comes back
    in the weight's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, scale, shift, stride, padding, dilation, groups):  # noqa: ANN001, ANN205
        device_type = x.device.type
        if (dtype := autocast_dtype(device_type)) is not None:
            x = x.to(dtype)
            with torch.autocast(device_type, enabled=False):
                out = _ScaledConvolution._convolution(x, weight, scale, shift, (stride, padding, dilation, groups))
        else:
            out = _ScaledConvolution._convolution(x, weight, scale, shift, (stride, padding, dilation, groups))
        ctx.save_for_backward(x, weight, scale)
        ctx.conv = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def _convolution(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, conv: tuple) -> Tensor:
        scaled = (weight * scale.view(-1, 1, 1, 1)).to(x.dtype)  # [C_out, C_in, k, k]
        return F.conv2d(x, scaled, shift.to(x.dtype), *conv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        scaled = (weight * scale.view(-1, 1, 1, 1)).to(x.dtype)
        grad_x, grad_scaled, _ = torch.ops.aten.convolution_backward(
            grad.to(x.dtype), x, scaled, None, stride, padding, dilation, False, [0] * len(stride), groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )
        grad_weight = None if grad_scaled is None else grad_scaled.to(weight.dtype) * scale.view(-1, 1, 1, 1)
        return grad_x, grad_weight, None, None, None, None, None, None


class FrozenNormConv2d(nn.Module):
    """A bias-free ``Conv2d`` that applies the frozen batch norm after it (the same weight, the same key).

    Args:
        conv: the convolution (bias-free, zero padding mode).
        norm: the folded norm whose statistics it applies (held as a plain reference: the norm's module keeps its
            own place and keys).
    """

    def __init__(self, conv: nn.Conv2d, norm: FoldedFrozenBatchNorm2d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.__dict__["norm"] = norm  # not a submodule: its keys stay where they are

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, H, W] -> [B, C_out, H', W']
        scale, shift = self.__dict__["norm"].scale_and_shift()  # [C_out] each
        if self.weight.requires_grad and torch.is_grad_enabled():
            return _ScaledConvolution.apply(x, self.weight, scale, shift, self.stride, self.padding, self.dilation, self.groups)
        weight = self.weight * scale.view(-1, 1, 1, 1)  # [C_out, C_in, k, k], the conv's memory format
        return F.conv2d(x, weight, shift, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        out_channels, in_channels, *kernel = self.weight.shape
        return f"{in_channels * self.groups}, {out_channels}, kernel_size={tuple(kernel)}, stride={self.stride}, frozen norm applied"


def _pairs(body: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, norm name) of every conv whose output only its norm reads, in a torchvision body."""
    pairs = []
    for module in body.modules():
        for index in (1, 2, 3):  # ResNet's BasicBlock / Bottleneck (and its stem): bnN(convN(x))
            if hasattr(module, f"conv{index}") and hasattr(module, f"bn{index}"):
                pairs.append((module, f"conv{index}", f"bn{index}"))
        if isinstance(module, nn.Sequential):  # each child feeds the next one alone
            names = list(module._modules)
            pairs.extend((module, first, second) for first, second in zip(names, names[1:])
                         if isinstance(module._modules[first], nn.Conv2d) and isinstance(module._modules[second], FrozenBatchNorm2d))
    return pairs


def fold_frozen_norms(body: nn.Module) -> int:
    """Replace every bias-free ``Conv2d`` + ``FrozenBatchNorm2d`` pair of a torchvision ``body`` (a ResNet's stem
    ``conv1``/``bn1``, each block's ``convN``/``bnN`` and ``downsample``; the convolution and norm of each
    ``Conv2dNormActivation`` and other Sequentials) by a FrozenNormConv2d and a folded norm.

    Returns:
        The number of pairs folded.
    """
    folded = 0
    for parent, conv_name, norm_name in _pairs(body):
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        plain = type(conv) is nn.Conv2d and conv.bias is None and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        if plain and type(norm) is FrozenBatchNorm2d:
            folded_norm = FoldedFrozenBatchNorm2d(norm)
            setattr(parent, norm_name, folded_norm)
            setattr(parent, conv_name, FrozenNormConv2d(conv, folded_norm))
            folded += 1
    return folded


__all__ = ["FoldedFrozenBatchNorm2d", "FrozenNormConv2d", "fold_frozen_norms"]
