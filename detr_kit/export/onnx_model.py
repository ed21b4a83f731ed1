"""An exported ONNX detector run by onnxruntime, behind the interface of detr_kit's models.

``Detector.from_onnx`` wraps it with the same pre- and post-processing as the PyTorch path, read from the file's
metadata: only onnxruntime and the file are needed, no checkpoint or config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from detr_kit.errors import CheckpointError
from detr_kit.export.metadata import DeploymentInfo
from detr_kit.structures import DetectionOutput


def load_onnx_session(path: str | Path, num_threads: int | None = None, spinning: bool = True):
    """An onnxruntime CPU session of ``path``; ``spinning=False`` keeps idle threads from busy-waiting (for CPUs
    shared with other work, as verification's).

    Raises:
        CheckpointError: onnxruntime is missing, the file is missing, or onnxruntime cannot load it.
    """
    path = Path(path)
    try:
        import onnxruntime
    except ImportError as err:
        raise CheckpointError(f"running {path} needs onnxruntime, which is not installed",
                              "pip install onnxruntime (or pip install 'detr-kit[export]')") from err
    if not path.is_file():
        reason = "it is a folder" if path.is_dir() else "no such file"
        raise CheckpointError(f"cannot read ONNX model {str(path)!r}: {reason}", "give the file tools/export.py wrote")
    options = onnxruntime.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
        raise CheckpointError(f"onnxruntime cannot load {str(path)!r} ({type(err).__name__}: {err})",
                              "give an .onnx file that tools/export.py wrote (export it again if it was cut short)")


class OnnxModel(nn.Module):
    """An ONNX file from ``tools/export.py``, called like a detr_kit model: ``(images, mask) -> DetectionOutput``.

    Every image runs alone on its valid (unpadded) region, which is what ``exact_padding`` computes in PyTorch:
    an image's detections do not depend on the others in its batch.

    Args:
        path: the .onnx file.
        num_threads: onnxruntime's intra-op threads; None = its default (one per physical core).

    Raises:
        CheckpointError: the file cannot be loaded, or it holds no detr_kit metadata.
    """

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = load_onnx_session(self.path, num_threads)
        outputs = [o.name for o in self.session.get_outputs()]
        if [i.name for i in self.session.get_inputs()] != ["images"] or outputs[:2] != ["logits", "boxes"]:
            raise CheckpointError(f"{self.path} is not a detector exported by tools/export.py (inputs "
                                  f"{[i.name for i in self.session.get_inputs()]}, outputs {outputs})",
                                  "export the model with tools/export.py")
        self.info = DeploymentInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        self.num_classes = len(self.info.label_map)

    def forward(self, images: Tensor, mask: Tensor | None = None, exact_padding: bool = True) -> DetectionOutput:
        """Detect objects.

        Args:
            images: [B, 3, H, W] float, normalised, padded to the largest image.
            mask: [B, H, W] bool, True on padding; None means no padding.
            exact_padding: accepted for the models' interface; every image runs alone, which is what it computes.

        Returns:
            DetectionOutput with logits [B, Q, K(+1)] and boxes [B, Q, 4] cxcywh in 0..1 of each unpadded image
            (CPU tensors), no aux or encoder outputs.
        """
        logits, boxes = [], []
        for index, image in enumerate(images.float().cpu()):
            if mask is not None:
                valid = ~mask[index].cpu()  # [H, W]; images sit at the top-left of the padded batch
                height, width = int(valid.any(1).sum()), int(valid.any(0).sum())
                image = image[:, :height, :width]
            image_logits, image_boxes = self.session.run(["logits", "boxes"], {"images": image[None].numpy()})
            logits.append(torch.from_numpy(image_logits))
            boxes.append(torch.from_numpy(image_boxes))
        return DetectionOutput(torch.cat(logits), torch.cat(boxes), (), None)


__all__ = ["OnnxModel", "load_onnx_session"]
