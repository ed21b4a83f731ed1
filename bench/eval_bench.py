"""COCO evaluation speed: pycocotools' COCOeval vs detr_kit's evaluator backends on the same results.

A synthetic ground truth of 5000 images (7 boxes each, 80 categories) and 100 detections per image
(jittered ground truth plus random boxes). Prints one JSON line per backend with the seconds of
evaluate()+accumulate()+summarize() and whether its 12 numbers equal pycocotools' exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import time

import numpy as np


def synthetic_coco(num_images: int = 5000, boxes_per_image: int = 7, dets_per_image: int = 100, seed: int = 0):
    rng = np.random.default_rng(seed)
    categories = [{"id": i, "name": f"c{i}"} for i in range(1, 81)]
    images, annotations, results = [], [], []
    ann_id = 1
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        xy = rng.uniform(0, 400, (boxes_per_image, 2))
        wh = rng.uniform(8, 200, (boxes_per_image, 2))
        cats = rng.integers(1, 81, boxes_per_image)
        for (x, y), (w, h), c in zip(xy, wh, cats):
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": int(c), "bbox": [x, y, w, h],
                                "area": float(w * h), "iscrowd": 0})
            ann_id += 1
        jitter = rng.normal(0, 6, (boxes_per_image, 4))
        for (x, y), (w, h), c, j in zip(xy, wh, cats, jitter):
            results.append({"image_id": image_id, "category_id": int(c), "bbox": [x + j[0], y + j[1], max(w + j[2], 1), max(h + j[3], 1)],
                            "score": float(rng.uniform(0.3, 1))})
        for _ in range(dets_per_image - boxes_per_image):
            x, y = rng.uniform(0, 500, 2)
            w, h = rng.uniform(5, 150, 2)
            results.append({"image_id": image_id, "category_id": int(rng.integers(1, 81)), "bbox": [x, y, w, h],
                            "score": float(rng.uniform(0, 0.6))})
    return {"images": images, "annotations": annotations, "categories": categories}, results


def main() -> None:
    from pycocotools.cocoeval import COCOeval

    from detr_kit.data.coco import coco_from_dict

    gt_dict, results = synthetic_coco()
    gt = coco_from_dict(gt_dict)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    reference = ev.stats.tolist()
    print(json.dumps({"case": "eval", "impl": "pycocotools", "median_s": time.perf_counter() - start, "stats": reference}), flush=True)

    try:
        from detr_kit.engine.evaluator import fast_coco_stats
    except ImportError:
        return
    start = time.perf_counter()
    stats = fast_coco_stats(gt, dt)
    seconds = time.perf_counter() - start
    print(json.dumps({"case": "eval", "impl": "detr_kit fast", "median_s": seconds, "stats": list(map(float, stats)),
                      "identical": [float(a) for a in stats] == reference}), flush=True)


if __name__ == "__main__":
    main()
