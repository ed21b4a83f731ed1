"""fast_coco_eval against pycocotools' COCOeval run on the same data: the numbers must be equal, not close."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_kit.data.coco import coco_from_dict
from detr_kit.engine.evaluator import STAT_NAMES, CocoEvaluator, fast_coco_stats, format_coco_summary
from detr_kit.engine.fast_coco import bbox_iou, fast_coco_eval
from detr_kit.structures import Detections, LabelMap, Target

ROOT = Path(__file__).resolve().parents[2]
VAL_JSON = ROOT / "data" / "coco128" / "annotations" / "instances_val.json"


def _load_res(coco_gt: COCO, results: list[dict]) -> COCO:
    if not results:  # loadRes cannot take an empty list: an empty results index, as CocoEvaluator builds it
        return coco_from_dict({"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]), "annotations": []})
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(copy.deepcopy(results))


def _reference(coco_gt: COCO, coco_dt: COCO, img_ids=None) -> COCOeval:
    """pycocotools as its README uses it, on deep copies (COCOeval writes flags into the annotations)."""
    ev = COCOeval(copy.deepcopy(coco_gt), copy.deepcopy(coco_dt), iouType="bbox")
    if img_ids is not None:
        ev.params.imgIds = list(img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _assert_identical(coco_gt: COCO, coco_dt: COCO, img_ids=None) -> np.ndarray:
    ev = _reference(coco_gt, coco_dt, img_ids)
    fast = fast_coco_eval(coco_gt, coco_dt, img_ids)
    np.testing.assert_array_equal(fast.stats, ev.stats)  # exact: assert_array_equal, not allclose
    np.testing.assert_array_equal(fast.precision, ev.eval["precision"])
    np.testing.assert_array_equal(fast.recall, ev.eval["recall"])
    return ev.stats


# ------------------------------------------------------------------------------------------ IoU


def test_bbox_iou_equals_pycocotools_bit_for_bit():
    rng = np.random.default_rng(0)
    dt = np.round(rng.uniform(0, 50, (40, 4)), 1)  # coarse grid: touching edges and identical boxes occur
    gt = np.round(rng.uniform(0, 50, (30, 4)), 1)
    dt[:5] = gt[:5]  # identical pairs -> IoU 1
    dt[5, 2:] = 0.0  # zero-size detection
    crowd = rng.random(30) < 0.3
    expected = np.asarray(mask_utils.iou(dt.tolist(), gt.tolist(), crowd.astype(int).tolist()))  # [D, G]
    d_idx, g_idx = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")
    got = bbox_iou(dt[d_idx.ravel()], gt[g_idx.ravel()], crowd[g_idx.ravel()]).reshape(40, 30)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got[np.arange(5), np.arange(5)], 1.0, rtol=1e-12)  # (x + w) - x need not be w exactly
    # Hand-computed: a 2x2 box in the corner of a 4x4 crowd box -> 4 / area(dt) = 1; not crowd -> 4 / 16.
    assert bbox_iou(np.array([[0.0, 0, 2, 2]]), np.array([[0.0, 0, 4, 4]]), np.array([True]))[0] == 1.0
    assert bbox_iou(np.array([[0.0, 0, 2, 2]]), np.array([[0.0, 0, 4, 4]]), np.array([False]))[0] == 0.25


# ------------------------------------------------------------------------------------------ coco128


def _perturbed_results(coco_gt: COCO, seed: int) -> list[dict]:
    """Jittered GT boxes (some with the wrong class), false positives, and detections on the crowd regions."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco_gt.getCatIds())
    results = []
    for image_id in sorted(coco_gt.getImgIds()):
        img = coco_gt.imgs[image_id]
        for ann in coco_gt.imgToAnns[image_id]:
            x, y, w, h = ann["bbox"]
            copies = 3 if ann["iscrowd"] else 1  # several detections inside a crowd: all ignored, none a false positive
            for _ in range(copies):
                if rng.random() < 0.15:
                    continue
                jitter = rng.normal(0, 0.1, 4) * np.array([w, h, w, h])
                box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
                cat = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cat_ids))
                results.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 8))):  # false positives
            x, y = rng.uniform(0, img["width"] - 20), rng.uniform(0, img["height"] - 20)
            w, h = rng.uniform(2, img["width"] - x), rng.uniform(2, img["height"] - y)
            results.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)), "bbox": [x, y, w, h],
                            "score": float(rng.choice([0.1, 0.5, rng.random()]))})  # repeated scores: sort ties
    return results


@pytest.fixture(scope="module")
def coco_gt() -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(VAL_JSON))


