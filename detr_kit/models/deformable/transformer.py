"""Deformable-DETR's encoder-decoder over multi-scale feature maps, with the two-stage variant (Zhu et al. 2021) and
DINO's anchor-box queries and mixed query selection (Zhang et al. 2022).

Reference points and box proposals live in coordinates normalised to each image's *valid* (unpadded) region;
the valid ratios rescale them to the padded maps, which makes the outputs independent of batch padding. Module
names follow the references: ``level_embed``, ``reference_points`` and, for two-stage, ``enc_output``,
``enc_output_norm``, ``pos_trans``, ``pos_trans_norm``; DINO's ``tgt_embed`` (and, without two-stage,
``refpoint_embed``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from detr_kit.models.deformable.attention import MSDeformAttn
from detr_kit.models.deformable.decoder import DeformableDecoder
from detr_kit.models.deformable.denoising import DenoisingQueries
from detr_kit.models.deformable.encoder import DeformableEncoder, pixel_grid
from detr_kit.models.heads import inverse_sigmoid

_PROPOSAL_MIN_WH = 0.05  # two-stage proposal size on the finest level, doubled per level (the reference's value)
_PROPOSAL_VALID_RANGE = (0.01, 0.99)  # proposals with any coordinate outside are masked (the reference's range)
_PROPOSAL_TEMPERATURE = 10000.0  # sine embedding of the top-k proposals


class TransformerOutput(NamedTuple):
    """What DeformableTransformer returns.

    hidden_states:  [D, B, Q, C] every decoder layer's output.
    references:     [D, B, Q, 2|4] the reference each layer attended around, 0..1 of the valid image. When the
                    first layer had 2-d points and later ones boxes, the points are zero-padded to 4 values.
    boxes:          [D, B, Q, 4] cxcywh refined by the decoder's box heads, or None without refinement.
    encoder_logits: [B, S, K] two-stage proposal scores ([B, Q, K], the selected ones, with mixed query
                    selection), else None.
    encoder_boxes:  [B, S, 4] two-stage proposal boxes cxcywh ([B, Q, 4] with mixed query selection), else None.

    With denoising queries the first P of the Q + P decoder queries are the denoising ones.
    """

    hidden_states: Tensor
    references: Tensor
    boxes: Tensor | None
    encoder_logits: Tensor | None
    encoder_boxes: Tensor | None


def valid_ratios(masks: Sequence[Tensor]) -> Tensor:
    """[B, L, 2] (w, h) fraction of every level's map that the image covers, from masks [B, H_l, W_l]."""
    ratios = []
    for mask in masks:
        valid_h = (~mask[:, :, 0]).sum(1).float() / mask.shape[1]  # [B]
        valid_w = (~mask[:, 0, :]).sum(1).float() / mask.shape[2]  # [B]
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def proposal_pos_embed(proposals_unact: Tensor, hidden_dim: int) -> Tensor:
    """Sine embedding of boxes given as logits: [B, Q, 4] -> [B, Q, 2C] (C/2 features per coordinate)."""
    num_feats = hidden_dim // 2
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=proposals_unact.device)
    dim_t = _PROPOSAL_TEMPERATURE ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # [F]
    pos = proposals_unact.float().sigmoid()[..., None] * (2 * math.pi) / dim_t  # [B, Q, 4, F]
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(2)  # [B, Q, 4F]


