"""CocoDetection and image loading, checked against the json itself and hand-built images."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from detr_kit.errors import DatasetError
from detr_kit.data.coco import BadImageError, CocoDetection, load_rgb_image
from detr_kit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, boxes_to_original, eval_transforms
from detr_kit.structures import LabelMap

from data_helpers import COCO128, write_coco


def denormalise(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] normalised -> [H, W, 3] in 0..255 float."""
    return (image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255


# ------------------------------------------------------------------------------------------ coco128


def test_coco128_loads_as_rgb_with_crowd_and_empty_images_handled(monkeypatch):
    """Both splits; SOURCE.md: 80 categories, 10 crowd boxes, 2 empty images, 1 grayscale image."""
    totals = {"crowd": 0, "empty": 0, "gray": 0}
    for split in ("train", "val"):
        ann_file = COCO128 / "annotations" / f"instances_{split}.json"
        data = json.loads(ann_file.read_text())
        sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
        anns_of = {img["id"]: [a for a in data["annotations"] if a["image_id"] == img["id"]] for img in data["images"]}
        eval_ds = CocoDetection(COCO128 / "images", ann_file, eval_transforms(64, 128), train=False)
        assert len(eval_ds.label_map) == 80 and eval_ds.num_classes == 80
        for i in range(len(eval_ds)):
            image, target = eval_ds[i]
            anns = anns_of[target.image_id]
            assert image.dtype == torch.float32 and image.shape == (3, *target.size) and min(target.size) <= 64 and max(target.size) <= 128
            assert target.orig_size == sizes[target.image_id]
            with Image.open(eval_ds.image_path(i)) as raw:
                if raw.mode == "L":
                    totals["gray"] += 1
                    pixels = denormalise(image)
                    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-3)
            assert len(target) == len(anns) and target.iscrowd.tolist() == [bool(a["iscrowd"]) for a in anns]
            back = boxes_to_original(target.boxes.double(), target.orig_size, "xywh")  # [T, 4] pixels
            np.testing.assert_allclose(back.numpy(), np.array([a["bbox"] for a in anns]).reshape(-1, 4), atol=1e-3)
            totals["crowd"] += int(target.iscrowd.sum())
        # Training targets; the pixels were checked above, so skip decoding them again.
        monkeypatch.setattr("detr_kit.data.coco.load_rgb_image", lambda path: np.zeros((8, 8, 3), np.uint8))
        train_ds = CocoDetection(COCO128 / "images", ann_file, None, train=True)
        for i in range(len(train_ds)):
            _, target = train_ds[i]
            anns = anns_of[target.image_id]
            assert len(target) == sum(1 for a in anns if not a["iscrowd"]) and not target.iscrowd.any()
            if not anns:
                totals["empty"] += 1
                assert target.boxes.shape == (0, 4) and target.labels.shape == (0,)
        monkeypatch.undo()
    assert totals == {"crowd": 10, "empty": 2, "gray": 1}


# ------------------------------------------------------------------------------------------ round trip


def test_box_round_trip_random_boxes(tmp_path, rng):
    images, anns = {}, []
    for k in range(4):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        images[f"{k}.png"] = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(0, 6))):
            x0, y0 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
            bw, bh = rng.uniform(0.5, w - x0), rng.uniform(0.5, h - y0)
            anns.append({"file": f"{k}.png", "bbox": [float(x0), float(y0), float(bw), float(bh)], "category_id": int(rng.choice([1, 3]))})
    image_dir, ann_file = write_coco(tmp_path, images, anns)
    ds = CocoDetection(image_dir, ann_file, transforms=None, train=False)
    expected = {i + 1: [a for a in anns if a["file"] == f"{i}.png"] for i in range(4)}
    for i in range(len(ds)):
        _, target = ds[i]
        ref = expected[target.image_id]
        back = boxes_to_original(target.boxes.double(), target.orig_size, "xywh").numpy()
        np.testing.assert_allclose(back, np.array([a["bbox"] for a in ref]).reshape(-1, 4), atol=1e-3)
        assert target.labels.tolist() == [{1: 0, 3: 1}[a["category_id"]] for a in ref]


# ------------------------------------------------------------------------------------------ bad json


def test_truncated_json(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, {"a.png": np.zeros((4, 4, 3), np.uint8)}, [])
    ann_file.write_text(ann_file.read_text()[:-20])
    with pytest.raises(DatasetError, match=r"not readable as JSON \(truncated or corrupt\?\)") as err:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(err.value)