@pytest.mark.parametrize("seed", [0, 1])
def test_coco128_val_identical(coco_gt, seed):
    assert sum(a["iscrowd"] for a in coco_gt.dataset["annotations"]) == 2  # the crowd rule is exercised
    stats = _assert_identical(coco_gt, _load_res(coco_gt, _perturbed_results(coco_gt, seed)))
    assert 0.2 < stats[0] < 0.95 and (stats > 0).all()  # every stat is non-trivial, so a wrong rule shows


def test_coco128_subset_and_images_without_ground_truth(coco_gt):
    dataset = copy.deepcopy(coco_gt.dataset)
    empty_images = [900001, 900002, 900003]  # background images: detections there are all false positives
    dataset["images"] += [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in empty_images]
    with_background = coco_from_dict(dataset)
    results = _perturbed_results(coco_gt, 2)
    results += [{"image_id": i, "category_id": r["category_id"], "bbox": r["bbox"], "score": r["score"]}
                for i in empty_images for r in results[:12]]
    coco_dt = _load_res(with_background, results)
    assert _assert_identical(with_background, coco_dt)[0] < _assert_identical(coco_gt, _load_res(coco_gt, results[:-36]))[0]
    _assert_identical(with_background, coco_dt, img_ids=sorted(coco_gt.getImgIds())[:7] + empty_images)
    only_empty = _assert_identical(with_background, coco_dt, img_ids=empty_images)
    assert (only_empty == -1).all()  # no ground truth at all: every stat is -1, as in pycocotools


def test_no_detections(coco_gt):
    stats = _assert_identical(coco_gt, _load_res(coco_gt, []))
    assert stats[0] == 0.0 and stats[8] == 0.0


# ------------------------------------------------------------------------------------------ synthetic


def _synthetic(seed: int, num_images: int = 200) -> tuple[COCO, list[dict]]:
    """Boxes of every area range, crowds, more than 100 detections in some (image, category), score and IoU ties,
    ground-truth ``area`` that differs from the box area, images without ground truth or without detections."""
    rng = np.random.default_rng(seed)
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 5, 9)]
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 400, "height": 300, "file_name": f"{image_id}.jpg"})
        num_gt = 0 if image_id % 10 == 0 else int(rng.integers(1, 9))
        gts = []
        for _ in range(num_gt):
            side = float(rng.choice([8, 24, 40, 64, 120, 200]))  # small, medium and large objects
            x, y = float(rng.integers(0, 40) * 5), float(rng.integers(0, 30) * 5)  # a coarse grid: equal IoUs
            box = [x, y, side * float(rng.choice([0.5, 1, 2])), side]
            crowd = int(rng.random() < 0.1)
            area = box[2] * box[3] * float(rng.choice([1.0, 1.0, 0.5]))  # COCO's area is the mask's, not the box's
            cat = int(rng.choice([1, 2, 5, 9]))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                                "area": area, "iscrowd": crowd})
            gts.append((box, cat))
        if image_id % 7 == 0:
            continue  # no detections for this image
        many = image_id % 25 == 1  # > 100 detections of one category: the top-100 cut
        for box, cat in gts:
            for _ in range(int(rng.integers(0, 4))):  # duplicates of one object: matched once, the rest false positives
                shift = rng.integers(-2, 3, 4) * float(rng.choice([0, 1, 2]))
                results.append({"image_id": image_id, "category_id": cat,
                                "bbox": [box[0] + shift[0], box[1] + shift[1], max(box[2] + shift[2], 1), max(box[3] + shift[3], 1)],
                                "score": float(rng.choice([0.3, 0.6, 0.9, rng.random()]))})
        for _ in range(130 if many else int(rng.integers(0, 12))):
            x, y = float(rng.integers(0, 70) * 5), float(rng.integers(0, 50) * 5)
            results.append({"image_id": image_id, "category_id": 2 if many else int(rng.choice([1, 2, 5, 9])),
                            "bbox": [x, y, float(rng.choice([6, 30, 50, 100])), float(rng.choice([6, 30, 50, 100]))],
                            "score": float(rng.choice([0.2, 0.5, rng.random()]))})
    return coco_from_dict({"images": images, "annotations": annotations, "categories": categories}), results


