"""Paired image + box transforms (albumentations) for DETR training and evaluation.

Every pipeline takes ``image`` (uint8 [H, W, 3] RGB numpy), ``bboxes`` ([T, 4] xyxy pixels, float),
``labels`` ([T] int) and ``iscrowd`` ([T] int), and returns the same keys with ``image`` a float
tensor [3, H', W'] normalised with the ImageNet mean/std. Boxes that leave the image are dropped
together with their labels (albumentations keeps the label fields aligned).

The training recipe is DETR's (Carion et al. 2020, ``datasets/coco.py`` of the reference code):
horizontal flip; then, with probability 1/2 each, either a multi-scale resize, or a resize to one of
``crop_resize_scales`` + a random crop of ``crop_size`` + the multi-scale resize. Evaluation resizes
the shorter side to ``eval_size`` with the longer side capped at ``max_size``.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import warnings
from typing import Any, Literal, Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.pytorch import ToTensorV2
from torch import Tensor

from detr_kit.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-box fields that travel with the boxes through every pipeline.
LABEL_FIELDS = ("labels", "iscrowd")


def resized_shape(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """The (h, w) after resizing the shorter side to ``size`` with the longer side at most ``max_size``.

    Follows the reference DETR rule (so official checkpoints see the images they were evaluated on):
    when the longer side would exceed ``max_size``, the shorter side becomes
    ``round(max_size * short / long)``; the longer side is ``int(size * long / short)``. The one
    difference: that rounding can overshoot ``max_size`` by a pixel, which we cap.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got (h={height}, w={width})")
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    size = max(size, 1)
    if short == size:
        return height, width
    new_long = max(int(size * long / short), 1)
    if max_size is not None:
        new_long = min(new_long, max_size)
    return (new_long, size) if width < height else (size, new_long)


