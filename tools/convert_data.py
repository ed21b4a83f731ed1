#!/usr/bin/env python
"""Write COCO jsons from a YOLO or Pascal VOC dataset, for those who want one format; the images stay where they are.

    python tools/convert_data.py --root my_yolo_data --out-dir my_yolo_data_coco
    python tools/convert_data.py --root VOC2007 --out-dir voc2007_coco data.train_split=trainval data.val_split=test

Reads the dataset exactly as training does (the format detected from --root unless --format says it; the splits
data.train_split and data.val_split; VOC's classes from data.classes or the xml files, sorted) and writes
<out-dir>/instances_train.json and <out-dir>/instances_val.json. Each is a new file unless --overwrite, written
atomically; both are checked before anything is read. The jsons keep the dataset's class names and numbers (YOLO:
category id = class index; VOC: 1..K in class order) and VOC's difficult objects as iscrowd 1; their file_name
entries are relative to the images folder the tool prints (YOLO: the dataset root, e.g. images/train/a.jpg; VOC:
JPEGImages/), and the tool prints the data keys that train on the converted copy. A dataset with errors is refused
with the doctor's list of every problem, as training refuses it; a bad argument is one line
``error: <what> — <fix>`` (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="data keys, e.g. data.val_split=test")
    parser.add_argument("--root", required=True, help="the YOLO or VOC dataset folder (or a YOLO data.yaml)")
    parser.add_argument("--format", choices=("auto", "yolo", "voc"), default="auto", help="default: detected")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for instances_train.json and instances_val.json")
    parser.add_argument("--overwrite", action="store_true", help="replace the jsons if they exist")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from detr_kit.errors import run_tool

    return run_tool(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from detr_kit import build
    from detr_kit.config import Config
    from detr_kit.data.formats import FORMAT_NAMES, load_checked_split
    from detr_kit.engine.outputs import atomic_output, check_output_file
    from detr_kit.errors import DatasetError

    data_cfg = Config().replace(args.overrides, source="the command line").data
    data_cfg = dataclasses.replace(data_cfg, root=args.root, dataset=args.format)  # the path as given, not YAML
    outputs = {split: check_output_file(args.out_dir / f"instances_{split}.json", "--out-dir", args.overwrite)
               for split in ("train", "val")}  # before the dataset is read
    data_cfg = dataclasses.replace(data_cfg, dataset=build.resolve_format(data_cfg))
    if data_cfg.dataset not in ("yolo", "voc"):
        raise DatasetError(f"--root {args.root} already is a {FORMAT_NAMES.get(data_cfg.dataset, data_cfg.dataset)} "
                           f"dataset", "train on it as it is (data.dataset=auto), or pass a YOLO or VOC dataset with --root")
    build.check_classes_key(data_cfg)
    splits = {split: data_cfg.train_split if split == "train" else data_cfg.val_split for split in outputs}
    doctor = build.root_doctor_command(data_cfg)
    sources = {split: load_checked_split(data_cfg.dataset, data_cfg.root, name, data_cfg.classes, doctor,
                                         skip_unreadable=False) for split, name in splits.items()}
    for split, source in sources.items():
        with atomic_output(outputs[split]) as tmp:
            tmp.write_text(json.dumps(source.data))
        data = source.data
        print(f"wrote {outputs[split]} ({splits[split]} split: {len(data['images'])} images, "
              f"{len(data['annotations'])} annotations, {len(data['categories'])} categories)")
    image_dir = sources["train"].image_dir
    keys = ["data.dataset=coco", f"data.root={image_dir}", "data.train_images=.", "data.val_images=.",
            f"data.train_annotations={outputs['train'].absolute()}", f"data.val_annotations={outputs['val'].absolute()}"]
    print(f"images stay in {image_dir} (file_name entries are relative to it); train on the COCO copy with:")
    print("  python tools/train.py CONFIG " + " ".join(shlex.quote(key) for key in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
