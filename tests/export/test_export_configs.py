"""Every shipped config's model exports to ONNX and TorchScript with dynamic batch, height and width, and the files
compute what the PyTorch model computes at three sizes (two of them odd) and batch sizes 1 and 2.

The PyTorch side is the model as ``build_model`` makes it (the fast modules); the exported side is the plain model
holding the same weights (``build_export_model``), so the comparison is between two implementations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_kit.build import build_model
from detr_kit.config import RESNETS, VITS, load_config
from detr_kit.export import build_export_model, export_verified, verification_sizes

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SIZE = (96, 128)  # exported here; verified also at 121x97 and 73x161
SMALL = ["model.backbone.weights=null", "model.hidden_dim=32", "model.num_heads=2", "model.num_encoder_layers=1",
         "model.num_decoder_layers=2", "model.dim_feedforward=48", "model.num_queries=12", "model.dropout=0.0"]
NUM_CLASSES = 3
# The configs whose ONNX export runs in the fast suite; the others are marked slow (torch.export takes 15-40 s each).
FAST_ONNX = {"detr_r50", "quickstart"}
# Known and open: torch.export fails on the relative-position ViT's attention (a float bias in
# scaled_dot_product_attention: "Cannot view a tensor ... with strides ...") at any size, so this config's ONNX export
# fails (TorchScript works). Strict: the test turns red when it starts to pass.
ONNX_BROKEN = {"vit_two_phase_phase2": "torch.export cannot view the relative-position attention's output"}


def small_models(config: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The config's model at a small width, as built (fast modules), and its plain copy holding the same weights."""
    cfg = load_config(config, SMALL)
    if cfg.model.backbone.name in RESNETS:
        extra = ["model.backbone.name=resnet18", "model.backbone.norm=bn"]
    elif cfg.model.backbone.name in VITS:
        extra = ["model.backbone.name=vit_tiny"]
    else:  # a torchvision classification backbone (custom_cpu's mobilenet_v2): itself, random weights
        extra = []
    if cfg.model.backbone.vit.window_size:  # windows small enough that a 96 px image has several, padded ones
        extra.append("model.backbone.vit.window_size=2")
    if cfg.model.deformable is not None:
        extra.append("model.deformable.num_proposals=12")
    cfg = cfg.replace(extra)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():  # random BN statistics, so that the normalisation is not an identity in the export
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model, build_export_model(cfg, model.state_dict(), NUM_CLASSES)


def _params(fmt: str) -> list:
    marks = {c.stem: () if fmt == "torchscript" or c.stem in FAST_ONNX else (pytest.mark.slow,) for c in CONFIGS}
    if fmt == "onnx":
        for stem, reason in ONNX_BROKEN.items():
            marks[stem] = (*marks[stem], pytest.mark.xfail(reason=reason, strict=True))
    return [pytest.param(c, id=c.stem, marks=marks[c.stem]) for c in CONFIGS]


def _check_dynamic_and_exact(report) -> None:
    expected = {(size, batch) for size in verification_sizes(SIZE) for batch in (1, 2)}
    assert report.dynamic_size and report.fixed_reason is None
    assert {(row.size, row.batch) for row in report.rows} == expected
    for row in report.rows:
        assert row.error is None and row.logits <= 1e-3 and row.boxes <= 1e-4, row.describe()


@pytest.mark.parametrize("config", _params("onnx"))
def test_onnx_export_is_dynamic_and_matches_pytorch(config: Path, tmp_path: Path) -> None:
    import onnxruntime

    model, plain = small_models(config)
    path = tmp_path / "model.onnx"
    report = export_verified(plain, path, "onnx", SIZE, opset=18, reference=model)
    _check_dynamic_and_exact(report)
    assert report.opset == 18 and report.min_size is not None and max(report.min_size) <= 73
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("images", ["batch", 3, "height", "width"])]
    assert [o.name for o in session.get_outputs()] == ["logits", "boxes"]


@pytest.mark.parametrize("config", _params("torchscript"))
def test_torchscript_export_is_dynamic_and_matches_pytorch(config: Path, tmp_path: Path) -> None:
    model, plain = small_models(config)
    path = tmp_path / "model.pt"
    _check_dynamic_and_exact(export_verified(plain, path, "torchscript", SIZE, reference=model))
    # The traced plain model also runs with autograd on (a traced fast model's in-place residuals would not).
    images = torch.randn(1, 3, 80, 112)
    logits, boxes = torch.jit.load(str(path))(images)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(logits.detach(), expected.logits, atol=1e-3, rtol=0)
    torch.testing.assert_close(boxes.detach(), expected.boxes, atol=1e-4, rtol=0)
