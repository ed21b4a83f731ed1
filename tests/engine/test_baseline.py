"""The constant-box baseline against pycocotools called directly, on hand-made splits and on coco128."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from references import pycocotools_baseline

from detr_kit.data.coco import coco_from_dict
from detr_kit.engine.baseline import (
    BASELINE_MARGIN,
    constant_box_baseline,
    mean_class_boxes,
    near_baseline_warning,
    small_dataset_warning,
)
from detr_kit.structures import LabelMap

COCO128 = Path(__file__).resolve().parents[2] / "data" / "coco128" / "annotations"


def ours(train: dict, val: dict) -> dict:
    train_coco, val_coco = coco_from_dict(json.loads(json.dumps(train))), coco_from_dict(json.loads(json.dumps(val)))
    return constant_box_baseline(train_coco, val_coco, LabelMap.from_coco_categories(train["categories"]))


def test_coco128_baseline_equals_pycocotools_on_a_hand_built_detections_json():
    train = json.loads((COCO128 / "instances_train.json").read_text())
    val = json.loads((COCO128 / "instances_val.json").read_text())
    expected = pycocotools_baseline(train, val)
    metrics = ours(train, val)
    assert metrics["AP"] == pytest.approx(expected[0], abs=1e-6)
    assert metrics["AP50"] == pytest.approx(expected[1], abs=1e-6)
    assert metrics["AR100"] == pytest.approx(expected[8], abs=1e-6)
    assert 0.001 < metrics["AP50"] < 0.5  # a real number, small here: 80 classes, 32 validation photographs


def _split(boxes_by_image: list[list[tuple[int, list[float]]]], size=(200, 100)) -> dict:
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "width": size[0], "height": size[1]} for i in range(len(boxes_by_image))]
    annotations = [{"id": 100 * (i + 1) + j, "image_id": i + 1, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0} for i, boxes in enumerate(boxes_by_image) for j, (cat, box) in enumerate(boxes)]
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]}


def test_hand_computed_mean_box_and_ap():
    # cat boxes (as fractions of 200 x 100): x 0.1..0.3 / 0.3..0.5 -> mean cx 0.3, cy 0.5, w 0.2, h 0.4; in 1 of 2 images.
    # A box leaving the image is clipped first: dog [150, 0, 100, 50] is [150, 0, 50, 50] -> cx 0.875, cy 0.25.
    train = _split([[(1, [20, 30, 40, 40]), (7, [150, 0, 100, 50])], [(1, [60, 30, 40, 40])]])
    mean, share = mean_class_boxes(coco_from_dict(train), LabelMap.from_coco_categories(train["categories"]))
    np.testing.assert_allclose(mean, [[0.3, 0.5, 0.2, 0.4], [0.875, 0.25, 0.25, 0.5]])
    np.testing.assert_allclose(share, [1.0, 0.5])
    # Validation image 1 holds a cat exactly at the mean box (a hit at every IoU); image 2 a cat far from it (a miss).
    val = _split([[(1, [40, 30, 40, 40])], [(1, [150, 60, 40, 40])]])
    metrics = ours(train, val)
    # cat: two detections at score 1 ranked in image-id order (hit, miss), two ground truths: precision 1 up to
    # recall 0.5, then none -> COCO's 101-point interpolated AP = 51/101 at every IoU threshold. dog: no ground
    # truth, not averaged.
    assert metrics["AP"] == pytest.approx(51 / 101) and metrics["AP50"] == pytest.approx(51 / 101)
    assert list(metrics["per_class_AP"]) == ["cat"]


def test_crowd_and_empty_boxes_do_not_move_the_mean():
    train = _split([[(1, [20, 30, 40, 40]), (1, [0, 0, 0, 10]), (1, [0, 0, 200, 100])]])
    train["annotations"][2]["iscrowd"] = 1
    mean, _ = mean_class_boxes(coco_from_dict(train), LabelMap.from_coco_categories(train["categories"]))
    np.testing.assert_allclose(mean[0], [0.2, 0.5, 0.2, 0.4])
    assert np.isnan(mean[1]).all()  # no dog box: no dog detection


def test_near_baseline_warning_after_a_third_of_the_epochs_only():
    assert near_baseline_warning(3, 12, 0.21, 0.19) is None  # before a third
    message = near_baseline_warning(4, 12, 0.21, 0.19)
    assert message and "0.2100" in message and "0.1900" in message and "model.backbone.weights" in message
    assert near_baseline_warning(4, 12, 0.19 + BASELINE_MARGIN + 1e-6, 0.19) is None  # clearly above


def test_small_dataset_warning_names_the_weights_key():
    message = small_dataset_warning(None, None, 200, "coco")
    assert message and "model.backbone.weights" in message and "200 images" in message
    assert small_dataset_warning("IMAGENET1K_V1", None, 200, "coco") is None
    assert small_dataset_warning(None, "ddetr.pth", 200, "coco") is None
    assert small_dataset_warning(None, None, 6000, "yolo") is None
    assert small_dataset_warning(None, None, 200, "synthetic") is None


def test_ap_plot_draws_the_baseline_as_horizontal_lines(tmp_path):
    from PIL import Image

    from detr_kit.engine.logging import plot_metrics

    epochs = [{"kind": "epoch", "epoch": e, "step": e, "train/loss": 1.0, "val/AP": 0.1 * e, "val/AP50": 0.2 * e,
               "val/AP75": 0.05 * e} for e in range(3)]
    drawn = {}
    for name, records in {"plain": epochs, "baseline": [{"kind": "baseline", "AP": 0.6, "AP50": 0.8}, *epochs]}.items():
        path = tmp_path / name / "metrics.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        plot_metrics(path, path.parent / "plots")
        drawn[name] = np.asarray(Image.open(path.parent / "plots" / "ap.png").convert("RGB")).astype(int)
    changed = np.abs(drawn["plain"] - drawn["baseline"]).sum(axis=2) > 60  # [H, W]
    long_rows = np.flatnonzero(changed.sum(axis=1) > 0.3 * changed.shape[1])  # rows crossed by a long line
    # Two dashed lines across the axes (AP at 0.6 above AP50 at 0.8 in image rows: y grows downwards), apart.
    assert len(long_rows) >= 2 and long_rows.max() - long_rows.min() > 0.1 * changed.shape[0]


@pytest.mark.slow
def test_training_reports_the_baseline_in_console_metrics_and_plot(tmp_path, capsys):
    """A tiny DETR trained one epoch on 8 coco128 photographs, evaluated on the 32 validation ones."""
    from detr_kit.config import load_config
    from detr_kit.engine.logging import read_metrics
    from detr_kit.engine.trainer import train

    train_json = json.loads((COCO128 / "instances_train.json").read_text())
    keep = {img["id"] for img in train_json["images"][:8]}
    train_json = {**train_json, "images": [i for i in train_json["images"] if i["id"] in keep],
                  "annotations": [a for a in train_json["annotations"] if a["image_id"] in keep]}
    val_json = json.loads((COCO128 / "instances_val.json").read_text())
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(train_json))
    (root / "annotations" / "instances_val.json").write_text(json.dumps(val_json))
    images = str(COCO128.parent / "images")
    cfg = load_config(Path(__file__).parent / "tiny.yaml", [
        "data.dataset=auto", f"data.root={root}", f"data.train_images={images}", f"data.val_images={images}",
        "data.train_annotations=annotations/instances_train.json", "data.val_annotations=annotations/instances_val.json",
        "data.train_scales=[64]", "data.max_size=64", "data.eval_size=64", "train.epochs=1", "eval.batch_size=8"])
    train(cfg, tmp_path / "run", device="cpu")
    expected = pycocotools_baseline(train_json, val_json)

    out = capsys.readouterr().out
    assert f"constant-box baseline (one box per class at its mean training position): AP {expected[0]:.4f}, " \
           f"AP50 {expected[1]:.4f}" in out
    assert "model.backbone.weights=null) and the training split has 8 images" in out  # random backbone, small data
    assert "warning: after 1 of 1 epochs the model's AP" in out  # a tiny random model stays at the baseline
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    (start,) = [r for r in records if r["kind"] == "baseline"]
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert start["AP"] == pytest.approx(expected[0], abs=1e-6) and start["AP50"] == pytest.approx(expected[1], abs=1e-6)
    assert epoch["baseline/AP"] == start["AP"] and epoch["baseline/AP50"] == start["AP50"] and "val/AP" in epoch
    assert (tmp_path / "run" / "plots" / "ap.png").is_file()
    # vis/: the 64 px evaluation image enlarged to 512 px, its ground truth drawn (coco128's first val image has boxes).
    from PIL import Image

    from detr_kit.visualize import GROUND_TRUTH_COLOR

    (drawing,) = (tmp_path / "run" / "vis").glob("epoch_000_*.png")
    pixels = np.asarray(Image.open(drawing).convert("RGB"))
    assert max(pixels.shape[:2]) >= 512 and (pixels == GROUND_TRUTH_COLOR).all(axis=2).sum() > 500