class DeformableTransformer(nn.Module):
    """Deformable-DETR's encoder-decoder: flattens the levels, encodes them, and decodes the queries around reference
    points (learned from the query embeddings, or, two-stage, the top-scoring encoder proposals).

    With ``anchor_queries`` (DINO) every query is a learned content vector (``tgt_embed``) and an anchor box whose
    sine embedding the decoder turns into the positional query at every layer (DAB-DETR). Without two-stage the
    anchors are learned (``refpoint_embed``); with two-stage they are the top-Q encoder proposals, ranked by their
    best class score (*mixed query selection*: positions from the encoder, content static), and the encoder outputs
    are those Q proposals, trained with their classes. Denoising queries need anchor queries.

    Args:
        encoder: the DeformableEncoder.
        decoder: the DeformableDecoder; for two-stage it must hold ``num_layers + 1`` class and box heads (the last
            pair scores and regresses the encoder proposals); with anchor queries it needs a ``ref_point_head``.
        two_stage: take the decoder's reference boxes and queries from the top-scoring encoder proposals.
        num_proposals: two-stage: how many proposals become decoder queries (reference: 300; DINO: 900).
        anchor_queries: Q > 0 for DINO's anchor-box queries (two-stage: Q = ``num_proposals``); 0 = Deformable-DETR's.

    The parameters are initialised as the reference does (xavier, the attention's own scheme, normal level
    embeddings); the decoder's heads belong to the detector, which initialises them.

    Raises:
        ValueError: for mismatched encoder and decoder, two-stage without its heads, or anchor queries without a
            ``ref_point_head`` or with another count than the proposals.
    """

    def __init__(
        self,
        encoder: DeformableEncoder,
        decoder: DeformableDecoder,
        two_stage: bool = False,
        num_proposals: int = 300,
        anchor_queries: int = 0,
    ) -> None:
        super().__init__()
        hidden_dim = encoder.hidden_dim
        if decoder.hidden_dim != hidden_dim:
            raise ValueError(f"encoder and decoder widths differ: {hidden_dim} and {decoder.hidden_dim}")
        heads_needed = decoder.num_layers + 1
        if two_stage and (decoder.bbox_embed is None or decoder.class_embed is None
                          or min(len(decoder.bbox_embed), len(decoder.class_embed)) < heads_needed):
            raise ValueError(
                f"two_stage needs a decoder with num_layers + 1 = {heads_needed} class and box heads "
                "(the last ones score and regress the encoder proposals)"
            )
        if anchor_queries and decoder.ref_point_head is None:
            raise ValueError("anchor_queries need a decoder with a ref_point_head (positional queries from the anchors)")
        if anchor_queries and two_stage and anchor_queries != num_proposals:
            raise ValueError(f"mixed query selection: anchor_queries ({anchor_queries}) must equal num_proposals ({num_proposals})")
        self.hidden_dim = hidden_dim
        self.num_feature_levels = encoder.num_levels
        self.two_stage = two_stage
        self.num_proposals = num_proposals
        self.anchor_queries = anchor_queries
        self.encoder = encoder
        self.decoder = decoder
        self.level_embed = nn.Parameter(torch.empty(encoder.num_levels, hidden_dim))
        if two_stage:
            self.enc_output = nn.Linear(hidden_dim, hidden_dim)
            self.enc_output_norm = nn.LayerNorm(hidden_dim)
            if not anchor_queries:
                self.pos_trans = nn.Linear(hidden_dim * 2, hidden_dim * 2)
                self.pos_trans_norm = nn.LayerNorm(hidden_dim * 2)
        elif not anchor_queries:
            self.reference_points = nn.Linear(hidden_dim, 2)
        if anchor_queries:
            self.tgt_embed = nn.Embedding(anchor_queries, hidden_dim)
            if not two_stage:
                self.refpoint_embed = nn.Embedding(anchor_queries, 4)  # anchor boxes as logits
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        heads = [*(self.decoder.bbox_embed or ()), *(self.decoder.class_embed or ())]
        skip = {id(p) for head in heads for p in head.parameters()}
        for parameter in self.parameters():
            if parameter.dim() > 1 and id(parameter) not in skip:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage and not self.anchor_queries:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        if not self.two_stage and self.anchor_queries:
            with torch.no_grad():  # anchor centres spread over the image (DAB-DETR's random_refpoints_xy), sizes ~0.5
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(torch.rand(self.anchor_queries, 2))
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: Sequence[Tensor],
        masks: Sequence[Tensor],
        pos_embeds: Sequence[Tensor],
        query_embed: Tensor | None,
        denoising: DenoisingQueries | None = None,
    ) -> TransformerOutput:
        """Encode the levels and decode the queries.

        Args:
            srcs: L feature maps [B, C, H_l, W_l].
            masks: L masks [B, H_l, W_l] bool, True on padding.
            pos_embeds: L positional encodings [B, C, H_l, W_l].
            query_embed: [Q, 2C] (query position, then initial state) for Deformable-DETR's learned queries; None for
                two-stage and anchor queries.
            denoising: denoising queries to decode before the Q matching ones (anchor queries only), or None.

        Returns:
            TransformerOutput.

        Raises:
            ValueError: if the number of levels differs from the encoder's, ``query_embed`` is missing, or denoising
                queries come without anchor queries.
        """
        if not len(srcs) == len(masks) == len(pos_embeds) == self.num_feature_levels:
            raise ValueError(
                f"expected {self.num_feature_levels} levels, got {len(srcs)} srcs, {len(masks)} masks, {len(pos_embeds)} pos"
            )
        if not self.two_stage and not self.anchor_queries and query_embed is None:
            raise ValueError("query_embed [Q, 2C] is required unless two_stage or anchor queries are on")
        if denoising is not None and not self.anchor_queries:
            raise ValueError("denoising queries need anchor queries (their positional queries come from their boxes)")
        batch, channels = srcs[0].shape[:2]
        spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]  # (h, w) per level
        centres, level_index, sizes = pixel_grid(spatial_shapes, srcs[0].device)  # [S, 2], [S], [L, 2]
        src = torch.cat([s.flatten(2) for s in srcs], 2).transpose(1, 2).contiguous()  # [B, S, C], read by every layer
        mask = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        pos = torch.cat([p.flatten(2) for p in pos_embeds], 2).transpose(1, 2)  # [B, S, C]
        pos = (pos + self.level_embed[level_index]).to(src.dtype)  # [B, S, C]
        ratios = valid_ratios(masks)  # [B, L, 2]

        # Reference point of every position: its pixel centre in 0..1 of its level's valid region, then rescaled to
        # every level's padded map.
        points = centres / (ratios * sizes)[:, level_index]  # [B, S, 2] in 0..1 of the valid image
        encoder_references = points[:, :, None] * ratios[:, None]  # [B, S, L, 2]
        memory = self.encoder(src, pos, encoder_references, spatial_shapes, mask)  # [B, S, C]

        encoder_logits = encoder_boxes = None
        if self.two_stage:
            query_pos, tgt, reference_points, encoder_logits, encoder_boxes = self._select_proposals(
                memory, mask, points, level_index
            )
        elif self.anchor_queries:
            query_pos = None  # the decoder makes it from each layer's anchor
            tgt = self.tgt_embed.weight[None].expand(batch, -1, -1)  # [B, Q, C]
            reference_points = self.refpoint_embed.weight.sigmoid()[None].expand(batch, -1, -1)  # [B, Q, 4]
        else:
            query_pos, tgt = query_embed.split(channels, dim=1)  # [Q, C] x2
            query_pos = query_pos[None].expand(batch, -1, -1)  # [B, Q, C]
            tgt = tgt[None].expand(batch, -1, -1)  # [B, Q, C]
            reference_points = self.reference_points(query_pos).sigmoid()  # [B, Q, 2]
        self_attn_mask = None
        if denoising is not None:
            self_attn_mask = denoising.attention_mask(tgt.shape[1])  # [P + Q, P + Q]
            tgt = torch.cat([denoising.content.to(tgt.dtype), tgt], 1)  # [B, P + Q, C]
            reference_points = torch.cat([denoising.boxes.to(reference_points.dtype), reference_points], 1)
        decoded = self.decoder(tgt, reference_points, memory, spatial_shapes, ratios, query_pos, mask, self_attn_mask)
        return TransformerOutput(decoded.hidden_states, decoded.references, decoded.boxes, encoder_logits, encoder_boxes)

    def _select_proposals(
        self, memory: Tensor, mask: Tensor, points: Tensor, level_index: Tensor
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor]:
        """Two-stage: score one proposal per position and turn the top ``num_proposals`` into decoder queries.

        Returns query_pos [B, Q, C] (None with anchor queries: the decoder makes it), tgt [B, Q, C], reference boxes
        [B, Q, 4], encoder logits [B, S, K] and encoder boxes [B, S, 4] (mixed query selection: of the Q selected).
        """
        low, high = _PROPOSAL_VALID_RANGE
        wh = _PROPOSAL_MIN_WH * 2.0 ** level_index.to(points.dtype)  # [S]
        proposals = torch.cat([points, wh[None, :, None].expand_as(points)], -1)  # [B, S, 4] cxcywh
        valid = ((proposals > low) & (proposals < high)).all(-1) & ~mask  # [B, S]
        proposals_unact = inverse_sigmoid(proposals).masked_fill(~valid[..., None], float("inf"))  # [B, S, 4]
        output_memory = memory.masked_fill(~valid[..., None], 0.0)  # [B, S, C]
        output_memory = self.enc_output_norm(self.enc_output(output_memory))  # [B, S, C]

        class_head = self.decoder.class_embed[self.decoder.num_layers]
        box_head = self.decoder.bbox_embed[self.decoder.num_layers]
        encoder_logits = class_head(output_memory)  # [B, S, K]
        boxes_unact = box_head(output_memory).to(proposals_unact.dtype) + proposals_unact  # [B, S, 4]
        # Deformable-DETR ranks by the first class's score (its encoder is trained class-agnostically, label 0); DINO
        # by the best class's (its encoder is trained with the classes). Padding positions are never selected, so
        # padding cannot change which proposals are kept.
        scores = encoder_logits.max(-1).values if self.anchor_queries else encoder_logits[..., 0]
        scores = scores.float().masked_fill(mask, float("-inf"))  # [B, S]
        top = scores.topk(min(self.num_proposals, scores.shape[1]), dim=1).indices  # [B, Q]
        selected_unact = boxes_unact.gather(1, top[..., None].expand(-1, -1, 4))  # [B, Q, 4]
        top_unact = selected_unact.detach()
        reference_points = top_unact.sigmoid()  # [B, Q, 4]
        if self.anchor_queries:  # mixed query selection: content static, anchors from the encoder
            tgt = self.tgt_embed.weight[: top.shape[1]][None].expand(memory.shape[0], -1, -1)  # [B, Q, C]
            logits = encoder_logits.gather(1, top[..., None].expand(-1, -1, encoder_logits.shape[-1]))  # [B, Q, K]
            return None, tgt, reference_points, logits, selected_unact.sigmoid()
        embedding = proposal_pos_embed(top_unact, self.hidden_dim).to(memory.dtype)  # [B, Q, 2C]
        query = self.pos_trans_norm(self.pos_trans(embedding))  # [B, Q, 2C]
        query_pos, tgt = query.split(self.hidden_dim, dim=-1)  # [B, Q, C] x2
        return query_pos, tgt, reference_points, encoder_logits, boxes_unact.sigmoid()


__all__ = ["DeformableTransformer", "TransformerOutput", "proposal_pos_embed", "valid_ratios"]
