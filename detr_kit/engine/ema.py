"""Exponential moving average of model weights, with a decay that warms up over the first updates.

After ``n`` updates the effective decay is ``decay * (1 - exp(-n / warmup_steps))``: close to 0 at the
start, so the average follows the fast-moving early weights instead of remembering the random
initialisation, and approaching ``decay`` once ``n`` is several times ``warmup_steps``
(the schedule of YOLOv5 / timm's ``ModelEmaV2`` warm-up variant).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """A frozen copy of a model whose floating-point weights and buffers track the live model.

    Args:
        model: the model being trained (unwrap DDP first).
        decay: the decay after warm-up, in (0, 1).
        warmup_steps: time constant of the warm-up, in updates; 0 disables the warm-up.
        updates: how many updates were already applied (when resuming).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup_steps: int = 2000, updates: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ModelEMA: decay={decay!r} is invalid; allowed: a number in (0, 1)")
        if warmup_steps < 0:
            raise ValueError(f"ModelEMA: warmup_steps={warmup_steps!r} is invalid; allowed: an integer >= 0")
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = updates

    def current_decay(self) -> float:
        """The decay the next update uses (after ``self.updates`` updates so far, counting that one)."""
        n = self.updates + 1
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-n / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = d * ema + (1 - d) * live, for every floating-point parameter and buffer; others are copied."""
        d = self.current_decay()
        self.updates += 1
        live = model.state_dict()
        for name, average in self.module.state_dict().items():
            value = live[name].detach()
            if average.is_floating_point():
                average.mul_(d).add_(value.to(average.dtype), alpha=1.0 - d)
            else:
                average.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state.get("decay", self.decay))
        self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))

    def to(self, device: torch.device | str) -> "ModelEMA":
        self.module.to(device)
        return self


__all__ = ["ModelEMA"]
