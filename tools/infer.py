"""Detect objects in images with a trained checkpoint; write annotated images and a COCO-results json.

    python tools/infer.py --checkpoint runs/x/best.pth photos/ extra/*.jpg --out predictions/
    python tools/infer.py --onnx detector.onnx photos/ --out predictions/     # onnxruntime, no checkpoint

``--onnx`` runs a file written by ``tools/export.py --format onnx`` with onnxruntime on the CPU, with the same
pre- and post-processing, label map and outputs as the checkpoint it was exported from (all read from the file).

Inputs are files, folders (their images, not recursive) or glob patterns. For every readable input an
annotated copy is written to --out, and all detections go to --out/detections.json in COCO results format
(xywh boxes in original pixels, original category ids, plus a ``file_name`` field). ``image_id`` is the file
name's stem when it is a number (COCO's 000000000009.jpg -> 9), else a running index above the numeric ones.
With ``--annotations your.json`` the ids (and category ids) are that json's, each input matched by file name, so
that pycocotools scores detections.json against it directly; an input the json does not list is an error.
When no detection passes --threshold, it says so and gives the highest score seen.

Unreadable inputs are reported by name and skipped; the exit code is 0 with a warning count unless nothing
could be processed (exit 1). --out must be a new, empty or detr_kit-made folder, and existing outputs in it are
never overwritten without --overwrite (exit 2); an input is never overwritten. A bad checkpoint, ONNX file or
output folder is one line ``error: <what> — <fix>`` (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a detr_kit checkpoint (.pth)")
    model.add_argument("--onnx", help="an ONNX file written by tools/export.py (run with onnxruntime on the CPU)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score kept (default 0.5)")
    parser.add_argument("--annotations", default=None, help="a COCO json listing the inputs: detections.json takes "
                        "its image ids (matched by file name) and category ids")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    parser.add_argument("--trusted", action="store_true", help="allow pickled code in --checkpoint (trusted files only)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold} is invalid; allowed: a score in [0, 1]")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} is invalid; allowed: an integer >= 1")
    if args.onnx and args.device not in (None, "cpu"):
        parser.error(f"--device {args.device} is invalid with --onnx; allowed: cpu (onnxruntime's CPU provider)")
    return args


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files from files, folders and globs, in order and without repeats; plus warnings for empty inputs."""
    files: list[Path] = []
    warnings: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                warnings.append(f"folder {item!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file())
            if not found:
                warnings.append(f"pattern {item!r} matches no file")
            files.extend(found)
        else:
            warnings.append(f"input {item!r} does not exist")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, warnings


def output_names(files: list[Path]) -> list[str]:
    """One annotated-image file name per input: ``<stem>.jpg``, with ``_<n>`` added when two inputs share a stem."""
    names: list[str] = []
    used: set[str] = set()
    for path in files:
        suffix = path.suffix.lower() if path.suffix.lower() in {".jpg", ".jpeg", ".png"} else ".jpg"
        name, n = f"{path.stem}{suffix}", 1
        while name in used:
            name, n = f"{path.stem}_{n}{suffix}", n + 1
        used.add(name)
        names.append(name)
    return names


def image_ids(files: list[Path]) -> list[int]:
    """The file stem when it is a number (first use only), else a running index above every numeric stem."""
    numeric = {int(p.stem) for p in files if p.stem.isdigit()}
    next_id = max(numeric, default=0) + 1
    ids: list[int] = []
    used: set[int] = set()
    for path in files:
        if path.stem.isdigit() and int(path.stem) not in used:
            ids.append(int(path.stem))
        else:
            ids.append(next_id)
            next_id += 1
        used.add(ids[-1])
    return ids


def annotation_image_ids(annotations: str, files: list[Path]) -> tuple[list[int], list[dict]]:
    """The image id of every input in a COCO json (matched by file name), and the json's categories.

    Raises:
        DatasetError: the json is unusable, lists a file name twice, or lacks an input (naming them).
    """
    from detr_kit.data.coco import load_coco_json
    from detr_kit.errors import DatasetError

    data = load_coco_json(annotations)
    ids: dict[str, list[int]] = {}
    for image in data["images"]:
        ids.setdefault(Path(str(image["file_name"])).name, []).append(int(image["id"]))
    twice = sorted({p.name for p in files if len(ids.get(p.name, [])) > 1})
    missing = [p.name for p in files if p.name not in ids]
    if twice or missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problem = f"lists {', '.join(twice[:5])} more than once" if twice else \
            f"has no image named {', '.join(missing[:5])}{more}"
        raise DatasetError(f"--annotations {annotations} {problem}",
                           "give only images that json lists once (by file name), or leave --annotations out")
    return [ids[p.name][0] for p in files], data["categories"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from detr_kit.errors import run_tool

    return run_tool(lambda: run(args), debug=args.debug)


def check_outputs(out: Path, names: list[str], inputs: list[Path], overwrite: bool) -> None:
    """Refuse a --out folder detr_kit may not write into, and outputs that would replace an input (always) or an
    earlier output (unless ``overwrite``). Creates nothing.

    Raises:
        OutputError: naming the folder or files and the flag to change.
    """
    from detr_kit.engine.outputs import check_output_folder
    from detr_kit.errors import OutputError

    targets = [out / n for n in names] + [out / "detections.json"]
    clashes = sorted({str(t) for t in targets if t.resolve() in set(inputs)})
    if clashes:
        raise OutputError(f"--out {out} would overwrite the input(s) {', '.join(clashes[:5])}",
                          "choose another --out than the folder the images come from")
    check_output_folder(out, "--out")
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise OutputError(f"refusing to overwrite existing output(s) {shown}",
                          "pass --overwrite to replace them, or choose another --out")


def run(args: argparse.Namespace) -> int:
    from detr_kit.engine.outputs import atomic_output, claim_output_folder
    from detr_kit.errors import DetrKitError

    files, warnings = expand_inputs(args.inputs)
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)
    if not files:
        raise DetrKitError(f"no image files found in {', '.join(args.inputs)}", "give image files, folders or glob patterns")

    out = Path(args.out)
    names = output_names(files)
    check_outputs(out, names, files, args.overwrite)
    ids, categories = annotation_image_ids(args.annotations, files) if args.annotations else (image_ids(files), None)

    from tqdm import tqdm

    from detr_kit.inference import Detector, ImageReadError, read_image
    from detr_kit.visualize import draw_detections

    # Every detection comes back (threshold 0) so that the highest score is known when none passes --threshold.
    if args.onnx:
        detector = Detector.from_onnx(args.onnx, threshold=0.0, batch_size=args.batch_size)
    else:
        detector = Detector.from_checkpoint(args.checkpoint, device=args.device, threshold=0.0,
                                            batch_size=args.batch_size, trusted=args.trusted)
    category_ids = detector.label_map.category_ids
    if categories is not None:  # the json's ids for the checkpoint's classes, matched by id and name, else by name
        from detr_kit.data.coco import match_label_map

        used = {int(c["id"]) for c in categories}
        json_labels = match_label_map(detector.label_map, categories, used, f"--annotations {args.annotations}")
        category_ids = json_labels.category_ids
    claim_output_folder(out, "--out", "tools/infer.py")
    results: list[dict] = []
    processed = 0
    highest = -1.0  # the best score of any detection, kept or not
    pending: list[tuple[int, Path, str, object]] = []

    def flush() -> None:
        nonlocal processed, highest
        if not pending:
            return
        detections = detector.detect_arrays([item[3] for item in pending])
        for (image_id, path, name, array), det in zip(pending, detections):
            highest = max([highest, *det.scores.tolist()])
            det = det.filter(det.scores >= args.threshold)
            with atomic_output(out / name) as tmp:
                draw_detections(array, det).save(tmp, format="PNG" if name.endswith(".png") else "JPEG", quality=95)
            for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
                x1, y1, x2, y2 = box
                results.append({"image_id": image_id, "file_name": path.name, "category_id": int(category_ids[label]),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
            processed += 1
        pending.clear()

    for image_id, path, name in tqdm(list(zip(ids, files, names)), desc="infer", unit="img", file=sys.stderr):
        try:
            array = read_image(path)
        except ImageReadError as err:
            warnings.append(str(err))
            tqdm.write(f"warning: skipping {str(path)!r}: {err}", file=sys.stderr)
            continue
        pending.append((image_id, path, name, array))
        if len(pending) == args.batch_size:
            flush()
    flush()

    with atomic_output(out / "detections.json") as tmp:
        tmp.write_text(json.dumps(results))
    print(f"{processed} image(s) processed, {len(results)} detection(s) written to {out}; {len(warnings)} warning(s)")
    if processed and not results:
        best = f"the highest score was {highest:.3f}" if highest >= 0 else "the model returned no detection at all"
        print(f"no detection scored --threshold {args.threshold} or more; {best} (lower --threshold to see more, "
              "or train longer: compare the run's AP with its constant-box baseline in metrics.jsonl)")
    if processed == 0:
        raise DetrKitError("no input could be processed (each is named above)", "give readable image files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
