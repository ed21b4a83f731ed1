"""Deformable-DETR's parts: multi-scale deformable attention, encoder, decoder, transformer and feature levels, and
DINO's contrastive denoising queries."""

from detr_kit.models.deformable.attention import MSDeformAttn, sampling_locations
from detr_kit.models.deformable.decoder import (
    DecoderOutput,
    DeformableDecoder,
    DeformableDecoderLayer,
    box_sine_embed,
    refine_boxes,
)
from detr_kit.models.deformable.denoising import ContrastiveDenoising, DenoisingQueries
from detr_kit.models.deformable.encoder import DeformableEncoder, DeformableEncoderLayer, pixel_grid
from detr_kit.models.deformable.levels import FeatureLevels, backbone_level_count, extra_level_mask
from detr_kit.models.deformable.transformer import DeformableTransformer, TransformerOutput, valid_ratios

__all__ = [
    "ContrastiveDenoising",
    "DecoderOutput",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DeformableTransformer",
    "DenoisingQueries",
    "FeatureLevels",
    "MSDeformAttn",
    "TransformerOutput",
    "backbone_level_count",
    "box_sine_embed",
    "extra_level_mask",
    "pixel_grid",
    "refine_boxes",
    "sampling_locations",
    "valid_ratios",
]
