"""Deformable-DETR: a multi-scale backbone, a deformable transformer and sigmoid focal heads (Zhu et al. 2021).

Variants: plain, iterative box refinement (the decoder owns per-layer box heads) and two-stage (the decoder also
owns the class heads, and one more pair scores the encoder proposals); DINO's training ideas (Zhang et al. 2022)
are options of the same model: contrastive denoising queries (``denoising``, training with targets only), anchor-box
queries with mixed query selection (the transformer's) and look-forward-twice (the decoder's). Module names follow
the reference implementations: ``input_proj.{l}.{0,1}`` (the feature levels), ``query_embed``, ``class_embed`` /
``bbox_embed`` (one shared head) or ``class_embed.{i}`` / ``bbox_embed.{i}`` (one per decoder layer), which with
refinement are the same heads as ``transformer.decoder.bbox_embed.{i}`` (and two-stage
``transformer.decoder.class_embed.{i}``); DINO's ``label_enc`` is ``denoising.label_enc``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from detr_kit.models.backbone.padding import run_backbone
from detr_kit.models.deformable import DeformableTransformer, FeatureLevels, refine_boxes
from detr_kit.models.deformable.denoising import ContrastiveDenoising
from detr_kit.structures import DenoisingOutput, DetectionOutput, Target


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
        denoising: contrastive denoising (DINO): in training, ``forward(..., targets=...)`` adds noised ground-truth
            queries; needs a transformer with anchor queries. None = off.

    Raises:
        ValueError: for inconsistent parts (refinement heads that are not the decoder's, widths that differ,
            denoising without anchor queries).
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
        denoising: ContrastiveDenoising | None = None,
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
        if denoising is not None and not transformer.anchor_queries:
            raise ValueError("contrastive denoising needs a transformer with anchor queries (anchor_queries > 0)")
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
        self.denoising = denoising
        if not self.two_stage and not transformer.anchor_queries:
            self.query_embed = nn.Embedding(num_queries, transformer.hidden_dim * 2)

    def forward(
        self,
        images: Tensor,
        mask: Tensor | None = None,
        exact_padding: bool = False,
        targets: Sequence[Target] | None = None,
    ) -> DetectionOutput:
        """Detect objects.

        Args:
            images: [B, 3, H, W] float, normalised, padded to the largest image.
            mask: [B, H, W] bool, True on padding; None means no padding.
            exact_padding: run the backbone on each image unpadded and normalise the levels over valid positions
                only, so that an image's outputs do not depend on the batch (evaluation; see ``run_backbone``).
            targets: the B images' targets, read in training by contrastive denoising only (ignored otherwise).

        Returns:
            DetectionOutput with logits [B, Q, K], boxes [B, Q, 4] cxcywh in 0..1 of the unpadded image, aux (one
            pair per earlier decoder layer, with aux_loss), for two-stage encoder (logits [B, S, K], boxes
            [B, S, 4]; mixed query selection: [B, Q, K], [B, Q, 4]) and, when training with denoising and targets,
            denoising.
        """
        if mask is not None and (mask.shape[0] != images.shape[0] or mask.shape[-2:] != images.shape[-2:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(images.shape)}; expected [B, H, W]")
        if targets is not None and len(targets) != images.shape[0]:
            raise ValueError(f"got {len(targets)} targets for {images.shape[0]} images")
        features = run_backbone(self.backbone, images, mask, exact_padding)[-self.input_proj.num_backbone_levels :]
        srcs, masks = self.input_proj(features, mask, exact_padding)  # L x [B, C, H_l, W_l], L x [B, H_l, W_l]
        return self.forward_levels(srcs, masks, targets)

    def forward_levels(
        self, srcs: list[Tensor], masks: list[Tensor], targets: Sequence[Target] | None = None
    ) -> DetectionOutput:
        """Run the transformer and the heads on the levels (``forward`` without backbone and projections).

        Args:
            srcs: L projected feature maps [B, C, H_l, W_l].
            masks: L masks [B, H_l, W_l] bool, True on padding.
            targets: as ``forward``.

        Returns:
            DetectionOutput, as ``forward``.
        """
        pos = [self.position(m).to(s.dtype) for s, m in zip(srcs, masks)]  # [B, C, H_l, W_l] each
        queries = None
        if self.denoising is not None and self.training and targets is not None:
            queries = self.denoising(targets)  # P denoising queries, decoded before the Q matching ones
        query_embed = None if self.two_stage or self.transformer.anchor_queries else self.query_embed.weight
        out = self.transformer(srcs, masks, pos, query_embed, queries)
        hidden = out.hidden_states  # [D, B, P + Q, C]
        if self.box_refine:
            logits = torch.stack([head(h) for head, h in zip(self.class_embed, hidden)])  # [D, B, P + Q, K]
            boxes = out.boxes  # [D, B, P + Q, 4], computed by the decoder's own box heads
        else:
            logits = self.class_embed(hidden)  # [D, B, P + Q, K]
            boxes = refine_boxes(self.bbox_embed(hidden), out.references)  # [D, B, P + Q, 4], around the references
        denoising = None
        if queries is not None:
            num_denoising = queries.content.shape[1]  # P
            layers = slice(None) if self.aux_loss else slice(-1, None)
            denoising = DenoisingOutput(
                logits[layers, :, :num_denoising], boxes[layers, :, :num_denoising], queries.num_groups
            )
            logits, boxes = logits[:, :, num_denoising:], boxes[:, :, num_denoising:]  # [D, B, Q, K], [D, B, Q, 4]
        aux = tuple(zip(logits[:-1], boxes[:-1])) if self.aux_loss else ()
        encoder = (out.encoder_logits, out.encoder_boxes) if self.two_stage else None
        return DetectionOutput(logits[-1], boxes[-1], aux, encoder, denoising)


__all__ = ["DeformableDETR"]
