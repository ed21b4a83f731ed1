"""Prediction examples drawn during training: a few validation images with their ground truth and detections in
two colours, as PNG files of a legible size."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from detr_kit.engine.evaluator import evaluation_mode
from detr_kit.engine.step import autocast, outputs_to_float

EXAMPLE_SCORE_THRESHOLD = 0.3  # detections drawn on the example images score at least this


@torch.no_grad()
def draw_examples(
    model: nn.Module,
    postprocessor: nn.Module,
    dataset: Dataset,
    names: Sequence[str],
    folder: str | Path,
    epoch: int,
    count: int,
    device: torch.device,
    amp: str = "off",
) -> list[Path]:
    """Draw the ground truth and the predictions of ``model`` on the first ``count`` images of ``dataset``.

    The model runs in eval mode on one image at a time (no padding); ``evaluation_mode`` puts back its modes. Each
    picture shows the ground truth and the predictions scoring ``EXAMPLE_SCORE_THRESHOLD`` or more in two colours
    with a legend, enlarged to 512 px or more on its longer side (``draw_ground_truth_and_predictions``).

    Args:
        model: the detector, ``model(images [1,3,h,w], None) -> DetectionOutput``.
        postprocessor: ``postprocessor(output, sizes [1, 2] (h, w)) -> list[Detections]``.
        dataset: ``dataset[i] -> (image [3, h, w] normalised with the ImageNet mean/std, Target)``.
        names: the class names, by contiguous label.
        folder: where ``epoch_{epoch:03d}_{image_id}.png`` files go (created when missing).
        epoch: the epoch number in the file names.
        count: how many images at most.
        device: where the model lives.
        amp: "off", "bf16" or "fp16" autocast of the forward pass.

    Returns:
        The paths written.
    """
    from detr_kit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from detr_kit.ops.boxes import box_cxcywh_to_xyxy
    from detr_kit.structures import Detections
    from detr_kit.visualize import draw_ground_truth_and_predictions

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    written = []
    with evaluation_mode(model):
        for index in range(min(count, len(dataset))):
            image, target = dataset[index]  # [3, h, w] normalised
            with autocast(device, amp):
                output = model(image[None].to(device), None)
            size = torch.tensor([list(image.shape[-2:])], device=device)  # [1, 2] (h, w) of this image
            detections = postprocessor(outputs_to_float(output), size)[0].to("cpu")
            height, width = image.shape[-2:]
            boxes = box_cxcywh_to_xyxy(target.boxes) * torch.tensor([width, height, width, height])  # [T, 4] pixels
            crowd = target.iscrowd.tolist() if target.iscrowd is not None else [False] * len(target)
            labels = [names[label] + (" (crowd)" if is_crowd else "")
                      for label, is_crowd in zip(target.labels.tolist(), crowd)]
            truth = Detections(boxes, torch.ones(len(target)), target.labels, labels)
            picture = (image.cpu() * std + mean).clamp(0, 1)  # [3, h, w] in 0..1
            drawn = draw_ground_truth_and_predictions(picture, truth, detections, list(names), EXAMPLE_SCORE_THRESHOLD)
            path = folder / f"epoch_{epoch:03d}_{int(target.image_id)}.png"
            drawn.save(path)
            written.append(path)
    return written


__all__ = ["EXAMPLE_SCORE_THRESHOLD", "draw_examples"]
