#!/usr/bin/env python
"""The dataset doctor: find what would break or silently spoil training on a COCO-format dataset.

    python tools/check_data.py --images DIR --annotations JSON [--show-aug N --out DIR] [--config CONFIG]

Reports each problem with its file or record and a fix: unreadable json, missing or unreadable images,
json/file size mismatches, boxes out of bounds / zero-area / negative / NaN, unknown category or image
ids, duplicated ids, empty images; then a class histogram. Exit code 1 when there are errors (warnings
alone exit 0). ``--show-aug N`` writes N augmented training samples with their boxes drawn.

The checks live in detr_kit/data/doctor.py (training and evaluation run its fast json-level checks before
they start); they need only json and PIL (no torch), so the doctor starts fast. A missing --images folder,
an unusable --out or config is one line ``error: <what> — <fix>`` (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_kit.data.doctor import FIXES, SEVERITY, Report, check_dataset, report_lines  # noqa: F401 (the tool's API)


def print_report(report: Report, max_per_kind: int = 50) -> None:
    print("\n".join(report_lines(report, max_per_kind)))


def show_augmentations(image_dir: Path, annotation_file: Path, num: int, out_dir: Path, config: str | None) -> int:
    """Write ``num`` augmented training samples with their boxes drawn; returns the number of errors."""
    import numpy as np
    from PIL import Image, ImageDraw

    from detr_kit.build import build_transforms
    from detr_kit.config import DataConfig, load_config
    from detr_kit.data.coco import BadImageError, CocoDetection
    from detr_kit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, boxes_to_original, seed_transforms
    from detr_kit.engine.outputs import atomic_output
    from detr_kit.errors import DatasetError

    data_cfg = load_config(config).data if config else DataConfig()  # a bad config is the user's error: one line
    try:
        dataset = CocoDetection(image_dir, annotation_file, build_transforms(data_cfg, train=True), train=True,
                                on_bad_image="skip")
    except DatasetError as err:  # its problems are in the report above
        print(f"[ERROR] show-aug: cannot build the training dataset: {err.what}")
        return 1
    if len(dataset) == 0:
        print(f"[ERROR] show-aug: {annotation_file} lists no images; nothing to show")
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
    parser.add_argument("--images", required=True, type=Path, help="image folder the json's file_name entries are relative to")
    parser.add_argument("--annotations", required=True, type=Path, help="COCO instances json")
    parser.add_argument("--show-aug", type=int, default=0, metavar="N", help="write N augmented training samples")
    parser.add_argument("--out", type=Path, default=Path("check_data_aug"),
                        help="folder for --show-aug images (a new, empty or detr_kit-made folder)")
    parser.add_argument("--config", default=None, help="config whose data section defines the augmentation")
    parser.add_argument("--max-per-kind", type=int, default=50, help="problems printed per kind")
    parser.add_argument("--skip-pixels", action="store_true", help="do not open the image files (fast, fewer checks)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = parser.parse_args(argv)
    from detr_kit.errors import run_tool

    return run_tool(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    from detr_kit.errors import DatasetError

    if not args.images.is_dir():
        raise DatasetError(f"--images {args.images} is not a folder" if args.images.exists() else
                           f"--images {args.images} does not exist",
                           "pass the folder the json's file_name entries are relative to with --images")
    if not args.annotations.is_file():
        raise DatasetError(f"--annotations {args.annotations} " + ("is a folder" if args.annotations.is_dir() else
                           "does not exist"), "pass the COCO instances json with --annotations")
    if args.show_aug > 0:  # the config and the output folder are checked before the checks, which may be long
        from detr_kit.config import load_config
        from detr_kit.engine.outputs import claim_output_folder

        if args.config:
            load_config(args.config)
        claim_output_folder(args.out, "--out", "tools/check_data.py")
    report = check_dataset(args.images, args.annotations, check_pixels=not args.skip_pixels)
    print_report(report, args.max_per_kind)
    errors = report.count("error")
    if args.show_aug > 0:
        errors += show_augmentations(args.images, args.annotations, args.show_aug, args.out, args.config)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
