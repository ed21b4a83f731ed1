"""Turn a detector's output into detections in original-image pixels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_kit.ops.boxes import box_cxcywh_to_xyxy
from detr_kit.structures import DetectionOutput, Detections

__all__ = ["PostProcess"]


class PostProcess(nn.Module):
    """Scores, labels and pixel boxes from class logits and normalised boxes.

    Softmax heads (DETR) give one detection per query: the most likely class other than no object.
    Sigmoid heads (Deformable-DETR) give the ``top_k`` highest (query, class) scores over all Q * K
    pairs, so one query can yield several detections with different labels.

    Args:
        focal: True for sigmoid heads (logits [B, Q, K]); False for softmax heads ([B, Q, K+1]).
        top_k: detections kept per image (softmax heads: only applies when Q > top_k).
        score_threshold: detections scoring below it are dropped.

    Raises:
        ValueError: if top_k < 1 or score_threshold is outside 0..1.
    """

    def __init__(self, focal: bool, top_k: int = 100, score_threshold: float = 0.0) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"PostProcess needs top_k >= 1, got {top_k}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"PostProcess needs score_threshold in [0, 1], got {score_threshold}")
        self.focal = bool(focal)
        self.top_k = int(top_k)
        self.score_threshold = float(score_threshold)

    def extra_repr(self) -> str:
        return f"focal={self.focal}, top_k={self.top_k}, score_threshold={self.score_threshold}"

    def scores_labels_queries(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pick the detections of every image.

        Args:
            logits: [B, Q, K+1] (softmax) or [B, Q, K] (focal), float32.

        Returns:
            scores [B, N], labels [B, N] int64 and query indices [B, N] int64, N = min(Q, top_k) for
            softmax heads and min(Q * K, top_k) for focal heads; sorted by score when top-k was taken.
        """
        batch_size, num_queries, num_logits = logits.shape
        if self.focal:
            prob = logits.sigmoid().flatten(1)  # [B, Q * K]
            scores, index = prob.topk(min(self.top_k, prob.shape[1]), dim=1)  # [B, N]
            return scores, index % num_logits, torch.div(index, num_logits, rounding_mode="floor")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # [B, Q]; the last column is no object
        queries = torch.arange(num_queries, device=logits.device).expand(batch_size, num_queries)  # [B, Q]
        if num_queries > self.top_k:
            scores, index = scores.topk(self.top_k, dim=1)  # [B, top_k]
            labels, queries = labels.gather(1, index), queries.gather(1, index)
        return scores, labels, queries

    @torch.no_grad()
    def forward(self, output: DetectionOutput, orig_sizes: Tensor) -> list[Detections]:
        """Convert a batch of outputs to detections.

        Args:
            output: the detector's output (only ``logits`` and ``boxes`` are used).
            orig_sizes: [B, 2] (height, width) of each original image in pixels.

        Returns:
            B Detections with boxes [N, 4] xyxy in original pixels clipped to the image, scores [N],
            labels [N] int64.

        Raises:
            ValueError: if orig_sizes is not [B, 2] for the output's batch size B.
        """
        logits, boxes_cxcywh = output.logits.float(), output.boxes.float()  # [B, Q, K(+1)], [B, Q, 4]
        orig_sizes = torch.as_tensor(orig_sizes, device=boxes_cxcywh.device).float()
        if orig_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"PostProcess needs orig_sizes of shape [B, 2] = [{logits.shape[0]}, 2] (height, width), "
                f"got {tuple(orig_sizes.shape)}"
            )
        scores, labels, queries = self.scores_labels_queries(logits)  # [B, N] each
        boxes_xyxy = box_cxcywh_to_xyxy(boxes_cxcywh.gather(1, queries[..., None].expand(-1, -1, 4)))  # [B, N, 4]
        height, width = orig_sizes.unbind(1)  # [B] each
        scale = torch.stack((width, height, width, height), dim=1)[:, None, :]  # [B, 1, 4]
        boxes_xyxy = (boxes_xyxy * scale).clamp(min=0)
        boxes_xyxy = torch.minimum(boxes_xyxy, scale)  # clip x to width, y to height
        detections = []
        for image_scores, image_labels, image_boxes in zip(scores, labels, boxes_xyxy):
            keep = image_scores >= self.score_threshold  # [N]
            detections.append(Detections(image_boxes[keep], image_scores[keep], image_labels[keep]))
        return detections
