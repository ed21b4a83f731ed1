"""torchvision ResNets (ResNet, ResNeXt, Wide-ResNet) as multi-level detection backbones, with DETR's frozen batch norm.

The torchvision module names are kept (``body.conv1``, ``body.bn1``, ``body.layer1`` .. ``body.layer4``) so that
torchvision, DETR and Deformable-DETR checkpoints map onto them with a plain key prefix.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from detr_kit.errors import CheckpointError
from detr_kit.models.backbone.padding import checked_image_mask
from detr_kit.models.backbone.weights import LoadReport, backbone_state_dict, load_body_state_dict
from detr_kit.structures import FeatureMap

_STAGES = ("layer1", "layer2", "layer3", "layer4")  # C2, C3, C4, C5
_CHANNELS = {  # output channels of (layer1, layer2, layer3, layer4)
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnet152": (256, 512, 1024, 2048),
    "resnext50_32x4d": (256, 512, 1024, 2048),  # ResNeXt and Wide-ResNet: the same ResNet with wider or grouped 3x3s
    "resnext101_32x8d": (256, 512, 1024, 2048),
    "resnext101_64x4d": (256, 512, 1024, 2048),
    "wide_resnet50_2": (256, 512, 1024, 2048),
    "wide_resnet101_2": (256, 512, 1024, 2048),
}
_NORMS = ("frozen_bn", "bn", "gn")
_GN_GROUPS = 32


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers (DETR's FrozenBatchNorm2d).

    Loads BatchNorm2d state dicts (``num_batches_tracked`` is ignored). The buffers are not parameters, so
    they are not counted as trainable and no optimizer touches them.

    Args:
        num_features: channels C.
        eps: added to the variance, 1e-5 as in DETR and torch's BatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # noqa: ANN001
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map this norm applies: ``x * scale + shift``, each [C]."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # [C]
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H, W]
        scale, shift = self.scale_and_shift()
        return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])  # one pass over x

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GN_GROUPS, num_channels)


def load_resnet_state_dict(body: nn.Module, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Copy a torchvision ResNet state dict into ``body``, ignoring ``fc.*`` and ``num_batches_tracked``.

    Keys of stages that ``body`` dropped (e.g. ``layer4`` when only C3 is returned) are ignored too.

    Args:
        body: the backbone's torchvision ResNet (without fc/avgpool).
        state_dict: torchvision key names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...).

    Returns:
        LoadReport with the keys ``body`` needs but did not get, the keys it could not use, and shape mismatches.
    """
    dropped = tuple(f"{name}." for name in ("layer1", "layer2", "layer3", "layer4") if not hasattr(body, name))
    return load_body_state_dict(body, state_dict, ignored=("fc.", *dropped))


