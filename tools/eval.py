"""Evaluate a checkpoint on the validation split (COCO bbox AP).

    python tools/eval.py configs/quickstart.yaml --checkpoint runs/quickstart/best.pth
    python tools/eval.py configs/deformable_detr.yaml --checkpoint x.pth eval.batch_size=8 --output-dir runs/eval

Prints the 12-line COCO summary and a per-class AP table, and writes metrics.json and detections.json
(COCO results format) into the output folder (default: the checkpoint's folder / eval), which must be new, empty
or made by detr_kit; it is checked before the model is built and evaluated. The model is built
from the config given here (without its pretrained backbone weights: the checkpoint has them all), and only the
validation split is read; the checkpoint's label map (if it has one) decides the classes. With a
checkpoint that holds EMA weights, those are evaluated (pass --no-ema for the raw weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides, e.g. eval.batch_size=4")
    parser.add_argument("--checkpoint", required=True, help="a detr_kit checkpoint (.pth)")
    parser.add_argument("--output-dir", default=None, help="where metrics.json and detections.json go "
                        "(a new, empty or detr_kit-made folder)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-ema", action="store_true", help="evaluate the raw weights even if EMA ones exist")
    parser.add_argument("--trusted", action="store_true", help="allow pickled code in --checkpoint (trusted files only)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from detr_kit.errors import run_tool

    return run_tool(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    from detr_kit import build
    from detr_kit.config import load_config
    from detr_kit.engine import distributed as dist_utils
    from detr_kit.engine.checkpoint import load_checkpoint
    from detr_kit.engine.evaluator import evaluate
    from detr_kit.engine.outputs import check_output_folder, claim_output_folder
    from detr_kit.errors import CheckpointError
    from detr_kit.data.loaders import build_val_loader
    from detr_kit.structures import LabelMap

    cfg = load_config(args.config, args.overrides)
    state = load_checkpoint(args.checkpoint, weights_only=not args.trusted)
    if "model" not in state:
        raise CheckpointError(f"--checkpoint {args.checkpoint} has no 'model' entry",
                              "give a detr_kit checkpoint (tools/convert.py converts official and Hugging Face ones)")
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).resolve().parent / "eval"
    check_output_folder(output_dir, "--output-dir")  # refused now; claimed (made) once the dataset is fine
    label_map = LabelMap.from_dict(state["label_map"]) if state.get("label_map") else None
    info = dist_utils.init_distributed(args.device)
    try:
        val_dataset = build.build_dataset(cfg.data, "val", train=False, label_map=label_map)  # only what it evaluates
        claim_output_folder(output_dir, "--output-dir", "tools/eval.py")  # before the model and the evaluation
        label_map = val_dataset.label_map
        # The checkpoint holds every weight: the backbone's pretrained ones (a download, or a file) are not needed.
        model = build.build_model(cfg.replace(["model.backbone.weights=null"]), num_classes=len(label_map))
        weights = state["model"]
        if state.get("ema") and not args.no_ema:
            weights = state["ema"]["module"]
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:  # the config builds another architecture than the checkpoint holds
            first = str(err).splitlines()[1:2] or [str(err)]
            raise CheckpointError(f"--checkpoint {args.checkpoint} does not fit the model {args.config} builds "
                                  f"({first[0].strip()[:160]})",
                                  "pass the config it was trained with (the config.yaml beside it)") from err
        model.to(info.device)
        loader = build_val_loader(val_dataset, cfg.eval.batch_size, cfg.data.num_workers, info.rank, info.world_size)
        metrics = evaluate(model, build.build_postprocessor(cfg), loader, val_dataset.coco, label_map, info.device,
                           amp=cfg.train.amp, output_dir=output_dir if info.rank == 0 else None,
                           exact_padding=cfg.eval.exact_padding, verbose=info.rank == 0,
                           backend=cfg.eval.backend)
        if info.rank == 0:
            print(json.dumps({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}))
            print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'detections.json'}")
    finally:
        dist_utils.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
