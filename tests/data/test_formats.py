"""The same real photographs (data/coco128) as COCO, YOLO and Pascal VOC: identical targets, labels and image sizes.

The YOLO and VOC copies are written by the tests' own converters (``format_writers.py``), not by detr_kit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detr_kit.build import build_dataset, build_datasets
from detr_kit.config import Config
from detr_kit.structures import LabelMap

from data_helpers import COCO128
from format_writers import coco_to_voc, coco_to_yolo, boxes_only

SMALL = ["data.eval_size=64", "data.max_size=96", "data.train_scales=[64]", "data.crop_resize_scales=[]",
         "data.num_workers=0"]
JSONS = {"train": COCO128 / "annotations" / "instances_train.json", "val": COCO128 / "annotations" / "instances_val.json"}


def coco_args(root: Path, train_json: Path, val_json: Path) -> list[str]:
    return [f"data.root={root}", "data.train_images=images", "data.val_images=images",
            f"data.train_annotations={train_json}", f"data.val_annotations={val_json}"]


def coco_names() -> list[str]:
    categories = json.loads(JSONS["val"].read_text())["categories"]
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, list[str]]:
    """Overrides selecting each copy of coco128: COCO without crowd boxes, its YOLO and VOC copies, and COCO with crowd
    boxes beside its VOC copy (crowd -> difficult)."""
    tmp = tmp_path_factory.mktemp("formats")
    plain = {split: boxes_only(path, tmp / "coco" / f"{split}.json") for split, path in JSONS.items()}
    coco_to_yolo(plain, COCO128 / "images", tmp / "yolo")
    coco_to_voc(plain, COCO128 / "images", tmp / "voc")
    coco_to_voc(JSONS, COCO128 / "images", tmp / "voc_difficult")
    voc_classes = f"data.classes={json.dumps(coco_names())}"
    return {
        "coco": coco_args(COCO128, plain["train"], plain["val"]),
        "yolo": [f"data.root={tmp / 'yolo'}"],
        "voc": [f"data.root={tmp / 'voc'}", voc_classes],
        "coco_crowd": coco_args(COCO128, JSONS["train"], JSONS["val"]),
        "voc_difficult": [f"data.root={tmp / 'voc_difficult'}", voc_classes],
    }


def targets_by_file(dataset) -> dict[str, tuple]:
    """file name -> (orig size, size, boxes, labels, iscrowd) of every image, as the training code receives them."""
    out = {}
    for index in range(len(dataset)):
        _, target = dataset[index]
        out[dataset.image_path(index).name] = (target.orig_size, target.size, target.boxes.double(),
                                               target.labels, target.iscrowd)
    return out


def assert_same_targets(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, (orig, size, boxes, labels, crowd) in expected.items():
        orig2, size2, boxes2, labels2, crowd2 = actual[name]
        assert (orig, size) == (orig2, size2), name
        # the dataset's order of boxes within an image is the file's: compare as sorted rows
        rows = torch.cat([labels[:, None].double(), crowd[:, None].double(), boxes], 1)
        rows2 = torch.cat([labels2[:, None].double(), crowd2[:, None].double(), boxes2], 1)
        rows, rows2 = (r[np.lexsort(r.numpy().T[::-1])] for r in (rows, rows2))
        torch.testing.assert_close(rows2, rows, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_yolo_and_voc_copies_give_the_coco_targets(copies, fmt, capsys):
    cfg = Config().replace([*SMALL, *copies["coco"]])
    reference = {split: targets_by_file(build_dataset(cfg.data, split)) for split in ("train", "val")}
    other_cfg = Config().replace([*SMALL, *copies[fmt]])
    train, val = build_datasets(other_cfg)
    assert f"data.dataset=auto: a {'YOLO' if fmt == 'yolo' else 'Pascal VOC'} dataset in" in capsys.readouterr().err
    assert train.label_map.names == tuple(coco_names()) and val.label_map == train.label_map
    assert sum(len(t[3]) for t in reference["val"].values()) == 212  # coco128 val: 214 boxes, 2 of them crowd
    assert_same_targets(reference["val"], targets_by_file(val))
    assert_same_targets(reference["train"], targets_by_file(build_dataset(other_cfg.data, "train")))


def test_voc_difficult_is_coco_crowd(copies):
    reference = targets_by_file(build_dataset(Config().replace([*SMALL, *copies["coco_crowd"]]).data, "val"))
    assert sum(int(t[4].sum()) for t in reference.values()) == 2
    assert_same_targets(reference, targets_by_file(build_dataset(Config().replace([*SMALL, *copies["voc_difficult"]]).data, "val")))
    train = build_dataset(Config().replace([*SMALL, *copies["voc_difficult"]]).data, "train", train=True)
    assert sum(a["iscrowd"] for a in train.coco.anns.values()) == 8  # kept in the records (evaluation ignores them)
    targets = [train[i][1] for i in range(len(train))]
    assert not any(t.iscrowd.any() for t in targets)  # ... and left out of training targets, as COCO's crowd boxes are
    assert sum(len(t) for t in targets) == 725 - 8


def test_voc_default_classes_are_the_sorted_names_and_a_given_map_is_matched_by_name(copies):
    voc_root = copies["voc"][0]
    val = build_dataset(Config().replace([*SMALL, voc_root]).data, "val")
    present = sorted({name for name in coco_names() if f">{name}<" in "".join(
        p.read_text() for p in (Path(voc_root.split("=", 1)[1]) / "Annotations").glob("*.xml"))})
    assert list(val.label_map.names) == present and val.label_map.category_ids == tuple(range(1, len(present) + 1))
    coco_val = build_dataset(Config().replace([*SMALL, *copies["coco"]]).data, "val")
    # a checkpoint trained on the COCO copy (ids 1..90) evaluates the VOC copy (ids 1..K, another order): by name
    matched = build_dataset(Config().replace([*SMALL, voc_root]).data, "val", label_map=coco_val.label_map)
    assert matched.label_map.names == coco_val.label_map.names
    assert_same_targets(targets_by_file(coco_val), targets_by_file(matched))
    by_name = dict(zip(matched.label_map.names, matched.label_map.category_ids))
    voc_ids = dict(zip(val.label_map.names, val.label_map.category_ids))
    assert all(by_name[name] == voc_ids[name] for name in present)  # the VOC copy's own ids, for its json


def test_yolo_names_as_a_dict_and_empty_label_files(tmp_path):
    plain = {split: boxes_only(path, tmp_path / f"{split}.json") for split, path in JSONS.items()}
    coco_to_yolo(plain, COCO128 / "images", tmp_path / "yolo", names_as_dict=True, empty_label_files=True)
    val = build_dataset(Config().replace([*SMALL, f"data.root={tmp_path / 'yolo' / 'data.yaml'}"]).data, "val")
    coco_val = build_dataset(Config().replace([*SMALL, *coco_args(COCO128, plain["train"], plain["val"])]).data, "val")
    assert val.label_map == LabelMap(tuple(range(80)), tuple(coco_names()))  # YOLO's own class numbers as ids
    assert_same_targets(targets_by_file(coco_val), targets_by_file(val))


# ------------------------------------------------------------------------------------------ the same commands

TINY = Path(__file__).resolve().parents[1] / "engine" / "tiny.yaml"
TRAIN_KEYS = ["data.dataset=auto", *SMALL, "data.batch_size=8", "train.epochs=1", "train.num_vis_images=0",
              "model.num_queries=20"]


def _detections_by_file(path: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in json.loads(path.read_text()):
        out.setdefault(r["file_name"], []).append((r["category_id"], r["score"], r["bbox"]))
    return out


@pytest.mark.slow
def test_every_format_trains_evaluates_and_infers_with_the_same_commands(copies, tmp_path):
    """tools/train.py, eval.py and infer.py on the COCO, YOLO and VOC copies of coco128: the same batches give the same
    weights and AP; one checkpoint scores the same AP on each copy (classes matched by name across their ids)."""
    from detr_kit.engine.checkpoint import load_checkpoint
    from detr_kit.engine.logging import read_metrics
    from user_files import load_tool

    train, evaluate, infer = (load_tool(t) for t in ("train.py", "eval.py", "infer.py"))
    runs, metrics = {}, {}
    for fmt in ("coco", "yolo", "voc"):
        runs[fmt] = tmp_path / f"run_{fmt}"
        argv = [str(TINY), *TRAIN_KEYS, *copies[fmt], "--output-dir", str(runs[fmt]), "--device", "cpu"]
        assert train.main(argv) == 0
        metrics[fmt] = [r for r in read_metrics(runs[fmt] / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    states = {fmt: load_checkpoint(runs[fmt] / "last.pth") for fmt in runs}
    for fmt in ("yolo", "voc"):  # the same images in the same order, the same labels: the same training
        assert metrics[fmt]["train/loss"] == metrics["coco"]["train/loss"]
        assert all(torch.equal(v, states[fmt]["model"][k]) for k, v in states["coco"]["model"].items())
        assert {k: v for k, v in metrics[fmt].items() if k.startswith("val/")} == \
               {k: v for k, v in metrics["coco"].items() if k.startswith("val/")}
    assert metrics["coco"]["val/AR100"] > 0  # the tiny model finds something, so equal numbers say something

    scores = {}
    for fmt in ("coco", "yolo", "voc"):  # one checkpoint (trained on the COCO copy), three copies of the data
        out = tmp_path / f"eval_{fmt}"
        argv = [str(TINY), *TRAIN_KEYS, *copies[fmt], "--checkpoint", str(runs["coco"] / "last.pth"),
                "--output-dir", str(out), "--device", "cpu"]
        assert evaluate.main(argv) == 0
        scores[fmt] = json.loads((out / "metrics.json").read_text())
    assert scores["yolo"] == scores["coco"] and scores["voc"] == scores["coco"]
    assert scores["coco"]["AP"] == pytest.approx(metrics["coco"]["val/AP"])

    val_files = [img["file_name"] for img in json.loads(JSONS["val"].read_text())["images"]]
    folders = {"coco": COCO128 / "images", "yolo": Path(copies["yolo"][0].split("=", 1)[1]) / "images" / "val",
               "voc": Path(copies["voc"][0].split("=", 1)[1]) / "JPEGImages"}
    found = {}
    for fmt, folder in folders.items():
        out = tmp_path / f"infer_{fmt}"
        argv = ["--checkpoint", str(runs[fmt] / "last.pth"), *(str(folder / f) for f in val_files),
                "--out", str(out), "--threshold", "0.0", "--device", "cpu"]
        assert infer.main(argv) == 0
        found[fmt] = _detections_by_file(out / "detections.json")
    assert len(found["coco"]) == 32
    for fmt in ("yolo", "voc"):  # category ids are each copy's own (YOLO: 0-based indices; VOC: 1..80)
        assert {f: [(s, b) for _, s, b in d] for f, d in found[fmt].items()} == \
               {f: [(s, b) for _, s, b in d] for f, d in found["coco"].items()}
