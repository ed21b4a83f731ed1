"""ms_deform_attn trains on float16 / bfloat16 values on the CPU (a ``.half()`` or ``.bfloat16()`` model).

The CPU's training kernel ("gather") takes corner dot products with ``torch.sparse.sampled_addmm``, which has no
half-precision CPU kernel, so such values are sampled in float32 (as under autocast). The output and all three
gradients are checked against the independent float64 bilinear sampler of ``references.py`` on the same rounded
inputs: only the final rounding to the value's dtype may differ.
"""

from __future__ import annotations

import pytest
import torch

from detr_kit.ops.deform_attn import ms_deform_attn
from references import bilinear_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(6, 9), (3, 5), (2, 2)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_value_trains_on_cpu_like_the_float64_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    total = sum(h * w for h, w in SHAPES)
    value = torch.randn(2, total, 3, 4, generator=gen, dtype=torch.float64)  # [B, S, M, Dh]
    locations = torch.rand(2, 7, 3, len(SHAPES), 2, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(2, 7, 3, len(SHAPES), 2, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, 7, 12, generator=gen, dtype=torch.float64)

    # As MSDeformAttn calls it for a half-precision model: the value in that dtype, locations and weights in float32.
    low = [value.to(dtype).requires_grad_(), locations.float().requires_grad_(), weights.float().requires_grad_()]
    out = ms_deform_attn(low[0], SHAPES, low[1], low[2])
    assert out.dtype == dtype
    out.backward(grad_out.to(dtype))

    exact = [value.to(dtype).double().requires_grad_(), locations.float().double().requires_grad_(),
             weights.float().double().requires_grad_()]
    expected = bilinear_reference(exact[0], SHAPES, exact[1], exact[2])
    expected.backward(grad_out.to(dtype).double())
    tolerance = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # two units of the dtype's precision
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(out.double(), expected.detach(), atol=tolerance * scale, rtol=0)
    for got, want in zip(low, exact):
        assert got.grad is not None and got.grad.dtype == got.dtype
        grad_scale = float(want.grad.abs().max())
        torch.testing.assert_close(got.grad.double(), want.grad, atol=tolerance * grad_scale, rtol=0)
