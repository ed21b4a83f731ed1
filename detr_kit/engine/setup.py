"""Everything a training run needs, built once from its config: data, model, losses, loaders and optimizer."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from detr_kit import build
from detr_kit.config import Config
from detr_kit.data.loaders import build_train_loader, build_val_loader
from detr_kit.engine.distributed import DistributedInfo
from detr_kit.engine.optim import build_lr_scheduler, build_optimizer, freeze_untrained
from detr_kit.engine.signals import shield_workers
from detr_kit.errors import CheckpointError, PickledCodeError
from detr_kit.structures import LabelMap


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


@dataclass
class TrainingParts:
    """What the trainer trains and evaluates.

    ``eval_coco`` is the split evaluation scores against (the validation split, or with ``train.overfit_batches`` the
    training images without augmentation), ``vis_dataset`` the images drawn after each evaluation.
    """

    label_map: LabelMap
    model: nn.Module
    criterion: nn.Module
    postprocessor: nn.Module
    train_dataset: Dataset
    eval_dataset: Dataset
    vis_dataset: Dataset
    train_loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int


def build_training_parts(cfg: Config, dist: DistributedInfo) -> TrainingParts:
    """Build the data, the model (with ``train.init_from``'s weights), the losses, the loaders and the optimizer.

    The model is built after seeding with ``train.seed``, so every rank builds the same one.

    Raises:
        DatasetError, CheckpointError, ConfigError: for unusable data, pretrained weights or settings.
    """
    t, d = cfg.train, cfg.data
    seed_everything(t.seed, t.deterministic)
    train_dataset, val_dataset = build.build_datasets(cfg)
    label_map = train_dataset.label_map
    model = build.build_model(cfg, num_classes=len(label_map)).to(dist.device)
    if t.init_from:
        load_init_weights(model, t.init_from, t.init_from_trusted)
    rank, world = dist.rank, dist.world_size
    if t.overfit_batches > 0:
        # The first N batches of the training images, without augmentation, for training and evaluation; N batches
        # per rank, a multiple of the world size so that every rank takes as many steps.
        eval_dataset = build.build_dataset(d, "train", train=False, label_map=label_map)
        count = min(len(eval_dataset), t.overfit_batches * d.batch_size * world)
        vis_dataset = Subset(eval_dataset, range(count - count % world))
        train_loader = build_val_loader(vis_dataset, d.batch_size, d.num_workers, rank, world)
        val_loader = build_val_loader(vis_dataset, cfg.eval.batch_size, d.num_workers, rank, world)
    else:
        eval_dataset = vis_dataset = val_dataset
        train_loader = build_train_loader(train_dataset, d.batch_size, d.num_workers, d.aspect_ratio_grouping, t.seed,
                                          rank, world)
        val_loader = build_val_loader(val_dataset, cfg.eval.batch_size, d.num_workers, rank, world)
    shield_workers(train_loader)
    shield_workers(val_loader)
    freeze_untrained(model, t)
    optimizer = build_optimizer(model, t)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / t.accumulate_steps))
    return TrainingParts(
        label_map, model, build.build_criterion(cfg, num_classes=len(label_map)).to(dist.device),
        build.build_postprocessor(cfg), train_dataset, eval_dataset, vis_dataset, train_loader, val_loader,
        optimizer, build_lr_scheduler(optimizer, t, steps_per_epoch), steps_per_epoch,
    )


def load_init_weights(model: nn.Module, source: str | Path, trusted: bool) -> Any:
    """``train.init_from``: a detr_kit, official or Hugging Face checkpoint's weights, class heads re-initialised.

    Raises:
        CheckpointError: naming ``train.init_from`` (and ``train.init_from_trusted`` for pickled code).
    """
    from detr_kit.compat import load_pretrained

    if not Path(source).exists():
        raise CheckpointError(f"train.init_from={source} does not exist",
                              "give a detr_kit, official or Hugging Face checkpoint file or folder")
    try:
        return load_pretrained(model, source, trusted=trusted)
    except PickledCodeError as err:
        raise PickledCodeError(f"train.init_from: {err.what}", "refused for safety; set "
                               "train.init_from_trusted=true if you trust its source") from err
    except CheckpointError as err:
        raise CheckpointError(f"train.init_from: {err.what}", err.fix) from err


__all__ = ["TrainingParts", "build_training_parts", "load_init_weights", "seed_everything"]
