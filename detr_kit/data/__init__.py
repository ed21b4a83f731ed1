"""The data layer: COCO datasets, albumentations transforms, padding collate, samplers, synthetic shapes."""

from detr_kit.data.coco import BAD_IMAGE_ERRORS, BadImageError, CocoDetection, load_coco_json, load_rgb_image
from detr_kit.data.collate import collate
from detr_kit.data.samplers import GroupedBatchSampler, aspect_ratio_groups
from detr_kit.data.synthetic import generate_shapes_dataset
from detr_kit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    boxes_to_original,
    eval_transforms,
    resized_shape,
    train_transforms,
)

__all__ = [
    "BAD_IMAGE_ERRORS",
    "BadImageError",
    "CocoDetection",
    "GroupedBatchSampler",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "aspect_ratio_groups",
    "boxes_to_original",
    "collate",
    "eval_transforms",
    "generate_shapes_dataset",
    "load_coco_json",
    "load_rgb_image",
    "resized_shape",
    "train_transforms",
]
