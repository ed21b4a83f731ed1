"""Start training from pretrained detector weights: detr_kit, official or Hugging Face checkpoints.

``load_pretrained(model, source)`` reads the checkpoint, converts its keys to detr_kit names when it is an
official or Hugging Face one, and loads every tensor whose name and shape match. When the checkpoint was
trained for another number of classes (COCO's 91 slots -> your K), the class heads are re-initialised:
sigmoid (focal) heads as Deformable-DETR initialises them (bias = -log((1 - 0.01) / 0.01)), softmax heads as
DETR does (PyTorch's default Linear initialisation). Everything else that does not fit is left as the model
initialised it and listed in the report.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from detr_kit.compat.hf import convert_hf_checkpoint, is_hf_state_dict
from detr_kit.compat.official import convert_official_checkpoint, unwrap_checkpoint
from detr_kit.errors import CheckpointError, checkpoint_load_error
from detr_kit.models.heads import focal_prior_bias

CheckpointFormat = Literal["detr_kit", "official", "hf"]

# Files a checkpoint folder may hold, in the order they are tried (Hugging Face save_pretrained writes the first
# two; detr_kit training runs write the others).
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "checkpoint_best.pth", "checkpoint.pth", "model.pth")
_LIST_LIMIT = 12


class PretrainedLoadReport(NamedTuple):
    """What ``load_pretrained`` did, key by key (detr_kit names).

    source_format: "detr_kit", "official" or "hf".
    loaded: keys copied from the checkpoint.
    reinitialized: class-head keys re-initialised because the class count differs.
    missing: model keys the checkpoint lacks (left as initialised).
    unexpected: checkpoint keys the model lacks (ignored).
    mismatched: ``"key: checkpoint (shape) vs model (shape)"`` for other shape conflicts (left as initialised).
    """

    source_format: str
    loaded: list[str]
    reinitialized: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def summary(self, source: str = "") -> str:
        """A few lines for the log."""
        total = len(self.loaded) + len(self.reinitialized) + len(self.missing) + len(self.mismatched)
        lines = [f"load_pretrained: {self.source_format} checkpoint {source}".rstrip() + f": loaded {len(self.loaded)}/{total} tensors"]
        for title, keys in (
            ("re-initialised (class count differs)", self.reinitialized),
            ("missing (kept as initialised)", self.missing),
            ("unexpected (ignored)", self.unexpected),
            ("shape mismatch (kept as initialised)", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:_LIST_LIMIT])
                more = f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
                lines.append(f"  {title}: {shown}{more}")
        return "\n".join(lines)


def read_checkpoint(source: str | Path | Mapping[str, Any], trusted: bool = False) -> Mapping[str, Any]:
    """Read a checkpoint file or folder into a dict (the mapping itself is passed through).

    Args:
        source: a ``.pth``/``.pt``/``.bin`` file (torch.load), a ``.safetensors`` file, a folder holding one of
            model.safetensors, pytorch_model.bin, checkpoint_best.pth, checkpoint.pth, model.pth (Hugging Face
            ``save_pretrained`` folders included), or an already loaded mapping.
        trusted: allow arbitrary pickled objects (``torch.load(weights_only=False)``); only for files you trust.
            Without it, only tensors, plain values and argparse Namespaces (the official ``args``) load.

    Raises:
        CheckpointError: the path or a usable file in the folder does not exist, the file is broken, or it
            holds something else than a dict.
        PickledCodeError: the file holds pickled code and ``trusted`` is False.
    """
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_dir():
        found = next((path / name for name in _FOLDER_FILES if (path / name).is_file()), None)
        if found is None:
            raise CheckpointError(f"checkpoint folder {str(path)!r} holds none of {', '.join(_FOLDER_FILES)}",
                                  "pass the checkpoint file itself")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist", "give the path of a checkpoint file or folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types for broken files
            raise checkpoint_load_error(path, err) from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            with warnings.catch_warnings():  # torch warns about the pickle protocol of files it did not write
                warnings.filterwarnings("ignore", "Detected pickle protocol")
                checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # unpickling errors have many types
        raise checkpoint_load_error(path, err) from err
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a dict",
                              "give a state dict or a checkpoint dict")
    return checkpoint


def read_hf_config(source: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` beside a Hugging Face checkpoint (in its folder, or the file's folder), else None."""
    path = Path(source)
    config = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def detect_checkpoint_format(checkpoint: Mapping[str, Any]) -> CheckpointFormat:
    """Tell a detr_kit, an official DETR / Deformable-DETR and a Hugging Face checkpoint apart by their keys."""
    if "config" in checkpoint and isinstance(checkpoint.get("model"), Mapping):
        return "detr_kit"
    state_dict, _ = unwrap_checkpoint(checkpoint)
    if is_hf_state_dict(state_dict):
        return "hf"
    if any(k.startswith(("backbone.0.", "backbone.1.")) for k in state_dict):
        return "official"
    return "detr_kit"


