"""A config's defaults are the constructors' defaults: a model built in a notebook from the modules' own defaults is
the model the YAML's defaults describe (no flag whose default differs between the two)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from detr_kit.config import BackboneConfig, DeformableConfig, EvalConfig, LossConfig, ModelConfig, ViTConfig
from detr_kit.fast import optimize
from detr_kit.fast.layers import FastDeformableEncoderLayer
from detr_kit.models.backbone.resnet import ResNetBackbone
from detr_kit.models.backbone.vit import ViTBackbone
from detr_kit.models.criterion import SetCriterion
from detr_kit.models.deformable import DeformableEncoder, DeformableTransformer, MSDeformAttn
from detr_kit.models.detr import DETR
from detr_kit.models.matcher import HungarianMatcher
from detr_kit.models.postprocess import PostProcess
from detr_kit.models.transformer import Transformer

# (config class, field) -> (constructor, parameter)
PAIRS = [
    (ModelConfig, "hidden_dim", Transformer, "hidden_dim"),
    (ModelConfig, "num_heads", Transformer, "num_heads"),
    (ModelConfig, "num_encoder_layers", Transformer, "num_encoder_layers"),
    (ModelConfig, "num_decoder_layers", Transformer, "num_decoder_layers"),
    (ModelConfig, "dim_feedforward", Transformer, "dim_feedforward"),
    (ModelConfig, "dropout", Transformer, "dropout"),
    (ModelConfig, "attention_dropout", Transformer, "attention_dropout"),
    (ModelConfig, "activation_dropout", Transformer, "activation_dropout"),
    (ModelConfig, "aux_loss", DETR, "aux_loss"),
    (BackboneConfig, "norm", ResNetBackbone, "norm"),
    (BackboneConfig, "trainable_stages", ResNetBackbone, "trainable_stages"),
    (BackboneConfig, "dilation", ResNetBackbone, "dilation"),
    (BackboneConfig, "weights", ResNetBackbone, "weights"),
    (ViTConfig, "patch_size", ViTBackbone, "patch_size"),
    (ViTConfig, "drop_path", ViTBackbone, "drop_path"),
    (ViTConfig, "window_size", ViTBackbone, "window_size"),
    (ViTConfig, "global_blocks", ViTBackbone, "global_blocks"),
    (ViTConfig, "use_cls_token", ViTBackbone, "use_cls_token"),
    (ViTConfig, "pretrain_image_size", ViTBackbone, "pretrain_image_size"),
    (DeformableConfig, "num_feature_levels", MSDeformAttn, "num_levels"),
    (DeformableConfig, "enc_points", MSDeformAttn, "num_points"),
    (DeformableConfig, "dec_points", MSDeformAttn, "num_points"),
    (DeformableConfig, "two_stage", DeformableTransformer, "two_stage"),
    (DeformableConfig, "num_proposals", DeformableTransformer, "num_proposals"),
    (DeformableConfig, "activation_checkpointing", DeformableEncoder, "activation_checkpointing"),
    (DeformableConfig, "ffn_checkpointing", FastDeformableEncoderLayer, "checkpoint_feed_forward"),
    (DeformableConfig, "ffn_checkpointing", optimize, "ffn_checkpointing"),
    (LossConfig, "class_weight", SetCriterion, "class_weight"),
    (LossConfig, "bbox_weight", SetCriterion, "bbox_weight"),
    (LossConfig, "giou_weight", SetCriterion, "giou_weight"),
    (LossConfig, "eos_coef", SetCriterion, "eos_coef"),
    (LossConfig, "focal_alpha", SetCriterion, "focal_alpha"),
    (LossConfig, "focal_gamma", SetCriterion, "focal_gamma"),
    (LossConfig, "cost_class", HungarianMatcher, "cost_class"),
    (LossConfig, "cost_bbox", HungarianMatcher, "cost_bbox"),
    (LossConfig, "cost_giou", HungarianMatcher, "cost_giou"),
    (LossConfig, "focal_alpha", HungarianMatcher, "focal_alpha"),
    (LossConfig, "focal_gamma", HungarianMatcher, "focal_gamma"),
    (EvalConfig, "top_k", PostProcess, "top_k"),
    (EvalConfig, "score_threshold", PostProcess, "score_threshold"),
]


def _field_default(cls: type, name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


@pytest.mark.parametrize("cls, field, constructor, param", PAIRS,
                         ids=[f"{c.__name__}.{f}={k.__name__}.{p}" for c, f, k, p in PAIRS])
def test_config_default_equals_the_constructor_default(cls, field, constructor, param):
    signature = inspect.signature(constructor)
    assert param in signature.parameters, f"{constructor.__name__} has no parameter {param}"
    default = signature.parameters[param].default
    assert default is not inspect.Parameter.empty, f"{constructor.__name__}.{param} has no default"
    expected = tuple(default) if isinstance(default, list) else default
    assert _field_default(cls, field) == expected
