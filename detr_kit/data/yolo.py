"""YOLO-format datasets as Ultralytics lays them out, read into an in-memory COCO-format dict.

    my_data/data.yaml            path: .   train: images/train   val: images/val   names: [cat, dog]
    my_data/images/train/a.jpg   my_data/labels/train/a.txt     one object per line: class cx cy w h

The rules (Ultralytics' documented layout):

- ``path`` is the dataset root; a relative one is resolved against the yaml's folder, and when it names no folder
  there (a path from another machine) the yaml's folder is the root. ``train`` / ``val`` / ``test`` are relative to
  the root (a leading ``../`` that leaves it is tried without), each a folder (its images, recursively), a ``.txt``
  file listing images (one per line; ``./x`` is relative to the txt's folder, other relative paths to the root) or
  a list of those. ``names`` is a list or an ``{index: name}`` mapping; without it, ``nc`` classes named
  ``class_<i>``.
- An image's label file is its path with the last ``images`` folder replaced by ``labels`` and the suffix by
  ``.txt``. A missing or empty label file is a negative image (no objects).
- A label line is ``class cx cy w h``: a class index of ``names`` and the box centre and size as fractions of the
  image's width and height (of the upright image, after its EXIF rotation). A longer line is a polygon
  ``class x1 y1 x2 y2 ...`` (segmentation labels); its bounding box is used.

Category ids are the class indices (YOLO's own numbers) and the names are kept, so labels follow ``names``' order.
Image ids run 1..N in the split's order. Problems go into a doctor ``Report``, each naming the file and line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from detr_kit.data.coco_records import IMAGE_SUFFIXES, CocoSplit, coco_dict, file_name_under, upright_size
from detr_kit.data.doctor import Report, check_not_empty

TOLERANCE = 1e-3  # of the image side: exporters round, so a box may overshoot its image by this much


def label_path(image: Path) -> Path:
    """The label file of ``image``: the last ``images`` folder of its path replaced by ``labels``, suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def read_data_yaml(yaml_file: Path, report: Report) -> tuple[Path, dict, dict[int, str]] | None:
    """(dataset root, the yaml's mapping, class names by index), or None after reporting why not."""
    import yaml

    where = str(yaml_file)
    try:
        spec = yaml.safe_load(yaml_file.read_text())
    except FileNotFoundError:
        report.add("layout", where, "not found")
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        report.add("layout", where, f"not readable as YAML: {' '.join(str(err).split())[:200]}")
        return None
    if not isinstance(spec, dict):
        report.add("layout", where, f"holds a YAML {type(spec).__name__}, not a mapping with train/val/names")
        return None
    names = _class_names(spec, where, report)
    if names is None:
        return None
    return _dataset_root(yaml_file.parent, spec.get("path")), spec, names


def _class_names(spec: dict, where: str, report: Report) -> dict[int, str] | None:
    names, count = spec.get("names"), spec.get("nc")
    if names is None and isinstance(count, int) and count > 0:
        return {i: f"class_{i}" for i in range(count)}
    if isinstance(names, list):
        table = dict(enumerate(names))
    elif isinstance(names, dict):
        try:
            table = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            report.add("layout", where, f"names: keys must be class indices 0, 1, ..., got {list(names)[:5]}")
            return None
    else:
        report.add("layout", where, "names: missing; give the class names as a list or as {index: name}")
        return None
    if not table or any(k < 0 for k in table) or any(not str(v).strip() for v in table.values()):
        report.add("layout", where, f"names: {names!r} must be non-empty names with indices >= 0")
        return None
    if count is not None and count != len(table):
        report.add("layout", where, f"nc: {count!r} but names lists {len(table)} classes")
        return None
    return {k: str(v) for k, v in sorted(table.items())}


def _dataset_root(yaml_dir: Path, path: Any) -> Path:
    if path:
        root = Path(str(path)).expanduser()
        root = root if root.is_absolute() else yaml_dir / root
        if root.is_dir():
            return root
    return yaml_dir


def list_split_images(root: Path, entry: Any, where: str, report: Report) -> tuple[list[Path], list[Path]]:
    """(images, folders) of a split entry: a folder, a txt list, or a list of those; missing entries are reported."""
    images: list[Path] = []
    folders: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        path = _resolve(root, str(item))
        if path.is_dir():
            folders.append(path)
            images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file() and path.suffix.lower() == ".txt":
            images += _listed_images(root, path)
        else:
            report.add("layout", where, f"{item}: {path} is neither a folder of images nor a .txt list of them")
    return list(dict.fromkeys(images)), folders


def _resolve(root: Path, item: str) -> Path:
    path = root / Path(item).expanduser()
    if not path.exists() and item.startswith("../"):
        path = root / item[3:]
    return path


def _listed_images(root: Path, list_file: Path) -> list[Path]:
    lines = (line.strip() for line in list_file.read_text(errors="replace").splitlines())
    return [list_file.parent / line[2:] if line.startswith("./") else root / line for line in lines if line]


