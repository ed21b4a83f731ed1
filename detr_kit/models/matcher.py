"""Hungarian matching of predictions to ground truth (Carion et al., 2020, Sec. 3.1).

The cost of each image is built from that image's targets only. The reference code builds one
[B*Q, sum T] matrix for the whole batch and keeps its diagonal blocks, which does about B times the
work; here each image is scored against its own targets only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detr_kit.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from detr_kit.structures import Target

__all__ = ["HungarianMatcher", "hungarian_match"]

# Stands in for NaN / inf costs (predictions that have diverged) so that scipy still finds an assignment.
_NON_FINITE_COST = 1e8
# PyTorch runs an elementwise op on the calling thread when it has fewer elements than this
# (at::internal::GRAIN_SIZE is 32768; exp and log parallelise at any size, hence the per-batch
# ``class_cost_table``). CPU costs are built in query tiles below it: every op stays serial and
# L2-resident, and never waits on an intra-op thread pool that other processes keep busy (on a shared
# 2-core machine one parallel region took ~12 ms instead of ~0.01 ms).
_CPU_TILE_ELEMENTS = 32767


@torch.no_grad()
def hungarian_match(cost_per_image: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Solve one minimum-cost assignment per image.

    Args:
        cost_per_image: one [Q, T_b] cost matrix per image. Non-finite entries are treated as a very
            large finite cost.

    Returns:
        One ``(query_idx, target_idx)`` pair of int64 tensors per image, each of length min(Q, T_b),
        sorted by query index, on the device of that image's cost matrix.
    """
    matches = []
    for cost in cost_per_image:
        device = cost.device
        if cost.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            matches.append((empty, empty.clone()))
            continue
        # numpy rather than torch for the conversion: it never wakes the intra-op thread pool.
        array = np.nan_to_num(cost.detach().cpu().numpy().astype(np.float64), copy=False, nan=_NON_FINITE_COST,
                              posinf=_NON_FINITE_COST, neginf=-_NON_FINITE_COST)
        query_idx, target_idx = linear_sum_assignment(array)  # rows come back sorted
        matches.append((torch.as_tensor(query_idx, dtype=torch.int64, device=device),
                        torch.as_tensor(target_idx, dtype=torch.int64, device=device)))
    return matches


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising a weighted class + L1 + GIoU cost.

    cost = cost_class * C_class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy)), where C_class is
    -p[label] for softmax heads and, for sigmoid (focal) heads, Deformable-DETR's focal cost
    alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p)) at the target labels.

    Args:
        cost_class: weight of the classification cost.
        cost_bbox: weight of the L1 distance between cxcywh boxes.
        cost_giou: weight of the negative generalized IoU.
        focal: True for sigmoid heads (logits [B, Q, K]); False for softmax heads ([B, Q, K+1]).
        focal_alpha: alpha of the focal cost.
        focal_gamma: gamma of the focal cost.
        stack_images: how the per-image costs are computed (both ways give the same costs): False image by
            image in query tiles of < 32768 elements (each op runs serially on L2-resident data, and never waits
            on a busy intra-op thread pool: the CPU's way), True in one pass over [B, Q, max T_b] with targets
            padded (a fixed number of kernel launches, one device sync: the GPU's way); None picks by the
            logits' device.

    Raises:
        ValueError: if every cost weight is zero or one is negative.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        stack_images: bool | None = None,
    ) -> None:
        super().__init__()
        costs = {"cost_class": cost_class, "cost_bbox": cost_bbox, "cost_giou": cost_giou}
        if any(value < 0 for value in costs.values()) or all(value == 0 for value in costs.values()):
            raise ValueError(f"HungarianMatcher needs non-negative costs, not all zero; got {costs}")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.focal = bool(focal)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.stack_images = stack_images

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"focal={self.focal}, focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}")

    def class_cost_table(self, logits: Tensor) -> Tensor:
        """Classification cost of every query for every class, built once per batch.

        Computing the whole table once keeps exp / log (which PyTorch parallelises at any size) out of
        the per-image work, which then only gathers the target labels' columns.

        Args:
            logits: [B, Q, K+1] (softmax heads) or [B, Q, K] (focal heads) class logits.

        Returns:
            [B, Q, K+1] or [B, Q, K] float32 cost (also under autocast), lower for a better match.
        """
        logits = logits.float()
        if not self.focal:
            return -logits.softmax(-1)
        prob = logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        return positive - negative

    def cost(self, class_cost: Tensor, boxes_cxcywh: Tensor, target_boxes: Tensor, target_labels: Tensor) -> Tensor:
        """The matching cost of every image's queries against that image's targets.

        Args:
            class_cost: [B, Q, K(+1)] from ``class_cost_table``.
            boxes_cxcywh: [B, Q, 4] predicted boxes, cxcywh in 0..1.
            target_boxes: [B, T, 4] target boxes, cxcywh (rows may be padding).
            target_labels: [B, T] int64 target labels.

        Returns:
            [B, Q, T] float32 cost (also under autocast); entry [b, q, t] only involves image b.
        """
        class_cost = class_cost.gather(2, target_labels[:, None, :].expand(-1, class_cost.shape[1], -1))  # [B, Q, T]
        boxes_cxcywh, target_boxes = boxes_cxcywh.float(), target_boxes.float()
        # L1 distance (torch.cdist p=1) one coordinate at a time, so that no op is larger than [B, Q, T].
        predicted = boxes_cxcywh.movedim(-1, 0).contiguous()[..., :, None]  # [4, B, Q, 1]
        target = target_boxes.movedim(-1, 0).contiguous()[..., None, :]  # [4, B, 1, T]
        l1 = (predicted[0] - target[0]).abs()  # [B, Q, T]
        for coordinate in range(1, 4):
            l1 = l1 + (predicted[coordinate] - target[coordinate]).abs()
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes_cxcywh), box_cxcywh_to_xyxy(target_boxes))  # [B, Q, T]
        return self.cost_bbox * l1 + self.cost_class * class_cost - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, targets: Sequence[Target]) -> list[tuple[Tensor, Tensor]]:
        """Match the queries of every image to its targets.

        Each image's queries are scored against that image's targets only (the reference code's
        batch-wide matrix costs B * Q * sum(T_b)). See ``stack_images`` for how the images are batched.

        Args:
            logits: [B, Q, K+1] (softmax heads) or [B, Q, K] (focal heads) class logits.
            boxes: [B, Q, 4] predicted boxes, cxcywh in 0..1.
            targets: B targets; target b has T_b boxes (T_b may be 0).

        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 tensors of length min(Q, T_b), sorted by query
            index, on ``logits.device``.

        Raises:
            ValueError: if the batch sizes of logits, boxes and targets differ.
        """
        if logits.shape[:2] != boxes.shape[:2] or logits.shape[0] != len(targets):
            raise ValueError(
                f"HungarianMatcher: logits {tuple(logits.shape)}, boxes {tuple(boxes.shape)} and "
                f"{len(targets)} targets must agree on B (and Q)"
            )
        device = logits.device
        stack = device.type != "cpu" if self.stack_images is None else self.stack_images
        class_cost = self.class_cost_table(logits)  # [B, Q, K(+1)]
        if stack:
            costs = self._stacked_costs(class_cost, boxes, targets)
        else:
            costs = self._per_image_costs(class_cost, boxes, targets)
        matches = hungarian_match(costs)
        return [(query_idx.to(device), target_idx.to(device)) for query_idx, target_idx in matches]

    def _per_image_costs(self, class_cost: Tensor, boxes: Tensor, targets: Sequence[Target]) -> list[Tensor]:
        """One [Q, T_b] cost per image, computed image by image in query tiles of < 32768 elements."""
        num_queries = class_cost.shape[1]
        costs = []
        for b, target in enumerate(targets):
            cost = torch.empty(num_queries, len(target), dtype=torch.float32, device=boxes.device)  # [Q, T_b]
            if len(target) > 0:
                target_boxes = target.boxes.to(device=boxes.device, dtype=torch.float32)[None]  # [1, T_b, 4]
                target_labels = target.labels.to(boxes.device)[None]  # [1, T_b]
                rows = max(1, _CPU_TILE_ELEMENTS // len(target))  # every op in a tile is [rows, T_b]
                for start in range(0, num_queries, rows):
                    tile = slice(start, start + rows)
                    tile_cost = self.cost(class_cost[b : b + 1, tile], boxes[b : b + 1, tile], target_boxes, target_labels)
                    cost[tile] = tile_cost[0]  # [rows, T_b]
            costs.append(cost)
        return costs

    def _stacked_costs(self, class_cost: Tensor, boxes: Tensor, targets: Sequence[Target]) -> list[Tensor]:
        """One [Q, T_b] cost per image, from a single pass over [B, Q, max T_b] and one device sync."""
        batch_size, num_queries = boxes.shape[:2]
        sizes = [len(target) for target in targets]
        max_targets = max(sizes, default=0)
        if max_targets == 0:
            return [boxes.new_empty((num_queries, 0), dtype=torch.float32)] * batch_size
        device = boxes.device
        # Padding rows are a valid full-image box of class 0, so every padded cost stays finite.
        target_boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(batch_size, max_targets, 1)
        target_labels = torch.zeros(batch_size, max_targets, dtype=torch.int64, device=device)
        for b, target in enumerate(targets):
            target_boxes[b, : sizes[b]] = target.boxes.to(device=device, dtype=torch.float32)  # [B, T_max, 4]
            target_labels[b, : sizes[b]] = target.labels.to(device)  # [B, T_max]
        cost = self.cost(class_cost, boxes, target_boxes, target_labels).cpu()  # [B, Q, T_max]
        return [cost[b, :, : sizes[b]] for b in range(batch_size)]
