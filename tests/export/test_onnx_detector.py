"""Detector.from_onnx: an exported file run by onnxruntime gives the detections of Detector.from_checkpoint on the
bundled real photographs (many sizes and aspect ratios), from the file alone; bad files are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from detr_kit.build import build_model
from detr_kit.config import config_from_dict
from detr_kit.data.coco import load_coco_json
from detr_kit.engine.checkpoint import save_checkpoint
from detr_kit.errors import CheckpointError
from detr_kit.export import DeploymentInfo, build_export_model, export_verified
from detr_kit.inference import Detector
from detr_kit.structures import LabelMap

ROOT = Path(__file__).resolve().parents[2]
COCO128 = ROOT / "data" / "coco128"
TINY = {
    "model": {
        "hidden_dim": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 2, "dim_feedforward": 64,
        "num_queries": 12, "dropout": 0.0, "backbone": {"name": "resnet18", "weights": None, "norm": "bn"},
        "deformable": {"num_feature_levels": 3, "enc_points": 2, "dec_points": 2, "box_refine": True},
    },
    "data": {"eval_size": 128, "max_size": 192, "train_scales": [128]},
    "eval": {"top_k": 50},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Deformable-DETR checkpoint (random weights and BN statistics) and its verified ONNX export."""
    root = tmp_path_factory.mktemp("onnx_detector")
    label_map = LabelMap.from_coco_categories(load_coco_json(COCO128 / "annotations" / "instances_val.json")["categories"])
    cfg = config_from_dict(TINY)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=len(label_map)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    checkpoint = root / "tiny.pth"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": cfg.to_dict(),
                                 "label_map": label_map.to_dict(), "id2label": label_map.id2label})
    plain = build_export_model(cfg, model.state_dict(), len(label_map))
    metadata = DeploymentInfo.from_config(cfg, label_map).to_metadata()
    report = export_verified(plain, root / "tiny.onnx", "onnx", (128, 170), metadata=metadata, reference=model)
    assert report.ok and report.dynamic_size, [row.describe() for row in report.rows]
    return checkpoint, root / "tiny.onnx"


def test_onnx_detector_gives_the_checkpoints_detections_on_real_images(exported):
    checkpoint, path = exported
    files = sorted((COCO128 / "images" / image["file_name"])
                   for image in load_coco_json(COCO128 / "annotations" / "instances_val.json")["images"])
    reference = Detector.from_checkpoint(checkpoint, device="cpu", threshold=0.0)
    detector = Detector.from_onnx(path, threshold=0.0)
    assert len(files) == 32 and detector.label_map == reference.label_map
    for file, expected, got in zip(files, reference(files), detector(files)):
        assert len(got) == len(expected) == 50, file  # eval.top_k from the file's metadata
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-4, rtol=0, msg=str(file))
        assert torch.equal(got.labels, expected.labels) and got.names == expected.names, file
        torch.testing.assert_close(got.boxes, expected.boxes, atol=1e-4 * 640, rtol=0, msg=str(file))  # pixels


def test_metadata_holds_label_map_and_processing(exported):
    _, path = exported
    props = {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert props["detr_kit.postprocess"] == {"focal": True, "top_k": 50, "score_threshold": 0.0}
    assert props["detr_kit.preprocess"]["resize_shorter_side"] == 128 and props["detr_kit.preprocess"]["max_size"] == 192
    assert props["detr_kit.label_map"]["category_ids"][:3] == [1, 2, 3]  # COCO ids, not contiguous labels


def test_files_that_cannot_serve_are_one_line_errors(exported, tmp_path):
    _, path = exported
    with pytest.raises(CheckpointError, match="no such file"):
        Detector.from_onnx(tmp_path / "missing.onnx")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]  # an ONNX file from elsewhere: no detr_kit metadata
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(CheckpointError, match="holds no detr_kit metadata") as err:
        Detector.from_onnx(tmp_path / "bare.onnx")
    assert "tools/export.py" in err.value.fix
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(CheckpointError, match="onnxruntime cannot load"):
        Detector.from_onnx(tmp_path / "text.onnx")
