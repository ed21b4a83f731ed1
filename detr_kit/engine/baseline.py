"""The constant-box baseline: the AP a detector scores without looking at the images, and the warnings built on it.

A detector that has learnt nothing but where boxes of each class usually are puts one box per class at the same
relative place in every image. Its AP is far from zero on most datasets (a centred box of the mean size covers
many single-object photographs at IoU 0.5), so an AP of 0.2 after training may mean nothing. The trainer prints
this baseline at start, logs it beside every epoch's AP, draws it on the AP plot, and warns when the model is
still close to it after a third of the epochs; ``tools/check_data.py`` prints it for a dataset.

The baseline: for every class with boxes in the training split, the mean of its boxes (cx, cy, w, h) as fractions
of their image's width and height; on every validation image, one detection per such class at that mean box in
the image's pixels, scored with the share of training images that hold the class. Within a class every image
gets the same score, so COCOeval ranks them in image-id order (its sort is stable); the scores rank classes
against each other, which per-class AP ignores. Scored by ``CocoEvaluator``, the evaluator of training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO

from detr_kit.engine.evaluator import CocoEvaluator, EvalBackend
from detr_kit.structures import Detections, LabelMap, Target

BASELINE_MARGIN = 0.05  # AP within this of the baseline's (absolute) has not learnt beyond the class layout
SMALL_DATASET = 5000  # training images below which a randomly initialised backbone rarely learns


def mean_class_boxes(coco: COCO, label_map: LabelMap) -> tuple[np.ndarray, np.ndarray]:
    """The mean box and image share of every class in a training split.

    Boxes that count: not crowd, finite, with positive width and height, clipped to their image.

    Args:
        coco: the training split's annotations.
        label_map: contiguous labels -> category ids.

    Returns:
        ``(mean_cxcywh, image_share)``: [K, 4] float64 cxcywh as fractions of the image (NaN rows for classes
        without boxes) and [K] float64, the fraction of the split's images holding a box of the class.
    """
    num_classes = len(label_map)
    sums = np.zeros((num_classes, 4))  # [K, 4] cxcywh fractions
    counts = np.zeros(num_classes)
    holders: list[set[int]] = [set() for _ in range(num_classes)]
    to_label = label_map.category_to_label
    for ann in coco.dataset.get("annotations", []):
        label = to_label.get(ann.get("category_id"))
        image = coco.imgs.get(ann.get("image_id"))
        if label is None or image is None or ann.get("iscrowd", 0):
            continue
        x, y, w, h = (float("nan") if v is None else float(v) for v in ann["bbox"])
        width, height = float(image["width"]), float(image["height"])
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if not all(np.isfinite((x, y, w, h))) or x2 <= x1 or y2 <= y1:
            continue
        sums[label] += ((x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height)
        counts[label] += 1
        holders[label].add(int(ann["image_id"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts[:, None]  # [K, 4]; NaN where a class has no box
    share = np.array([len(h) for h in holders], dtype=np.float64) / max(1, len(coco.imgs))  # [K]
    return mean, share


def constant_box_detections(mean_cxcywh: np.ndarray, share: np.ndarray, width: int, height: int) -> Detections:
    """One detection per class with a mean box, at that box in a ``width`` x ``height`` image.

    Args:
        mean_cxcywh: [K, 4] cxcywh fractions (NaN rows are left out).
        share: [K] scores.
        width, height: the image's size in pixels.

    Returns:
        Detections with boxes [N, 4] xyxy in the image's pixels (float64), N = classes with a mean box.
    """
    labels = np.flatnonzero(np.isfinite(mean_cxcywh).all(axis=1))  # [N]
    cx, cy, w, h = mean_cxcywh[labels].T  # each [N]
    boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
    return Detections(torch.from_numpy(boxes).reshape(-1, 4), torch.from_numpy(share[labels]), torch.from_numpy(labels))


def constant_box_baseline(train_coco: COCO, val_coco: COCO, label_map: LabelMap,
                          backend: EvalBackend = "pycocotools") -> dict[str, Any]:
    """COCO AP of the constant-box baseline (see the module docstring) on every image of ``val_coco``.

    Args:
        train_coco: the training split (the mean boxes and scores come from it).
        val_coco: the split scored.
        label_map: contiguous labels -> category ids of both splits.
        backend: the evaluator's backend.

    Returns:
        ``CocoEvaluator.summarize``'s metrics (AP, AP50, ..., per_class_AP), printed nothing.
    """
    mean, share = mean_class_boxes(train_coco, label_map)
    evaluator = CocoEvaluator(val_coco, label_map, backend)
    empty = torch.zeros(0, 4)
    for image_id in sorted(val_coco.imgs):
        image = val_coco.imgs[image_id]
        target = Target(empty, torch.zeros(0, dtype=torch.int64), image_id=int(image_id))
        evaluator.update([target], [constant_box_detections(mean, share, int(image["width"]), int(image["height"]))])
    return evaluator.summarize(verbose=False)


def baseline_line(metrics: dict[str, Any]) -> str:
    """The console line of the baseline."""
    return (f"constant-box baseline (one box per class at its mean training position): AP {metrics['AP']:.4f}, "
            f"AP50 {metrics['AP50']:.4f} on the validation split; the model must beat it clearly")


def near_baseline_warning(epoch: int, epochs: int, ap: float, baseline_ap: float) -> str | None:
    """The warning for a model whose AP is within ``BASELINE_MARGIN`` of the baseline's after a third of the epochs.

    Args:
        epoch: epochs done (1-based count).
        epochs: ``train.epochs``.
        ap: the model's AP after ``epoch`` epochs.
        baseline_ap: the constant-box baseline's AP.

    Returns:
        The message, or None when it is too early or the model is clearly above the baseline.
    """
    if 3 * epoch < epochs or ap >= baseline_ap + BASELINE_MARGIN:
        return None
    return (f"warning: after {epoch} of {epochs} epochs the model's AP {ap:.4f} is within {BASELINE_MARGIN} of the "
            f"constant-box baseline's {baseline_ap:.4f}: it has learnt little more than where boxes usually are. "
            "Check the labels (tools/check_data.py), start from pretrained weights (model.backbone.weights, "
            "train.init_from), or train longer")


def small_dataset_warning(weights: str | None, init_from: str | None, num_images: int, dataset: str) -> str | None:
    """The warning for a randomly initialised backbone on fewer than ``SMALL_DATASET`` training images.

    Args:
        weights: ``model.backbone.weights``.
        init_from: ``train.init_from`` (its weights include a backbone).
        num_images: training images.
        dataset: ``data.dataset`` (the generated shapes are learnt from scratch by design).

    Returns:
        The message, or None when the backbone is pretrained or the dataset large.
    """
    if weights or init_from or dataset == "synthetic" or num_images >= SMALL_DATASET:
        return None
    return (f"warning: the backbone starts from random weights (model.backbone.weights=null) and the training split "
            f"has {num_images} images (< {SMALL_DATASET}): such a run rarely learns much beyond the constant-box "
            "baseline — set model.backbone.weights to ImageNet weights (e.g. IMAGENET1K_V1, or a local file of "
            "that torchvision model), or fine-tune a detector with train.init_from")


__all__ = [
    "BASELINE_MARGIN",
    "SMALL_DATASET",
    "baseline_line",
    "constant_box_baseline",
    "constant_box_detections",
    "mean_class_boxes",
    "near_baseline_warning",
    "small_dataset_warning",
]
