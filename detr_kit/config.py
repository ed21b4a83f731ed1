"""Typed, frozen configuration loaded from YAML.

A config file is a YAML mapping with the sections ``model``, ``data``, ``train`` and ``eval``. It may name
``_base_: other.yaml`` (a path relative to the file, or a list of them) whose values it overrides key by key.
Command-line overrides are ``a.b.c=value`` strings whose value is parsed as YAML and type-checked.

Unknown keys and wrong types are errors that name the file, the key and the closest valid key.
This module imports no torch.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from detr_kit.errors import ConfigError
from detr_kit.models.backbone.catalog import BOTTLENECK_RESNETS, RESNETS, VARIANTS

T = TypeVar("T")



class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false are booleans.

    YAML 1.1 also reads on/off/yes/no as booleans, which turns ``amp: off`` into False; here they stay strings,
    and bool fields accept them by name (see ``_BOOL_WORDS``).
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_BOOL_WORDS = {"on": True, "yes": True, "off": False, "no": False}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


# --------------------------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTConfig:
    """Options that only the ViT backbones read."""

    patch_size: int = 16
    drop_path: float = 0.1  # stochastic depth rate of the last block (linear in depth)
    window_size: int = 0  # 0 = global attention in every block; > 0 = ViTDet windows of this many patches
    global_blocks: tuple[int, ...] = ()  # blocks that keep global attention when window_size > 0
    use_cls_token: bool = True
    pretrain_image_size: int = 224  # the grid the position embeddings were trained at
    num_heads: int | None = None  # None = the size's (tiny 3, small 6, base 12); conv_radius needs >= (2r+1)^2
    relative_position: bool = False  # learned bias per head and 2-D patch offset (zero-initialised)
    relative_position_max_distance: int | None = None  # global blocks clip offsets here; None = pretrain grid - 1
    conv_radius: int = 0  # > 0: convolutional attention over (2r+1)^2 patches (phase 1 of the two-phase recipe)
    position_interpolation: Literal["detr_kit", "timm", "torchvision"] = "detr_kit"  # per-input resize of pos_embed
    weights_interpolation: Literal["auto", "detr_kit", "timm", "torchvision"] = "auto"  # auto = the weights' writer's


@dataclass(frozen=True)
class BackboneConfig:
    """The backbone, by torchvision's model name: ResNet (resnet18/34/50/101/152), ResNeXt (resnext50_32x4d,
    resnext101_32x8d/64x4d), Wide-ResNet (wide_resnet50_2/101_2), RegNet (regnet_x_400mf .. regnet_y_128gf),
    MobileNet (mobilenet_v2, mobilenet_v3_small/large), EfficientNet (efficientnet_b0 .. b7, efficientnet_v2_s/m/l),
    ConvNeXt (convnext_tiny/small/base/large), Swin (swin_t/s/b, swin_v2_t/s/b); or a plain ViT (vit_tiny/small/base).
    """

    name: str = "resnet50"  # a torchvision classification model name (see above) or vit_tiny | vit_small | vit_base
    weights: str | None = None  # torchvision weights name ("IMAGENET1K_V1", "DEFAULT"; offline: put the file in torch
    # hub's cache, the error names it) or a local state-dict file of that torchvision model; null = random init
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"  # replaces BatchNorm: frozen for pretrained weights; bn/gn
    # from scratch. ConvNeXt and Swin keep their LayerNorms whatever this says
    trainable_stages: int = 3  # how many of (C5, C4, C3, C2, stem) train, 0..5 (ResNet: layer4 .. layer1, stem)
    dilation: bool = False  # DC5: dilate the last stage instead of striding it (bottleneck ResNets only)
    vit: ViTConfig = field(default_factory=ViTConfig)


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (the criterion's) and matching costs (the matcher's)."""

    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1  # weight of the no-object class (softmax heads only)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0


