"""tools/eval.py needs only what it evaluates: the validation json and images, no training split, no pretrained
backbone weights (the checkpoint has every weight)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import torch
import yaml
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_kit.build import build_model
from detr_kit.config import config_from_dict
from detr_kit.data.coco import load_coco_json
from detr_kit.engine.checkpoint import save_checkpoint
from detr_kit.structures import LabelMap

ROOT = Path(__file__).resolve().parents[2]
COCO128 = ROOT / "data" / "coco128"
TINY = {
    "model": {
        "hidden_dim": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64,
        "num_queries": 12, "dropout": 0.0, "backbone": {"name": "resnet18", "weights": None, "norm": "bn"},
    },
    "data": {"eval_size": 64, "max_size": 96, "train_scales": [64], "num_workers": 0},
}


def test_eval_reads_the_val_split_alone_and_its_numbers_are_pycocotools(tmp_path, capsys):
    val = load_coco_json(COCO128 / "annotations" / "instances_val.json")
    keep = {image["id"] for image in val["images"][:4]}
    val = {**val, "images": [i for i in val["images"] if i["id"] in keep],
           "annotations": [a for a in val["annotations"] if a["image_id"] in keep]}
    (tmp_path / "data" / "annotations").mkdir(parents=True)  # no instances_train.json anywhere
    (tmp_path / "data" / "annotations" / "instances_val.json").write_text(json.dumps(val))
    torch.manual_seed(0)
    cfg = config_from_dict(TINY)
    label_map = LabelMap.from_coco_categories(val["categories"])
    save_checkpoint(tmp_path / "tiny.pth", {"model": build_model(cfg, num_classes=len(label_map)).state_dict(),
                                            "config": cfg.to_dict(), "label_map": label_map.to_dict()})
    # The config names backbone weights that are not here (a recipe's ImageNet weights on an offline machine).
    model_section = {**TINY["model"], "backbone": {**TINY["model"]["backbone"], "weights": str(tmp_path / "absent.pth")}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "model": model_section}))
    spec = importlib.util.spec_from_file_location("detr_kit_tools_eval", ROOT / "tools" / "eval.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    code = tool.main([str(tmp_path / "tiny.yaml"), "data.dataset=auto", f"data.root={tmp_path / 'data'}",
                      f"data.val_images={COCO128 / 'images'}", "data.val_annotations=annotations/instances_val.json",
                      "--checkpoint", str(tmp_path / "tiny.pth"), "--device", "cpu", "--output-dir", str(tmp_path / "ev")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "data" / "annotations" / "instances_val.json"))
        evaluation = COCOeval(gt, gt.loadRes(str(tmp_path / "ev" / "detections.json")), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert metrics["AP"] == evaluation.stats[0] and metrics["AP50"] == evaluation.stats[1]
