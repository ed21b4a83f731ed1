"""Pascal VOC datasets, read into an in-memory COCO-format dict.

    VOC2007/Annotations/000005.xml        <annotation><size><width>500</width><height>375</height></size>
                                            <object><name>chair</name><difficult>0</difficult>
                                            <bndbox><xmin>263</xmin><ymin>211</ymin><xmax>324</xmax><ymax>339</ymax>
    VOC2007/JPEGImages/000005.jpg
    VOC2007/ImageSets/Main/train.txt      one image id per line (also val.txt, trainval.txt, test.txt)

The rules:

- A split is ``ImageSets/Main/<split>.txt``; the first word of each line is an image id (so the per-class lists'
  ``000005 -1`` lines read too). Image id ``X`` has ``Annotations/X.xml`` and the image ``JPEGImages/X.jpg``, else
  the xml's ``<filename>``, else ``JPEGImages/X`` with another image suffix. An id without an xml is a negative image.
- The image size is the xml's ``<size>``, or the file's when that is missing or zero.
- ``<bndbox>`` corners are VOC's 1-based, inclusive pixel indices: the COCO box is
  ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (Detectron2's reading); fractional values are kept.
- ``<difficult>1</difficult>`` objects become ``iscrowd`` 1: training leaves them out and evaluation ignores the
  detections that fall on them (pycocotools' crowd rule), as VOC's evaluation ignores difficult objects.
- The classes are the given list, in its order, or every ``<name>`` in ``Annotations/*.xml``, sorted (VOC's 20
  classes come out in their usual order); category ids run 1..K in that order.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from detr_kit.data.coco_records import IMAGE_SUFFIXES, CocoSplit, coco_dict, upright_size
from detr_kit.data.doctor import Report, check_not_empty, fits_swapped

CORNERS = ("xmin", "ymin", "xmax", "ymax")


def voc_class_names(root: Path) -> list[str]:
    """Every ``<object><name>`` in ``root/Annotations/*.xml``, sorted (unparsable files are skipped here)."""
    names: set[str] = set()
    for path in (root / "Annotations").glob("*.xml"):
        try:
            tree = ET.parse(path)
        except (ET.ParseError, OSError):
            continue
        names.update(text.strip() for text in (o.findtext("name") for o in tree.iter("object")) if text and text.strip())
    return sorted(names)


def split_ids(list_file: Path) -> list[tuple[int, str]]:
    """(line number, image id) of every non-empty line of an ImageSets file."""
    lines = list_file.read_text(errors="replace").splitlines()
    return [(number, line.split()[0]) for number, line in enumerate(lines, start=1) if line.strip()]


def read_voc_split(root: Path, split: str, classes: Sequence[str], report: Report) -> CocoSplit | None:
    """Read one split (``ImageSets/Main/<split>.txt``) of a Pascal VOC dataset.

    Args:
        root: the folder holding Annotations/, JPEGImages/ and ImageSets/.
        split: the ImageSets/Main file's name without ``.txt``.
        classes: the class names in label order; empty = every name in the xml files, sorted.
        report: receives every problem, naming the file (and line or object).
    Returns:
        The split as a COCO-format dict (``file_name`` relative to JPEGImages/), or None when the split file is
        missing (reported).
    """
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        present = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        report.add("layout", str(list_file), f"split file not found (ImageSets/Main has {present or 'no split files'});"
                                             f" choose one with data.train_split / data.val_split")
        return None
    names = list(classes) or voc_class_names(root)
    category_ids = {name: i for i, name in enumerate(names, start=1)}
    image_dir = root / "JPEGImages"
    records, annotations = [], []
    first_lines: dict[str, int] = {}
    for number, image_id in split_ids(list_file):
        first_lines.setdefault(image_id, number)
    for image_id, number in first_lines.items():
        where = f"{list_file}:{number} {image_id}"
        xml_file = root / "Annotations" / f"{image_id}.xml"
        tree = _parse(xml_file, report)
        if tree is False:
            continue
        image = _image_file(image_dir, image_id, tree)
        if image is None:
            report.add("missing_image", where, f"no image {image_dir / image_id}.jpg (nor the xml's <filename>)")
            continue
        size = _size(tree, image, report)
        if size is None:
            continue
        record = {"id": len(records) + 1, "file_name": image.name, "width": size[0], "height": size[1]}
        records.append(record)
        if tree is None:
            report.add("missing_annotation", where, f"{xml_file} not found: a negative image (no objects)")
            continue
        objects = _objects(tree, xml_file, record, category_ids, report)
        for category_id, bbox, difficult in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": record["id"], "category_id": category_id,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": difficult})
            report.histogram[names[category_id - 1]] += 1
        if not objects and not tree.findall("object"):
            report.add("empty_image", str(xml_file), "has no <object>: a negative image")
    report.num_images, report.num_annotations = len(records), len(annotations)
    check_not_empty(report, str(list_file), str(list_file))
    description = f"VOC {list_file}"
    return CocoSplit(image_dir, coco_dict(records, annotations, dict(enumerate(names, start=1)), description), description)


def _parse(xml_file: Path, report: Report) -> ET.ElementTree | None | bool:
    """The parsed xml; None when there is none; False when it is unusable (reported)."""
    try:
        tree = ET.parse(xml_file)
    except FileNotFoundError:
        return None
    except (ET.ParseError, OSError) as err:
        report.add("bad_xml", str(xml_file), f"not readable as XML: {err}")
        return False
    if tree.getroot().tag != "annotation":
        report.add("bad_xml", str(xml_file), f"the root element is <{tree.getroot().tag}>, not <annotation>")
        return False
    return tree


def _image_file(image_dir: Path, image_id: str, tree: ET.ElementTree | None) -> Path | None:
    candidates = [image_dir / f"{image_id}.jpg"]
    if tree is not None and (tree.findtext("filename") or "").strip():
        candidates.append(image_dir / Path(tree.findtext("filename").strip()).name)
    candidates += [image_dir / f"{image_id}{suffix}" for suffix in sorted(IMAGE_SUFFIXES)]
    candidates += [image_dir / f"{image_id}{suffix.upper()}" for suffix in sorted(IMAGE_SUFFIXES)]
    return next((path for path in candidates if path.is_file()), None)


def _size(tree: ET.ElementTree | None, image: Path, report: Report) -> tuple[int, int] | None:
    """(width, height) from <size>, else from the image file; None when neither is usable (reported)."""
    if tree is not None:
        try:
            width, height = (int(float(tree.findtext(f"size/{key}") or 0)) for key in ("width", "height"))
        except ValueError:
            width = height = 0
        if width > 0 and height > 0:
            return width, height
    try:
        return upright_size(image)
    except Exception as err:  # PIL raises many types for broken files; all mean "unreadable"
        report.add("unreadable_image", str(image), f"{type(err).__name__}: {err}")
        return None


def _objects(tree: ET.ElementTree, xml_file: Path, record: dict, category_ids: dict[str, int],
             report: Report) -> list[tuple[int, list[float], int]]:
    """(category id, COCO xywh pixel box, difficult) of the usable objects of one xml; problems are reported."""
    width, height = record["width"], record["height"]
    found = []
    for number, obj in enumerate(tree.iter("object"), start=1):
        where = f"{xml_file} object {number}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            report.add("bad_xml", where, "has no <name>")
            continue
        if name not in category_ids:
            report.add("unknown_class", where, f"class {name!r} is not in data.classes {list(category_ids)[:20]}")
            continue
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{key}")) for key in CORNERS)
            difficult = int(float(obj.findtext("difficult") or 0) > 0)
        except (TypeError, ValueError):
            values = {key: obj.findtext(f"bndbox/{key}") for key in CORNERS}
            report.add("bad_xml", where, f"<bndbox> needs xmin/ymin/xmax/ymax numbers, got {values}")
            continue
        if xmax < xmin or ymax < ymin:
            report.add("inverted_box", where, f"{name}: xmin {xmin:g} xmax {xmax:g}, ymin {ymin:g} ymax {ymax:g} (dropped)")
            continue
        x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax  # 1-based inclusive indices -> continuous pixel corners
        if min(x1, width) <= max(x0, 0) or min(y1, height) <= max(y0, 0):
            report.add("zero_area", where, f"{name}: box {xmin:g},{ymin:g},{xmax:g},{ymax:g} lies outside the "
                                           f"{width}x{height} image (dropped)")
        elif x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
            kind = "xy_swapped" if fits_swapped(x0, y0, x1, y1, width, height, tolerance=1) else "out_of_bounds"
            report.add(kind, where, f"{name}: box {xmin:g},{ymin:g},{xmax:g},{ymax:g} leaves the {width}x{height} image")
        found.append((category_ids[name], [x0, y0, x1 - x0, y1 - y0], difficult))
    return found


__all__ = ["read_voc_split", "split_ids", "voc_class_names"]