@dataclass(frozen=True)
class DeformableConfig:
    """Deformable-DETR's own options; ``model.deformable: null`` is plain DETR. Defaults are the constructors'."""

    num_feature_levels: int = 4  # L: C3-C5 from the backbone plus extra stride-2 levels (1 = C5 alone)
    enc_points: int = 4  # sampling points per head and level in the encoder
    dec_points: int = 4  # ... and in the decoder
    box_refine: bool = False  # iterative box refinement: one box head per decoder layer
    two_stage: bool = False  # decoder queries from the top encoder proposals (needs box_refine)
    num_proposals: int = 300  # two-stage: encoder proposals kept as decoder queries
    activation_checkpointing: bool = False  # recompute whole encoder layers in backward (least memory, slower)
    ffn_checkpointing: bool = True  # model.fast only: recompute the encoder's feed-forward blocks in backward
    num_backbone_levels: int | None = None  # backbone levels used: None = the deepest min(L, 3) of C3-C5; 4 = C2-C5
    sine_temperature: float = 10000.0  # temperature of the sine position encoding (DINO: 20)
    sine_offset: float = -0.5  # coordinate offset of the sine position encoding (-0.5: pixel centres; DINO: 0.0)
    # DINO's training ideas (Zhang et al. 2022), each on its own; the defaults are Deformable-DETR. Denoising and
    # mixed query selection make the queries anchor boxes (learned content + a box whose sine embedding gives the
    # positional query at every decoder layer); without two-stage the anchors are learned.
    dn_number: int = 0  # contrastive denoising: queries of each kind (positive / negative) per batch to aim for; 0 = off
    dn_label_noise_ratio: float = 0.5  # a denoising query's label is redrawn with probability ratio / 2 (DINO's rule)
    dn_box_noise_scale: float = 0.4  # corner noise in half box sizes: positives below it, negatives up to twice it
    mixed_query_selection: bool = False  # two-stage anchors from the encoder, static learned content (needs two_stage)
    look_forward_twice: bool = False  # predict each layer's box from the previous layer's undetached box (box_refine)
    share_heads: bool = False  # one class and one box head for every decoder layer (DINO; needs box_refine)
    decoder_norm: bool = False  # a LayerNorm on every decoder layer's output before the heads (DINO)

    @property
    def anchor_queries(self) -> bool:
        """Whether the queries are anchor boxes (denoising or mixed query selection need them)."""
        return self.dn_number > 0 or self.mixed_query_selection


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int | None = None  # K; None = taken from the dataset's categories
    num_queries: int = 100  # Deformable-DETR configs set 300
    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048  # Deformable-DETR configs set 1024
    dropout: float = 0.1  # residual branches; also the two below unless they are set (the papers: 0.1 everywhere)
    attention_dropout: float | None = None  # on attention weights; None = dropout (transformers' configs: 0.0)
    activation_dropout: float | None = None  # after the feed-forward ReLU; None = dropout (transformers' configs: 0.0)
    position_embedding: Literal["sine", "learned"] = "sine"
    aux_loss: bool = True
    focal: bool | None = None  # sigmoid focal classification; None = the architecture's (Deformable-DETR: yes)
    fast: bool = True  # detr_kit.fast.optimize: the same function from faster, leaner modules; false = the plain model
    compile: bool = False  # torch.compile the model
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    deformable: DeformableConfig | None = None  # None = DETR
    loss: LossConfig = field(default_factory=LossConfig)

    @property
    def uses_focal(self) -> bool:
        return self.deformable is not None if self.focal is None else self.focal


@dataclass(frozen=True)
class SyntheticConfig:
    """The generated shapes dataset (written to ``DataConfig.root`` on first use)."""

    num_train: int = 512
    num_val: int = 64
    image_size: int = 128
    min_objects: int = 0
    max_objects: int = 4
    seed: int = 0


