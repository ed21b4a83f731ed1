"""tools/export.py: ONNX (onnxruntime) and TorchScript exports match PyTorch at two sizes, batch sizes 1 and 2."""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from detr_kit.build import build_model
from detr_kit.config import config_from_dict
from detr_kit.engine.checkpoint import save_checkpoint
from detr_kit.structures import LabelMap

ROOT = Path(__file__).resolve().parents[2]
BACKBONE = {"name": "resnet18", "weights": None, "norm": "bn"}
COMMON = {"hidden_dim": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64,
          "num_queries": 10, "dropout": 0.0, "backbone": BACKBONE}
TINY = {
    "detr": {**COMMON, "deformable": None},
    "deformable_detr": {**COMMON, "deformable": {"num_feature_levels": 3, "enc_points": 2, "dec_points": 2}},
    "dino": {**COMMON, "deformable": {"num_feature_levels": 3, "enc_points": 2, "dec_points": 2, "box_refine": True,
                                      "two_stage": True, "num_proposals": 10, "mixed_query_selection": True,
                                      "dn_number": 10, "look_forward_twice": True, "share_heads": True,
                                      "decoder_norm": True}},
}
SIZE = (64, 96)
NUM_CLASSES = 3


def _load_tool():
    spec = importlib.util.spec_from_file_location("detr_kit_tools_export", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export = _load_tool()


@functools.lru_cache(maxsize=None)
def _built(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config_from_dict({"model": TINY[arch]}), num_classes=NUM_CLASSES).eval()
    with torch.no_grad():  # random BN statistics, so that normalisation is not an identity in the export
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _model(arch: str) -> torch.nn.Module:
    """A fresh copy of the tiny model (built once per architecture)."""
    return copy.deepcopy(_built(arch))


def _check(rows: list[dict], sizes: list[tuple[int, int]]) -> None:
    assert {(r["size"], r["batch"]) for r in rows} == {(s, b) for s in sizes for b in (1, 2)}
    for r in rows:
        assert r["boxes"] <= 1e-4 and r["logits"] <= 1e-3, r
        assert r["ok"]


@pytest.mark.parametrize("arch", ["detr", pytest.param("deformable_detr", marks=pytest.mark.slow),
                                  pytest.param("dino", marks=pytest.mark.slow)])
def test_onnx_export_matches_pytorch(arch, tmp_path):
    import onnxruntime

    model = _model(arch)
    path = tmp_path / f"{arch}.onnx"
    rows, dynamic = export.export_verified(model, path, "onnx", SIZE, opset=17)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits", "boxes"]
    if arch == "detr":
        assert dynamic  # DETR traces with symbolic H and W
    if dynamic:
        _check(rows, export.check_sizes(SIZE))
        images = torch.randn(3, 3, 64, 160)  # a third batch size and size
        logits, boxes = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected = model(images)
        np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-3, rtol=0)
        np.testing.assert_allclose(boxes, expected.boxes.numpy(), atol=1e-4, rtol=0)
    else:
        # H and W are frozen in the trace: the file is exact at its size, and a second export at another size
        # (a different aspect ratio) is exact too.
        assert session.get_inputs()[0].shape[2:] == list(SIZE)
        _check(rows, [SIZE])
        other = export.check_sizes(SIZE)[1]
        _check(export.export_and_verify(model, tmp_path / "other.onnx", "onnx", other, dynamic_size=False), [other])


def test_verification_catches_a_wrong_export(tmp_path):
    model = _model("detr")
    path = export.export_onnx(model, tmp_path / "detr.onnx", SIZE)
    with torch.no_grad():
        model.class_embed.bias.add_(0.01)  # PyTorch now differs from the file by 0.01 in every logit
    rows = export.verify(model, export.onnx_runner(path), export.check_sizes(SIZE), batch_sizes=(1,))
    assert all(not r["ok"] and r["logits"] == pytest.approx(0.01, abs=1e-4) for r in rows)


def test_cli_exports_a_checkpoint_to_torchscript(tmp_path, capsys):
    model = _model("detr")
    label_map = LabelMap((1, 2, 3), ("a", "b", "c"))
    cfg = config_from_dict({"model": TINY["detr"]})
    save_checkpoint(tmp_path / "tiny.pth", {"model": model.state_dict(), "config": cfg.to_dict(),
                                            "label_map": label_map.to_dict(), "id2label": label_map.id2label})
    code = export.main(["--checkpoint", str(tmp_path / "tiny.pth"), "--format", "torchscript",
                        "--image-size", str(SIZE[0]), str(SIZE[1])])
    printed = capsys.readouterr().out
    assert code == 0 and (tmp_path / "tiny.pt").is_file()  # default name: the checkpoint's, with .pt
    assert printed.count("max |diff|") == 4 and "FAIL" not in printed
    traced = export.torchscript_runner(tmp_path / "tiny.pt")
    logits, boxes = traced(torch.randn(3, 3, 64, 160))
    assert logits.shape == (3, 10, NUM_CLASSES + 1) and boxes.shape == (3, 10, 4)
    with pytest.raises(SystemExit) as refused:  # argparse: usage line, then the error; exit code 2
        export.main(["--checkpoint", str(tmp_path / "tiny.pth"), "--format", "onnx", "--opset", "13",
                     "--out", str(tmp_path / "x.onnx"), "--image-size", "64", "96"])
    assert refused.value.code == 2 and "--opset 13 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
