"""The dataset doctor on YOLO and Pascal VOC datasets with one planted problem of each kind, format detection, and the
label map matched by id and name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_kit.build import build_dataset, build_datasets, resolve_format
from detr_kit.config import Config
from detr_kit.data.coco import CocoDetection, match_label_map
from detr_kit.data.doctor import SEVERITY, check_dataset
from detr_kit.data.formats import check_split
from detr_kit.errors import ConfigError, DatasetError
from detr_kit.structures import LabelMap

from data_helpers import write_coco

W, H = 40, 20  # a wide image, so that exchanged x and y leave it


def _png(path: Path, width: int = W, height: int = H) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)


def broken_yolo(root: Path) -> dict[str, str]:
    """A YOLO dataset with one planted problem per line; returns {line text: the kind it must be reported as}."""
    planted = {
        "0 0.5 0.5 0.2 0.2": "",
        "5 0.5 0.5 0.1 0.1": "unknown_class",
        "0 12 8 4 4": "not_normalized",
        "0 0.5 x 0.1 0.1": "bad_label_line",
        "0 0.5 0.5 0.1": "bad_label_line",
        "0 0.1 0.2 0.6 0.9": "corners_as_size",
        "1 0.95 0.5 0.3 0.2": "out_of_bounds",
        "0 0.5 0.5 0 0.1": "zero_area",
        "0 0.5 0.5 -0.1 0.1": "negative_size",
        "1 0.1 0.1 0.3 0.1 0.3 0.5": "",  # a polygon: its bounding box
    }
    for name in ("a", "b", "c"):
        _png(root / "images" / "train" / f"{name}.png")
    (root / "images" / "train" / "d.jpg").write_bytes(b"not an image")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("\n".join(planted) + "\n")
    (root / "labels" / "train" / "b.txt").write_text("")  # an empty label file: a negative; c.png has none at all
    (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # no image of that name
    (root / "val.txt").write_text("./images/train/a.png\nimages/train/zzz.png\n")  # the second one does not exist
    (root / "data.yaml").write_text("path: /elsewhere/on/another/machine\ntrain: images/train\nval: val.txt\n"
                                    "names: {0: cat, 1: dog}\n")
    return planted


def test_yolo_doctor_reports_each_planted_problem(tmp_path):
    planted = broken_yolo(tmp_path)
    report = check_split("yolo", tmp_path, "train", ())
    kinds = {p.kind for p in report.problems}
    assert kinds == {k for k in planted.values() if k} | {"orphan_label", "unreadable_image", "empty_image"}
    lines = {p.where.rsplit(":", 1)[-1]: p.kind for p in report.problems if ".txt:" in p.where}
    for number, (line, kind) in enumerate(planted.items(), start=1):
        assert lines.get(str(number), "") == kind, (line, lines.get(str(number)))
    assert sorted(p.message for p in report.problems if p.kind == "empty_image") == [
        "empty label file: a negative image (no objects)", "no label file: a negative image (no objects)"]
    assert [p.where for p in report.problems if p.kind == "orphan_label"] == [str(tmp_path / "labels/train/ghost.txt")]
    assert (report.num_images, report.num_annotations) == (3, 4)  # the usable boxes: good, corners, out, polygon
    val = check_split("yolo", tmp_path, "val", ())  # a txt list: ./ relative to it, the rest to the root
    missing = [p.message for p in val.problems if p.kind == "missing_image"]
    assert missing == [f"{tmp_path / 'images/train/zzz.png'} is listed but not found"] and val.num_images == 1
    assert "orphan_label" not in val.kinds()  # a list's label folders may hold other splits' labels


def test_training_on_a_broken_yolo_dataset_lists_every_problem_at_once(tmp_path):
    broken_yolo(tmp_path)
    with pytest.raises(DatasetError) as err:
        build_datasets(Config().replace([f"data.root={tmp_path}"]))
    message = str(err.value)
    assert "YOLO split 'train'" in message and "YOLO split 'val'" in message
    for kind in ("unknown_class", "not_normalized", "bad_label_line", "missing_image"):
        assert f"{kind}:" in message and f"fix {kind}:" in message
    assert "corners_as_size" not in message.split(" — ")[0]  # warnings do not stop training
    assert f"python tools/check_data.py --root {tmp_path}" in err.value.fix


def broken_voc(root: Path) -> None:
    """A VOC dataset with one planted problem per image or object."""
    def xml(name: str, objects: str, size: bool = True) -> None:
        size_xml = f"<size><width>{W}</width><height>{H}</height></size>" if size else ""
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(f"<annotation><filename>{name}.png</filename>{size_xml}{objects}</annotation>")

    def obj(name: str, box: tuple, difficult: int = 0) -> str:
        corners = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{corners}</bndbox></object>"

    for name in ("a", "b", "inverted", "noxml", "broken"):
        _png(root / "JPEGImages" / f"{name}.png")
    xml("a", obj("cat", (1, 1, 10, 10)) + obj("bird", (1, 1, 5, 5)) + obj("dog", ("abc", 1, 5, 5))
        + "<object><bndbox><xmin>1</xmin></bndbox></object>" + obj("dog", (30, 5, 45, 15))
        + obj("dog", (2, 5, 10, 35)) + obj("cat", (3, 3, 9, 9), difficult=1), size=False)
    xml("b", "")
    xml("inverted", obj("cat", (10, 1, 5, 5)))
    xml("missing_img", obj("cat", (1, 1, 5, 5)))
    (root / "Annotations" / "broken.xml").write_text("<annotation><object>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\ninverted\nmissing_img\nnoxml\nbroken\na\n")


def test_voc_doctor_reports_each_planted_problem(tmp_path):
    broken_voc(tmp_path)
    report = check_split("voc", tmp_path, "train", ("cat", "dog"))
    by_where = {(p.kind, p.where.removeprefix(str(tmp_path) + "/")) for p in report.problems}
    assert by_where == {
        ("unknown_class", "Annotations/a.xml object 2"), ("bad_xml", "Annotations/a.xml object 3"),
        ("bad_xml", "Annotations/a.xml object 4"), ("out_of_bounds", "Annotations/a.xml object 5"),
        ("xy_swapped", "Annotations/a.xml object 6"), ("empty_image", "Annotations/b.xml"),
        ("inverted_box", "Annotations/inverted.xml object 1"), ("missing_image", "ImageSets/Main/train.txt:4 missing_img"),
        ("missing_annotation", "ImageSets/Main/train.txt:5 noxml"), ("bad_xml", "Annotations/broken.xml"),
    }
    assert (report.num_images, report.num_annotations) == (4, 4)  # a, b, inverted, noxml; a's usable boxes
    assert report.histogram == {"cat": 2, "dog": 2}
    source_classes = check_split("voc", tmp_path, "train", ())  # no list: every name in the xml files
    assert "unknown_class" not in {p.kind for p in source_classes.problems} and source_classes.histogram["bird"] == 1
    missing = check_split("voc", tmp_path, "val", ())
    assert [p.kind for p in missing.problems] == ["layout"] and "ImageSets/Main has ['train']" in missing.problems[0].message


def test_voc_reads_size_from_the_image_and_difficult_as_crowd(tmp_path):
    broken_voc(tmp_path)
    objects = "".join(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin>"
                      f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
                      for name, box, difficult in [("cat", (1, 1, 10, 10), 0), ("bird", (1, 1, 5, 5), 0),
                                                   ("dog", (30, 5, 45, 15), 0), ("dog", (2, 5, 10, 35), 0),
                                                   ("cat", (3, 3, 9, 9), 1)])
    (tmp_path / "Annotations" / "b.xml").write_text(f"<annotation>{objects}</annotation>")  # no <size>
    (tmp_path / "ImageSets" / "Main" / "ok.txt").write_text("b\n")
    dataset = build_dataset(Config().replace([f"data.root={tmp_path}", "data.val_split=ok", "data.classes=[cat, dog, bird]",
                                              "data.eval_size=20", "data.max_size=40", "data.train_scales=[20]"]).data, "val")
    (image,) = dataset.coco.dataset["images"]
    assert (image["width"], image["height"]) == (W, H)  # a.xml has no <size>: read from the png
    boxes = {(a["category_id"], a["iscrowd"]): a["bbox"] for a in dataset.coco.dataset["annotations"]}
    assert boxes[1, 0] == [0.0, 0.0, 10.0, 10.0] and boxes[1, 1] == [2.0, 2.0, 7.0, 7.0]  # 1-based inclusive corners
    _, target = dataset[0]
    assert target.iscrowd.tolist() == [False, False, False, False, True] and target.labels.tolist()[:2] == [0, 2]


def test_coco_boxes_given_as_corners_or_with_x_and_y_swapped(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, {"a.png": np.zeros((H, W, 3), np.uint8)}, [
        {"file": "a.png", "bbox": [20, 2, 35, 15]},  # corners [x1, y1, x2, y2] given as [x, y, w, h]
        {"file": "a.png", "bbox": [5, 15, 10, 10]},  # y and x exchanged: fits the 40x20 image only swapped
        {"file": "a.png", "bbox": [30, 2, 20, 5]},  # plainly out of bounds
    ])
    report = check_dataset(image_dir, ann_file)
    assert [p.kind for p in report.problems if SEVERITY[p.kind] != "info"] == ["corners_as_size", "xy_swapped", "out_of_bounds"]


def test_format_detection_says_what_it_found_or_what_it_looked_for(tmp_path, capsys):
    broken_yolo(tmp_path / "yolo")
    broken_voc(tmp_path / "voc")
    assert resolve_format(Config().replace([f"data.root={tmp_path / 'yolo'}"]).data) == "yolo"
    assert resolve_format(Config().replace([f"data.root={tmp_path / 'yolo' / 'data.yaml'}"]).data) == "yolo"
    assert resolve_format(Config().replace([f"data.root={tmp_path / 'voc'}"]).data) == "voc"
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"data.dataset=auto: a YOLO dataset in {tmp_path / 'yolo'} ({tmp_path / 'yolo' / 'data.yaml'})",
                     f"data.dataset=auto: a YOLO dataset ({tmp_path / 'yolo' / 'data.yaml'})",
                     f"data.dataset=auto: a Pascal VOC dataset in {tmp_path / 'voc'} (Annotations/, JPEGImages/, "
                     f"ImageSets/Main/)"]
    assert resolve_format(Config().replace([f"data.root={tmp_path}", "data.dataset=voc"]).data) == "voc"  # as told
    with pytest.raises(DatasetError) as err:
        resolve_format(Config().replace([f"data.root={tmp_path}"]).data)
    assert err.value.line() == (
        f"data.root={tmp_path}: no dataset found (looked for COCO annotations/instances_train2017.json / "
        f"annotations/instances_val2017.json or annotations/*.json, YOLO data.yaml, Pascal VOC Annotations/ + "
        f"JPEGImages/ + ImageSets/Main/; its subfolder {tmp_path / 'voc'} has one: set data.root={tmp_path / 'voc'}) — "
        f"point data.root at the dataset's folder (or a YOLO data.yaml), or set data.dataset to coco, yolo or voc")
    with pytest.raises(ConfigError, match="data.classes=.*is set, but data.root=.* is a yolo dataset"):
        build_dataset(Config().replace([f"data.root={tmp_path / 'yolo'}", "data.classes=[cat]"]).data, "train")
    with pytest.raises(DatasetError, match="it holds a YOLO dataset: set data.dataset=auto"):
        build_dataset(Config().replace([f"data.root={tmp_path / 'yolo'}", "data.dataset=coco"]).data, "train")


def test_label_map_matched_by_id_and_name_else_by_name(tmp_path):
    coco = LabelMap((1, 2, 3), ("person", "bicycle", "car"))
    yolo_categories = [{"id": 0, "name": "person"}, {"id": 1, "name": "bicycle"}, {"id": 2, "name": "car"}]
    assert match_label_map(coco, yolo_categories, {0, 2}, "x") == LabelMap((0, 1, 2), coco.names)
    assert match_label_map(coco, [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}], {1, 3}, "x") is coco
    swapped = match_label_map(coco, [{"id": 2, "name": "person"}, {"id": 1, "name": "car"}], {1, 2}, "x")
    assert swapped == LabelMap((2, 4, 1), coco.names)  # bicycle lost its id 2 to person here: a fresh one
    with pytest.raises(DatasetError, match=r"x: categories 1 'cat' are not in the given label map .*person, bicycle"):
        match_label_map(coco, [{"id": 1, "name": "cat"}], {1}, "x")  # id 1 is "person" there: an error, not a match
    unnamed = LabelMap((0, 1), ("class_0", "class_1"))  # a converted checkpoint that knows no names
    assert match_label_map(unnamed, [{"id": 1, "name": "dog"}], {1}, "x") is unnamed
    image_dir, ann_file = write_coco(tmp_path, {"a.png": np.zeros((8, 8, 3), np.uint8)},
                                     [{"file": "a.png", "bbox": [1, 1, 2, 2], "category_id": 1}],
                                     categories=[{"id": 1, "name": "cat"}])
    with pytest.raises(DatasetError, match="categories 1 'cat' are not in the given label map"):
        CocoDetection(image_dir, ann_file, label_map=coco)


def test_yolo_layout_problems_are_one_line_each(tmp_path):
    _png(tmp_path / "images" / "a.png")
    cases = {
        "train: images\nval: images\n": "names: missing",
        "train: images\nval: images\nnames: [a, b]\nnc: 3\n": "nc: 3 but names lists 2 classes",
        "train: images\nnames: [a]\n": "has no 'val' split (it has ['train'])",
        "train: images\nval: nowhere\nnames: [a]\n": "nowhere: ",
        "[1, 2]": "holds a YAML list",
        "train: [images\n": "not readable as YAML",
    }
    for text, expected in cases.items():
        (tmp_path / "data.yaml").write_text(text)
        report = check_split("yolo", tmp_path, "val", ())
        assert [p.kind for p in report.problems] == ["layout"] and expected in report.problems[0].message, text
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnc: 2\n")
    assert json.loads(json.dumps(check_split("yolo", tmp_path, "val", ()).histogram)) == {}  # names class_0, class_1


def test_roboflow_export_layout(tmp_path):
    """Roboflow writes data.yaml beside train/ and valid/ with '../train/images' paths and no 'path' key."""
    for split, name in (("train", "a"), ("valid", "b")):
        _png(tmp_path / split / "images" / f"{name}.png")
        (tmp_path / split / "labels").mkdir(parents=True)
        (tmp_path / split / "labels" / f"{name}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: ['ant', 'bee']\n")
    train, val = build_datasets(Config().replace([f"data.root={tmp_path}", "data.eval_size=20", "data.max_size=40",
                                                  "data.train_scales=[20]", "data.crop_resize_scales=[]"]))
    assert [img["file_name"] for img in val.coco.dataset["images"]] == ["valid/images/b.png"]
    assert val.label_map == LabelMap((0, 1), ("ant", "bee")) and train.label_map == val.label_map
    assert val.coco.dataset["annotations"][0]["bbox"] == [10.0, 5.0, 20.0, 10.0] and val[0][1].labels.tolist() == [1]


def test_yolo_fractions_are_of_the_exif_upright_image(tmp_path):
    upright = np.zeros((40, 24, 3), np.uint8)  # h=40, w=24 as displayed; the object at xywh [2, 5, 10, 10]
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # the camera stored 24 h x 40 w
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise, which undoes ROTATE_90
    (tmp_path / "images").mkdir()
    stored.save(tmp_path / "images" / "rot.jpg", exif=exif.tobytes())
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "rot.txt").write_text(f"0 {7 / 24} {10 / 40} {10 / 24} {10 / 40}\n")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [thing]\n")
    report = check_split("yolo", tmp_path, "val", ())
    assert not report.problems
    dataset = build_dataset(Config().replace([f"data.root={tmp_path}"]).data, "val")
    (image,) = dataset.coco.dataset["images"]
    assert (image["width"], image["height"]) == (24, 40)
    assert dataset.coco.dataset["annotations"][0]["bbox"] == pytest.approx([2, 5, 10, 10])