@dataclass(frozen=True)
class TransformConfig:
    """One extra albumentations transform: ``{name: RandomBrightnessContrast, kwargs: {p: 0.5}}``."""

    name: str = ""
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    # auto: the format of data.root's files (COCO json, YOLO data.yaml, Pascal VOC Annotations/), said in one line
    dataset: Literal["auto", "coco", "yolo", "voc", "synthetic"] = "auto"
    root: str = "data/coco"  # the dataset's folder (YOLO: or its data.yaml itself)
    # COCO: image folders and instances jsons, relative to data.root
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    # YOLO and VOC: the split trained on and the split evaluated: a data.yaml key (train, val, test) or a VOC
    # ImageSets/Main/<name>.txt (train, val, trainval, test)
    train_split: str = "train"
    val_split: str = "val"
    classes: tuple[str, ...] = ()  # VOC: class names in label order; () = every <name> in Annotations/*.xml, sorted
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # The DETR recipe: flip; then multi-scale resize, or resize + random crop + multi-scale resize.
    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)  # min, max side of the random crop
    max_size: int = 1333
    eval_size: int = 800
    hflip: bool = True
    extra_transforms: tuple[TransformConfig, ...] = ()
    batch_size: int = 2  # per process
    num_workers: int = 2
    aspect_ratio_grouping: bool = True
    on_bad_image: Literal["skip", "error"] = "skip"


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = ""  # "" = runs/<config file stem>
    epochs: int = 50
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_linear_proj_mult: float = 0.1  # Deformable-DETR: sampling offsets and reference points
    weight_decay: float = 1e-4
    no_weight_decay_on_norm_bias: bool = False
    layer_decay: float = 1.0  # ViT layer-wise lr decay; 1.0 = off
    lr_schedule: Literal["step", "cosine"] = "step"
    lr_drop_epochs: tuple[int, ...] = (40,)
    lr_drop_factor: float = 0.1
    warmup_steps: int = 0
    clip_max_norm: float = 0.1  # 0 = no clipping
    accumulate_steps: int = 1
    amp: Literal["off", "bf16", "fp16"] = "off"
    ema: bool = False
    ema_decay: float = 0.9998
    seed: int = 42
    deterministic: bool = False
    overfit_batches: int = 0  # > 0: train and evaluate on the same N batches
    checkpoint_every_steps: int = 0  # 0 = once per epoch
    eval_every_epochs: int = 1
    log_every_steps: int = 10
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    init_from: str | None = None  # detr_kit, official or Hugging Face checkpoint to fine-tune from
    init_from_trusted: bool = False  # let init_from hold pickled code (only for files from a source you trust)
    num_vis_images: int = 4  # images with ground truth and predictions drawn after each evaluation


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 2
    exact_padding: bool = True  # the backbone sees each image unpadded, so AP does not depend on batch size
    score_threshold: float = 0.0
    top_k: int = 100  # detections kept per image (focal heads: top-k over queries x classes)
    backend: Literal["pycocotools", "fast"] = "pycocotools"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = ""  # filled from the config file's stem

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, overrides: Sequence[str] = (), source: str = "<overrides>") -> "Config":
        """A copy with ``a.b=c`` overrides applied and validated."""
        data = to_dict(self)
        for item in overrides:
            _apply_override(data, item, source)
        return from_dict(Config, data, source)


# --------------------------------------------------------------------------------------------------------------
# Validation of values that are well-typed but meaningless
# --------------------------------------------------------------------------------------------------------------

VIT_WIDTHS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}  # as models/backbone/vit.py's VIT_SIZES
VITS = tuple(VIT_WIDTHS)
BACKBONES = (*RESNETS, *VARIANTS, *VITS)  # ResNetBackbone, TorchvisionBackbone, ViTBackbone


