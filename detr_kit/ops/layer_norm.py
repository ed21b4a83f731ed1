"""A LayerNorm that keeps its output for backward instead of its input.

In a post-norm transformer layer the norm's output is kept for backward anyway, by the next layer's (or the
feed-forward block's) linear projections, while ``torch.nn.LayerNorm`` keeps its input as well: one
``[B, S, C]`` tensor per norm that only the norm needs. The normalised input is an affine function of the output,
``x_hat = (y - bias) / weight``, so backward can recompute it from ``y``:

    grad_x = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat)),   g_hat = grad_y * weight

with ``rstd`` ([..., 1] per row) the only extra tensor kept. Recovering ``x_hat`` divides by ``weight``, which
loses precision where ``|weight|`` is tiny next to ``|bias|``; the output-saving form is used only where every
channel has ``|weight| >= 1e-3 * max(|bias|, 1)`` (checked on each training forward) and otherwise falls back to
``F.layer_norm``, as it does on other devices than the CPU (the check would be a host sync there), under
autocast (where layer_norm runs in float32 on its own terms) and outside training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["OutputSavingLayerNorm"]

_MIN_WEIGHT_RATIO = 1e-3  # |weight| >= ratio * max(|bias|, 1) in every channel, or the plain layer_norm runs


class _LayerNormSavingOutput(torch.autograd.Function):
    """``layer_norm`` over the last dimension whose backward reads its output, weight, bias and ``rstd``."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, _, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)  # y [..., C], rstd [..., 1]
        ctx.save_for_backward(y, weight, bias, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        y, weight, bias, rstd = ctx.saved_tensors
        x_hat = (y - bias).div_(weight)  # [..., C] the normalised input
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            g_hat = grad * weight  # [..., C]
            mean_g = g_hat.mean(-1, keepdim=True)  # [..., 1]
            mean_gx = (g_hat * x_hat).mean(-1, keepdim=True)  # [..., 1]
            grad_x = g_hat.sub_(mean_g).sub_(x_hat * mean_gx).mul_(rstd)  # [..., C]
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat).reshape(-1, y.shape[-1]).sum(0)  # [C]
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, y.shape[-1]).sum(0)  # [C]
        return grad_x, grad_weight, grad_bias, None


class OutputSavingLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, state-dict keys and results) that keeps its output, not its input, for
    backward where that is exact enough (see the module docstring). For a norm whose output is kept anyway.

    Args:
        normalized_shape: C, the last dimension (one dimension only).
        eps: added to the variance.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5) -> None:
        super().__init__(normalized_shape, eps=eps)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"OutputSavingLayerNorm normalises the last dimension only, got {normalized_shape}")

    @classmethod
    def adopt(cls, norm: nn.LayerNorm) -> "OutputSavingLayerNorm":
        """An OutputSavingLayerNorm over ``norm``'s own parameters (the same tensors, not copies)."""
        if norm.weight is None or norm.bias is None:
            raise ValueError("OutputSavingLayerNorm.adopt needs a LayerNorm with weight and bias")
        with torch.device("meta"):  # no storage for parameters that are replaced at once
            adopted = cls(norm.normalized_shape[-1], eps=norm.eps)
        adopted.weight, adopted.bias = norm.weight, norm.bias
        return adopted

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C]
        weight, bias = self.weight, self.bias
        if (
            self.training
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and bool((weight.abs() >= _MIN_WEIGHT_RATIO * bias.abs().clamp(min=1.0)).all())
        ):
            return _LayerNormSavingOutput.apply(x, weight, bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
