"""detr_kit: DETR-family object detectors (DETR, Deformable-DETR) that are faithful, fast and hard to break.

Public API:
    load_config, build_model, build_criterion, build_postprocessor, Detector,
    and the structures ImageBatch, Target, DetectionOutput, Detections, LabelMap.

The names are imported on first use, so that torch-free parts (``detr_kit.config``, ``detr_kit.errors``,
``detr_kit.data.doctor``) import without torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "build_criterion": "detr_kit.build",
    "build_model": "detr_kit.build",
    "build_postprocessor": "detr_kit.build",
    "Config": "detr_kit.config",
    "ConfigError": "detr_kit.config",
    "load_config": "detr_kit.config",
    "DetectionOutput": "detr_kit.structures",
    "Detections": "detr_kit.structures",
    "ImageBatch": "detr_kit.structures",
    "LabelMap": "detr_kit.structures",
    "LossOutput": "detr_kit.structures",
    "Target": "detr_kit.structures",
    "Detector": "detr_kit.inference",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'detr_kit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = sorted(_PUBLIC)
