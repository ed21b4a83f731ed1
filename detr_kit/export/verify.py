"""Prove that an exported file computes what the PyTorch model computes, at several sizes and batch sizes.

The file is run (onnxruntime, or ``torch.jit.load``) on the same random images as the PyTorch model at three
input sizes (the export's size and two others of other aspect ratios, odd, so neither a multiple of 32 nor of 64)
and batch sizes 1 and 2. A size passes when the largest absolute differences stay within the tolerances; a file
that fails to run (a crash, wrong output shapes) fails that size with the reason, like a wrong number would.

:func:`export_verified` exports with dynamic sizes first; when that cannot be done, or the file is right at the
export's size only, it exports for that size alone and says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from detr_kit.export.graph import (
    DEFAULT_OPSET,
    CaptureError,
    ExportableDetector,
    export_onnx,
    export_torchscript,
    first_line,
)
from detr_kit.export.onnx_model import load_onnx_session

BOX_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 1e-3
BATCH_SIZES = (1, 2)
MIN_IMAGE_SIDE = 96  # the smallest export size: its smaller verification size, 3/4 of it, keeps 2 rows at stride 64

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Runs an exported file: images [B, 3, H, W] float32 -> (logits, boxes) as arrays."""


@dataclass(frozen=True)
class VerificationRow:
    """One verified (size, batch): the largest absolute differences, or the error that stopped the file."""

    size: tuple[int, int]
    batch: int
    logits: float | None = None
    boxes: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.logits <= LOGIT_TOLERANCE and self.boxes <= BOX_TOLERANCE

    @property
    def shape(self) -> str:
        return f"{self.batch}x3x{self.size[0]}x{self.size[1]}"

    def describe(self) -> str:
        """One line: the input shape, then the differences and their tolerances, or the error."""
        if self.error is not None:
            return f"{self.shape}: the exported file failed: {self.error}  FAIL"
        status = "ok" if self.ok else "FAIL"
        return (f"{self.shape}: max |diff| logits {self.logits:.3g} (tol {LOGIT_TOLERANCE:g}), "
                f"boxes {self.boxes:.3g} (tol {BOX_TOLERANCE:g})  {status}")


@dataclass(frozen=True)
class ExportReport:
    """The outcome of :func:`export_verified`.

    rows:         the verification of the file finally written.
    dynamic_size: whether its H and W are dynamic.
    fixed_reason: why H and W are fixed although dynamic sizes were asked for (one line), else None.
    min_size:     ONNX: the smallest (H, W) torch.export captured the dynamic graph for; else None.
    opset:        ONNX: the file's opset; else None.
    """

    rows: list[VerificationRow]
    dynamic_size: bool
    fixed_reason: str | None = None
    min_size: tuple[int, int] | None = None
    opset: int | None = None

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row.ok for row in self.rows)


