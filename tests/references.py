"""Plain reference implementations shared by several test files (written for clarity, not speed)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch


def bilinear_reference(value, shapes, locations, weights):
    """Plain deformable attention: explicit 4-corner bilinear interpolation with gather, zero outside the map.

    value [B, S, M, Dh], shapes list of (h, w), locations [B, Q, M, L, P, 2] (x, y) in 0..1, weights [B, Q, M, L, P].
    A location u in 0..1 maps to pixel coordinate u * size - 0.5 (pixel centres at integers, align_corners=False).
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    start = 0
    for level, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w]  # [B, h*w, M, Dh]
        start += h * w
        x = locations[:, :, :, level, :, 0] * w - 0.5  # [B, Q, M, P]
        y = locations[:, :, :, level, :, 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                corner_weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())  # [B, Q, M, P]
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()  # [B, Q, M, P]
                for b in range(batch):
                    for m in range(heads):
                        rows = v[b, :, m][index[b, :, m].reshape(-1)].reshape(queries, points, head_dim)  # [Q, P, Dh]
                        scale = (corner_weight[b, :, m] * inside[b, :, m] * weights[b, :, m, level]).unsqueeze(-1)
                        out[b, :, m] += (rows * scale).sum(1)
    return out.reshape(batch, queries, heads * head_dim)


def pycocotools_baseline(train: dict, val: dict) -> np.ndarray:
    """COCOeval's 12 stats of the constant-box baseline (detr_kit/engine/baseline.py), its detections json built here
    from the plain train and val json dicts: per category the mean of its clipped, non-crowd boxes as fractions of
    their image, one detection per category on every val image, scored by the share of train images holding it."""
    images = {img["id"]: img for img in train["images"]}
    boxes: dict[int, list] = {}
    holders: dict[int, set] = {}
    for ann in train["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        img = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        x1, x2 = np.clip([x, x + w], 0, img["width"])
        y1, y2 = np.clip([y, y + h], 0, img["height"])
        if x2 > x1 and y2 > y1:
            boxes.setdefault(ann["category_id"], []).append(
                [(x1 + x2) / 2 / img["width"], (y1 + y2) / 2 / img["height"], (x2 - x1) / img["width"],
                 (y2 - y1) / img["height"]])
            holders.setdefault(ann["category_id"], set()).add(ann["image_id"])
    detections = []
    for img in val["images"]:
        for category_id, cat_boxes in boxes.items():
            cx, cy, w, h = np.mean(cat_boxes, axis=0)
            W, H = img["width"], img["height"]  # noqa: N806
            detections.append({"image_id": img["id"], "category_id": category_id, "score": len(holders[category_id])
                               / len(train["images"]), "bbox": [(cx - w / 2) * W, (cy - h / 2) * H, w * W, h * H]})
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(val))
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats
