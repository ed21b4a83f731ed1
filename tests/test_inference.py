"""Detector: the same detections whatever the input type, alone or batched; checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_kit.build import build_model
from detr_kit.config import config_from_dict
from detr_kit.data.coco import load_coco_json
from detr_kit.engine.checkpoint import save_checkpoint
from detr_kit.inference import Detector, ImageReadError, read_image
from detr_kit.structures import Detections, LabelMap

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT / "data" / "coco128"
IMAGE = COCO128 / "images" / "000000000036.jpg"  # 481 x 640 portrait
LARGER = COCO128 / "images" / "000000000009.jpg"  # 640 x 480 landscape

TINY = {
    "model": {
        "hidden_dim": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64,
        "num_queries": 12, "dropout": 0.0, "backbone": {"name": "resnet18", "weights": None, "norm": "bn"},
    },
    "data": {"eval_size": 64, "max_size": 96, "train_scales": [64]},
}


@pytest.fixture(scope="module")
def label_map() -> LabelMap:
    return LabelMap.from_coco_categories(load_coco_json(COCO128 / "annotations" / "instances_val.json")["categories"])


@pytest.fixture(scope="module")
def detector(label_map) -> Detector:
    torch.manual_seed(0)
    cfg = config_from_dict(TINY)
    model = build_model(cfg, num_classes=len(label_map))
    return Detector(model, cfg, label_map, device="cpu", threshold=0.0)


def _assert_same(a: Detections, b: Detections, atol: float = 1e-4) -> None:
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol * 640, rtol=0)  # pixels of a 640 px image
    assert torch.equal(a.labels, b.labels) and a.names == b.names


def test_every_input_type_gives_the_same_detections(detector):
    array = np.array(Image.open(IMAGE).convert("RGB"))  # [H, W, 3] uint8
    by_path = detector(str(IMAGE))
    assert isinstance(by_path, Detections)
    for other in (
        detector(IMAGE),  # pathlib
        detector(Image.open(IMAGE)),
        detector(array),
        detector(torch.from_numpy(array).permute(2, 0, 1).contiguous()),  # uint8 CHW
        detector(torch.from_numpy(array).permute(2, 0, 1).float() / 255),  # float CHW 0..1
    ):
        _assert_same(by_path, other, atol=0.0)  # identical pixels in, identical numbers out


def test_alone_equals_batched_with_a_larger_image(detector):
    alone = detector(str(IMAGE))
    batched = detector([str(LARGER), str(IMAGE), np.asarray(Image.open(IMAGE).convert("RGB"))])
    assert isinstance(batched, list) and len(batched) == 3
    _assert_same(alone, batched[1])
    _assert_same(alone, batched[2])
    _assert_same(detector(str(LARGER)), batched[0])


def test_detections_are_in_original_pixels_with_names(detector, label_map):
    det = detector(str(IMAGE))
    height, width = np.asarray(Image.open(IMAGE)).shape[:2]
    assert det.boxes.shape == (len(det), 4)
    assert float(det.boxes[:, [0, 2]].max()) <= width + 1e-3 and float(det.boxes[:, [1, 3]].max()) <= height + 1e-3
    assert det.names == [label_map.names[k] for k in det.labels.tolist()]
    assert torch.all(det.scores[:-1] >= det.scores[1:])  # best first


def test_threshold_filters(detector):
    det = detector(str(IMAGE))
    cut = float(det.scores.median())
    strict = Detector(detector.model, detector.cfg, detector.label_map, device="cpu", threshold=cut)(str(IMAGE))
    assert len(strict) == int((det.scores >= cut).sum()) and bool((strict.scores >= cut).all())


def test_from_checkpoint_restores_model_config_and_labels(detector, label_map, tmp_path):
    path = tmp_path / "tiny.pth"
    save_checkpoint(path, {"model": detector.model.state_dict(), "config": detector.cfg.to_dict(),
                           "label_map": label_map.to_dict(), "id2label": label_map.id2label})
    restored = Detector.from_checkpoint(path, device="cpu", threshold=0.0)
    assert restored.label_map == label_map and restored.cfg.model == detector.cfg.model
    assert not restored.model.training
    _assert_same(detector(str(IMAGE)), restored(str(IMAGE)), atol=0.0)


def test_unreadable_inputs_are_named(detector, tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        detector([str(IMAGE), str(corrupt)])
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="ImageNet-normalised"):
        read_image(torch.randn(3, 8, 8))
    with pytest.raises(ImageReadError, match="shape"):
        read_image(np.zeros((3, 8, 8, 2), dtype=np.uint8))
    with pytest.raises(ImageReadError, match="int"):
        read_image(42)  # type: ignore[arg-type]
