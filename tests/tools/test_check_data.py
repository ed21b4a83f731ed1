"""tools/check_data.py finds each planted problem, passes clean coco128, and explains broken input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
COCO128 = ROOT / "data" / "coco128"


@pytest.fixture(scope="module")
def check_data():
    spec = importlib.util.spec_from_file_location("check_data_tool", ROOT / "tools" / "check_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _broken_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A small dataset with one problem of each kind."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(1, 7):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    (images / "5.png").write_bytes((images / "5.png").read_bytes()[:40])  # truncated -> unreadable
    (images / "6.png").unlink()  # missing
    recs = [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in range(1, 7)]
    recs[2]["width"] = 99  # image 3: size mismatch
    recs.append({"id": 1, "file_name": "1.png", "width": 30, "height": 20})  # duplicated image id
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5]},  # duplicated annotation id
        {"id": 3, "image_id": 1, "category_id": 42, "bbox": [1, 1, 5, 5]},  # unknown category
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [25, 1, 10, 5]},  # out of bounds
        {"id": 5, "image_id": 2, "category_id": 1, "bbox": [3, 3, 0, 4]},  # zero area
        {"id": 6, "image_id": 2, "category_id": 1, "bbox": [3, 3, -2, 4]},  # negative
        {"id": 7, "image_id": 2, "category_id": 1, "bbox": [float("nan"), 3, 2, 4]},  # nan
        {"id": 8, "image_id": 77, "category_id": 1, "bbox": [1, 1, 2, 2]},  # unknown image
        {"id": 9, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2]},  # malformed bbox
        {"id": 10, "image_id": 5, "category_id": 1, "bbox": [1, 1, 2, 2]},
    ]  # image 4 has no annotations: empty
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": recs, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return images, path


def test_finds_every_planted_problem(tmp_path, check_data, capsys):
    images, ann = _broken_copy(tmp_path)
    assert check_data.main(["--images", str(images), "--annotations", str(ann)]) == 1
    out = capsys.readouterr().out
    report = check_data.check_dataset(images, ann)
    expected = {"duplicate_image_id", "duplicate_annotation_id", "unknown_category", "out_of_bounds", "zero_area",
                "negative_size", "nan_box", "unknown_image", "bad_bbox", "missing_image", "unreadable_image",
                "size_mismatch", "empty_image"}
    assert report.kinds() == expected
    assert "annotation id=3" in out and "category id 42" in out and "6.png" in out and "5.png" in out
    assert "json says 99x20" in out and "thing" in out  # size mismatch detail and the class histogram


@pytest.mark.parametrize("content", ['{"images": [', "[1, 2]", '{"images": []}'])
def test_broken_json_is_explained_not_raised(tmp_path, check_data, capsys, content):
    (tmp_path / "images").mkdir()
    (tmp_path / "a.json").write_text(content)
    assert check_data.main(["--images", str(tmp_path / "images"), "--annotations", str(tmp_path / "a.json")]) == 1
    assert "[ERROR] json" in capsys.readouterr().out


def test_clean_coco128_passes_and_shows_augmentations(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_data.py"), "--images", str(COCO128 / "images"),
         "--annotations", str(COCO128 / "annotations" / "instances_val.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 errors" in result.stdout and "person" in result.stdout


def test_show_aug_writes_pngs(tmp_path, check_data):
    config = tmp_path / "small.yaml"
    config.write_text("data:\n  train_scales: [64, 96]\n  crop_resize_scales: [80]\n  crop_size: [48, 80]\n  max_size: 128\n  eval_size: 96\n")
    code = check_data.main(["--images", str(COCO128 / "images"), "--annotations", str(COCO128 / "annotations" / "instances_val.json"),
                            "--show-aug", "3", "--out", str(tmp_path / "aug"), "--config", str(config), "--skip-pixels"])
    written = sorted((tmp_path / "aug").glob("*.png"))
    assert code == 0 and len(written) == 3
    assert max(Image.open(written[0]).size) <= 128


def test_root_check_prints_the_constant_box_baseline_of_pycocotools(check_data, capsys):
    from references import pycocotools_baseline

    annotations = COCO128 / "annotations"
    code = check_data.main(["--root", str(COCO128), "--skip-pixels", "data.train_images=images",
                            "data.val_images=images", "data.train_annotations=annotations/instances_train.json",
                            "data.val_annotations=annotations/instances_val.json"])
    out = capsys.readouterr().out
    expected = pycocotools_baseline(json.loads((annotations / "instances_train.json").read_text()),
                                    json.loads((annotations / "instances_val.json").read_text()))
    assert code == 0
    assert f"constant-box baseline (one box per class at its mean training position): AP {expected[0]:.4f}, " \
           f"AP50 {expected[1]:.4f} on the validation split" in out
