"""The set-prediction loss of DETR and Deformable-DETR.

After Hungarian matching, every query is classified (its matched target's label, or no object) and
every matched query regresses its target box with L1 and GIoU losses. The same loss is applied to
each earlier decoder layer (``_aux{i}``) and, for two-stage Deformable-DETR, to the encoder proposals
(``_enc``, class-agnostic; with DINO's mixed query selection with the classes). DINO's contrastive denoising
queries (``_dn``) need no matching: each positive reconstructs the target it was made from, and every other
denoising query (negatives, padding) is classified as no object.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from detr_kit.models.matcher import HungarianMatcher
from detr_kit.ops.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from detr_kit.structures import DenoisingOutput, DetectionOutput, LossOutput, Target

__all__ = ["SetCriterion", "denoising_matches", "sigmoid_focal_loss"]


def sigmoid_focal_loss(logits: Tensor, targets_one_hot: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss of every logit (Lin et al., ICCV 2017, Eq. 5), not reduced.

    Args:
        logits: [..., K] class logits.
        targets_one_hot: [..., K] float, 1 at the true class, 0 elsewhere.
        alpha: weight of positives (1 - alpha for negatives); a negative value disables it.
        gamma: focusing exponent.

    Returns:
        [..., K] loss of every logit.
    """
    prob = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets_one_hot, reduction="none")
    prob_true = prob * targets_one_hot + (1 - prob) * (1 - targets_one_hot)
    loss = cross_entropy * (1 - prob_true) ** gamma
    if alpha >= 0:
        loss = (alpha * targets_one_hot + (1 - alpha) * (1 - targets_one_hot)) * loss
    return loss


