"""The custom-data recipes: what their comments promise is what they hold, and they read a user's data as it comes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from detr_kit import build
from detr_kit.config import load_config
from detr_kit.engine.setup import load_init_weights

ROOT = Path(__file__).resolve().parents[1]
CPU, GPU = ROOT / "configs" / "custom_cpu.yaml", ROOT / "configs" / "custom_gpu.yaml"


@pytest.mark.parametrize("path", [CPU, GPU], ids=lambda p: p.name)
def test_recipe_comments_name_the_keys_a_user_changes(path):
    text = path.read_text()
    for key in ("data.root", "data.train_scales", "data.max_size", "data.eval_size", "data.classes",
                "Expected time", "data.train_scales=[", "data.dataset: auto"):
        assert key in text, key
    assert ("model.backbone.weights" if path == CPU else "train.init_from") in text


def test_cpu_recipe_is_a_pretrained_mobilenet_at_320_to_512_px_reading_coco128_as_it_is():
    cfg = load_config(CPU, ["data.root=data/coco128"])
    assert cfg.model.backbone.name == "mobilenet_v2" and cfg.model.backbone.weights == "IMAGENET1K_V1"
    assert cfg.model.backbone.norm == "frozen_bn" and cfg.model.hidden_dim <= 128 and cfg.model.num_encoder_layers <= 3
    sizes = (*cfg.data.train_scales, *cfg.data.crop_resize_scales, cfg.data.eval_size)
    assert 320 <= min(sizes) and cfg.data.max_size == 512 and max(sizes) <= 512
    assert cfg.data.dataset == "auto" and build.resolve_format(cfg.data) == "coco"
    files = build.dataset_files(cfg.data, ["train", "val"])  # the default COCO keys fit coco128's layout
    assert files["train"] == (Path("data/coco128/images"), Path("data/coco128/annotations/instances_train.json"))


@pytest.mark.slow
def test_gpu_recipe_fine_tunes_every_weight_of_an_official_deformable_detr_checkpoint(tmp_path):
    cfg = load_config(GPU, ["model.fast=false"])
    assert cfg.model.backbone.name == "resnet50" and cfg.model.deformable is not None and cfg.train.init_from
    torch.manual_seed(0)
    official = build.build_model(cfg, num_classes=91).state_dict()  # the official repository's key layout:
    official = {("backbone.0." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in official.items()}
    torch.save({"model": official, "args": argparse.Namespace(num_classes=91)}, tmp_path / "r50_deformable_detr.pth")
    model = build.build_model(cfg, num_classes=3)
    report = load_init_weights(model, tmp_path / "r50_deformable_detr.pth", trusted=True)
    assert not (report.missing or report.unexpected or report.mismatched)
    assert report.reinitialized and all("class_embed" in key for key in report.reinitialized)
    state = model.state_dict()
    key = "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"
    torch.testing.assert_close(state[key], official[key], rtol=0, atol=0)
