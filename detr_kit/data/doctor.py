"""The dataset doctor: every problem of a detection dataset that would break or silently spoil training.

A :class:`Report` collects :class:`Problem` s (a kind, where it is, what is wrong); each kind has a severity
(``SEVERITY``) and a fix (``FIXES``). The checks never raise for broken input. ``tools/check_data.py`` runs
all of them and prints the report; ``CocoDetection`` (so ``build_datasets``, training and evaluation) runs the
fast ones (json and file presence, no pixel decoding) through :func:`load_checked_coco`, which raises one
``DatasetError`` listing every error-level problem and the doctor command that explains them.

The report is format-neutral (a problem names a record or a file, whatever the layout): the checks here read
COCO json, and the YOLO and Pascal VOC readers (``data/yolo.py``, ``data/voc.py``) add their own problems to the
same report while they read (``data/formats.py`` runs them). This module needs only json, PIL and the standard
library (no torch), so the doctor starts fast.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from detr_kit.errors import DatasetError

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
    "image_folder": "error",
    "missing_image": "error",
    "unreadable_image": "error",
    "size_mismatch": "error",
    "nan_box": "warning",
    "negative_size": "warning",
    "zero_area": "warning",
    "out_of_bounds": "warning",
    "empty_dataset": "error",
    "layout": "error",
    "bad_label_line": "error",
    "bad_xml": "error",
    "unknown_class": "error",
    "not_normalized": "error",
    "corners_as_size": "warning",
    "xy_swapped": "warning",
    "inverted_box": "warning",
    "orphan_label": "warning",
    "missing_annotation": "warning",
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
    "image_folder": "point to the folder the json's file_name entries are relative to",
    "missing_image": "copy the file into the image folder, fix file_name, or remove the image from the json",
    "unreadable_image": "re-encode or replace the file (a truncated download?), or remove it from the json",
    "size_mismatch": "set width/height in the json to the file's size (boxes must match the pixels the file holds)",
    "nan_box": "fix or delete the annotation (the dataset drops it)",
    "negative_size": "bbox is [x, y, width, height], not corners? fix or delete it (the dataset drops it)",
    "zero_area": "delete the annotation or give it a size (the dataset drops it)",
    "out_of_bounds": "clip the box to the image (the dataset clips it), or check the coordinates' origin/scale",
    "empty_image": "fine for background images; otherwise the annotations are missing",
    "empty_dataset": "check the split's paths (data.root, the json, data.train_split / data.val_split): a split "
                     "without images or boxes trains or evaluates nothing",
    "layout": "lay the files out as the format expects (YOLO: data.yaml with path/train/val/names; VOC: "
              "Annotations/, JPEGImages/, ImageSets/Main/<split>.txt), or choose the splits with data.train_split / "
              "data.val_split",
    "bad_label_line": "write one object per line as 'class cx cy w h' (a class index, then four numbers)",
    "bad_xml": "re-export it from the labelling tool: a VOC <annotation> whose <object>s have a <name> and a "
               "<bndbox> of xmin/ymin/xmax/ymax numbers",
    "unknown_class": "add the class to data.yaml's names (YOLO) or to data.classes (VOC), or fix the label",
    "not_normalized": "YOLO coordinates are fractions of the image size (pixels given?): divide x and width by the "
                      "image width, y and height by its height",
    "corners_as_size": "the box looks like corners x1 y1 x2 y2 where the format wants x y width height (COCO) or "
                       "cx cy w h (YOLO): convert it (the dataset clips it as it is)",
    "xy_swapped": "x and y look exchanged (the box fits the image only with them swapped): swap them (the dataset "
                  "clips it as it is)",
    "inverted_box": "swap xmin and xmax (or ymin and ymax) so that min <= max (the dataset drops the box)",
    "orphan_label": "no image has this label file's name: add the image or remove the label file (it is not used)",
    "missing_annotation": "add Annotations/<id>.xml (an <annotation> without <object> for an image with no objects); "
                          "the image is used as a negative",
}
_ORDER = ("error", "warning", "info")


class Problem(NamedTuple):
    kind: str  # a key of SEVERITY
    where: str  # the file or record, e.g. "annotation id=7 (image id=3)"
    message: str


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    histogram: Counter = field(default_factory=Counter)  # class name -> annotations
    num_images: int = 0
    num_annotations: int = 0

    def add(self, kind: str, where: str, message: str) -> None:
        self.problems.append(Problem(kind, where, message))

    def count(self, severity: str) -> int:
        return sum(1 for p in self.problems if SEVERITY[p.kind] == severity)

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    def errors(self) -> list[Problem]:
        return [p for p in self.problems if SEVERITY[p.kind] == "error"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ checks


def read_coco_json(annotation_file: str | os.PathLike, report: Report) -> dict | None:
    """The parsed json when it is a COCO object with list-valued images/annotations/categories, else None."""
    where = str(annotation_file)
    try:
        data = json.loads(Path(annotation_file).read_bytes())
    except FileNotFoundError:
        report.add("json", where, "annotation file not found")
        return None
    except IsADirectoryError:
        report.add("json", where, "is a folder, not an annotation file")
        return None
    except (OSError, ValueError) as err:
        report.add("json", where, f"not readable as JSON (truncated or corrupt?): {err}")
        return None
    if not isinstance(data, dict):
        report.add("json", where, f"top level is a {type(data).__name__}, not a COCO object")
        return None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        report.add("json", where, f"missing or non-list key(s) {missing}")
        return None
    return data


def check_records(data: dict, report: Report) -> dict[Any, dict]:
    """Check categories, images and annotations of a COCO json; returns the usable images by id."""
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
        _check_box(ann["bbox"], img, where, report)
    check_not_empty(report, "images", "annotations")
    return images


def check_not_empty(report: Report, images_where: str, boxes_where: str) -> None:
    """An ``empty_dataset`` problem when the report counted no images, or no annotations."""
    if report.num_images == 0:
        report.add("empty_dataset", images_where, "lists no images")
    elif report.num_annotations == 0:
        report.add("empty_dataset", boxes_where, f"no image of the {report.num_images} has an annotation")


def _check_box(bbox: Any, img: dict | None, where: str, report: Report) -> None:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) or v is None for v in bbox)):
        report.add("bad_bbox", where, f"bbox {str(bbox)[:80]} is not [x, y, width, height]")
        return
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
            if x < w <= W + 0.5 and y < h <= H + 0.5:  # fits as [x1, y1, x2, y2]
                report.add("corners_as_size", where, f"bbox {bbox} leaves the {W}x{H} image as [x, y, width, height] "
                                                     f"but fits it as corners [x1, y1, x2, y2]")
            elif fits_swapped(x, y, x + w, y + h, W, H, tolerance=0.5):
                report.add("xy_swapped", where, f"bbox {bbox} leaves the {W}x{H} image but fits it with x and y swapped")
            else:
                report.add("out_of_bounds", where, f"bbox {bbox} leaves the {W}x{H} image (x+w={x + w:g}, y+h={y + h:g})")
        if min(x + w, W) - max(x, 0) <= 0 or min(y + h, H) - max(y, 0) <= 0:
            report.add("zero_area", where, f"bbox {bbox} lies entirely outside the {W}x{H} image")


def fits_swapped(x0: float, y0: float, x1: float, y1: float, width: float, height: float, tolerance: float) -> bool:
    """Whether the pixel box (x0, y0)-(x1, y1) lies inside a ``width`` x ``height`` image once x and y are swapped."""
    return -tolerance <= y0 and y1 <= width + tolerance and -tolerance <= x0 and x1 <= height + tolerance


def check_image_files(
    image_dir: str | os.PathLike, images: dict[Any, dict], annotated: set, report: Report, check_pixels: bool = True
) -> None:
    """Check that every image exists (and, with ``check_pixels``, decodes at the size the json states).

    Args:
        image_dir: the folder ``file_name`` is relative to.
        images: usable images by id (from :func:`check_records`).
        annotated: ids of the images that have annotations (the others are reported as ``empty_image``).
        report: where problems go.
        check_pixels: decode every file (slow); False checks presence only (one folder listing).
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        problem = "is a file, not a folder" if image_dir.exists() else "folder not found"
        report.add("image_folder", str(image_dir), problem)
    files, folders = _listing(image_dir)
    for image_id, img in images.items():
        where = f"image id={image_id} {img['file_name']}"
        if image_id not in annotated:
            report.add("empty_image", where, "has no annotations")
        if not image_dir.is_dir():
            continue
        name = str(img["file_name"])
        path = image_dir / name
        if name in folders or (name not in files and path.is_dir()):
            report.add("unreadable_image", where, f"{path} is a folder, not an image file")
            continue
        if name not in files and not path.is_file():
            report.add("missing_image", where, f"{path} not found")
            continue
        if check_pixels:
            _check_pixels(path, img, where, report)


