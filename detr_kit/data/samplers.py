"""Batch samplers: aspect-ratio grouping on top of a (distributed) shuffling sampler."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def aspect_ratio_groups(aspect_ratios: Sequence[float], num_bins: int = 1) -> list[int]:
    """Group id per image from its width/height ratio.

    ``num_bins=1`` gives two groups, portrait (w/h < 1) and landscape. Larger values split each side
    into ``num_bins`` log-spaced bins between ratio 1/2 and 2 (torchvision's grouping idea), so
    group count is ``2 * num_bins`` plus the two open ends.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    ratios = np.asarray(aspect_ratios, dtype=np.float64)
    if ratios.size and not (np.isfinite(ratios).all() and (ratios > 0).all()):
        raise ValueError("aspect ratios must be finite and positive")
    if num_bins == 1:
        return (ratios >= 1.0).astype(np.int64).tolist()
    edges = 2.0 ** np.linspace(-1, 1, 2 * num_bins + 1)  # ratio 1/2 .. 2, with 1 as the middle edge
    return np.searchsorted(edges, ratios, side="right").tolist()


class GroupedBatchSampler(Sampler[list[int]]):
    """Yield batches whose images share a group (e.g. an aspect-ratio bin), so less padding is needed.

    Indices come from ``sampler`` (a ``DistributedSampler`` for shuffling and sharding); each one is
    put in its group's bucket, and a bucket is emitted when it holds ``batch_size`` indices. At the
    end of an epoch the leftovers are emitted in mixed batches (or dropped when ``drop_last``), so
    every index of the epoch appears exactly once. ``set_epoch`` is forwarded to the sampler.

    Args:
        sampler: yields dataset indices; may have ``set_epoch``.
        group_ids: group of every dataset index (one entry per dataset item).
        batch_size: images per batch.
        drop_last: drop the final incomplete batch.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (deterministic for the sampler's seed)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        for index in self.sampler:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()
        leftovers = [index for group in sorted(buckets) for index in buckets[group]]
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        counts: dict[int, int] = {}
        for index in self.sampler:
            counts[self.group_ids[index]] = counts.get(self.group_ids[index], 0) + 1
        full = sum(n // self.batch_size for n in counts.values())
        rest = sum(n % self.batch_size for n in counts.values())
        return full + (rest // self.batch_size if self.drop_last else math.ceil(rest / self.batch_size))


__all__ = ["GroupedBatchSampler", "aspect_ratio_groups"]
