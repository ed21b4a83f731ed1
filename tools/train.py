"""Train a detector from a config file.

    python tools/train.py configs/quickstart.yaml
    python tools/train.py configs/deformable_detr.yaml train.epochs=12 data.batch_size=4 --output-dir runs/x
    python tools/train.py configs/quickstart.yaml --resume                 # continue runs/quickstart/last.pth
    torchrun --nproc_per_node 2 tools/train.py configs/quickstart.yaml     # distributed (gloo on CPU, NCCL on GPU)

The run folder (default runs/<config stem>, or train.output_dir) receives config.yaml, last.pth, best.pth,
metrics.jsonl, eval/, plots/, vis/ and tensorboard/; it must be new, empty or a run folder detr_kit made (a
folder holding other files is refused, see detr_kit/engine/outputs.py). SIGTERM or Ctrl-C finishes the current
step, writes last.pth and exits 0; --resume continues from that step. A bad config, dataset, checkpoint or
output folder is reported as one line ``error: <what> — <fix>`` (exit 1 or 2; --debug shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides, e.g. train.lr=2e-4")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="continue a run: from PATH, or without PATH from <output dir>/last.pth if it exists")
    parser.add_argument("--output-dir", default=None, help="run folder (default: train.output_dir or runs/<config stem>)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = parser.parse_intermixed_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # "--resume a.b=c": the override was taken for the optional PATH
        args.overrides.append(args.resume)
        args.resume = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from detr_kit.errors import run_tool

    return run_tool(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    from detr_kit.config import load_config
    from detr_kit.engine.trainer import default_output_dir, train

    cfg = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(cfg)
    result = train(cfg, output_dir, resume=args.resume, device=args.device)
    if result["stopped"]:
        print(f"training stopped at epoch {result['epoch']}, step {result['step']}; "
              f"resume with: python tools/train.py {args.config} {' '.join(args.overrides)} "
              f"--output-dir {output_dir} --resume".replace("  ", " "))
    else:
        best = result["best_ap"]
        print(f"training finished: {result['epoch']} epochs, {result['step']} steps"
              + (f", best AP {best:.4f}" if best > -1 else "") + f"; outputs in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
