"""Transforms: the resize rule, boxes following pixels through flips/resizes/crops, extra transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detr_kit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    boxes_to_original,
    build_extra_transform,
    eval_transforms,
    resized_shape,
    seed_transforms,
    train_transforms,
)


@pytest.mark.parametrize(
    "hw, size, max_size, expected",
    [
        ((480, 640), 800, 1333, (800, 1066)),  # landscape: 800 * 640 / 480 = 1066.67 -> 1066
        ((640, 480), 800, 1333, (1066, 800)),  # portrait
        ((100, 1000), 800, 1333, (133, 1330)),  # capped: short = round(1333 * 100 / 1000) = 133
        ((800, 800), 800, 1333, (800, 800)),  # already there
        ((218, 640), 64, 128, (44, 128)),  # 44 * 640 / 218 = 129.2 would overshoot the cap by a pixel
        ((1, 1), 800, 1333, (800, 800)),
    ],
)
def test_resized_shape_hand_computed(hw, size, max_size, expected):
    assert resized_shape(*hw, size, max_size) == expected


def _white_region(image: torch.Tensor) -> tuple[float, float, float, float] | None:
    """xyxy pixel extent of the bright pixels of a normalised [3, H, W] image (a reference independent of the boxes)."""
    pixels = image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)  # [H, W, 3] 0..1
    ys, xs = np.nonzero(pixels.mean(-1) > 0.5)
    if xs.size == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def test_boxes_follow_pixels_through_flip_resize_crop():
    rng = np.random.default_rng(1)
    pipeline = train_transforms(scales=(48, 64, 80), max_size=120, crop_resize_scales=(50, 70), crop_size=(30, 60))
    seed_transforms(pipeline, 0)
    seen_flip = seen_crop_loss = 0
    for trial in range(60):
        h, w = int(rng.integers(40, 100)), int(rng.integers(40, 100))
        x0, y0 = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 12))
        x1, y1 = int(rng.integers(x0 + 10, w + 1)), int(rng.integers(y0 + 10, h + 1))
        image = np.zeros((h, w, 3), np.uint8)
        image[y0:y1, x0:x1] = 255
        out = pipeline(image=image, bboxes=np.array([[x0, y0, x1, y1]], float), labels=np.array([4]), iscrowd=np.array([0]))
        new_h, new_w = out["image"].shape[1:]
        region = _white_region(out["image"])
        boxes = np.asarray(out["bboxes"]).reshape(-1, 4)
        assert max(new_h, new_w) <= 120
        if len(boxes) == 0:  # the crop missed the object: no pixels of it either (blurred edges aside)
            assert region is None or (region[2] - region[0]) * (region[3] - region[1]) <= 4
            seen_crop_loss += 1
            continue
        assert list(out["labels"]) == [4]
        box = boxes[0]
        assert 0 <= box[0] < box[2] <= new_w and 0 <= box[1] < box[3] <= new_h  # inside the image
        assert region is not None
        np.testing.assert_allclose(box, region, atol=1.5)  # resampling blurs edges by about a pixel
        # cx on the same side as the drawn box tells us if this sample was flipped
        seen_flip += ((box[0] + box[2]) / 2 / new_w < 0.5) != ((x0 + x1) / 2 / w < 0.5)
    assert seen_flip > 0 and seen_crop_loss < 30


def test_seeded_pipeline_is_reproducible():
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    box = np.array([[5.0, 5.0, 40.0, 30.0]])
    runs = []
    for _ in range(2):
        pipeline = train_transforms((32, 48), 80, (40,), (20, 40))
        seed_transforms(pipeline, 123)
        runs.append([pipeline(image=image, bboxes=box, labels=[1], iscrowd=[0]) for _ in range(5)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a["image"], b["image"])
        np.testing.assert_array_equal(a["bboxes"], b["bboxes"])


def test_eval_transform_shape_and_normalisation():
    image = np.full((30, 60, 3), 255, np.uint8)
    out = eval_transforms(20, 50)(image=image, bboxes=np.zeros((0, 4)), labels=[], iscrowd=[])
    assert out["image"].shape == (3, 20, 40)
    expected = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    torch.testing.assert_close(out["image"][:, 0, 0], torch.tensor(expected, dtype=torch.float32))


def test_boxes_to_original_hand_computed():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]])  # centre of a 100 (h) x 200 (w) image
    torch.testing.assert_close(boxes_to_original(boxes, (100, 200)), torch.tensor([[80.0, 30.0, 120.0, 70.0]]))
    torch.testing.assert_close(boxes_to_original(boxes, (100, 200), "xywh"), torch.tensor([[80.0, 30.0, 40.0, 40.0]]))
    batched = boxes_to_original(boxes[None].repeat(2, 1, 1), torch.tensor([[100, 200], [10, 20]]))
    torch.testing.assert_close(batched[1], torch.tensor([[8.0, 3.0, 12.0, 7.0]]))
    with pytest.raises(ValueError, match="box_format"):
        boxes_to_original(boxes, (1, 1), "cxcywh")


def test_extra_transforms_by_name():
    with pytest.raises(ValueError, match="'RandomBrightnes'.*did you mean 'RandomBrightnessContrast'"):
        build_extra_transform("RandomBrightnes")
    with pytest.raises(ValueError, match="no argument"):
        build_extra_transform("RandomBrightnessContrast", {"brightness": 0.1})
    extra = [build_extra_transform("RandomBrightnessContrast", {"p": 1.0}), build_extra_transform("VerticalFlip", {"p": 1.0})]
    pipeline = train_transforms((40,), 100, (), hflip=False, extra=extra)
    out = pipeline(image=np.zeros((40, 40, 3), np.uint8), bboxes=np.array([[0.0, 0.0, 10.0, 20.0], [5, 30, 15, 40]]),
                   labels=np.array([1, 2]), iscrowd=np.array([0, 1]))
    np.testing.assert_allclose(out["bboxes"], [[0, 20, 10, 40], [5, 0, 15, 10]], atol=1e-4)  # the boxes flipped too
    assert list(out["labels"]) == [1, 2] and list(out["iscrowd"]) == [0, 1]
