"""Dropout for the transformer layers that is cheap to draw and saves (almost) nothing for backward.

On the CPU, ``torch.nn.functional.dropout`` draws one Bernoulli sample per element (``bernoulli_``) and keeps a
mask for backward. Drawing 64 uniform random bits per int64 element with ``random_`` is ~6x faster for the same
number of elements once the bits are split into four 16-bit fields and compared with a threshold; two ops are
built on that:

- :func:`dropout` saves only a seed: its backward draws the same bits again from a ``torch.Generator`` seeded
  with it. The seed itself comes from the default generator, so ``torch.manual_seed`` makes runs reproducible
  and ``torch.utils.checkpoint`` (which restores the default generator's state before it recomputes a forward)
  recomputes exactly the same mask.
- :func:`relu_dropout` is ``dropout(relu(x))``, whose backward needs only its output ``y``: ``y > 0`` exactly
  where ``x > 0`` and the element was kept, so ``grad_x = grad_y * scale`` there and 0 elsewhere. The next
  ``Linear`` keeps ``y`` for its own weight gradient anyway, so the fused op adds no memory (unfused, ReLU's
  output and the dropout mask are kept as well). ``y`` must not be modified in place afterwards; autograd's
  version counter turns that into an error in backward.

Drop probabilities are quantised to multiples of 2**-16 (an element is dropped when its 16 random bits, read
as a signed integer, are below ``-32768 + round(p * 65536)``), so the drop rate differs from ``p`` by at most
7.7e-6; kept values are scaled by exactly ``1 / (1 - p)``, as ``F.dropout`` does.

Outside training (or with ``p == 0``) both functions are the plain ops (identity, ``relu``), with no custom
autograd function, so inference, tracing and ONNX export see ordinary graphs. On devices other than the CPU,
and under ``torch.compile``, :func:`dropout` is ``F.dropout`` (GPUs have a fused kernel, the compiler fuses its
own); :func:`relu_dropout` keeps its output-only backward on every device and draws its mask with
``F.dropout`` there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["dropout", "random_int16", "relu_dropout"]

_BITS = 16  # random bits per element: drop probabilities are multiples of 2**-16
_LEVELS = 1 << _BITS
_FIELDS_PER_WORD = 64 // _BITS  # 16-bit fields in one int64 random word


def _check_probability(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


def _drop_threshold(p: float) -> int:
    """Signed 16-bit threshold: ``bits < threshold`` has probability ``round(p * 65536) / 65536``."""
    return -(_LEVELS // 2) + min(round(p * _LEVELS), _LEVELS - 1)


def random_int16(shape: torch.Size, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Draw int16 values uniform over [-32768, 32767], every bit independent and fair.

    ``random_`` on int64 with ``from`` = int64 min and no ``to`` fills all 64 bits of each word (plain
    ``random_()`` on int32 or int64 leaves the sign bit at 0); each word is read as four int16 fields.

    Args:
        shape: shape of the result.
        device: device of the result.
        generator: source of randomness; None uses the device's default generator.

    Returns:
        int16 tensor of ``shape``.
    """
    numel = 1
    for size in shape:
        numel *= size
    num_words = -(-numel // _FIELDS_PER_WORD)
    words = torch.empty(num_words, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)  # [ceil(N / 4)], all 64 bits uniform
    return words.view(torch.int16)[:numel].view(shape)  # [*shape]


def _drop_mask(shape: torch.Size, device: torch.device, p: float, generator: torch.Generator | None) -> Tensor:
    """bool mask of ``shape``, True (drop) with probability p quantised to 2**-16."""
    return random_int16(shape, device, generator) < _drop_threshold(p)


def _draw_seed() -> int:
    """A 63-bit seed from the default CPU generator (restored by checkpoint, set by ``torch.manual_seed``)."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class _SeededDropout(torch.autograd.Function):
    """CPU dropout that keeps only the seed of its mask for backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, p: float) -> Tensor:
        seed = _draw_seed()
        drop = _drop_mask(x.shape, x.device, p, torch.Generator(device=x.device).manual_seed(seed))  # [*x.shape]
        ctx.seed, ctx.p = seed, p
        return torch.where(drop, 0, x).mul_(1.0 / (1.0 - p))  # [*x.shape], x.dtype

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        generator = torch.Generator(device=grad.device).manual_seed(ctx.seed)
        drop = _drop_mask(grad.shape, grad.device, ctx.p, generator)  # the forward's mask, drawn again
        return torch.where(drop, 0, grad).mul_(1.0 / (1.0 - ctx.p)), None


class _ReLUDropout(torch.autograd.Function):
    """``dropout(relu(x))`` whose backward reads only its output; with ``inplace`` the output is ``x`` itself."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, p: float, inplace: bool) -> Tensor:
        scale = 1.0 / (1.0 - p)
        if x.device.type == "cpu":
            drop = _drop_mask(x.shape, x.device, p, None)  # [*x.shape]; the default generator, as F.dropout
            # In place, a masked fill is ~3x cheaper than torch.where into a fresh (page-faulting) tensor.
            y = x.masked_fill_(drop, 0) if inplace else torch.where(drop, 0, x)
            y = y.relu_().mul_(scale)
        elif inplace:
            y = F.dropout(x.relu_(), p, training=True, inplace=True)
        else:
            y = F.dropout(F.relu(x), p, training=True)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (y,) = ctx.saved_tensors
        # y > 0 exactly where x > 0 and the element was kept; ReLU's own backward kernel masks the gradient.
        return torch.ops.aten.threshold_backward(grad, y, 0).mul_(ctx.scale), None, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)`` (training only).

    Args:
        x: [...] floating-point tensor, any dtype (also under ``torch.autocast``).
        p: drop probability in [0, 1); on the CPU quantised to a multiple of 2**-16.
        training: False returns ``x`` itself.

    Returns:
        [...] tensor of x's shape and dtype.

    Raises:
        ValueError: if ``p`` is outside [0, 1).
    """
    _check_probability(p)
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    return _SeededDropout.apply(x, p)


def relu_dropout(x: Tensor, p: float, training: bool, inplace: bool = False) -> Tensor:
    """``dropout(relu(x))`` that keeps only its output for backward.

    The output must not be modified in place afterwards (autograd raises in backward if it is).

    Args:
        x: [...] floating-point tensor, any dtype (also under ``torch.autocast``).
        p: drop probability in [0, 1); on the CPU quantised to a multiple of 2**-16.
        training: False (or p == 0) returns ``relu(x)``.
        inplace: overwrite ``x`` with the result (no second buffer of x's size): for a fresh tensor that nothing
            else reads, e.g. a ``Linear``'s output.

    Returns:
        [...] tensor of x's shape and dtype, >= 0.

    Raises:
        ValueError: if ``p`` is outside [0, 1).
    """
    _check_probability(p)
    if not training or p == 0.0:
        return F.relu(x, inplace=inplace)
    if torch.compiler.is_compiling():
        return F.dropout(F.relu(x), p, training=True)
    return _ReLUDropout.apply(x, p, inplace)
