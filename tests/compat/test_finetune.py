"""Fine-tuning a 91-class (COCO slots) checkpoint on a 3-class dataset with load_pretrained."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from detr_kit import load_config
from detr_kit.build import build_criterion, build_model
from detr_kit.compat import load_pretrained, reinitialize_class_head
from detr_kit.structures import Target

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detr_r50.yaml"
TINY = [
    "model.backbone.name=resnet18",
    "model.backbone.weights=null",
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=2",
    "model.dim_feedforward=64",
    "model.num_queries=8",
    "model.dropout=0.0",
    "model.backbone.trainable_stages=0",  # keeps the backward pass cheap; the heads are what fine-tuning changes
]
ARCHS = {
    "detr": ["model.deformable=null"],
    "deformable_refine": [
        "model.deformable.num_feature_levels=3", "model.deformable.enc_points=2", "model.deformable.dec_points=2",
        "model.deformable.box_refine=true",
    ],
}  # fmt: skip


def tiny_config(arch: str, num_classes: int):
    return load_config(CONFIG, TINY + ARCHS[arch] + [f"model.num_classes={num_classes}"])


def as_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official layout of a detr_kit DETR / refined Deformable-DETR: the backbone under the Joiner's child 0
    (the official repo's ``backbone.0.body``); everything else has the official names already."""
    return {("backbone.0." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in state.items()}


def class_head_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The class heads, also where the decoder holds them (two-stage)."""
    return sorted(k for k in state if "class_embed" in k.split("."))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("source_format", ["official", "detr_kit"])
def test_finetune_91_to_3_classes(arch: str, source_format: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    coco_cfg = tiny_config(arch, 91)
    pretrained = build_model(coco_cfg).state_dict()
    if source_format == "official":
        checkpoint = {"model": as_official(pretrained), "args": argparse.Namespace(num_classes=91)}
    else:
        checkpoint = {"model": pretrained, "config": coco_cfg.to_dict(), "epoch": 3}
    path = tmp_path / "coco.pth"
    torch.save(checkpoint, path)

    cfg = tiny_config(arch, 3)
    model = build_model(cfg)
    lines: list[str] = []
    report = load_pretrained(model, path, log=lines.append)

    assert report.source_format == source_format
    own = model.state_dict()
    heads = class_head_keys(own)
    assert heads and sorted(report.reinitialized) == heads
    assert not (report.missing or report.unexpected or report.mismatched)
    assert "re-initialised" in lines[0] and "class_embed" in lines[0]
    for key in own:
        if key not in heads:
            torch.testing.assert_close(own[key], pretrained[key], rtol=0, atol=0, msg=key)
    focal = cfg.model.uses_focal
    for key in heads:
        assert own[key].shape[0] == (3 if focal else 4)
        if key.endswith("bias") and focal:  # every class starts at p = 0.01
            torch.testing.assert_close(own[key], torch.full((3,), -math.log(99.0)))

    if source_format != "official":
        return  # one short training run per architecture is enough
    criterion = build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(2, 3, 64, 64)
    targets = [Target(torch.tensor([[0.5, 0.5, 0.3, 0.4]]), torch.tensor([2])), Target(torch.zeros(0, 4), torch.zeros(0))]
    model.train()
    for _ in range(2):
        loss = criterion(model(images), targets).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_same_class_count_reinitializes_nothing() -> None:
    torch.manual_seed(0)
    cfg = tiny_config("detr", 3)
    source = build_model(cfg).state_dict()
    model = build_model(cfg)
    report = load_pretrained(model, source, log=None)
    assert report.source_format == "detr_kit" and not report.reinitialized
    assert len(report.loaded) == len(source)
    torch.testing.assert_close(model.class_embed.weight, source["class_embed.weight"])


def test_other_mismatches_are_reported_not_reinitialized() -> None:
    torch.manual_seed(0)
    source = build_model(tiny_config("detr", 3)).state_dict()
    source["query_embed.weight"] = torch.zeros(20, 32)  # another number of queries
    source["extra.weight"] = torch.zeros(1)
    model = build_model(tiny_config("detr", 3))
    report = load_pretrained(model, source, log=None)
    assert report.mismatched == ["query_embed.weight: checkpoint (20, 32) vs model (8, 32)"]
    assert report.unexpected == ["extra.weight"] and not report.reinitialized


def test_reinitialize_class_head_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="fits neither K=3"):
        reinitialize_class_head(torch.nn.Linear(8, 7), num_classes=3)


def test_convert_tool_writes_a_loadable_detr_kit_checkpoint(tmp_path: Path) -> None:
    import importlib.util

    from detr_kit.config import config_from_dict
    from detr_kit.structures import LabelMap

    spec = importlib.util.spec_from_file_location("convert_tool", Path(__file__).resolve().parents[2] / "tools" / "convert.py")
    convert_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_tool)

    torch.manual_seed(0)
    pretrained = build_model(tiny_config("detr", 91)).state_dict()
    source = tmp_path / "detr-r18-dc5-tiny.pth"  # "dc5" in the name, but resnet18 cannot dilate: --no-dilation
    torch.save({"model": as_official(pretrained)}, source)
    assert convert_tool.main([str(source), "--out", str(tmp_path / "out.pth"), "--no-dilation"]) == 0

    state = torch.load(tmp_path / "out.pth", weights_only=True)
    cfg = config_from_dict(state["config"])
    assert (cfg.model.deformable, cfg.model.num_classes, cfg.model.hidden_dim, cfg.model.backbone.name) == (None, 91, 32, "resnet18")
    assert not cfg.model.backbone.dilation and cfg.model.backbone.weights is None
    label_map = LabelMap.from_dict(state["label_map"])
    assert label_map.names[1] == "person" and label_map.names[0] == "N/A" and state["id2label"][90] == "toothbrush"
    assert state["epoch"] == 0 and state["step"] == 0
    model = build_model(cfg)
    model.load_state_dict(state["model"], strict=True)
    torch.testing.assert_close(model.state_dict()["backbone.body.conv1.weight"], pretrained["backbone.body.conv1.weight"])

    assert convert_tool.main([str(tmp_path / "out.pth"), "--out", str(tmp_path / "again.pth")]) == 1  # already ours
