"""tools/export.py as a user runs it (subprocess), then tools/infer.py on the file it wrote: the verification table,
a fixed size on request, refusals before any work, and ``infer.py --onnx`` writing the checkpoint's detections.json
on the bundled real photographs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from detr_kit.build import build_model
from detr_kit.config import config_from_dict
from detr_kit.data.coco import load_coco_json
from detr_kit.engine.checkpoint import save_checkpoint
from detr_kit.structures import LabelMap

ROOT = Path(__file__).resolve().parents[2]
COCO128 = ROOT / "data" / "coco128"
BACKBONE = {"name": "resnet18", "weights": None, "norm": "bn"}
COMMON = {"hidden_dim": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 2, "dim_feedforward": 64,
          "num_queries": 12, "dropout": 0.0, "backbone": BACKBONE}
DATA = {"eval_size": 128, "max_size": 192, "train_scales": [128]}
TINY = {
    "detr": {"model": {**COMMON, "deformable": None}, "data": DATA},
    "deformable_detr": {"model": {**COMMON, "deformable": {"num_feature_levels": 3, "enc_points": 2, "dec_points": 2,
                                                           "box_refine": True}},
                        "data": DATA, "eval": {"top_k": 20}},
}


def _checkpoint(folder: Path, arch: str) -> Path:
    """A tiny checkpoint (random weights and BN statistics) with the COCO label map of data/coco128."""
    categories = load_coco_json(COCO128 / "annotations" / "instances_val.json")["categories"]
    label_map = LabelMap.from_coco_categories(categories)
    cfg = config_from_dict(TINY[arch])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=len(label_map)).eval()
    with torch.no_grad():  # random BN statistics, so that normalisation is not an identity in the export
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = folder / f"{arch}.pth"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "label_map": label_map.to_dict(),
                           "id2label": label_map.id2label})
    return path


def _tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _table_rows(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if "max |diff|" in line or "failed" in line]


@pytest.mark.slow
def test_onnx_export_then_infer_onnx_writes_the_checkpoints_detections(tmp_path: Path):
    checkpoint = _checkpoint(tmp_path, "deformable_detr")
    exported = _tool("export.py", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", "detector.onnx",
                     cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    rows = _table_rows(exported.stdout)
    # eval_size 128 -> exported at 128x170, verified there and at 161x127 and 97x213, batch sizes 1 and 2.
    assert [row.split(":")[0] for row in rows] == ["1x3x128x170", "2x3x128x170", "1x3x161x127", "2x3x161x127",
                                                   "1x3x97x213", "2x3x97x213"]
    assert all(row.endswith("ok") for row in rows) and "dynamic B, H and W" in exported.stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "detector.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]

    annotations = load_coco_json(COCO128 / "annotations" / "instances_val.json")
    val = sorted(image["file_name"] for image in annotations["images"])
    images = [str(COCO128 / "images" / name) for name in val]  # 32 real photographs, many sizes and aspect ratios
    common = ["--threshold", "0.0", "--batch-size", "3"]
    torch_run = _tool("infer.py", "--checkpoint", str(checkpoint), *images, "--out", "torch", "--device", "cpu",
                      *common, cwd=tmp_path)
    onnx_run = _tool("infer.py", "--onnx", "detector.onnx", *images, "--out", "onnx", *common, cwd=tmp_path)
    assert torch_run.returncode == 0 and onnx_run.returncode == 0, torch_run.stderr + onnx_run.stderr
    expected = json.loads((tmp_path / "torch" / "detections.json").read_text())
    got = json.loads((tmp_path / "onnx" / "detections.json").read_text())
    assert len(got) == len(expected) == 32 * 20  # eval.top_k from the file's metadata, threshold 0
    for want, have in zip(expected, got):
        assert (have["image_id"], have["file_name"], have["category_id"]) == \
            (want["image_id"], want["file_name"], want["category_id"])
        assert abs(have["score"] - want["score"]) <= 1e-4, (want, have)
        np.testing.assert_allclose(have["bbox"], want["bbox"], atol=0.1, rtol=0)  # pixels of up to 640 px images
    for name in val:  # the same drawn images
        with Image.open(tmp_path / "torch" / name) as want, Image.open(tmp_path / "onnx" / name) as have:
            assert want.size == have.size
            assert np.abs(np.asarray(want, np.int16) - np.asarray(have, np.int16)).mean() < 0.5, name


def test_torchscript_export_prints_its_verification_table(tmp_path: Path):
    checkpoint = _checkpoint(tmp_path, "deformable_detr")
    result = _tool("export.py", "--checkpoint", str(checkpoint), "--format", "torchscript", "--image-size", "96", "112",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _table_rows(result.stdout)
    assert len(rows) == 6 and all(row.endswith("ok") for row in rows), result.stdout
    extra = {"detr_kit.label_map": ""}
    traced = torch.jit.load(str(tmp_path / "deformable_detr.pt"), _extra_files=extra)  # default name: .pt
    assert json.loads(extra["detr_kit.label_map"])["category_ids"][:3] == [1, 2, 3]
    logits, boxes = traced(torch.randn(3, 3, 81, 150))  # a third batch size and size
    assert logits.shape == (3, 12, 80) and boxes.shape == (3, 12, 4)


def test_static_size_exports_a_fixed_size_and_says_so(tmp_path: Path):
    checkpoint = _checkpoint(tmp_path, "detr")
    result = _tool("export.py", "--checkpoint", str(checkpoint), "--format", "torchscript", "--image-size", "96", "128",
                   "--static-size", "--out", "fixed.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[B, 3, 96, 128], dynamic B" in result.stdout
    assert [row.split(":")[0] for row in _table_rows(result.stdout)] == ["1x3x96x128", "2x3x96x128"]


def test_bad_arguments_are_refused_before_the_model_loads(tmp_path: Path):
    checkpoint = _checkpoint(tmp_path, "detr")
    low_opset = _tool("export.py", "--checkpoint", str(checkpoint), "--format", "onnx", "--opset", "13", "--out",
                      "x.onnx", cwd=tmp_path)
    assert low_opset.returncode == 2 and "--opset 13 is invalid; allowed: >= 17" in low_opset.stderr
    small = _tool("export.py", "--checkpoint", str(checkpoint), "--format", "onnx", "--image-size", "64", "96",
                  "--out", "x.onnx", cwd=tmp_path)
    assert small.returncode == 2 and "--image-size 64 96 is invalid; allowed: both sides >= 96" in small.stderr
    gpu = _tool("infer.py", "--onnx", "x.onnx", str(COCO128 / "images"), "--device", "cuda", cwd=tmp_path)
    assert gpu.returncode == 2 and "--device cuda is invalid with --onnx" in gpu.stderr
    missing = _tool("infer.py", "--onnx", "x.onnx", str(COCO128 / "images"), "--out", "pred", cwd=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == "error: cannot read ONNX model 'x.onnx': no such file — give the file " \
                                     "tools/export.py wrote"
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "pred").exists()
