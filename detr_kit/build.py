"""The one place where a Config becomes objects. Nothing below this module knows configs exist."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from detr_kit.config import BackboneConfig, Config, ModelConfig

if TYPE_CHECKING:  # torch is imported by the builders that need it, so the dataset doctor starts without it
    from torch import nn

    from detr_kit.structures import LabelMap

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
    """A backbone returning one FeatureMap per stride in ``return_strides``.

    Raises:
        DetrKitError: the weights cannot be had (a missing or unreadable file, a weights name that is not in torch
            hub's cache offline, weights of another network), naming ``model.backbone.weights``.
    """
    from detr_kit.config import RESNETS, VITS
    from detr_kit.errors import DetrKitError

    try:
        if cfg.name in RESNETS:
            from detr_kit.models.backbone.resnet import ResNetBackbone

            return ResNetBackbone(cfg.name, return_strides=return_strides, dilation=cfg.dilation,
                                  trainable_stages=cfg.trainable_stages, norm=cfg.norm, weights=cfg.weights)
        if cfg.name not in VITS:
            from detr_kit.models.backbone.torchvision_backbone import TorchvisionBackbone

            return TorchvisionBackbone(cfg.name, return_strides=return_strides, trainable_stages=cfg.trainable_stages,
                                       norm=cfg.norm, weights=cfg.weights)
    except DetrKitError as err:
        raise type(err)(f"model.backbone.weights: {err.what}", err.fix) from err
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
    from torch import nn

    from detr_kit.models import deformable as parts
    from detr_kit.models.deformable_detr import DeformableDETR
    from detr_kit.models.heads import MLP, deformable_heads
    from detr_kit.models.position import SinePositionEncoding

    d = m.deformable
    c5_stride = 16 if m.backbone.dilation else 32  # DC5: layer4 dilated instead of strided
    num_backbone_levels = d.num_backbone_levels or parts.backbone_level_count(d.num_feature_levels)
    backbone = build_backbone(m.backbone, (4, 8, 16, c5_stride)[-num_backbone_levels:])
    levels = parts.FeatureLevels(backbone.channels, m.hidden_dim, d.num_feature_levels)
    if m.position_embedding == "sine":  # Deformable-DETR measures from pixel centres (offset -0.5), DINO does not
        position = SinePositionEncoding(m.hidden_dim // 2, d.sine_temperature, normalize=True, scale=2 * math.pi,
                                        offset=d.sine_offset)
    else:
        position = build_position_encoding(m)
    class_embed, bbox_embed = deformable_heads(m.hidden_dim, num_classes, m.num_decoder_layers, d.box_refine,
                                               d.two_stage, d.share_heads, box_queries=d.anchor_queries)
    sizes = (m.hidden_dim, m.dim_feedforward, d.num_feature_levels, m.num_heads)
    encoder_layer = parts.DeformableEncoderLayer(*sizes, d.enc_points, m.dropout, m.activation_dropout)
    decoder_layer = parts.DeformableDecoderLayer(*sizes, d.dec_points, m.dropout, m.attention_dropout, m.activation_dropout)
    encoder = parts.DeformableEncoder(encoder_layer, m.num_encoder_layers, d.activation_checkpointing)
    decoder = parts.DeformableDecoder(
        decoder_layer, m.num_decoder_layers,
        bbox_embed=bbox_embed if d.box_refine else None, class_embed=class_embed if d.two_stage else None,
        ref_point_head=MLP(2 * m.hidden_dim, m.hidden_dim, m.hidden_dim, 2) if d.anchor_queries else None,
        norm=nn.LayerNorm(m.hidden_dim) if d.decoder_norm else None, look_forward_twice=d.look_forward_twice,
    )
    num_queries = d.num_proposals if d.two_stage else m.num_queries
    transformer = parts.DeformableTransformer(encoder, decoder, two_stage=d.two_stage, num_proposals=d.num_proposals,
                                              anchor_queries=num_queries if d.anchor_queries else 0)
    denoising = None
    if d.dn_number > 0:
        denoising = parts.ContrastiveDenoising(num_classes, m.hidden_dim, d.dn_number, d.dn_label_noise_ratio,
                                               d.dn_box_noise_scale)
    return DeformableDETR(backbone, levels, position, transformer, class_embed, bbox_embed, num_queries, m.aux_loss,
                          denoising)


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
        encoder_class_agnostic=m.deformable is None or not m.deformable.mixed_query_selection,
    )


def build_postprocessor(cfg: Config | ModelConfig) -> nn.Module:
    from detr_kit.models.postprocess import PostProcess

    if isinstance(cfg, Config):
        return PostProcess(focal=cfg.model.uses_focal, top_k=cfg.eval.top_k, score_threshold=cfg.eval.score_threshold)
    return PostProcess(focal=cfg.uses_focal)


# ---------------------------------------------------------------------------------------------- data

import dataclasses  # noqa: E402  (the data section's own imports)
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal, Sequence  # noqa: E402

from detr_kit.config import DataConfig  # noqa: E402
from detr_kit.errors import ConfigError, DatasetError  # noqa: E402

COCO_HELP = (
    "point data.root at your COCO-format data (data.train_images, data.train_annotations, data.val_images and "
    "data.val_annotations are relative to it), or get COCO 2017 from https://cocodataset.org/#download "
    "(data.dataset=synthetic needs no download)"
)
AUTO_HELP = (
    "point data.root at your dataset's folder (COCO jsons, a YOLO data.yaml, or Pascal VOC's Annotations/ and "
    "JPEGImages/), or get COCO 2017 from https://cocodataset.org/#download (data.dataset=synthetic needs no download)"
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


Split = Literal["train", "val"]
COCO_KEYS = ("train_images", "train_annotations", "val_images", "val_annotations")


def announce(line: str) -> None:
    """Tell the user one line on stderr, from the first process of a run only (torchrun sets RANK)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def resolve_format(data_cfg: DataConfig) -> str:
    """``data.dataset``, or with ``auto`` the format of data.root's files, said in one line.

    Raises:
        DatasetError: with ``auto``, data.root does not exist or holds no known format (the line lists what was
            looked for).
    """
    if data_cfg.dataset != "auto":
        return data_cfg.dataset
    from detr_kit.data.formats import detect_format

    fmt, line = detect_format(data_cfg.root, [getattr(data_cfg, key) for key in COCO_KEYS], AUTO_HELP)
    announce(line)
    return fmt


def dataset_files(data_cfg: DataConfig, splits: Sequence[Split]) -> dict[str, tuple[Path, Path]]:
    """(image folder, annotation json) of each split of a COCO-format dataset; the synthetic one is generated first.

    Raises:
        DatasetError: a folder or file is missing (all of the splits' at once; the message says where they are
            expected and how to get them), data.root holds a user's files and data.dataset is synthetic, or the
            dataset is YOLO or VOC (no json: ``build_dataset`` reads those).
    """
    d = data_cfg
    fmt = resolve_format(d)
    names = {"train": (d.train_images, d.train_annotations), "val": (d.val_images, d.val_annotations)}
    if fmt == "synthetic":
        root = _ensure_synthetic(d)
        return {split: tuple(root / _SYNTHETIC_NAMES.get(n, n) for n in names[split]) for split in splits}
    root = Path(d.root)
    if fmt != "coco":
        raise DatasetError(f"data.root={root} is a {fmt} dataset, without COCO jsons",
                           f"write them with: python tools/convert_data.py --root {shlex.quote(str(root))} --out-dir DIR")
    if not root.is_dir():
        raise DatasetError(f"data.root={root}: dataset not found (no folder {root})", COCO_HELP)
    wanted = list(dict.fromkeys(n for split in splits for n in names[split]))
    missing = [n for n in wanted if not (root / n).exists()]
    if missing:
        from detr_kit.data.formats import FORMAT_NAMES, found_format

        other = found_format(root, [])
        hint = f"; it holds a {FORMAT_NAMES[other[0]]} dataset: set data.dataset=auto" if other and other[0] != "coco" else ""
        raise DatasetError(f"data.root={root}: dataset not found (missing {', '.join(missing)} in it{hint})", COCO_HELP)
    return {split: (root / names[split][0], root / names[split][1]) for split in splits}


def build_dataset(data_cfg: DataConfig, split: Split, train: bool = False, label_map: LabelMap | None = None):
    """One split of ``data_cfg``'s dataset, with the training augmentation (``train``) or the evaluation resize.

    COCO reads the split's json; YOLO and VOC read their files into the same COCO-format records (``data/formats.py``),
    so every format gives the same dataset class and the same evaluation.

    Args:
        data_cfg: the data section of the config.
        split: "train" or "val": which images and annotations (YOLO/VOC: data.train_split / data.val_split).
        train: True for training targets and augmentation; False for evaluation (crowd and VOC difficult boxes
            kept as ignored regions, eval resize).
        label_map: the label map to keep (a checkpoint's, or the train split's for the val split); None = from
            the split's own categories.

    Raises:
        DatasetError: see ``dataset_files`` and ``resolve_format``; or the split has problems (all of them in one
            message).
        ConfigError: data.classes is set for a dataset that is not VOC.
    """
    from detr_kit.data.coco import CocoDetection

    data_cfg = dataclasses.replace(data_cfg, dataset=resolve_format(data_cfg))
    check_classes_key(data_cfg)
    transforms = build_transforms(data_cfg, train)
    if data_cfg.dataset in ("coco", "synthetic"):
        images, annotations = dataset_files(data_cfg, [split])[split]
        return CocoDetection(images, annotations, transforms, train, label_map, data_cfg.on_bad_image)
    from detr_kit.data.formats import load_checked_split

    source = load_checked_split(data_cfg.dataset, data_cfg.root, _split_name(data_cfg, split), data_cfg.classes,
                                root_doctor_command(data_cfg), skip_unreadable=data_cfg.on_bad_image == "skip")
    return CocoDetection(source.image_dir, source.data, transforms, train, label_map, data_cfg.on_bad_image)


def check_classes_key(data_cfg: DataConfig) -> None:
    """Refuse data.classes for a dataset whose classes are not Pascal VOC's (``data_cfg.dataset`` is resolved).

    Raises:
        ConfigError: data.classes is set and the dataset is not VOC.
    """
    if data_cfg.classes and data_cfg.dataset != "voc":
        raise ConfigError(f"data.classes={list(data_cfg.classes)} is set, but data.root={data_cfg.root} is a "
                          f"{data_cfg.dataset} dataset", "leave data.classes empty: it orders Pascal VOC's classes "
                          "(YOLO's come from data.yaml's names, COCO's from the json's categories)")


def _split_name(data_cfg: DataConfig, split: Split) -> str:
    return data_cfg.train_split if split == "train" else data_cfg.val_split


def root_doctor_command(data_cfg: DataConfig) -> str:
    """The dataset doctor's command for a YOLO or VOC dataset (with the data keys that differ from the defaults)."""
    default = DataConfig()
    keys = [f"data.{key}={value}" for key in ("train_split", "val_split") if (value := getattr(data_cfg, key))
            != getattr(default, key)]
    if data_cfg.classes:
        keys.append(f"data.classes={json.dumps(list(data_cfg.classes))}")
    return " ".join(["python tools/check_data.py --root", shlex.quote(data_cfg.root), *map(shlex.quote, keys)])


def build_datasets(cfg: Config, label_map: LabelMap | None = None):
    """(train_dataset, val_dataset) for ``cfg.data``; the val set reuses the train set's label map.

    Args:
        cfg: the full config.
        label_map: a checkpoint's label map to keep (fine-tuning); None = from the train split.
    Raises:
        DatasetError: as ``build_dataset``, for both splits in one message.
    """
    data_cfg = dataclasses.replace(cfg.data, dataset=resolve_format(cfg.data))  # found (and said) once
    if data_cfg.dataset in ("coco", "synthetic"):
        files = dataset_files(data_cfg, ["train", "val"])  # every missing folder or file of both splits in one message
        same_source = files["train"] == files["val"]
    else:
        same_source = data_cfg.train_split == data_cfg.val_split
    failed: list[tuple[DatasetError, Split]] = []  # both splits are checked before one error lists every problem
    train = val = None
    try:
        train = build_dataset(data_cfg, "train", True, label_map)
    except DatasetError as err:
        failed.append((err, "train"))
    try:
        val = build_dataset(data_cfg, "val", False, train.label_map if train is not None else label_map)
    except DatasetError as err:
        if not (failed and same_source):  # the same files for both splits: their problems once
            failed.append((err, "val"))
    if failed:
        raise _one_dataset_error(failed, data_cfg)
    return train, val


def _one_dataset_error(failed: list[tuple[DatasetError, Split]], data_cfg: DataConfig) -> DatasetError:
    """One DatasetError for the problems of both splits: each problem prefixed with its file or split, each fix once."""
    if len(failed) == 1:
        return failed[0][0]
    from detr_kit.data.doctor import doctor_command

    coco = data_cfg.dataset in ("coco", "synthetic")
    files = dataset_files(data_cfg, ["train", "val"]) if coco else {}
    prefix = {split: files[split][1].name if coco else _split_name(data_cfg, split) for _, split in failed}
    problems = [f"{prefix[split]}: {line}" for err, split in failed for line in err.details if not line.startswith("fix ")]
    fixes = dict.fromkeys(line for err, _ in failed for line in err.details if line.startswith("fix "))
    commands = dict.fromkeys(doctor_command(*files[split]) if coco else root_doctor_command(data_cfg) for _, split in failed)
    return DatasetError("; ".join(err.what for err, _ in failed),
                        f"fix them; the dataset doctor lists each with its fix: {' and '.join(commands)}",
                        problems + list(fixes))