@pytest.mark.parametrize(
    "content, match",
    [("[1, 2]", "top level is a list, not a COCO object"),
     ('{"images": [], "annotations": []}', r"missing or non-list key\(s\) \['categories'\]"),
     ('{"foo": 1}', r"\['images', 'annotations', 'categories'\]")],
)
def test_not_coco_json(tmp_path, content, match):
    (tmp_path / "images").mkdir()
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        CocoDetection(tmp_path / "images", path)


def test_unknown_category_names_annotation_and_category(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, {"a.png": np.zeros((8, 8, 3), np.uint8)},
                                     [{"file": "a.png", "bbox": [1, 1, 2, 2]}, {"file": "a.png", "bbox": [1, 1, 2, 2], "category_id": 77}])
    with pytest.raises(DatasetError, match=r"annotation id=2 \(image id=1\): category id 77 is not in 'categories'"):
        CocoDetection(image_dir, ann_file)


def test_missing_images_listed_in_one_error(tmp_path):
    images = {f"{i:02d}.png": np.zeros((4, 4, 3), np.uint8) for i in range(25)}
    image_dir, ann_file = write_coco(tmp_path, images, [{"file": "00.png", "bbox": [0, 0, 2, 2]}])
    for i in range(1, 24):  # delete 23 of them
        (image_dir / f"{i:02d}.png").unlink()
    with pytest.raises(DatasetError) as err:
        CocoDetection(image_dir, ann_file)
    message = str(err.value)
    assert "23 problem(s) make this dataset unusable (missing_image x23)" in message
    assert "missing_image: ... and 18 more" in message  # the first 5 are named, the rest counted
    assert all(f"{i:02d}.png not found" in message for i in range(1, 6)) and "06.png" not in message
    assert "00.png" not in message and "24.png" not in message
    assert f"python tools/check_data.py --images {image_dir} --annotations {ann_file}" in message


def test_given_label_map_is_used_and_checked(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, {"a.png": np.zeros((8, 8, 3), np.uint8)}, [{"file": "a.png", "bbox": [1, 1, 2, 2], "category_id": 3}])
    checkpoint_map = LabelMap((3, 1, 9), ("b", "a", "c"))
    ds = CocoDetection(image_dir, ann_file, label_map=checkpoint_map)
    assert ds[0][1].labels.tolist() == [0] and ds.num_classes == 3
    with pytest.raises(ValueError, match="not in the given label map"):
        CocoDetection(image_dir, ann_file, label_map=LabelMap((1,), ("a",)))


# ------------------------------------------------------------------------------------------ boxes


def test_bad_boxes_clipped_or_dropped_with_one_warning(tmp_path, caplog):
    anns = [
        {"file": "a.png", "bbox": [2, 2, 4, 4]},  # fine
        {"file": "a.png", "bbox": [float("nan"), 1, 2, 2]},  # nan -> dropped
        {"file": "a.png", "bbox": [1, 1, -3, 2]},  # negative -> dropped
        {"file": "a.png", "bbox": [3, 3, 0, 5]},  # zero area -> dropped
        {"file": "a.png", "bbox": [30, 30, 5, 5]},  # entirely outside a 20x10 image -> zero area, dropped
        {"file": "a.png", "bbox": [-2, 5, 10, 10]},  # clipped to [0, 5, 8, 10]
    ]
    image_dir, ann_file = write_coco(tmp_path, {"a.png": np.zeros((10, 20, 3), np.uint8)}, anns)
    with caplog.at_level(logging.WARNING, logger="detr_kit.data.coco"):
        ds = CocoDetection(image_dir, ann_file, train=False)
    assert ds.box_counts == {"nan": 1, "negative": 1, "zero_area": 2, "clipped": 1}
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    _, target = ds[0]
    back = boxes_to_original(target.boxes.double(), target.orig_size, "xyxy").numpy()
    np.testing.assert_allclose(back, [[2, 2, 6, 6], [0, 5, 8, 10]], atol=1e-4)


# ------------------------------------------------------------------------------------------ images


