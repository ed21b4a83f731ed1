"""The data layer: COCO, YOLO and Pascal VOC datasets, albumentations transforms, padding collate, samplers,
synthetic shapes.

The names are imported on first use, so that ``detr_kit.data.doctor`` imports without torch.
"""

from importlib import import_module

_PUBLIC = {
    "BAD_IMAGE_ERRORS": "detr_kit.data.coco",
    "BadImageError": "detr_kit.data.coco",
    "CocoDetection": "detr_kit.data.coco",
    "load_coco_json": "detr_kit.data.coco",
    "load_rgb_image": "detr_kit.data.coco",
    "match_label_map": "detr_kit.data.coco",
    "CocoSplit": "detr_kit.data.formats",
    "detect_format": "detr_kit.data.formats",
    "read_voc_split": "detr_kit.data.voc",
    "read_yolo_split": "detr_kit.data.yolo",
    "collate": "detr_kit.data.collate",
    "GroupedBatchSampler": "detr_kit.data.samplers",
    "aspect_ratio_groups": "detr_kit.data.samplers",
    "generate_shapes_dataset": "detr_kit.data.synthetic",
    "IMAGENET_MEAN": "detr_kit.data.transforms",
    "IMAGENET_STD": "detr_kit.data.transforms",
    "boxes_to_original": "detr_kit.data.transforms",
    "eval_transforms": "detr_kit.data.transforms",
    "resized_shape": "detr_kit.data.transforms",
    "train_transforms": "detr_kit.data.transforms",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'detr_kit.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = sorted(_PUBLIC)
