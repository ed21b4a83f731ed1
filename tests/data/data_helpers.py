"""Helpers for the data tests: the bundled coco128 sample and tiny COCO datasets written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COCO128 = Path(__file__).resolve().parents[2] / "data" / "coco128"


def write_coco(root: Path, images: dict[str, Image.Image | np.ndarray], annotations: list[dict], categories=None, sizes=None) -> tuple[Path, Path]:
    """Write images under root/images and a COCO json; image ids are 1.. in dict order.

    ``annotations`` entries give ``file`` (an image name) instead of ``image_id``; ids are assigned.
    ``sizes`` overrides the json (w, h) of some files.
    """
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records, ids = [], {}
    for i, (name, image) in enumerate(images.items(), start=1):
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        if not (image_dir / name).exists():
            pil.save(image_dir / name)
        w, h = (sizes or {}).get(name, pil.size)
        records.append({"id": i, "file_name": name, "width": w, "height": h})
        ids[name] = i
    anns = []
    for j, ann in enumerate(annotations, start=1):
        entry = {"id": j, "image_id": ids[ann["file"]], "category_id": ann.get("category_id", 1), "bbox": ann["bbox"],
                 "area": 1.0, "iscrowd": ann.get("iscrowd", 0)}
        anns.append(entry)
    categories = categories or [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": records, "annotations": anns, "categories": categories}))
    return image_dir, path
