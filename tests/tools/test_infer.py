"""tools/infer.py end to end (subprocess): annotated images, a COCO-results json, skipped corrupt files."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_kit.build import build_model
from detr_kit.config import config_from_dict
from detr_kit.data.coco import load_coco_json
from detr_kit.engine.checkpoint import save_checkpoint
from detr_kit.structures import LabelMap

ROOT = Path(__file__).resolve().parents[2]
COCO128 = ROOT / "data" / "coco128"
NAMES = ("000000000009.jpg", "000000000025.jpg", "000000000030.jpg")  # all in the train split
TINY = {
    "model": {
        "hidden_dim": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64,
        "num_queries": 12, "dropout": 0.0, "backbone": {"name": "resnet18", "weights": None, "norm": "bn"},
    },
    "data": {"eval_size": 64, "max_size": 96, "train_scales": [64]},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("infer")
    categories = load_coco_json(COCO128 / "annotations" / "instances_train.json")["categories"]
    label_map = LabelMap.from_coco_categories(categories)
    torch.manual_seed(0)
    cfg = config_from_dict(TINY)
    model = build_model(cfg, num_classes=len(label_map))
    save_checkpoint(root / "tiny.pth", {"model": model.state_dict(), "config": cfg.to_dict(),
                                        "label_map": label_map.to_dict(), "id2label": label_map.id2label})
    images = root / "images"
    images.mkdir()
    for name in NAMES[:2]:
        shutil.copy(COCO128 / "images" / name, images / name)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not an image")
    return root


def _run(workspace: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "tools" / "infer.py"), "--checkpoint", str(workspace / "tiny.pth"),
               str(workspace / "images"),  # a folder: two good images and the corrupt one
               str(COCO128 / "images" / "00000000003[0].jpg"),  # a glob
               "--out", str(workspace / "out"), "--threshold", "0.0", "--batch-size", "2", "--device", "cpu", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=workspace)


def test_infer_writes_images_and_coco_results_and_refuses_to_overwrite(workspace):
    first = _run(workspace)
    assert first.returncode == 0, first.stderr
    output = first.stdout + first.stderr
    assert "corrupt.jpg" in output  # the unreadable input is named
    assert "3 image(s) processed" in output and "1 warning(s)" in output

    out = workspace / "out"
    for name in NAMES:
        with Image.open(out / name) as annotated, Image.open(COCO128 / "images" / name) as original:
            assert annotated.size == original.size
    assert not (out / "corrupt.jpg").exists()

    results = json.loads((out / "detections.json").read_text())
    assert {r["image_id"] for r in results} == {9, 25, 30}  # numeric file stems
    assert {r["file_name"] for r in results} == set(NAMES)
    with contextlib.redirect_stdout(io.StringIO()):  # a valid COCO results file for the train annotations
        coco = COCO(str(COCO128 / "annotations" / "instances_train.json"))
        loaded = coco.loadRes(str(out / "detections.json"))
    assert len(loaded.anns) == len(results) > 0
    assert {r["category_id"] for r in results} <= set(coco.getCatIds())
    for r in results:
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and 0.0 <= r["score"] <= 1.0

    before = (out / "detections.json").read_bytes()
    second = _run(workspace)
    assert second.returncode != 0
    assert "refusing to overwrite" in second.stderr and "--overwrite" in second.stderr
    assert (out / "detections.json").read_bytes() == before


def _load_tool():
    spec = importlib.util.spec_from_file_location("detr_kit_tools_infer", ROOT / "tools" / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nothing_readable_is_an_error_and_overwrite_replaces(workspace, tmp_path, capsys):
    infer = _load_tool()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    args = ["--checkpoint", str(workspace / "tiny.pth"), "--device", "cpu", "--out", str(tmp_path / "out")]
    assert infer.main([*args, str(bad), str(tmp_path / "missing.jpg")]) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "missing.jpg" in err and "no input could be processed" in err

    good = tmp_path / "photo.jpg"
    shutil.copy(COCO128 / "images" / NAMES[0], good)
    (tmp_path / "out" / "photo.jpg").write_bytes(b"old")
    assert infer.main([*args, str(good)]) == 2  # refuses: photo.jpg exists
    assert infer.main([*args, str(good), "--overwrite", "--threshold", "0"]) == 0
    with Image.open(tmp_path / "out" / "photo.jpg") as annotated:
        assert annotated.size == (640, 480)
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert results and {r["image_id"] for r in results} == {1} and {r["file_name"] for r in results} == {"photo.jpg"}


def test_annotations_give_the_jsons_own_ids_and_pycocotools_scores_the_file(workspace, tmp_path, capsys):
    infer = _load_tool()
    # The user's json: other file names, other image ids, and category ids 0..79 (YOLO's numbering) with COCO's names.
    data = load_coco_json(COCO128 / "annotations" / "instances_train.json")
    new_id = {c["id"]: index for index, c in enumerate(data["categories"])}
    photos = tmp_path / "photos"
    photos.mkdir()
    images, annotations = [], []
    for number, name in enumerate(NAMES):
        (image,) = [i for i in data["images"] if i["file_name"] == name]
        shutil.copy(COCO128 / "images" / name, photos / f"photo_{number}.jpg")
        images.append({**image, "id": 500 + number, "file_name": f"sub/photo_{number}.jpg"})
        annotations += [{**a, "image_id": 500 + number, "category_id": new_id[a["category_id"]]}
                        for a in data["annotations"] if a["image_id"] == image["id"]]
    categories = [{"id": new_id[c["id"]], "name": c["name"]} for c in data["categories"]]
    user_json = tmp_path / "user.json"
    user_json.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))

    args = ["--checkpoint", str(workspace / "tiny.pth"), "--device", "cpu", str(photos), "--annotations", str(user_json)]
    assert infer.main([*args, "--out", str(tmp_path / "out"), "--threshold", "0"]) == 0
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {r["image_id"] for r in results} == {500, 501, 502}
    # The same detections without --annotations carry COCO's ids: each names the same class as the json's id does.
    assert infer.main([*args[:-2], "--out", str(tmp_path / "plain"), "--threshold", "0"]) == 0
    plain = json.loads((tmp_path / "plain" / "detections.json").read_text())
    coco_name = {c["id"]: c["name"] for c in data["categories"]}
    json_name = {c["id"]: c["name"] for c in categories}
    assert len(plain) == len(results) and any(p["category_id"] != r["category_id"] for p, r in zip(plain, results))
    assert all(coco_name[p["category_id"]] == json_name[r["category_id"]] for p, r in zip(plain, results))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools scores it against the user's json as it is
        gt = COCO(str(user_json))
        evaluation = COCOeval(gt, gt.loadRes(str(tmp_path / "out" / "detections.json")), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] >= 0.0
    highest = max(r["score"] for r in results)

    # Nothing above the threshold: said, with the highest score seen.
    capsys.readouterr()
    assert infer.main([*args, "--out", str(tmp_path / "none"), "--threshold", "1.0"]) == 0
    out = capsys.readouterr().out
    assert f"no detection scored --threshold 1.0 or more; the highest score was {highest:.3f}" in out
    assert json.loads((tmp_path / "none" / "detections.json").read_text()) == []

    # An input the json does not list: one line, before the model is loaded.
    shutil.copy(COCO128 / "images" / NAMES[0], photos / "stranger.jpg")
    assert infer.main([*args, "--out", str(tmp_path / "third")]) == 1
    err = capsys.readouterr().err
    assert f"error: --annotations {user_json} has no image named stranger.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "third").exists()
