"""Every shipped config's model is compile- and device-clean: ``torch.compile(fullgraph=True)`` captures its whole
eval forward as one graph (no host sync, no data-dependent Python control flow), equal to eager, and a forward and
backward run on the ``meta`` device (shapes only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_kit.build import build_model
from detr_kit.config import load_config
from detr_kit.engine.step import outputs_sum, takes_targets
from detr_kit.structures import Target

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SMALL = ["model.num_classes=3", "model.backbone.weights=null", "model.hidden_dim=32", "model.num_heads=2",
         "model.num_encoder_layers=1", "model.num_decoder_layers=2", "model.dim_feedforward=48",
         "model.num_queries=12"]


def small_model(path: Path, overrides: tuple[str, ...] = ()) -> torch.nn.Module:
    cfg = load_config(path, SMALL)
    extra = ["model.backbone.name=resnet18" if cfg.model.backbone.name.startswith("resnet") else "model.backbone.name=vit_tiny"]
    if cfg.model.deformable is not None:
        extra.append("model.deformable.num_proposals=12")
    torch.manual_seed(0)
    return build_model(cfg.replace([*extra, *overrides]))


def padded_batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 72, 100, generator=generator).to(device)
    mask = torch.zeros(2, 72, 100, dtype=torch.bool, device=device)
    mask[1, 50:, :] = True
    mask[1, :, 80:] = True
    return images, mask


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_eval_forward_compiles_to_one_graph_equal_to_eager(config: Path) -> None:
    torch._dynamo.reset()
    model = small_model(config).eval()
    images, mask = padded_batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break raises here
    with torch.no_grad():
        expected = model(images, mask)
        got = compiled(images, mask)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes, expected.boxes, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_inductor_compiles_the_quickstart_model() -> None:
    """The real compiler (inductor, C++ on the CPU) on the quickstart's model: one graph, equal to eager."""
    torch._dynamo.reset()
    model = small_model(Path("configs/quickstart.yaml")).eval()
    images, mask = padded_batch()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images, mask).boxes, model(images, mask).boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_forward_and_backward_on_the_meta_device(config: Path) -> None:
    cfg = load_config(config, ["model.num_classes=3", "model.backbone.weights=null"])  # the full-size model
    with torch.device("meta"):
        model = build_model(cfg).train()
    images, mask = padded_batch("meta")
    if takes_targets(model):  # the training forward of detectors that read targets (DINO's denoising queries)
        targets = [Target(torch.full((3, 4), 0.25), torch.tensor([0, 1, 2])), Target(torch.zeros(0, 4), [])]
        output = model(images, mask, targets=[t.to("meta") for t in targets])
    else:
        output = model(images, mask)
    assert output.logits.device.type == "meta" and output.boxes.shape[-1] == 4
    outputs_sum(output).backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device.type == "meta" for p in trained)


@pytest.mark.slow
def test_windowed_relative_position_vit_with_timm_resizing_compiles_to_one_graph() -> None:
    """The ViT options no shipped config combines: relative position bias in windowed and global blocks, and the
    antialiased (timm) per-image resize of the position table."""
    torch._dynamo.reset()
    config = Path(__file__).resolve().parents[2] / "configs" / "deformable_detr_vit.yaml"
    model = small_model(config, ("model.backbone.vit.relative_position=true",
                                 "model.backbone.vit.position_interpolation=timm")).eval()
    images, mask = padded_batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images, mask).boxes, model(images, mask).boxes, atol=1e-4, rtol=0)
