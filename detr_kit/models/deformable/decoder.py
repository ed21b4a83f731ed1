"""Deformable-DETR's decoder: query self-attention, deformable cross-attention to the encoder memory, and
optional iterative box refinement (Zhu et al. 2021, §4.1 and appendix A.4).

Module names follow the reference implementation: ``layers.{i}.{cross_attn,norm1,self_attn,norm2,linear1,linear2,
norm3}``, and with refinement ``bbox_embed.{i}`` (and, two-stage, ``class_embed.{i}``).
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_kit.models.deformable.attention import MSDeformAttn
from detr_kit.models.heads import inverse_sigmoid
from detr_kit.models.transformer import MultiheadAttention


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention (q = k = tgt + query_pos), deformable cross-attention to the
    memory, then a ReLU feed-forward block.

    Args:
        hidden_dim: C.
        dim_feedforward: hidden size of the feed-forward block (reference: 1024).
        num_levels: L.
        num_heads: M.
        num_points: P.
        dropout: dropout on the residual branches (reference: 0.1).
        attention_dropout: dropout on the self-attention weights; None = ``dropout``.
        activation_dropout: dropout after the feed-forward ReLU; None = ``dropout``.
        impl: the deformable sampling kernel (see ``MSDeformAttn``).
    """

    def __init__(
        self,
        hidden_dim: int,
        dim_feedforward: int,
        num_levels: int,
        num_heads: int,
        num_points: int,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        activation_dropout: float | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(hidden_dim, num_levels, num_heads, num_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        attention_p = dropout if attention_dropout is None else attention_dropout
        self.self_attn = MultiheadAttention(hidden_dim, num_heads, dropout=attention_p)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout if activation_dropout is None else activation_dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        memory_padding_mask: Tensor | None,
    ) -> Tensor:
        """tgt [B, Q, C], query_pos [B, Q, C], reference_points [B, Q, L, 2|4], memory [B, S, C] -> [B, Q, C]."""
        q = tgt + query_pos  # [B, Q, C], also the key
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt)))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        hidden = self.dropout3(F.relu(self.linear1(tgt)))  # [B, Q, dim_feedforward]
        return self.norm3(tgt + self.dropout4(self.linear2(hidden)))


class DecoderOutput(NamedTuple):
    """hidden_states [D, B, Q, C]; references [D, B, Q, 2|4], the reference each layer attended around (0..1 of the
    valid image); boxes [D, B, Q, 4] cxcywh refined by the decoder's box heads, or None without them."""

    hidden_states: Tensor
    references: Tensor
    boxes: Tensor | None


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """A box head's correction applied to a reference in inverse-sigmoid space (the reference's refinement).

    Args:
        delta: [..., 4] box head output.
        reference: [..., 4] boxes cxcywh or [..., 2] points (then only the centre is corrected) in 0..1.

    Returns:
        [..., 4] cxcywh in 0..1.
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


class DeformableDecoder(nn.Module):
    """``num_layers`` copies of ``layer``, with optional iterative box refinement.

    With ``bbox_embed``, layer ``i``'s box head predicts a correction of its reference (``refine_boxes``) and the
    detached box is the next layer's reference.

    Args:
        layer: the layer to copy.
        num_layers: D.
        bbox_embed: None (no refinement) or at least D box heads ``[..., C] -> [..., 4]``; the decoder owns them.
        class_embed: two-stage only: the class heads, of which entry D scores the encoder proposals (kept here, under
            the reference's name, so that reference checkpoints map key for key).

    Raises:
        ValueError: if ``bbox_embed`` has fewer than D heads.
    """

    def __init__(
        self,
        layer: DeformableDecoderLayer,
        num_layers: int,
        bbox_embed: Sequence[nn.Module] | None = None,
        class_embed: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DeformableDecoder needs num_layers >= 1, got {num_layers}")
        if bbox_embed is not None and len(bbox_embed) < num_layers:
            raise ValueError(f"bbox_embed needs one box head per decoder layer ({num_layers}), got {len(bbox_embed)}")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.hidden_dim = layer.cross_attn.hidden_dim
        self.bbox_embed = None if bbox_embed is None else nn.ModuleList(bbox_embed)
        self.class_embed = None if class_embed is None else nn.ModuleList(class_embed)

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        valid_ratios: Tensor,
        query_pos: Tensor,
        memory_padding_mask: Tensor | None,
    ) -> DecoderOutput:
        """Decode the queries.

        Args:
            tgt: [B, Q, C] initial query states.
            reference_points: [B, Q, 2] points or [B, Q, 4] boxes, in 0..1 of the valid image.
            memory: [B, S, C] encoder output.
            spatial_shapes: (h, w) per level.
            valid_ratios: [B, L, 2] (w, h) fraction of each level's map that is valid.
            query_pos: [B, Q, C].
            memory_padding_mask: [B, S] bool, True on padding, or None.

        Returns:
            DecoderOutput.
        """
        states, references, boxes = [], [], []
        for index, layer in enumerate(self.layers):
            ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            level_references = reference_points[:, :, None] * ratios[:, None].to(reference_points.dtype)  # [B, Q, L, 2|4]
            tgt = layer(tgt, query_pos, level_references, memory, spatial_shapes, memory_padding_mask)
            states.append(tgt)
            references.append(reference_points)
            if self.bbox_embed is not None:
                box = refine_boxes(self.bbox_embed[index](tgt), reference_points)  # [B, Q, 4]
                boxes.append(box)
                reference_points = box.detach()  # no gradient flows between layers through the references
        # References of different layers may differ in size (2-d start, 4-d after refinement): pad points to boxes.
        width = max(r.shape[-1] for r in references)
        references = [r if r.shape[-1] == width else F.pad(r, (0, width - r.shape[-1])) for r in references]
        return DecoderOutput(torch.stack(states), torch.stack(references), torch.stack(boxes) if boxes else None)


__all__ = ["DecoderOutput", "DeformableDecoder", "DeformableDecoderLayer", "refine_boxes"]