def test_hand_built_matching_rules():
    """Image 1: det1 [0,0,10,10] has the same IoU (90/110) with gt A [1,0,..] and gt B [-1,0,..]; the tie goes to the
    LATER one (B), which leaves A for det2 [3,0,10,10] (IoU 80/120 with A, 60/140 with B) -> 2 TPs at IoU 0.5.
    Image 2: a crowd gt listed first overlaps det3 fully, a regular gt later with IoU 0.6: the regular gt wins.
    Image 3: only a crowd gt: two detections inside it are both ignored (not false positives)."""
    gts = [
        (1, [1.0, 0, 10, 10], 0), (1, [-1.0, 0, 10, 10], 0),
        (2, [0.0, 0, 50, 50], 1), (2, [0.0, 0, 10, 12.5], 0),
        (3, [0.0, 0, 40, 40], 1),
    ]
    dts = [(1, [0.0, 0, 10, 10], 0.9), (1, [3.0, 0, 10, 10], 0.8), (2, [0.0, 0, 10, 10], 0.7),
           (3, [0.0, 0, 10, 10], 0.95), (3, [5.0, 5, 10, 10], 0.6)]
    coco_gt = coco_from_dict({
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
        "annotations": [{"id": j + 1, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": c}
                        for j, (i, b, c) in enumerate(gts)],
        "categories": [{"id": 1, "name": "x"}],
    })
    coco_dt = _load_res(coco_gt, [{"image_id": i, "category_id": 1, "bbox": b, "score": s} for i, b, s in dts])
    stats = _assert_identical(coco_gt, coco_dt)
    assert stats[1] == 1.0  # AP50: all three regular gts found, no false positive (crowd detections ignored)
    # AR100 over the 10 IoU thresholds: 3 found for t <= 0.65 (det2 - A is 0.667), 2 for 0.7..0.8 (det3 is 0.8), 0 above.
    assert stats[8] == pytest.approx((4 * 3 + 3 * 2) / 30)


@pytest.mark.parametrize("seed", [0, 1])
def test_randomized_synthetic_identical(seed):
    coco_gt, results = _synthetic(seed)
    stats = _assert_identical(coco_gt, _load_res(coco_gt, results))
    assert (stats > 0).all() and stats[0] < 0.9


def test_non_finite_boxes_follow_pycocotools():
    """NaN/inf coordinates make NaN IoUs, which pycocotools' comparisons treat in their own way."""
    coco_gt, results = _synthetic(3, num_images=40)
    for i in range(0, len(results), 9):
        results[i]["bbox"][i % 4] = float("nan") if i % 2 else float("inf")
    _assert_identical(coco_gt, _load_res(coco_gt, results))


def test_fast_coco_stats_signature():
    coco_gt, results = _synthetic(4, num_images=30)
    coco_dt = _load_res(coco_gt, results)
    stats = fast_coco_stats(coco_gt, coco_dt)
    assert isinstance(stats, np.ndarray) and stats.shape == (12,)
    np.testing.assert_array_equal(stats, _reference(coco_gt, coco_dt).stats)


# ------------------------------------------------------------------------------------------ evaluator


def test_evaluator_fast_backend_equals_pycocotools_backend(coco_gt, capsys):
    label_map = LabelMap.from_coco_categories(coco_gt.dataset["categories"])
    to_label = label_map.category_to_label
    results = _perturbed_results(coco_gt, 5)
    # Our Detections are float32 xyxy: round the results so that the conversion is exact for both backends.
    results = [{**r, "bbox": [float(np.round(v * 4) / 4) for v in r["bbox"]], "score": float(np.float32(r["score"]))} for r in results]
    evaluators = {name: CocoEvaluator(coco_gt, label_map, backend=name) for name in ("pycocotools", "fast")}
    for image_id in sorted(coco_gt.getImgIds()):
        mine = [r for r in results if r["image_id"] == image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)], dtype=torch.float32).reshape(-1, 4)
        det = Detections(boxes, torch.tensor([r["score"] for r in mine]), torch.tensor([to_label[r["category_id"]] for r in mine]))
        for evaluator in evaluators.values():
            evaluator.update([Target(torch.zeros(0, 4), torch.zeros(0), image_id=image_id)], [det])
    reference = evaluators["pycocotools"].summarize(verbose=False)
    fast = evaluators["fast"].summarize(verbose=True)
    assert fast == reference and reference["AP"] > 0.2  # the 12 stats and every per-class AP, exactly
    printed = capsys.readouterr().out
    assert format_coco_summary([fast[name] for name in STAT_NAMES]) in printed and "category" in printed
    with pytest.raises(ValueError, match="backend='cocoapi'.*'pycocotools', 'fast'"):
        CocoEvaluator(coco_gt, label_map, backend="cocoapi")  # type: ignore[arg-type]


def test_format_coco_summary_matches_pycocotools_print(coco_gt):
    ev = COCOeval(coco_gt, _load_res(coco_gt, _perturbed_results(coco_gt, 6)), iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ev.summarize()
    assert printed.getvalue().rstrip("\n") == format_coco_summary(ev.stats)


def test_config_backend_reaches_the_evaluator():
    from detr_kit.config import Config

    assert Config().replace(["eval.backend=fast"]).eval.backend == "fast"
    with pytest.raises(Exception, match="backend"):
        Config().replace(["eval.backend=slow"])
    assert json.dumps(Config().eval.backend) == '"pycocotools"'  # the default keeps the reference implementation
