"""Backbone weights: reading state-dict files, matching them against a model, torchvision's named weights (from
torch hub's cache, downloaded when missing), and ViT checkpoints (torchvision and timm/DeiT layouts, position tables
fitted to another patch grid).

The backbones and ``detr_kit.compat`` import this module; it imports neither (a model is only duck-typed here).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Protocol
from urllib.parse import urlparse

import torch
import torchvision
from einops import rearrange
from torch import Tensor, nn

from detr_kit.errors import CheckpointError, ConfigError, PickledCodeError, checkpoint_load_error
from detr_kit.models.backbone.position_interpolation import PositionInterpolation, resize_position_grid

_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class ViTLike(Protocol):
    """What ``load_vit_weights`` reads of a ViT backbone."""

    cls_token: Tensor | None
    pos_embed: Tensor
    pretrain_grid: int
    embed_dim: int
    depth: int
    patch_size: int

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> Any: ...


# --------------------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------------------


class LoadReport(NamedTuple):
    """What loading a state dict into a backbone body left out: key names, shape mismatches as text."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 6) -> str:
        """The first ``limit`` keys of each kind, for an error message."""
        parts = [(kind, keys) for kind, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                                                 ("shape mismatches", self.mismatched)) if keys]
        return "; ".join(f"{kind} {keys[:limit]}{' ...' if len(keys) > limit else ''}" for kind, keys in parts)


