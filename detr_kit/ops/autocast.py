"""Whether ``torch.autocast`` is on for a device type, for code that also runs on devices autocast does not know."""

from __future__ import annotations

import torch


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False for device types without autocast (``meta``)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


__all__ = ["autocast_enabled"]
