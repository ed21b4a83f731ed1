"""Multi-scale deformable attention (Zhu et al. 2021, "Deformable DETR", eq. 3): the definition and its kernels.

* ``reference.py``: the definition, one ``F.grid_sample`` per level as in the paper's reference code. It is the
  path while tracing, exporting (ONNX, ``torch.export``) or compiling, and the test oracle of the kernels.
* ``gather.py``: the CPU kernel, for inference and training. Corners are gathered as value rows by
  ``F.embedding_bag`` in cache-sized chunks; backward rebuilds them and uses sparse products.
* ``recompute.py``: the ``grid_sample`` kernel that recomputes each level's samples in backward instead of
  keeping them; the training path on GPUs.
* ``geometry.py``: the bilinear geometry (corner pixels, weights, slopes) the gather kernel is built on.

``ms_deform_attn`` below is the one place that chooses among them; every kernel computes the reference's
function (``tests/ops/test_ms_deform_attn.py`` checks each against it in float64, values and gradients).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from detr_kit.ops.deform_attn.gather import gather_sample_and_sum
from detr_kit.ops.autocast import autocast_dtype
from detr_kit.ops.deform_attn.recompute import recompute_sample_and_sum
from detr_kit.ops.deform_attn.reference import ms_deform_attn_reference

Impl = Literal["auto", "reference", "gather", "recompute"]
IMPLS: tuple[str, ...] = ("auto", "reference", "gather", "recompute")
_KERNELS: dict[str, Callable[[Tensor, list[tuple[int, int]], Tensor, Tensor], Tensor]] = {
    "reference": ms_deform_attn_reference,
    "gather": gather_sample_and_sum,
    "recompute": recompute_sample_and_sum,
}


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: Impl = "auto",
) -> Tensor:
    """Sample every level at the given locations and sum the samples with the attention weights.

    Bilinear sampling with zero padding outside each map, ``align_corners=False`` on ``2 * loc - 1``
    (``F.grid_sample``), exactly as ``reference.ms_deform_attn_reference``. Under ``torch.autocast`` the
    sampling and the weighted sum run in float32 and the result is cast to the autocast dtype, as for a
    float16/bfloat16 value on the CPU (cast back to the value's dtype); otherwise the locations and weights are cast
    to the value's dtype. Non-finite locations: the gather kernel treats them as
    outside every map (zero contribution and gradient); ``grid_sample`` (reference, recompute) returns NaN.

    ``impl="auto"`` picks: the reference while tracing, exporting or compiling; on the CPU the gather kernel;
    on other devices the recompute kernel (one ``grid_sample`` per level, summed level by level).

    Args:
        value: [B, S, M, Dh] values of all levels, flattened row-major per level and concatenated.
        spatial_shapes: L (h, w) pairs of ints, or an [L, 2] integer tensor (read once: a device sync, and a
            graph break under ``torch.compile``; pass a list to avoid both).
        sampling_locations: [B, Lq, M, L, P, 2] (x, y) normalised to each level's map, 0..1 inside it.
        attention_weights: [B, Lq, M, L, P], usually summing to 1 over (L, P).
        impl: ``"auto"``, ``"reference"``, ``"gather"`` or ``"recompute"``.

    Returns:
        [B, Lq, M * Dh]: head ``m`` fills channels ``m*Dh:(m+1)*Dh``. It may be a non-contiguous view (the
        recompute kernel's is a transposed [B, M * Dh, Lq] buffer); call ``.contiguous()`` before ``.view``.

    Raises:
        ValueError: if ``impl`` is unknown, or the shapes of the inputs do not agree.
    """
    shapes = _checked_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    kernel = _KERNELS[_choose_kernel(impl, value.device.type)]
    out_dtype = autocast_dtype(value.device.type)
    if out_dtype is None and value.device.type == "cpu" and value.dtype in (torch.float16, torch.bfloat16):
        # A .half()/.bfloat16() model on the CPU: sampled in float32 as under autocast (the locations need it, and
        # the gather kernel's backward has no half-precision CPU form: torch.sparse.sampled_addmm).
        out_dtype = value.dtype
    if out_dtype is None:
        dtype = value.dtype
        return kernel(value, shapes, sampling_locations.to(dtype), attention_weights.to(dtype))
    with torch.autocast(value.device.type, enabled=False):
        out = kernel(value.float(), shapes, sampling_locations.float(), attention_weights.float())
    return out.to(out_dtype)


def _choose_kernel(impl: str, device_type: str) -> str:
    """The kernel ``impl`` names; for ``"auto"`` the one for this device type and trace state."""
    if impl != "auto":
        if impl not in _KERNELS:
            raise ValueError(f"ms_deform_attn: impl must be one of {IMPLS}, got {impl!r}")
        return impl
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return "reference"
    if device_type == "cpu":
        return "gather"
    # On a GPU one grid_sample per level beats the chunked gather, whose Python loop launches many small kernels
    # (H100, Deformable-DETR at 800x1066: 0.10 s per image with the gather; docs/benchmarks.md); the recompute
    # kernel sums level by level, never holding every level's samples at once as the reference does.
    return "recompute"


def _checked_shapes(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> list[tuple[int, int]]:
    """(h, w) per level (Python ints, or the symbolic / traced sizes of an export), after checking that the inputs'
    shapes agree (ValueError if not)."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must be [L, 2] (h, w) per level, got shape {tuple(spatial_shapes.shape)}")
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(h, w) for h, w in spatial_shapes]  # not int(): traced (0-dim tensor) or symbolic sizes stay so
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, M, Dh], got shape {tuple(value.shape)}")
    batch, total, num_heads, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be [B, Lq, M, L, P, 2], got shape {tuple(sampling_locations.shape)}")
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if sampling_locations.shape[:3] != (batch, num_queries, num_heads) or num_levels != len(shapes):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value {tuple(value.shape)} "
            f"and {len(shapes)} levels; expected [B={batch}, Lq, M={num_heads}, L={len(shapes)}, P, 2]"
        )
    if num_levels * num_points == 0:
        raise ValueError(
            f"ms_deform_attn needs at least one level and one sampling point, got L={num_levels}, P={num_points}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be [B, Lq, M, L, P] = {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if (areas := sum(h * w for h, w in shapes)) != total:
        raise ValueError(f"value has S={total} positions but spatial_shapes {shapes} sum to {areas}")
    return shapes


__all__ = ["IMPLS", "Impl", "ms_deform_attn", "ms_deform_attn_reference"]
