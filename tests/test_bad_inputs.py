"""Broken and unusual inputs through every loader entry point: the dataset (direct and via build_datasets),
Detector, tools/infer.py and tools/check_data.py. Each input is either handled (skipped with a warning naming
the file, or loaded as RGB) or refused with an error naming the file and the fix; never a bare traceback.

The per-format pixel checks of ``load_rgb_image`` live in tests/data/test_coco_dataset.py; here the same files go
through the entry points together, next to the files that cannot be read.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_kit.build import build_datasets, build_model
from detr_kit.config import Config, config_from_dict
from detr_kit.data.coco import BadImageError, CocoDetection
from detr_kit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transforms
from detr_kit.engine.checkpoint import CheckpointError, save_checkpoint
from detr_kit.errors import DatasetError
from detr_kit.inference import Detector, ImageReadError, read_image
from detr_kit.structures import LabelMap

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {
        "hidden_dim": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64,
        "num_queries": 12, "dropout": 0.0, "backbone": {"name": "resnet18", "weights": None, "norm": "bn"},
    },
    "data": {"eval_size": 64, "max_size": 96, "train_scales": [64], "crop_resize_scales": [64], "crop_size": [32, 64]},
}
# Unreadable files -> the phrase Detector's error gives for each.
UNREADABLE = {"corrupt.jpg": "re-encode or replace", "truncated.jpg": "truncated", "text.png": "re-encode or replace",
              "empty.jpg": "empty (0 bytes)", "folder.jpg": "is a folder"}
# Readable files -> the upright (h, w) they load with and the RGB of their pixel (0, 0).
READABLE = {"good.jpg": ((48, 64), None), "exif.jpg": ((40, 24), None), "16bit.png": ((48, 64), (128, 128, 128)),
            "cmyk.jpg": ((48, 64), None), "rgba.png": ((48, 64), (10, 20, 30)), "gray.png": ((48, 64), (77, 77, 77)),
            "one.png": ((1, 1), (255, 0, 0))}


def _write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    good.save(folder / "good.jpg")
    buffer = io.BytesIO()
    good.save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\x00\x01 not an image " * 40)  # random bytes behind an image name
    (folder / "text.png").write_text("a text file named like a PNG\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "folder.jpg").mkdir()  # a directory named like an image
    stored = Image.fromarray(rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 24 x 40 (h x w), shown upright as 40 x 24
    stored.save(folder / "exif.jpg", exif=exif.tobytes())
    Image.fromarray(np.full((48, 64), 32896, dtype=np.uint16)).save(folder / "16bit.png")  # 32896 / 257 = 128
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    Image.new("RGBA", (64, 48), (10, 20, 30, 128)).save(folder / "rgba.png")
    Image.new("L", (64, 48), 77).save(folder / "gray.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "one.png")


def _coco_json(path: Path, names: list[str], extra_annotations: list[dict] = (), **override) -> Path:
    """A COCO json over ``names`` (upright sizes from READABLE; 64x48 for the unreadable), one box per image."""
    images = []
    for i, name in enumerate(names, start=1):
        (h, w), _ = READABLE.get(name, ((48, 64), None))
        images.append({"id": i, "file_name": name, "width": w, "height": h})
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1.0, "iscrowd": 0}
                   for i in range(1, len(names) + 1)]
    for j, ann in enumerate(extra_annotations, start=len(annotations) + 1):
        annotations.append({"id": j, "area": 1.0, "iscrowd": 0, "category_id": 1, **ann})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}], **override}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs")
    _write_corpus(root / "images")
    return root


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    cfg = config_from_dict(TINY)
    return Detector(build_model(cfg, num_classes=1), cfg, LabelMap((1,), ("thing",)), device="cpu", threshold=0.0)


def _pixel(image: torch.Tensor) -> list[int]:
    """The RGB of pixel (0, 0) of a normalised [3, H, W] image."""
    rgb = (image[:, 0, 0].numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255
    return [int(round(v)) for v in rgb]


# ------------------------------------------------------------------------------------------ dataset


def test_dataset_skips_each_unreadable_file_and_loads_every_mode_as_rgb(corpus, caplog):
    names = sorted(UNREADABLE) + sorted(READABLE)
    ann = _coco_json(corpus / "all.json", names)
    dataset = CocoDetection(corpus / "images", ann, eval_transforms(None), train=False)  # no resize: pixels stay
    with caplog.at_level(logging.WARNING, logger="detr_kit.data.coco"):
        samples = [dataset[i] for i in range(len(dataset))]
    first_readable = names.index(sorted(READABLE)[0]) + 1
    for i, (name, (image, target)) in enumerate(zip(names, samples), start=1):
        if name in UNREADABLE:
            assert target.image_id == first_readable  # replaced by the next readable image
            continue
        size, pixel = READABLE[name]
        assert target.image_id == i and target.orig_size == size and image.shape == (3, *size)
        if pixel is not None:
            assert _pixel(image) == list(pixel), name
    assert _pixel(samples[names.index("cmyk.jpg")][0])[0] > 200  # CMYK red stays red
    assert {Path(p).name for p in dataset.bad_images} == set(UNREADABLE)
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert sorted(Path(m.split()[3]).name for m in warned) == sorted(UNREADABLE)  # one named warning per file
    assert "Is a directory" in dataset.bad_images[str(corpus / "images" / "folder.jpg")]
    assert not dataset.size_mismatches  # the EXIF image is compared upright

    dataset.on_bad_image = "error"
    for name in UNREADABLE:
        with pytest.raises(BadImageError, match=rf"{name}: cannot read image .*on_bad_image=skip"):
            dataset[names.index(name)]


def _coco_root(corpus: Path, val_json: Path) -> Config:
    """A COCO layout whose train split is the readable corpus and whose val json is ``val_json``."""
    root = corpus / f"coco_{val_json.stem}"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").symlink_to(corpus / "images")
    (root / "val2017").symlink_to(corpus / "images")
    _coco_json(root / "annotations" / "instances_train2017.json", sorted(READABLE))
    (root / "annotations" / "instances_val2017.json").write_bytes(val_json.read_bytes())
    overrides = [f"data.root={root}", *(f"data.{k}={json.dumps(v)}" for k, v in TINY["data"].items())]
    return Config().replace(overrides)


BROKEN_JSON = {
    "truncated": (lambda p: p.write_text(p.read_text()[:-15]), r"not readable as JSON \(truncated or corrupt\?\)"),
    "zero_bytes": (lambda p: p.write_bytes(b""), "not readable as JSON"),
    "binary": (lambda p: p.write_bytes(b"\xff\xfe\x00\x81"), "not readable as JSON"),
    "a_list": (lambda p: p.write_text("[1, 2, 3]"), "top level is a list, not a COCO object"),
    "no_images": (lambda p: _drop(p, "images"), r"missing or non-list key\(s\) \['images'\]"),
    "no_annotations": (lambda p: _drop(p, "annotations"), r"missing or non-list key\(s\) \['annotations'\]"),
    "no_categories": (lambda p: _drop(p, "categories"), r"missing or non-list key\(s\) \['categories'\]"),
    "unknown_category": (lambda p: _coco_json(p, ["good.jpg"], [{"image_id": 1, "bbox": [1, 1, 2, 2], "category_id": 7}]),
                         r"annotation id=2 \(image id=1\): category id 7 is not in 'categories'"),
    "missing_image": (lambda p: _coco_json(p, ["good.jpg", "gone.jpg"]), r"missing_image: image id=2 gone\.jpg: .*gone\.jpg not found"),
}


def _drop(path: Path, key: str) -> None:
    data = json.loads(path.read_text())
    del data[key]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", sorted(BROKEN_JSON))
def test_build_datasets_names_the_broken_json(corpus, tmp_path, case):
    make, message = BROKEN_JSON[case]
    val_json = _coco_json(tmp_path / f"{case}.json", ["good.jpg"])
    make(val_json)
    cfg = _coco_root(corpus, val_json)
    with pytest.raises(DatasetError, match=message) as err:
        build_datasets(cfg)
    assert err.value.what.startswith(str(cfg.data.root) + "/annotations/instances_val2017.json: 1 problem(s)")
    assert err.value.fix.endswith(f"python tools/check_data.py --images {cfg.data.root}/val2017 "
                                  f"--annotations {cfg.data.root}/annotations/instances_val2017.json")


def test_build_datasets_cleans_bad_boxes_and_skips_bad_images(corpus, tmp_path, caplog):
    boxes = [{"image_id": 1, "bbox": [float("nan"), 1, 2, 2]}, {"image_id": 1, "bbox": [1, 1, -3, 2]},
             {"image_id": 1, "bbox": [50, 30, 100, 100]}, {"image_id": 1, "bbox": [500, 500, 5, 5]},
             {"image_id": 1, "bbox": [1, 1, None, 2]}]
    val_json = _coco_json(tmp_path / "boxes.json", ["good.jpg", "corrupt.jpg", "one.png"], boxes)
    with caplog.at_level(logging.WARNING, logger="detr_kit.data.coco"):
        _, val = build_datasets(_coco_root(corpus, val_json))
        targets = [val[i][1] for i in range(len(val))]
    assert val.box_counts == {"nan": 2, "negative": 1, "zero_area": 1, "clipped": 1}
    assert [t.image_id for t in targets] == [1, 3, 3] and len(targets[0]) == 2  # the 1x1 box and the clipped one
    assert any("corrupt.jpg" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ Detector


def test_detector_reads_every_mode_and_names_every_unreadable_file(corpus, detector):
    images = corpus / "images"
    results = detector([images / name for name in READABLE])
    for det, (name, ((h, w), _)) in zip(results, READABLE.items()):
        assert len(det) > 0 and bool(torch.isfinite(det.boxes).all()), name
        assert float(det.boxes[:, [0, 2]].max()) <= w + 1e-3 and float(det.boxes[:, [1, 3]].max()) <= h + 1e-3, name
    for name, reason in UNREADABLE.items():
        with pytest.raises(ImageReadError, match=rf"{re.escape(name)}'.*{re.escape(reason)}"):
            detector(images / name)
    with pytest.raises(ImageReadError, match="truncated.jpg"):
        detector(Image.open(images / "truncated.jpg"))  # a lazily opened PIL file decodes inside the call
    # A 16-bit PIL image is scaled as the file is, not clipped to white.
    assert read_image(Image.open(images / "16bit.png"))[0, 0].tolist() == [128, 128, 128] == read_image(images / "16bit.png")[0, 0].tolist()


@pytest.mark.parametrize("array, message", [
    (np.zeros((8, 6), np.uint16), "uint8"), (np.zeros((0, 0, 3), np.uint8), "empty"),
    (torch.zeros(4, 8, 6, dtype=torch.uint8), "1 or 3 channels"), (np.full((8, 6, 3), np.nan), "uint8"),
])
def test_detector_refuses_unusable_arrays_by_shape_and_dtype(detector, array, message):
    with pytest.raises(ImageReadError, match=message):
        detector(array)


# ------------------------------------------------------------------------------------------ tools


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_infer_cli_skips_unreadable_files_and_refuses_a_broken_checkpoint(corpus, detector, tmp_path):
    checkpoint = tmp_path / "tiny.pth"
    save_checkpoint(checkpoint, {"model": detector.model.state_dict(), "config": detector.cfg.to_dict(),
                                 "label_map": detector.label_map.to_dict()})
    result = _run("infer.py", "--checkpoint", str(checkpoint), str(corpus / "images"), str(corpus / "images" / "folder.jpg"),
                  "--out", str(tmp_path / "out"), "--threshold", "0", "--device", "cpu", "--batch-size", "3", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    for name in set(UNREADABLE) - {"folder.jpg"}:  # a folder inside the input folder is not an input
        assert f"skipping '{corpus / 'images' / name}'" in result.stderr
    assert "folder 'folder.jpg'" in result.stderr.replace(str(corpus / "images") + "/", "")  # the explicit folder: no images
    assert f"{len(READABLE)} image(s) processed" in result.stdout
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {r["file_name"] for r in written} == set(READABLE)
    for name, ((h, w), _) in READABLE.items():
        with Image.open(tmp_path / "out" / (Path(name).stem + (".png" if name.endswith(".png") else ".jpg"))) as drawn:
            assert drawn.size == (w, h)  # annotated upright, at the original size

    broken = tmp_path / "broken.pth"
    broken.write_bytes(checkpoint.read_bytes()[:2000])
    result = _run("infer.py", "--checkpoint", str(broken), str(corpus / "images" / "good.jpg"), "--out", str(tmp_path / "o2"),
                  "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: checkpoint {str(broken)!r} is corrupt or truncated" in result.stderr


def test_infer_main_refuses_other_unusable_checkpoints(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("detr_kit_tools_infer_bad", ROOT / "tools" / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "zero.pth").write_bytes(b"")
    torch.save({"model": {}}, tmp_path / "partial.pth")
    for name, reason in (("zero.pth", r"is corrupt or truncated \(the file is empty, 0 bytes\) — "),
                         ("missing.pth", "does not exist — "), ("partial.pth", r"lacks \['config', 'label_map'\] — ")):
        assert infer.main(["--checkpoint", str(tmp_path / name), str(image), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: checkpoint {str(tmp_path / name)!r} ") and err.count("\n") == 1
        assert re.search(reason, err), err
    with pytest.raises(CheckpointError):  # the library call itself keeps its typed error
        Detector.from_checkpoint(tmp_path / "zero.pth")


def test_check_data_cli_reports_every_planted_problem(corpus, tmp_path):
    boxes = [{"image_id": 1, "bbox": [float("nan"), 1, 2, 2]}, {"image_id": 1, "bbox": [1, 1, -3, 2]},
             {"image_id": 1, "bbox": [50, 30, 100, 100]}, {"image_id": 1, "bbox": [2, 2, 3, 3], "category_id": 7}]
    ann = _coco_json(tmp_path / "all.json", sorted(UNREADABLE) + sorted(READABLE) + ["gone.jpg"], boxes)
    result = _run("check_data.py", "--images", str(corpus / "images"), "--annotations", str(ann), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    out = result.stdout
    for name in ("corrupt.jpg", "truncated.jpg", "text.png", "empty.jpg"):
        assert f"unreadable_image: image id={sorted(UNREADABLE).index(name) + 1} {name}" in out
    assert "folder.jpg is a folder, not an image file" in out and "gone.jpg not found" in out
    for kind in ("nan_box", "negative_size", "out_of_bounds", "unknown_category"):
        assert f"] {kind}: " in out
    for name in READABLE:  # 16-bit, CMYK, RGBA, gray, 1x1 and the EXIF-rotated image are fine
        assert f" {name}:" not in out.replace(f" {name}: has no annotations", "")
    assert "summary and fixes" in out and "re-encode or replace the file" in out


def test_check_data_cli_explains_each_broken_json(corpus, tmp_path):
    for case, (make, _) in sorted(BROKEN_JSON.items()):
        if case in ("unknown_category", "missing_image"):
            continue  # record-level problems, covered above
        path = _coco_json(tmp_path / f"{case}.json", ["good.jpg"])
        make(path)
        result = _run("check_data.py", "--images", str(corpus / "images"), "--annotations", str(path), cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (case, result.stderr)
        assert f"[ERROR] json: {path}" in result.stdout, case


def test_check_data_show_aug_on_unreadable_or_empty_datasets(corpus, tmp_path):
    unreadable = _coco_json(tmp_path / "unreadable.json", ["corrupt.jpg", "text.png"])
    result = _run("check_data.py", "--images", str(corpus / "images"), "--annotations", str(unreadable),
                  "--show-aug", "2", "--out", str(tmp_path / "aug"), "--skip-pixels", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "[ERROR] show-aug:" in result.stdout and "none of the 2 images can be read" in result.stdout

    import importlib.util

    spec = importlib.util.spec_from_file_location("check_data_bad_inputs", ROOT / "tools" / "check_data.py")
    check_data = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = check_data  # dataclasses look their module up there
    spec.loader.exec_module(check_data)
    no_images = _coco_json(tmp_path / "none.json", [])
    assert check_data.show_augmentations(corpus / "images", no_images, 2, tmp_path / "aug2", None) == 1
