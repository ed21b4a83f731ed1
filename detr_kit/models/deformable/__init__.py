"""Deformable-DETR's parts: multi-scale deformable attention, encoder, decoder, transformer and feature levels."""

from detr_kit.models.deformable.attention import MSDeformAttn, sampling_locations
from detr_kit.models.deformable.decoder import DecoderOutput, DeformableDecoder, DeformableDecoderLayer, refine_boxes
from detr_kit.models.deformable.encoder import DeformableEncoder, DeformableEncoderLayer, pixel_grid
from detr_kit.models.deformable.levels import FeatureLevels, backbone_level_count, extra_level_mask
from detr_kit.models.deformable.transformer import DeformableTransformer, TransformerOutput, valid_ratios

__all__ = [
    "DecoderOutput",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DeformableTransformer",
    "FeatureLevels",
    "MSDeformAttn",
    "TransformerOutput",
    "backbone_level_count",
    "extra_level_mask",
    "pixel_grid",
    "refine_boxes",
    "sampling_locations",
    "valid_ratios",
]
