"""Deformable-DETR: a multi-scale backbone, a deformable transformer and sigmoid focal heads (Zhu et al. 2021).

Variants: plain, iterative box refinement (the decoder owns per-layer box heads) and two-stage (the decoder also
owns the class heads, and one more pair scores the encoder proposals). Module names follow the reference
implementation: ``input_proj.{l}.{0,1}`` (the feature levels), ``query_embed``, ``class_embed`` / ``bbox_embed``
(one shared head) or ``class_embed.{i}`` / ``bbox_embed.{i}`` (one per decoder layer), which with refinement are
the same heads as ``transformer.decoder.bbox_embed.{i}`` (and two-stage ``transformer.decoder.class_embed.{i}``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_kit.models.backbone.padding import run_backbone
from detr_kit.models.deformable import DeformableTransformer, FeatureLevels, refine_boxes
from detr_kit.structures import DetectionOutput


def _same_heads(a: nn.Module, b: nn.Module | None) -> bool:
    return b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b))


class DeformableDETR(nn.Module):
    """The Deformable-DETR detector.

    Args:
        backbone: returns a list of FeatureMap for ``(images, mask)``, shallowest first.
        levels: the feature levels (input projections and extra levels) over the backbone's.
        position: maps a mask [B, H, W] to an encoding [B, C, H, W] (reference: sine, normalised, offset -0.5).
        transformer: the DeformableTransformer.
        class_embed: the class head ``[..., C] -> [..., K]`` (sigmoid scores), or with refinement one per decoder
            layer (two-stage: the decoder's own class heads).
        bbox_embed: the box head ``[..., C] -> [..., 4]``, or with refinement the decoder's box heads.
        num_queries: Q (300). Two-stage: the number of encoder proposals kept, which the transformer decides.
        aux_loss: return every earlier decoder layer's predictions in ``DetectionOutput.aux``.

    Raises:
        ValueError: for inconsistent parts (refinement heads that are not the decoder's, widths that differ).
    """

    def __init__(
        self,
        backbone: nn.Module,
        levels: FeatureLevels,
        position: nn.Module,
        transformer: DeformableTransformer,
        class_embed: nn.Module,
        bbox_embed: nn.Module,
        num_queries: int = 300,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        decoder = transformer.decoder
        self.box_refine = decoder.bbox_embed is not None
        self.two_stage = transformer.two_stage
        if self.box_refine and not _same_heads(bbox_embed, decoder.bbox_embed):
            raise ValueError("with box refinement bbox_embed must be the decoder's own box heads (decoder.bbox_embed)")
        if self.two_stage and not _same_heads(class_embed, decoder.class_embed):
            raise ValueError("two-stage needs class_embed to be the decoder's own class heads (decoder.class_embed)")
        num_pos_feats = getattr(position, "num_pos_feats", None)
        if num_pos_feats is not None and 2 * num_pos_feats != transformer.hidden_dim:
            raise ValueError(
                f"the position encoding gives {2 * num_pos_feats} channels but the transformer's width is "
                f"{transformer.hidden_dim}; build it with num_pos_feats={transformer.hidden_dim // 2}"
            )
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.backbone = backbone
        self.position = position
        self.input_proj = levels  # the reference's name for the level projections
        self.transformer = transformer
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        self.num_queries = num_queries
        self.num_classes = (class_embed[0] if self.box_refine else class_embed).out_features
        self.num_feature_levels = transformer.num_feature_levels
        self.aux_loss = aux_loss
        if not self.two_stage:
            self.query_embed = nn.Embedding(num_queries, transformer.hidden_dim * 2)

    def forward(self, images: Tensor, mask: Tensor | None = None, exact_padding: bool = False) -> DetectionOutput:
        """Detect objects.

        Args:
            images: [B, 3, H, W] float, normalised, padded to the largest image.
            mask: [B, H, W] bool, True on padding; None means no padding.
            exact_padding: run the backbone on each image unpadded and normalise the levels over valid positions
                only, so that an image's outputs do not depend on the batch (evaluation; see ``run_backbone``).

        Returns:
            DetectionOutput with logits [B, Q, K], boxes [B, Q, 4] cxcywh in 0..1 of the unpadded image, aux (one
            pair per earlier decoder layer, with aux_loss) and, for two-stage, encoder (logits [B, S, K], boxes
            [B, S, 4]).
        """
        if mask is not None and (mask.shape[0] != images.shape[0] or mask.shape[-2:] != images.shape[-2:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(images.shape)}; expected [B, H, W]")
        features = run_backbone(self.backbone, images, mask, exact_padding)[-self.input_proj.num_backbone_levels :]
        srcs, masks = self.input_proj(features, mask, exact_padding)  # L x [B, C, H_l, W_l], L x [B, H_l, W_l]
        return self.forward_levels(srcs, masks)

    def forward_levels(self, srcs: list[Tensor], masks: list[Tensor]) -> DetectionOutput:
        """Run the transformer and the heads on the levels (``forward`` without backbone and projections).

        Args:
            srcs: L projected feature maps [B, C, H_l, W_l].
            masks: L masks [B, H_l, W_l] bool, True on padding.

        Returns:
            DetectionOutput, as ``forward``.
        """
        pos = [self.position(m).to(s.dtype) for s, m in zip(srcs, masks)]  # [B, C, H_l, W_l] each
        out = self.transformer(srcs, masks, pos, None if self.two_stage else self.query_embed.weight)
        hidden = out.hidden_states  # [D, B, Q, C]
        if self.box_refine:
            logits = torch.stack([head(h) for head, h in zip(self.class_embed, hidden)])  # [D, B, Q, K]
            boxes = out.boxes  # [D, B, Q, 4], computed by the decoder's own box heads
        else:
            logits = self.class_embed(hidden)  # [D, B, Q, K]
            boxes = refine_boxes(self.bbox_embed(hidden), out.references)  # [D, B, Q, 4], centres around the points
        aux = tuple(zip(logits[:-1], boxes[:-1])) if self.aux_loss else ()
        encoder = (out.encoder_logits, out.encoder_boxes) if self.two_stage else None
        return DetectionOutput(logits[-1], boxes[-1], aux, encoder)


__all__ = ["DeformableDETR"]