def _listing(folder: Path) -> tuple[set[str], set[str]]:
    """(file names, folder names) directly in ``folder``: one listing instead of a stat per image."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return set(), set()
    return {e.name for e in entries if e.is_file()}, {e.name for e in entries if e.is_dir()}


def _check_pixels(path: Path, img: dict, where: str, report: Report) -> None:
    from PIL import Image, ImageOps

    try:  # decode the whole file to catch truncation
        with Image.open(path) as image:
            raw = image.size
            image.load()
            upright = ImageOps.exif_transpose(image).size
    except Exception as err:  # PIL raises many types for broken files; all mean "unreadable"
        report.add("unreadable_image", where, f"{path}: {type(err).__name__}: {err}")
        return
    expected = (img["width"], img["height"])
    if upright != expected:
        note = " (the json matches the stored pixels, but the EXIF orientation rotates them)" if raw == expected else ""
        report.add("size_mismatch", where,
                   f"json says {expected[0]}x{expected[1]} (w x h), file is {upright[0]}x{upright[1]}{note}")


def check_dataset(
    image_dir: str | os.PathLike, annotation_file: str | os.PathLike, check_pixels: bool = True
) -> Report:
    """Run every check on a COCO-format dataset; never raises for broken input (problems go into the report)."""
    report = Report()
    data = read_coco_json(annotation_file, report)
    if data is None:
        return report
    images = check_records(data, report)
    annotated = {ann["image_id"] for ann in data["annotations"] if isinstance(ann, dict) and "image_id" in ann}
    check_image_files(image_dir, images, annotated, report, check_pixels)
    return report


# ------------------------------------------------------------------------------------------ reporting


def doctor_command(image_dir: str | os.PathLike, annotation_file: str | os.PathLike) -> str:
    """The command that prints the full report for these paths."""
    images, annotations = shlex.quote(str(image_dir)), shlex.quote(str(annotation_file))
    return f"python tools/check_data.py --images {images} --annotations {annotations}"


def load_checked_coco(
    image_dir: str | os.PathLike | None, annotation_file: str | os.PathLike, max_per_kind: int = 5
) -> dict:
    """Read a COCO json and run the fast checks (records; file presence when ``image_dir`` is given).

    Returns:
        The parsed json.

    Raises:
        DatasetError: listing every error-level problem (``max_per_kind`` of each kind, then counts, then each
            kind's fix) and naming the doctor command for these paths. Warnings are left to the dataset.
    """
    report = Report()
    data = read_coco_json(annotation_file, report)
    if data is not None:
        images = check_records(data, report)
        if image_dir is not None:
            check_image_files(image_dir, images, set(images), report, check_pixels=False)
    doctor = doctor_command(image_dir, annotation_file) if image_dir is not None else "python tools/check_data.py"
    raise_for_errors(report, str(annotation_file), doctor, max_per_kind=max_per_kind)
    return data  # type: ignore[return-value]


def raise_for_errors(
    report: Report, subject: str, doctor: str, tolerated: tuple[str, ...] = ("unreadable_image",), max_per_kind: int = 5
) -> None:
    """Raise one DatasetError listing every error-level problem of ``report``; return when there is none.

    Args:
        report: the problems found.
        subject: what was checked, first in the message (the json, or a YOLO/VOC split).
        doctor: the command that prints the full report.
        tolerated: error kinds left to the dataset; by default unreadable images, which the dataset skips or
            refuses when it reads them, as ``data.on_bad_image`` says.
        max_per_kind: problems listed per kind (then a count), before each kind's fix.
    """
    errors = [p for p in report.errors() if p.kind not in tolerated]
    if not errors:
        return
    counts = Counter(p.kind for p in errors)
    summary = ", ".join(f"{kind} x{count}" for kind, count in counts.items())
    details: list[str] = []
    for kind, count in counts.items():
        details += [f"{p.kind}: {p.where}: {p.message}" for p in errors if p.kind == kind][:max_per_kind]
        if count > max_per_kind:
            details.append(f"{kind}: ... and {count - max_per_kind} more")
    details += [f"fix {kind}: {FIXES[kind]}" for kind in counts]
    raise DatasetError(
        f"{subject}: {len(errors)} problem(s) make this dataset unusable ({summary})",
        f"fix them; the dataset doctor lists each with its fix: {doctor}",
        details,
    )


def report_lines(report: Report, max_per_kind: int = 50) -> list[str]:
    """The doctor's printed report: each problem (``max_per_kind`` per kind), the class histogram, a summary."""
    lines: list[str] = []
    shown: Counter = Counter()
    for kind, where, message in report.problems:
        shown[kind] += 1
        if shown[kind] <= max_per_kind:
            lines.append(f"[{SEVERITY[kind].upper()}] {kind}: {where}: {message}")
    kinds = Counter(p.kind for p in report.problems)
    for kind, count in sorted(kinds.items()):
        if count > max_per_kind:
            lines.append(f"[{SEVERITY[kind].upper()}] {kind}: ... and {count - max_per_kind} more")
    lines.append(f"\n{report.num_images} images, {report.num_annotations} annotations")
    if report.histogram:
        lines.append("class histogram (annotations per class):")
        lines += [f"  {name:24s} {count}" for name, count in report.histogram.most_common()]
    if kinds:
        lines.append("\nsummary and fixes:")
        for kind, count in sorted(kinds.items(), key=lambda kv: (_ORDER.index(SEVERITY[kv[0]]), kv[0])):
            lines.append(f"  {SEVERITY[kind]:7s} {kind:24s} x{count}: {FIXES[kind]}")
    lines.append(f"\n{report.count('error')} errors, {report.count('warning')} warnings")
    return lines


__all__ = [
    "FIXES",
    "SEVERITY",
    "Problem",
    "Report",
    "check_dataset",
    "check_image_files",
    "check_not_empty",
    "check_records",
    "doctor_command",
    "fits_swapped",
    "load_checked_coco",
    "raise_for_errors",
    "read_coco_json",
    "report_lines",
]
