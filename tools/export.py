"""Export a trained detector to ONNX or TorchScript, then prove the export computes what PyTorch computes.

    python tools/export.py --checkpoint runs/x/best.pth --format onnx --out detector.onnx

The exported graph takes ``images`` [B, 3, H, W] (float, ImageNet-normalised, no padding) and returns
``logits`` [B, Q, K(+1)] and ``boxes`` [B, Q, 4] (cxcywh, 0..1). The batch size is dynamic; height and
width are dynamic when the model traces that way (DETR), else fixed at --image-size (see ``export_verified``).
After export, the file is run (onnxruntime, or torch.jit.load) on the same random images as the PyTorch
model at two input sizes (one when H and W are fixed) and batch sizes 1 and 2; the tool exits 1 unless the
largest absolute differences stay within the tolerances (boxes 1e-4, logits 1e-3), and prints them either way.
An existing --out is never replaced without --overwrite (nor the checkpoint itself); the file is written beside
it under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

BOX_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 1e-3


class ExportableDetector(nn.Module):
    """``images [B, 3, H, W] -> (logits [B, Q, K(+1)], boxes [B, Q, 4])``: a detector without masks or aux outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(images)
        return output.logits, output.boxes


def check_sizes(image_size: Sequence[int]) -> list[tuple[int, int]]:
    """The two (H, W) sizes the export is verified at: the export size and a different aspect ratio."""
    height, width = int(image_size[0]), int(image_size[1])
    if height < 32 or width < 32:
        raise ValueError(f"--image-size {height} {width} is invalid; allowed: both sides >= 32")
    return [(height, width), (height + 32 * max(1, height // 128), max(32, width - 32 * max(1, width // 256)))]


def export_onnx(
    model: nn.Module, path: str | Path, image_size: Sequence[int], opset: int = 17, dynamic_size: bool = True
) -> Path:
    """Trace ``model`` (eval mode) to ONNX with a dynamic batch size and, with ``dynamic_size``, dynamic H and W.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no onnxscript. Deformable attention is
    exported through ``grid_sample``, which needs opset >= 16.
    """
    if opset < 16:
        raise ValueError(f"--opset {opset} is invalid; allowed: >= 16 (grid_sample, used by deformable attention)")
    path = Path(path)
    wrapper = ExportableDetector(model).eval()
    example = torch.rand(1, 3, int(image_size[0]), int(image_size[1]))  # [1, 3, H, W]
    image_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    with warnings.catch_warnings():  # tracer warnings about Python values in shape checks are expected
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits", "boxes"],
            dynamic_axes={"images": image_axes, "logits": {0: "batch"}, "boxes": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def export_torchscript(model: nn.Module, path: str | Path, image_size: Sequence[int]) -> Path:
    """``torch.jit.trace`` the model (eval mode) and save it."""
    path = Path(path)
    wrapper = ExportableDetector(model).eval()
    example = torch.rand(1, 3, int(image_size[0]), int(image_size[1]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    traced.save(str(path))
    return path


def onnx_runner(path: str | Path) -> Callable[[Tensor], tuple[np.ndarray, np.ndarray]]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting on shared CPUs
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, boxes = session.run(["logits", "boxes"], {"images": images.numpy()})
        return logits, boxes

    return run


def torchscript_runner(path: str | Path) -> Callable[[Tensor], tuple[np.ndarray, np.ndarray]]:
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, but still works
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits, boxes = module(images)
        return logits.numpy(), boxes.numpy()

    return run


def verify(
    model: nn.Module,
    run_exported: Callable[[Tensor], tuple[np.ndarray, np.ndarray]],
    sizes: Sequence[tuple[int, int]],
    batch_sizes: Sequence[int] = (1, 2),
    seed: int = 0,
) -> list[dict]:
    """Max abs differences between the exported model and PyTorch on the same random images.

    Returns:
        One dict per (size, batch size): ``{"size", "batch", "logits", "boxes", "ok"}``.
    """
    generator = torch.Generator().manual_seed(seed)
    wrapper = ExportableDetector(model).eval()
    rows = []
    for height, width in sizes:
        for batch in batch_sizes:
            images = torch.randn(batch, 3, height, width, generator=generator)  # [B, 3, H, W] normalised-like
            with torch.no_grad():
                logits, boxes = wrapper(images)
            got_logits, got_boxes = run_exported(images)
            if got_logits.shape != tuple(logits.shape) or got_boxes.shape != tuple(boxes.shape):
                raise RuntimeError(
                    f"exported model gave shapes {got_logits.shape}, {got_boxes.shape} at {batch}x3x{height}x{width}; "
                    f"PyTorch gave {tuple(logits.shape)}, {tuple(boxes.shape)}"
                )
            diff_logits = float(np.abs(got_logits - logits.numpy()).max())
            diff_boxes = float(np.abs(got_boxes - boxes.numpy()).max())
            ok = diff_logits <= LOGIT_TOLERANCE and diff_boxes <= BOX_TOLERANCE
            rows.append({"size": (height, width), "batch": batch, "logits": diff_logits, "boxes": diff_boxes, "ok": ok})
    return rows


def export_and_verify(
    model: nn.Module,
    out: str | Path,
    fmt: Literal["onnx", "torchscript"],
    image_size: Sequence[int],
    opset: int = 17,
    dynamic_size: bool = True,
) -> list[dict]:
    """Export ``model`` to ``out`` in ``fmt`` and verify it with batch sizes 1 and 2 (see ``verify``).

    With ``dynamic_size`` the export is checked at two input sizes (``check_sizes``), else at ``image_size`` only.
    """
    model = model.cpu().eval()
    sizes = check_sizes(image_size) if dynamic_size else [(int(image_size[0]), int(image_size[1]))]
    if fmt == "onnx":
        path = export_onnx(model, out, image_size, opset, dynamic_size=dynamic_size)
        runner = onnx_runner(path)
    elif fmt == "torchscript":
        path = export_torchscript(model, out, image_size)
        runner = torchscript_runner(path)
    else:
        raise ValueError(f"format {fmt!r} is invalid; allowed: 'onnx', 'torchscript'")
    return verify(model, runner, sizes)


def export_verified(
    model: nn.Module,
    out: str | Path,
    fmt: Literal["onnx", "torchscript"],
    image_size: Sequence[int],
    opset: int = 17,
) -> tuple[list[dict], bool]:
    """Export with dynamic H and W when the model traces that way, else with H and W fixed at ``image_size``.

    Tracing freezes every Python number taken from a tensor's shape; a model that computes with such
    numbers (e.g. per-level feature sizes) gives a graph that is only right at the traced size. Such an
    export is correct at ``image_size`` but wrong elsewhere, which the second verification size reveals;
    the model is then exported again for ``image_size`` only (the batch size stays dynamic).

    Returns:
        The verification rows of the final export, and whether its H and W are dynamic.
    """
    rows = export_and_verify(model, out, fmt, image_size, opset, dynamic_size=True)
    if all(r["ok"] for r in rows):
        return rows, True
    traced_size = (int(image_size[0]), int(image_size[1]))
    if not all(r["ok"] for r in rows if r["size"] == traced_size):
        return rows, True  # wrong even at the traced size: a real mismatch, not a frozen size
    return export_and_verify(model, out, fmt, image_size, opset, dynamic_size=False), False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a detr_kit checkpoint (.pth)")
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    parser.add_argument("--out", default=None, help="output file (default: the checkpoint path with .onnx / .pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 16 (default 17)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"),
                        help="example input size used for tracing (default 800 1066)")
    parser.add_argument("--static-size", action="store_true",
                        help="fix H and W at --image-size (default: dynamic when the model traces that way)")
    parser.add_argument("--use-ema", action="store_true", help="export the checkpoint's EMA weights")
    parser.add_argument("--trusted", action="store_true", help="allow pickled code in --checkpoint (trusted files only)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = parser.parse_args(argv)
    if args.format == "onnx" and args.opset < 16:
        parser.error(f"--opset {args.opset} is invalid; allowed: >= 16 (grid_sample, used by deformable attention)")
    if min(args.image_size) < 32:
        parser.error(f"--image-size {args.image_size[0]} {args.image_size[1]} is invalid; allowed: both sides >= 32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from detr_kit.errors import run_tool

    return run_tool(lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    from detr_kit.engine.outputs import atomic_output, check_output_file
    from detr_kit.inference import Detector

    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".onnx" if args.format == "onnx" else ".pt")
    check_output_file(out, "--out", args.overwrite, inputs=[args.checkpoint])  # before the model loads
    detector = Detector.from_checkpoint(args.checkpoint, device="cpu", use_ema=args.use_ema, trusted=args.trusted)
    with atomic_output(out) as tmp:  # verified at the temporary path, then renamed into place
        if args.static_size:
            rows, dynamic = export_and_verify(detector.model, tmp, args.format, args.image_size, args.opset, False), False
        else:
            rows, dynamic = export_verified(detector.model, tmp, args.format, args.image_size, args.opset)
    height, width = args.image_size
    shape = "[B, 3, H, W] (dynamic B, H, W)" if dynamic else f"[B, 3, {height}, {width}] (dynamic B; H, W fixed)"
    print(f"exported {args.format} to {out}; input images {shape}")
    if not dynamic and not args.static_size:
        print(f"warning: this model's graph depends on the input size, so the export only accepts {height}x{width} "
              "images; resize or pad inputs to that size", file=sys.stderr)
    for row in rows:
        status = "ok" if row["ok"] else "FAIL"
        print(f"  {row['batch']}x3x{row['size'][0]}x{row['size'][1]}: max |diff| logits {row['logits']:.3g} "
              f"(tol {LOGIT_TOLERANCE:g}), boxes {row['boxes']:.3g} (tol {BOX_TOLERANCE:g})  {status}")
    if not all(row["ok"] for row in rows):
        print("error: the exported model does not match PyTorch within tolerance — report it with the lines above "
              f"(the file {out} is kept for inspection)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