def _matched_query_index(matches: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx), each [N_matched] int64, of every matched query in the batch."""
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)])
    query_idx = torch.cat([q for q, _ in matches])
    return batch_idx, query_idx


def denoising_matches(
    targets: Sequence[Target], num_groups: int, num_queries: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """The fixed assignment of the positive denoising queries to their targets (layout: ``DenoisingOutput``).

    Args:
        targets: B targets.
        num_groups: G.
        num_queries: P = G * 2 * T_max denoising queries per image.
        device: where to make the indices.

    Returns:
        One ``(query_idx, target_idx)`` pair per image, each int64 of length G * T_b: query ``g * 2 * T_max + j``
        reconstructs target j.
    """
    group_size = num_queries // num_groups if num_groups else 0
    matches = []
    for target in targets:
        slots = torch.arange(len(target), device=device)  # [T_b]
        starts = torch.arange(num_groups, device=device) * group_size  # [G]
        matches.append(((starts[:, None] + slots[None]).flatten(), slots.repeat(num_groups)))
    return matches


def _mean_box_count_across_ranks(targets: Sequence[Target], device: torch.device) -> Tensor:
    """Target boxes per rank, averaged over all ranks, at least 1 (a float32 scalar on ``device``)."""
    count = torch.tensor(float(sum(len(t) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1)


class SetCriterion(nn.Module):
    """Hungarian-matched detection loss with auxiliary decoder and encoder terms.

    Args:
        num_classes: K, number of object classes (without no-object).
        matcher: assigns queries to targets; called once per decoder layer (and for the encoder).
        class_weight: weight of the classification loss (cross-entropy or focal).
        bbox_weight: weight of the L1 box loss.
        giou_weight: weight of the GIoU loss (1 - GIoU).
        eos_coef: weight of the no-object class in the cross-entropy (softmax heads only).
        focal: True for sigmoid heads with focal loss (logits [B, Q, K]); False for softmax heads
            ([B, Q, K+1]).
        focal_alpha: alpha of the focal loss.
        focal_gamma: gamma of the focal loss.
        encoder_class_agnostic: train the encoder proposals (``output.encoder``) as one class, label 0
            (Deformable-DETR); False trains them with the targets' classes (DINO).

    Raises:
        ValueError: for num_classes < 1, a negative weight or a negative eos_coef.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        eos_coef: float = 0.1,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        encoder_class_agnostic: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SetCriterion needs num_classes >= 1, got {num_classes}")
        weights = {"class_weight": class_weight, "bbox_weight": bbox_weight, "giou_weight": giou_weight}
        if any(value < 0 for value in weights.values()):
            raise ValueError(f"SetCriterion loss weights must be >= 0, got {weights}")
        if eos_coef < 0:
            raise ValueError(f"SetCriterion eos_coef must be >= 0, got {eos_coef}")
        if isinstance(matcher, HungarianMatcher) and matcher.focal != focal:
            raise ValueError(f"SetCriterion(focal={focal}) got a HungarianMatcher with focal={matcher.focal}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = float(class_weight)
        self.bbox_weight = float(bbox_weight)
        self.giou_weight = float(giou_weight)
        self.eos_coef = float(eos_coef)
        self.focal = bool(focal)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.encoder_class_agnostic = bool(encoder_class_agnostic)
        empty_weight = torch.ones(num_classes + 1)  # [K+1]; the last class is no object
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, class_weight={self.class_weight}, bbox_weight={self.bbox_weight}, "
                f"giou_weight={self.giou_weight}, eos_coef={self.eos_coef}, focal={self.focal}")

    def class_loss(self, logits: Tensor, target_classes: Tensor, num_boxes: Tensor) -> Tensor:
        """Unweighted classification loss of one layer.

        Args:
            logits: [B, Q, K+1] (softmax) or [B, Q, K] (focal), float32.
            target_classes: [B, Q] int64 label of each query's matched target, K for no object.
            num_boxes: scalar, mean target count per rank (focal normaliser).

        Returns:
            scalar loss.
        """
        if not self.focal:
            # The class-weighted mean F.cross_entropy(weight=empty_weight) takes, with the weight sum clamped
            # so that eos_coef=0 on a batch without targets gives 0 instead of 0/0.
            cross_entropy = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")  # [B, Q]
            weight = self.empty_weight.to(logits.dtype)[target_classes]  # [B, Q]
            return (weight * cross_entropy).sum() / weight.sum().clamp(min=torch.finfo(logits.dtype).tiny)
        num_classes = logits.shape[-1]
        one_hot = F.one_hot(target_classes, num_classes + 1)[..., :num_classes].to(logits.dtype)  # [B, Q, K]
        loss = sigmoid_focal_loss(logits, one_hot, self.focal_alpha, self.focal_gamma)
        # Deformable-DETR: mean over queries times Q, i.e. a sum over queries and classes, / num_boxes.
        return loss.sum() / num_boxes

    def layer_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: Sequence[Target],
        matches: Sequence[tuple[Tensor, Tensor]],
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """Weighted class, L1 and GIoU losses of one decoder layer.

        Args:
            logits: [B, Q, K(+1)] class logits.
            boxes: [B, Q, 4] predicted boxes, cxcywh in 0..1.
            targets: B targets, on the predictions' device.
            matches: the matcher's (query_idx, target_idx) per image.
            num_boxes: scalar, mean target count per rank.

        Returns:
            ``loss_class``, ``loss_bbox``, ``loss_giou`` (weighted, scalars with gradients).
        """
        logits, boxes = logits.float(), boxes.float()  # losses in float32, also under autocast
        batch_idx, query_idx = _matched_query_index(matches)  # [N_matched] each
        matched_labels = torch.cat([t.labels[j] for t, (_, j) in zip(targets, matches)])  # [N_matched]
        matched_boxes = torch.cat([t.boxes[j] for t, (_, j) in zip(targets, matches)]).float()  # [N_matched, 4]

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = matched_labels  # [B, Q]; K = no object
        loss_class = self.class_loss(logits, target_classes, num_boxes)

        predicted = boxes[batch_idx, query_idx]  # [N_matched, 4] cxcywh
        loss_bbox = F.l1_loss(predicted, matched_boxes, reduction="sum") / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(matched_boxes))
        loss_giou = (1 - giou).sum() / num_boxes
        return {
            "loss_class": self.class_weight * loss_class,
            "loss_bbox": self.bbox_weight * loss_bbox,
            "loss_giou": self.giou_weight * loss_giou,
        }

    @torch.no_grad()
    def metrics(
        self, logits: Tensor, targets: Sequence[Target], matches: Sequence[tuple[Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """Unweighted metrics of the last decoder layer: ``class_error`` and ``cardinality_error``.

        Args:
            logits: [B, Q, K(+1)] class logits.
            targets: B targets.
            matches: the matcher's (query_idx, target_idx) per image.

        Returns:
            ``class_error``: 100 - top-1 accuracy (%) of the matched queries (0 without matches).
            ``cardinality_error``: mean over images of |#predicted objects - #targets|.
        """
        logits = logits.float()
        predicted_labels = logits[_matched_query_index(matches)].argmax(-1)  # [N_matched]
        matched_labels = torch.cat([t.labels[j] for t, (_, j) in zip(targets, matches)])
        if matched_labels.numel() == 0:
            class_error = logits.new_zeros(())
        else:
            class_error = 100 - 100 * (predicted_labels == matched_labels).float().mean()
        if self.focal:
            is_object = logits.sigmoid().amax(-1) > 0.5  # [B, Q]
        else:
            is_object = logits.argmax(-1) != logits.shape[-1] - 1  # [B, Q]
        num_targets = torch.tensor([float(len(t)) for t in targets], device=logits.device)  # [B]
        cardinality_error = (is_object.sum(1).float() - num_targets).abs().mean()
        return {"class_error": class_error, "cardinality_error": cardinality_error}

    def forward(self, output: DetectionOutput, targets: Sequence[Target]) -> LossOutput:
        """Compute the total loss and its named terms.

        Args:
            output: the detector's output; ``aux`` and ``encoder`` terms are added when present.
            targets: one Target per image (boxes cxcywh normalised, labels 0..K-1; may be empty).

        Returns:
            LossOutput: ``loss`` is the sum of the weighted loss terms; ``terms`` holds them detached
            (``loss_class``, ``loss_bbox``, ``loss_giou`` plus ``_aux{i}`` / ``_enc`` variants, and with
            denoising outputs ``_dn`` / ``_aux{i}_dn``, normalised by the box count times the groups) and the
            metrics ``class_error`` and ``cardinality_error``. Non-finite predictions give a non-finite
            loss, not an exception.

        Raises:
            ValueError: if any layer's logits do not have K+1 (softmax) or K (focal) classes, or the number
                of targets differs from the batch size.
        """
        expected = self.num_classes if self.focal else self.num_classes + 1
        if output.logits.shape[-1] != expected:
            raise ValueError(
                f"SetCriterion(num_classes={self.num_classes}, focal={self.focal}) expects logits with "
                f"{expected} classes, got shape {tuple(output.logits.shape)}"
            )
        if len(targets) != output.logits.shape[0]:
            raise ValueError(f"SetCriterion got {len(targets)} targets for a batch of {output.logits.shape[0]}")
        device = output.logits.device
        targets = [t.to(device) for t in targets]
        num_boxes = _mean_box_count_across_ranks(targets, device)

        layers = [("", output.logits, output.boxes, targets)]
        layers += [(f"_aux{i}", logits, boxes, targets) for i, (logits, boxes) in enumerate(output.aux)]
        if output.encoder is not None:
            # Deformable-DETR's two-stage proposals are class-agnostic (every target is class 0); DINO's are not.
            agnostic = [Target(t.boxes, torch.zeros_like(t.labels)) for t in targets]
            layers.append(("_enc", output.encoder[0], output.encoder[1], agnostic if self.encoder_class_agnostic else targets))

        loss = output.logits.new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        for suffix, logits, boxes, layer_targets in layers:
            if logits.shape[-1] != expected:
                raise ValueError(
                    f"SetCriterion: logits{suffix or ' (last layer)'} have {logits.shape[-1]} classes, expected {expected}"
                )
            matches = self.matcher(logits, boxes, layer_targets)
            for name, value in self.layer_losses(logits, boxes, layer_targets, matches, num_boxes).items():
                loss = loss + value
                terms[name + suffix] = value.detach()
            if suffix == "":
                terms.update(self.metrics(logits, layer_targets, matches))
        if output.denoising is not None:
            for name, value in self.denoising_losses(output.denoising, targets, num_boxes).items():
                loss = loss + value
                terms[name] = value.detach()
        return LossOutput(loss, terms)

    def denoising_losses(self, denoising: DenoisingOutput, targets: Sequence[Target], num_boxes: Tensor) -> dict[str, Tensor]:
        """The weighted class, L1 and GIoU losses of the denoising queries of every layer they cover.

        Args:
            denoising: the model's DenoisingOutput (layers shallowest first, the last one the final layer).
            targets: B targets on the predictions' device.
            num_boxes: scalar, mean target count per rank; the losses are normalised by it times the groups.

        Returns:
            ``loss_{class,bbox,giou}_dn`` for the last layer and ``..._aux{i}_dn`` for the earlier ones (every
            term present even when the batch has no target: zero then).
        """
        logits, boxes = denoising.logits, denoising.boxes  # [D', B, P, K], [D', B, P, 4]
        matches = denoising_matches(targets, denoising.num_groups, logits.shape[2], logits.device)
        normaliser = num_boxes * max(denoising.num_groups, 1)
        count = logits.shape[0]
        losses: dict[str, Tensor] = {}
        for index in range(count):
            suffix = "_dn" if index == count - 1 else f"_aux{index}_dn"
            for name, value in self.layer_losses(logits[index], boxes[index], targets, matches, normaliser).items():
                losses[name + suffix] = value
        return losses