def _validate(cfg: Config, source: str) -> None:
    def fail(key: str, value: Any, allowed: str) -> None:
        raise ConfigError(f"{source}: {key}={value!r} is invalid", f"set {key} to {allowed}")

    m, d, t, e = cfg.model, cfg.data, cfg.train, cfg.eval
    if m.backbone.name not in BACKBONES:
        close = difflib.get_close_matches(m.backbone.name, BACKBONES, n=1)
        hint = f"{close[0]!r} (the closest name) or " if close else ""
        fail("model.backbone.name", m.backbone.name, f"{hint}one of {', '.join(BACKBONES)}")
    if m.num_classes is not None and m.num_classes < 1:
        fail("model.num_classes", m.num_classes, "an integer >= 1, or null to take it from the dataset")
    for key in ("num_queries", "hidden_dim", "num_heads", "dim_feedforward", "num_encoder_layers", "num_decoder_layers"):
        if getattr(m, key) < 1:
            fail(f"model.{key}", getattr(m, key), "an integer >= 1")
    if m.hidden_dim % m.num_heads:
        fail("model.hidden_dim", m.hidden_dim, f"a multiple of model.num_heads={m.num_heads}")
    if m.position_embedding == "sine" and m.hidden_dim % 2:
        fail("model.hidden_dim", m.hidden_dim, "an even number (the sine encoding splits it between x and y)")
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        p = getattr(m, key)
        if p is not None and not 0.0 <= p < 1.0:
            fail(f"model.{key}", p, "a probability in [0, 1)" + (" or null (= model.dropout)" if key != "dropout" else ""))
    if m.deformable is not None:
        f = m.deformable
        for key in ("enc_points", "dec_points", "num_proposals"):
            if getattr(f, key) < 1:
                fail(f"model.deformable.{key}", getattr(f, key), "an integer >= 1")
        if not 1 <= f.num_feature_levels <= 5:
            fail("model.deformable.num_feature_levels", f.num_feature_levels,
                 "1..5 (C3-C5 from the backbone plus extra stride-2 levels)")
        if f.two_stage and not f.box_refine:
            fail("model.deformable.box_refine", f.box_refine, "true when model.deformable.two_stage is on (as in the reference code)")
        _validate_dino(f, fail)
        if f.num_backbone_levels == 4 and m.backbone.name in VITS:
            fail("model.deformable.num_backbone_levels", 4, "at most 3 for ViT backbones (their pyramid starts at stride 8)")
        if m.hidden_dim % 32:
            fail("model.hidden_dim", m.hidden_dim, "a multiple of 32 for Deformable-DETR (its input projections' GroupNorm has 32 groups)")
    if not 0 <= m.backbone.trainable_stages <= 5:
        fail("model.backbone.trainable_stages", m.backbone.trainable_stages, "0..5")
    if m.backbone.dilation and m.backbone.name not in BOTTLENECK_RESNETS:
        fail("model.backbone.dilation", True, f"false for {m.backbone.name} (DC5 needs a bottleneck ResNet: "
             "resnet50 or deeper, ResNeXt or Wide-ResNet)")
    if m.backbone.name in VITS:
        _validate_vit(m.backbone.vit, VIT_WIDTHS[m.backbone.name], fail)
    for key in ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "lr_linear_proj_mult"):
        value = getattr(t, key)
        if not math.isfinite(value) or value < 0:
            fail(f"train.{key}", value, "a finite number >= 0")
    if t.lr <= 0:
        fail("train.lr", t.lr, "a number > 0")
    if t.epochs < 1:
        fail("train.epochs", t.epochs, "an integer >= 1")
    if t.accumulate_steps < 1:
        fail("train.accumulate_steps", t.accumulate_steps, "an integer >= 1")
    if not 0.0 < t.ema_decay < 1.0:
        fail("train.ema_decay", t.ema_decay, "a number in (0, 1)")
    if not 0.0 < t.layer_decay <= 1.0:
        fail("train.layer_decay", t.layer_decay, "a number in (0, 1]")
    if t.max_bad_steps < 1:
        fail("train.max_bad_steps", t.max_bad_steps, "an integer >= 1")
    if d.batch_size < 1:
        fail("data.batch_size", d.batch_size, "an integer >= 1")
    if e.batch_size < 1:
        fail("eval.batch_size", e.batch_size, "an integer >= 1")
    if d.num_workers < 0:
        fail("data.num_workers", d.num_workers, "an integer >= 0")
    if not d.train_scales or min(d.train_scales) < 1:
        fail("data.train_scales", d.train_scales, "a non-empty list of positive sizes")
    if len(d.crop_size) != 2 or not 0 < d.crop_size[0] <= d.crop_size[1]:
        fail("data.crop_size", d.crop_size, "[min, max] with 0 < min <= max")
    if len(set(d.classes)) != len(d.classes) or any(not name.strip() for name in d.classes):
        fail("data.classes", list(d.classes), "a list of distinct, non-empty class names (or [] for VOC's sorted names)")
    if d.max_size < max(d.train_scales + (d.eval_size,)):
        fail("data.max_size", d.max_size, f">= the largest scale ({max(d.train_scales + (d.eval_size,))})")


def _validate_vit(v: ViTConfig, width: int, fail: Any) -> None:
    """The ViT's attention options: heads that divide the width, convolutional attention's needs."""
    key = "model.backbone.vit"
    if v.num_heads is not None and (v.num_heads < 1 or width % v.num_heads):
        divisors = [n for n in range(1, width + 1) if width % n == 0 and n <= 64]
        fail(f"{key}.num_heads", v.num_heads, f"a divisor of the width {width}, e.g. one of {divisors}, or null")
    if v.conv_radius < 0:
        fail(f"{key}.conv_radius", v.conv_radius, "0 (self-attention) or a number of patches >= 1")
    if v.relative_position_max_distance is not None and v.relative_position_max_distance < 0:
        fail(f"{key}.relative_position_max_distance", v.relative_position_max_distance, "an integer >= 0 or null")
    if v.conv_radius > 0:
        needed = (2 * v.conv_radius + 1) ** 2
        if v.num_heads is None or v.num_heads < needed:
            fail(f"{key}.num_heads", v.num_heads,
                 f"at least (2 * conv_radius + 1)^2 = {needed} heads dividing {width} (one per neighbouring patch)")
        if v.use_cls_token:
            fail(f"{key}.use_cls_token", True, "false with conv_radius > 0 (a [CLS] token has no neighbours)")
        if v.relative_position:
            fail(f"{key}.relative_position", True,
                 "false with conv_radius > 0 (the conversion to attention creates the relative position tables)")


