"""tools/check_data.py --root and tools/convert_data.py on YOLO and VOC copies of coco128 and on broken datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_helpers import COCO128
from format_writers import boxes_only, coco_to_voc, coco_to_yolo
from test_format_doctor import broken_yolo

ROOT = Path(__file__).resolve().parents[2]
JSONS = {"train": COCO128 / "annotations" / "instances_train.json", "val": COCO128 / "annotations" / "instances_val.json"}


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tool_copies")
    plain = {split: boxes_only(path, tmp / "coco" / f"{split}.json") for split, path in JSONS.items()}
    return {"coco": tmp / "coco", "yolo": coco_to_yolo(plain, COCO128 / "images", tmp / "yolo").parent,
            "voc": coco_to_voc(JSONS, COCO128 / "images", tmp / "voc")}


def _run(tool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_check_data_root_reports_both_splits_of_each_format(copies, tmp_path):
    voc = _run("check_data.py", "--root", str(copies["voc"]), "--skip-pixels", "--show-aug", "2", "--out", str(tmp_path / "aug"))
    assert voc.returncode == 0, voc.stdout + voc.stderr
    assert f"== train: Pascal VOC split 'train' of {copies['voc']}" in voc.stdout and "== val: Pascal VOC split 'val'" in voc.stdout
    assert "96 images, 725 annotations" in voc.stdout and "32 images, 214 annotations" in voc.stdout
    assert voc.stdout.count("0 errors, 0 warnings") == 2 and len(list((tmp_path / "aug").glob("aug_*.png"))) == 2
    assert voc.stderr.startswith(f"data.dataset=auto: a Pascal VOC dataset in {copies['voc']}")

    broken = tmp_path / "broken"
    broken_yolo(broken)
    result = _run("check_data.py", "--root", str(broken))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for kind in ("unknown_class", "not_normalized", "bad_label_line", "corners_as_size", "orphan_label", "missing_image"):
        assert f"] {kind}: " in result.stdout, kind
    assert f"[ERROR] not_normalized: {broken / 'labels/train/a.txt'}:3: '0 12 8 4 4' has values above 1" in result.stdout

    coco = _run("check_data.py", "--root", str(COCO128), "data.train_images=images", "data.val_images=images",
                "data.train_annotations=annotations/instances_train.json",
                "data.val_annotations=annotations/instances_val.json", "--skip-pixels")
    assert coco.returncode == 0 and "== train: " in coco.stdout and "== val: " in coco.stdout, coco.stdout + coco.stderr


def test_check_data_root_errors_are_one_line_or_in_the_report():
    result = _run("check_data.py", "--root", "no_data")
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "error: data.root=no_data: dataset not found (no folder no_data) — point data.root at your dataset's folder "
        "(COCO jsons, a YOLO data.yaml, or Pascal VOC's Annotations/ and JPEGImages/), or get COCO 2017 from "
        "https://cocodataset.org/#download (data.dataset=synthetic needs no download)"]
    result = _run("check_data.py", "--root", "tests/data", "--format", "voc")  # told VOC: the report says what lacks
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "[ERROR] layout: tests/data/ImageSets/Main/train.txt: split file not found" in result.stdout


def test_check_data_needs_one_dataset():
    for args in ([], ["--images", "x"], ["--images", "x", "--annotations", "y.json", "--root", "z"]):
        result = _run("check_data.py", *args)
        assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr, args


def test_convert_yolo_and_voc_to_coco_json(copies, tmp_path):
    result = _run("convert_data.py", "--root", str(copies["yolo"]), "--out-dir", str(tmp_path / "from_yolo"))
    assert result.returncode == 0, result.stderr
    assert f"images stay in {copies['yolo']}" in result.stdout and "data.train_images=. data.val_images=." in result.stdout
    for split, reference_file in (("train", copies["coco"] / "train.json"), ("val", copies["coco"] / "val.json")):
        converted = json.loads((tmp_path / "from_yolo" / f"instances_{split}.json").read_text())
        reference = json.loads(reference_file.read_text())
        names = {c["id"]: c["name"] for c in reference["categories"]}
        assert [c["name"] for c in converted["categories"]] == [names[i] for i in sorted(names)]
        assert [c["id"] for c in converted["categories"]] == list(range(80))  # YOLO's class indices
        expect, got = _boxes_by_file(reference, names), _boxes_by_file(converted, {c["id"]: c["name"] for c in converted["categories"]})
        assert expect.keys() == {Path(f).name for f in got}
        for file_name, boxes in got.items():
            assert Path(file_name).parent == Path("images") / split  # relative to the printed images folder
            assert (copies["yolo"] / file_name).is_file()
            assert len(boxes) == len(expect[Path(file_name).name])
            for (name, box), (name2, box2) in zip(sorted(boxes), sorted(expect[Path(file_name).name])):
                assert name == name2 and max(abs(a - b) for a, b in zip(box, box2)) < 1e-6

    voc = _run("convert_data.py", "--root", str(copies["voc"]), "--out-dir", str(tmp_path / "from_voc"))
    assert voc.returncode == 0, voc.stderr
    converted = json.loads((tmp_path / "from_voc" / "instances_val.json").read_text())
    assert sum(a["iscrowd"] for a in converted["annotations"]) == 2  # VOC's difficult objects, from COCO's crowd ones
    assert all((copies["voc"] / "JPEGImages" / img["file_name"]).is_file() for img in converted["images"])
    with Image.open(copies["voc"] / "JPEGImages" / converted["images"][0]["file_name"]) as image:
        assert image.size == (converted["images"][0]["width"], converted["images"][0]["height"])


def _boxes_by_file(data: dict, names: dict) -> dict[str, list]:
    files = {img["id"]: img["file_name"] for img in data["images"]}
    out: dict[str, list] = {name: [] for name in files.values()}
    for ann in data["annotations"]:
        out[files[ann["image_id"]]].append((names[ann["category_id"]], ann["bbox"]))
    return out


def test_convert_data_writes_new_files_only_and_refuses_bad_input(copies, tmp_path):
    out = tmp_path / "out"
    assert _run("convert_data.py", "--root", str(copies["yolo"]), "--out-dir", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = _run("convert_data.py", "--root", str(copies["yolo"]), "--out-dir", str(out))
    assert again.returncode == 2 and again.stderr.splitlines()[-1] == (
        f"error: --out-dir {out / 'instances_train.json'} already exists — choose another file with --out-dir, "
        f"or pass --overwrite to replace it")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _run("convert_data.py", "--root", str(copies["yolo"]), "--out-dir", str(out), "--overwrite").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["instances_train.json", "instances_val.json"]  # no temp files left

    broken = tmp_path / "broken"
    broken_yolo(broken)
    result = _run("convert_data.py", "--root", str(broken), "--out-dir", str(tmp_path / "never"))
    assert result.returncode == 1 and "Traceback" not in result.stderr and not (tmp_path / "never").exists()
    assert result.stderr.splitlines()[-1].startswith("  fix ")  # the problems, then each kind's fix
    assert f"error: YOLO split 'train' of {broken}: " in result.stderr
    coco = _run("convert_data.py", "--root", str(COCO128), "--out-dir", str(tmp_path / "never"),
                "data.train_annotations=annotations/instances_train.json")
    assert coco.returncode == 1 and f"error: --root {COCO128} already is a COCO dataset — " in coco.stderr