class ResNetBackbone(nn.Module):
    """A torchvision ResNet returning C3/C4/C5 feature maps with their padding masks.

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101 | resnet152 | resnext50_32x4d | resnext101_32x8d |
            resnext101_64x4d | wide_resnet50_2 | wide_resnet101_2 (torchvision's names).
        return_strides: output strides to return, ascending, from (4, 8, 16, 32) for C2, C3, C4, C5. With
            ``dilation=True`` C5 has stride 16, so the strides on offer are C2 4, C3 8, C4 16, C5 16: a stride listed
            once takes the deepest stage with that stride (``(16,)`` is DC5's C5), ``(8, 16, 16)`` is C3, C4, C5.
        dilation: dilate layer4 instead of striding it (DETR-DC5); bottleneck networks only (not resnet18/34).
        trainable_stages: how many of (layer4, layer3, layer2, layer1, stem) train, 0..5. DETR trains 3 (layer2-4),
            freezing the stem and layer1. Frozen stages get ``requires_grad_(False)`` and their norm layers stay
            in eval mode, so batch norm statistics of a frozen stage never change.
        norm: "frozen_bn" (DETR; right for pretrained weights), "bn" (BatchNorm2d) or "gn" (GroupNorm, 32 groups).
        weights: None (random init), a torchvision weights name such as "IMAGENET1K_V1"/"DEFAULT" (read from torch
            hub's cache, downloaded on first use), or a local file with a torchvision ResNet state dict (optionally
            under 'model' or 'state_dict'; ``fc`` is ignored).

    Attributes:
        channels: output channels per returned level, in return order.
        strides: output stride per returned level, in return order.
        load_report: the LoadReport of the weights, or None without weights.

    Raises:
        ValueError: an unknown name/norm, bad strides or trainable_stages (ConfigError: an unknown weights name).
        CheckpointError: a weights file that does not exist, cannot be read or does not fit the model; named
            weights that are not in torch hub's cache and cannot be downloaded.
    """

    def __init__(
        self,
        name: str,
        return_strides: tuple[int, ...] = (32,),
        dilation: bool = False,
        trainable_stages: int = 3,
        norm: str = "frozen_bn",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if name not in _CHANNELS:
            raise ValueError(f"unknown ResNet {name!r}; choose one of {', '.join(_CHANNELS)}")
        if norm not in _NORMS:
            raise ValueError(f"unknown backbone norm {norm!r}; choose one of {', '.join(_NORMS)}")
        if not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be in 0..5 (layer4, layer3, layer2, layer1, stem), got {trainable_stages}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation=True (DC5) needs a bottleneck ResNet (resnet50 or deeper), got {name}")
        stage_strides = (4, 8, 16, 16) if dilation else (4, 8, 16, 32)
        self.stage_indices = _select_stages(tuple(return_strides), stage_strides, dilation)
        self.channels = tuple(_CHANNELS[name][i] for i in self.stage_indices)
        self.strides = tuple(stage_strides[i] for i in self.stage_indices)

        norm_layer = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": _group_norm}[norm]
        body = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=norm_layer
        )
        del body.fc, body.avgpool
        for index in range(max(self.stage_indices) + 1, len(_STAGES)):
            delattr(body, _STAGES[index])  # stages deeper than the deepest returned one would never run
        self.body = body

        self.load_report: LoadReport | None = None
        if weights is not None:
            self.load_report = load_resnet_state_dict(body, backbone_state_dict(name, weights))
            if not self.load_report.ok:
                raise CheckpointError(f"backbone weights {weights!r} do not fit {name} with norm={norm!r}: "
                                      f"{self.load_report.summary()}",
                                      f"give weights saved from torchvision's {name} (BatchNorm weights need norm "
                                      "frozen_bn or bn)")

        stages = [n for n in ("layer4", "layer3", "layer2", "layer1") if hasattr(body, n)]
        frozen_names = ["layer4", "layer3", "layer2", "layer1", "stem"][trainable_stages:]
        self._frozen: list[nn.Module] = []
        for stage in frozen_names:
            modules = [body.conv1, body.bn1] if stage == "stem" else ([getattr(body, stage)] if stage in stages else [])
            for module in modules:
                module.requires_grad_(False)
                self._frozen.append(module)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        for module in self._frozen:  # frozen stages keep their statistics, as requires_grad_(False) keeps weights
            module.eval()
        return self

    def forward(self, images: Tensor, mask: Tensor | None = None) -> list[FeatureMap]:
        """Run the ResNet and return the requested levels.

        Args:
            images: [B, 3, H, W] float, normalised.
            mask: [B, H, W] bool, True on padding; None means no padding.

        Returns:
            One FeatureMap per returned stride: features [B, C_l, H_l, W_l], mask [B, H_l, W_l] (the image mask
            resized with nearest-neighbour interpolation, as DETR does).
        """
        mask = checked_image_mask(images, mask)  # [B, H, W]
        body = self.body
        x = body.maxpool(body.relu(body.bn1(body.conv1(images))))  # [B, 64, H/4, W/4]
        outputs: list[FeatureMap] = []
        for index, stage in enumerate(_STAGES[: max(self.stage_indices) + 1]):
            x = getattr(body, stage)(x)  # [B, C_l, H/s, W/s]
            if index in self.stage_indices:
                level_mask = F.interpolate(mask[None].float(), size=x.shape[-2:])[0].bool()  # [B, H_l, W_l]
                outputs.append(FeatureMap(x, level_mask))
        return outputs


def _select_stages(return_strides: tuple[int, ...], stage_strides: tuple[int, ...], dilation: bool) -> tuple[int, ...]:
    """Map requested strides to stage indices (0 = layer1/C2, 1 = layer2/C3, 2 = layer3/C4, 3 = layer4/C5)."""
    allowed = sorted(set(stage_strides))
    if not return_strides or list(return_strides) != sorted(return_strides) or any(s not in allowed for s in return_strides):
        raise ValueError(
            f"return_strides must be a non-empty ascending selection of {tuple(allowed)}"
            f"{' (dilation=True: C2 4, C3 8, C4 16, C5 16)' if dilation else ' (C2, C3, C4, C5)'}, got {return_strides}"
        )
    indices: list[int] = []
    for stride in allowed:
        count = return_strides.count(stride)
        candidates = [i for i, s in enumerate(stage_strides) if s == stride]
        if count > len(candidates):
            raise ValueError(f"return_strides {return_strides} lists stride {stride} more often than stages have it")
        indices.extend(candidates[len(candidates) - count :])  # the deepest stages with that stride
    return tuple(indices)


__all__ = ["FrozenBatchNorm2d", "ResNetBackbone", "load_resnet_state_dict"]
