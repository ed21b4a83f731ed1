"""DataLoaders of detection data, and their course across epochs.

``build_train_loader`` shuffles (per rank, by aspect ratio), ``build_val_loader`` reads in order; both yield
``(ImageBatch, list[Target])``. Every epoch's order and augmentation is a function of (seed, epoch, rank) alone
(``set_epoch``), so a run resumed at an epoch boundary, or in the middle of an epoch (``loader_skipping``), sees
exactly the batches an uninterrupted run would. Nothing here reads a config.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from detr_kit.data.collate import collate
from detr_kit.data.samplers import GroupedBatchSampler, aspect_ratio_groups
from detr_kit.data.transforms import seed_transforms


def _seed_worker_transforms(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker its own augmentation stream (forked copies repeat otherwise)."""
    info = torch.utils.data.get_worker_info()
    transforms = getattr(info.dataset, "transforms", None)
    if transforms is not None and hasattr(transforms, "set_random_seed"):
        seed_transforms(transforms, info.seed)


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    aspect_ratio_grouping: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> DataLoader:
    """A shuffling training DataLoader yielding ``(ImageBatch, list[Target])``.

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch: the order is deterministic for
    (seed, epoch) and differs between epochs. With ``world_size > 1`` each rank reads its own shard
    (a DistributedSampler; the last shard is padded with repeats, as DDP needs equal step counts).
    With ``aspect_ratio_grouping`` a batch holds only portrait or only landscape images (less padding).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    if aspect_ratio_grouping and hasattr(dataset, "aspect_ratios"):
        groups = aspect_ratio_groups(dataset.aspect_ratios())
    else:
        groups = [0] * len(dataset)
    batch_sampler = GroupedBatchSampler(sampler, groups, batch_size, drop_last=drop_last)
    transforms = getattr(dataset, "transforms", None)
    if num_workers == 0 and transforms is not None and hasattr(transforms, "set_random_seed"):
        seed_transforms(transforms, seed * 1000 + rank)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_seed_worker_transforms if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
    )


def build_val_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """An in-order evaluation DataLoader; rank r reads images r, r + world_size, ... (each image exactly once)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, collate_fn=collate)


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
        seed_transforms(transforms, epoch_seed)


def shutdown_workers(iterator: Any) -> None:
    """Stop a DataLoader iterator's workers now (they ignore SIGTERM, so they must be told to exit).

    A partly consumed multi-process iterator that is still alive at interpreter exit would otherwise be
    terminated (SIGTERM, ignored) and joined by multiprocessing's exit handler: a hang.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


__all__ = ["SkipBatches", "build_train_loader", "build_val_loader", "loader_skipping", "set_epoch", "shutdown_workers"]
