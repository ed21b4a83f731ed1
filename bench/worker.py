"""One benchmark measurement in a fresh process: ``python -m bench.worker CASE MODEL IMPL [--repeats N]``.

Prints one JSON line: {"case", "model", "impl", "times_s", "median_s", "peak_rss_mb", ...}. Every figure
is measured here, in this process, so its peak RSS belongs to that implementation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]

# Our configs and the equivalent Hugging Face configs (same architecture, random weights).
MODELS = {
    "detr": ("configs/detr_r50.yaml", []),
    "deformable": ("configs/deformable_detr.yaml", []),
    "deformable_two_stage": ("configs/deformable_detr_two_stage.yaml", []),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def random_targets(batch: int, num_boxes: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        cxcy = torch.rand(num_boxes, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(num_boxes, 2, generator=g) * 0.3 + 0.05
        out.append((torch.cat([cxcy, wh], 1), torch.randint(0, num_classes, (num_boxes,), generator=g)))
    return out


# ------------------------------------------------------------------------------------------------ ours


def ours_model(model_key: str, extra: list[str], device: torch.device):
    from detr_kit.build import build_criterion, build_model
    from detr_kit.engine.optim import build_optimizer
    from detr_kit.config import load_config

    path, overrides = MODELS[model_key]
    cfg = load_config(ROOT / path, [*overrides, "model.num_classes=91", "model.backbone.weights=null", *extra])
    model = build_model(cfg).to(device)
    return cfg, model, build_criterion(cfg).to(device), build_optimizer(model, cfg.train)


def ours_train_step(model_key: str, batch: int, size: int, extra: list[str], device: torch.device) -> Callable[[], object]:
    from detr_kit.structures import Target

    cfg, model, criterion, optimizer = ours_model(model_key, extra, device)
    model.train()
    images = torch.randn(batch, 3, size, size, device=device)
    targets = [Target(boxes, labels).to(device) for boxes, labels in random_targets(batch, 5, 91)]

    def step():
        output = model(images)
        loss = criterion(output, targets).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm)
        optimizer.step()

    return step


def ours_inference(model_key: str, height: int, width: int, extra: list[str], device: torch.device) -> Callable[[], object]:
    _, model, _, _ = ours_model(model_key, extra, device)
    model.eval()
    images = torch.randn(1, 3, height, width, device=device)

    def forward():
        with torch.inference_mode():
            return model(images)

    return forward


# ------------------------------------------------------------------------------------------------ Hugging Face


# Dropout as the papers (and detr_kit's configs, model.dropout = 0.1) apply it: on residuals, after the FFN
# activation and on attention weights. transformers' configs default the last two to 0.0 (attention_dropout,
# activation_dropout), which skips work the papers' training does; impl "hf" matches the papers, "hf_default"
# keeps transformers' defaults. Only training is affected: dropout is off at inference.
PAPER_DROPOUT = {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1}


# Our variants: the overrides each one adds. ours_hf_dropout drops what transformers' default configs drop.
OURS_IMPLS = {
    "ours": [],
    "ours_compiled": ["model.compile=true"],
    "ours_hf_dropout": ["model.attention_dropout=0.0", "model.activation_dropout=0.0"],
}


def hf_model(model_key: str, device: torch.device, paper_dropout: bool = True):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, DetrConfig, DetrForObjectDetection

    dropout = PAPER_DROPOUT if paper_dropout else {}
    if model_key == "detr":
        model = DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False, num_labels=91, **dropout))
    else:
        two_stage = model_key == "deformable_two_stage"
        config = DeformableDetrConfig(
            use_pretrained_backbone=False, num_labels=91, with_box_refine=two_stage, two_stage=two_stage, **dropout
        )
        model = DeformableDetrForObjectDetection(config)
    # The official code (and detr_kit's configs) freeze the stem and layer1 and train layer2-4; transformers 5.x
    # with a timm backbone trains all of it. Freeze the same parameters so both sides do the same work.
    for name, param in model.model.backbone.named_parameters():
        if not any(f"layer{i}" in name for i in (2, 3, 4)):
            param.requires_grad_(False)
    return model.to(device)


def hf_train_step(
    model_key: str, batch: int, size: int, device: torch.device, paper_dropout: bool = True
) -> Callable[[], object]:
    model = hf_model(model_key, device, paper_dropout)
    model.train()
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": 1e-5}], lr=1e-4, weight_decay=1e-4)
    pixel_values = torch.randn(batch, 3, size, size, device=device)
    pixel_mask = torch.ones(batch, size, size, dtype=torch.long, device=device)
    labels = [{"class_labels": labels.to(device), "boxes": boxes.to(device)} for boxes, labels in random_targets(batch, 5, 91)]

    def step():
        loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    return step


def hf_inference(model_key: str, height: int, width: int, device: torch.device) -> Callable[[], object]:
    model = hf_model(model_key, device)
    model.eval()
    pixel_values = torch.randn(1, 3, height, width, device=device)
    pixel_mask = torch.ones(1, height, width, dtype=torch.long, device=device)

    def forward():
        with torch.inference_mode():
            return model(pixel_values=pixel_values, pixel_mask=pixel_mask)

    return forward


# ------------------------------------------------------------------------------------------------ matcher


def matcher_case(impl: str, batch: int, queries: int, targets_per_image: int) -> Callable[[], object]:
    from detr_kit.models.matcher import HungarianMatcher
    from detr_kit.structures import Target

    torch.manual_seed(0)
    logits = torch.randn(batch, queries, 92)
    boxes = torch.rand(batch, queries, 4) * 0.5 + 0.25
    targets = [Target(b, l) for b, l in random_targets(batch, targets_per_image, 91)]
    if impl == "ours":
        matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
        return lambda: matcher(logits, boxes, targets)
    return lambda: batch_wide_match(logits, boxes, targets)


@torch.no_grad()
def batch_wide_match(logits, boxes, targets):
    """The reference formulation: one [B*Q, sum(T)] cost matrix for the whole batch, then split per image."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_convert, generalized_box_iou

    batch, queries = logits.shape[:2]
    prob = logits.flatten(0, 1).softmax(-1)  # [B*Q, K+1]
    out_boxes = boxes.flatten(0, 1)  # [B*Q, 4]
    tgt_ids = torch.cat([t.labels for t in targets])
    tgt_boxes = torch.cat([t.boxes for t in targets])
    cost = (
        5 * torch.cdist(out_boxes, tgt_boxes, p=1)
        - prob[:, tgt_ids]
        - 2 * generalized_box_iou(box_convert(out_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
    )
    cost = cost.view(batch, queries, -1).cpu()
    sizes = [len(t.boxes) for t in targets]
    return [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]


# ------------------------------------------------------------------------------------------------ data


def data_case(num_batches: int, workers: int) -> Callable[[], object]:
    from detr_kit.build import build_datasets
    from detr_kit.data.loaders import build_train_loader
    from detr_kit.config import load_config

    cfg = load_config(
        ROOT / "configs/detr_r50.yaml",
        ["data.root=data/coco128", "data.train_images=images", "data.train_annotations=annotations/instances_train.json",
         "data.val_images=images", "data.val_annotations=annotations/instances_val.json"],
    )
    train, _ = build_datasets(cfg)
    loader = build_train_loader(train, batch_size=2, num_workers=workers, aspect_ratio_grouping=True, seed=0)

    def epoch():
        seen = 0
        for images, targets in loader:
            seen += images.images.shape[0]
            if seen >= 2 * num_batches:
                break
        return seen

    return epoch


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["train", "infer", "matcher", "data"])
    parser.add_argument("model", help="detr | deformable | deformable_two_stage | BxQxT (matcher) | -")
    parser.add_argument(
        "impl",
        help="ours | ours_compiled (model.compile=true) | ours_hf_dropout (transformers' default dropouts) | hf | "
        "hf_default (transformers' default dropouts) | batch_wide",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, nargs="+", default=None)
    parser.add_argument("--set", nargs="*", default=[], help="extra detr_kit overrides a.b=c")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (model cases; the rest run on the CPU)")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast the model cases")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    record: dict = {"case": args.case, "model": args.model, "impl": args.impl, "threads": args.threads, "device": str(device)}
    ours = args.impl in OURS_IMPLS
    overrides = [*args.set, *OURS_IMPLS.get(args.impl, [])]
    if args.case == "train":
        batch, size = (args.size or [2, 512])[:2]
        if ours:
            fn = ours_train_step(args.model, batch, size, overrides, device)
        else:
            fn = hf_train_step(args.model, batch, size, device, paper_dropout=args.impl != "hf_default")
        record.update(batch=batch, size=size)
    elif args.case == "infer":
        height, width = (args.size or [800, 1066])[:2]
        fn = ours_inference(args.model, height, width, overrides, device) if ours else hf_inference(args.model, height, width, device)
        record.update(size=[height, width])
    elif args.case == "matcher":
        b, q, t = (int(x) for x in args.model.split("x"))
        fn = matcher_case(args.impl, b, q, t)
    else:
        num_batches = (args.size or [48])[0]
        fn = data_case(num_batches, workers=2)
        record.update(images=2 * num_batches)
    model_case = args.case in ("train", "infer")
    if args.amp != "off" and model_case:
        plain, dtype = fn, torch.bfloat16 if args.amp == "bf16" else torch.float16

        def fn():
            with torch.autocast(device.type, dtype=dtype):
                return plain()

        record["amp"] = args.amp
    times = timed(fn, args.warmup, args.repeats, device if model_case else torch.device("cpu"))
    record.update(times_s=[round(t, 4) for t in times], median_s=statistics.median(times), peak_rss_mb=round(peak_rss_mb(), 1))
    if model_case and device.type == "cuda":
        record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if args.case == "data":
        record["images_per_s"] = record["images"] / record["median_s"]
    print(json.dumps(record))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