class ShortestSideResize(A.DualTransform):
    """Resize the shorter side to one of ``sizes`` (chosen at random), the longer side at most ``max_size``.

    Boxes are stored normalised inside albumentations, so they need no change. Downscaling uses
    area interpolation (anti-aliased, close to PIL's bilinear used by the reference), upscaling
    bilinear.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None, p: float = 1.0):
        super().__init__(p=p)
        sizes = tuple(int(s) for s in sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"ShortestSideResize: sizes must be a non-empty list of positive ints, got {sizes}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"ShortestSideResize: max_size must be a positive int or None, got {max_size}")
        self.sizes = sizes
        self.max_size = max_size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        size = self.sizes[self.py_random.randrange(len(self.sizes))]
        return {"out_shape": resized_shape(height, width, size, self.max_size)}

    def apply(self, img: np.ndarray, out_shape: tuple[int, int], **params: Any) -> np.ndarray:
        height, width = img.shape[:2]
        if (height, width) == tuple(out_shape):
            return img
        down = out_shape[0] * out_shape[1] < height * width
        return cv2.resize(img, (out_shape[1], out_shape[0]), interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, out_shape: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, (out_shape[1], out_shape[0]), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalised coordinates do not change under a resize

    def apply_to_keypoints(self, keypoints: np.ndarray, **params: Any) -> np.ndarray:
        raise TypeError("ShortestSideResize does not transform keypoints; detr_kit pipelines carry boxes only")

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sizes", "max_size")


class RandomSizeCrop(BaseCrop):
    """Crop a random region whose width and height are drawn from [min_size, min(side, max_size)].

    DETR's ``RandomSizeCrop``: a side shorter than ``min_size`` is kept whole. Boxes are cut to the
    crop; boxes left with no area are dropped by the pipeline's bbox filter.
    """

    def __init__(self, min_size: int, max_size: int, p: float = 1.0):
        super().__init__(p=p)
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        crop_w = self.py_random.randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = self.py_random.randint(min(self.min_size, height), min(height, self.max_size))
        x0 = self.py_random.randint(0, width - crop_w)
        y0 = self.py_random.randint(0, height - crop_h)
        return {"crop_coords": (x0, y0, x0 + crop_w, y0 + crop_h)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size")


def _compose(steps: list[A.BasicTransform]) -> A.Compose:
    with warnings.catch_warnings():  # a normalise-only pipeline has no box transform; that is intended
        warnings.filterwarnings("ignore", message="Got processor for bboxes")
        return A.Compose(steps, bbox_params=_bbox_params())


def _bbox_params() -> A.BboxParams:
    # clip=True cuts boxes at the image border; min_area drops the ones a crop leaves without area.
    return A.BboxParams(format="pascal_voc", label_fields=list(LABEL_FIELDS), clip=True, min_area=1e-6)


def _tail() -> list[A.BasicTransform]:
    return [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0), ToTensorV2()]


def _albumentations_transform_names() -> list[str]:
    return sorted(
        name
        for name, obj in vars(A).items()
        if inspect.isclass(obj) and issubclass(obj, A.BasicTransform) and not name.startswith(("Base", "_"))
    )


def build_extra_transform(name: str, kwargs: Mapping[str, Any] | None = None) -> A.BasicTransform:
    """An albumentations transform by class name, checked to be safe for boxes.

    Raises:
        ConfigError: for an unknown name (the message gives the closest albumentations name), bad
            kwargs, or a spatial transform that cannot move bounding boxes.
    """
    names = _albumentations_transform_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}?" if close else "see https://albumentations.ai/docs/ for the list"
        raise ConfigError(f"data.extra_transforms: unknown albumentations transform {name!r}", hint)
    cls = getattr(A, name)
    kwargs = dict(kwargs or {})
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        valid = sorted(k for k in parameters if k != "self")
        if unknown := sorted(set(kwargs) - set(valid)):
            raise ConfigError(f"data.extra_transforms: {name} has no argument(s) {unknown}", f"valid: {valid}")
    try:
        transform = cls(**kwargs)
    except Exception as err:  # albumentations validates kwargs with pydantic; re-raise with the name
        problem = " ".join(str(err).split())[:300]
        raise ConfigError(f"data.extra_transforms: {name}(**{kwargs}) is invalid ({problem})",
                          "fix its kwargs (see the albumentations docs)") from None
    if isinstance(transform, A.DualTransform) and "bboxes" not in transform.targets:
        raise ConfigError(f"data.extra_transforms: {name} moves pixels but cannot move bounding boxes",
                          "use a pixel-level transform or a box-aware spatial one")
    return transform


def train_transforms(
    scales: Sequence[int],
    max_size: int,
    crop_resize_scales: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    hflip: bool = True,
    extra: Sequence[A.BasicTransform] = (),
) -> A.Compose:
    """DETR's training augmentation: flip, then multi-scale resize or resize + random crop + resize.

    Args:
        scales: candidate shorter sides of the final resize (e.g. 480..800 step 32).
        max_size: cap on the longer side.
        crop_resize_scales: shorter sides to resize to before the random crop; empty = no crop branch.
        crop_size: (min, max) side of the random crop.
        hflip: apply a horizontal flip with probability 0.5.
        extra: more albumentations transforms, applied after the resize and before normalisation.
    """
    resize = ShortestSideResize(scales, max_size)
    steps: list[A.BasicTransform] = [A.HorizontalFlip(p=0.5)] if hflip else []
    if crop_resize_scales:
        crop_branch = A.Sequential(
            [
                ShortestSideResize(crop_resize_scales, None),
                RandomSizeCrop(crop_size[0], crop_size[1]),
                ShortestSideResize(scales, max_size),
            ],
            p=1.0,
        )
        steps.append(A.OneOf([resize, crop_branch], p=1.0))
    else:
        steps.append(resize)
    return _compose([*steps, *extra, *_tail()])


def eval_transforms(size: int | None, max_size: int | None = None) -> A.Compose:
    """Evaluation: shorter side ``size``, longer at most ``max_size``; ``size=None`` only normalises."""
    steps: list[A.BasicTransform] = [] if size is None else [ShortestSideResize((size,), max_size)]
    return _compose([*steps, *_tail()])


def seed_transforms(pipeline: A.BaseCompose, seed: int) -> None:
    """Give every transform in ``pipeline`` its own random stream derived from ``seed``.

    albumentations' own ``set_random_seed`` hands the *same* seed to every child, which correlates
    their draws (the flip decision and the scale choice would move together). Call this once per
    DataLoader worker with a per-worker seed, or the forked workers repeat each other's augmentations.
    """
    counter = itertools.count()

    def visit(transform: A.BasicTransform | A.BaseCompose) -> None:
        child_seed = int(np.random.SeedSequence([seed % 2**32, next(counter)]).generate_state(1)[0])
        transform.set_random_seed(child_seed)
        for child in getattr(transform, "transforms", ()):
            visit(child)

    visit(pipeline)


def boxes_to_original(
    boxes_cxcywh: Tensor,
    orig_size: Tensor | Sequence[int],
    box_format: Literal["xyxy", "xywh"] = "xyxy",
) -> Tensor:
    """Undo the evaluation transform: normalised cxcywh boxes -> pixels of the original image.

    The eval transform only resizes (aspect ratio kept), so normalised coordinates are the same
    before and after it; scaling by the original size undoes it.

    Args:
        boxes_cxcywh: [N, 4] or [B, N, 4] cxcywh normalised to the (unpadded) image.
        orig_size: (h, w), or [B, 2] rows of (h, w) for batched boxes.
        box_format: "xyxy" (corners) or "xywh" (COCO's top-left + size).
    Returns:
        boxes of the same shape in original-image pixels.
    """
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
    size = torch.as_tensor(orig_size, dtype=boxes_cxcywh.dtype, device=boxes_cxcywh.device)  # [2] or [B, 2]
    scale = torch.stack((size[..., 1], size[..., 0], size[..., 1], size[..., 0]), dim=-1)  # [4] or [B, 4]
    if boxes_cxcywh.dim() == 3:
        scale = scale[:, None, :]  # [B, 1, 4]
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    x0, y0 = cx - 0.5 * w, cy - 0.5 * h
    if box_format == "xyxy":
        out = torch.stack((x0, y0, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
    else:
        out = torch.stack((x0, y0, w, h), dim=-1)
    return out * scale


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LABEL_FIELDS",
    "RandomSizeCrop",
    "ShortestSideResize",
    "boxes_to_original",
    "build_extra_transform",
    "eval_transforms",
    "resized_shape",
    "seed_transforms",
    "train_transforms",
]
