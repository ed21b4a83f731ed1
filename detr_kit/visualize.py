"""Draw detections on images: one stable, distinct colour per class and labels readable on any background; or
ground truth and predictions in two colours with a legend, upscaled to a legible size."""

from __future__ import annotations

import colorsys
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from detr_kit.structures import Detections

# Successive multiples of the golden ratio spread hues evenly for any number of classes.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
# Ground truth against predictions: Okabe & Ito's bluish green and vermillion, told apart with any colour vision.
GROUND_TRUTH_COLOR = (0, 158, 115)
PREDICTION_COLOR = (213, 94, 0)


def class_color(label: int) -> tuple[int, int, int]:
    """A stable RGB colour for class ``label``: golden-ratio hue steps, saturated and bright."""
    hue = (0.13 + label * _GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def text_color_on(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``background`` (WCAG relative luminance)."""

    def linear(c: int) -> float:
        c = c / 255.0
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in background)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # Contrast with black is (L + 0.05) / 0.05, with white 1.05 / (L + 0.05); equal at L ~= 0.179.
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)


def to_pil_image(image: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    """An RGB PIL image from a PIL image, an HWC (or HW) uint8 array, or a CHW tensor (uint8 or float 0..1).

    Raises:
        TypeError: for any other type.
        ValueError: for an array or tensor whose shape or dtype is not one of the above.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must be CHW with 1 or 3 channels, got shape {tuple(image.shape)}")
        t = image.detach().cpu()
        if t.is_floating_point():
            t = (t.float() * 255).round().clamp(0, 255).to(torch.uint8)
        elif t.dtype != torch.uint8:
            raise ValueError(f"image tensor must be uint8 or float in 0..1, got {t.dtype}")
        array = t.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]
        return Image.fromarray(array, "RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 HWC, got dtype {image.dtype}")
        if image.ndim == 2:
            return Image.fromarray(image, "L").convert("RGB")
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"image array must be HWC with 1, 3 or 4 channels, got shape {image.shape}")
        if image.shape[2] == 1:
            return Image.fromarray(image[:, :, 0], "L").convert("RGB")
        return Image.fromarray(np.ascontiguousarray(image), "RGBA" if image.shape[2] == 4 else "RGB").convert("RGB")
    raise TypeError(f"image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image | np.ndarray | torch.Tensor,
    detections: Detections,
    names: Sequence[str] | Mapping[int, str] | None = None,
    score_threshold: float = 0.0,
    line_width: int | None = None,
    font_size: int | None = None,
    color: tuple[int, int, int] | None = None,
    show_scores: bool = True,
) -> Image.Image:
    """Draw boxes with "name score" labels on a copy of ``image``.

    Args:
        image: a PIL image, an HWC uint8 array or a CHW tensor (uint8, or float in 0..1; not normalised).
        detections: boxes [N, 4] xyxy in this image's pixels, scores [N], labels [N].
        names: class names by label (a sequence or a mapping); ``detections.names`` wins when filled;
            the label number is shown when neither names it.
        score_threshold: detections scoring below it are not drawn.
        line_width: box outline width in pixels; default scales with the image (about 0.3 % of its size).
        font_size: label text height in pixels; default scales with the image.
        color: one colour for every box; default: each class its own (``class_color``).
        show_scores: label boxes "name score" (else "name").

    Returns:
        A new RGB PIL image; the input is not modified.
    """
    if not isinstance(detections, Detections):
        raise TypeError(f"detections must be a Detections, got {type(detections).__name__}")
    canvas = to_pil_image(image).copy()
    width, height = canvas.size
    scale = max(width, height)
    line_width = line_width if line_width is not None else max(1, round(scale * 0.003))
    font_size = font_size if font_size is not None else max(10, round(scale * 0.022))
    font = _font(font_size)
    draw = ImageDraw.Draw(canvas)

    boxes = detections.boxes.detach().float().cpu().tolist()  # [N, 4] xyxy
    scores = detections.scores.detach().float().cpu().tolist()  # [N]
    labels = detections.labels.detach().cpu().tolist()  # [N]
    order = sorted(range(len(scores)), key=lambda i: scores[i])  # best drawn last, on top
    for i in order:
        if scores[i] < score_threshold:
            continue
        label = int(labels[i])
        if detections.names:
            name = detections.names[i]
        elif isinstance(names, Mapping):
            name = names.get(label, str(label))
        elif names is not None and 0 <= label < len(names):
            name = names[label]
        else:
            name = str(label)
        box_color = color if color is not None else class_color(label)
        x1, y1, x2, y2 = boxes[i]
        x1, x2 = sorted((min(max(x1, 0.0), width - 1.0), min(max(x2, 0.0), width - 1.0)))
        y1, y2 = sorted((min(max(y1, 0.0), height - 1.0), min(max(y2, 0.0), height - 1.0)))
        draw.rectangle((x1, y1, x2, y2), outline=box_color, width=line_width)

        text = f"{name} {scores[i]:.2f}" if show_scores else name
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left, bottom - top
        pad = max(1, font_size // 6)
        label_h = text_h + 2 * pad
        # Above the box when there is room, else inside its top edge; kept inside the image horizontally.
        ty = y1 - label_h if y1 - label_h >= 0 else y1
        tx = min(x1, max(0.0, width - text_w - 2 * pad))
        draw.rectangle((tx, ty, tx + text_w + 2 * pad, ty + label_h), fill=box_color)
        draw.text((tx + pad - left, ty + pad - top), text, fill=text_color_on(box_color), font=font)
    return canvas


def draw_ground_truth_and_predictions(
    image: Image.Image | np.ndarray | torch.Tensor,
    ground_truth: Detections,
    predictions: Detections,
    names: Sequence[str],
    score_threshold: float,
    min_long_side: int = 512,
) -> Image.Image:
    """Ground truth and predictions on one picture, in two colours, with a legend strip above it.

    The picture is enlarged (bicubic) until its longer side is at least ``min_long_side`` pixels, so that boxes and
    labels of small images stay legible; it is never shrunk.

    Args:
        image: as for ``draw_detections``.
        ground_truth: boxes [T, 4] xyxy in ``image``'s pixels and labels [T]; its ``names`` (when filled) label them.
        predictions: boxes [N, 4] xyxy in ``image``'s pixels, scores [N], labels [N]; those below
            ``score_threshold`` are left out.
        names: class names by label.
        score_threshold: the smallest score drawn (said in the legend).
        min_long_side: the longer side of the drawing, at least.

    Returns:
        A new RGB image: the picture (``min_long_side`` or more pixels on its longer side) below a legend strip
        of two lines, one per colour.
    """
    picture = to_pil_image(image)
    scale = max(1.0, min_long_side / max(picture.size))
    if scale > 1.0:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BICUBIC)
    font_size = max(14, round(max(picture.size) * 0.028))
    line_width = max(2, round(max(picture.size) * 0.004))
    shown = predictions.filter(predictions.scores >= score_threshold)
    scaled = [Detections(d.boxes.detach().float().cpu() * scale, d.scores.cpu(), d.labels.cpu(), list(d.names))
              for d in (ground_truth, shown)]
    picture = draw_detections(picture, scaled[0], names, line_width=line_width, font_size=font_size,
                              color=GROUND_TRUTH_COLOR, show_scores=False)
    picture = draw_detections(picture, scaled[1], names, line_width=line_width, font_size=font_size,
                              color=PREDICTION_COLOR)
    font = _font(font_size)
    pad, row = font_size // 2, round(font_size * 1.5)
    entries = ((GROUND_TRUTH_COLOR, f"ground truth ({len(ground_truth)})"),
               (PREDICTION_COLOR, f"predictions, score >= {score_threshold:.2f} ({len(shown)})"))
    strip = 2 * pad + row * len(entries)
    canvas = Image.new("RGB", (picture.width, picture.height + strip), (255, 255, 255))
    canvas.paste(picture, (0, strip))
    draw = ImageDraw.Draw(canvas)
    for index, (color, text) in enumerate(entries):
        top = pad + index * row
        draw.rectangle((pad, top, pad + font_size, top + font_size), fill=color)
        draw.text((pad + font_size + pad, top), text, fill=(0, 0, 0), font=font)
    return canvas


__all__ = [
    "GROUND_TRUTH_COLOR",
    "PREDICTION_COLOR",
    "class_color",
    "draw_detections",
    "draw_ground_truth_and_predictions",
    "text_color_on",
    "to_pil_image",
]
