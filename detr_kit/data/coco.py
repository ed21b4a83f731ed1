"""COCO-format detection dataset: validated json, robust image loading, DETR targets.

``CocoDetection(...)[i] -> (image [3, H, W] float normalised, Target)`` with ``Target.boxes`` cxcywh
normalised to the transformed, unpadded image and contiguous labels from a ``LabelMap``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import struct
import tempfile
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from detr_kit.data.doctor import load_checked_coco
from detr_kit.data.transforms import eval_transforms
from detr_kit.errors import DatasetError
from detr_kit.structures import LabelMap, Target

logger = logging.getLogger(__name__)

# What a corrupt, truncated or unsupported image file raises inside PIL.
BAD_IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes FileNotFoundError, UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

MAX_LISTED = 20  # category ids listed in one error message


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class BadImageError(ValueError):
    """An image file cannot be decoded; the message names the file and the reason."""


# --------------------------------------------------------------------------------------------------- images


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """High bit-depth grayscale -> uint8: 16-bit ranges scale by 255/65535, float ranges by 255 if in 0..1."""
    if array.dtype.kind == "f":
        finite = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        return np.clip(finite * scale, 0, 255).round().astype(np.uint8)
    top = 65535 if array.max(initial=0) > 255 or array.dtype.itemsize >= 2 else 255
    return np.clip(np.rint(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def load_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 RGB [H, W, 3], upright according to its EXIF orientation.

    Grayscale, palette, RGBA/LA (alpha dropped), CMYK, 16-bit and float images all become 8-bit RGB.

    Raises:
        OSError, ValueError, ...: whatever PIL raises for a missing, corrupt or truncated file
            (see ``BAD_IMAGE_ERRORS``).
    """
    with Image.open(path) as opened:
        opened.load()  # decode now, so truncation surfaces here and not later
        image = ImageOps.exif_transpose(opened)
    return pil_to_rgb_array(image)


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 RGB [H, W, 3] from a PIL image of any mode: 16-bit/float grayscale scaled, alpha dropped, CMYK converted."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _to_uint8(np.asarray(image))  # [H, W]
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()  # [H, W, 3]


# --------------------------------------------------------------------------------------------------- json


