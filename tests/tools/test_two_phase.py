"""tools/convert.py --to-attention: a phase-1 (convolutional-attention ViT) checkpoint becomes a phase-2 checkpoint
that records the phase, loads through train.init_from into the phase-2 config's model, and detects as before."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from detr_kit.build import build_model
from detr_kit.compat import load_pretrained
from detr_kit.config import load_config
from detr_kit.engine.checkpoint import load_checkpoint, save_checkpoint
from detr_kit.structures import LabelMap

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_dim=32", "model.num_heads=2", "model.num_encoder_layers=1", "model.num_decoder_layers=1",
         "model.dim_feedforward=48", "model.num_queries=8", "model.fast=false"]


def _convert_tool():
    spec = importlib.util.spec_from_file_location("convert_tool", REPO / "tools" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _phase1_checkpoint(path: Path) -> torch.nn.Module:
    cfg = load_config(REPO / "configs" / "vit_two_phase_phase1.yaml", SMALL)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3).eval()
    with torch.no_grad():  # "trained": nothing left at its initialisation
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    label_map = LabelMap((1, 2, 3), ("a", "b", "c"))
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "label_map": label_map.to_dict(),
                           "id2label": label_map.id2label, "epoch": 7, "step": 168})
    return model


def test_phase1_checkpoint_converts_records_its_phase_and_fine_tunes_from_the_same_detections(tmp_path, capsys):
    phase1 = _phase1_checkpoint(tmp_path / "last.pth")
    out = tmp_path / "attention.pth"
    assert _convert_tool().main(["--to-attention", str(tmp_path / "last.pth"), "--out", str(out),
                                 "--bias-magnitude", "40"]) == 0
    assert "differ by at most" in capsys.readouterr().out
    state = load_checkpoint(out)
    record = state["two_phase"]
    assert record["phase"] == 2 and record["phase1_epoch"] == 7 and record["bias_magnitude"] == 40.0
    assert record["converted_from"] == str(tmp_path / "last.pth") and record["max_feature_difference"] < 1e-8
    vit = state["config"]["model"]["backbone"]["vit"]
    assert vit["conv_radius"] == 0 and vit["relative_position"] is True and state["epoch"] == 0

    # what train.init_from does with the phase-2 config's model
    cfg2 = load_config(REPO / "configs" / "vit_two_phase_phase2.yaml", SMALL)
    phase2 = build_model(cfg2, num_classes=3).eval()
    report = load_pretrained(phase2, str(out), log=None)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:] = True
    with torch.no_grad():
        expected, got = phase1(images, mask), phase2(images, mask)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes, expected.boxes, atol=1e-4, rtol=0)


def test_to_attention_refuses_what_is_not_phase_1(tmp_path, capsys):
    cfg = load_config(REPO / "configs" / "vit_two_phase_phase2.yaml", SMALL)
    model = build_model(cfg, num_classes=3)
    label_map = LabelMap((1, 2, 3), ("a", "b", "c"))
    save_checkpoint(tmp_path / "p2.pth", {"model": model.state_dict(), "config": cfg.to_dict(),
                                          "label_map": label_map.to_dict()})
    tool = _convert_tool()
    assert tool.main(["--to-attention", str(tmp_path / "p2.pth"), "--out", str(tmp_path / "o.pth")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a phase-1 checkpoint" in err and " — " in err
    assert tool.main(["--to-attention", str(tmp_path / "p2.pth"), "--out", str(tmp_path / "o.pth"),
                      "--config", "configs/vit_two_phase_phase1.yaml"]) == 2
    assert "takes neither --config" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()