def read_yolo_split(yaml_file: Path, split: str, report: Report) -> CocoSplit | None:
    """Read one split (a data.yaml key: train, val, test) of a YOLO dataset.

    Args:
        yaml_file: the dataset's data.yaml.
        split: the key of the split in it.
        report: receives every problem, naming the file and line.
    Returns:
        The split as a COCO-format dict (``file_name`` relative to the dataset root), or None when the yaml or the
        split's entry is unusable (reported).
    """
    spec = read_data_yaml(yaml_file, report)
    if spec is None:
        return None
    root, mapping, names = spec
    entry = mapping.get(split)
    if not entry:
        keys = [k for k in ("train", "val", "test") if mapping.get(k)]
        report.add("layout", str(yaml_file), f"has no {split!r} split (it has {keys}); choose one with "
                                             f"data.train_split / data.val_split")
        return None
    listed_problems = len(report.problems)
    images, folders = list_split_images(root, entry, f"{yaml_file} {split}", report)
    entry_missing = len(report.problems) > listed_problems  # then an empty split is no news
    records, annotations = [], []
    for path in images:
        if not path.is_file():
            report.add("missing_image", f"{yaml_file} {split}", f"{path} is listed but not found")
            continue
        try:
            width, height = upright_size(path)
        except Exception as err:  # PIL raises many types for broken files; all mean "unreadable"
            report.add("unreadable_image", str(path), f"{type(err).__name__}: {err}")
            continue
        image_id = len(records) + 1
        records.append({"id": image_id, "file_name": file_name_under(path, root), "width": width, "height": height})
        boxes = read_label_file(label_path(path), names, width, height, report)
        for category_id, bbox in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
            report.histogram[names[category_id]] += 1
    report.num_images, report.num_annotations = len(records), len(annotations)
    if not entry_missing:
        check_not_empty(report, f"{yaml_file} {split}", f"{yaml_file} {split}")
    _check_orphan_labels(folders, images, report)
    description = f"YOLO {yaml_file} {split}: {entry}"
    return CocoSplit(root, coco_dict(records, annotations, names, description), description)


def read_label_file(path: Path, names: dict[int, str], width: int, height: int, report: Report) -> list[tuple[int, list[float]]]:
    """(category id, COCO xywh pixel box) of every usable line of a label file; problems are reported by line."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        report.add("empty_image", str(path), "no label file: a negative image (no objects)")
        return []
    except (OSError, UnicodeDecodeError) as err:
        report.add("bad_label_line", str(path), f"not readable as text: {err}")
        return []
    boxes = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            box = _parse_line(line, f"{path}:{number}", names, width, height, report)
            if box is not None:
                boxes.append(box)
    if not boxes and not any(line.strip() for line in lines):
        report.add("empty_image", str(path), "empty label file: a negative image (no objects)")
    return boxes


def _parse_line(line: str, where: str, names: dict[int, str], width: int, height: int,
                report: Report) -> tuple[int, list[float]] | None:
    fields = line.split()
    try:
        values = [float(v) for v in fields]
    except ValueError:
        report.add("bad_label_line", where, f"{line.strip()[:80]!r} holds a non-number")
        return None
    if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
        report.add("bad_label_line", where, f"{line.strip()[:80]!r} has {len(values)} fields, not 'class cx cy w h'")
        return None
    if not all(math.isfinite(v) for v in values) or not values[0].is_integer():
        report.add("bad_label_line", where, f"{line.strip()[:80]!r}: the class must be an integer, the rest finite")
        return None
    category = int(values[0])
    if category not in names:
        report.add("unknown_class", where, f"class {category} is not in names (indices {_index_range(names)})")
        return None
    coords = values[1:]
    if max(coords) > 1 + TOLERANCE:
        report.add("not_normalized", where, f"{line.strip()[:80]!r} has values above 1 (pixels, not fractions of "
                                            f"the {width}x{height} image?)")
        return None
    if len(coords) > 4:  # a polygon: its bounding box
        xs, ys = coords[0::2], coords[1::2]
        coords = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
    cx, cy, w, h = coords
    if w < 0 or h < 0:
        report.add("negative_size", where, f"{line.strip()[:80]!r} has a negative width or height (dropped)")
        return None
    if w == 0 or h == 0:
        report.add("zero_area", where, f"{line.strip()[:80]!r} has zero width or height (dropped)")
        return None
    if min(cx - w / 2, cy - h / 2) < -TOLERANCE or max(cx + w / 2, cy + h / 2) > 1 + TOLERANCE:
        if 0 <= cx < w <= 1 and 0 <= cy < h <= 1:
            report.add("corners_as_size", where, f"{line.strip()[:80]!r} leaves the image as cx cy w h but fits it "
                                                 f"as corners x1 y1 x2 y2")
        else:
            report.add("out_of_bounds", where, f"{line.strip()[:80]!r} leaves the image (x {cx - w / 2:.4g}..{cx + w / 2:.4g}, "
                                               f"y {cy - h / 2:.4g}..{cy + h / 2:.4g} of 0..1)")
    return category, [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]


def _index_range(names: dict[int, str]) -> str:
    keys = sorted(names)
    return f"{keys[0]}..{keys[-1]}" if keys == list(range(keys[0], keys[-1] + 1)) else str(keys)


def _check_orphan_labels(folders: Iterable[Path], images: list[Path], report: Report) -> None:
    """Label files under a split folder's labels/ mirror that no image of the split uses."""
    used = {os.path.normcase(label_path(p)) for p in images}
    for folder in folders:
        labels = label_path(folder / "x.jpg").parent
        if labels == folder or not labels.is_dir():  # labels beside the images: other .txt files live there too
            continue
        for path in sorted(labels.rglob("*.txt")):
            if os.path.normcase(path) not in used and path.name != "classes.txt":
                report.add("orphan_label", str(path), "no image of the split has this name")


__all__ = ["label_path", "list_split_images", "read_data_yaml", "read_label_file", "read_yolo_split"]
