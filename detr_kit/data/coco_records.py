"""The COCO-format records the YOLO and VOC readers build: one split's dict, image sizes as shown, file names.

This module needs no torch (the doctor's readers import it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

# The image files a folder split holds (what PIL reads of Ultralytics' list).
IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"})
_EXIF_ORIENTATION = 0x0112


class CocoSplit(NamedTuple):
    """One split read into COCO form: ``data['images'][i]['file_name']`` is relative to ``image_dir``."""

    image_dir: Path
    data: dict
    description: str  # where it came from, e.g. "YOLO my_data/data.yaml val: images/val"


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image as it is shown, after its EXIF rotation; reads the header only.

    Raises:
        Whatever PIL raises for a missing or unreadable file.
    """
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def file_name_under(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (posix separators) when it lies under it, else the absolute path."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path.absolute())


def coco_dict(images: list[dict], annotations: list[dict], names: dict[int, str], description: str) -> dict:
    """A COCO-format dict: the records as given, one category per ``{id: name}`` entry."""
    categories = [{"id": category_id, "name": name} for category_id, name in sorted(names.items())]
    return {"info": {"description": description}, "images": images, "annotations": annotations,
            "categories": categories}


__all__ = ["IMAGE_SUFFIXES", "CocoSplit", "coco_dict", "file_name_under", "upright_size"]
