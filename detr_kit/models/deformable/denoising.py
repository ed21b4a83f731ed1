"""Contrastive denoising (DINO, Zhang et al. 2022, §3.3, after DN-DETR, Li et al. 2022): in training, noised copies of
the ground truth join the decoder's queries, and the decoder learns to undo the noise.

The copies come in G groups. In each group every target of an image has a *positive* query, whose box corners moved
by less than ``box_noise_scale`` times half the box's width (x) or height (y) — it must reconstruct the target — and a
*negative* query, whose corners moved by one to two times that — it must predict "no object". A copy's label is
replaced by a random class with probability ``label_noise_ratio / 2`` (the rule of the reference code, so that its
published 0.5 means the same here). Groups are as many as fit ``dn_number`` queries of each kind for the batch's
largest target count. In self-attention the matching queries never see the denoising queries (which would leak the
ground truth to them) and no group sees another; the denoising queries see the matching ones.

Layout of the P = G * 2 * T_max denoising queries (T_max = the batch's largest target count): group g holds queries
``[2 g T_max, 2 (g + 1) T_max)``, the first T_max positive and the last T_max negative; slot j of each half is target
j of the image, or padding (zero content, a centred box of half the image) when the image has fewer targets.
The content of a query is the embedding of its (noised) label, ``label_enc`` (K + 1 rows, as the reference's
label book of K + 1 entries, so that its checkpoints load).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from detr_kit.models.heads import inverse_sigmoid
from detr_kit.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from detr_kit.structures import Target

_PADDING_BOX = 0.5  # padding slots: the reference's zero box logits, i.e. sigmoid(0) for every coordinate


def denoising_group_count(max_targets: int, dn_number: int) -> int:
    """G: how many groups of ``max_targets`` positive (and as many negative) queries fit ``dn_number``; at least 1,
    and 0 when no image has a target (no denoising queries at all)."""
    if max_targets == 0 or dn_number == 0:
        return 0
    return max(1, dn_number // max_targets)


def denoising_attention_mask(num_groups: int, group_size: int, num_queries: int, device: torch.device | None = None) -> Tensor:
    """The decoder self-attention mask of G denoising groups followed by Q matching queries.

    Args:
        num_groups: G.
        group_size: queries per group (2 * T_max).
        num_queries: Q matching queries, after the P = G * group_size denoising ones.
        device: where to make it.

    Returns:
        [P + Q, P + Q] bool, True where the query (row) must not see the key (column): a matching query sees no
        denoising query, a denoising query sees no other group's queries (it sees its own group and the matching ones).
    """
    num_denoising = num_groups * group_size
    index = torch.arange(num_denoising + num_queries, device=device)  # [P + Q]
    group = torch.div(index, max(group_size, 1), rounding_mode="floor").masked_fill(index >= num_denoising, -1)
    return (index[None, :] < num_denoising) & (group[:, None] != group[None, :])  # [P + Q, P + Q]


def noise_labels(labels: Tensor, label_noise_ratio: float, num_classes: int) -> Tensor:
    """Replace each label by a uniformly drawn class (possibly the same) with probability ``label_noise_ratio / 2``.

    Args:
        labels: [...] int64 in 0..K-1.
        label_noise_ratio: twice the probability of a redraw (the reference's convention).
        num_classes: K.

    Returns:
        [...] int64.
    """
    redraw = torch.rand(labels.shape, device=labels.device) < label_noise_ratio * 0.5
    return torch.where(redraw, torch.randint_like(labels, 0, num_classes), labels)


def noise_boxes(boxes_cxcywh: Tensor, negative: Tensor, box_noise_scale: float) -> Tensor:
    """Move each corner of each box independently along x and y.

    A corner coordinate moves by ``u * box_noise_scale * size / 2`` in a random direction, ``size`` the box's width
    (x) or height (y), ``u`` uniform in [0, 1) for positives and in [1, 2) for negatives; the corners are then clipped
    to the image.

    Args:
        boxes_cxcywh: [..., 4] in 0..1.
        negative: [...] bool, True for negative copies.
        box_noise_scale: the noise scale (0 = no noise).

    Returns:
        [..., 4] cxcywh in 0..1 (a box whose corners crossed has a negative size).
    """
    if box_noise_scale <= 0:
        return boxes_cxcywh
    half_sizes = torch.cat([boxes_cxcywh[..., 2:], boxes_cxcywh[..., 2:]], -1) / 2  # [..., 4] (w, h, w, h) / 2
    magnitude = torch.rand_like(boxes_cxcywh) + negative[..., None].to(boxes_cxcywh.dtype)  # [..., 4]
    sign = torch.randint_like(boxes_cxcywh, 0, 2) * 2 - 1  # [..., 4] in {-1, 1}
    corners = box_cxcywh_to_xyxy(boxes_cxcywh) + sign * magnitude * half_sizes * box_noise_scale
    return box_xyxy_to_cxcywh(corners.clamp(0.0, 1.0))


class DenoisingQueries(NamedTuple):
    """The denoising queries of one batch (see the module docstring for their layout).

    content:    [B, P, C] embeddings of the noised labels (zero on padding slots).
    boxes:      [B, P, 4] cxcywh in 0..1, the noised boxes (the queries' first anchors).
    num_groups: G.
    group_size: 2 * T_max.
    """

    content: Tensor
    boxes: Tensor
    num_groups: int
    group_size: int

    def attention_mask(self, num_queries: int) -> Tensor:
        """[P + Q, P + Q] bool for these queries followed by ``num_queries`` matching ones (see
        ``denoising_attention_mask``)."""
        return denoising_attention_mask(self.num_groups, self.group_size, num_queries, self.content.device)


class ContrastiveDenoising(nn.Module):
    """Makes the denoising queries of a batch from its targets.

    Args:
        num_classes: K.
        hidden_dim: C.
        dn_number: queries of each kind (positive, negative) to aim for; the groups are ``dn_number // T_max``.
        label_noise_ratio: twice the probability that a query's label is redrawn.
        box_noise_scale: corner noise relative to half the box size (positives below it, negatives up to twice).

    Raises:
        ValueError: for a dn_number < 1, a ratio outside [0, 1] or a negative scale.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 0.4,
    ) -> None:
        super().__init__()
        if dn_number < 1:
            raise ValueError(f"dn_number must be >= 1, got {dn_number}")
        if not 0.0 <= label_noise_ratio <= 1.0:
            raise ValueError(f"label_noise_ratio must be in [0, 1], got {label_noise_ratio}")
        if box_noise_scale < 0:
            raise ValueError(f"box_noise_scale must be >= 0, got {box_noise_scale}")
        self.num_classes = num_classes
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim)

    def extra_repr(self) -> str:
        return (f"dn_number={self.dn_number}, label_noise_ratio={self.label_noise_ratio}, "
                f"box_noise_scale={self.box_noise_scale}")

    def forward(self, targets: Sequence[Target]) -> DenoisingQueries:
        """Draw the denoising queries of a batch (a batch without targets gets P = 0 queries; the label embedding is
        still part of the graph, so that every rank of a DDP job uses the same parameters).

        Args:
            targets: B targets on the module's device (boxes cxcywh in 0..1, labels 0..K-1).

        Returns:
            DenoisingQueries.
        """
        weight = self.label_enc.weight
        batch = len(targets)
        max_targets = max((len(t) for t in targets), default=0)  # from shapes: no device sync
        groups = denoising_group_count(max_targets, self.dn_number)
        if groups == 0:
            no_labels = torch.zeros(batch, 0, dtype=torch.int64, device=weight.device)
            return DenoisingQueries(self.label_enc(no_labels), weight.new_zeros(batch, 0, 4), 0, 0)
        labels = pad_sequence([t.labels for t in targets], batch_first=True)  # [B, T_max]
        boxes = pad_sequence([t.boxes.to(weight.dtype) for t in targets], batch_first=True)  # [B, T_max, 4]
        counts = torch.tensor([len(t) for t in targets], device=weight.device)  # [B]
        valid = torch.arange(max_targets, device=weight.device)[None] < counts[:, None]  # [B, T_max]

        shape = (batch, groups, 2, max_targets)  # (image, group, positive/negative, slot)
        negative = torch.tensor([False, True], device=weight.device)[None, None, :, None].expand(shape)
        labels = noise_labels(labels[:, None, None].expand(shape), self.label_noise_ratio, self.num_classes)
        boxes = noise_boxes(boxes[:, None, None].expand(*shape, 4), negative, self.box_noise_scale)  # [B, G, 2, T, 4]
        valid = valid[:, None, None].expand(shape)  # [B, G, 2, T]
        # The reference feeds the boxes as logits, so they reach the decoder clamped into [1e-5, 1 - 1e-5].
        boxes = torch.where(valid[..., None], inverse_sigmoid(boxes).sigmoid(), _PADDING_BOX)
        content = self.label_enc(labels).masked_fill(~valid[..., None], 0.0)  # [B, G, 2, T, C]
        return DenoisingQueries(content.flatten(1, 3), boxes.flatten(1, 3), groups, 2 * max_targets)


__all__ = [
    "ContrastiveDenoising",
    "DenoisingQueries",
    "denoising_attention_mask",
    "denoising_group_count",
    "noise_boxes",
    "noise_labels",
]
