"""The synthetic shapes generator: deterministic, valid COCO, atomic, and it never touches a folder it did not make."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from detr_kit.data import synthetic
from detr_kit.data.synthetic import generate_shapes_dataset
from detr_kit.errors import DatasetError


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


# ------------------------------------------------------------------------------------------ a user's folder


def _user_dataset(folder):
    """A small COCO-format dataset of the user's: two images and a json."""
    (folder / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (20, 10), (200, 30, 30)).save(folder / "images" / name)
    (folder / "train.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return _files(folder)


def test_never_writes_into_a_folder_it_did_not_make(tmp_path):
    user = tmp_path / "my_data"
    before = _user_dataset(user)
    with pytest.raises(DatasetError, match="my_data holds files the shapes generator did not write"):
        generate_shapes_dataset(user, num_train=2, num_val=1, image_size=32)
    assert _files(user) == before and sorted(p.name for p in tmp_path.iterdir()) == ["my_data"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DatasetError):
        generate_shapes_dataset(tmp_path / "a_file", num_train=2, num_val=1, image_size=32)
    assert (tmp_path / "a_file").read_text() == "x"
    assert synthetic.folder_state(user) == "foreign" and synthetic.folder_state(tmp_path / "none") == "missing"


def test_writes_into_an_empty_folder_and_marks_it(tmp_path):
    (tmp_path / "empty").mkdir()
    root = generate_shapes_dataset(tmp_path / "empty", num_train=2, num_val=1, image_size=32, seed=3)
    marker = json.loads((root / synthetic.MARKER).read_text())
    assert marker["params"] == synthetic.synthetic_params(2, 1, 32, 0, 4, 3)
    assert set(marker["files"]) == set(_files(root)) - {synthetic.MARKER}  # every file it wrote, nothing else
    assert synthetic.dataset_params(root) == marker["params"] and synthetic.folder_state(root) == "ours"


def test_regenerating_replaces_only_its_own_files(tmp_path):
    root = generate_shapes_dataset(tmp_path / "s", num_train=4, num_val=2, image_size=32, seed=0)
    (root / "notes.txt").write_text("mine")  # a user adds a file to the generated folder
    (root / "train" / "extra.png").write_bytes(b"also mine")
    generate_shapes_dataset(root, num_train=2, num_val=1, image_size=32, seed=5)
    after = _files(root)
    assert after.pop("notes.txt") == b"mine" and after.pop("train/extra.png") == b"also mine"
    fresh = _files(generate_shapes_dataset(tmp_path / "fresh", num_train=2, num_val=1, image_size=32, seed=5))
    assert after == fresh  # exactly the new dataset: the old train/000003.png and 000004.png are gone


def test_a_stale_folder_is_regenerated_after_an_interrupted_replacement(tmp_path, monkeypatch):
    root = generate_shapes_dataset(tmp_path / "s", num_train=3, num_val=1, image_size=32, seed=0)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(synthetic.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_dataset(root, num_train=2, num_val=1, image_size=32, seed=1)
    monkeypatch.undo()
    assert synthetic.dataset_params(root) is None  # half replaced: marked stale, still the generator's
    generate_shapes_dataset(root, num_train=2, num_val=1, image_size=32, seed=1)
    assert _files(root) == _files(generate_shapes_dataset(tmp_path / "ref", num_train=2, num_val=1, image_size=32, seed=1))


def test_a_dataset_from_before_the_marker_is_recognised_only_when_complete(tmp_path):
    root = generate_shapes_dataset(tmp_path / "old", num_train=2, num_val=1, image_size=32, seed=0)
    (root / synthetic.MARKER).unlink()  # as the generator wrote it before the marker existed
    assert synthetic.dataset_params(root) == synthetic.synthetic_params(2, 1, 32, 0, 4, 0)
    (root / "notes.txt").write_text("mine")  # anything else in it: not recognisably the generator's
    assert synthetic.folder_state(root) == "foreign"
    with pytest.raises(DatasetError):
        generate_shapes_dataset(root, num_train=3, num_val=1, image_size=32)
    assert (root / "notes.txt").read_text() == "mine"


def test_build_datasets_refuses_user_data_with_dataset_synthetic(tmp_path):
    from detr_kit.build import build_datasets
    from detr_kit.config import Config

    user = tmp_path / "my_data"
    before = _user_dataset(user)
    cfg = Config().replace(["data.dataset=synthetic", f"data.root={user}"])
    with pytest.raises(DatasetError) as err:
        build_datasets(cfg)
    assert str(err.value) == (f"data.root={user} holds files detr_kit did not write, and data.dataset=synthetic "
                              "would write shapes there — set data.dataset=coco to train on them, or point data.root "
                              "at an empty folder")
    assert _files(user) == before