def checkpoint_state_dict(checkpoint: Mapping[str, Any]) -> tuple[CheckpointFormat, dict[str, Tensor]]:
    """The checkpoint's weights under detr_kit key names, and the format they came in."""
    fmt = detect_checkpoint_format(checkpoint)
    if fmt == "hf":
        return fmt, convert_hf_checkpoint(checkpoint)
    if fmt == "official":
        return fmt, convert_official_checkpoint(checkpoint)
    state_dict, _ = unwrap_checkpoint(checkpoint)
    return fmt, state_dict


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The detector inside torch.compile / DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _class_heads(model: nn.Module) -> dict[str, nn.Linear]:
    """The class heads: Linear modules named ``class_embed`` or elements of a ModuleList named so."""
    heads = {}
    for name, module in model.named_modules(remove_duplicate=False):
        parts = name.split(".")
        is_head = parts[-1] == "class_embed" or (len(parts) > 1 and parts[-2] == "class_embed" and parts[-1].isdigit())
        if is_head and isinstance(module, nn.Linear):
            heads[name] = module
    return heads


@torch.no_grad()
def reinitialize_class_head(head: nn.Linear, num_classes: int) -> None:
    """Initialise a class head as the papers do: focal prior bias for sigmoid heads, default Linear for softmax.

    Args:
        head: the Linear producing K (sigmoid) or K + 1 (softmax, last = no object) logits.
        num_classes: K.

    Raises:
        ValueError: ``head`` has neither K nor K + 1 outputs.
    """
    if head.out_features not in (num_classes, num_classes + 1):
        raise ValueError(
            f"a class head with {head.out_features} outputs fits neither K={num_classes} (sigmoid) "
            f"nor K+1={num_classes + 1} (softmax)"
        )
    head.reset_parameters()
    if head.out_features == num_classes and head.bias is not None:  # sigmoid: every class starts at p = 0.01
        head.bias.fill_(focal_prior_bias(0.01))


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    log: Callable[[str], None] | None = print,
    trusted: bool = False,
) -> PretrainedLoadReport:
    """Load pretrained detector weights for fine-tuning.

    Accepts detr_kit checkpoints, official DETR / Deformable-DETR checkpoints (``.pth``, raw or under
    ``model``) and Hugging Face ``DetrForObjectDetection`` / ``DeformableDetrForObjectDetection`` weights
    (a ``save_pretrained`` folder, ``.safetensors``, ``.bin`` or a state dict); the format is detected from the
    keys. Every tensor whose name and shape match is copied. If the class heads (and DINO's denoising label
    embedding) do not match (another class count) they are re-initialised; other mismatches stay as the model
    initialised them.

    Args:
        model: the detr_kit detector (it may be wrapped by torch.compile or DDP).
        source: a path (file or folder) or an already loaded checkpoint / state dict.
        log: called with the printed report; None for silence.
        trusted: see ``read_checkpoint``.

    Returns:
        PretrainedLoadReport listing loaded, re-initialised, missing, unexpected and mismatched keys.

    Raises:
        CheckpointError: an unreadable source, or keys no conversion rule knows.
        PickledCodeError: the file holds pickled code and ``trusted`` is False.
    """
    target = _unwrap_model(model)
    checkpoint = read_checkpoint(source, trusted=trusted)
    try:
        fmt, state_dict = checkpoint_state_dict(checkpoint)
    except ValueError as err:  # the converters name the key no rule knows
        raise CheckpointError(f"{source if not isinstance(source, Mapping) else 'the checkpoint'}: {err}",
                              "give a detr_kit, official DETR / Deformable-DETR or Hugging Face checkpoint") from err
    own = target.state_dict()
    usable: dict[str, Tensor] = {}
    unexpected: list[str] = []
    conflicts: dict[str, str] = {}
    for key, value in state_dict.items():
        if key not in own:
            unexpected.append(key)
        elif own[key].shape != value.shape:
            conflicts[key] = f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        else:
            usable[key] = value
    target.load_state_dict(usable, strict=False)

    reinitialized: list[str] = []
    num_classes = getattr(target, "num_classes", None)
    for name, module in target.named_modules():
        key = f"{name}.weight"
        if name.split(".")[-1] == "label_enc" and isinstance(module, nn.Embedding) and key in conflicts:
            module.reset_parameters()  # DINO's denoising label embedding has one row per class (+1)
            reinitialized.append(key)
            del conflicts[key]
    for name, head in _class_heads(target).items():
        keys = [f"{name}.{p}" for p, _ in head.named_parameters()]
        if any(k in conflicts for k in keys):
            if num_classes is None:
                raise ValueError("the model has no num_classes attribute; cannot re-initialise its class heads")
            reinitialize_class_head(head, int(num_classes))
            reinitialized.extend(keys)
            for k in keys:
                conflicts.pop(k, None)
                usable.pop(k, None)
    missing = [k for k in own if k not in usable and k not in conflicts and k not in reinitialized]
    report = PretrainedLoadReport(
        fmt, sorted(usable), reinitialized, missing, sorted(unexpected), sorted(conflicts.values())
    )
    if log is not None:
        log(report.summary(str(source) if not isinstance(source, Mapping) else ""))
    return report


__all__ = [
    "PretrainedLoadReport",
    "checkpoint_state_dict",
    "detect_checkpoint_format",
    "load_pretrained",
    "read_checkpoint",
    "read_hf_config",
    "reinitialize_class_head",
]
