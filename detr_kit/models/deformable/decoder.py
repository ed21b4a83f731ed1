"""Deformable-DETR's decoder: query self-attention, deformable cross-attention to the encoder memory, and
optional iterative box refinement (Zhu et al. 2021, §4.1 and appendix A.4), with DINO's options (Zhang et al. 2022):
positional queries computed from each layer's anchor box (DAB-DETR), a final norm, look-forward-twice box
predictions and a self-attention mask (contrastive denoising).

Module names follow the reference implementations: ``layers.{i}.{cross_attn,norm1,self_attn,norm2,linear1,linear2,
norm3}``, with refinement ``bbox_embed.{i}`` (and, two-stage, ``class_embed.{i}``), and DINO's ``ref_point_head`` and
``norm``.
"""

from __future__ import annotations

import copy
import math
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
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt [B, Q, C], query_pos [B, Q, C], reference_points [B, Q, L, 2|4], memory [B, S, C] -> [B, Q, C];
        self_attn_mask [Q, Q] bool, True where a query must not see another (None: all see all)."""
        q = tgt + query_pos  # [B, Q, C], also the key
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt, attn_mask=self_attn_mask)))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        hidden = self.dropout3(F.relu(self.linear1(tgt)))  # [B, Q, dim_feedforward]
        return self.norm3(tgt + self.dropout4(self.linear2(hidden)))


class DecoderOutput(NamedTuple):
    """hidden_states [D, B, Q, C] (after the final norm, if any); references [D, B, Q, 2|4], the reference each layer
    attended around (0..1 of the valid image); boxes [D, B, Q, 4] cxcywh predicted by the decoder's box heads, or None
    without them."""

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


def box_sine_embed(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of anchor boxes, the input of DINO's positional-query MLP (DAB-DETR's, coordinate order y, x, w,
    h as the reference has it).

    Args:
        boxes: [..., 4] cxcywh in 0..1.
        num_feats: F features per coordinate (C / 2): sines of the even, cosines of the odd frequencies, interleaved.
        temperature: base of the frequency progression.

    Returns:
        [..., 4F] in at least float32.
    """
    dtype = torch.promote_types(boxes.dtype, torch.float32)
    dim_t = torch.arange(num_feats, dtype=dtype, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # [F]
    pos = boxes.to(dtype)[..., None] * (2 * math.pi) / dim_t  # [..., 4, F]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)  # [..., 4, F]
    return pos[..., [1, 0, 2, 3], :].flatten(-2)  # [..., 4F] in the order y, x, w, h


class DeformableDecoder(nn.Module):
    """``num_layers`` copies of ``layer``, with optional iterative box refinement and DINO's options.

    With ``bbox_embed``, layer ``i``'s box head predicts a correction of its reference (``refine_boxes``) and the
    detached box is the next layer's reference. Layer ``i``'s predicted box is that same box, or with
    ``look_forward_twice`` the correction applied to the previous layer's box *before* detaching (DINO §3.5: the
    prediction's loss also trains the previous layer's box, while the reference passed on carries no gradient).

    Args:
        layer: the layer to copy.
        num_layers: D.
        bbox_embed: None (no refinement) or at least D box heads ``[..., C] -> [..., 4]``; the decoder owns them.
            The same module may appear several times (DINO shares one head across layers).
        class_embed: two-stage only: the class heads, of which entry D scores the encoder proposals (kept here, under
            the reference's name, so that reference checkpoints map key for key).
        ref_point_head: DINO / DAB-DETR: maps the sine embedding of a layer's anchor box [..., 2C] to its positional
            query [..., C], recomputed for every layer from its reference (which must then be a box); None = the
            positional queries are given to ``forward``.
        norm: DINO: a norm applied to every layer's output before the heads (not to what the next layer reads).
        look_forward_twice: predict layer i's box from the previous layer's undetached box (needs ``bbox_embed``).

    Raises:
        ValueError: if ``bbox_embed`` has fewer than D heads, or look-forward-twice has no box heads.
    """

    def __init__(
        self,
        layer: DeformableDecoderLayer,
        num_layers: int,
        bbox_embed: Sequence[nn.Module] | None = None,
        class_embed: Sequence[nn.Module] | None = None,
        ref_point_head: nn.Module | None = None,
        norm: nn.Module | None = None,
        look_forward_twice: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DeformableDecoder needs num_layers >= 1, got {num_layers}")
        if bbox_embed is not None and len(bbox_embed) < num_layers:
            raise ValueError(f"bbox_embed needs one box head per decoder layer ({num_layers}), got {len(bbox_embed)}")
        if look_forward_twice and bbox_embed is None:
            raise ValueError("look_forward_twice needs box refinement (bbox_embed): it changes how refined boxes are predicted")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.hidden_dim = layer.cross_attn.hidden_dim
        self.bbox_embed = None if bbox_embed is None else nn.ModuleList(bbox_embed)
        self.class_embed = None if class_embed is None else nn.ModuleList(class_embed)
        self.ref_point_head = ref_point_head
        self.norm = norm
        self.look_forward_twice = look_forward_twice

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        valid_ratios: Tensor,
        query_pos: Tensor | None,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> DecoderOutput:
        """Decode the queries.

        Args:
            tgt: [B, Q, C] initial query states.
            reference_points: [B, Q, 2] points or [B, Q, 4] boxes, in 0..1 of the valid image.
            memory: [B, S, C] encoder output.
            spatial_shapes: (h, w) per level.
            valid_ratios: [B, L, 2] (w, h) fraction of each level's map that is valid.
            query_pos: [B, Q, C], or None with a ``ref_point_head`` (then computed from each layer's reference).
            memory_padding_mask: [B, S] bool, True on padding, or None.
            self_attn_mask: [Q, Q] bool, True where a query must not see another (contrastive denoising), or None.

        Returns:
            DecoderOutput.

        Raises:
            ValueError: if ``query_pos`` is None without a ``ref_point_head``, or that head gets point references.
        """
        if self.ref_point_head is not None and reference_points.shape[-1] != 4:
            raise ValueError("positional queries from anchors (ref_point_head) need box references [B, Q, 4]")
        if query_pos is None and self.ref_point_head is None:
            raise ValueError("query_pos is required unless the decoder computes it from the anchors (ref_point_head)")
        states, references, boxes = [], [], []
        previous_box = reference_points  # look-forward-twice: the previous layer's box with its gradient
        for index, layer in enumerate(self.layers):
            ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            level_references = reference_points[:, :, None] * ratios[:, None].to(reference_points.dtype)  # [B, Q, L, 2|4]
            if self.ref_point_head is not None:
                # DINO embeds the anchor as scaled to the first level's padded map (its valid ratios), as here.
                sine = box_sine_embed(level_references[:, :, 0], self.hidden_dim // 2).to(memory.dtype)  # [B, Q, 2C]
                query_pos = self.ref_point_head(sine)  # [B, Q, C]
            tgt = layer(tgt, query_pos, level_references, memory, spatial_shapes, memory_padding_mask, self_attn_mask)
            state = tgt if self.norm is None else self.norm(tgt)  # [B, Q, C], what the heads read
            states.append(state)
            references.append(reference_points)
            if self.bbox_embed is not None:
                head = self.bbox_embed[index]
                delta = head(tgt)  # [B, Q, 4]
                refined = refine_boxes(delta, reference_points)  # [B, Q, 4], the next layer's reference
                if self.look_forward_twice or self.norm is not None:
                    # DINO reads the prediction's correction from the normed state, the reference's from the raw one.
                    prediction_delta = delta if self.norm is None else head(state)
                    base = previous_box if self.look_forward_twice else reference_points
                    boxes.append(refine_boxes(prediction_delta, base))
                else:
                    boxes.append(refined)
                previous_box = refined
                reference_points = refined.detach()  # no gradient flows between layers through the references
        # References of different layers may differ in size (2-d start, 4-d after refinement): pad points to boxes.
        width = max(r.shape[-1] for r in references)
        references = [r if r.shape[-1] == width else F.pad(r, (0, width - r.shape[-1])) for r in references]
        return DecoderOutput(torch.stack(states), torch.stack(references), torch.stack(boxes) if boxes else None)


__all__ = ["DecoderOutput", "DeformableDecoder", "DeformableDecoderLayer", "box_sine_embed", "refine_boxes"]
