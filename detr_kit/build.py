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
        num_heads=v.num_heads,
        relative_position=v.relative_position,
        relative_position_max_distance=v.relative_position_max_distance,
        conv_radius=v.conv_radius,
        position_interpolation=v.position_interpolation,
        weights_interpolation=v.weights_interpolation,
    )


def build_position_encoding(cfg: ModelConfig) -> nn.Module:
    from detr_kit.models.position import LearnedPositionEncoding, SinePositionEncoding

    if cfg.position_embedding == "sine":
        return SinePositionEncoding(cfg.hidden_dim // 2, temperature=10000.0, normalize=True, scale=2 * math.pi)
    return LearnedPositionEncoding(cfg.hidden_dim // 2)


def build_model(cfg: Config | ModelConfig, num_classes: int | None = None) -> nn.Module:
    """Build the detector the config describes: the plain model, with ``detr_kit.fast.optimize`` applied unless
    ``model.fast`` is false, and ``torch.compile`` with ``model.compile``.

    Args:
        cfg: a Config or its ModelConfig.
        num_classes: K from the dataset, used when ``model.num_classes`` is null.
    """
    m = _model_config(cfg)
    k = resolve_num_classes(m, num_classes)
    model = _build_detr(m, k) if m.deformable is None else _build_deformable_detr(m, k)
    if m.fast:
        from detr_kit.fast import optimize

        optimize(model, ffn_checkpointing=m.deformable is not None and m.deformable.ffn_checkpointing)
    if m.compile:
        import torch

        model = torch.compile(model)
    return model


def _build_detr(m: ModelConfig, num_classes: int) -> nn.Module:
    from detr_kit.models.detr import DETR
    from detr_kit.models.transformer import Transformer

    strides = (16,) if m.backbone.dilation or m.backbone.name.startswith("vit") else (32,)
    transformer = Transformer(
        m.hidden_dim,
        num_heads=m.num_heads,
        num_encoder_layers=m.num_encoder_layers,
        num_decoder_layers=m.num_decoder_layers,
        dim_feedforward=m.dim_feedforward,
        dropout=m.dropout,
        attention_dropout=m.attention_dropout,
        activation_dropout=m.activation_dropout,
    )
    position = build_position_encoding(m)
    return DETR(build_backbone(m.backbone, strides), position, transformer, num_classes, m.num_queries, m.aux_loss)


def _build_deformable_detr(m: ModelConfig, num_classes: int) -> nn.Module:
    from detr_kit.models import deformable as parts
    from detr_kit.models.deformable_detr import DeformableDETR
    from detr_kit.models.heads import deformable_heads
    from detr_kit.models.position import SinePositionEncoding

    d = m.deformable
    c5_stride = 16 if m.backbone.dilation else 32  # DC5: layer4 dilated instead of strided
    backbone = build_backbone(m.backbone, (8, 16, c5_stride)[-parts.backbone_level_count(d.num_feature_levels) :])
    levels = parts.FeatureLevels(backbone.channels, m.hidden_dim, d.num_feature_levels)
    if m.position_embedding == "sine":  # Deformable-DETR's sine encoding measures from pixel centres (offset -0.5)
        position = SinePositionEncoding(m.hidden_dim // 2, temperature=10000.0, normalize=True, scale=2 * math.pi, offset=-0.5)
    else:
        position = build_position_encoding(m)
    class_embed, bbox_embed = deformable_heads(m.hidden_dim, num_classes, m.num_decoder_layers, d.box_refine, d.two_stage)
    sizes = (m.hidden_dim, m.dim_feedforward, d.num_feature_levels, m.num_heads)
    encoder_layer = parts.DeformableEncoderLayer(*sizes, d.enc_points, m.dropout, m.activation_dropout)
    decoder_layer = parts.DeformableDecoderLayer(*sizes, d.dec_points, m.dropout, m.attention_dropout, m.activation_dropout)
    encoder = parts.DeformableEncoder(encoder_layer, m.num_encoder_layers, d.activation_checkpointing)
    decoder = parts.DeformableDecoder(
        decoder_layer, m.num_decoder_layers,
        bbox_embed=bbox_embed if d.box_refine else None, class_embed=class_embed if d.two_stage else None,
    )
    transformer = parts.DeformableTransformer(encoder, decoder, two_stage=d.two_stage, num_proposals=d.num_proposals)
    num_queries = d.num_proposals if d.two_stage else m.num_queries
    return DeformableDETR(backbone, levels, position, transformer, class_embed, bbox_embed, num_queries, m.aux_loss)


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


# ---------------------------------------------------------------------------------------------- data

from pathlib import Path  # noqa: E402  (the data section's own imports)

from detr_kit.config import DataConfig  # noqa: E402
from detr_kit.errors import DatasetError  # noqa: E402
from detr_kit.structures import LabelMap  # noqa: E402

COCO_HELP = (
    "point data.root at your COCO-format data (data.train_images, data.train_annotations, data.val_images and "
    "data.val_annotations are relative to it), or get COCO 2017 from https://cocodataset.org/#download "
    "(data.dataset=synthetic needs no download)"
)


def build_transforms(data_cfg: DataConfig, train: bool):
    """The albumentations pipeline of the config: DETR's training recipe or the evaluation resize."""
    from detr_kit.data.transforms import build_extra_transform, eval_transforms, train_transforms

    if not train:
        return eval_transforms(data_cfg.eval_size, data_cfg.max_size)
    extra = [build_extra_transform(t.name, t.kwargs) for t in data_cfg.extra_transforms]
    return train_transforms(
        data_cfg.train_scales,
        data_cfg.max_size,
        crop_resize_scales=data_cfg.crop_resize_scales,
        crop_size=data_cfg.crop_size,
        hflip=data_cfg.hflip,
        extra=extra,
    )


# The COCO default file names point to the synthetic layout's (so overrides such as
# data.val_images=train2017 select the same split for both datasets).
_SYNTHETIC_NAMES = {
    "train2017": "train",
    "val2017": "val",
    "annotations/instances_train2017.json": "annotations/instances_train.json",
    "annotations/instances_val2017.json": "annotations/instances_val.json",
}


def _synthetic_root(data_cfg: DataConfig) -> Path:
    """data.root, except that the COCO default folder is never filled with shapes (data/synthetic instead)."""
    return Path("data/synthetic" if data_cfg.root == DataConfig().root else data_cfg.root)


def _ensure_synthetic(data_cfg: DataConfig) -> Path:
    """Generate the shapes dataset unless an identical one (same generator arguments) is already there.

    Raises:
        DatasetError: data.root holds files the generator did not write (a user's own data, most likely).
    """
    import logging

    from detr_kit.data.synthetic import dataset_params, folder_state, generate_shapes_dataset, synthetic_params

    s = data_cfg.synthetic
    root = _synthetic_root(data_cfg)
    wanted = synthetic_params(s.num_train, s.num_val, s.image_size, s.min_objects, s.max_objects, s.seed)
    if dataset_params(root) == wanted:
        return root
    if folder_state(root) == "foreign":
        raise DatasetError(
            f"data.root={root} holds files detr_kit did not write, and data.dataset=synthetic would write shapes there",
            "set data.dataset=coco to train on them, or point data.root at an empty folder",
        )
    logging.getLogger(__name__).info("generating the synthetic shapes dataset in %s (%s)", root, wanted)
    try:
        generate_shapes_dataset(root, **wanted)
    except OSError:
        # Another process (e.g. another rank) renamed its finished copy into place first.
        if dataset_params(root) != wanted:
            raise
    return root


def build_datasets(cfg: Config, label_map: LabelMap | None = None):
    """(train_dataset, val_dataset) for ``cfg.data``; the val set reuses the train set's label map.

    Args:
        cfg: the full config.
        label_map: a checkpoint's label map to keep (fine-tuning); None = from the train json.
    Raises:
        DatasetError: the COCO folders or files are missing (the message says where they are expected and
            how to get them), or the jsons have problems (all of them in one message, see data/doctor.py).
    """
    from detr_kit.data.coco import CocoDetection

    d = cfg.data
    if d.dataset == "synthetic":
        root = _ensure_synthetic(d)
        names = (d.train_images, d.train_annotations, d.val_images, d.val_annotations)
        paths = tuple(root / _SYNTHETIC_NAMES.get(name, name) for name in names)
    else:
        root = Path(d.root)
        paths = (root / d.train_images, root / d.train_annotations, root / d.val_images, root / d.val_annotations)
        missing = [str(p.relative_to(root)) for p in paths if not p.exists()]
        if not root.is_dir():
            raise DatasetError(f"data.root={root}: dataset not found (no folder {root})", COCO_HELP)
        if missing:
            raise DatasetError(f"data.root={root}: dataset not found (missing {', '.join(missing)} in it)", COCO_HELP)
    train_images, train_json, val_images, val_json = paths
    failed: list[tuple[DatasetError, Path]] = []  # both splits are checked before one error lists every problem
    train = val = None
    try:
        train = CocoDetection(train_images, train_json, build_transforms(d, True), True, label_map, d.on_bad_image)
    except DatasetError as err:
        failed.append((err, train_json))
    try:
        val_map = train.label_map if train is not None else label_map
        val = CocoDetection(val_images, val_json, build_transforms(d, False), False, val_map, d.on_bad_image)
    except DatasetError as err:
        if val_json != train_json:  # the same json for both splits: its problems once
            failed.append((err, val_json))
    if failed:
        raise _one_dataset_error(failed, {train_json: train_images, val_json: val_images})
    return train, val


def _one_dataset_error(failed: list[tuple[DatasetError, Path]], image_dirs: dict[Path, Path]) -> DatasetError:
    """One DatasetError for the problems of both splits: each problem prefixed with its json, each fix once."""
    if len(failed) == 1:
        return failed[0][0]
    from detr_kit.data.doctor import doctor_command

    problems = [f"{json_file.name}: {line}" for err, json_file in failed for line in err.details
                if not line.startswith("fix ")]
    fixes = dict.fromkeys(line for err, _ in failed for line in err.details if line.startswith("fix "))
    commands = " and ".join(doctor_command(image_dirs[json_file], json_file) for _, json_file in failed)
    return DatasetError("; ".join(err.what for err, _ in failed),
                        f"fix them; the dataset doctor lists each with its fix: {commands}", problems + list(fixes))


def _seed_worker_transforms(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker its own augmentation stream (forked copies repeat otherwise)."""
    import torch

    from detr_kit.data.transforms import seed_transforms

    info = torch.utils.data.get_worker_info()
    transforms = getattr(info.dataset, "transforms", None)
    if transforms is not None and hasattr(transforms, "set_random_seed"):
        seed_transforms(transforms, info.seed)


def build_train_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    aspect_ratio_grouping: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
):
    """A shuffling training DataLoader yielding ``(ImageBatch, list[Target])``.

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch: the order is deterministic for
    (seed, epoch) and differs between epochs. With ``world_size > 1`` each rank reads its own shard
    (a DistributedSampler; the last shard is padded with repeats, as DDP needs equal step counts).
    With ``aspect_ratio_grouping`` a batch holds only portrait or only landscape images (less padding).
    """
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from detr_kit.data.collate import collate
    from detr_kit.data.samplers import GroupedBatchSampler, aspect_ratio_groups
    from detr_kit.data.transforms import seed_transforms

    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    if aspect_ratio_grouping and hasattr(dataset, "aspect_ratios"):
        groups = aspect_ratio_groups(dataset.aspect_ratios())
    else:
        groups = [0] * len(dataset)
    batch_sampler = GroupedBatchSampler(sampler, groups, batch_size, drop_last=drop_last)
    transforms = getattr(dataset, "transforms", None)
    if num_workers == 0 and transforms is not None and hasattr(transforms, "set_random_seed"):
        seed_transforms(transforms, seed * 1000 + rank)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_seed_worker_transforms if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
    )


def build_val_loader(dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1):
    """An in-order evaluation DataLoader; rank r reads images r, r + world_size, ... (each image exactly once)."""
    from torch.utils.data import DataLoader

    from detr_kit.data.collate import collate

    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, collate_fn=collate)