def _one_image_dataset(tmp_path, name, pil_or_bytes, size_wh, on_bad_image="skip", extra=None):
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if isinstance(pil_or_bytes, bytes):
        (image_dir / name).write_bytes(pil_or_bytes)
    else:
        pil_or_bytes.save(image_dir / name)
    images = [{"id": 1, "file_name": name, "width": size_wh[0], "height": size_wh[1]}]
    for i, (n, img) in enumerate((extra or {}).items(), start=2):
        img.save(image_dir / n)
        images.append({"id": i, "file_name": n, "width": img.size[0], "height": img.size[1]})
    ann_file = tmp_path / "ann.json"
    box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}  # a split without boxes is refused
    ann_file.write_text(json.dumps({"images": images, "annotations": [box], "categories": [{"id": 1, "name": "x"}]}))
    return CocoDetection(image_dir, ann_file, eval_transforms(None), train=False, on_bad_image=on_bad_image)


def test_corrupt_image_skip_and_error(tmp_path):
    good = Image.new("RGB", (6, 4), (10, 200, 30))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    ds = _one_image_dataset(tmp_path, "bad.jpg", truncated, (64, 64), "skip", extra={"good.png": good})
    image, target = ds[0]  # falls through to the next index, deterministically
    assert target.image_id == 2 and image.shape == (3, 4, 6)
    assert list(ds.bad_images) == [str(tmp_path / "images" / "bad.jpg")]
    ds.on_bad_image = "error"
    with pytest.raises(BadImageError, match="bad.jpg"):
        ds[0]


def test_exif_rotated_jpeg_matches_prerotated_copy(tmp_path):
    upright = np.zeros((40, 24, 3), np.uint8)  # h=40, w=24 as displayed
    upright[5:15, 2:12] = 255  # the object: xywh [2, 5, 10, 10]
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the camera stored (24 h x 40 w)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 270 (90 clockwise) to display -> undoes ROTATE_90
    stored.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    Image.fromarray(upright).save(tmp_path / "pre.jpg", quality=100)
    rotated, pre = load_rgb_image(tmp_path / "rot.jpg"), load_rgb_image(tmp_path / "pre.jpg")
    assert rotated.shape == pre.shape == (40, 24, 3)
    assert np.abs(rotated.astype(int) - pre.astype(int)).mean() < 3
    ys, xs = np.nonzero(rotated.mean(-1) > 128)
    assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (2, 5, 10, 10)  # box aligns


def test_image_modes_all_load_as_rgb(tmp_path):
    gradient16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(gradient16).save(tmp_path / "g16.png")
    out = load_rgb_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255] and (out[..., 0] == out[..., 2]).all()
    Image.new("CMYK", (5, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # CMYK red
    cmyk = load_rgb_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (3, 5, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60
    Image.new("RGBA", (4, 4), (10, 20, 30, 128)).save(tmp_path / "rgba.png")
    assert load_rgb_image(tmp_path / "rgba.png")[0, 0].tolist() == [10, 20, 30]
    Image.new("L", (3, 2), 77).save(tmp_path / "gray.png")
    assert load_rgb_image(tmp_path / "gray.png").tolist() == [[[77] * 3] * 3] * 2
    Image.new("P", (2, 2), 3).save(tmp_path / "pal.png")
    assert load_rgb_image(tmp_path / "pal.png").shape == (2, 2, 3)
    ds = _one_image_dataset(tmp_path / "one", "px.png", Image.new("RGB", (1, 1), (255, 0, 0)), (1, 1)) if (tmp_path / "one").mkdir() is None else None
    image, target = ds[0]
    assert image.shape == (3, 1, 1) and target.size == (1, 1)


def test_huge_image_loads(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("L", (8000, 8000), 200).save(image_dir / "big.png", compress_level=1)
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "big.png", "width": 8000, "height": 8000}],
                                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4000, 8000]}],
                                    "categories": [{"id": 1, "name": "x"}]}))
    ds = CocoDetection(image_dir, ann_file, eval_transforms(64, 100), train=False)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target.orig_size == (8000, 8000)
    np.testing.assert_allclose(denormalise(image), 200, atol=0.01)
    torch.testing.assert_close(target.boxes, torch.tensor([[0.25, 0.5, 0.5, 1.0]]))


def test_bad_images_seen_by_dataloader_workers_reach_the_main_process(tmp_path):
    from detr_kit.data.loaders import build_val_loader

    ds = _one_image_dataset(tmp_path, "bad.png", b"not a png", (8, 8), "skip", extra={"good.png": Image.new("RGB", (8, 8))})
    ids = [t.image_id for _, targets in build_val_loader(ds, 1, num_workers=1) for t in targets]
    assert ids == [2, 2] and list(ds.bad_images) == [str(tmp_path / "images" / "bad.png")]
    assert ds._bad_images == {}  # the main process itself never read the bad file: the record came from the worker