def read_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    """Read a state dict from a file or mapping.

    Args:
        source: a path to a ``.pth``/``.pt``/``.bin`` file (torch.load, tensors only) or a ``.safetensors`` file,
            or a mapping; either may be the state dict itself or a dict holding it under ``'model'`` or
            ``'state_dict'``.

    Returns:
        The state dict (key -> tensor).

    Raises:
        CheckpointError: the path does not exist, the file cannot be read, or it holds no state dict.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"backbone weights file {str(path)!r} does not exist",
                                  "give the path of an existing state-dict file")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                source = load_file(str(path))
            else:
                with warnings.catch_warnings():  # torch warns about the pickle protocol of files it did not write
                    warnings.filterwarnings("ignore", "Detected pickle protocol")
                    source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- any unreadable file is the user's input, named as such
            error = checkpoint_load_error(path, err)
            fix = "save the tensors alone: torch.save(model.state_dict(), path)" if isinstance(error, PickledCodeError) else error.fix
            raise CheckpointError(f"backbone weights: {error.what}", fix) from err
    if not isinstance(source, Mapping):
        raise CheckpointError(f"backbone weights {_name(source)} hold a {type(source).__name__}, not a state dict",
                              "give a file saved with torch.save(model.state_dict(), path)")
    for key in ("model", "state_dict"):
        if key in source and isinstance(source[key], Mapping):
            source = source[key]
            break
    return {k: v for k, v in source.items() if isinstance(v, Tensor)}


def _name(source: Any) -> str:
    return repr(str(source)) if isinstance(source, (str, Path)) else "(the object given)"


def match_state_dict(
    state_dict: Mapping[str, Tensor], own: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Sort a checkpoint's entries against a model's own state dict.

    Returns:
        ``(usable, unexpected, mismatched)``: the entries whose key and shape fit, the keys the model does not
        have, and ``"key: checkpoint (shape) vs model (shape)"`` for keys whose shapes differ.
    """
    usable: dict[str, Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        if key not in own:
            unexpected.append(key)
        elif own[key].shape != value.shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            usable[key] = value
    return usable, unexpected, mismatched


def load_body_state_dict(body: nn.Module, state_dict: Mapping[str, Tensor], ignored: tuple[str, ...] = ()) -> LoadReport:
    """Copy the entries of a torchvision state dict that fit into ``body`` (a torchvision network, pruned).

    Args:
        body: the network the backbone runs, its classifier and unused stages removed.
        state_dict: torchvision key names.
        ignored: key prefixes to pass over (the classifier, the stages ``body`` dropped); ``num_batches_tracked``
            is always passed over.

    Returns:
        LoadReport with the keys ``body`` needs but did not get, the keys it could not use, and shape mismatches.
    """
    own = body.state_dict()
    kept = {k: v for k, v in state_dict.items() if not (k.startswith(ignored) or k.endswith("num_batches_tracked"))}
    usable, unexpected, mismatched = match_state_dict(kept, own)
    missing = [key for key in own if key not in usable and not key.endswith("num_batches_tracked")]
    missing = [key for key in missing if not any(m.startswith(key + ":") for m in mismatched)]
    body.load_state_dict(usable, strict=False)
    return LoadReport(missing, unexpected, mismatched)


def backbone_state_dict(name: str, weights: str) -> dict[str, Tensor]:
    """The state dict that ``weights`` names for torchvision's network ``name``.

    Args:
        name: the torchvision model name (``resnet50``, ``mobilenet_v3_large``, ...).
        weights: a local file (a torchvision state dict, optionally under ``'model'``/``'state_dict'``) or a
            torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``, ...).

    Raises:
        CheckpointError: a file path that does not exist or cannot be read; named weights that are neither in
            torch hub's cache nor downloadable.
        ConfigError: neither a file nor a weights name of ``name``.
    """
    if Path(weights).is_file():
        return read_state_dict(weights)
    if weights.endswith(_WEIGHT_FILE_SUFFIXES) or "/" in weights or "\\" in weights:
        raise CheckpointError(f"backbone weights file {weights!r} does not exist",
                              "give the path of an existing state-dict file, or a torchvision weights name such as DEFAULT")
    return torchvision_state_dict(name, weights)


def torch_hub_file(url: str) -> Path:
    """Where torch hub keeps the download of ``url``: ``torch.hub.get_dir()/checkpoints/<file name of the url>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def torchvision_state_dict(name: str, weights: str) -> dict[str, Tensor]:
    """The torchvision weights ``weights`` of network ``name``: read from torch hub's cache, downloaded if absent.

    Raises:
        ConfigError: ``weights`` is not a weights name of ``name``.
        CheckpointError: the file is not in the cache and cannot be downloaded (offline), naming the file, its url
            and where to put it; or the cached file cannot be read.
    """
    enum = torchvision.models.get_model_weights(name)
    try:
        member = enum[weights]
    except KeyError:
        valid = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise ConfigError(f"backbone weights {weights!r} are neither an existing file nor a torchvision weights name of {name}",
                          f"give a state-dict file or one of {valid}") from None
    path = torch_hub_file(member.url)
    if not path.is_file():
        hash_match = torch.hub.HASH_REGEX.search(path.name)
        logging.getLogger(__name__).info("downloading %s to %s", member.url, path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(member.url, str(path), hash_match.group(1) if hash_match else None, progress=True)
        except (OSError, RuntimeError) as err:  # URLError and timeouts are OSErrors; a bad hash is a RuntimeError
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            raise CheckpointError(
                f"torchvision's {name} weights {weights} ({path.name}) are not in torch hub's cache and could not "
                f"be downloaded ({type(err).__name__}: {reason})",
                f"download {member.url} to {path}, or give a local state-dict file as the backbone weights",
            ) from err
    return read_state_dict(path)


# --------------------------------------------------------------------------------------------------------------
# ViT checkpoints
# --------------------------------------------------------------------------------------------------------------


def resize_position_embedding(
    table: Tensor,
    src_grid: tuple[int, int],
    dst_grid: tuple[int, int],
    interpolation: PositionInterpolation = "detr_kit",
) -> Tensor:
    """Resize a table of patch position embeddings to another patch grid by bicubic interpolation.

    Args:
        table: [src_h * src_w, C] or [1, src_h * src_w, C], row-major over the grid, without [CLS] entries.
        src_grid: (src_h, src_w), the grid the table was learned at.
        dst_grid: (dst_h, dst_w), the grid wanted.
        interpolation: "detr_kit" (bicubic, ``align_corners=False``, no antialias: DeiT and ViTDet), "timm"
            (antialiased) or "torchvision" (``align_corners=True``); see ``position_interpolation``.

    Returns:
        [dst_h * dst_w, C]; the table itself when the grids are equal. Computed in float32 at least (float64
        stays float64).

    Raises:
        ValueError: the table's length is not src_h * src_w, or an unknown interpolation.
    """
    table = table.reshape(-1, table.shape[-1])  # [N, C]
    src_h, src_w = src_grid
    if table.shape[0] != src_h * src_w:
        raise ValueError(f"position table has {table.shape[0]} entries, not {src_h}x{src_w} = {src_h * src_w}")
    if tuple(dst_grid) == (src_h, src_w):
        return table
    grid = rearrange(table, "(h w) c -> 1 c h w", h=src_h, w=src_w)  # [1, C, src_h, src_w]
    grid = resize_position_grid(grid, tuple(dst_grid), interpolation)  # [1, C, dst_h, dst_w]
    return rearrange(grid, "1 c h w -> (h w) c")  # [dst_h * dst_w, C]


_HEAD_PREFIXES = ("head.", "heads.", "head_dist.", "fc_norm.", "pre_logits.")  # classification heads, never loaded
_TORCHVISION_BLOCK_NAMES = {
    "ln_1": "norm1",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    # torchvision < 0.13 named the MLP layers linear_1/linear_2
    "mlp.linear_1": "mlp.fc1",
    "mlp.linear_2": "mlp.fc2",
}


def convert_vit_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision or timm/DeiT ViT state dict to ViTBackbone's (timm's) names, dropping the head.

    torchvision: ``class_token``, ``conv_proj``, ``encoder.pos_embedding``,
    ``encoder.layers.encoder_layer_{i}.{ln_1, self_attention.{in_proj_*, out_proj}, ln_2, mlp.{0,3}}``,
    ``encoder.ln``. timm/DeiT: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm`` (kept as they are). A
    ``module.`` prefix (DDP) is removed. Keys of neither layout pass through unchanged.

    Args:
        state_dict: key -> tensor.

    Returns:
        A new dict in ViTBackbone's names, without classification-head keys; tensors are not copied.
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(_HEAD_PREFIXES):
            continue
        if key == "class_token":
            key = "cls_token"
        elif key.startswith("conv_proj."):
            key = "patch_embed.proj." + key.removeprefix("conv_proj.")
        elif key == "encoder.pos_embedding":
            key = "pos_embed"
        elif key.startswith("encoder.ln."):
            key = "norm." + key.removeprefix("encoder.ln.")
        elif key.startswith("encoder.layers.encoder_layer_"):
            index, rest = key.removeprefix("encoder.layers.encoder_layer_").split(".", 1)
            for old, new in _TORCHVISION_BLOCK_NAMES.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            key = f"blocks.{index}.{rest}"
        converted[key] = value
    return converted


def _split_prefix(pos_embed: Tensor) -> tuple[Tensor, Tensor, int]:
    """Split a checkpoint's [1, N, C] table into its prefix-token entries ([CLS], distillation) and a square grid.

    Returns:
        (prefix [1, N - G*G, C], patches [1, G*G, C], G).
    """
    num = pos_embed.shape[1]
    side = math.isqrt(num)
    return pos_embed[:, : num - side * side], pos_embed[:, num - side * side :], side


def fit_position_table(
    pos_embed: Tensor, grid: int, cls_entry: Tensor | None, interpolation: PositionInterpolation = "detr_kit"
) -> Tensor:
    """Fit a checkpoint's position table to a ViTBackbone: prefix entries fitted, patch grid interpolated.

    Args:
        pos_embed: [1, N, C] (or [N, C]) checkpoint table: prefix-token entries ([CLS], distillation) followed by
            a square patch grid.
        grid: G, the side of the model's patch grid (``pretrain_image_size / patch_size``).
        cls_entry: [1, 1, C], the model's own [CLS] position entry, used when the checkpoint's table has none;
            None for a model without a [CLS] token (the checkpoint's prefix entries are then dropped).
        interpolation: the resize convention (see ``resize_position_embedding``).

    Returns:
        [1, G*G, C] without a [CLS] token, else [1, 1 + G*G, C].
    """
    prefix, patches, side = _split_prefix(pos_embed.reshape(1, -1, pos_embed.shape[-1]))
    patches = resize_position_embedding(patches, (side, side), (grid, grid), interpolation)[None]
    if cls_entry is None:
        return patches  # [1, G*G, C]
    if prefix.shape[1] == 0:  # a table without a [CLS] entry: keep the model's
        prefix = cls_entry.to(patches.dtype)
    return torch.cat((prefix[:, :1], patches), dim=1)  # [1, 1 + G*G, C]


def read_vit_state_dict(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Read a ViT checkpoint (a file or a mapping) as a state dict, keys as they are in the file.

    Raises:
        FileNotFoundError: the path does not exist.
    """
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(
            f"ViT weights {str(source)!r} is not a file; ViT backbones load local torchvision or timm/DeiT "
            "state dict files only (weight names such as IMAGENET1K_V1 are not downloaded)"
        )
    return read_state_dict(source)


def checkpoint_interpolation(state_dict: Mapping[str, Tensor]) -> PositionInterpolation:
    """The position-table resize convention of the library that wrote a ViT state dict.

    Returns:
        "torchvision" for torchvision's key layout (``encoder.layers.*``, ``class_token``, ``conv_proj.*``),
        "detr_kit" for a ViTBackbone's own state dict (it has ``pyramid.*`` keys), else "timm" (timm and DeiT
        share timm's layout).
    """
    keys = [key.removeprefix("module.") for key in state_dict]
    if any(key.startswith(("encoder.layers.", "conv_proj.")) or key == "class_token" for key in keys):
        return "torchvision"
    if any(key.startswith("pyramid.") for key in keys):
        return "detr_kit"
    return "timm"


def load_vit_weights(
    backbone: ViTLike,
    source: str | Path | Mapping[str, Tensor],
    interpolation: PositionInterpolation = "detr_kit",
) -> LoadReport:
    """Load a torchvision or timm/DeiT ViT state dict into ``backbone``'s trunk (the pyramid is left as it is).

    Args:
        backbone: the model to load into.
        source: a file path (``.pth``/``.pt``/``.bin`` via torch.load, or ``.safetensors``) or a state dict.
        interpolation: how the checkpoint's position table is resized when its grid differs from the model's
            (see ``resize_position_embedding``; ``checkpoint_interpolation`` names the writer's own convention).

    Returns:
        LoadReport of trunk keys: missing (kept at initialisation), unexpected (ignored) and mismatched
        (always empty: a mismatch raises).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a tensor's shape does not fit the model, or nothing in the state dict fits it.
    """
    state_dict = convert_vit_state_dict(read_vit_state_dict(source))
    if "pos_embed" in state_dict:
        cls_entry = None if backbone.cls_token is None else backbone.pos_embed.detach()[:, :1]  # [1, 1, C]
        state_dict["pos_embed"] = fit_position_table(
            state_dict["pos_embed"], backbone.pretrain_grid, cls_entry, interpolation
        )
    if backbone.cls_token is None:
        state_dict.pop("cls_token", None)

    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith("pyramid.")}
    usable, unexpected, mismatched = match_state_dict(state_dict, own)
    name = source if isinstance(source, (str, Path)) else "the state dict"
    if mismatched or not usable:
        raise ValueError(
            f"ViT weights from {name} do not fit a ViT with C={backbone.embed_dim}, {backbone.depth} blocks, "
            f"patch {backbone.patch_size}: shape mismatches {mismatched[:6]}"
            f"{'' if usable else f'; no key fits (first keys: {list(state_dict)[:6]})'}"
        )
    backbone.load_state_dict(usable, strict=False)
    missing = [key for key in own if key not in usable]
    return LoadReport(missing, unexpected, [])


__all__ = [
    "LoadReport",
    "ViTLike",
    "backbone_state_dict",
    "checkpoint_interpolation",
    "convert_vit_state_dict",
    "fit_position_table",
    "load_body_state_dict",
    "load_vit_weights",
    "match_state_dict",
    "read_state_dict",
    "read_vit_state_dict",
    "resize_position_embedding",
    "torch_hub_file",
    "torchvision_state_dict",
]
