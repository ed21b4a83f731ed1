"""Deformable-DETR: a multi-scale backbone, a deformable transformer and sigmoid focal heads (Zhu et al. 2021).

Variants: plain, iterative box refinement (``box_refine``) and two-stage (``two_stage``, with refinement).
Module names follow the reference implementation: ``input_proj.{l}.{0,1}`` (conv, GroupNorm), ``query_embed``,
``class_embed`` / ``bbox_embed.layers.{j}`` (shared heads), or ``class_embed.{i}`` / ``bbox_embed.{i}.layers.{j}``
(one head per decoder layer, plus one for the encoder proposals with two-stage).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_kit.models.backbone.padding import run_backbone
from detr_kit.models.deformable import DeformableTransformer, inverse_sigmoid
from detr_kit.models.heads import MLP, focal_prior_bias
from detr_kit.structures import DetectionOutput

_GROUP_NORM_GROUPS = 32  # input projections' GroupNorm, as the reference
_INITIAL_BOX_SIZE_LOGIT = -2.0  # first box head's wh bias: boxes start at sigmoid(-2) ~ 0.12 of the image


def _masked_group_norm(x: Tensor, mask: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm whose statistics come from the valid (unpadded) positions only.

    Args:
        x: [B, C, H, W].
        mask: [B, H, W] bool, True on padding.
        norm: supplies groups, eps and the affine parameters.

    Returns:
        [B, C, H, W]; equal to ``norm(x)`` wherever no position is padded.
    """
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    x_float = x.float().view(batch, groups, channels // groups, height * width)  # [B, G, C/G, HW]
    valid = (~mask).view(batch, 1, 1, height * width).to(x_float.dtype)  # [B, 1, 1, HW]
    count = valid.sum(-1, keepdim=True).clamp(min=1) * (channels // groups)  # [B, 1, 1, 1]
    mean = (x_float * valid).sum((-1, -2), keepdim=True) / count  # [B, G, 1, 1]
    var = (((x_float - mean) ** 2) * valid).sum((-1, -2), keepdim=True) / count  # [B, G, 1, 1]
    out = ((x_float - mean) * torch.rsqrt(var + norm.eps)).view(batch, channels, height, width).to(x.dtype)
    if norm.affine:
        out = out * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    return out


def extra_level_mask(image_mask: Tensor | None, previous_mask: Tensor, size: Sequence[int], exact_padding: bool) -> Tensor:
    """The padding mask of an extra level made by a 3x3 stride-2 convolution.

    The reference code resizes the *image* mask to the level's size with nearest interpolation, which is what
    batched training and evaluation compute here. With ``exact_padding`` every image must get the level it
    would get alone: a 3x3 stride-2 conv with padding 1 maps a valid extent n to ceil(n / 2), every other entry
    of the previous level's mask. The two differ on padded batches whose size is not a multiple of the level's
    stride (nearest sampling of the image mask rounds differently).

    Args:
        image_mask: [B, H, W] bool, True on padding, or None (no padding).
        previous_mask: [B, H_prev, W_prev] the previous level's mask.
        size: (H_l, W_l) of the new level.
        exact_padding: whether the model runs with exact padding (see ``DeformableDETR``).

    Returns:
        [B, H_l, W_l] bool, True on padding.
    """
    if exact_padding:
        return previous_mask[:, ::2, ::2]
    if image_mask is None:
        return previous_mask.new_zeros(previous_mask.shape[0], *size)
    return F.interpolate(image_mask[None].float(), size=tuple(size))[0].bool()


class DeformableDETR(nn.Module):
    """The Deformable-DETR detector.

    Levels: the backbone's levels (C3-C5, strides 8/16/32, or C5 alone for ``num_feature_levels=1``), each
    projected by a 1x1 conv + GroupNorm, plus ``num_feature_levels - len(backbone levels)`` extra levels made by a
    3x3 stride-2 conv + GroupNorm (on C5 for the first, on the previous extra level after that).

    Args:
        backbone: returns a list of FeatureMap for ``(images, mask)``; has ``channels`` (tuple, one per level).
        position: maps a mask [B, H, W] to an encoding [B, C, H, W] (reference: sine, normalised, offset -0.5).
        num_classes: K (sigmoid heads, no no-object class).
        num_queries: Q (300). With two-stage, the number of encoder proposals kept as queries.
        hidden_dim: C (256).
        num_heads: M (8).
        num_encoder_layers: encoder depth (6).
        num_decoder_layers: decoder depth D (6).
        dim_feedforward: feed-forward hidden size (1024).
        dropout: dropout probability (0.1).
        num_feature_levels: L (4); 1 means single-scale C5.
        enc_points: encoder sampling points per head and level (4).
        dec_points: decoder sampling points per head and level (4).
        aux_loss: return every earlier decoder layer's predictions in ``DetectionOutput.aux``.
        box_refine: iterative box refinement: one box and class head per decoder layer.
        two_stage: decoder queries from the top encoder proposals (needs ``box_refine``, as the config requires).
        exact_padding: run the backbone on each image unpadded and normalise the input projections over valid
            positions only, so that an image's outputs do not depend on the batch; a plain attribute that may be
            changed at any time (the evaluator turns it on).
        activation_checkpointing: recompute the encoder's activations in the backward pass (training memory
            down, step time up; see DeformableEncoder).
        ffn_checkpointing: recompute only the encoder's feed-forward blocks in the backward pass (see
            DeformableEncoder).

    Raises:
        ValueError: for non-positive sizes, too few backbone levels or ``two_stage`` without ``box_refine``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        position: nn.Module,
        num_classes: int,
        num_queries: int = 300,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_points: int = 4,
        dec_points: int = 4,
        aux_loss: bool = True,
        box_refine: bool = False,
        two_stage: bool = False,
        exact_padding: bool = False,
        activation_checkpointing: bool = False,
        ffn_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_queries < 1 or num_feature_levels < 1:
            raise ValueError(
                f"num_classes, num_queries and num_feature_levels must be >= 1, got {num_classes}, {num_queries}, "
                f"{num_feature_levels}"
            )
        if two_stage and not box_refine:
            raise ValueError("two_stage=True needs box_refine=True (the encoder proposals use the per-layer heads)")
        if hidden_dim % _GROUP_NORM_GROUPS:
            raise ValueError(f"hidden_dim must be a multiple of {_GROUP_NORM_GROUPS} (GroupNorm groups), got {hidden_dim}")
        num_pos_feats = getattr(position, "num_pos_feats", None)
        if num_pos_feats is not None and 2 * num_pos_feats != hidden_dim:
            raise ValueError(
                f"the position encoding gives {2 * num_pos_feats} channels but hidden_dim is {hidden_dim}; "
                f"build it with num_pos_feats={hidden_dim // 2}"
            )
        channels = tuple(backbone.channels)
        if num_feature_levels > 1 and len(channels) > num_feature_levels:
            raise ValueError(f"the backbone returns {len(channels)} levels, more than num_feature_levels={num_feature_levels}")
        self.backbone = backbone
        self.position = position
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.box_refine = box_refine
        self.two_stage = two_stage
        self.exact_padding = exact_padding

        # Single-scale uses the last backbone level only.
        self._backbone_levels = 1 if num_feature_levels == 1 else len(channels)
        projections = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(_GROUP_NORM_GROUPS, hidden_dim))
            for c in channels[-self._backbone_levels :]
        ]
        in_channels = channels[-1]
        for _ in range(num_feature_levels - self._backbone_levels):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(_GROUP_NORM_GROUPS, hidden_dim),
                )
            )
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)

        class_head = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(class_head.bias, focal_prior_bias(0.01))
        box_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        if box_refine:
            # The reference clones the heads first and then sets the wh bias of the first box head only.
            num_heads_needed = num_decoder_layers + (1 if two_stage else 0)
            self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_heads_needed))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_heads_needed))
            if not two_stage:  # two-stage keeps every wh bias at 0, as the reference
                with torch.no_grad():
                    self.bbox_embed[0].layers[-1].bias[2:] = _INITIAL_BOX_SIZE_LOGIT
        else:
            with torch.no_grad():
                box_head.layers[-1].bias[2:] = _INITIAL_BOX_SIZE_LOGIT
            self.class_embed = class_head
            self.bbox_embed = box_head
        self.transformer = DeformableTransformer(
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            num_feature_levels=num_feature_levels,
            enc_points=enc_points,
            dec_points=dec_points,
            two_stage=two_stage,
            num_proposals=num_queries,
            bbox_embed=list(self.bbox_embed) if box_refine else None,
            class_embed=list(self.class_embed) if two_stage else None,
            activation_checkpointing=activation_checkpointing,
            ffn_checkpointing=ffn_checkpointing,
        )

    def _project(self, index: int, x: Tensor, mask: Tensor) -> Tensor:
        conv, norm = self.input_proj[index]
        return self._normalize(norm, conv(x), mask)  # [B, C, H_l, W_l]

    def _normalize(self, norm: nn.GroupNorm, x: Tensor, mask: Tensor) -> Tensor:
        if self.exact_padding and bool(mask.any()):
            return _masked_group_norm(x, mask, norm)
        return norm(x)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> DetectionOutput:
        """Detect objects.

        Args:
            images: [B, 3, H, W] float, normalised, padded to the largest image.
            mask: [B, H, W] bool, True on padding; None means no padding.

        Returns:
            DetectionOutput with logits [B, Q, K], boxes [B, Q, 4] cxcywh in 0..1 of the unpadded image, aux (one
            pair per earlier decoder layer, with aux_loss) and, for two-stage, encoder (logits [B, S, K], boxes
            [B, S, 4]).
        """
        if mask is not None and (mask.shape[0] != images.shape[0] or mask.shape[-2:] != images.shape[-2:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(images.shape)}; expected [B, H, W]")
        features = run_backbone(self.backbone, images, mask, self.exact_padding)[-self._backbone_levels :]
        srcs = [self._project(i, f.features, f.mask) for i, f in enumerate(features)]  # [B, C, H_l, W_l] each
        masks = [f.mask for f in features]
        for index in range(len(srcs), self.num_feature_levels):
            previous = features[-1].features if index == len(features) else srcs[-1]
            if self.exact_padding:  # the stride-2 conv must see zeros beyond the image, as it would alone
                previous = previous.masked_fill(masks[-1][:, None], 0.0)
            conv, norm = self.input_proj[index]
            src = conv(previous)  # [B, C, H_l, W_l]
            masks.append(extra_level_mask(mask, masks[-1], src.shape[-2:], self.exact_padding))  # [B, H_l, W_l]
            srcs.append(self._normalize(norm, src, masks[-1]))
        return self.forward_levels(srcs, masks)

    def forward_levels(self, srcs: list[Tensor], masks: list[Tensor]) -> DetectionOutput:
        """Run the transformer and the heads on already projected levels (``forward`` without backbone).

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
            delta = self.bbox_embed(hidden)  # [D, B, Q, 4]
            references = inverse_sigmoid(out.references)  # [D, B, Q, 2]
            boxes = torch.cat([delta[..., :2] + references, delta[..., 2:]], -1).sigmoid()  # [D, B, Q, 4]
        aux = tuple(zip(logits[:-1], boxes[:-1])) if self.aux_loss else ()
        encoder = (out.encoder_logits, out.encoder_boxes) if self.two_stage else None
        return DetectionOutput(logits[-1], boxes[-1], aux, encoder)


__all__ = ["DeformableDETR", "extra_level_mask"]
