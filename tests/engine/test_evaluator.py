"""CocoEvaluator against pycocotools' COCOeval run directly on the same detections (coco128 val split)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_kit.engine.evaluator import STAT_NAMES, CocoEvaluator
from detr_kit.structures import Detections, LabelMap, Target

ROOT = Path(__file__).resolve().parents[2]
VAL_JSON = ROOT / "data" / "coco128" / "annotations" / "instances_val.json"


@pytest.fixture(scope="module")
def coco_gt() -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(VAL_JSON))


@pytest.fixture(scope="module")
def label_map(coco_gt: COCO) -> LabelMap:
    return LabelMap.from_coco_categories(coco_gt.dataset["categories"])


def _reference_stats(coco_gt: COCO, results: list[dict]) -> np.ndarray:
    """pycocotools used exactly as its README shows, on a deep copy of the results."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(json.loads(json.dumps(results)))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _perturbed_results(coco_gt: COCO, seed: int) -> list[dict]:
    """COCO results (xywh) built straight from the annotations: jittered GT boxes, random scores, false positives.

    Coordinates are multiples of 1/4 pixel and scores float32 values, so that xyxy float32 <-> xywh float64
    conversions are exact and the comparison can demand identical numbers.
    """
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco_gt.getCatIds())
    results = []
    for image_id in sorted(coco_gt.getImgIds()):
        img = coco_gt.imgs[image_id]
        for ann in coco_gt.imgToAnns[image_id]:
            if rng.random() < 0.15:  # a missed object
                continue
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 0.1, 4) * np.array([w, w, h, h])
            x1, x2 = np.round(np.array([x, x + w]) + jitter[:2], 0) / 1
            y1, y2 = np.round(np.array([y, y + h]) + jitter[2:], 0) / 1
            x1, y1, x2, y2 = (np.round(v * 4) / 4 for v in (x1, y1, x2, y2))
            if x2 <= x1 or y2 <= y1:
                continue
            score = float(np.float32(rng.random()))
            cat = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cat_ids))
            results.append({"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
        for _ in range(int(rng.integers(0, 6))):  # false positives anywhere in the image
            x1 = np.round(rng.uniform(0, img["width"] - 20) * 4) / 4
            y1 = np.round(rng.uniform(0, img["height"] - 20) * 4) / 4
            w = np.round(rng.uniform(4, min(200, img["width"] - x1)) * 4) / 4
            h = np.round(rng.uniform(4, min(200, img["height"] - y1)) * 4) / 4
            score = float(np.float32(rng.random()))
            results.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)), "bbox": [x1, y1, w, h], "score": score})
    return [{**r, "bbox": [float(v) for v in r["bbox"]]} for r in results]


def _as_batches(coco_gt: COCO, label_map: LabelMap, results: list[dict], batch_size: int):
    """The results as (targets, detections) batches in our types: xyxy float32, contiguous labels."""
    to_label = label_map.category_to_label
    image_ids = sorted(coco_gt.getImgIds())
    for start in range(0, len(image_ids), batch_size):
        targets, detections = [], []
        for image_id in image_ids[start : start + batch_size]:
            mine = [r for r in results if r["image_id"] == image_id]
            boxes = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (r["bbox"] for r in mine)], dtype=torch.float32)
            scores = torch.tensor([r["score"] for r in mine], dtype=torch.float32)
            labels = torch.tensor([to_label[r["category_id"]] for r in mine], dtype=torch.int64)
            targets.append(Target(torch.zeros(0, 4), torch.zeros(0), image_id=image_id))
            detections.append(Detections(boxes.reshape(-1, 4), scores, labels))
        yield targets, detections


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_pycocotools_exactly(coco_gt, label_map, tmp_path, seed):
    results = _perturbed_results(coco_gt, seed)
    expected = _reference_stats(coco_gt, results)
    evaluator = CocoEvaluator(coco_gt, label_map)
    for targets, detections in _as_batches(coco_gt, label_map, results, batch_size=5):
        evaluator.update(targets, detections)
    metrics = evaluator.summarize(tmp_path, verbose=False)
    got = np.array([metrics[name] for name in STAT_NAMES])
    assert 0.2 < expected[0] < 0.95  # a meaningful, non-trivial AP
    np.testing.assert_array_equal(got, expected)
    # The written files: the detections json scores the same under pycocotools; metrics.json holds the dict.
    written = json.loads((tmp_path / "detections.json").read_text())
    assert len(written) == len(results)
    np.testing.assert_array_equal(_reference_stats(coco_gt, written), expected)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_per_class_ap_matches_single_category_evaluation(coco_gt, label_map):
    results = _perturbed_results(coco_gt, 3)
    evaluator = CocoEvaluator(coco_gt, label_map)
    for targets, detections in _as_batches(coco_gt, label_map, results, batch_size=8):
        evaluator.update(targets, detections)
    per_class = evaluator.summarize(verbose=False)["per_class_AP"]
    used = sorted({a["category_id"] for a in coco_gt.dataset["annotations"]})
    assert len(per_class) == len(used)
    for cat in used[:4]:  # an independent per-category run of COCOeval
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(results))), "bbox")
            ev.params.catIds = [cat]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert per_class[coco_gt.cats[cat]["name"]] == pytest.approx(max(ev.stats[0], 0.0), abs=1e-12)


