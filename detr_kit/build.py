"""The one place where a Config becomes objects. Nothing below this module knows configs exist."""

from __future__ import annotations

import math

from torch import nn

from detr_kit.config import BackboneConfig, Config, ModelConfig

# ---------------------------------------------------------------------------------------------- model


def _model_config(cfg: Config | ModelConfig) -> ModelConfig:
    return cfg.model if isinstance(cfg, Config) else cfg


def resolve_num_classes(cfg: ModelConfig, num_classes: int | None) -> int:
    """K: the config's value when set, else the dataset's; one of the two must be known."""
    if cfg.num_classes is not None:
        return cfg.num_classes
    if num_classes is None:
        raise ValueError(
            "model.num_classes is null and no dataset was given to take it from; "
            "set model.num_classes=K (K = number of classes, without no-object)"
        )
    return num_classes


def build_backbone(cfg: BackboneConfig, return_strides: tuple[int, ...]) -> nn.Module:
    """A backbone returning one FeatureMap per stride in ``return_strides``."""
    if cfg.name.startswith("resnet"):
        from detr_kit.models.backbone.resnet import ResNetBackbone

        return ResNetBackbone(
            cfg.name,
            return_strides=return_strides,
            dilation=cfg.dilation,
            trainable_stages=cfg.trainable_stages,
            norm=cfg.norm,
            weights=cfg.weights,
            channels_last=cfg.channels_last,
        )
    from detr_kit.models.backbone.vit import ViTBackbone

    v = cfg.vit
    return ViTBackbone(
        cfg.name.removeprefix("vit_"),
        return_strides=return_strides,
        patch_size=v.patch_size,
        drop_path=v.drop_path,
        window_size=v.window_size,
        global_blocks=v.global_blocks,
        use_cls_token=v.use_cls_token,
        pretrain_image_size=v.pretrain_image_size,
        weights=cfg.weights,
    )


def build_position_encoding(cfg: ModelConfig) -> nn.Module:
    from detr_kit.models.position import LearnedPositionEncoding, SinePositionEncoding

    if cfg.position_embedding == "sine":
        return SinePositionEncoding(cfg.hidden_dim // 2, temperature=10000.0, normalize=True, scale=2 * math.pi)
    return LearnedPositionEncoding(cfg.hidden_dim // 2)


def build_model(cfg: Config | ModelConfig, num_classes: int | None = None) -> nn.Module:
    """Build the detector the config describes.

    Args:
        cfg: a Config or its ModelConfig.
        num_classes: K from the dataset, used when ``model.num_classes`` is null.
    """
    m = _model_config(cfg)
    k = resolve_num_classes(m, num_classes)
    if m.arch == "detr":
        model = _build_detr(m, k)
    else:
        model = _build_deformable_detr(m, k)
    if m.compile:
        import torch

        model = torch.compile(model)
    return model


def _build_detr(m: ModelConfig, num_classes: int) -> nn.Module:
    from detr_kit.models.detr import DETR
    from detr_kit.models.transformer import Transformer

    strides = (16,) if m.backbone.dilation or m.backbone.name.startswith("vit") else (32,)
    backbone = build_backbone(m.backbone, strides)
    transformer = Transformer(
        m.hidden_dim,
        num_heads=m.num_heads,
        num_encoder_layers=m.num_encoder_layers,
        num_decoder_layers=m.num_decoder_layers,
        dim_feedforward=m.dim_feedforward,
        dropout=m.dropout,
    )
    return DETR(
        backbone,
        build_position_encoding(m),
        transformer,
        num_classes=num_classes,
        num_queries=m.num_queries,
        aux_loss=m.aux_loss,
        exact_padding=m.exact_padding,
    )


def _build_deformable_detr(m: ModelConfig, num_classes: int) -> nn.Module:
    raise NotImplementedError  # filled in by the Deformable-DETR work (issue 3)


# ---------------------------------------------------------------------------------------------- losses


def build_matcher(cfg: Config | ModelConfig) -> nn.Module:
    from detr_kit.models.matcher import HungarianMatcher

    m = _model_config(cfg)
    return HungarianMatcher(
        cost_class=m.loss.cost_class,
        cost_bbox=m.loss.cost_bbox,
        cost_giou=m.loss.cost_giou,
        focal=m.uses_focal,
        focal_alpha=m.loss.focal_alpha,
        focal_gamma=m.loss.focal_gamma,
    )


def build_criterion(cfg: Config | ModelConfig, num_classes: int | None = None) -> nn.Module:
    from detr_kit.models.criterion import SetCriterion

    m = _model_config(cfg)
    return SetCriterion(
        resolve_num_classes(m, num_classes),
        build_matcher(m),
        class_weight=m.loss.class_weight,
        bbox_weight=m.loss.bbox_weight,
        giou_weight=m.loss.giou_weight,
        eos_coef=m.loss.eos_coef,
        focal=m.uses_focal,
        focal_alpha=m.loss.focal_alpha,
        focal_gamma=m.loss.focal_gamma,
    )


def build_postprocessor(cfg: Config | ModelConfig) -> nn.Module:
    from detr_kit.models.postprocess import PostProcess

    if isinstance(cfg, Config):
        return PostProcess(focal=cfg.model.uses_focal, top_k=cfg.eval.top_k, score_threshold=cfg.eval.score_threshold)
    return PostProcess(focal=cfg.uses_focal)
