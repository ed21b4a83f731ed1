"""The synthetic shapes generator: deterministic, valid COCO, atomic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detr_kit.data import synthetic
from detr_kit.data.synthetic import generate_shapes_dataset


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_valid_coco(tmp_path):
    a = _files(generate_shapes_dataset(tmp_path / "a", num_train=12, num_val=4, image_size=64, seed=7))
    b = _files(generate_shapes_dataset(tmp_path / "b", num_train=12, num_val=4, image_size=64, seed=7))
    c = _files(generate_shapes_dataset(tmp_path / "c", num_train=12, num_val=4, image_size=64, seed=8))
    assert a == b  # byte-identical
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert len([k for k in a if k.startswith("train/")]) == 12 and len([k for k in a if k.startswith("val/")]) == 4

    from pycocotools.coco import COCO

    coco = COCO(str(tmp_path / "a" / "annotations" / "instances_train.json"))
    assert sorted(coco.getCatIds()) == [1, 2, 3] and [c["name"] for c in coco.loadCats([1, 2, 3])] == ["circle", "square", "triangle"]
    anns = coco.loadAnns(coco.getAnnIds())
    assert len({a["id"] for a in anns}) == len(anns) > 0
    for ann in anns:
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64 and 0.1 * 64 - 1 <= w <= 0.5 * 64 + 1
        # the shape is really drawn there: its centre pixel is saturated, unlike the muted background
        image = np.asarray(Image.open(tmp_path / "a" / "train" / coco.loadImgs(ann["image_id"])[0]["file_name"]), dtype=int)
        centre = image[int(y + h * 0.6), int(x + w / 2)]
        assert centre.max() - centre.min() > 60


def test_some_images_empty_and_some_crowded(tmp_path):
    root = generate_shapes_dataset(tmp_path / "s", num_train=60, num_val=1, image_size=32, seed=0)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=61)[1:]
    assert (per_image == 0).sum() >= 1 and per_image.max() >= 3


def test_interrupted_run_leaves_no_half_dataset(tmp_path, monkeypatch):
    root = generate_shapes_dataset(tmp_path / "s", num_train=2, num_val=1, image_size=32, seed=0)
    before = _files(root)
    real = synthetic._write_split

    def fail_on_val(tmp, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real(tmp, split, *args)

    monkeypatch.setattr(synthetic, "_write_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_dataset(tmp_path / "s", num_train=5, num_val=1, image_size=32, seed=1)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_dataset(tmp_path / "fresh", num_train=5, num_val=1, image_size=32, seed=1)
    assert _files(root) == before  # the old dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp folders, no half dataset


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="min_objects"):
        generate_shapes_dataset(tmp_path / "x", num_train=1, num_val=0, min_objects=3, max_objects=2)
