"""The training data across epochs: seeding, per-epoch reshuffling, mid-epoch resume and worker shutdown.

Every epoch's order and augmentation is a function of (seed, epoch, rank) alone, so a run resumed at an
epoch boundary, or in the middle of an epoch (:func:`loader_skipping`), sees exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

import os
import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


class SkipBatches:
    """A batch sampler that drops the first ``skip`` batches of another one (mid-epoch resume)."""

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.batch_sampler):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


def loader_skipping(loader: DataLoader, skip: int) -> DataLoader:
    """The same loader without its first ``skip`` batches, which are never loaded."""
    if skip <= 0:
        return loader
    kwargs: dict[str, Any] = dict(
        batch_sampler=SkipBatches(loader.batch_sampler, skip),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        timeout=loader.timeout,
    )
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(loader.dataset, **kwargs)


def set_epoch(loader: DataLoader, epoch: int, seed: int, rank: int) -> None:
    """Make the epoch's shuffling and augmentation a function of (seed, epoch, rank) alone.

    The sampler reshuffles from its epoch number; the loader's generator (which seeds the workers) and,
    without workers, the dataset's augmentation pipeline are reseeded, so a run resumed at an epoch
    boundary sees exactly the images and augmentations an uninterrupted run would.
    """
    for sampler in (loader.batch_sampler, loader.sampler):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            break
    epoch_seed = (seed * 1_000_003 + epoch * 1009 + rank) % 2**63
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)
    transforms = getattr(loader.dataset, "transforms", None)
    if loader.num_workers == 0 and transforms is not None and hasattr(transforms, "set_random_seed"):
        from detr_kit.data.transforms import seed_transforms

        seed_transforms(transforms, epoch_seed)


def shutdown_workers(iterator: Any) -> None:
    """Stop a DataLoader iterator's workers now (they ignore SIGTERM, so they must be told to exit).

    A partly consumed multi-process iterator that is still alive at interpreter exit would otherwise be
    terminated (SIGTERM, ignored) and joined by multiprocessing's exit handler: a hang.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


__all__ = ["SkipBatches", "loader_skipping", "seed_everything", "set_epoch", "shutdown_workers"]
