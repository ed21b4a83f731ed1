"""torch.distributed set-up for ``torchrun``: process group, DDP wrapping and small collectives.

``torchrun --nproc_per_node N tools/train.py CONFIG`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`init_distributed` reads them and joins the group (NCCL on CUDA, gloo on CPU). Without those
variables every helper answers as a single process (rank 0 of 1), so the same code runs everywhere.
Only rank 0 logs and writes checkpoints; the trainer asks :func:`is_main_process`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is invalid; allowed: an integer") from None


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistributedInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Args:
        device: "cpu", "cuda", "cuda:1", ... or None for CUDA when available, else CPU. Under torchrun on
            CUDA each process takes ``cuda:LOCAL_RANK``.
        timeout_s: how long a collective may wait before the group reports an error instead of hanging.

    Returns:
        The rank, world size, local rank and the torch device this process should use.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_min_bool(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only when ``flag`` is True on every rank (e.g. "my loss is finite")."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def all_reduce_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """The mean over ranks of each value (for logging); every rank must pass the same keys."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` when running distributed, else ``model`` itself.

    Args:
        model: the model, already on ``device``.
        device: this process's device.
        find_unused_parameters: set it only when some trainable parameters get no gradient in a step
            (see :func:`unused_parameters`); it costs a graph traversal every step.
    """
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or torch.compile) wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def unused_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters that received no gradient in the last backward pass."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


__all__ = [
    "DistributedInfo",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_min_bool",
    "barrier",
    "cleanup_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "unused_parameters",
    "unwrap",
    "wrap_ddp",
]
