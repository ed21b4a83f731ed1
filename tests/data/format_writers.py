"""COCO -> YOLO and COCO -> Pascal VOC copies of a dataset, written for the tests as the formats' own tools lay them
out (Ultralytics' images/ + labels/ + data.yaml; VOC's Annotations/, JPEGImages/, ImageSets/Main/).

These writers encode each format's conventions independently of detr_kit's readers: YOLO lines are
``class cx cy w h`` as fractions of the image, with the class the category's index in ascending-id order; VOC
corners are 1-based inclusive pixel indices (xmin = x + 1, xmax = x + w), written as exact decimal floats. Images
are hard-linked (copied where links fail), never moved.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from xml.sax.saxutils import escape

import yaml


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def boxes_only(annotation_file: Path, out: Path) -> Path:
    """A copy of a COCO json holding what YOLO can express: no crowd annotations, and each ``area`` the box's
    (COCO's is the segmentation mask's, which decides the small/medium/large split of APs/APm/APl)."""
    data = json.loads(annotation_file.read_text())
    data["annotations"] = [{**a, "area": a["bbox"][2] * a["bbox"][3]} for a in data["annotations"]
                           if not a.get("iscrowd", 0)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    return out


def coco_to_yolo(splits: dict[str, Path], image_dir: Path, out: Path, names_as_dict: bool = False,
                 empty_label_files: bool = False) -> Path:
    """Write a YOLO copy of COCO splits ({yaml key: json}); crowd annotations are left out (YOLO has none).

    Images without annotations get no label file, or an empty one with ``empty_label_files``.
    Returns the data.yaml.
    """
    names: list[str] = []
    for split, annotation_file in splits.items():
        data = json.loads(annotation_file.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in categories]
        index = {c["id"]: i for i, c in enumerate(categories)}
        lines: dict[int, list[str]] = {img["id"]: [] for img in data["images"]}
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            lines[ann["image_id"]].append(
                f"{index[ann['category_id']]} {(x + w / 2) / width!r} {(y + h / 2) / height!r} {w / width!r} {h / height!r}")
        for img in data["images"]:
            _link(image_dir / img["file_name"], out / "images" / split / img["file_name"])
            label = out / "labels" / split / (Path(img["file_name"]).stem + ".txt")
            if lines[img["id"]] or empty_label_files:
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("".join(line + "\n" for line in lines[img["id"]]))
    spec = {"path": ".", **{split: f"images/{split}" for split in splits},
            "names": dict(enumerate(names)) if names_as_dict else names}
    (out / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out / "data.yaml"


def coco_to_voc(splits: dict[str, Path], image_dir: Path, out: Path) -> Path:
    """Write a Pascal VOC copy of COCO splits ({ImageSets name: json}); crowd annotations become difficult objects.

    Returns the VOC root.
    """
    for split, annotation_file in splits.items():
        data = json.loads(annotation_file.read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        objects: dict[int, list[str]] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            objects[ann["image_id"]].append(
                f"<object><name>{escape(names[ann['category_id']])}</name><pose>Unspecified</pose>"
                f"<truncated>0</truncated><difficult>{int(bool(ann.get('iscrowd', 0)))}</difficult>"
                f"<bndbox><xmin>{x + 1!r}</xmin><ymin>{y + 1!r}</ymin><xmax>{x + w!r}</xmax><ymax>{y + h!r}</ymax>"
                f"</bndbox></object>")
        ids = []
        for img in data["images"]:
            stem = Path(img["file_name"]).stem
            ids.append(stem)
            _link(image_dir / img["file_name"], out / "JPEGImages" / img["file_name"])
            xml = (f"<annotation><folder>VOC</folder><filename>{escape(img['file_name'])}</filename>"
                   f"<size><width>{img['width']}</width><height>{img['height']}</height><depth>3</depth></size>"
                   f"<segmented>0</segmented>{''.join(objects[img['id']])}</annotation>\n")
            (out / "Annotations").mkdir(parents=True, exist_ok=True)
            (out / "Annotations" / f"{stem}.xml").write_text(xml)
        (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return out
