"""The geometry of one bilinear sample, written once for the hand-written kernels (``gather.py``).

The convention is ``F.grid_sample``'s with ``align_corners=False`` and zero padding: on an axis of ``size``
pixels a location ``u`` in 0..1 is the pixel coordinate ``p = u * size - 0.5`` (pixel centres at integers),
and the sample is ``sum_i max(0, 1 - |p - i|) * v[i]`` over the pixels ``i`` of the map (``v = 0`` outside).

**Pair form.** Per axis every sample reads two adjacent pixels ``(first, first + 1)``, with ``first`` the pixel
below ``p`` clamped to ``0..max(size - 2, 0)``, each weighted by the hat ``max(0, 1 - |p - pixel|)``. Inside
the map this is the usual bilinear pair; near or beyond a border the pair stays inside the map and the hat
gives the pixels out of the sample's reach weight 0, which is exactly zero padding, with no boolean masks (a
level of size 1 has no second pixel: its weight is capped at 0). On the CPU comparisons, masked writes and
strided inner loops are several times slower than contiguous float ops, so the ``(x, y)`` coordinates are split
into axis-major planes ``[2, n, K]`` (x; y) once, by one transposing copy.

The four corners of a sample are ``CORNERS``: offsets ``(dx, dy)`` from the pair's first pixel. Every tensor
with a corner dimension orders it this way.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))
"""(dx, dy) of each corner from the pair's first pixel: (first, first), (second, first), (first, second), ..."""


class AxisConstants(NamedTuple):
    """Per-sample constants of the pair form, axis-major (x; y), for ``K = L * P`` samples per query-head."""

    sizes: Tensor  # [2, 1, K] (w; h) of each sample's level
    offsets: Tensor  # [2, 1, K] -0.5: pixel centres sit at integers + 0.5
    zeros: Tensor  # [2, 1, K] 0, the lower bound of the pair's first pixel
    last_first: Tensor  # [2, 1, K] max(size - 2, 0), the upper bound of the pair's first pixel
    second_cap: Tensor  # [2, 1, K] 1 where size > 1, else 0: the pair's second pixel exists


def axis_constants(
    shapes: Sequence[tuple[int, int]], num_points: int, dtype: torch.dtype, device: torch.device
) -> AxisConstants:
    """The ``AxisConstants`` of ``L`` levels of (h, w) ``shapes`` with ``num_points`` samples each, in ``dtype``."""
    sizes = torch.tensor([[w for _, w in shapes], [h for h, _ in shapes]], dtype=dtype, device=device)  # [2, L]
    sizes = sizes.repeat_interleave(num_points, 1)[:, None]  # [2, 1, K]
    return AxisConstants(
        sizes,
        torch.full_like(sizes, -0.5),
        torch.zeros_like(sizes),
        (sizes - 2).clamp_(min=0),
        (sizes > 1).to(dtype),
    )


class PairGeometry(NamedTuple):
    """The pixel pairs of ``n`` query-heads' ``K`` samples, axis-major (x; y)."""

    first: Tensor  # [2, n, K] the pair's first pixel (an integer, as a float)
    distance: Tensor  # [2, n, K] pixel coordinate - first, any sign
    weight_first: Tensor  # [2, n, K] hat weight of the first pixel, max(0, 1 - |distance|)
    weight_second: Tensor  # [2, n, K] hat weight of the second pixel, max(0, 1 - |distance - 1|), 0 if none


def pair_geometry(axes: AxisConstants, locations: Tensor) -> PairGeometry:
    """The pixel pairs and hat weights of every sample.

    Args:
        axes: the constants from ``axis_constants``.
        locations: [n, K, 2] (x, y) in 0..1, in the constants' dtype.

    Returns:
        The ``PairGeometry``. A NaN coordinate lands on pixel -2, two pixels outside the map (weight 0);
        +-inf become finite, far outside.
    """
    num_bags, num_samples, _ = locations.shape
    pixels = locations.new_empty(2, num_bags, num_samples).copy_(locations.permute(2, 0, 1))  # [2, n, K] (x; y)
    torch.addcmul(axes.offsets, pixels, axes.sizes, out=pixels)  # [2, n, K] in pixels
    pixels.nan_to_num_(nan=-2.0)
    first = torch.clamp(pixels.floor(), axes.zeros, axes.last_first)  # [2, n, K]
    distance = pixels.sub_(first)  # [2, n, K]
    weight_first = distance.abs().clamp_(max=1.0).neg_().add_(1.0)  # [2, n, K]
    weight_second = (distance - 1.0).abs_().clamp_(max=1.0).neg_().add_(1.0).mul_(axes.second_cap)  # [2, n, K]
    return PairGeometry(first, distance, weight_first, weight_second)


