"""2-D positional encodings of feature maps: DETR's sine encoding and its learned alternative."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinePositionEncoding(nn.Module):
    """The sine/cosine encoding of "Attention Is All You Need", extended to 2-D as in DETR.

    The y and x coordinates of every valid pixel are its cumulative count of valid pixels along the column and
    row, so padding never changes the encoding of valid pixels. With ``normalize`` they are divided by the
    image's extent and scaled to ``scale``.

    Args:
        num_pos_feats: features per axis; the output has 2 * num_pos_feats channels (C / 2 for hidden size C).
        temperature: base of the frequency progression.
        normalize: divide the coordinates by the valid extent (DETR: True).
        scale: the range the normalised coordinates span (DETR: 2π).
        offset: added to the coordinates before normalising (DETR: 0.0; Deformable-DETR: -0.5, pixel centres).
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if num_pos_feats < 2 or num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be an even number >= 2 (sin/cos pairs), got {num_pos_feats}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """Encode every position of a feature map.

        Args:
            mask: [B, H, W] bool, True on padding.

        Returns:
            [B, 2 * num_pos_feats, H, W] float32: the y encoding in the first half of the channels, x in the second.
        """
        not_mask = ~mask  # [B, H, W]
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, H, W], 1..h on valid rows
        x_embed = not_mask.cumsum(2, dtype=torch.float32)  # [B, H, W], 1..w on valid columns
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)  # [F]
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t  # [B, H, W, F]
        pos_y = y_embed[..., None] / dim_t  # [B, H, W, F]
        # Interleave: sin on even features, cos on odd ones.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)  # [B, H, W, F]
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)  # [B, H, W, F]
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}, "
            f"scale={self.scale:.4f}, offset={self.offset}"
        )


class LearnedPositionEncoding(nn.Module):
    """Absolute learned row and column embeddings (DETR's PositionEmbeddingLearned).

    Args:
        num_pos_feats: features per axis; the output has 2 * num_pos_feats channels.
        max_size: the largest feature-map height and width supported.
    """

    def __init__(self, num_pos_feats: int, max_size: int = 50) -> None:
        super().__init__()
        if num_pos_feats < 1 or max_size < 1:
            raise ValueError(f"num_pos_feats and max_size must be >= 1, got {num_pos_feats} and {max_size}")
        self.num_pos_feats = num_pos_feats
        self.max_size = max_size
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """Encode every position of a feature map (the mask only gives the shape).

        Args:
            mask: [B, H, W] bool, True on padding.

        Returns:
            [B, 2 * num_pos_feats, H, W] float: the x (column) embedding first, then y, as DETR orders them.
        """
        batch, height, width = mask.shape
        if height > self.max_size or width > self.max_size:
            raise ValueError(
                f"feature map {height}x{width} exceeds LearnedPositionEncoding max_size={self.max_size}; "
                "build it with a larger max_size"
            )
        x_emb = self.col_embed(torch.arange(width, device=mask.device))  # [W, F]
        y_emb = self.row_embed(torch.arange(height, device=mask.device))  # [H, F]
        pos = torch.cat((x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)), dim=-1)  # [H, W, 2F]
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)  # [B, 2F, H, W]


__all__ = ["LearnedPositionEncoding", "SinePositionEncoding"]