def test_perfect_detections_give_ap_one(coco_gt, label_map):
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [float(v) for v in a["bbox"]], "score": 1.0}
        for a in coco_gt.dataset["annotations"]
        if not a["iscrowd"]
    ]
    evaluator = CocoEvaluator(coco_gt, label_map)
    for targets, detections in _as_batches(coco_gt, label_map, results, batch_size=4):
        evaluator.update(targets, detections)
    metrics = evaluator.summarize(verbose=False)
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-6), name
    assert all(ap == pytest.approx(1.0, abs=1e-6) for ap in metrics["per_class_AP"].values())


def test_no_detections_gives_zero_without_error(coco_gt, label_map, tmp_path, capsys):
    evaluator = CocoEvaluator(coco_gt, label_map)
    for targets, detections in _as_batches(coco_gt, label_map, [], batch_size=16):
        evaluator.update(targets, detections)
    metrics = evaluator.summarize(tmp_path)
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AR100"] == 0.0
    assert set(metrics["per_class_AP"].values()) == {0.0}
    assert json.loads((tmp_path / "detections.json").read_text()) == []
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    assert "category" in printed  # the per-class table


def test_duplicate_images_are_counted_once(coco_gt, label_map):
    """A DistributedSampler repeats images to even out ranks; each image must be scored once."""
    results = _perturbed_results(coco_gt, 5)
    batches = list(_as_batches(coco_gt, label_map, results, batch_size=4))
    once = CocoEvaluator(coco_gt, label_map)
    twice = CocoEvaluator(coco_gt, label_map)
    for targets, detections in batches:
        once.update(targets, detections)
        twice.update(targets, detections)
    twice.update(*batches[0])  # the padding repeat
    assert once.summarize(verbose=False) == twice.summarize(verbose=False)


def test_subset_of_images_is_evaluated_on_that_subset(coco_gt, label_map):
    results = _perturbed_results(coco_gt, 6)
    targets, detections = next(_as_batches(coco_gt, label_map, results, batch_size=6))
    evaluator = CocoEvaluator(coco_gt, label_map)
    evaluator.update(targets, detections)
    ids = [t.image_id for t in targets]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes([r for r in results if r["image_id"] in ids]), "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = evaluator.summarize(verbose=False)
    np.testing.assert_array_equal([metrics[n] for n in STAT_NAMES], ev.stats)


def test_bad_inputs_are_named(coco_gt, label_map):
    evaluator = CocoEvaluator(coco_gt, label_map)
    box = Detections(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.5]), torch.tensor([len(label_map)]))
    with pytest.raises(ValueError, match="labels must lie in"):
        evaluator.update([Target(torch.zeros(0, 4), torch.zeros(0), image_id=coco_gt.getImgIds()[0])], [box])
    with pytest.raises(ValueError, match="image_id 123456789"):
        evaluator.update([Target(torch.zeros(0, 4), torch.zeros(0), image_id=123456789)], [box])
    with pytest.raises(TypeError, match="coco_gt"):
        CocoEvaluator({"images": []}, label_map)  # type: ignore[arg-type]


def _tiny_model(num_classes: int) -> torch.nn.Module:
    from detr_kit.build import build_model
    from detr_kit.config import config_from_dict

    torch.manual_seed(0)
    cfg = config_from_dict({"model": {
        "hidden_dim": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64,
        "num_queries": 12, "dropout": 0.0, "backbone": {"name": "resnet18", "weights": None, "norm": "bn"},
    }})
    return build_model(cfg, num_classes=num_classes)


def _detections_by_image(path: Path) -> dict[int, np.ndarray]:
    rows: dict[int, list] = {}
    for r in json.loads(path.read_text()):
        rows.setdefault(r["image_id"], []).append([*r["bbox"], r["score"], r["category_id"]])
    return {k: np.array(v) for k, v in rows.items()}


def test_evaluate_does_not_depend_on_batch_size(tmp_path):
    from torch.utils.data import DataLoader, Subset

    from detr_kit.data.coco import CocoDetection
    from detr_kit.data.collate import collate
    from detr_kit.data.transforms import eval_transforms
    from detr_kit.engine.evaluator import evaluate
    from detr_kit.models.postprocess import PostProcess

    dataset = CocoDetection(ROOT / "data" / "coco128" / "images", VAL_JSON, eval_transforms(64, 96), train=False)
    subset = Subset(dataset, range(5))  # portrait and landscape images: batches of 4 pad some of them
    model = _tiny_model(dataset.num_classes)
    model.train()
    runs = {}
    for name, batch_size, exact in (("b1", 1, True), ("b4", 4, True), ("b4_padded", 4, False)):
        loader = DataLoader(subset, batch_size=batch_size, collate_fn=collate)
        metrics = evaluate(model, PostProcess(focal=False), loader, dataset.coco, dataset.label_map, "cpu",
                           output_dir=tmp_path / name, exact_padding=exact, verbose=False)
        runs[name] = (metrics, _detections_by_image(tmp_path / name / "detections.json"))
        assert model.training  # restored after the run
    (m1, d1), (m4, d4), (_, padded) = runs["b1"], runs["b4"], runs["b4_padded"]
    assert sorted(d1) == sorted(d4) and len(d1) == 5
    worst = max(np.abs(d1[k] - d4[k]).max() for k in d1)
    assert worst < 1e-3  # boxes in pixels, scores, identical category ids
    assert {k: v for k, v in m1.items() if k != "per_class_AP"} == {k: v for k, v in m4.items() if k != "per_class_AP"}
    assert m1["per_class_AP"] == m4["per_class_AP"]
    # The control: with a padded backbone the same images give other detections, so the check above can fail.
    assert max(np.abs(d1[k] - padded[k]).max() for k in d1) > 1e-2
