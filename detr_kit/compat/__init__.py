"""Loaders for official DETR / Deformable-DETR and Hugging Face checkpoints, and fine-tuning from them.

- ``convert_official_checkpoint`` / ``detect_official_variant``: official ``.pth`` -> detr_kit state dict + config.
- ``convert_hf_checkpoint`` / ``detect_hf_variant``: Hugging Face ``Detr*`` / ``DeformableDetr*`` -> the same.
- ``load_pretrained(model, path_or_state_dict)``: load any of the three for fine-tuning (class heads re-initialised
  when the class count differs); the trainer calls it for ``train.init_from``.
"""

from detr_kit.compat.finetune import (
    PretrainedLoadReport,
    checkpoint_state_dict,
    detect_checkpoint_format,
    load_pretrained,
    read_checkpoint,
    read_hf_config,
    reinitialize_class_head,
)
from detr_kit.compat.hf import convert_hf_checkpoint, detect_hf_variant, hf_to_official
from detr_kit.compat.official import (
    COCO_CATEGORY_NAMES,
    coco_label_map,
    convert_official_checkpoint,
    detect_official_variant,
    overrides_to_strings,
    unwrap_checkpoint,
)

__all__ = [
    "COCO_CATEGORY_NAMES",
    "PretrainedLoadReport",
    "checkpoint_state_dict",
    "coco_label_map",
    "convert_hf_checkpoint",
    "convert_official_checkpoint",
    "detect_checkpoint_format",
    "detect_hf_variant",
    "detect_official_variant",
    "hf_to_official",
    "load_pretrained",
    "overrides_to_strings",
    "read_checkpoint",
    "read_hf_config",
    "reinitialize_class_head",
    "unwrap_checkpoint",
]
