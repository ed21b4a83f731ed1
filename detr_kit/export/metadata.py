"""What a deployed detector needs beside its graph, stored in the exported file itself.

ONNX files carry it in ``metadata_props`` (onnxruntime reads them: ``session.get_modelmeta().custom_metadata_map``),
TorchScript files in the extra file ``detr_kit.json``. Every value is JSON:

- ``detr_kit.label_map``: ``{"category_ids": [...], "names": [...]}``; output label ``k`` is category
  ``category_ids[k]`` named ``names[k]``.
- ``detr_kit.preprocess``: ``{"resize_shorter_side", "max_size", "mean", "std", "pixel_scale", "color", "layout"}``:
  the evaluation transform. RGB pixels / 255, shorter side resized to ``resize_shorter_side`` (null: no resize)
  with the longer side at most ``max_size`` (area interpolation when shrinking, bilinear when enlarging), then
  ``(x - mean) / std`` per channel, NCHW float32, no padding.
- ``detr_kit.postprocess``: ``{"focal", "top_k", "score_threshold"}``: sigmoid scores and the top-k (query, class)
  pairs (focal) or softmax without the last, no-object class; ``boxes`` are cxcywh in 0..1 of the input image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from detr_kit.errors import CheckpointError
from detr_kit.structures import LabelMap

LABEL_MAP_KEY = "detr_kit.label_map"
PREPROCESS_KEY = "detr_kit.preprocess"
POSTPROCESS_KEY = "detr_kit.postprocess"
KEYS = (LABEL_MAP_KEY, PREPROCESS_KEY, POSTPROCESS_KEY)


@dataclass(frozen=True)
class DeploymentInfo:
    """The label map and the pre- and post-processing settings of an exported detector."""

    label_map: LabelMap
    eval_size: int | None
    max_size: int | None
    focal: bool
    top_k: int
    score_threshold: float

    def transforms(self) -> Callable[..., dict]:
        """The evaluation transform (``data.transforms.eval_transforms``) these settings describe."""
        from detr_kit.data.transforms import eval_transforms

        return eval_transforms(self.eval_size, self.max_size)

    def postprocessor(self):
        """The ``PostProcess`` these settings describe."""
        from detr_kit.models.postprocess import PostProcess

        return PostProcess(focal=self.focal, top_k=self.top_k, score_threshold=self.score_threshold)

    def to_metadata(self) -> dict[str, str]:
        """The ``detr_kit.*`` entries (JSON strings) of an exported file."""
        from detr_kit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        preprocess = {"resize_shorter_side": self.eval_size, "max_size": self.max_size, "mean": list(IMAGENET_MEAN),
                      "std": list(IMAGENET_STD), "pixel_scale": 255.0, "color": "RGB", "layout": "NCHW"}
        postprocess = {"focal": self.focal, "top_k": self.top_k, "score_threshold": self.score_threshold}
        return {LABEL_MAP_KEY: json.dumps(self.label_map.to_dict()), PREPROCESS_KEY: json.dumps(preprocess),
                POSTPROCESS_KEY: json.dumps(postprocess)}

    @classmethod
    def from_config(cls, cfg, label_map: LabelMap) -> "DeploymentInfo":
        """The settings a ``Detector`` of ``cfg`` uses (``cfg.data`` eval sizes, ``cfg.eval`` post-processing)."""
        return cls(label_map, cfg.data.eval_size, cfg.data.max_size, cfg.model.uses_focal, cfg.eval.top_k,
                   cfg.eval.score_threshold)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str) -> "DeploymentInfo":
        """Read the ``detr_kit.*`` entries of an exported file.

        Args:
            metadata: the file's metadata (ONNX ``metadata_props``).
            source: the file, for messages.

        Raises:
            CheckpointError: entries are missing or malformed.
        """
        missing = [key for key in KEYS if key not in metadata]
        if missing:
            raise CheckpointError(f"{source} holds no detr_kit metadata ({', '.join(missing)} missing)",
                                  "export the model with tools/export.py, which stores the label map and the "
                                  "pre- and post-processing settings in the file")
        try:
            labels = _json(metadata, LABEL_MAP_KEY)
            preprocess = _json(metadata, PREPROCESS_KEY)
            postprocess = _json(metadata, POSTPROCESS_KEY)
            return cls(LabelMap(tuple(int(i) for i in labels["category_ids"]), tuple(labels["names"])),
                       _optional_int(preprocess["resize_shorter_side"]), _optional_int(preprocess["max_size"]),
                       bool(postprocess["focal"]), int(postprocess["top_k"]), float(postprocess["score_threshold"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source} holds malformed detr_kit metadata ({type(err).__name__}: {err})",
                                  "export the model again with tools/export.py") from err


def _json(metadata: Mapping[str, str], key: str) -> Any:
    value = json.loads(metadata[key])
    if not isinstance(value, dict):
        raise ValueError(f"{key} is not a JSON object")
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


__all__ = ["DeploymentInfo", "KEYS", "LABEL_MAP_KEY", "POSTPROCESS_KEY", "PREPROCESS_KEY"]