def corner_products(x_weights: Sequence[Tensor], y_weights: Sequence[Tensor]) -> Tensor:
    """The four corners' weights: ``x_weights[dx] * y_weights[dy]`` for each corner ``(dx, dy)`` of ``CORNERS``.

    Args:
        x_weights: (first, second) [n, K] weights along x.
        y_weights: (first, second) [n, K] weights along y (the attention weight may be folded in here).

    Returns:
        [n, 4, K] corner weights.
    """
    num_bags, num_samples = x_weights[0].shape
    weights = x_weights[0].new_empty(num_bags, len(CORNERS), num_samples)  # [n, 4, K]
    for corner, (dx, dy) in enumerate(CORNERS):
        torch.mul(x_weights[dx], y_weights[dy], out=weights[:, corner])
    return weights


def axis_slopes(distance: Tensor, second_cap: Tensor) -> tuple[Tensor, Tensor]:
    """d(weight)/d(pixel) of a pair's two hat weights, with ``grid_sample``'s one-sided convention at integers.

    The first pixel's weight rises (+1) for distance in [-1, 0) and falls (-1) in [0, 1); the second's rises in
    [0, 1) and falls in [1, 2) (where the pair sits against the map's far border); both are 0 elsewhere (and the
    second's wherever the level has no second pixel).

    Args:
        distance: [2, n, K] pixel coordinate - first pixel (``PairGeometry.distance``).
        second_cap: [2, 1, K] (``AxisConstants.second_cap``).

    Returns:
        (slope_first, slope_second), each [2, n, K].
    """
    steps = [(distance >= edge).to(distance.dtype) for edge in (-1.0, 0.0, 1.0, 2.0)]  # [2, n, K] each
    slope_first = steps[0].sub_(steps[1]).sub_(steps[1]).add_(steps[2])
    slope_second = steps[1].sub_(steps[2]).sub_(steps[2]).add_(steps[3]).mul_(second_cap)
    return slope_first, slope_second


def pixel_gradient(corner_gradients: Tensor, geometry: PairGeometry, second_cap: Tensor) -> Tensor:
    """Chain rule from the corners' weights to the sample's pixel coordinate.

    Args:
        corner_gradients: [n, 4, K] d loss / d (bilinear weight of each corner), corners as ``CORNERS``.
        geometry: the samples' ``PairGeometry``.
        second_cap: [2, 1, K] (``AxisConstants.second_cap``).

    Returns:
        [n, K, 2] d loss / d pixel coordinate (x, y).
    """
    slope_first, slope_second = axis_slopes(geometry.distance, second_cap)  # [2, n, K] each
    hat_first, hat_second = geometry.weight_first, geometry.weight_second  # [2, n, K] each

    def corner(dx: int, dy: int) -> Tensor:
        return corner_gradients[:, CORNERS.index((dx, dy))]  # [n, K]

    # d loss / d (hat weight of pixel d of one axis): its two corners, times the other axis' hat weights.
    x_first, x_second = (corner(dx, 0) * hat_first[1] + corner(dx, 1) * hat_second[1] for dx in (0, 1))
    y_first, y_second = (corner(0, dy) * hat_first[0] + corner(1, dy) * hat_second[0] for dy in (0, 1))
    return torch.stack(
        [x_first * slope_first[0] + x_second * slope_second[0], y_first * slope_first[1] + y_second * slope_second[1]],
        2,
    )  # [n, K, 2]
