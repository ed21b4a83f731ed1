"""SetCriterion against losses written out here with F.cross_entropy and torchvision ops."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

from detr_kit.models.criterion import SetCriterion
from detr_kit.models.matcher import HungarianMatcher
from detr_kit.structures import DetectionOutput, Target

K = 3  # classes


def make_criterion(focal=False, **kwargs):
    return SetCriterion(K, HungarianMatcher(focal=focal), focal=focal, **kwargs)


def far_boxes(batch_size, num_queries):
    """Predictions far from every target (bottom-right corner), so that matching is decided by the near ones."""
    return torch.tensor([0.9, 0.9, 0.05, 0.05]).expand(batch_size, num_queries, 4).clone()


def two_image_case(focal):
    """Image 0: 2 targets, exactly predicted by queries 1 and 3; image 1: 1 target, query 0 off by 0.02 in cx."""
    targets = [
        Target(torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]]), torch.tensor([2, 0])),
        Target(torch.tensor([[0.4, 0.6, 0.2, 0.3]]), torch.tensor([1])),
    ]
    boxes = far_boxes(2, 4)
    boxes[0, 1], boxes[0, 3] = targets[0].boxes[0], targets[0].boxes[1]
    boxes[1, 0] = targets[1].boxes[0] + torch.tensor([0.02, 0.0, 0.0, 0.0])
    logits = torch.randn(2, 4, K if focal else K + 1, generator=torch.Generator().manual_seed(0))
    # expected assignment: (image, query) -> label; every other query is no object
    matched = {(0, 1): 2, (0, 3): 0, (1, 0): 1}
    return logits, boxes, targets, matched


def test_softmax_terms_by_hand():
    logits, boxes, targets, matched = two_image_case(focal=False)
    criterion = make_criterion(class_weight=1.0, bbox_weight=5.0, giou_weight=2.0, eos_coef=0.1)
    out = criterion(DetectionOutput(logits, boxes), targets)

    target_classes = torch.full((2, 4), K)
    for (b, q), label in matched.items():
        target_classes[b, q] = label
    class_weights = torch.tensor([1.0, 1.0, 1.0, 0.1])
    expected_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=class_weights)
    torch.testing.assert_close(out.terms["loss_class"], expected_ce)

    num_boxes = 3.0
    torch.testing.assert_close(out.terms["loss_bbox"], torch.tensor(5.0 * 0.02 / num_boxes))
    shifted = torchvision.ops.box_convert(boxes[1, 0:1], "cxcywh", "xyxy")
    truth = torchvision.ops.box_convert(targets[1].boxes, "cxcywh", "xyxy")
    giou = torchvision.ops.generalized_box_iou(shifted, truth)[0, 0]  # the two exact boxes have GIoU 1
    torch.testing.assert_close(out.terms["loss_giou"], 2.0 * (1 - giou) / num_boxes)
    torch.testing.assert_close(out.loss, out.terms["loss_class"] + out.terms["loss_bbox"] + out.terms["loss_giou"])

    # class_error: 100 - accuracy of argmax over K+1 at the matched queries
    correct = [logits[b, q].argmax().item() == label for (b, q), label in matched.items()]
    torch.testing.assert_close(out.terms["class_error"], torch.tensor(100 - 100 * sum(correct) / 3))
    # cardinality_error: |#(argmax != no object) - #targets| averaged over images
    predicted = (logits.argmax(-1) != K).sum(1).float()
    torch.testing.assert_close(out.terms["cardinality_error"], (predicted - torch.tensor([2.0, 1.0])).abs().mean())


def test_perfect_boxes_give_zero_box_terms():
    logits, boxes, targets, _ = two_image_case(focal=False)
    boxes[1, 0] = targets[1].boxes[0]
    out = make_criterion()(DetectionOutput(logits, boxes), targets)
    assert out.terms["loss_bbox"].item() == 0.0
    assert out.terms["loss_giou"].abs().item() < 1e-6


def test_focal_terms_match_torchvision_focal_loss():
    logits, boxes, targets, matched = two_image_case(focal=True)
    criterion = make_criterion(focal=True, class_weight=2.0)
    out = criterion(DetectionOutput(logits, boxes), targets)
    one_hot = torch.zeros(2, 4, K)
    for (b, q), label in matched.items():
        one_hot[b, q, label] = 1.0
    expected = torchvision.ops.sigmoid_focal_loss(logits, one_hot, alpha=0.25, gamma=2.0, reduction="sum") / 3.0
    torch.testing.assert_close(out.terms["loss_class"], 2.0 * expected)
    # focal cardinality: queries whose best class probability exceeds 0.5
    predicted = (logits.sigmoid().amax(-1) > 0.5).sum(1).float()
    torch.testing.assert_close(out.terms["cardinality_error"], (predicted - torch.tensor([2.0, 1.0])).abs().mean())


def test_aux_and_encoder_terms_and_gradients():
    generator = torch.Generator().manual_seed(1)
    batch_size, num_queries, num_proposals = 2, 5, 12
    layers = [
        (torch.randn(batch_size, num_queries, K, generator=generator, requires_grad=True),
         torch.rand(batch_size, num_queries, 4, generator=generator).mul(0.5).add(0.2).requires_grad_(True))
        for _ in range(3)
    ]
    encoder = (torch.randn(batch_size, num_proposals, K, generator=generator, requires_grad=True),
               torch.rand(batch_size, num_proposals, 4, generator=generator).mul(0.5).add(0.2).requires_grad_(True))
    targets = [Target(torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([2])),
               Target(torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.7, 0.1, 0.1]]), torch.tensor([1, 0]))]
    output = DetectionOutput(layers[-1][0], layers[-1][1], aux=tuple(layers[:-1]), encoder=encoder)
    out = make_criterion(focal=True)(output, targets)
    loss_names = {f"{name}{suffix}" for name in ("loss_class", "loss_bbox", "loss_giou")
                  for suffix in ("", "_aux0", "_aux1", "_enc")}
    assert set(out.terms) == loss_names | {"class_error", "cardinality_error"}
    torch.testing.assert_close(out.loss, sum(out.terms[name] for name in loss_names))
    assert all(not value.requires_grad for value in out.terms.values())
    out.loss.backward()
    for tensor in [t for pair in layers for t in pair] + list(encoder):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0

    # the encoder is class-agnostic: its class loss is the focal loss with every target as class 0
    enc_only = make_criterion(focal=True)(DetectionOutput(*encoder), [Target(t.boxes, torch.zeros_like(t.labels))
                                                                       for t in targets])
    torch.testing.assert_close(out.terms["loss_class_enc"], enc_only.terms["loss_class"])
    torch.testing.assert_close(out.terms["loss_giou_enc"], enc_only.terms["loss_giou"])


@pytest.mark.parametrize("focal", [False, True])
def test_zero_target_images(focal):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, K if focal else K + 1, generator=generator, requires_grad=True)
    boxes = torch.rand(2, 4, 4, generator=generator, requires_grad=True)
    empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    out = make_criterion(focal=focal)(DetectionOutput(logits, boxes), [empty, empty])
    assert out.terms["loss_bbox"].item() == 0.0 and out.terms["loss_giou"].item() == 0.0
    if focal:  # every logit is a negative; num_boxes is clamped to 1
        expected = torchvision.ops.sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")
    else:  # every query is no object: the weighted mean reduces to the plain mean CE of the last class
        expected = F.cross_entropy(logits.transpose(1, 2), torch.full((2, 4), K))
    torch.testing.assert_close(out.terms["loss_class"], expected)
    assert out.terms["class_error"].item() == 0.0
    out.loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_mixed_empty_and_nonempty_images():
    logits, boxes, targets, _ = two_image_case(focal=False)
    targets[1] = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    out = make_criterion()(DetectionOutput(logits, boxes), targets)
    assert out.terms["loss_bbox"].item() == 0.0  # image 0 is predicted exactly, image 1 has no boxes
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("focal", [False, True])
def test_non_finite_predictions_give_non_finite_loss(focal):
    logits, boxes, targets, _ = two_image_case(focal)
    logits[0, 2] = float("nan")
    boxes[1, 1] = float("nan")
    out = make_criterion(focal=focal)(DetectionOutput(logits, boxes), targets)
    assert not torch.isfinite(out.loss)


@pytest.mark.parametrize("focal", [False, True])
def test_bfloat16_predictions_under_autocast_give_the_float32_loss(focal):
    logits, boxes, targets, _ = two_image_case(focal)
    logits, boxes = logits.bfloat16(), boxes.bfloat16()
    criterion = make_criterion(focal=focal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = criterion(DetectionOutput(logits, boxes), targets)
    expected = criterion(DetectionOutput(logits.float(), boxes.float()), targets)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected.loss)


def test_empty_weight_buffer_and_validation():
    criterion = make_criterion(eos_coef=0.25)
    assert "empty_weight" in dict(criterion.named_buffers())
    torch.testing.assert_close(criterion.empty_weight, torch.tensor([1.0, 1.0, 1.0, 0.25]))
    with pytest.raises(ValueError, match="expects logits with 4 classes"):
        criterion(DetectionOutput(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)), [Target(torch.zeros(0, 4), [])])
    with pytest.raises(ValueError, match="logits_enc have 3 classes, expected 4"):
        encoder = (torch.zeros(1, 5, K), torch.full((1, 5, 4), 0.5))  # two-stage proposals need focal heads
        criterion(DetectionOutput(torch.zeros(1, 2, K + 1), torch.full((1, 2, 4), 0.5), encoder=encoder),
                  [Target(torch.zeros(0, 4), [])])
    with pytest.raises(ValueError, match="focal"):
        SetCriterion(K, HungarianMatcher(focal=False), focal=True)
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(0, HungarianMatcher())


def _one_box_off_by_a_tenth(num_boxes_here):
    """loss_bbox (weight 1) of an image with ``num_boxes_here`` targets, all exact but one off by 0.1 in cx."""
    target = Target(torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(num_boxes_here, 1), torch.zeros(num_boxes_here))
    boxes = far_boxes(1, 4)
    boxes[0, 0] = target.boxes[0] + torch.tensor([0.1, 0.0, 0.0, 0.0])
    boxes[0, 1:num_boxes_here] = target.boxes[1:]
    out = make_criterion(bbox_weight=1.0)(DetectionOutput(torch.zeros(1, 4, K + 1), boxes), [target])
    return out.terms["loss_bbox"].item()


def test_num_boxes_is_averaged_across_ranks(monkeypatch):
    # Simulate a second rank holding 3 boxes: all_reduce adds its count to ours (1), world size 2 -> mean 2.
    reduced = []

    def all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.item())
        tensor += 3.0

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert _one_box_off_by_a_tenth(1) == pytest.approx(0.1 / 2)  # not 0.1 / 1 (local) nor 0.1 / 4 (sum)
    assert reduced == [1.0]


def test_num_boxes_with_a_real_single_process_group():
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'init')}", rank=0, world_size=1)
        try:
            assert _one_box_off_by_a_tenth(3) == pytest.approx(0.1 / 3)
        finally:
            dist.destroy_process_group()