def _validate_dino(f: DeformableConfig, fail: Any) -> None:
    """The DINO options of ``model.deformable`` (and the level split they may change)."""
    if f.num_backbone_levels is not None and not 1 <= f.num_backbone_levels <= min(4, f.num_feature_levels):
        fail("model.deformable.num_backbone_levels", f.num_backbone_levels,
             f"null or 1..{min(4, f.num_feature_levels)} (at most 4 = C2-C5 and at most num_feature_levels)")
    if not math.isfinite(f.sine_temperature) or f.sine_temperature <= 0:
        fail("model.deformable.sine_temperature", f.sine_temperature, "a number > 0")
    if f.dn_number < 0:
        fail("model.deformable.dn_number", f.dn_number, "an integer >= 0 (0 turns contrastive denoising off)")
    if not 0.0 <= f.dn_label_noise_ratio <= 1.0:
        fail("model.deformable.dn_label_noise_ratio", f.dn_label_noise_ratio, "a number in [0, 1]")
    if not math.isfinite(f.dn_box_noise_scale) or f.dn_box_noise_scale < 0:
        fail("model.deformable.dn_box_noise_scale", f.dn_box_noise_scale, "a number >= 0")
    if f.mixed_query_selection and not f.two_stage:
        fail("model.deformable.two_stage", f.two_stage, "true when mixed_query_selection is on (anchors from the encoder)")
    for key in ("look_forward_twice", "share_heads"):
        if getattr(f, key) and not f.box_refine:
            fail("model.deformable.box_refine", f.box_refine, f"true when model.deformable.{key} is on")


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config, resolve its ``_base_`` chain, apply ``a.b=c`` overrides and validate.

    Raises:
        ConfigError: for an unreadable file, an unknown key, a wrong type or an invalid value; the message
            names the file, the key and the closest valid key.
    """
    path = Path(path)
    data = _read_with_bases(path, chain=())
    for item in overrides:
        _apply_override(data, item, f"{path} (command-line override {item!r})")
    data.setdefault("name", path.stem)
    return from_dict(Config, data, str(path))


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a Config from a plain (possibly partial) mapping, e.g. one saved in a checkpoint."""
    return from_dict(Config, dict(data), source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so a run can be reproduced from its output folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found", "pass the path of a YAML config, e.g. one of configs/*.yaml")
    try:
        data = _load_yaml(path.read_text())
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())  # PyYAML's message spans lines
        raise ConfigError(f"{path}: not valid YAML ({problem})", "fix the YAML syntax at that line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a YAML {type(data).__name__}", "a config must be a YAML mapping (model: ..., data: ...)")
    return data


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain + (resolved,))
        raise ConfigError(f"{path}: _base_ cycle: {cycle}", "remove one _base_ entry of the cycle")
    data = _read_yaml(path)
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        _merge(merged, _read_with_bases(base_path, chain + (resolved,)))
    _merge(merged, data)
    merged.pop("name", None) if "name" not in data else None
    return merged


def _merge(into: dict, update: Mapping) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict) and key != "kwargs":
            _merge(into[key], value)
        else:
            into[key] = value


def _apply_override(data: dict, item: str, source: str) -> None:
    if "=" not in item:
        raise ConfigError(f"{source}: override {item!r} has no '='", "write overrides as section.key=value, e.g. train.lr=1e-4")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    _check_path(Config, keys, source)
    node = data
    for key in keys[:-1]:
        if node.get(key) is None:  # a section that is null (model.deformable on DETR) or absent: start from defaults
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: cannot set {dotted}: {key} holds a value, not a section",
                              f"give {key} as a mapping where it is set")
    node[keys[-1]] = value


def _check_path(cls: type, keys: list[str], source: str) -> None:
    """Fail early, with a suggestion, on an override whose dotted path names no field."""
    for depth, key in enumerate(keys):
        hints = get_type_hints(cls)
        if key not in hints:
            _unknown_key(cls, key, ".".join(keys[:depth]), source)
        sub = _dataclass_in(hints[key])
        if depth < len(keys) - 1:
            if sub is None:
                value_key = ".".join(keys[: depth + 1])
                raise ConfigError(f"{source}: {value_key} is a value, not a section", f"set {value_key}=<value> itself")
            cls = sub


def _unknown_key(cls: type, key: str, prefix: str, source: str) -> typing.NoReturn:
    valid = sorted(get_type_hints(cls))
    full = f"{prefix}.{key}" if prefix else key
    if cls is ModelConfig and key in _MOVED_MODEL_KEYS:
        moved = _MOVED_MODEL_KEYS[key]
        where = f"model.{moved}" if moved else ("model.deformable (null = DETR)" if key == "arch" else "eval.exact_padding")
        raise ConfigError(f"{source}: unknown key {full!r}", f"it moved to {where}")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        raise ConfigError(f"{source}: unknown key {full!r}", f"did you mean {(prefix + '.' if prefix else '') + close[0]!r}?")
    raise ConfigError(f"{source}: unknown key {full!r}", f"valid keys here: {', '.join(valid)}")


def _dataclass_in(tp: Any) -> type | None:
    for t in get_args(tp) or (tp,):
        if is_dataclass(t):
            return t  # type: ignore[return-value]
    return None


# Keys of the flat model section of earlier versions -> where they live now (None: gone, with the reason).
_MOVED_MODEL_KEYS = {
    "num_feature_levels": "deformable.num_feature_levels",
    "enc_points": "deformable.enc_points",
    "dec_points": "deformable.dec_points",
    "box_refine": "deformable.box_refine",
    "two_stage": "deformable.two_stage",
    "num_proposals": "deformable.num_proposals",
    "activation_checkpointing": "deformable.activation_checkpointing",
    "ffn_checkpointing": "deformable.ffn_checkpointing",
    "arch": None,  # model.deformable: null is DETR, a mapping Deformable-DETR
    "exact_padding": None,  # an argument of the forward pass; evaluation: eval.exact_padding
}
_GONE_BACKBONE_KEYS = ("channels_last",)  # a speed layout that detr_kit.fast applies (model.fast)


def migrate_model_section(model: Mapping[str, Any]) -> dict:
    """The model section in today's layout, from a flat one of earlier versions (``model.arch`` and the Deformable-DETR
    keys beside the others, as configs saved in older checkpoints have it). Today's layout is returned unchanged."""
    model = dict(model)
    if "arch" not in model and not any(key in model for key, moved in _MOVED_MODEL_KEYS.items() if moved):
        return model
    deformable = model.get("arch", "detr") == "deformable_detr" or "deformable" in model and model["deformable"] is not None
    section = dict(model.get("deformable") or {})
    for key, moved in _MOVED_MODEL_KEYS.items():
        if key in model:
            value = model.pop(key)
            if moved is not None and deformable:
                section.setdefault(moved.split(".", 1)[1], value)
    model["deformable"] = section if deformable else None
    if isinstance(model.get("backbone"), Mapping):
        model["backbone"] = {k: v for k, v in model["backbone"].items() if k not in _GONE_BACKBONE_KEYS}
    return model


def from_dict(cls: type[T], data: Mapping[str, Any], source: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix or 'the config'} must be a mapping, got {data!r}",
                          f"give {prefix or 'the config'} as key: value pairs")
    if cls is Config and isinstance(data.get("model"), Mapping):
        data = {**data, "model": migrate_model_section(data["model"])}
    hints = get_type_hints(cls)
    for key in data:
        if key not in hints:
            _unknown_key(cls, str(key), prefix, source)
    kwargs = {k: _convert(hints[k], v, source, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    obj = cls(**kwargs)
    if cls is Config:
        _validate(obj, source)  # type: ignore[arg-type]
    return obj


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)

    def wrong() -> typing.NoReturn:
        raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}", f"set {key} to {_type_name(tp)}")

    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            wrong()
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, source, key)
            except ConfigError:
                continue
        wrong()
    if origin is Literal:
        if value in get_args(tp) and type(value) is type(get_args(tp)[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: {key}={value!r} is not allowed", f"set {key} to one of {_type_name(tp)}{hint}")
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            wrong()
        return from_dict(tp, value, source, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            wrong()
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must have {len(args)} items, got {value!r}", f"give {key} as a list of {len(args)} items")
        return tuple(_convert(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        wrong()
    if tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        wrong()
    return value


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-safe data (tuples become lists)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


__all__ = [
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeformableConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "SyntheticConfig",
    "TrainConfig",
    "TransformConfig",
    "ViTConfig",
    "config_from_dict",
    "load_config",
    "migrate_model_section",
    "save_config",
    "to_dict",
]
