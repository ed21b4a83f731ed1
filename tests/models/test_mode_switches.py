"""Every shipped config's model survives mode switches: train -> inference_mode eval -> train -> no_grad eval.

A tensor kept by a module across calls (a cache, a lazily built buffer) takes the mode it was made in: one made
under ``torch.inference_mode()`` cannot be saved for backward by a later training step. The evaluator runs under
``inference_mode``, so a shape first seen in evaluation and seen again in training used to crash the step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_kit.build import build_model
from detr_kit.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SMALL = ["model.num_classes=3", "model.backbone.weights=null", "model.hidden_dim=64", "model.num_heads=4",
         "model.num_encoder_layers=2", "model.num_decoder_layers=2", "model.dim_feedforward=128", "model.num_queries=20"]


def small_config(path: Path):
    """The config's architecture (levels, refinement, two-stage, backbone family, norms) at a small size."""
    cfg = load_config(path, SMALL)
    backbone = "resnet18" if cfg.model.backbone.name.startswith("resnet") else "vit_tiny"
    extra = [f"model.backbone.name={backbone}"]
    if cfg.model.deformable is not None:
        extra.append("model.deformable.num_proposals=20")
    return cfg.replace(extra)


def _train_step(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor | None) -> None:
    model.train()
    output = model(images, mask)
    loss = output.logits.float().sum() + output.boxes.float().sum()
    for logits, boxes in output.aux:
        loss = loss + logits.float().sum() + boxes.float().sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def _padded(batch: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[-1, height * 3 // 4 :, :] = True  # the last image is shorter: a padded batch, as real photos give
    return images.masked_fill(mask[:, None], 0.0), mask


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_train_inference_mode_train_no_grad_on_same_and_other_shapes(config: Path) -> None:
    torch.manual_seed(0)
    model = build_model(small_config(config))
    same = _padded(2, 96, 128, seed=1)
    other = _padded(2, 128, 96, seed=2)
    for images, mask in (same, other):
        model.eval()
        with torch.inference_mode():  # the evaluator's mode: the first sight of this shape
            model(images, mask)
        _train_step(model, images, mask)  # the same shape in training
        model.eval()
        with torch.no_grad():
            model(images, mask)
        _train_step(model, *other)
        model.eval()
        with torch.inference_mode():
            model(images, None)  # no mask at all (the export's and Detector's single-image case)
        _train_step(model, images, None)
