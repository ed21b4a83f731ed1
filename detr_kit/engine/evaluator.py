"""COCO box evaluation: collect detections, gather them across ranks, score them with pycocotools.

``CocoEvaluator`` turns ``Detections`` (xyxy, original pixels, contiguous labels) into COCO results
(xywh, original category ids) and runs ``pycocotools.cocoeval.COCOeval`` on them. ``evaluate`` runs a
model over a loader and returns the metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from detr_kit.data.coco import coco_from_dict
from detr_kit.engine.fast_coco import fast_coco_eval, fast_coco_stats
from detr_kit.engine.outputs import claim_output_folder
from detr_kit.engine.step import autocast, outputs_to_float
from detr_kit.structures import Detections, ImageBatch, LabelMap, Target

# COCOeval.stats order (pycocotools cocoeval.py, summarize()).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

AmpMode = Literal["off", "bf16", "fp16"]
EvalBackend = Literal["pycocotools", "fast"]
BACKENDS = ("pycocotools", "fast")


def _write_json_atomic(data: Any, path: Path) -> None:
    """Write JSON to a temp file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f)
    tmp.replace(path)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class CocoEvaluator:
    """Collect detections of a dataset split and score them with pycocotools (bbox AP/AR).

    Args:
        coco_gt: the ground truth of the split (``pycocotools.coco.COCO``).
        label_map: maps the model's contiguous labels back to ``coco_gt`` category ids and names.
        backend: "pycocotools" runs COCOeval; "fast" runs ``fast_coco_eval`` (numpy, the same numbers
            exactly, several times faster on large splits).

    Use: ``update`` once per batch, then ``gather`` (a no-op without torch.distributed), then
    ``summarize``. Every rank must call ``gather`` and ``summarize``; rank 0 runs COCOeval and the
    metrics are broadcast to all ranks.
    """

    def __init__(self, coco_gt: COCO, label_map: LabelMap, backend: EvalBackend = "pycocotools") -> None:
        if not isinstance(coco_gt, COCO):
            raise TypeError(f"CocoEvaluator: coco_gt must be a pycocotools COCO, got {type(coco_gt).__name__}")
        if not isinstance(label_map, LabelMap):
            raise TypeError(f"CocoEvaluator: label_map must be a LabelMap, got {type(label_map).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"CocoEvaluator: backend={backend!r} is invalid; allowed: {', '.join(map(repr, BACKENDS))}")
        self.coco_gt = coco_gt
        self.label_map = label_map
        self.backend = backend
        self._category_ids = np.asarray(label_map.category_ids, dtype=np.int64)
        # One (image_id, COCO results of that image) entry per image seen, in order, even without detections.
        self._entries: list[tuple[int, list[dict]]] = []
        self._gathered = False

    @property
    def image_ids(self) -> list[int]:
        """The ids of the images seen so far (after ``gather``: every image once)."""
        return [image_id for image_id, _ in self._entries]

    @property
    def results(self) -> list[dict]:
        """Every detection so far in COCO results format: image_id, category_id, bbox xywh, score."""
        return [r for _, image_results in self._entries for r in image_results]

    def reset(self) -> None:
        """Forget every collected detection."""
        self._entries, self._gathered = [], False

    def update(self, targets: Sequence[Target], detections: Sequence[Detections]) -> None:
        """Add the detections of one batch.

        Args:
            targets: one Target per image; only ``image_id`` is read.
            detections: one Detections per image: boxes [N, 4] xyxy in original pixels, scores [N],
                labels [N] contiguous.

        Raises:
            ValueError: for a length mismatch, an unknown image id or a label outside the label map.
        """
        if len(targets) != len(detections):
            raise ValueError(f"CocoEvaluator.update: {len(targets)} targets but {len(detections)} detections")
        known = self.coco_gt.imgs
        self._gathered = False
        for target, det in zip(targets, detections):
            image_id = int(target.image_id)
            if image_id not in known:
                raise ValueError(f"CocoEvaluator.update: image_id {image_id} is not in the ground-truth annotations")
            image_results: list[dict] = []
            self._entries.append((image_id, image_results))
            if len(det) == 0:
                continue
            boxes = det.boxes.detach().float().cpu().numpy().astype(np.float64)  # [N, 4] xyxy
            scores = det.scores.detach().float().cpu().numpy().astype(np.float64)  # [N]
            labels = det.labels.detach().cpu().numpy().astype(np.int64)  # [N]
            if labels.min() < 0 or labels.max() >= len(self._category_ids):
                raise ValueError(
                    f"CocoEvaluator.update: labels must lie in 0..{len(self._category_ids) - 1} "
                    f"(the label map), got {labels.min()}..{labels.max()}"
                )
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # [N, 4]
            category_ids = self._category_ids[labels]
            for box, score, cat in zip(xywh.tolist(), scores.tolist(), category_ids.tolist()):
                image_results.append({"image_id": image_id, "category_id": int(cat), "bbox": box, "score": score})

    def gather(self) -> None:
        """Collect every rank's results on rank 0, keeping each image exactly once.

        A DistributedSampler pads the dataset by repeating images; the detections of a repeated image are
        kept from the first rank that reported it. Without torch.distributed this only de-duplicates.
        """
        if self._gathered:
            return
        if _dist_ready():
            shards: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shards, self._entries)
        else:
            shards = [self._entries]
        seen: set[int] = set()
        entries: list[tuple[int, list[dict]]] = []
        for shard in shards:
            for image_id, image_results in shard:
                if image_id not in seen:
                    seen.add(image_id)
                    entries.append((image_id, image_results))
        self._entries, self._gathered = entries, True

    def summarize(self, output_dir: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
        """Score the gathered detections.

        Args:
            output_dir: when given, rank 0 writes ``metrics.json`` and ``detections.json`` (COCO results
                format) there, each atomically; the folder must be new, empty or detr_kit's own
                (``engine/outputs.py``; callers claim it before evaluating, so that a refusal comes first).
            verbose: print the standard 12-line COCO summary and a per-class AP table.

        Returns:
            ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}``
            as floats in COCOeval's stats order (-1 where the split has no ground truth in that area range),
            plus ``"per_class_AP": {name: AP}`` for every category with ground truth among the evaluated
            images. No detections at all give AP 0 without an error.
        """
        self.gather()
        rank = torch.distributed.get_rank() if _dist_ready() else 0
        metrics: dict[str, Any] = {}
        if rank == 0:
            metrics = self._score(verbose)
            if output_dir is not None:
                out = claim_output_folder(output_dir, "output_dir", "detr_kit evaluator")
                _write_json_atomic(self.results, out / "detections.json")
                _write_json_atomic(metrics, out / "metrics.json")
        if _dist_ready():
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def _score(self, verbose: bool) -> dict[str, Any]:
        coco_dt = self._load_results()
        if self.backend == "fast":
            return self._score_fast(coco_dt, verbose)
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = sorted(set(self.image_ids)) if self.image_ids else sorted(self.coco_gt.getImgIds())
        quiet = contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco_eval.evaluate()
            coco_eval.accumulate()
        if verbose:
            coco_eval.summarize()
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.summarize()
        metrics: dict[str, Any] = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
        metrics["per_class_AP"] = self._per_class_ap(coco_eval.eval["precision"], coco_eval.params.catIds)
        if verbose:
            print(self.format_per_class(metrics["per_class_AP"]))
        return metrics

    def _score_fast(self, coco_dt: COCO, verbose: bool) -> dict[str, Any]:
        """``_score`` with the numpy backend; the printed summary has COCOeval's 12 lines."""
        image_ids = sorted(set(self.image_ids)) if self.image_ids else None
        result = fast_coco_eval(self.coco_gt, coco_dt, image_ids)
        metrics: dict[str, Any] = {name: float(v) for name, v in zip(STAT_NAMES, result.stats)}
        metrics["per_class_AP"] = self._per_class_ap(result.precision, result.cat_ids)
        if verbose:
            print(format_coco_summary(result.stats))
            print(self.format_per_class(metrics["per_class_AP"]))
        return metrics

    def _load_results(self) -> COCO:
        """The results as a COCO object; an empty one (every AP 0) when there is no detection at all."""
        results = [dict(r) for r in self.results]  # loadRes adds keys to the dicts it gets
        if results:
            with contextlib.redirect_stdout(io.StringIO()):
                return self.coco_gt.loadRes(results)
        return coco_from_dict({
            "images": list(self.coco_gt.dataset["images"]),
            "categories": list(self.coco_gt.dataset.get("categories", [])),
            "annotations": [],
        })

    def _per_class_ap(self, precision: np.ndarray, cat_ids: Sequence[int]) -> dict[str, float]:
        """AP@[.5:.95], all areas, 100 detections, per category with ground truth.

        Args:
            precision: [T IoUs, R recalls, K cats, A areas, M maxDets], COCOeval's ``eval["precision"]``.
            cat_ids: the K category ids of its third axis.
        """
        names = {cat: name for cat, name in zip(self.label_map.category_ids, self.label_map.names)}
        per_class: dict[str, float] = {}
        for k, cat in enumerate(cat_ids):
            p = precision[:, :, k, 0, -1]
            valid = p[p > -1]
            if valid.size == 0:  # no ground truth of this class among the evaluated images
                continue
            name = names.get(cat) or self.coco_gt.cats.get(cat, {}).get("name", str(cat))
            per_class[name] = float(np.mean(valid))
        return per_class

    @staticmethod
    def format_per_class(per_class: dict[str, float], columns: int = 3) -> str:
        """A fixed-width table of per-class AP, ``columns`` (name, AP) pairs per row."""
        if not per_class:
            return "per-class AP: no class has ground truth"
        items = [(name[:18], f"{100 * ap:5.1f}") for name, ap in per_class.items()]
        header = " | ".join(f"{'category':<18} {'AP':>5}" for _ in range(min(columns, len(items))))
        rows = [header, "-" * len(header)]
        for start in range(0, len(items), columns):
            rows.append(" | ".join(f"{n:<18} {a:>5}" for n, a in items[start : start + columns]))
        return "\n".join(rows)


def format_coco_summary(stats: Sequence[float]) -> str:
    """The 12 lines ``COCOeval.summarize`` prints for bbox stats (same layout, same rounding)."""
    settings = [(1, None, "all", 100), (1, 0.5, "all", 100), (1, 0.75, "all", 100), (1, None, "small", 100),
                (1, None, "medium", 100), (1, None, "large", 100), (0, None, "all", 1), (0, None, "all", 10),
                (0, None, "all", 100), (0, None, "small", 100), (0, None, "medium", 100), (0, None, "large", 100)]
    lines = []
    for (ap, iou, area, max_det), value in zip(settings, stats):
        title, kind = ("Average Precision", "(AP)") if ap else ("Average Recall", "(AR)")
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(f" {title:<18} {kind} @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_det:>3d} ] = {value:0.3f}")
    return "\n".join(lines)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then give every submodule its own train/eval flag back, also on errors.

    A model being trained can be evaluated (or wrapped by ``Detector``) between its training steps and find its
    modes as they were, including parts the caller keeps in eval mode (e.g. a backbone with frozen batch-norm
    statistics), which ``model.train(was_training)`` would switch to train mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def evaluate(
    model: nn.Module,
    postprocessor: nn.Module,
    loader: Iterable[tuple[ImageBatch, list[Target]]],
    coco_gt: COCO,
    label_map: LabelMap,
    device: torch.device | str,
    amp: AmpMode = "off",
    output_dir: str | Path | None = None,
    exact_padding: bool = True,
    verbose: bool = True,
    backend: EvalBackend = "pycocotools",
) -> dict[str, Any]:
    """Run ``model`` over ``loader`` and return COCO bbox metrics (see ``CocoEvaluator.summarize``).

    The model runs in eval mode under ``torch.inference_mode`` (``evaluation_mode``: its modes are restored), with
    ``exact_padding`` passed to its forward so that AP does not depend on the evaluation batch size.

    Args:
        model: a detector, ``model(images [B,3,H,W], mask [B,H,W]) -> DetectionOutput`` (DDP or
            torch.compile wrappers allowed).
        postprocessor: ``postprocessor(output, orig_sizes [B, 2] (h, w)) -> list[Detections]``.
        loader: yields ``(ImageBatch, list[Target])``; targets carry ``image_id`` and ``orig_size``.
        coco_gt: ground truth of the split.
        label_map: contiguous labels -> category ids of ``coco_gt``.
        device: where the model runs.
        amp: "off", "bf16" or "fp16" autocast.
        output_dir: where rank 0 writes metrics.json and detections.json; None writes nothing.
        exact_padding: run the backbone on each image unpadded (the detector's forward argument).
        verbose: print the COCO summary and the per-class table.
        backend: "pycocotools" or "fast" (see ``CocoEvaluator``).
    """
    device = torch.device(device)
    evaluator = CocoEvaluator(coco_gt, label_map, backend)
    with evaluation_mode(model), torch.inference_mode():
        for batch, targets in loader:
            batch = batch.to(device, non_blocking=True)
            with autocast(device, amp):
                output = model(batch.images, batch.mask, exact_padding=exact_padding)
            orig_sizes = torch.tensor([t.orig_size for t in targets], dtype=torch.int64, device=device)  # [B, 2]
            output = outputs_to_float(output)
            detections = postprocessor(output, orig_sizes)
            evaluator.update(targets, detections)
    return evaluator.summarize(output_dir, verbose=verbose)


__all__ = ["BACKENDS", "STAT_NAMES", "CocoEvaluator", "evaluate", "evaluation_mode", "fast_coco_eval", "fast_coco_stats",
           "format_coco_summary"]
