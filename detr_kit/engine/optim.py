"""The optimizer and the learning-rate schedule of a training run (``TrainConfig``): AdamW in parameter groups by
learning rate and weight decay, linear warm-up and step or cosine decay."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from detr_kit.config import TrainConfig

_NO_DECAY_PARAM_NAMES = ("level_embed", "pos_embed", "cls_token", "mask_token")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _is_backbone_param(name: str) -> bool:
    return "backbone" in name.split(".")


def _vit_layer_scale(name: str, layer_decay: float, num_blocks: int) -> float:
    """ViT layer-wise lr decay (BEiT / ViTDet): ``backbone.blocks.{i}.`` -> decay^(num_blocks - i),
    the patch embedding, position embedding and class token -> decay^(num_blocks + 1), anything else 1."""
    parts = name.split(".")
    if "blocks" in parts:
        index = parts.index("blocks")
        if index + 1 < len(parts) and parts[index + 1].isdigit():
            return layer_decay ** (num_blocks - int(parts[index + 1]))
    if any(key in name for key in ("patch_embed", "pos_embed", "cls_token")):
        return layer_decay ** (num_blocks + 1)
    return 1.0


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters that take no weight decay: biases, norm weights, embeddings and 1-d parameters."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if (
                param.ndim <= 1
                or param_name == "bias"
                or isinstance(module, (nn.Embedding, *_NORM_TYPES))
                or param_name in _NO_DECAY_PARAM_NAMES
            ):
                names.add(full)
    return names


def freeze_untrained(model: nn.Module, train_cfg: TrainConfig) -> list[str]:
    """Freeze (``requires_grad_(False)``) what the config does not train: the backbone when ``lr_backbone`` is 0.

    The one freezing mechanism is ``requires_grad``: the backbones freeze their frozen stages the same way, and
    the optimizer leaves out every parameter that does not require a gradient.

    Returns:
        The names of the parameters frozen here.
    """
    frozen = []
    if train_cfg.lr_backbone == 0:
        for name, param in model.named_parameters():
            if _is_backbone_param(name) and param.requires_grad:
                param.requires_grad_(False)
                frozen.append(name)
    return frozen


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (``requires_grad``), in groups by learning rate and weight decay.

    - backbone parameters (a ``backbone`` component in the name) train at ``lr_backbone`` (call
      ``freeze_untrained`` first to leave the backbone out when that is 0);
    - Deformable-DETR's ``sampling_offsets`` and ``reference_points`` train at ``lr * lr_linear_proj_mult``;
    - with ``no_weight_decay_on_norm_bias``, biases, norm weights and embeddings take no weight decay;
    - with ``layer_decay < 1``, ViT backbone blocks ``backbone.blocks.{i}.`` take ``decay^(num_blocks - i)``
      times the backbone lr.

    Each group carries a ``name`` and its base ``lr``; the scheduler multiplies every group's lr alike.
    """
    t = train_cfg
    params = list(model.named_parameters())
    no_decay = _no_weight_decay_names(model) if t.no_weight_decay_on_norm_bias else set()
    block_ids = {int(m.group(1)) for name, _ in params if (m := re.search(r"backbone\.(?:.*\.)?blocks\.(\d+)\.", name))}
    num_blocks = max(block_ids) + 1 if block_ids else 0

    groups: dict[tuple[str, float, float], dict] = {}
    for name, param in params:
        if not param.requires_grad:
            continue
        if _is_backbone_param(name):
            kind, lr = "backbone", t.lr_backbone
            if t.layer_decay < 1.0 and num_blocks:
                lr *= _vit_layer_scale(name, t.layer_decay, num_blocks)
        elif "sampling_offsets" in name or "reference_points" in name:
            kind, lr = "linear_proj", t.lr * t.lr_linear_proj_mult
        else:
            kind, lr = "main", t.lr
        decay = 0.0 if name in no_decay else t.weight_decay
        key = (kind, lr, decay)
        if key not in groups:
            groups[key] = {"name": f"{kind}/lr={lr:.3g}/wd={decay:g}", "params": [], "param_names": [],
                           "lr": lr, "weight_decay": decay}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters (does train.lr_backbone=0 "
                         "freeze everything?)")
    # The fused kernel (one pass per tensor) is ~4x faster than the per-tensor loop on CPU; it needs floating
    # parameters on CPU or CUDA.
    params = [p for g in groups.values() for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(list(groups.values()), lr=t.lr, weight_decay=t.weight_decay, fused=fused)


class LrFactor:
    """The per-step lr multiplier: linear warm-up, then step decay at epoch boundaries or cosine.

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` saves its settings with the checkpoint.

    Args:
        steps_per_epoch: optimizer steps in one epoch (after gradient accumulation).
        epochs: total epochs (the cosine schedule reaches 0 at the end).
        schedule: "step" or "cosine".
        drop_epochs: epochs at which the step schedule multiplies the lr by ``drop_factor``.
        drop_factor: the step schedule's factor.
        warmup_steps: linear warm-up length in steps (0 = none); the factor rises from 1/warmup_steps to 1.
    """

    def __init__(self, steps_per_epoch: int, epochs: int, schedule: str = "step", drop_epochs: tuple[int, ...] = (),
                 drop_factor: float = 0.1, warmup_steps: int = 0) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"LrFactor: steps_per_epoch={steps_per_epoch!r} is invalid; allowed: an integer >= 1")
        if schedule not in ("step", "cosine"):
            raise ValueError(f"LrFactor: schedule={schedule!r} is invalid; allowed: 'step' or 'cosine'")
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = int(steps_per_epoch * epochs)
        self.schedule = schedule
        self.drop_epochs = tuple(int(e) for e in drop_epochs)
        self.drop_factor = float(drop_factor)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.schedule == "step":
            epoch = step // self.steps_per_epoch
            return warm * self.drop_factor ** sum(epoch >= e for e in self.drop_epochs)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0, step - self.warmup_steps) / span)
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step (see :class:`LrFactor`)."""
    t = train_cfg
    factor = LrFactor(steps_per_epoch, t.epochs, t.lr_schedule, t.lr_drop_epochs, t.lr_drop_factor, t.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["LrFactor", "build_lr_scheduler", "build_optimizer", "freeze_untrained"]
