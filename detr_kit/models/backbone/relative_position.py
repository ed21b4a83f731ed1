"""A learned attention bias per head and 2-D relative patch offset (Shaw et al. 2018; Swin, BEiT in 2-D).

The bias a query at patch (i, j) adds to its score for a key at patch (k, l) is ``table[m, dy, dx]`` with the
key's offset from the query, ``dy = clip(k - i)``, ``dx = clip(l - j)``, each clipped to ``[-D, D]``: offsets
beyond D share the border entry. In a window of side s, D = s - 1 covers every offset exactly; global blocks
choose D. Because only offsets enter, one table serves every input size and every window.

With the table at zero the bias is zero and attention is exactly the model without it, so ViTs pretrained
without relative positions (timm, torchvision) load unchanged. Prefix tokens ([CLS]) get no bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RelativePositionBias(nn.Module):
    """The attention bias of a patch grid from a learned table over clipped 2-D offsets.

    Args:
        num_heads: M.
        max_distance: D >= 0; offsets are clipped to [-D, D] per axis.

    Attributes:
        table: [M, 2D + 1, 2D + 1], ``table[m, D + dy, D + dx]`` for a key dy rows below and dx columns right
            of the query; zeros at construction.
    """

    def __init__(self, num_heads: int, max_distance: int) -> None:
        super().__init__()
        if max_distance < 0:
            raise ValueError(f"max_distance must be >= 0, got {max_distance}")
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.zeros(num_heads, 2 * max_distance + 1, 2 * max_distance + 1))

    def forward(self, grid: tuple[int, int], num_prefix: int = 0) -> Tensor:
        """The bias of every (query, key) pair of a row-major patch grid.

        Args:
            grid: (h, w) of the patch grid.
            num_prefix: tokens before the grid ([CLS]); their rows and columns are zero.

        Returns:
            [M, num_prefix + h*w, num_prefix + h*w], the table's dtype.
        """
        height, width = grid
        size = 2 * self.max_distance + 1
        rows = torch.arange(height, device=self.table.device)
        cols = torch.arange(width, device=self.table.device)
        dy = (rows[None, :] - rows[:, None]).clamp(-self.max_distance, self.max_distance) + self.max_distance  # [h, h]
        dx = (cols[None, :] - cols[:, None]).clamp(-self.max_distance, self.max_distance) + self.max_distance  # [w, w]
        index = dy[:, None, :, None] * size + dx[None, :, None, :]  # [h (query), w (query), h (key), w (key)]
        bias = self.table.flatten(1)[:, index.flatten()]  # [M, h*w * h*w]
        bias = bias.view(-1, height * width, height * width)  # [M, h*w, h*w]
        if num_prefix:
            bias = nn.functional.pad(bias, (num_prefix, 0, num_prefix, 0))  # [M, P + h*w, P + h*w]
        return bias

    def extra_repr(self) -> str:
        return f"num_heads={self.table.shape[0]}, max_distance={self.max_distance}"


__all__ = ["RelativePositionBias"]
