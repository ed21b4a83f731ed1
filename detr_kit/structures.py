"""The types that travel between the parts of detr_kit, and the glossary of shape letters.

Shape letters used in every docstring and inline comment:
    B batch, Q object queries, K classes (without no-object), T targets of one image,
    C hidden size, H/W feature-map height/width, L feature levels, M attention heads,
    P sampling points, S = sum over levels of H_l * W_l, D decoder layers, N detections.

Box formats are part of every name: ``cxcywh`` boxes are normalised to the *unpadded* image
(0..1), ``xyxy`` detections are in original-image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor


class ImageBatch(NamedTuple):
    """Images padded to the batch's largest one.

    images: [B, 3, H, W] float, normalised.
    mask:   [B, H, W] bool, True on padding.
    """

    images: Tensor
    mask: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ImageBatch":
        return ImageBatch(self.images.to(device, non_blocking=non_blocking), self.mask.to(device, non_blocking=non_blocking))


class FeatureMap(NamedTuple):
    """One backbone level: features [B, C_l, H_l, W_l] and its padding mask [B, H_l, W_l] (True = padding)."""

    features: Tensor
    mask: Tensor


@dataclass
class Target:
    """The ground truth of one image.

    boxes:     [T, 4] cxcywh normalised to the unpadded (transformed) image, float32.
    labels:    [T] int64 contiguous labels 0..K-1.
    image_id:  the COCO image id (or -1 when unknown).
    orig_size: (h, w) of the image as stored on disk.
    size:      (h, w) of the image after transforms, before padding.
    T may be 0.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int = -1
    orig_size: tuple[int, int] = (0, 0)
    size: tuple[int, int] = (0, 0)
    iscrowd: Tensor | None = None  # [T] bool; only evaluation targets keep crowd boxes

    def __post_init__(self) -> None:
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1)
        if self.boxes.shape[0] != self.labels.shape[0]:
            raise ValueError(f"Target has {self.boxes.shape[0]} boxes but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Target":
        return Target(
            self.boxes.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.image_id,
            self.orig_size,
            self.size,
            None if self.iscrowd is None else self.iscrowd.to(device, non_blocking=non_blocking),
        )


class DenoisingOutput(NamedTuple):
    """The predictions of contrastive denoising queries (DINO; training with targets only).

    The P = G * 2 * T_max queries form G groups of 2 * T_max, T_max the batch's largest target count. In group g,
    query ``g * 2 * T_max + j`` is a positive (a noised copy of target j of its image, to be reconstructed) and
    query ``g * 2 * T_max + T_max + j`` a negative (a farther copy, to be classified as no object); slots j >= T_b
    of an image with T_b targets are padding (also no object).

    logits:     [D', B, P, K] class logits; D' = every decoder layer (shallowest first), or the last alone without
                aux loss.
    boxes:      [D', B, P, 4] cxcywh in 0..1.
    num_groups: G (0 when no image of the batch has a target: then P = 0).
    """

    logits: Tensor
    boxes: Tensor
    num_groups: int


class DetectionOutput(NamedTuple):
    """What every detector returns, in train and eval mode alike.

    logits:    [B, Q, K + 1] for softmax heads (last column = no object) or [B, Q, K] for sigmoid heads.
    boxes:     [B, Q, 4] cxcywh in 0..1, relative to the unpadded image.
    aux:       one (logits, boxes) pair per earlier decoder layer, shallowest first; empty without aux loss.
    encoder:   two-stage encoder proposals (logits [B, S, K], boxes [B, S, 4]; with mixed query selection the Q
               selected ones, [B, Q, K] and [B, Q, 4]) or None.
    denoising: the denoising queries' predictions (training with targets and contrastive denoising only), else None.
    """

    logits: Tensor
    boxes: Tensor
    aux: tuple[tuple[Tensor, Tensor], ...] = ()
    encoder: tuple[Tensor, Tensor] | None = None
    denoising: DenoisingOutput | None = None


class LossOutput(NamedTuple):
    """loss: scalar to call backward on; terms: every weighted loss term and metric, detached, for logging."""

    loss: Tensor
    terms: dict[str, Tensor]


@dataclass
class Detections:
    """Detections of one image in its original pixels.

    boxes:  [N, 4] xyxy in original-image pixels.
    scores: [N] float in 0..1.
    labels: [N] int64 contiguous labels.
    names:  class names of ``labels`` when a label map is known, else empty.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.scores.shape[0]

    def to(self, device: torch.device | str) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device), list(self.names))

    def filter(self, keep: Tensor) -> "Detections":
        """Keep the detections where ``keep`` ([N] bool) is True."""
        names = [n for n, k in zip(self.names, keep.tolist()) if k] if self.names else []
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], names)


@dataclass(frozen=True)
class LabelMap:
    """Contiguous training labels 0..K-1 <-> dataset category ids and names.

    ``category_ids[label]`` is the COCO category id of ``label``; ``names[label]`` its name.
    Official DETR checkpoints use 91 "slots" where label == category id; those unused slots are named "N/A".
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.names):
            raise ValueError(f"LabelMap: {len(self.category_ids)} category ids but {len(self.names)} names")
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"LabelMap: duplicated category ids in {self.category_ids}")

    def __len__(self) -> int:
        return len(self.category_ids)

    @property
    def id2label(self) -> dict[int, str]:
        """label index -> class name (the Hugging Face convention)."""
        return dict(enumerate(self.names))

    @property
    def category_to_label(self) -> dict[int, int]:
        return {cat: label for label, cat in enumerate(self.category_ids)}

    @classmethod
    def from_coco_categories(cls, categories: Sequence[Mapping]) -> "LabelMap":
        """Contiguous labels in ascending category-id order (COCO's 80 classes -> 0..79)."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    @classmethod
    def identity(cls, names_by_id: Mapping[int, str], num_slots: int) -> "LabelMap":
        """label == category id for ids 0..num_slots-1 (the official checkpoints' 91-slot layout)."""
        return cls(tuple(range(num_slots)), tuple(names_by_id.get(i, "N/A") for i in range(num_slots)))

    def to_dict(self) -> dict:
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LabelMap":
        return cls(tuple(int(i) for i in data["category_ids"]), tuple(str(n) for n in data["names"]))