def verification_sizes(image_size: Sequence[int]) -> list[tuple[int, int]]:
    """The export size and two sizes of other aspect ratios, odd (neither a multiple of 32 nor of 64).

    Raises:
        ValueError: if a side is below ``MIN_IMAGE_SIDE``.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"image size {height}x{width} is invalid; allowed: both sides >= {MIN_IMAGE_SIDE}")
    return [(height, width), (height * 5 // 4 | 1, width * 3 // 4 | 1), (height * 3 // 4 | 1, width * 5 // 4 | 1)]


def onnx_runner(path: str | Path) -> Runner:
    """Run an ONNX file with onnxruntime; the session is made at the first call, so a file onnxruntime cannot
    load fails the verification like one that fails to run."""
    sessions = []

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not sessions:
            sessions.append(load_onnx_session(path, spinning=False))
        logits, boxes = sessions[0].run(["logits", "boxes"], {"images": images})
        return logits, boxes

    return run


def torchscript_runner(path: str | Path) -> Runner:
    """Run a TorchScript file (``torch.jit.load``, CPU), loaded at the first call."""
    modules = []

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not modules:
            with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, but works
                warnings.simplefilter("ignore", FutureWarning)
                modules.append(torch.jit.load(str(path), map_location="cpu").eval())
        with torch.no_grad():
            logits, boxes = modules[0](torch.from_numpy(images))
        return logits.numpy(), boxes.numpy()

    return run


def verify(
    model: nn.Module,
    run_exported: Runner,
    sizes: Sequence[tuple[int, int]],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seed: int = 0,
) -> list[VerificationRow]:
    """Largest absolute differences between the exported file and ``model`` on the same random images.

    Any failure of the file to run, and outputs of other shapes than the model's, fail that row with the reason.

    Args:
        model: the PyTorch detector (eval mode is set).
        run_exported: runs the exported file.
        sizes: (H, W) sizes.
        batch_sizes: batch sizes at every size.
        seed: of the random images (standard normal, like normalised pixels).

    Returns:
        One VerificationRow per (size, batch size).
    """
    generator = torch.Generator().manual_seed(seed)
    wrapper = ExportableDetector(model).eval()
    rows = []
    for height, width in sizes:
        for batch in batch_sizes:
            images = torch.randn(batch, 3, height, width, generator=generator)  # [B, 3, H, W]
            with torch.no_grad():
                logits, boxes = (t.float().numpy() for t in wrapper(images))
            try:
                got_logits, got_boxes = run_exported(images.numpy())
            except Exception as err:  # any failure to run is a failed verification (ORT, TorchScript: many types)
                reason = first_line(err)
                kind = type(err).__name__
                rows.append(VerificationRow((height, width), batch,
                                            error=reason if reason.startswith(kind) else f"{kind}: {reason}"))
                continue
            if got_logits.shape != logits.shape or got_boxes.shape != boxes.shape:
                error = (f"output shapes {tuple(got_logits.shape)}, {tuple(got_boxes.shape)} where PyTorch gives "
                         f"{tuple(logits.shape)}, {tuple(boxes.shape)}")
                rows.append(VerificationRow((height, width), batch, error=error))
                continue
            diff_logits = float(np.abs(got_logits - logits).max(initial=0.0))
            diff_boxes = float(np.abs(got_boxes - boxes).max(initial=0.0))
            if not (np.isfinite(diff_logits) and np.isfinite(diff_boxes)):
                diff_logits, diff_boxes = float("inf"), float("inf")  # NaN in either output never passes
            rows.append(VerificationRow((height, width), batch, diff_logits, diff_boxes))
    return rows


def export_verified(
    model: nn.Module,
    out: str | Path,
    fmt: Literal["onnx", "torchscript"],
    image_size: Sequence[int],
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, str] | None = None,
    reference: nn.Module | None = None,
    dynamic_size: bool = True,
) -> ExportReport:
    """Export ``model`` to ``out`` with dynamic B, H and W, and verify it; fall back to a fixed H and W with the
    reason when that fails.

    With ``dynamic_size`` the file is verified at the three ``verification_sizes``. If the dynamic export cannot be
    made (ONNX: torch.export stops), or the file is right at ``image_size`` but not at the other sizes (a graph
    that holds the example's sizes), it is exported again for ``image_size`` only (the batch size stays dynamic)
    and verified there. A file wrong at its own size is reported as it is.

    Args:
        model: the model to export (best the plain one, ``build_export_model``).
        out: the file to write.
        fmt: "onnx" or "torchscript".
        image_size: (H, W) the model is exported at (and the first verification size).
        opset: ONNX opset.
        metadata: deployment metadata written into the file (``metadata.py``).
        reference: the PyTorch model the file is compared with; None = ``model``.
        dynamic_size: try dynamic H and W; False exports the fixed size straight away.

    Raises:
        CaptureError: the ONNX export failed even for a fixed size.
        ValueError: for an unknown ``fmt`` or an image size below ``MIN_IMAGE_SIDE``.
    """
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"format {fmt!r} is invalid; allowed: 'onnx', 'torchscript'")
    model, reference = model.cpu().eval(), (model if reference is None else reference).cpu().eval()
    sizes = verification_sizes(image_size)
    reason = None
    if dynamic_size:
        try:
            report = _export_and_verify(model, out, fmt, image_size, opset, metadata, reference, sizes, True)
        except CaptureError as err:
            reason = f"the dynamic export failed: {err}"
        else:
            failed = [row for row in report.rows if not row.ok]
            if not failed or any(row.size == sizes[0] for row in failed):
                return report  # right everywhere, or wrong even at its own size (then no fixed size helps)
            reason = f"the graph is right at {sizes[0][0]}x{sizes[0][1]} only (at {failed[0].shape}: " + (
                failed[0].error or "outputs differ") + ")"
    report = _export_and_verify(model, out, fmt, image_size, opset, metadata, reference, sizes[:1], False)
    return ExportReport(report.rows, False, reason, None, report.opset)


def _export_and_verify(
    model: nn.Module,
    out: str | Path,
    fmt: str,
    image_size: Sequence[int],
    opset: int,
    metadata: Mapping[str, str] | None,
    reference: nn.Module,
    sizes: Sequence[tuple[int, int]],
    dynamic_size: bool,
) -> ExportReport:
    if fmt == "onnx":
        written = export_onnx(model, out, image_size, opset, dynamic_size, metadata)
        rows = verify(reference, onnx_runner(written.path), sizes)
        return ExportReport(rows, dynamic_size, None, written.min_size, written.opset)
    path = export_torchscript(model, out, image_size, metadata)
    return ExportReport(verify(reference, torchscript_runner(path), sizes), dynamic_size)


__all__ = [
    "BATCH_SIZES",
    "BOX_TOLERANCE",
    "ExportReport",
    "LOGIT_TOLERANCE",
    "MIN_IMAGE_SIDE",
    "Runner",
    "VerificationRow",
    "export_verified",
    "onnx_runner",
    "torchscript_runner",
    "verification_sizes",
    "verify",
]
