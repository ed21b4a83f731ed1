"""The data section of build.py: transforms, datasets (synthetic on first use, clear COCO errors), loaders."""

from __future__ import annotations

import pytest

from detr_kit.build import build_datasets, build_transforms
from detr_kit.data.loaders import build_train_loader, build_val_loader
from detr_kit.errors import DatasetError
from detr_kit.config import Config


def _synthetic_cfg(root) -> Config:
    return Config().replace([
        "data.dataset=synthetic", f"data.root={root}", "data.synthetic.num_train=6", "data.synthetic.num_val=3",
        "data.synthetic.image_size=48", "data.train_scales=[32, 48]", "data.crop_resize_scales=[40]",
        "data.crop_size=[24, 40]", "data.max_size=64", "data.eval_size=48",
    ])


def test_synthetic_generated_on_first_use_then_reused(tmp_path):
    cfg = _synthetic_cfg(tmp_path / "shapes")
    train, val = build_datasets(cfg)
    assert (len(train), len(val), train.num_classes) == (6, 3, 3) and val.label_map == train.label_map
    stamp = (tmp_path / "shapes" / "annotations" / "instances_train.json").stat().st_mtime_ns
    build_datasets(cfg)
    assert (tmp_path / "shapes" / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp  # not regenerated
    _, train_as_val = build_datasets(cfg.replace(["data.val_images=train2017", "data.val_annotations=annotations/instances_train2017.json"]))
    assert len(train_as_val) == 6  # the COCO default names select the synthetic split of the same role
    images, targets = next(iter(build_train_loader(train, 2, 0, seed=0)))
    assert images.images.shape[0] == 2 and max(images.images.shape[-2:]) <= 64 and len(targets) == 2
    images, targets = next(iter(build_val_loader(val, 3, 0)))
    assert images.images.shape == (3, 3, 48, 48) and [t.image_id for t in targets] == [1, 2, 3]
    assert len(build_datasets(cfg.replace(["data.synthetic.num_train=7"]))[0]) == 7  # changed arguments regenerate


@pytest.mark.parametrize("dataset, help_text", [("auto", "COCO jsons, a YOLO data.yaml, or Pascal VOC's Annotations/"),
                                                ("coco", "point data.root at your COCO-format data")])
def test_missing_coco_says_where_and_how(tmp_path, dataset, help_text):
    cfg = Config().replace([f"data.root={tmp_path / 'coco'}", f"data.dataset={dataset}"])
    with pytest.raises(DatasetError) as err:
        build_datasets(cfg)
    message = str(err.value)
    assert f"(no folder {tmp_path / 'coco'})" in message and "cocodataset.org" in message
    assert help_text in message and "data.dataset=synthetic" in message
    (tmp_path / "coco" / "train2017").mkdir(parents=True)  # auto takes a COCO image folder for COCO
    with pytest.raises(DatasetError, match=r"missing annotations/instances_train2017.json, val2017, "
                                           r"annotations/instances_val2017.json in it\) — point data.root"):
        build_datasets(cfg)


def test_build_transforms_extra_and_unknown():
    cfg = Config().replace(["data.extra_transforms=[{name: RandomBrightnessContrast, kwargs: {p: 0.5}}]"])
    assert "RandomBrightnessContrast" in repr(build_transforms(cfg.data, train=True))
    assert "RandomBrightnessContrast" not in repr(build_transforms(cfg.data, train=False))
    with pytest.raises(ValueError, match="GaussNoize.*did you mean 'GaussNoise'"):
        build_transforms(Config().replace(["data.extra_transforms=[{name: GaussNoize}]"]).data, train=True)
