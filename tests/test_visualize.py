"""draw_detections: boxes in the right place and colour, readable labels, every input type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detr_kit.structures import Detections
from detr_kit.visualize import class_color, draw_detections, text_color_on, to_pil_image


def _one_box(label: int = 2, score: float = 0.9) -> Detections:
    return Detections(torch.tensor([[40.0, 50.0, 120.0, 110.0]]), torch.tensor([score]), torch.tensor([label]))


def test_box_outline_is_drawn_in_the_class_colour():
    image = Image.new("RGB", (200, 160), (128, 128, 128))
    out = draw_detections(image, _one_box(), line_width=2)
    pixels = np.asarray(out)
    color = class_color(2)
    # Left edge of the box, well below the label: outline pixels in the class colour.
    assert tuple(pixels[90, 40]) == color and tuple(pixels[90, 41]) == color
    # Box interior and far outside untouched; the input image unchanged.
    assert tuple(pixels[90, 80]) == (128, 128, 128) and tuple(pixels[150, 190]) == (128, 128, 128)
    assert image.getpixel((40, 90)) == (128, 128, 128)


def test_label_background_and_text_contrast_on_dark_and_light_images():
    for background in ((0, 0, 0), (255, 255, 255)):
        out = np.asarray(draw_detections(Image.new("RGB", (200, 160), background), _one_box(), names=["a", "b", "cat"]))
        label_region = out[30:50, 40:100].reshape(-1, 3)  # just above the box
        colors = {tuple(c) for c in label_region}
        assert class_color(2) in colors  # filled label background
        # Text in the contrasting colour (anti-aliased: its core pixels come close to it).
        text = np.array(text_color_on(class_color(2)), dtype=np.int64)
        assert np.abs(label_region.astype(np.int64) - text).sum(axis=1).min() < 40


def test_text_color_contrast_rule():
    assert text_color_on((255, 255, 0)) == (0, 0, 0)  # yellow -> black text
    assert text_color_on((0, 0, 128)) == (255, 255, 255)  # navy -> white text


def test_class_colors_are_distinct_and_stable():
    colors = [class_color(k) for k in range(80)]
    assert colors == [class_color(k) for k in range(80)]
    assert len(set(colors[:20])) == 20
    hues = sorted(__import__("colorsys").rgb_to_hsv(*(c / 255 for c in rgb))[0] for rgb in colors[:10])
    assert min(b - a for a, b in zip(hues, hues[1:])) > 0.03  # the first 10 classes are far apart in hue


def test_threshold_and_line_width_scaling():
    image = Image.new("RGB", (200, 160), (128, 128, 128))
    assert np.array_equal(np.asarray(draw_detections(image, _one_box(score=0.2), score_threshold=0.5)), np.asarray(image))
    big = Image.new("RGB", (2000, 1600), (128, 128, 128))
    dets = Detections(_one_box().boxes * 10, torch.tensor([0.9]), torch.tensor([2]))
    pixels = np.asarray(draw_detections(big, dets))
    row = pixels[900, 390:430]  # crossing the left edge at x=400
    assert (row == class_color(2)).all(axis=1).sum() >= 5  # about 0.3 % of 2000 px


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a,
        lambda a: Image.fromarray(a),
        lambda a: torch.from_numpy(a).permute(2, 0, 1).contiguous(),
        lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255,
    ],
    ids=["numpy", "pil", "uint8_tensor", "float_tensor"],
)
def test_every_input_type_gives_the_same_drawing(make):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    expected = np.asarray(draw_detections(Image.fromarray(array), _one_box()))
    np.testing.assert_array_equal(np.asarray(draw_detections(make(array), _one_box())), expected)


def test_names_from_detections_mapping_or_label_number():
    image = Image.new("RGB", (200, 160))
    with_names = Detections(_one_box().boxes, torch.tensor([0.9]), torch.tensor([2]), names=["dog"])
    a = np.asarray(draw_detections(image, with_names))
    b = np.asarray(draw_detections(image, _one_box(), names={2: "dog"}))
    c = np.asarray(draw_detections(image, _one_box()))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # "2 0.90" differs from "dog 0.90"


def test_bad_inputs():
    with pytest.raises(TypeError, match="PIL image, a numpy array or a torch tensor"):
        to_pil_image("image.jpg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CHW"):
        to_pil_image(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        to_pil_image(np.zeros((8, 8, 3), dtype=np.float32))


def test_ground_truth_and_predictions_in_two_colours_enlarged_with_a_legend():
    from detr_kit.visualize import GROUND_TRUTH_COLOR, PREDICTION_COLOR, draw_ground_truth_and_predictions

    image = Image.new("RGB", (96, 64), (128, 128, 128))  # the quickstart's size: too small to read labels on
    truth = Detections(torch.tensor([[10.0, 20.0, 40.0, 60.0]]), torch.ones(1), torch.tensor([0]))
    predictions = Detections(torch.tensor([[50.0, 10.0, 90.0, 50.0], [0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.8, 0.1]),
                             torch.tensor([1, 1]))
    out = draw_ground_truth_and_predictions(image, truth, predictions, ["cat", "dog"], score_threshold=0.3)
    pixels = np.asarray(out).astype(int)
    scale = 512 / 96
    strip = out.height - round(64 * scale)
    assert out.width == 512 and strip > 0  # enlarged 5.33x, the legend strip above the picture
    # Outlines at the scaled coordinates, in the two colours (middle of the left edges, below the labels).
    assert tuple(pixels[strip + round(50 * scale), int(10 * scale)]) == GROUND_TRUTH_COLOR
    assert tuple(pixels[strip + round(40 * scale), int(50 * scale)]) == PREDICTION_COLOR
    # The 0.1 detection is below the threshold: nothing drawn at its place.
    assert tuple(pixels[strip + round(4 * scale), round(4 * scale)]) == (128, 128, 128)
    # The legend shows both colours as swatches of the label font's size (>= 14 px).
    legend = pixels[:strip].reshape(-1, 3)
    for color in (GROUND_TRUTH_COLOR, PREDICTION_COLOR):
        assert (legend == color).all(axis=1).sum() >= 14 * 14