def load_coco_json(annotation_file: str | os.PathLike) -> dict:
    """Read and validate a COCO detection json: every record-level problem at once (``data/doctor.py``).

    Raises:
        DatasetError: the file is missing or not JSON (e.g. truncated), not a COCO object, or holds malformed
            records, duplicated ids, or annotations naming an unknown image or category; the message lists
            every such problem and the doctor command that explains them.
    """
    return load_checked_coco(None, annotation_file)


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO index over an already loaded json (without its progress prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------------- boxes


@dataclass
class _Record:
    """One image's cleaned annotations in json pixel space."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes_xyxy: np.ndarray  # [T, 4] float64 pixels, clipped to the image, positive area
    labels: np.ndarray  # [T] int64 contiguous labels
    iscrowd: np.ndarray  # [T] int64 0/1


def clean_boxes(bboxes_xywh: np.ndarray, height: int, width: int, counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Clip COCO xywh boxes to the image and drop the unusable ones, counting what happened.

    Args:
        bboxes_xywh: [T, 4] float64 (may hold NaN/inf or negative sizes).
        height, width: the image size the boxes refer to.
        counts: updated in place: ``nan`` (non-finite), ``negative`` (width or height < 0),
            ``zero_area`` (nothing left after clipping), ``clipped`` (kept, cut at the border).
    Returns:
        boxes_xyxy [T', 4] and keep [T] bool (which input rows survived).
    """
    b = np.asarray(bboxes_xywh, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(b).all(axis=1)
    negative = finite & ((b[:, 2] < 0) | (b[:, 3] < 0))
    xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)  # [T, 4]
    clipped = xyxy.copy()
    clipped[:, 0::2] = np.clip(np.nan_to_num(clipped[:, 0::2]), 0, width)
    clipped[:, 1::2] = np.clip(np.nan_to_num(clipped[:, 1::2]), 0, height)
    positive = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    valid = finite & ~negative
    keep = valid & positive
    counts["nan"] = counts.get("nan", 0) + int((~finite).sum())
    counts["negative"] = counts.get("negative", 0) + int(negative.sum())
    counts["zero_area"] = counts.get("zero_area", 0) + int((valid & ~positive).sum())
    changed = keep & (np.abs(clipped - xyxy) > 1e-9).any(axis=1)
    counts["clipped"] = counts.get("clipped", 0) + int(changed.sum())
    return clipped[keep], keep


# --------------------------------------------------------------------------------------------------- labels


def _unnamed(category_id: int, name: str) -> bool:
    """A placeholder name (a converted checkpoint's ``class_<id>``, COCO's unused "N/A" slots): match by id alone."""
    return name in ("N/A", f"class_{category_id}")


def match_label_map(label_map: LabelMap, categories: Sequence[Mapping], used: set, source: str) -> LabelMap:
    """``label_map`` (a checkpoint's, or the train split's) expressed in this dataset's category ids.

    A category takes the label whose id and name it shares (or whose name is a placeholder, see ``_unnamed``),
    else the label of its name: the same classes numbered differently (COCO's ids 1..90, YOLO's class indices
    0..79, VOC's 1..K) keep the map's labels, and one class numbered as another (a one-class dataset's id 1 "cat"
    against COCO's id 1 "person") is an error, not a silent match. Labels whose class this dataset lacks keep
    their id unless this dataset uses it for another class (then they get an unused one).

    Raises:
        DatasetError: a category that annotations use matches no label, by id and name or by name.
    """
    names = {int(c["id"]): str(c["name"]) for c in categories}
    label_of_name: dict[str, int] = {}
    for label, name in enumerate(label_map.names):
        label_of_name.setdefault(name, label)
    by_id = label_map.category_to_label
    label_of: dict[int, int] = {}  # dataset category id -> label
    unmatched = []
    for category_id, name in names.items():
        label = by_id.get(category_id)
        if label is None or not (label_map.names[label] == name or _unnamed(category_id, label_map.names[label])):
            label = label_of_name.get(name)
        if label is not None and label not in label_of.values():
            label_of[category_id] = label
        elif category_id in used:
            unmatched.append((category_id, name))
    if unmatched:
        shown = ", ".join(f"{i} {n!r}" for i, n in unmatched[:MAX_LISTED])
        raise DatasetError(
            f"{source}: categories {shown} are not in the given label map (matched by id and name, or by name; "
            f"its classes: {', '.join(label_map.names[:MAX_LISTED])}{', ...' if len(label_map) > MAX_LISTED else ''})",
            "evaluate on data with the checkpoint's classes, or fine-tune on these with train.init_from",
        )
    if all(label_map.category_ids[label] == category_id for category_id, label in label_of.items()):
        return label_map
    ids = {label: category_id for category_id, label in label_of.items()}
    taken = set(names) | set(ids.values())
    fresh = (i for i in range(max(taken | set(label_map.category_ids), default=0) + 1, 1 << 62) if i not in taken)
    kept = {label: old for label, old in enumerate(label_map.category_ids) if label not in ids and old not in taken}
    category_ids = tuple(ids.get(label, kept.get(label)) for label in range(len(label_map)))
    category_ids = tuple(next(fresh) if i is None else i for i in category_ids)
    logger.info("%s: categories matched to the given label map by name", source)
    return LabelMap(category_ids, label_map.names)


# --------------------------------------------------------------------------------------------------- dataset


class CocoDetection(Dataset):
    """A COCO detection dataset producing DETR targets.

    Args:
        image_dir: folder the json's ``file_name`` entries are relative to.
        annotation_file: COCO instances json, or an already checked COCO-format dict (what the YOLO and VOC
            readers of ``data/formats.py`` produce; its ``info.description`` names it in messages).
        transforms: an albumentations pipeline from ``detr_kit.data.transforms`` (called with
            ``image``, ``bboxes`` xyxy pixels, ``labels``, ``iscrowd``); None = normalise only.
        train: True drops crowd boxes from the targets; False keeps them with ``Target.iscrowd``.
        label_map: contiguous labels <-> category ids; None builds it from the json's categories
            (ascending id). Pass a checkpoint's map (or the train split's) to keep its label order: the json's
            categories are matched to it by id and name, else by name (see :func:`match_label_map`).
        on_bad_image: "skip" logs a corrupt image once and returns the next readable one (recorded in
            ``bad_images``); "error" raises ``BadImageError`` naming the file.

    Raises:
        DatasetError: the annotation file or the image folder does not exist, the json is invalid, images
            listed in it are missing on disk (every problem in one message, see ``data/doctor.py``), or a
            category is not in the given label map.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike | Mapping[str, Any],
        transforms: Callable[..., dict[str, Any]] | None = None,
        train: bool = True,
        label_map: LabelMap | None = None,
        on_bad_image: Literal["skip", "error"] = "skip",
    ):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.image_dir = Path(image_dir)
        in_memory = isinstance(annotation_file, Mapping)
        self.annotation_file = None if in_memory else Path(annotation_file)
        self.transforms = transforms if transforms is not None else eval_transforms(None)
        self.train = train
        self.on_bad_image = on_bad_image
        self._bad_images: dict[str, str] = {}
        # DataLoader workers are separate processes: they append what they skip to this file, and
        # ``bad_images`` (read in the main process) merges it in.
        self._bad_log = Path(tempfile.gettempdir()) / f"detr_kit_bad_images_{os.getpid()}_{uuid.uuid4().hex}.jsonl"
        weakref.finalize(self, _remove_quietly, self._bad_log)
        self.size_mismatches: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}  # path -> (json hw, file hw)

        if in_memory:
            data = dict(annotation_file)
            self.source = str(data.get("info", {}).get("description") or "COCO-format dict")
        else:
            data = load_checked_coco(self.image_dir, self.annotation_file)
            self.source = str(self.annotation_file)
        if label_map is None:
            self.label_map = LabelMap.from_coco_categories(data["categories"])
        else:
            used = {ann["category_id"] for ann in data["annotations"]}
            self.label_map = match_label_map(label_map, data["categories"], used, self.source)
        category_to_label = self.label_map.category_to_label
        self.coco = coco_from_dict(data)
        self.box_counts: dict[str, int] = {}
        self._records = [self._make_record(img, category_to_label) for img in data["images"]]
        dropped = {k: v for k, v in self.box_counts.items() if v and k != "clipped"}
        if dropped or self.box_counts.get("clipped"):
            logger.warning(
                "%s: %d boxes clipped to the image, dropped %s",
                self.source,
                self.box_counts.get("clipped", 0),
                ", ".join(f"{v} {k}" for k, v in dropped.items()) or "none",
            )

    @property
    def num_classes(self) -> int:
        """K, the number of contiguous labels."""
        return len(self.label_map)

    def _make_record(self, img: dict, category_to_label: dict[int, int]) -> _Record:
        anns = self.coco.imgToAnns.get(img["id"], [])
        if self.train:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        xywh = np.array([[math.nan if v is None else v for v in a["bbox"]] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes, keep = clean_boxes(xywh, img["height"], img["width"], self.box_counts)
        labels = np.array([category_to_label[a["category_id"]] for a in anns], dtype=np.int64)[keep]
        crowd = np.array([int(bool(a.get("iscrowd", 0))) for a in anns], dtype=np.int64)[keep]
        return _Record(int(img["id"]), str(img["file_name"]), int(img["height"]), int(img["width"]), boxes, labels, crowd)

    def __len__(self) -> int:
        return len(self._records)

    def image_sizes(self) -> list[tuple[int, int]]:
        """(h, w) of every image as the json states it; no file is opened."""
        return [(r.height, r.width) for r in self._records]

    def aspect_ratios(self) -> list[float]:
        """width / height of every image, from the json."""
        return [r.width / r.height for r in self._records]

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._records[index].file_name

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index %= len(self)
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            path = self.image_path(i)
            try:
                image = load_rgb_image(path)  # [H, W, 3] uint8
            except BAD_IMAGE_ERRORS as err:
                reason = f"{type(err).__name__}: {err}"
                if self.on_bad_image == "error":
                    raise BadImageError(f"{path}: cannot read image ({reason}); set data.on_bad_image=skip to skip it") from err
                if str(path) not in self._bad_images:
                    self._record_bad_image(str(path), reason)
                    logger.warning("skipping unreadable image %s (%s); using the next image instead", path, reason)
                continue
            return self._sample(i, image)
        raise BadImageError(f"{self.image_dir}: none of the {len(self)} images can be read, e.g. {next(iter(self._bad_images.items()))}")

    @property
    def bad_images(self) -> dict[str, str]:
        """path -> reason of every image skipped so far, in this process and its DataLoader workers."""
        merged = dict(self._bad_images)
        try:
            lines = self._bad_log.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            with contextlib.suppress(ValueError):
                path, reason = json.loads(line)
                merged.setdefault(path, reason)
        return merged

    def _record_bad_image(self, path: str, reason: str) -> None:
        self._bad_images[path] = reason
        with contextlib.suppress(OSError), open(self._bad_log, "a") as log:  # one short append: atomic in practice
            log.write(json.dumps([path, reason]) + "\n")

    def _sample(self, index: int, image: np.ndarray) -> tuple[Tensor, Target]:
        rec = self._records[index]
        height, width = image.shape[:2]
        boxes = rec.boxes_xyxy
        if (height, width) != (rec.height, rec.width):
            # The json describes another size (e.g. annotated before an EXIF rotation was applied
            # elsewhere): keep the boxes' relative positions and warn once per file.
            path = str(self.image_path(index))
            if path not in self.size_mismatches:
                self.size_mismatches[path] = ((rec.height, rec.width), (height, width))
                logger.warning("%s: the json says %dx%d (h x w) but the file is %dx%d; boxes rescaled", path, rec.height, rec.width, height, width)
            boxes = boxes * np.array([width / rec.width, height / rec.height] * 2)
        out = self.transforms(image=image, bboxes=boxes, labels=rec.labels, iscrowd=rec.iscrowd)
        pixels = out["image"]  # [3, H', W'] float
        new_h, new_w = int(pixels.shape[-2]), int(pixels.shape[-1])
        xyxy = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4))  # [T', 4] pixels
        scale = torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float64)
        xyxy = xyxy / scale
        boxes_cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)  # [T', 4]
        target = Target(
            boxes=boxes_cxcywh.float(),
            labels=torch.as_tensor(np.asarray(out["labels"], dtype=np.int64)),
            image_id=rec.image_id,
            orig_size=(height, width),
            size=(new_h, new_w),
            iscrowd=torch.as_tensor(np.asarray(out["iscrowd"], dtype=np.int64)).bool(),
        )
        return pixels.float().contiguous(), target


__all__ = [
    "BAD_IMAGE_ERRORS",
    "BadImageError",
    "CocoDetection",
    "clean_boxes",
    "coco_from_dict",
    "load_coco_json",
    "load_rgb_image",
    "match_label_map",
    "pil_to_rgb_array",
]
