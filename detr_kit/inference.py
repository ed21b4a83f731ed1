"""Detector: a trained model, its config and label map, ready to turn images into named detections.

    detector = Detector.from_checkpoint("runs/x/best.pth", threshold=0.5)
    dets = detector("photo.jpg")                       # one Detections
    dets = detector(["a.jpg", pil_image, array])       # a list of them
    detector = Detector.from_onnx("detector.onnx")     # the same detections from an exported file (onnxruntime)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from detr_kit.config import Config, config_from_dict
from detr_kit.data.coco import BAD_IMAGE_ERRORS, load_rgb_image, pil_to_rgb_array
from detr_kit.data.collate import collate
from detr_kit.engine.evaluator import evaluation_mode
from detr_kit.structures import Detections, LabelMap, Target
from detr_kit.visualize import to_pil_image

ImageInput = Union[str, Path, Image.Image, np.ndarray, Tensor]


class ImageReadError(ValueError):
    """An input could not be read as an image; the message names it."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return repr(str(source))
    if isinstance(source, (np.ndarray, Tensor)):
        return f"{type(source).__name__} of shape {tuple(source.shape)}"
    return type(source).__name__


def read_image(source: ImageInput) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] from a path, a PIL image, an HWC uint8 array or a CHW tensor.

    Files are read as the dataset reads them (upright by EXIF orientation, any mode converted to 8-bit RGB).

    CHW tensors may be uint8 or float in 0..1 (not normalised); float values become ``round(255 * x)``.

    Raises:
        ImageReadError: for a missing or unreadable file, or an array/tensor of the wrong shape, dtype or range.
    """
    try:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                reason = "it is a folder, not an image file" if path.is_dir() else "no such file"
                raise ImageReadError(f"cannot read image {str(path)!r}: {reason}")
            try:
                return load_rgb_image(path)  # the dataset's reader: EXIF orientation, 16-bit, CMYK, ...
            except BAD_IMAGE_ERRORS as err:
                reason = "the file is empty (0 bytes)" if path.stat().st_size == 0 else str(err)
                raise ImageReadError(
                    f"cannot read image {str(path)!r}: {reason}; re-encode or replace the file (corrupt or truncated?)"
                ) from err
        if isinstance(source, Image.Image):  # as the dataset converts it: a 16-bit image is scaled, not clipped
            try:
                return pil_to_rgb_array(source)  # decodes a lazily opened file now
            except BAD_IMAGE_ERRORS as err:
                name = getattr(source, "filename", "") or "PIL image"
                raise ImageReadError(f"cannot read image {name!r}: {err}; re-encode or replace the file") from err
        if isinstance(source, Tensor) and source.is_floating_point() and source.numel():
            low, high = float(source.min()), float(source.max())
            if low < 0.0 or high > 1.0:
                raise ImageReadError(
                    f"float image tensors must hold values in 0..1 (not ImageNet-normalised), got {low:.3g}..{high:.3g}"
                )
        if isinstance(source, (np.ndarray, Tensor)) and min(source.shape[-2:] if isinstance(source, Tensor) else source.shape[:2]) < 1:
            raise ImageReadError(f"image {_describe(source)} is empty")
        return np.asarray(to_pil_image(source))
    except ImageReadError:
        raise
    except (TypeError, ValueError) as err:
        raise ImageReadError(f"cannot use {_describe(source)} as an image: {err}") from err


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Detector:
    """Run a detector on images of any size and format; returns detections in each image's pixels.

    Args:
        model: a detector, ``model(images [B,3,H,W], mask [B,H,W]) -> DetectionOutput``.
        cfg: its Config; ``cfg.data`` defines the evaluation preprocessing and ``cfg.eval`` the post-processing.
            May be None when ``transforms`` and ``postprocessor`` are given (an exported model, ``from_onnx``).
        label_map: label -> category id and name.
        device: where to run; None = CUDA when available, else CPU.
        threshold: detections scoring below it are dropped.
        amp: autocast (bf16 where supported, else fp16) on CUDA; ignored on CPU.
        batch_size: images per forward pass when a list is given.
        transforms: preprocessing ``(image=HWC uint8, bboxes, labels, iscrowd) -> {"image": [3, H', W'] float}``;
            None = ``build_transforms(cfg.data, train=False)``, the evaluation pipeline.
        postprocessor: ``(DetectionOutput, orig_sizes [B, 2]) -> list[Detections]``; None =
            ``build_postprocessor(cfg)``.

    Each call runs the model in eval mode with ``exact_padding``, so an image gives the same detections alone or
    batched with larger images, and then gives every submodule its train/eval mode back: a Detector can wrap a model
    that is still being trained. The model is moved to ``device``.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config | None,
        label_map: LabelMap,
        device: torch.device | str | None = None,
        threshold: float = 0.5,
        amp: bool = False,
        batch_size: int = 4,
        transforms: Callable[..., dict] | None = None,
        postprocessor: Callable[..., list[Detections]] | None = None,
    ) -> None:
        from detr_kit.build import build_postprocessor, build_transforms

        if cfg is None and (transforms is None or postprocessor is None):
            raise TypeError("Detector: without a cfg, give both transforms and postprocessor")
        if cfg is not None and not isinstance(cfg, Config):
            raise TypeError(f"Detector: cfg must be a detr_kit Config, got {type(cfg).__name__}")
        if not isinstance(label_map, LabelMap):
            raise TypeError(f"Detector: label_map must be a LabelMap, got {type(label_map).__name__}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"Detector: threshold={threshold!r} is invalid; allowed: a score in [0, 1]")
        if batch_size < 1:
            raise ValueError(f"Detector: batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
        num_classes = getattr(model, "num_classes", len(label_map))
        if num_classes != len(label_map):
            raise ValueError(f"Detector: the model has {num_classes} classes but the label map {len(label_map)}")
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device)
        self.cfg = cfg
        self.label_map = label_map
        self.threshold = float(threshold)
        self.amp = bool(amp)
        self.batch_size = int(batch_size)
        self.transforms = transforms if transforms is not None else build_transforms(cfg.data, train=False)
        self.postprocessor = postprocessor if postprocessor is not None else build_postprocessor(cfg)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        threshold: float = 0.5,
        amp: bool = False,
        use_ema: bool = False,
        batch_size: int = 4,
        trusted: bool = False,
    ) -> "Detector":
        """Restore model, config and label map from a detr_kit checkpoint (see docs/architecture.md).

        Args:
            path: a ``.pth`` written by the trainer (``model``, ``config``, ``label_map`` entries).
            device: where to run; None = CUDA when available, else CPU.
            threshold: detections scoring below it are dropped.
            amp: autocast on CUDA.
            use_ema: load the EMA weights (``ema.module``) instead of ``model``.
            batch_size: images per forward pass when a list is given.
            trusted: allow pickled code in the file (``torch.load(weights_only=False)``); trusted files only.

        Raises:
            CheckpointError: for a missing or corrupt file, or one that lacks an entry the detector needs.
            PickledCodeError: the file holds pickled code and ``trusted`` is False.
        """
        from detr_kit.build import build_model
        from detr_kit.engine.checkpoint import load_checkpoint
        from detr_kit.errors import CheckpointError

        state = load_checkpoint(path, map_location="cpu", weights_only=not trusted)
        missing = [key for key in ("model", "config", "label_map") if key not in state]
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}",
                                  "give a checkpoint that tools/train.py or tools/convert.py wrote")
        # The checkpoint holds every weight: never fetch pretrained backbone weights, never compile.
        cfg = config_from_dict(state["config"], source=str(path)).replace(
            ["model.backbone.weights=null", "model.compile=false"], source=str(path)
        )
        label_map = LabelMap.from_dict(state["label_map"])
        model = build_model(cfg, num_classes=len(label_map))
        if use_ema:
            if not state.get("ema"):
                raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA weights (it was trained without train.ema)",
                                      "use its raw weights (leave EMA off)")
            weights = state["ema"]["module"]
        else:
            weights = state["model"]
        model.load_state_dict(weights)
        model.eval()  # the detector's own model: used for inference only
        return cls(model, cfg, label_map, device=device, threshold=threshold, amp=amp, batch_size=batch_size)

    @classmethod
    def from_onnx(
        cls, path: str | Path, threshold: float = 0.5, batch_size: int = 4, num_threads: int | None = None
    ) -> "Detector":
        """Run an ONNX file written by ``tools/export.py`` with onnxruntime (CPU).

        The label map and the pre- and post-processing settings come from the file's metadata, so the detections
        are those of ``from_checkpoint`` on the checkpoint it was exported from (within the export's verified
        tolerances); only onnxruntime and the file are needed. Each image runs alone on its own size.

        Args:
            path: the .onnx file.
            threshold: detections scoring below it are dropped.
            batch_size: images preprocessed and post-processed together when a list is given.
            num_threads: onnxruntime's intra-op threads; None = its default.

        Raises:
            CheckpointError: onnxruntime is missing, or the file is missing, unreadable or holds no detr_kit metadata.
        """
        from detr_kit.export.onnx_model import OnnxModel

        model = OnnxModel(path, num_threads=num_threads)
        info = model.info
        return cls(model, None, info.label_map, device="cpu", threshold=threshold, batch_size=batch_size,
                   transforms=info.transforms(), postprocessor=info.postprocessor())

    def preprocess(self, image: np.ndarray) -> Tensor:
        """The evaluation transform of one RGB uint8 image [H, W, 3] -> [3, H', W'] float, normalised."""
        out = self.transforms(
            image=image,
            bboxes=np.zeros((0, 4), dtype=np.float32),
            labels=np.zeros((0,), dtype=np.int64),
            iscrowd=np.zeros((0,), dtype=np.int64),
        )
        return torch.as_tensor(out["image"], dtype=torch.float32)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Detections | list[Detections]:
        """Detect objects in one image or a list of them.

        Args:
            images: a path, PIL image, HWC uint8 array or CHW tensor (uint8 or float 0..1), or a list of them.

        Returns:
            One Detections per image (a single Detections for a single, non-list input): boxes [N, 4] xyxy in
            that image's pixels, scores [N], labels [N] and class names, best first.

        Raises:
            ImageReadError: naming the input that could not be read.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        arrays = [read_image(item) for item in items]
        results: list[Detections] = []
        for start in range(0, len(arrays), self.batch_size):
            results.extend(self.detect_arrays(arrays[start : start + self.batch_size]))
        return results[0] if single else results

    @torch.inference_mode()
    def detect_arrays(self, arrays: Sequence[np.ndarray]) -> list[Detections]:
        """Detect objects in RGB uint8 images [H, W, 3], all in one padded batch."""
        if not arrays:
            return []
        tensors = [self.preprocess(a) for a in arrays]
        batch, _ = collate([(t, Target(torch.zeros(0, 4), torch.zeros(0))) for t in tensors])  # the evaluation padding
        images, mask = batch.images.to(self.device), batch.mask.to(self.device)  # [B, 3, H, W], [B, H, W]
        orig_sizes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64, device=self.device)  # [B, 2]
        use_amp = self.amp and self.device.type == "cuda"
        dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        with evaluation_mode(self.model):
            with torch.autocast("cuda", dtype=dtype) if use_amp else contextlib.nullcontext():
                output = self.model(images, mask, exact_padding=True)
        output = type(output)(output.logits.float(), output.boxes.float(), (), None)
        detections = self.postprocessor(output, orig_sizes)
        names = self.label_map.names
        results = []
        for det in detections:
            keep = det.scores >= self.threshold
            det = Detections(det.boxes[keep].cpu(), det.scores[keep].cpu(), det.labels[keep].cpu())
            order = det.scores.argsort(descending=True)
            det = Detections(det.boxes[order], det.scores[order], det.labels[order])
            det.names = [names[int(k)] for k in det.labels.tolist()]
            results.append(det)
        return results


__all__ = ["Detector", "ImageReadError", "default_device", "read_image"]
