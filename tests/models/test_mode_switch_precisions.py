"""The mode-switch matrix of ``test_mode_switches.py`` in other precisions, and the modes in between.

Every shipped config's model (shrunk: ResNet-18 or ViT-Tiny with the config's own norm, 64 channels, 1 + 2 layers)
runs train -> ``inference_mode`` eval -> train -> ``no_grad`` eval on two padded shapes under CPU bf16 autocast (what
``train.amp=bf16`` and the evaluator do), as a ``.double()`` model and as a ``.bfloat16()`` model. Any state a module
kept across calls that is keyed by shape or mode but not by dtype (or the reverse) fails here. Also: a train-mode
forward without autograd followed by a training step, and an eval-mode forward with autograd.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable

import pytest
import torch

from detr_kit.build import build_model
from detr_kit.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SHRINK = ["model.num_classes=3", "model.backbone.weights=null", "model.hidden_dim=64", "model.num_heads=4",
          "model.num_encoder_layers=1", "model.num_decoder_layers=2", "model.dim_feedforward=128",
          "model.num_queries=12"]


def _small_model(config: Path) -> torch.nn.Module:
    backbone = [] if config.stem == "quickstart" else [
        f"model.backbone.name={'vit_tiny' if 'vit' in config.stem else 'resnet18'}"
    ]
    cfg = load_config(config, [*SHRINK, *backbone])
    if cfg.model.deformable is not None:
        cfg = cfg.replace(["model.deformable.num_proposals=12"])
    torch.manual_seed(0)
    return build_model(cfg)  # the configs' dropout (0.1) stays on


def _padded(height: int, width: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, the second one shorter: [2, 3, H, W] zero on padding, mask [2, H, W] True on padding."""
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, height * 3 // 4 :] = True
    return images.masked_fill(mask[:, None], 0.0).to(dtype), mask


def _total(output) -> torch.Tensor:  # noqa: ANN001
    tensors = [output.logits, output.boxes, *(t for pair in output.aux for t in pair), *(output.encoder or ())]
    return sum(t.float().sum() for t in tensors)


def _train_step(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, context: Callable) -> None:
    model.train()
    with context():
        output = model(images, mask)
    model.zero_grad(set_to_none=True)
    loss = _total(output)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == p.dtype for g, p in zip(grads, (p for p in model.parameters() if p.grad is not None)))
    assert all(torch.isfinite(g).all() for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)


def _evaluate(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor | None, context: Callable,
              grad_mode: Callable) -> None:
    model.eval()
    with grad_mode(), context():
        output = model(images, mask)
    assert torch.isfinite(output.logits.float()).all() and torch.isfinite(output.boxes.float()).all()


PRECISIONS = {  # name: (the model's dtype, the forward passes' context)
    "bf16_autocast": (torch.float32, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    "float64": (torch.float64, contextlib.nullcontext),
    "bfloat16": (torch.bfloat16, contextlib.nullcontext),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_mode_switches_in_every_precision(config: Path, precision: str) -> None:
    dtype, context = PRECISIONS[precision]
    model = _small_model(config).to(dtype)
    same, other = _padded(64, 96, seed=1, dtype=dtype), _padded(96, 64, seed=2, dtype=dtype)
    for images, mask in (same, other):
        _evaluate(model, images, mask, context, torch.inference_mode)  # the evaluator's mode sees this shape first
        _train_step(model, images, mask, context)
        _evaluate(model, images, mask, context, torch.no_grad)
        _train_step(model, *other, context)
    _evaluate(model, same[0], None, context, torch.inference_mode)  # no mask (Detector and export, one image)
    _train_step(model, same[0], same[1], context)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_a_float64_model_computes_what_the_float32_model_does(config: Path) -> None:
    """``.double()`` reaches every tensor a forward makes from parameters (nothing stays float32 by accident)."""
    model = _small_model(config).eval()
    images, mask = _padded(96, 128, seed=3, dtype=torch.float32)
    with torch.inference_mode():
        single = model(images, mask)
        double = copy.deepcopy(model).double()(images.double(), mask)
    assert double.logits.dtype == double.boxes.dtype == torch.float64
    scale = float(single.logits.abs().max())
    torch.testing.assert_close(double.logits.float(), single.logits, atol=1e-4 * max(scale, 1.0), rtol=0)
    torch.testing.assert_close(double.boxes.float(), single.boxes, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_train_mode_without_autograd_and_eval_mode_with_it(config: Path) -> None:
    """A train-mode forward under inference_mode / no_grad (e.g. a validation loss), then a training step; and an
    eval-mode forward with autograd (e.g. fine-tuning with frozen statistics), whose gradients reach the weights."""
    model = _small_model(config)
    images, mask = _padded(96, 128, seed=4, dtype=torch.float32)
    model.train()
    for grad_mode in (torch.inference_mode, torch.no_grad):
        with grad_mode():
            output = model(images, mask)
        assert torch.isfinite(output.logits).all()
    _train_step(model, images, mask, contextlib.nullcontext)
    model.eval()
    model.zero_grad(set_to_none=True)
    _total(model(images, mask)).backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    _evaluate(model, images, mask, contextlib.nullcontext, torch.inference_mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_mode_switches_across_devices(config: Path) -> None:
    """CPU inference, then training and inference on the GPU (float32 and bf16 autocast; a .half() copy for
    inference), then the CPU again: nothing a forward keeps may stay on the device, dtype or mode it was made in."""
    model = _small_model(config)
    images, mask = _padded(64, 96, seed=5, dtype=torch.float32)
    _evaluate(model, images, mask, contextlib.nullcontext, torch.inference_mode)
    model.cuda()
    on_gpu = images.cuda(), mask.cuda()
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    for context in (contextlib.nullcontext, bf16):
        _train_step(model, *on_gpu, context)
        _evaluate(model, *on_gpu, context, torch.inference_mode)
        _train_step(model, *on_gpu, context)
    half = copy.deepcopy(model).half()  # a .half() copy for inference, as a user would make one
    _evaluate(half, on_gpu[0].half(), on_gpu[1], contextlib.nullcontext, torch.inference_mode)
    model.cpu()
    _train_step(model, images, mask, contextlib.nullcontext)
    _evaluate(model, images, mask, contextlib.nullcontext, torch.no_grad)
