"""PostProcess against hand-computed pixel boxes and a brute-force ranking of (query, class) scores."""

import pytest
import torch

from detr_kit.models.postprocess import PostProcess
from detr_kit.structures import DetectionOutput


def test_softmax_boxes_scaled_to_original_pixels_by_hand():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])  # [1, 2, 4] cxcywh
    logits = torch.tensor([[[2.0, 0.0, 1.0, 5.0], [0.0, 3.0, 0.0, -1.0]]])  # K = 3 plus no object
    detections = PostProcess(focal=False)(DetectionOutput(logits, boxes), torch.tensor([[100, 200]]))  # h, w
    (det,) = detections
    # (cx, cy, w, h) = (0.5, 0.5, 0.2, 0.4) on a 200 x 100 image -> x 80..120, y 30..70
    # (0.25, 0.75, 0.5, 0.5) -> x 0..100, y 50..100
    torch.testing.assert_close(det.boxes, torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]]))
    # the no-object column takes part in the softmax but is never a label
    probs = logits.softmax(-1)[0]
    torch.testing.assert_close(det.scores, torch.stack((probs[0, 0], probs[1, 1])))
    assert det.labels.tolist() == [0, 1] and det.labels.dtype == torch.int64


def test_boxes_are_clipped_to_the_image():
    boxes = torch.tensor([[[0.95, 0.05, 0.2, 0.2]]])  # sticks out right and top
    det = PostProcess(focal=True)(DetectionOutput(torch.zeros(1, 1, 2), boxes), torch.tensor([[50, 80]]))[0]
    # x 0.85..1.05 of 80 -> 68..84 -> 68..80; y -0.05..0.15 of 50 -> -2.5..7.5 -> 0..7.5
    torch.testing.assert_close(det.boxes, torch.tensor([[68.0, 0.0, 80.0, 7.5]]).expand(2, 4))


def test_focal_top_k_picks_the_right_query_and_class():
    logits = torch.full((1, 3, 4), -5.0)  # [B, Q, K]
    logits[0, 2, 1] = 4.0
    logits[0, 0, 3] = 3.0
    logits[0, 0, 2] = 2.0  # query 0 appears twice, with two labels
    logits[0, 1, 0] = 1.0
    boxes = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]]])
    det = PostProcess(focal=True, top_k=3)(DetectionOutput(logits, boxes), torch.tensor([[10, 10]]))[0]
    assert det.labels.tolist() == [1, 3, 2]
    torch.testing.assert_close(det.scores, torch.tensor([4.0, 3.0, 2.0]).sigmoid())
    # boxes follow the query: 2, 0, 0 (centres 9, 1, 1 pixels)
    torch.testing.assert_close((det.boxes[:, 0] + det.boxes[:, 2]) / 2, torch.tensor([9.0, 1.0, 1.0]))


def test_focal_top_k_equals_brute_force_ranking():
    generator = torch.Generator().manual_seed(0)
    batch_size, num_queries, num_classes, top_k = 2, 20, 7, 15
    logits = torch.randn(batch_size, num_queries, num_classes, generator=generator)
    boxes = torch.rand(batch_size, num_queries, 4, generator=generator) * 0.5 + 0.2
    sizes = torch.tensor([[60, 90], [120, 40]])
    detections = PostProcess(focal=True, top_k=top_k)(DetectionOutput(logits, boxes), sizes)
    for b, det in enumerate(detections):
        ranked = sorted(((torch.sigmoid(logits[b, q, c]).item(), q, c) for q in range(num_queries)
                         for c in range(num_classes)), reverse=True)[:top_k]
        assert det.labels.tolist() == [c for _, _, c in ranked]
        torch.testing.assert_close(det.scores, torch.tensor([s for s, _, _ in ranked]))
        h, w = sizes[b].tolist()
        for i, (_, q, _) in enumerate(ranked):
            cx, cy, bw, bh = boxes[b, q].tolist()
            x1, y1, x2, y2 = (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h
            expected = [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
            torch.testing.assert_close(det.boxes[i], torch.tensor(expected))


def test_softmax_top_k_when_more_queries_than_k():
    logits = torch.zeros(1, 5, 3)  # K = 2 plus no object
    logits[0, :, 1] = torch.tensor([0.0, 3.0, 1.0, 4.0, 2.0])  # class-1 score ranks queries 3, 1, 4, 2, 0
    boxes = torch.tensor([[0.1 * q + 0.3, 0.5, 0.1, 0.2] for q in range(5)])[None]  # [1, 5, 4], inside the image
    det = PostProcess(focal=False, top_k=2)(DetectionOutput(logits, boxes), torch.tensor([[1, 1]]))[0]
    assert det.labels.tolist() == [1, 1]
    torch.testing.assert_close(det.scores, logits[0, [3, 1]].softmax(-1)[:, 1])
    torch.testing.assert_close(det.boxes[:, :2] + det.boxes[:, 2:], 2 * boxes[0, [3, 1], :2])  # centre x2


def test_score_threshold_drops_low_scores():
    logits = torch.tensor([[[3.0], [-3.0], [0.5]]])  # sigmoid 0.95, 0.05, 0.62
    det = PostProcess(focal=True, top_k=10, score_threshold=0.5)(
        DetectionOutput(logits, torch.full((1, 3, 4), 0.5)), torch.tensor([[4, 4]])
    )[0]
    torch.testing.assert_close(det.scores, torch.tensor([3.0, 0.5]).sigmoid())
    assert len(det) == 2 and det.boxes.shape == (2, 4)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="top_k"):
        PostProcess(focal=True, top_k=0)
    with pytest.raises(ValueError, match="score_threshold"):
        PostProcess(focal=True, score_threshold=1.5)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        PostProcess(focal=True)(DetectionOutput(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), torch.tensor([[4, 4]]))
