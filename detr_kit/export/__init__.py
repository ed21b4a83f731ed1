"""Deployment: export a detector to ONNX or TorchScript with dynamic batch, height and width, prove that the file
computes what PyTorch computes, and run an ONNX file with onnxruntime.

- ``graph.py``: the exported graph (``images -> logits, boxes``) of the plain model, written by torch.export (ONNX)
  or torch.jit.trace (TorchScript).
- ``verify.py``: the file against PyTorch at three sizes and two batch sizes; a fixed-size export, with the reason,
  when a dynamic one cannot be made.
- ``metadata.py``: the label map and the pre- and post-processing settings, stored in the file.
- ``onnx_model.py``: an ONNX file run by onnxruntime behind the models' interface (``Detector.from_onnx``).

onnx, onnxscript and onnxruntime are optional dependencies (``pip install 'detr-kit[export]'``), imported where used.
"""

from detr_kit.export.graph import (
    CaptureError,
    ExportableDetector,
    build_export_model,
    export_onnx,
    export_torchscript,
)
from detr_kit.export.metadata import DeploymentInfo
from detr_kit.export.verify import ExportReport, VerificationRow, export_verified, verification_sizes, verify

__all__ = [
    "CaptureError",
    "DeploymentInfo",
    "ExportReport",
    "ExportableDetector",
    "VerificationRow",
    "build_export_model",
    "export_onnx",
    "export_torchscript",
    "export_verified",
    "verification_sizes",
    "verify",
]
