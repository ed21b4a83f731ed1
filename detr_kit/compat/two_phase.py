"""Two-phase training of a ViT (Li, Chen, He and Hsieh, arXiv 2111.01353): the step between the phases.

Phase 1 trains a detector whose ViT uses convolutional attention (``model.backbone.vit.conv_radius > 0``).
``to_attention_checkpoint`` turns its checkpoint into a phase-2 checkpoint: the same detector with ordinary
self-attention and a relative position bias (``conv_radius: 0``, ``relative_position: true``), every block
converted by ``models.backbone.conv_to_attention.convert_backbone`` so that it computes what phase 1 computed (to
the stated softmax tolerance), every other tensor copied. Phase 2 starts from it with ``train.init_from``.
``tools/convert.py --to-attention`` runs it.

The written checkpoint records the phase: ``two_phase = {"phase": 2, "converted_from": <file>, "phase1_epoch":
<epochs trained>, "bias_magnitude": β, "max_feature_difference": <measured>}``, and its ``config`` is the phase-2
config (phase 1's with the two attention keys changed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from detr_kit.errors import CheckpointError

PHASE2_OVERRIDES = ("model.backbone.vit.conv_radius=0", "model.backbone.vit.relative_position=true")


def phase2_config(phase1_config: Any, source: str) -> Any:
    """Phase 1's Config with self-attention and relative positions in place of convolutional attention."""
    return phase1_config.replace(list(PHASE2_OVERRIDES), source=f"{source} (phase 2)")


def to_attention_checkpoint(
    checkpoint: Mapping[str, Any], source: str, bias_magnitude: float = 10.0
) -> dict[str, Any]:
    """Convert a phase-1 detr_kit checkpoint into the phase-2 checkpoint (see the module docstring).

    Args:
        checkpoint: what ``tools/train.py`` wrote for a phase-1 config (``model``, ``config``, ``label_map``).
        source: its file name, for messages and the record.
        bias_magnitude: β of the one-hot bias; the attention puts at most about 4 e^-β of its weight off the
            convolution's patches (1.8e-4 at 10). Larger is more exact; smaller leaves the softmax less
            saturated, so the bias and the new content attention learn faster in phase 2.

    Returns:
        The phase-2 checkpoint: ``model``, ``config``, ``label_map``, ``id2label``, ``epoch`` 0, ``step`` 0 and
        ``two_phase``.

    Raises:
        CheckpointError: not a detr_kit checkpoint of a phase-1 ViT, or weights that do not fit its config.
    """
    from detr_kit.build import build_model
    from detr_kit.config import config_from_dict
    from detr_kit.models.backbone.conv_to_attention import convert_backbone
    from detr_kit.structures import LabelMap

    missing = [key for key in ("model", "config", "label_map") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}", "give a last.pth or best.pth that tools/train.py wrote")
    cfg = config_from_dict(checkpoint["config"], source=source).replace(
        ["model.backbone.weights=null", "model.compile=false", "model.fast=false"], source=source
    )
    vit = cfg.model.backbone.vit
    if not cfg.model.backbone.name.startswith("vit") or vit.conv_radius < 1:
        raise CheckpointError(
            f"{source} is not a phase-1 checkpoint (backbone {cfg.model.backbone.name}, conv_radius {vit.conv_radius})",
            "convert a checkpoint trained with model.backbone.vit.conv_radius >= 1 (configs/vit_two_phase_phase1.yaml)",
        )
    num_classes = len(LabelMap.from_dict(checkpoint["label_map"]))
    torch.manual_seed(0)  # phase 2's query projections keep a reproducible random initialisation
    phase1 = build_model(cfg, num_classes=num_classes).eval()
    cfg2 = phase2_config(cfg, source)
    phase2 = build_model(cfg2, num_classes=num_classes).eval()
    try:
        phase1.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        first = (str(err).splitlines()[1:2] or [str(err)])[0].strip()[:160]
        raise CheckpointError(f"{source}: its weights do not fit its own config ({first})",
                              "give an unmodified checkpoint that tools/train.py wrote") from err

    others = {key: value for key, value in phase1.state_dict().items() if not key.startswith("backbone.")}
    phase2.load_state_dict(others, strict=False)
    try:
        convert_backbone(phase1.backbone, phase2.backbone, bias_magnitude)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}", "set model.backbone.vit.relative_position_max_distance "
                              "above conv_radius in the phase-1 config") from err
    difference = _max_feature_difference(phase1.backbone, phase2.backbone)
    state = {key: value.contiguous() for key, value in phase2.state_dict().items()}
    return {
        "model": state,
        "config": _restore_flags(cfg2, checkpoint["config"]).to_dict(),
        "label_map": checkpoint["label_map"],
        "id2label": checkpoint.get("id2label", LabelMap.from_dict(checkpoint["label_map"]).id2label),
        "epoch": 0,
        "step": 0,
        "two_phase": {
            "phase": 2,
            "converted_from": source,
            "phase1_epoch": int(checkpoint.get("epoch", 0)),
            "bias_magnitude": float(bias_magnitude),
            "max_feature_difference": difference,
        },
    }


def _restore_flags(cfg2: Any, original: Mapping[str, Any]) -> Any:
    """Phase 2's config with the flags the conversion switched off for itself (fast, compile) as phase 1 had them."""
    model = original.get("model", {})
    flags = [f"model.{key}={str(model[key]).lower()}" for key in ("fast", "compile") if key in model]
    return cfg2.replace(flags, source="phase 2") if flags else cfg2


@torch.no_grad()
def _max_feature_difference(phase1: torch.nn.Module, phase2: torch.nn.Module) -> float:
    """Largest difference between the two backbones' features on a padded random batch (float64 copies)."""
    import copy

    first, second = copy.deepcopy(phase1).double(), copy.deepcopy(phase2).double()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 160, 224, dtype=torch.float64, generator=generator)
    mask = torch.zeros(2, 160, 224, dtype=torch.bool)
    mask[1, 120:] = True
    mask[1, :, 150:] = True
    return max(
        (a.features - b.features).abs().max().item() for a, b in zip(first(images, mask), second(images, mask))
    )


__all__ = ["PHASE2_OVERRIDES", "phase2_config", "to_attention_checkpoint"]
