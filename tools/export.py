"""Export a trained detector to ONNX or TorchScript, then prove the export computes what PyTorch computes.

    python tools/export.py --checkpoint runs/x/best.pth --format onnx --out detector.onnx

The exported graph takes ``images`` [B, 3, H, W] (float, ImageNet-normalised, no padding) and returns ``logits``
[B, Q, K(+1)] and ``boxes`` [B, Q, 4] (cxcywh, 0..1 of the image), with B, H and W dynamic. ONNX files carry the
label map and the pre- and post-processing settings in their metadata (``Detector.from_onnx`` and
``tools/infer.py --onnx`` run them with onnxruntime alone); TorchScript files carry them as extra files.

After export, the file is run (onnxruntime, or torch.jit.load) on the same random images as the PyTorch model at
three input sizes (--image-size and two odd sizes of other aspect ratios) and batch sizes 1 and 2; the tool
prints the largest absolute differences and exits 1 unless they stay within the tolerances (boxes 1e-4,
logits 1e-3); a file that fails to run at a size fails there. Where H and W cannot be dynamic, the tool says why
in one line and exports for --image-size only (the batch size stays dynamic).
An existing --out is never replaced without --overwrite (nor the checkpoint itself); the file is written beside
it under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_IMAGE_SIZE = (800, 1066)
MIN_OPSET = 17
MIN_IMAGE_SIDE = 96  # detr_kit.export.verify.MIN_IMAGE_SIDE (not imported here: argparse errors come before torch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a detr_kit checkpoint (.pth)")
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    parser.add_argument("--out", default=None, help="output file (default: the checkpoint path with .onnx / .pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--opset", type=int, default=18, help=f"ONNX opset, >= {MIN_OPSET} (default 18)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="the size the model is exported at and first verified at (default: the checkpoint's "
                             "data.eval_size x 4/3 of it, or 800 1066)")
    parser.add_argument("--static-size", action="store_true", help="fix H and W at --image-size (default: dynamic)")
    parser.add_argument("--use-ema", action="store_true", help="export the checkpoint's EMA weights")
    parser.add_argument("--trusted", action="store_true", help="allow pickled code in --checkpoint (trusted files only)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = parser.parse_args(argv)
    if args.format == "onnx" and args.opset < MIN_OPSET:
        parser.error(f"--opset {args.opset} is invalid; allowed: >= {MIN_OPSET}")
    if args.image_size is not None and min(args.image_size) < MIN_IMAGE_SIDE:
        parser.error(f"--image-size {args.image_size[0]} {args.image_size[1]} is invalid; allowed: both sides "
                     f">= {MIN_IMAGE_SIDE}")
    return args


def default_image_size(eval_size: int | None) -> tuple[int, int]:
    """(eval_size, 4/3 of it): the shape of a typical 4:3 photo after the evaluation resize; 800x1066 without one."""
    if eval_size is None:
        return DEFAULT_IMAGE_SIZE
    side = max(int(eval_size), MIN_IMAGE_SIDE)
    return side, side * 4 // 3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from detr_kit.errors import run_tool

    return run_tool(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    from detr_kit.engine.outputs import atomic_output, check_output_file
    from detr_kit.errors import DetrKitError
    from detr_kit.export import CaptureError, DeploymentInfo, build_export_model, export_verified
    from detr_kit.inference import Detector

    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".onnx" if args.format == "onnx" else ".pt")
    check_output_file(out, "--out", args.overwrite, inputs=[args.checkpoint])  # before the model loads
    if args.format == "onnx":
        _check_onnx_installed()
    detector = Detector.from_checkpoint(args.checkpoint, device="cpu", use_ema=args.use_ema, trusted=args.trusted)
    plain = build_export_model(detector.cfg, detector.model.state_dict(), len(detector.label_map))
    metadata = DeploymentInfo.from_config(detector.cfg, detector.label_map).to_metadata()
    height, width = args.image_size or default_image_size(detector.cfg.data.eval_size)
    how = "torch.export" if args.format == "onnx" else "torch.jit.trace"
    print(f"exporting {args.checkpoint} to {args.format} at {height}x{width} ({how}; a minute or more on a CPU) ...",
          flush=True)
    with atomic_output(out) as tmp:  # verified at the temporary path, then renamed into place
        try:
            report = export_verified(plain, tmp, args.format, (height, width), args.opset, metadata,
                                     reference=detector.model, dynamic_size=not args.static_size)
        except CaptureError as err:
            raise DetrKitError(f"{how} could not export the model at {height}x{width}: {err}",
                               "rerun with --debug for the traceback and report it") from err
    opset = f" (opset {report.opset})" if report.opset is not None else ""
    if report.dynamic_size:
        minimum = f"; captured for H >= {report.min_size[0]}, W >= {report.min_size[1]}" if report.min_size else ""
        shape = f"[B, 3, H, W], dynamic B, H and W{minimum}"
    else:
        shape = f"[B, 3, {height}, {width}], dynamic B"
    print(f"exported {args.format}{opset} to {out}: input images {shape}")
    if report.fixed_reason:
        print(f"warning: H and W are fixed at {height}x{width} because {report.fixed_reason} — resize or pad inputs "
              f"to {height}x{width}", file=sys.stderr)
    print("verification against PyTorch (same random images):")
    for row in report.rows:
        print(f"  {row.describe()}")
    if not report.ok:
        print("error: the exported model does not match PyTorch within tolerance — report it with the lines above "
              f"(the file {out} is kept for inspection)", file=sys.stderr)
        return 1
    return 0


def _check_onnx_installed() -> None:
    """Name the missing package before any long work (onnx, onnxscript: the exporter; onnxruntime: verification)."""
    import importlib.util

    from detr_kit.errors import DetrKitError

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise DetrKitError(f"--format onnx needs {', '.join(missing)}, which is not installed",
                           "pip install 'detr-kit[export]' (onnx, onnxscript, onnxruntime)")


if __name__ == "__main__":
    sys.exit(main())
