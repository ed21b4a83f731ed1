"""Autocast for code that also runs where autocast does not exist (``meta``): what it casts to, and a region
without it (sampling locations need float32, so the deformable sampling runs in float32 under autocast)."""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, or None where it is off (or has no autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def float32_region(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type`` (a kernel's backward runs under the caller's autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
