"""Datasets as they come: COCO json, YOLO (Ultralytics' layout) or Pascal VOC, told apart by their files.

The YOLO and VOC readers (``data/yolo.py``, ``data/voc.py``) turn one split into the in-memory COCO-format dict
the COCO path reads from a json (images with sizes, annotations with xywh pixel boxes, categories with their
names), so ``CocoDetection``, the evaluator (pycocotools) and everything after them are one code path. While
they read, they put every problem into a doctor ``Report`` (``data/doctor.py``), naming the file and line.

This module needs no torch (the doctor imports it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Sequence

from detr_kit.data.coco_records import CocoSplit
from detr_kit.data.doctor import Report, check_image_files, raise_for_errors
from detr_kit.errors import DatasetError

logger = logging.getLogger(__name__)

Format = Literal["coco", "yolo", "voc"]
FORMAT_NAMES = {"coco": "COCO", "yolo": "YOLO", "voc": "Pascal VOC"}
YOLO_YAML_NAMES = ("data.yaml", "data.yml")


# ------------------------------------------------------------------------------------------------ detection


def yolo_yaml(root: Path) -> Path:
    """The data.yaml of a YOLO dataset: ``root`` itself when it is a file, else its data.yaml (or data.yml)."""
    if root.is_file():
        return root
    return next((root / name for name in YOLO_YAML_NAMES if (root / name).is_file()), root / YOLO_YAML_NAMES[0])


def found_format(root: Path, coco_files: Sequence[str]) -> tuple[Format, str] | None:
    """The format whose files are in ``root`` and what they are, or None."""
    jsons = [name for name in coco_files if name.endswith(".json") and (root / name).is_file()]
    if jsons:
        return "coco", ", ".join(jsons)
    yaml_file = yolo_yaml(root)
    if yaml_file.is_file():
        return "yolo", str(yaml_file)
    if (root / "Annotations").is_dir() and ((root / "JPEGImages").is_dir() or (root / "ImageSets" / "Main").is_dir()):
        return "voc", "Annotations/, JPEGImages/, ImageSets/Main/"
    if any((root / name).exists() for name in coco_files) or any((root / "annotations").glob("*.json")):
        return "coco", "annotations/ or the data.train_images / data.val_images folders"
    return None


def detect_format(root: str | os.PathLike, coco_files: Sequence[str], help_line: str) -> tuple[Format, str]:
    """The format of the dataset at ``root``, and the one line that says what was found there.

    Looked for, in this order: the COCO jsons ``coco_files`` (relative to ``root``), a YOLO data.yaml (or ``root``
    is that yaml), Pascal VOC's Annotations/ beside JPEGImages/ or ImageSets/Main/, then COCO's annotations/ folder
    or image folders (so that a half-present COCO dataset gets COCO's error naming the missing files).

    Raises:
        DatasetError: ``root`` does not exist (the fix is ``help_line``), or holds none of these (one line listing
            what was looked for, and a subfolder that has them, if one does).
    """
    root = Path(root)
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        return "yolo", f"data.dataset=auto: a YOLO dataset ({root})"
    if not root.is_dir():
        problem = f"{root} is a file, not a folder" if root.exists() else f"no folder {root}"
        raise DatasetError(f"data.root={root}: dataset not found ({problem})", help_line)
    found = found_format(root, coco_files)
    if found is not None:
        return found[0], f"data.dataset=auto: a {FORMAT_NAMES[found[0]]} dataset in {root} ({found[1]})"
    below = [child for child in sorted(root.iterdir()) if child.is_dir() and found_format(child, coco_files)]
    hint = f"; its subfolder {below[0]} has one: set data.root={below[0]}" if below else ""
    jsons = " / ".join(name for name in coco_files if name.endswith(".json"))
    raise DatasetError(
        f"data.root={root}: no dataset found (looked for COCO {jsons} or annotations/*.json, YOLO data.yaml, "
        f"Pascal VOC Annotations/ + JPEGImages/ + ImageSets/Main/{hint})",
        "point data.root at the dataset's folder (or a YOLO data.yaml), or set data.dataset to coco, yolo or voc",
    )


# ------------------------------------------------------------------------------------------------ reading


def read_split(fmt: Format, root: Path, split: str, classes: Sequence[str], report: Report) -> CocoSplit | None:
    """One split of a YOLO or VOC dataset in COCO form; problems go into ``report`` (None: unusable, reported)."""
    if fmt == "yolo":
        from detr_kit.data.yolo import read_yolo_split

        return read_yolo_split(yolo_yaml(root), split, report)
    if fmt == "voc":
        from detr_kit.data.voc import read_voc_split

        return read_voc_split(root, split, classes, report)
    raise ValueError(f"read_split: format must be 'yolo' or 'voc', got {fmt!r}")


def split_subject(fmt: Format, root: str | os.PathLike, split: str) -> str:
    """How a split is named in messages, e.g. "YOLO split 'val' of my_data"."""
    return f"{FORMAT_NAMES[fmt]} split {split!r} of {root}"


def load_checked_split(
    fmt: Format, root: str | os.PathLike, split: str, classes: Sequence[str], doctor: str, skip_unreadable: bool = True
) -> CocoSplit:
    """Read a YOLO or VOC split for training or evaluation, refusing it when it has error-level problems.

    Args:
        fmt: "yolo" or "voc".
        root: the dataset folder (YOLO: or its data.yaml).
        split: the data.yaml key (YOLO) or ImageSets/Main file name (VOC).
        classes: VOC's class names in label order (empty: sorted from the xml files).
        doctor: the command that prints the full report, for the error's fix.
        skip_unreadable: images whose header cannot be read are left out with a warning (else they are errors).

    Raises:
        DatasetError: listing every error-level problem (``raise_for_errors``).
    """
    report = Report()
    source = read_split(fmt, Path(root), split, classes, report)
    tolerated = ("unreadable_image",) if skip_unreadable else ()
    raise_for_errors(report, split_subject(fmt, root, split), doctor, tolerated=tolerated)
    unreadable = [p for p in report.problems if p.kind == "unreadable_image"]
    if unreadable:
        logger.warning("%s: skipping %d unreadable image(s), e.g. %s (%s)", split_subject(fmt, root, split),
                       len(unreadable), unreadable[0].where, unreadable[0].message)
    assert source is not None  # every None comes with an error-level problem, raised above
    return source


def check_split(fmt: Format, root: str | os.PathLike, split: str, classes: Sequence[str],
                check_pixels: bool = True) -> Report:
    """The doctor's full check of a YOLO or VOC split (with ``check_pixels``, every image is decoded); never raises."""
    report = Report()
    source = read_split(fmt, Path(root), split, classes, report)
    if source is not None:
        images = {img["id"]: img for img in source.data["images"]}
        check_image_files(source.image_dir, images, set(images), report, check_pixels)  # negatives: reported above
    return report


__all__ = [
    "FORMAT_NAMES",
    "CocoSplit",
    "check_split",
    "detect_format",
    "found_format",
    "load_checked_split",
    "read_split",
    "split_subject",
    "yolo_yaml",
]
