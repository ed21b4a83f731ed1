"""``detr_kit.fast.optimize`` replaces modules, not the function: for every shipped config (at a small size) the
plain and the optimized model give the same outputs and gradients in float64, in training and evaluation, and
load each other's state dicts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from detr_kit.build import build_model
from detr_kit.config import load_config
from detr_kit.fast import optimize
from detr_kit.models.backbone.resnet import FrozenBatchNorm2d

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SMALL = ["model.num_classes=3", "model.backbone.weights=null", "model.hidden_dim=32", "model.num_heads=2",
         "model.num_encoder_layers=2", "model.num_decoder_layers=2", "model.dim_feedforward=48",
         "model.num_queries=12", "model.dropout=0.0", "model.fast=false"]


def small_config(path: Path):
    cfg = load_config(path, SMALL)
    extra = []
    if cfg.model.backbone.name.startswith("resnet"):
        extra.append("model.backbone.name=resnet18")  # the config's norm (frozen BN for the R50 recipes) is kept
    else:
        extra.append("model.backbone.name=vit_tiny")
    if cfg.model.deformable is not None:
        extra += ["model.deformable.num_proposals=12", "model.deformable.enc_points=2", "model.deformable.dec_points=2"]
    return cfg.replace(extra)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Statistics and weights away from their initial values, so that every replaced module matters."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.normal_(0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
    return model


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 72, 100, generator=generator, dtype=torch.float64)
    mask = torch.zeros(2, 72, 100, dtype=torch.bool)
    mask[1, 50:, :] = True
    mask[1, :, 80:] = True
    return images.masked_fill(mask[:, None], 0.0), mask


def outputs_and_gradients(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, train: bool):
    model.train(train)
    model.zero_grad(set_to_none=True)
    inputs = images.clone().requires_grad_(train)
    torch.manual_seed(5)  # the same stochastic-depth draws (ViT) for both models
    with torch.set_grad_enabled(train):
        out = model(inputs, mask)
    tensors = [out.logits, out.boxes, *[t for pair in out.aux for t in pair], *(out.encoder or ())]
    if not train:
        return [t.detach() for t in tensors], {}
    sum(t.square().sum() for t in tensors).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["images"] = inputs.grad
    return [t.detach() for t in tensors], grads


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_plain_and_optimized_models_compute_the_same_function_in_float64(config: Path) -> None:
    torch.manual_seed(0)
    plain = randomized(build_model(small_config(config)).double())
    fast = optimize(copy.deepcopy(plain))
    assert set(fast.state_dict()) == set(plain.state_dict())
    replaced = {type(m).__name__ for m in fast.modules()} - {type(m).__name__ for m in plain.modules()}
    assert replaced, "optimize replaced nothing"
    images, mask = padded_batch()
    for train in (False, True):
        expected, expected_grads = outputs_and_gradients(plain, images, mask, train)
        got, got_grads = outputs_and_gradients(fast, images, mask, train)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        assert got_grads.keys() == expected_grads.keys()
        # The gradients are ill-conditioned: a 1e-15 relative change of the input alone moves the plain DETR's
        # backbone gradients by ~7e-8 of their largest entry (its decoder starts from zero states, whose attention
        # gradients are differences of equal terms). So each is compared to within 1e-6 of its largest entry;
        # float32 arithmetic or a wrong formula is off by 1e-3 or more.
        for name in expected_grads:
            scale = float(expected_grads[name].abs().max())
            torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=0, atol=1e-6 * scale + 1e-12, msg=name)

def test_state_dicts_load_both_ways_and_optimize_is_idempotent() -> None:
    cfg = small_config(Path("configs/deformable_detr_two_stage.yaml"))
    torch.manual_seed(0)
    plain = randomized(build_model(cfg)).eval()
    torch.manual_seed(1)
    fast = build_model(cfg.replace(["model.fast=true"])).eval()  # other weights
    fast.load_state_dict(plain.state_dict())
    images, mask = padded_batch()
    images = images.float()
    with torch.no_grad():
        torch.testing.assert_close(fast(images, mask).logits, plain(images, mask).logits, rtol=1e-4, atol=1e-5)
        torch.manual_seed(2)
        other = build_model(cfg).eval()
        other.load_state_dict(fast.state_dict())
        torch.testing.assert_close(other(images, mask).boxes, plain(images, mask).boxes, rtol=1e-4, atol=1e-5)
    kinds = [type(m) for m in fast.modules()]
    optimize(fast)
    assert [type(m) for m in fast.modules()] == kinds
