"""The exported graph: ``images [B, 3, H, W] -> (logits [B, Q, K(+1)], boxes [B, Q, 4])`` with B, H and W dynamic.

ONNX goes through ``torch.export`` (``torch.onnx.export(dynamo=True)``): the model runs once on symbolic sizes, so
every shape inside the graph is a function of the input's, and a Python decision on a size either holds for every
size or stops the export with the reason. TorchScript goes through ``torch.jit.trace``, which records the sizes it
reads as shape ops; a number the model computed from a size (``int()``, ``float()``, ``torch.tensor``) would be
frozen at the example's value, which only running the file at other sizes reveals (``verify.py``).

Both capture the *plain* model (``model.fast=false``, :func:`build_export_model`): the definition, without the fast
layer's grad-mode and device decisions, which a trace would freeze (an in-place residual recorded without autograd
fails in a file later called with autograd on). ONNX Runtime and the TorchScript interpreter fuse on their own.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

EXAMPLE_BATCH = 2  # torch.export gives sizes 0 and 1 their own graph; an example batch of 2 keeps B symbolic
DEFAULT_OPSET = 18  # the opset torch's ONNX exporter writes natively


class ExportableDetector(nn.Module):
    """``images [B, 3, H, W] -> (logits [B, Q, K(+1)], boxes [B, Q, 4])``: a detector without masks or aux outputs.

    Args:
        model: a detr_kit detector (``model(images) -> DetectionOutput``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(images)
        return output.logits, output.boxes  # [B, Q, K(+1)] logits, [B, Q, 4] cxcywh in 0..1 of the image


class CaptureError(RuntimeError):
    """``torch.export`` could not capture the model as asked; the message is the reason in one line."""


class OnnxExport(NamedTuple):
    """What :func:`export_onnx` wrote: the file, whether H and W are dynamic, the smallest (H, W) the graph was
    captured for (torch.export's range; None when fixed) and the file's opset."""

    path: Path
    dynamic_size: bool
    min_size: tuple[int, int] | None
    opset: int


def build_export_model(cfg, state_dict: Mapping[str, Tensor], num_classes: int) -> nn.Module:
    """The plain model (``model.fast=false``, no aux outputs) of a config, holding ``state_dict``, in eval mode.

    Args:
        cfg: the detector's Config.
        state_dict: its weights (the fast modules keep the plain modules' keys, so any detr_kit model's fit).
        num_classes: K.
    """
    from detr_kit.build import build_model

    plain_cfg = cfg.replace(["model.fast=false", "model.compile=false", "model.aux_loss=false",
                             "model.backbone.weights=null"])
    model = build_model(plain_cfg, num_classes=num_classes)
    model.load_state_dict(state_dict)
    return model.cpu().eval()


def example_images(image_size: Sequence[int]) -> Tensor:
    """[2, 3, H, W] uniform 0..1: the example the exporters run the model on."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(EXAMPLE_BATCH, 3, int(image_size[0]), int(image_size[1]), generator=generator)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence what the exporters print on success: tracer warnings about Python values (the verification checks
    the result), torch.export's guard logs, the ONNX exporter's progress lines and its optimizer's notes."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_AXIS_NAMES = {"0": "B", "1": "C", "2": "H", "3": "W"}


def first_line(err: BaseException, limit: int = 240) -> str:
    """The informative line of an exporter's or runtime's error, shortened to ``limit`` characters.

    That is the first line, except for torch.export's constraint errors (their first detail, with the input's axes
    named B, C, H, W) and the TorchScript interpreter's (its last line, after the traced call stack).
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    details = [line[2:] for line in lines if line.startswith("- ")]
    if details:
        text = details[0].split(". ")[0]
    elif lines and "TorchScript interpreter" in lines[0]:
        text = lines[-1]
    else:
        text = lines[0] if lines else type(err).__name__
    text = re.sub(r"L\['images'\]\.size\(\)\[(\d)\]", lambda m: _AXIS_NAMES.get(m.group(1), m.group(0)), text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def capture(model: nn.Module, image_size: Sequence[int], dynamic_size: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` the model with a dynamic batch and, with ``dynamic_size``, dynamic H and W.

    ``Dim.DYNAMIC`` makes the export fail instead of fixing a size the model's code decides on.

    Raises:
        CaptureError: torch.export failed; the message gives its reason in one line.
    """
    dynamic = torch.export.Dim.DYNAMIC
    axes = {0: dynamic, 2: dynamic, 3: dynamic} if dynamic_size else {0: dynamic}
    wrapper = ExportableDetector(model).eval()
    try:
        with quiet_export(), torch.no_grad():
            return torch.export.export(wrapper, (example_images(image_size),), dynamic_shapes={"images": axes},
                                       strict=False)
    except Exception as err:  # torch.export raises many types (UserError, constraint violations, unsupported ops)
        raise CaptureError(first_line(err)) from err


def _min_size(program: torch.export.ExportedProgram) -> tuple[int, int] | None:
    """The smallest (H, W) torch.export captured the graph for, from the range of the input's symbolic sizes."""
    images = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "images").meta["val"]
    lower = []
    for size in images.shape[2:]:
        if isinstance(size, int):
            return None
        bounds = program.range_constraints.get(size.node.expr)
        lower.append(int(bounds.lower) if bounds is not None else 1)
    return lower[0], lower[1]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: Sequence[int],
    opset: int = DEFAULT_OPSET,
    dynamic_size: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> OnnxExport:
    """Export ``model`` (eval mode) to ONNX through ``torch.export``; input ``images``, outputs ``logits``, ``boxes``.

    Args:
        model: the detector (best the plain one, :func:`build_export_model`).
        path: the file to write.
        image_size: (H, W) of the example the model is run on; with ``dynamic_size`` any other size works too.
        opset: the ONNX opset (>= 17). Opsets below the exporter's own are converted, which may fail: the file's
            opset is returned.
        dynamic_size: dynamic H and W; else only the batch size is dynamic.
        metadata: written into the file's ``metadata_props`` (see ``metadata.py``).

    Raises:
        CaptureError: torch.export could not capture the model with the sizes asked for dynamic, or the captured
            program could not be written as ONNX.
    """
    path = Path(path)
    program = capture(model, image_size, dynamic_size)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    try:
        with quiet_export():
            onnx_program = torch.onnx.export(
                program, (example_images(image_size),), input_names=["images"], output_names=["logits", "boxes"],
                dynamic_shapes={"images": axes}, opset_version=opset, dynamo=True, verbose=False,
                optimize=False,  # onnxscript's optimizer left a dangling node input in DINO graphs; ORT optimises
            )
    except Exception as err:  # an operator without an ONNX translation, a failed opset conversion, ...
        raise CaptureError(f"the ONNX conversion failed: {first_line(err)}") from err
    onnx_program.model.metadata_props.update(dict(metadata or {}))
    onnx_program.save(str(path), external_data=False)
    written_opset = int(onnx_program.model.opset_imports.get("", opset))
    return OnnxExport(path, dynamic_size, _min_size(program) if dynamic_size else None, written_opset)


def export_torchscript(
    model: nn.Module, path: str | Path, image_size: Sequence[int], metadata: Mapping[str, str] | None = None
) -> Path:
    """``torch.jit.trace`` the model (eval mode) on ``image_size`` images and save it.

    Whether the traced graph is right at other sizes is for the verification to show (see the module docstring).

    Args:
        model: the detector (best the plain one, :func:`build_export_model`).
        path: the file to write.
        image_size: (H, W) of the example.
        metadata: saved beside the graph, one extra file per entry (``torch.jit.load(..., _extra_files=...)``).

    Raises:
        CaptureError: the trace failed; the message gives the reason in one line.
    """
    path = Path(path)
    wrapper = ExportableDetector(model).eval()
    try:
        with quiet_export(), torch.no_grad():
            traced = torch.jit.trace(wrapper, (example_images(image_size),), check_trace=False)
    except Exception as err:  # whatever the model raised while being traced
        raise CaptureError(first_line(err)) from err
    with quiet_export():  # torch.jit's deprecation warnings
        torch.jit.save(traced, str(path), _extra_files=dict(metadata or {}))
    return path


__all__ = [
    "CaptureError",
    "DEFAULT_OPSET",
    "ExportableDetector",
    "OnnxExport",
    "build_export_model",
    "capture",
    "example_images",
    "export_onnx",
    "export_torchscript",
    "first_line",
    "quiet_export",
]
