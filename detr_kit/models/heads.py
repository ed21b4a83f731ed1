"""Prediction heads shared by DETR and Deformable-DETR, and the box-logit helper of the refinement."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

INITIAL_BOX_SIZE_LOGIT = -2.0  # Deformable-DETR's first box head's wh bias: boxes start at sigmoid(-2) ~ 0.12


class MLP(nn.Module):
    """A stack of Linear layers with ReLU between them (DETR's box head is MLP(C, C, 4, num_layers=3)).

    Args:
        in_dim: input features.
        hidden_dim: features of every hidden layer.
        out_dim: output features.
        num_layers: number of Linear layers (>= 1).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:  # [..., in_dim] -> [..., out_dim]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


def focal_prior_bias(prior_prob: float = 0.01) -> float:
    """Class-logit bias so that every class starts at probability ``prior_prob`` (RetinaNet / Deformable-DETR)."""
    return -math.log((1 - prior_prob) / prior_prob)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), with x clamped to [0, 1] and both x and 1 - x clamped to >= eps (the reference's helper)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def deformable_heads(
    hidden_dim: int,
    num_classes: int,
    num_decoder_layers: int,
    box_refine: bool,
    two_stage: bool,
    share_heads: bool = False,
    box_queries: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """Deformable-DETR's class and box heads, initialised as the reference does.

    Class heads start every class at probability 0.01 (focal prior), box heads at a zero correction. Without
    refinement one head of each kind serves every decoder layer, and its box head starts at boxes of
    ``sigmoid(-2)`` of the image. With refinement each decoder layer has its own pair (cloned from one, then only the
    first box head gets the wh bias); two-stage adds a pair for the encoder proposals and keeps every wh bias at 0.

    Args:
        hidden_dim: C.
        num_classes: K.
        num_decoder_layers: D.
        box_refine: one pair per decoder layer (in a ModuleList).
        two_stage: one more pair, last, for the encoder proposals.
        share_heads: with refinement, the D decoder entries are one and the same pair (DINO); the encoder's stays
            its own.
        box_queries: the first layer's references are boxes (two-stage or anchor queries), so no head gets the wh
            bias (DINO initialises every box head at zero).

    Returns:
        (class_embed, bbox_embed): a Linear and an MLP, or ModuleLists of D (two-stage: D + 1) of them.
    """
    class_head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(class_head.bias, focal_prior_bias(0.01))
    box_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    if not box_refine:
        if not box_queries:
            with torch.no_grad():
                box_head.layers[-1].bias[2:] = INITIAL_BOX_SIZE_LOGIT
        return class_head, box_head
    if share_heads:
        class_heads = [class_head] * num_decoder_layers
        box_heads = [box_head] * num_decoder_layers
    else:
        class_heads = [copy.deepcopy(class_head) for _ in range(num_decoder_layers)]
        box_heads = [copy.deepcopy(box_head) for _ in range(num_decoder_layers)]
    if two_stage:
        class_heads.append(copy.deepcopy(class_head))
        box_heads.append(copy.deepcopy(box_head))
    if not (two_stage or box_queries):
        with torch.no_grad():
            box_heads[0].layers[-1].bias[2:] = INITIAL_BOX_SIZE_LOGIT
    return nn.ModuleList(class_heads), nn.ModuleList(box_heads)


__all__ = ["INITIAL_BOX_SIZE_LOGIT", "MLP", "deformable_heads", "focal_prior_bias", "inverse_sigmoid"]
