"""detr_kit: DETR-family object detectors (DETR, Deformable-DETR) that are faithful, fast and hard to break.

Public API:
    load_config, build_model, build_criterion, build_postprocessor, Detector,
    and the structures ImageBatch, Target, DetectionOutput, Detections, LabelMap.
"""

from detr_kit.build import build_criterion, build_model, build_postprocessor
from detr_kit.config import Config, ConfigError, load_config
from detr_kit.structures import DetectionOutput, Detections, ImageBatch, LabelMap, LossOutput, Target

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Detector":  # imported lazily: it pulls in the data pipeline
        from detr_kit.inference import Detector

        return Detector
    raise AttributeError(f"module 'detr_kit' has no attribute {name!r}")


__all__ = [
    "Config",
    "ConfigError",
    "DetectionOutput",
    "Detections",
    "Detector",
    "ImageBatch",
    "LabelMap",
    "LossOutput",
    "Target",
    "build_criterion",
    "build_model",
    "build_postprocessor",
    "load_config",
]
