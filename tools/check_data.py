#!/usr/bin/env python
"""The dataset doctor: find what would break or silently spoil training on a COCO, YOLO or Pascal VOC dataset.

    python tools/check_data.py --root my_data                                  # format detected; train and val
    python tools/check_data.py --root VOC2007 data.train_split=trainval data.val_split=test
    python tools/check_data.py --images DIR --annotations JSON                 # one COCO json
    python tools/check_data.py --root my_data --show-aug 8 --out aug/ [--config CONFIG]

With --root (or --config alone: its data.root) it checks the splits training and evaluation read, with the same
data keys (data.dataset, data.train_split, data.val_split, data.classes, the COCO file keys; set them as trailing
a.b=c overrides or in --config). Each problem is reported with its file, line or record and a fix: unreadable
json, yaml or xml, label lines that are not ``class cx cy w h``, class ids outside the names, YOLO coordinates in
pixels, boxes given as corners or with x and y swapped, label files without an image, missing or unreadable images,
size mismatches, boxes out of bounds / zero-area / negative / NaN, unknown or duplicated ids, empty images and
empty splits; then a class histogram, and (--root, no errors) the AP of a constant box per class on the val split,
the baseline a trained model must beat (detr_kit/engine/baseline.py). Exit code 1 when there are errors (warnings
alone exit 0). ``--show-aug N`` writes N augmented training samples with their boxes drawn.

The checks live in detr_kit/data/doctor.py and the format readers (training and evaluation run the fast ones
before they start); they need no torch, so the doctor starts fast (the baseline, last, imports it). A missing --images folder, an unusable --out
or config is one line ``error: <what> — <fix>`` (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_kit.data.doctor import FIXES, SEVERITY, Report, check_dataset, report_lines  # noqa: F401 (the tool's API)


def print_report(report: Report, max_per_kind: int = 50) -> None:
    print("\n".join(report_lines(report, max_per_kind)))


def show_augmentations(image_dir: Path, annotation_file: Path, num: int, out_dir: Path, config: str | None) -> int:
    """Write ``num`` augmented training samples of a COCO json with their boxes drawn; returns the number of errors."""
    from detr_kit.build import build_transforms
    from detr_kit.config import DataConfig, load_config
    from detr_kit.data.coco import CocoDetection
    from detr_kit.errors import DatasetError

    data_cfg = load_config(config).data if config else DataConfig()  # a bad config is the user's error: one line
    try:
        dataset = CocoDetection(image_dir, annotation_file, build_transforms(data_cfg, train=True), train=True,
                                on_bad_image="skip")
    except DatasetError as err:  # its problems are in the report above
        print(f"[ERROR] show-aug: cannot build the training dataset: {err.what}")
        return 1
    return draw_augmentations(dataset, num, out_dir)


def draw_augmentations(dataset, num: int, out_dir: Path) -> int:
    """Write ``num`` augmented samples of a training dataset with their boxes drawn; returns the number of errors."""
    import numpy as np
    from PIL import Image, ImageDraw

    from detr_kit.data.coco import BadImageError
    from detr_kit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, boxes_to_original, seed_transforms
    from detr_kit.engine.outputs import atomic_output

    if len(dataset) == 0:
        print(f"[ERROR] show-aug: {dataset.source} lists no images; nothing to show")
        return 1
    seed_transforms(dataset.transforms, 0)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    for i in range(num):
        try:
            image, target = dataset[i % len(dataset)]
        except BadImageError as err:  # every image is unreadable (each is also listed above)
            print(f"[ERROR] show-aug: {err}")
            return 1
        pixels = image.permute(1, 2, 0).numpy() * std + mean  # [H, W, 3] in 0..1
        canvas = Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for box, label in zip(boxes_to_original(target.boxes, target.size).tolist(), target.labels.tolist()):
            draw.rectangle(box, outline=(255, 0, 0), width=2)
            draw.text((box[0] + 2, box[1] + 1), dataset.label_map.names[label], fill=(255, 255, 0))
        path = out_dir / f"aug_{i:03d}_image{target.image_id}.png"
        with atomic_output(path) as tmp:
            canvas.save(tmp, format="PNG")
        print(f"wrote {path} ({target.size[1]}x{target.size[0]}, {len(target)} boxes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="data keys for --root, e.g. data.val_split=test")
    parser.add_argument("--root", type=Path, default=None,
                        help="the dataset folder (or a YOLO data.yaml): check the splits training reads")
    parser.add_argument("--format", choices=("auto", "coco", "yolo", "voc"), default=None,
                        help="the dataset format for --root (default: data.dataset, normally auto: detected)")
    parser.add_argument("--images", type=Path, default=None, help="image folder the json's file_name entries are relative to")
    parser.add_argument("--annotations", type=Path, default=None, help="COCO instances json")
    parser.add_argument("--show-aug", type=int, default=0, metavar="N", help="write N augmented training samples")
    parser.add_argument("--out", type=Path, default=Path("check_data_aug"),
                        help="folder for --show-aug images (a new, empty or detr_kit-made folder)")
    parser.add_argument("--config", default=None, help="config whose data section describes the dataset and augmentation")
    parser.add_argument("--max-per-kind", type=int, default=50, help="problems printed per kind")
    parser.add_argument("--skip-pixels", action="store_true", help="do not decode the image files (fast, fewer checks)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = parser.parse_intermixed_args(argv)
    one_json = args.images is not None or args.annotations is not None
    if one_json and (args.images is None or args.annotations is None):
        parser.error("--images and --annotations go together (or check a whole dataset with --root)")
    if one_json and (args.root is not None or args.format or args.overrides):
        parser.error("check either one COCO json (--images, --annotations) or a dataset (--root, --format, a.b=c)")
    if not one_json and args.root is None and args.config is None:
        parser.error("name the dataset: --root DIR (or --config CONFIG for its data.root), or --images and --annotations")
    from detr_kit.errors import run_tool

    return run_tool(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    from detr_kit.errors import DatasetError

    if args.root is not None or args.images is None:
        return run_dataset(args)
    if not args.images.is_dir():
        raise DatasetError(f"--images {args.images} is not a folder" if args.images.exists() else
                           f"--images {args.images} does not exist",
                           "pass the folder the json's file_name entries are relative to with --images")
    if not args.annotations.is_file():
        raise DatasetError(f"--annotations {args.annotations} " + ("is a folder" if args.annotations.is_dir() else
                           "does not exist"), "pass the COCO instances json with --annotations")
    claim_aug_folder(args)
    report = check_dataset(args.images, args.annotations, check_pixels=not args.skip_pixels)
    print_report(report, args.max_per_kind)
    errors = report.count("error")
    if args.show_aug > 0:
        errors += show_augmentations(args.images, args.annotations, args.show_aug, args.out, args.config)
    return 1 if errors else 0


def claim_aug_folder(args: argparse.Namespace) -> None:
    """With --show-aug, check the config and claim --out before the checks, which may be long."""
    if args.show_aug > 0:
        from detr_kit.config import load_config
        from detr_kit.engine.outputs import claim_output_folder

        if args.config:
            load_config(args.config)
        claim_output_folder(args.out, "--out", "tools/check_data.py")


def run_dataset(args: argparse.Namespace) -> int:
    """Check the train and val splits of --root (or the config's data.root) as training reads them."""
    import dataclasses

    from detr_kit import build
    from detr_kit.config import Config, load_config
    from detr_kit.data.formats import check_split, split_subject
    from detr_kit.errors import DatasetError

    cfg = load_config(args.config) if args.config else Config()
    data_cfg = cfg.replace(args.overrides, source="the command line").data
    flags = {"root": str(args.root)} if args.root is not None else {}  # taken as given, not parsed as YAML
    data_cfg = dataclasses.replace(data_cfg, **flags, **({"dataset": args.format} if args.format else {}))
    if data_cfg.dataset == "synthetic":
        raise DatasetError("data.dataset=synthetic: detr_kit generates that dataset; there is nothing to check",
                           "pass your dataset's folder with --root")
    data_cfg = dataclasses.replace(data_cfg, dataset=build.resolve_format(data_cfg))
    build.check_classes_key(data_cfg)
    claim_aug_folder(args)
    reports: dict[tuple, tuple[str, Report]] = {}  # a file both splits read is checked once
    for split in ("train", "val"):
        if data_cfg.dataset == "coco":
            images, annotations = build.dataset_files(data_cfg, [split])[split]
            if (images, annotations) not in reports:
                reports[images, annotations] = (f"{split}: {annotations} (images in {images})",
                                                check_dataset(images, annotations, check_pixels=not args.skip_pixels))
            continue
        name = data_cfg.train_split if split == "train" else data_cfg.val_split
        if name not in reports:
            reports[name] = (f"{split}: {split_subject(data_cfg.dataset, data_cfg.root, name)}",
                             check_split(data_cfg.dataset, data_cfg.root, name, data_cfg.classes, not args.skip_pixels))
    errors = 0
    for title, report in reports.values():
        print(f"== {title}")
        print_report(report, args.max_per_kind)
        print()
        errors += report.count("error")
    if not errors:
        print_baseline(data_cfg)
    if args.show_aug > 0:
        try:
            dataset = build.build_dataset(data_cfg, "train", train=True)
        except DatasetError as err:  # its problems are in the report above
            print(f"[ERROR] show-aug: cannot build the training dataset: {err.what}")
            return 1
        errors += draw_augmentations(dataset, args.show_aug, args.out)
    return 1 if errors else 0


def print_baseline(data_cfg) -> None:
    """Print the AP of the constant-box baseline on the val split (``engine/baseline.py``), as training does."""
    from detr_kit import build
    from detr_kit.engine.baseline import baseline_line, constant_box_baseline

    from detr_kit.errors import DatasetError

    try:
        train = build.build_dataset(data_cfg, "train", train=True)
        val = build.build_dataset(data_cfg, "val", train=False, label_map=train.label_map)
    except DatasetError as err:  # a problem the checks above leave to training (e.g. classes the splits disagree on)
        print(f"constant-box baseline: not computed ({err.what})")
        return
    print(baseline_line(constant_box_baseline(train.coco, val.coco, train.label_map)))


if __name__ == "__main__":
    sys.exit(main())
