"""The torchvision classification networks that serve as detection backbones beside the ResNets: where each keeps
its layers, which layers end the stages at strides 4, 8, 16 and 32, and how many channels those stages output.

Plain data, no torch: ``detr_kit.config`` validates ``model.backbone.name`` against these names, and
``torchvision_backbone.TorchvisionBackbone`` builds from them. ``tests/models/test_backbone_torchvision.py`` checks
every row against the torchvision model of that name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How the networks of one torchvision family are laid out.

    Attributes:
        stem: the module run before the container, or None when the container holds the stem too.
        container: the module whose children run one after another; with the stem they are the body's layers.
        layer_norm: the family normalises with LayerNorm (ConvNeXt, Swin), kept whatever ``norm`` asks for.
        channels_last: its stages output [B, H, W, C] (Swin) rather than [B, C, H, W]; the body is not
            convolutional, so no channels-last memory format or norm folding applies.
    """

    stem: str | None
    container: str
    layer_norm: bool = False
    channels_last: bool = False


@dataclass(frozen=True)
class Variant:
    """One torchvision network.

    Attributes:
        family: a key of ``FAMILIES``.
        ends: (stem, C2, C3, C4, C5): one past the index of each unit's last layer in the body's layers (the
            stem, then the stages at strides 4, 8, 16 and 32); they are also the units ``trainable_stages`` counts.
        channels: (C3, C4, C5): the channels of the stride-8, 16 and 32 outputs.
    """

    family: str
    ends: tuple[int, int, int, int, int]
    channels: tuple[int, int, int]


FAMILIES = {
    "RegNet": Family(stem="stem", container="trunk_output"),  # stem (stride 2), block1 .. block4
    "MobileNet": Family(stem=None, container="features"),  # V2 and V3: stem convolution, inverted residuals, 1x1 head
    "EfficientNet": Family(stem=None, container="features"),  # V1 and V2: stem, MBConv stages, 1x1 head
    "ConvNeXt": Family(stem=None, container="features", layer_norm=True),  # stem, (downsample, stage) x 3
    "Swin": Family(stem=None, container="features", layer_norm=True, channels_last=True),  # V1 and V2, as ConvNeXt
}

_REGNET_ENDS = (1, 2, 3, 4, 5)
_EFFICIENTNET_ENDS = (2, 3, 4, 6, 9)  # features 0-1 at stride 2, 2 at 4, 3 at 8, 4-5 at 16, 6-8 at 32
_FOUR_STAGE_ENDS = (1, 2, 4, 6, 8)  # ConvNeXt, Swin: stem at stride 4, stage 1, then (downsample, stage) x 3

VARIANTS = {
    "regnet_x_400mf": Variant("RegNet", _REGNET_ENDS, (64, 160, 400)),
    "regnet_x_800mf": Variant("RegNet", _REGNET_ENDS, (128, 288, 672)),
    "regnet_x_1_6gf": Variant("RegNet", _REGNET_ENDS, (168, 408, 912)),
    "regnet_x_3_2gf": Variant("RegNet", _REGNET_ENDS, (192, 432, 1008)),
    "regnet_x_8gf": Variant("RegNet", _REGNET_ENDS, (240, 720, 1920)),
    "regnet_x_16gf": Variant("RegNet", _REGNET_ENDS, (512, 896, 2048)),
    "regnet_x_32gf": Variant("RegNet", _REGNET_ENDS, (672, 1344, 2520)),
    "regnet_y_400mf": Variant("RegNet", _REGNET_ENDS, (104, 208, 440)),
    "regnet_y_800mf": Variant("RegNet", _REGNET_ENDS, (144, 320, 784)),
    "regnet_y_1_6gf": Variant("RegNet", _REGNET_ENDS, (120, 336, 888)),
    "regnet_y_3_2gf": Variant("RegNet", _REGNET_ENDS, (216, 576, 1512)),
    "regnet_y_8gf": Variant("RegNet", _REGNET_ENDS, (448, 896, 2016)),
    "regnet_y_16gf": Variant("RegNet", _REGNET_ENDS, (448, 1232, 3024)),
    "regnet_y_32gf": Variant("RegNet", _REGNET_ENDS, (696, 1392, 3712)),
    "regnet_y_128gf": Variant("RegNet", _REGNET_ENDS, (1056, 2904, 7392)),
    "mobilenet_v2": Variant("MobileNet", (2, 4, 7, 14, 19), (32, 96, 1280)),
    "mobilenet_v3_small": Variant("MobileNet", (1, 2, 4, 9, 13), (24, 48, 576)),
    "mobilenet_v3_large": Variant("MobileNet", (2, 4, 7, 13, 17), (40, 112, 960)),
    "efficientnet_b0": Variant("EfficientNet", _EFFICIENTNET_ENDS, (40, 112, 1280)),
    "efficientnet_b1": Variant("EfficientNet", _EFFICIENTNET_ENDS, (40, 112, 1280)),
    "efficientnet_b2": Variant("EfficientNet", _EFFICIENTNET_ENDS, (48, 120, 1408)),
    "efficientnet_b3": Variant("EfficientNet", _EFFICIENTNET_ENDS, (48, 136, 1536)),
    "efficientnet_b4": Variant("EfficientNet", _EFFICIENTNET_ENDS, (56, 160, 1792)),
    "efficientnet_b5": Variant("EfficientNet", _EFFICIENTNET_ENDS, (64, 176, 2048)),
    "efficientnet_b6": Variant("EfficientNet", _EFFICIENTNET_ENDS, (72, 200, 2304)),
    "efficientnet_b7": Variant("EfficientNet", _EFFICIENTNET_ENDS, (80, 224, 2560)),
    "efficientnet_v2_s": Variant("EfficientNet", (2, 3, 4, 6, 8), (64, 160, 1280)),  # one stage fewer at stride 32
    "efficientnet_v2_m": Variant("EfficientNet", _EFFICIENTNET_ENDS, (80, 176, 1280)),
    "efficientnet_v2_l": Variant("EfficientNet", _EFFICIENTNET_ENDS, (96, 224, 1280)),
    "convnext_tiny": Variant("ConvNeXt", _FOUR_STAGE_ENDS, (192, 384, 768)),
    "convnext_small": Variant("ConvNeXt", _FOUR_STAGE_ENDS, (192, 384, 768)),
    "convnext_base": Variant("ConvNeXt", _FOUR_STAGE_ENDS, (256, 512, 1024)),
    "convnext_large": Variant("ConvNeXt", _FOUR_STAGE_ENDS, (384, 768, 1536)),
    "swin_t": Variant("Swin", _FOUR_STAGE_ENDS, (192, 384, 768)),
    "swin_s": Variant("Swin", _FOUR_STAGE_ENDS, (192, 384, 768)),
    "swin_b": Variant("Swin", _FOUR_STAGE_ENDS, (256, 512, 1024)),
    "swin_v2_t": Variant("Swin", _FOUR_STAGE_ENDS, (192, 384, 768)),
    "swin_v2_s": Variant("Swin", _FOUR_STAGE_ENDS, (192, 384, 768)),
    "swin_v2_b": Variant("Swin", _FOUR_STAGE_ENDS, (256, 512, 1024)),
}

# The torchvision ResNets (ResNet, ResNeXt, Wide-ResNet) run as ``ResNetBackbone``, exact to DETR's backbone.
RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)
BOTTLENECK_RESNETS = RESNETS[2:]  # those with bottleneck blocks, which DC5 (dilation) needs

__all__ = ["BOTTLENECK_RESNETS", "FAMILIES", "RESNETS", "VARIANTS", "Family", "Variant"]
