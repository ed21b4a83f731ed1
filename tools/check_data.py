#!/usr/bin/env python
"""The dataset doctor: find what would break or silently spoil training on a COCO-format dataset.

    python tools/check_data.py --images DIR --annotations JSON [--show-aug N --out DIR] [--config CONFIG]

Reports each problem with its file or record and a fix: unreadable json, missing or unreadable images,
json/file size mismatches, boxes out of bounds / zero-area / negative / NaN, unknown category or image
ids, duplicated ids, empty images; then a class histogram. Exit code 1 when there are errors (warnings
alone exit 0). ``--show-aug N`` writes N augmented training samples with their boxes drawn.

The checks need only json, numpy and PIL (no torch), so they start fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

# Severity of every kind of problem. Errors break loading or silently corrupt training; warnings are
# handled by the dataset (boxes clipped or dropped) but usually mean the annotation is wrong.
SEVERITY = {
    "json": "error",
    "bad_record": "error",
    "duplicate_image_id": "error",
    "duplicate_annotation_id": "error",
    "duplicate_category_id": "error",
    "unknown_category": "error",
    "unknown_image": "error",
    "bad_bbox": "error",
    "missing_image": "error",
    "unreadable_image": "error",
    "size_mismatch": "error",
    "nan_box": "warning",
    "negative_size": "warning",
    "zero_area": "warning",
    "out_of_bounds": "warning",
    "empty_image": "info",
}

FIXES = {
    "json": "re-export the annotations as COCO json (keys images, annotations, categories)",
    "bad_record": "give every image id/file_name/width/height, every annotation id/image_id/category_id/bbox, every category id/name",
    "duplicate_image_id": "give every image a unique id",
    "duplicate_annotation_id": "renumber the annotation ids (e.g. 1..N)",
    "duplicate_category_id": "give every category a unique id",
    "unknown_category": "add the category to 'categories' or fix the annotation's category_id",
    "unknown_image": "add the image to 'images' or delete the annotation",
    "bad_bbox": "bbox must be [x, y, width, height] numbers in pixels",
    "missing_image": "copy the file into the image folder, fix file_name, or remove the image from the json",
    "unreadable_image": "re-encode or replace the file (a truncated download?), or remove it from the json",
    "size_mismatch": "set width/height in the json to the file's size (boxes must match the pixels the file holds)",
    "nan_box": "fix or delete the annotation (the dataset drops it)",
    "negative_size": "bbox is [x, y, width, height], not corners? fix or delete it (the dataset drops it)",
    "zero_area": "delete the annotation or give it a size (the dataset drops it)",
    "out_of_bounds": "clip the box to the image (the dataset clips it), or check the coordinates' origin/scale",
    "empty_image": "fine for background images; otherwise the annotations are missing",
}


@dataclass
class Report:
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, where, message)
    histogram: Counter = field(default_factory=Counter)
    num_images: int = 0
    num_annotations: int = 0

    def add(self, kind: str, where: str, message: str) -> None:
        self.problems.append((kind, where, message))

    def count(self, severity: str) -> int:
        return sum(1 for kind, _, _ in self.problems if SEVERITY[kind] == severity)

    def kinds(self) -> set[str]:
        return {kind for kind, _, _ in self.problems}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _file_size(path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """((w, h) as stored, (w, h) after EXIF orientation); decodes the whole file to catch truncation."""
    with Image.open(path) as image:
        raw = image.size
        image.load()
        upright = ImageOps.exif_transpose(image).size
    return raw, upright


def check_dataset(image_dir: Path, annotation_file: Path, check_pixels: bool = True) -> Report:
    """Run every check; never raises for broken input (problems go into the report)."""
    report = Report()
    try:
        data = json.loads(Path(annotation_file).read_bytes())
    except FileNotFoundError:
        report.add("json", str(annotation_file), "annotation file not found")
        return report
    except (OSError, ValueError) as err:
        report.add("json", str(annotation_file), f"not readable as JSON (truncated or corrupt?): {err}")
        return report
    if not isinstance(data, dict):
        report.add("json", str(annotation_file), f"top level is a {type(data).__name__}, not a COCO object")
        return report
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        report.add("json", str(annotation_file), f"missing or non-list key(s) {missing}")
        return report

    categories: dict[Any, str] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            report.add("bad_record", f"categories[{i}]", f"lacks id/name: {str(cat)[:120]}")
            continue
        if cat["id"] in categories:
            report.add("duplicate_category_id", f"categories[{i}]", f"category id {cat['id']} appears more than once")
        categories[cat["id"]] = str(cat["name"])

    images: dict[Any, dict] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or any(k not in img for k in ("id", "file_name", "width", "height")):
            report.add("bad_record", f"images[{i}]", f"lacks id/file_name/width/height: {str(img)[:120]}")
            continue
        where = f"image id={img['id']} {img['file_name']}"
        if not (_is_number(img["width"]) and _is_number(img["height"]) and img["width"] > 0 and img["height"] > 0):
            report.add("bad_record", where, f"invalid size width={img['width']!r} height={img['height']!r}")
            continue
        if img["id"] in images:
            report.add("duplicate_image_id", where, f"image id {img['id']} is also used by {images[img['id']]['file_name']}")
            continue
        images[img["id"]] = img
    report.num_images = len(images)

    seen_annotations: set = set()
    annotated: Counter = Counter()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or any(k not in ann for k in ("id", "image_id", "category_id", "bbox")):
            report.add("bad_record", f"annotations[{i}]", f"lacks id/image_id/category_id/bbox: {str(ann)[:120]}")
            continue
        report.num_annotations += 1
        where = f"annotation id={ann['id']} (image id={ann['image_id']})"
        if ann["id"] in seen_annotations:
            report.add("duplicate_annotation_id", where, f"annotation id {ann['id']} appears more than once")
        seen_annotations.add(ann["id"])
        if ann["category_id"] not in categories:
            report.add("unknown_category", where, f"category id {ann['category_id']} is not in 'categories'")
        else:
            report.histogram[categories[ann["category_id"]]] += 1
        img = images.get(ann["image_id"])
        if img is None:
            report.add("unknown_image", where, f"image id {ann['image_id']} is not in 'images'")
        annotated[ann["image_id"]] += 1
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) or v is None for v in bbox)):
            report.add("bad_bbox", where, f"bbox {str(bbox)[:80]} is not [x, y, width, height]")
            continue
        x, y, w, h = (math.nan if v is None else float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            report.add("nan_box", where, f"bbox {bbox} holds NaN/inf/null")
        elif w < 0 or h < 0:
            report.add("negative_size", where, f"bbox {bbox} has a negative width or height")
        elif w == 0 or h == 0:
            report.add("zero_area", where, f"bbox {bbox} has zero area")
        elif img is not None:
            W, H = img["width"], img["height"]
            if x < 0 or y < 0 or x + w > W + 0.5 or y + h > H + 0.5:
                report.add("out_of_bounds", where, f"bbox {bbox} leaves the {W}x{H} image (x+w={x + w:g}, y+h={y + h:g})")
            if min(x + w, W) - max(x, 0) <= 0 or min(y + h, H) - max(y, 0) <= 0:
                report.add("zero_area", where, f"bbox {bbox} lies entirely outside the {W}x{H} image")

    for image_id, img in images.items():
        where = f"image id={image_id} {img['file_name']}"
        if not annotated[image_id]:
            report.add("empty_image", where, "has no annotations")
        path = Path(image_dir) / str(img["file_name"])
        if not path.is_file():
            report.add("missing_image", where, f"{path} is a folder, not an image file" if path.is_dir() else f"{path} not found")
            continue
        if not check_pixels:
            continue
        try:
            raw, upright = _file_size(path)
        except Exception as err:  # PIL raises many types for broken files; all mean "unreadable"
            report.add("unreadable_image", where, f"{path}: {type(err).__name__}: {err}")
            continue
        expected = (img["width"], img["height"])
        if upright != expected:
            note = " (the json matches the stored pixels, but the EXIF orientation rotates them)" if raw == expected else ""
            report.add("size_mismatch", where, f"json says {expected[0]}x{expected[1]} (w x h), file is {upright[0]}x{upright[1]}{note}")
    return report


def print_report(report: Report, max_per_kind: int = 50) -> None:
    shown: Counter = Counter()
    for kind, where, message in report.problems:
        shown[kind] += 1
        if shown[kind] <= max_per_kind:
            print(f"[{SEVERITY[kind].upper()}] {kind}: {where}: {message}")
    kinds = Counter(kind for kind, _, _ in report.problems)
    for kind, count in sorted(kinds.items()):
        if count > max_per_kind:
            print(f"[{SEVERITY[kind].upper()}] {kind}: ... and {count - max_per_kind} more")
    print(f"\n{report.num_images} images, {report.num_annotations} annotations")
    if report.histogram:
        print("class histogram (annotations per class):")
        for name, count in report.histogram.most_common():
            print(f"  {name:24s} {count}")
    if kinds:
        print("\nsummary and fixes:")
        for kind, count in sorted(kinds.items(), key=lambda kv: (["error", "warning", "info"].index(SEVERITY[kv[0]]), kv[0])):
            print(f"  {SEVERITY[kind]:7s} {kind:24s} x{count}: {FIXES[kind]}")
    print(f"\n{report.count('error')} errors, {report.count('warning')} warnings")


def show_augmentations(image_dir: Path, annotation_file: Path, num: int, out_dir: Path, config: str | None) -> int:
    """Write ``num`` augmented training samples with their boxes drawn; returns the number of errors."""
    import numpy as np
    from PIL import ImageDraw

    from detr_kit.build import build_transforms
    from detr_kit.config import ConfigError, DataConfig, load_config
    from detr_kit.data.coco import BadImageError, CocoDetection
    from detr_kit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, boxes_to_original, seed_transforms

    try:
        data_cfg = load_config(config).data if config else DataConfig()
        transforms = build_transforms(data_cfg, train=True)
        dataset = CocoDetection(image_dir, annotation_file, transforms, train=True, on_bad_image="skip")
    except (ConfigError, ValueError, OSError) as err:
        print(f"[ERROR] show-aug: cannot build the training dataset: {err}")
        return 1
    if len(dataset) == 0:
        print(f"[ERROR] show-aug: {annotation_file} lists no images; nothing to show")
        return 1
    seed_transforms(dataset.transforms, 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    for i in range(num):
        try:
            image, target = dataset[i % len(dataset)]
        except BadImageError as err:  # every image is unreadable (each is also listed above)
            print(f"[ERROR] show-aug: {err}")
            return 1
        pixels = image.permute(1, 2, 0).numpy() * std + mean  # [H, W, 3] in 0..1
        canvas = Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for box, label in zip(boxes_to_original(target.boxes, target.size).tolist(), target.labels.tolist()):
            draw.rectangle(box, outline=(255, 0, 0), width=2)
            draw.text((box[0] + 2, box[1] + 1), dataset.label_map.names[label], fill=(255, 255, 0))
        path = out_dir / f"aug_{i:03d}_image{target.image_id}.png"
        canvas.save(path)
        print(f"wrote {path} ({target.size[1]}x{target.size[0]}, {len(target)} boxes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path, help="image folder the json's file_name entries are relative to")
    parser.add_argument("--annotations", required=True, type=Path, help="COCO instances json")
    parser.add_argument("--show-aug", type=int, default=0, metavar="N", help="write N augmented training samples")
    parser.add_argument("--out", type=Path, default=Path("check_data_aug"), help="folder for --show-aug images")
    parser.add_argument("--config", default=None, help="config whose data section defines the augmentation")
    parser.add_argument("--max-per-kind", type=int, default=50, help="problems printed per kind")
    parser.add_argument("--skip-pixels", action="store_true", help="do not open the image files (fast, fewer checks)")
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        print(f"[ERROR] image folder {args.images} does not exist")
        return 1
    report = check_dataset(args.images, args.annotations, check_pixels=not args.skip_pixels)
    print_report(report, args.max_per_kind)
    errors = report.count("error")
    if args.show_aug > 0:
        errors += show_augmentations(args.images, args.annotations, args.show_aug, args.out, args.config)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
