"""torchvision classification networks as multi-level detection backbones: RegNet (X and Y), MobileNet V2 and V3,
EfficientNet V1 and V2, ConvNeXt and Swin V1 and V2, returning their stride-8, 16 and 32 stage outputs with padding
masks. (The ResNet family runs as ``ResNetBackbone``, exact to DETR's backbone.)

The torchvision model is built as torchvision builds it and kept under its own module names
(``body.features.3.0.block...``, ``body.trunk_output.block2...``), so torchvision state dicts load with their own
keys; its classifier and the stages deeper than the deepest output are removed. Where each stage ends and how many
channels it outputs is data, in ``catalog.VARIANTS``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from detr_kit.errors import CheckpointError
from detr_kit.models.backbone.catalog import FAMILIES, VARIANTS
from detr_kit.models.backbone.padding import checked_image_mask
from detr_kit.models.backbone.resnet import FrozenBatchNorm2d
from detr_kit.models.backbone.weights import LoadReport, backbone_state_dict, load_body_state_dict
from detr_kit.structures import FeatureMap

_LEVEL_STRIDES = (8, 16, 32)  # C3, C4, C5
_NORMS = ("frozen_bn", "bn", "gn")
_GN_GROUPS = 32


def _frozen_batch_norm(norm: nn.BatchNorm2d) -> nn.Module:
    return FrozenBatchNorm2d(norm.num_features, eps=norm.eps)  # the family's eps (1e-3 in MobileNetV3, EfficientNetV2)


def _group_norm(norm: nn.BatchNorm2d) -> nn.Module:
    # 32 groups where the channels allow it; mobile networks have widths such as 24 or 72, which get gcd(32, C).
    return nn.GroupNorm(math.gcd(_GN_GROUPS, norm.num_features), norm.num_features)


def replace_batch_norms(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> int:
    """Replace every ``BatchNorm2d`` in ``module`` by ``make(norm)``, before any weights are loaded; returns the count.

    This is torchvision's ``norm_layer=`` done once for every family: the EfficientNet builders fix their own
    ``norm_layer``, and each family's batch norm has its own eps, which ``make`` reads off the module it replaces.
    """
    found = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if type(child) is nn.BatchNorm2d]
    for parent, name, child in found:
        setattr(parent, name, make(child))
    return len(found)


class TorchvisionBackbone(nn.Module):
    """A torchvision classification network returning its stride-8/16/32 stage outputs with their padding masks.

    Args:
        name: a torchvision model name of ``catalog.VARIANTS``: regnet_x_400mf .. regnet_y_128gf, mobilenet_v2,
            mobilenet_v3_small/large, efficientnet_b0 .. b7, efficientnet_v2_s/m/l, convnext_tiny .. large,
            swin_t/s/b, swin_v2_t/s/b.
        return_strides: output strides to return, a non-empty ascending selection of (8, 16, 32) (C3, C4, C5).
            Layers after the deepest returned stage are removed.
        trainable_stages: how many of (C5, C4, C3, C2, stem) train, 0..5: 3 trains the stride-8/16/32 stages and
            freezes the stem and the stride-4 stage. Frozen layers get ``requires_grad_(False)`` and stay in eval
            mode (their batch norm statistics never change, their stochastic depth never drops).
        norm: what replaces the batch norms: "frozen_bn" (DETR's; right for pretrained weights), "bn" (kept as
            the family builds it) or "gn" (GroupNorm, 32 groups, or gcd(32, C) where 32 does not divide C).
            ConvNeXt and Swin normalise with LayerNorm, which they keep whatever ``norm`` says (``self.norm``
            then reads "layer_norm").
        weights: None (random init), a torchvision weights name such as "IMAGENET1K_V1"/"DEFAULT" (read from torch
            hub's cache, downloaded on first use), or a local file with a state dict of the torchvision model
            (optionally under 'model' or 'state_dict'; the classifier is ignored).

    Attributes:
        channels: output channels per returned level, in return order.
        strides: output stride per returned level, in return order.
        norm: the normalisation the body runs: "frozen_bn", "bn", "gn" or "layer_norm".
        convolutional: False for Swin, whose body runs on [B, H, W, C] tokens (no channels-last memory format).
        layer_paths: the body's layers in the order they run, as module paths.
        load_report: the LoadReport of the weights, or None without weights.

    Raises:
        ValueError: an unknown name or norm, bad strides or trainable_stages (ConfigError: an unknown weights name).
        CheckpointError: a weights file that does not exist, cannot be read or does not fit; named weights that are
            not in torch hub's cache and cannot be downloaded.
    """

    def __init__(
        self,
        name: str,
        return_strides: tuple[int, ...] = (32,),
        trainable_stages: int = 3,
        norm: str = "frozen_bn",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if name not in VARIANTS:
            raise ValueError(f"unknown torchvision backbone {name!r}; choose one of {', '.join(VARIANTS)}")
        if norm not in _NORMS:
            raise ValueError(f"unknown backbone norm {norm!r}; choose one of {', '.join(_NORMS)}")
        if not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be in 0..5 (C5, C4, C3, C2, stem), got {trainable_stages}")
        return_strides = tuple(return_strides)
        if not return_strides or return_strides != tuple(sorted(set(return_strides))) or not set(return_strides) <= set(_LEVEL_STRIDES):
            raise ValueError(f"return_strides must be a non-empty ascending selection of {_LEVEL_STRIDES} (C3, C4, C5), "
                             f"got {return_strides}")
        variant = VARIANTS[name]
        family = FAMILIES[variant.family]
        levels = [_LEVEL_STRIDES.index(stride) for stride in return_strides]  # 0 = C3 .. 2 = C5
        self.channels = tuple(variant.channels[level] for level in levels)
        self.strides = return_strides
        self.norm = "layer_norm" if family.layer_norm else norm
        self.convolutional = not family.channels_last
        self._tokens_last = family.channels_last  # stage outputs are [B, H, W, C]

        body = torchvision.models.get_model(name, weights=None)
        if not family.layer_norm and norm != "bn":
            replace_batch_norms(body, _frozen_batch_norm if norm == "frozen_bn" else _group_norm)
        kept = {path.split(".")[0] for path in (family.stem, family.container) if path}
        head = [child for child, _ in body.named_children() if child not in kept]
        for child in head:  # the classifier (pooling, final norm, linear layers)
            delattr(body, child)
        container = body.get_submodule(family.container)
        layers = [family.stem] * (family.stem is not None) + [f"{family.container}.{c}" for c, _ in container.named_children()]
        num_run = variant.ends[2 + max(levels)]  # one past the deepest returned stage's last layer
        for path in layers[num_run:]:  # deeper stages would never run
            delattr(container, path.rsplit(".", 1)[1])
        self.body = body
        self.layer_paths = tuple(layers[:num_run])
        self._output_layers = tuple(variant.ends[2 + level] - 1 for level in levels)  # indices into layer_paths

        self.load_report: LoadReport | None = None
        if weights is not None:
            ignored = tuple(f"{path}." for path in (*head, *layers[num_run:]))
            self.load_report = load_body_state_dict(body, backbone_state_dict(name, weights), ignored)
            if not self.load_report.ok:
                raise CheckpointError(f"backbone weights {weights!r} do not fit {name} with norm={self.norm!r}: "
                                      f"{self.load_report.summary()}",
                                      f"give weights saved from torchvision's {name} (BatchNorm weights need norm "
                                      "frozen_bn or bn)")

        num_frozen_units = 5 - trainable_stages  # units in order (stem, C2, C3, C4, C5)
        self._frozen_paths = self.layer_paths[: variant.ends[num_frozen_units - 1]] if num_frozen_units else ()
        for path in self._frozen_paths:
            body.get_submodule(path).requires_grad_(False)

    def train(self, mode: bool = True) -> "TorchvisionBackbone":
        super().train(mode)
        for path in self._frozen_paths:  # frozen layers keep their statistics, as requires_grad_(False) keeps weights
            self.body.get_submodule(path).eval()
        return self

    def forward(self, images: Tensor, mask: Tensor | None = None) -> list[FeatureMap]:
        """Run the network's layers and return the requested levels.

        Args:
            images: [B, 3, H, W] float, normalised.
            mask: [B, H, W] bool, True on padding; None means no padding.

        Returns:
            One FeatureMap per returned stride: features [B, C_l, H_l, W_l], mask [B, H_l, W_l] (the image mask
            resized with nearest-neighbour interpolation, as DETR does).
        """
        mask = checked_image_mask(images, mask)  # [B, H, W]
        x = images
        outputs: list[FeatureMap] = []
        for index, path in enumerate(self.layer_paths):
            x = self.body.get_submodule(path)(x)  # [B, C, H/s, W/s]; Swin: [B, H/s, W/s, C]
            if index in self._output_layers:
                features = x.permute(0, 3, 1, 2) if self._tokens_last else x  # [B, C_l, H_l, W_l]
                level_mask = F.interpolate(mask[None].float(), size=features.shape[-2:])[0].bool()  # [B, H_l, W_l]
                outputs.append(FeatureMap(features, level_mask))
        return outputs


__all__ = ["TorchvisionBackbone", "replace_batch_norms"]
