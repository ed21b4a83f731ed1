"""Box ops against torchvision.ops and hand-computed geometry."""

import pytest
import torch
import torchvision

from detr_kit.ops.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)

DTYPES = [torch.float32, torch.float64]


def random_boxes_xyxy(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand(n, 2, generator=generator, dtype=dtype) * 80
    size = torch.rand(n, 2, generator=generator, dtype=dtype) * 40 + 0.5
    return torch.cat((top_left, top_left + size), dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_ops_match_torchvision(dtype, seed):
    a, b = random_boxes_xyxy(37, dtype, seed), random_boxes_xyxy(23, dtype, seed + 100)
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, torchvision.ops.box_iou(a, b), rtol=0, atol=1e-6)
    torch.testing.assert_close(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b), rtol=0, atol=1e-6)
    # union = area(a) + area(b) - inter, with inter = iou * union recomputed from torchvision's areas
    areas = torchvision.ops.box_area(a)[:, None] + torchvision.ops.box_area(b)[None, :]
    torch.testing.assert_close(union, areas / (1 + torchvision.ops.box_iou(a, b)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(box_area(a), torchvision.ops.box_area(a), rtol=0, atol=1e-6)
    # denominators are clamped, never offset by eps: valid boxes give torchvision's numbers bit for bit
    assert torch.equal(iou, torchvision.ops.box_iou(a, b))
    assert torch.equal(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_giou_is_the_diagonal_of_torchvision(dtype):
    a, b = random_boxes_xyxy(50, dtype, 3), random_boxes_xyxy(50, dtype, 4)
    b[:10] = a[:10] + 1.0  # overlapping pairs as well as mostly disjoint ones
    expected = torchvision.ops.generalized_box_iou(a, b).diagonal()
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b), expected, rtol=0, atol=1e-6)
    # torchvision's loss is 1 - GIoU per pair
    loss = torchvision.ops.generalized_box_iou_loss(a, b, reduction="none")
    torch.testing.assert_close(1 - elementwise_generalized_box_iou(a, b), loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_computed_cases(dtype):
    unit = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=dtype)
    beside = torch.tensor([[2.0, 0.0, 3.0, 1.0]], dtype=dtype)  # IoU 0, hull 3, union 2 -> GIoU -1/3
    torch.testing.assert_close(generalized_box_iou(unit, beside), torch.tensor([[-1 / 3]], dtype=dtype))
    quarter = torch.tensor([[0.0, 0.0, 0.5, 0.5]], dtype=dtype)  # inside: IoU = GIoU = 0.25
    iou, union = box_iou(unit, quarter)
    torch.testing.assert_close(iou, torch.tensor([[0.25]], dtype=dtype))
    torch.testing.assert_close(union, torch.tensor([[1.0]], dtype=dtype))
    torch.testing.assert_close(generalized_box_iou(unit, quarter), torch.tensor([[0.25]], dtype=dtype))
    touching = torch.tensor([[1.0, 0.0, 2.0, 1.0]], dtype=dtype)  # shares an edge: IoU 0, hull = union -> 0
    torch.testing.assert_close(elementwise_generalized_box_iou(unit, touching), torch.tensor([0.0], dtype=dtype))
    far = torch.tensor([[0.0, 0.0, 1.0, 1.0], [9.0, 9.0, 10.0, 10.0]], dtype=dtype)
    # hull 100, union 2 -> GIoU = -98/100
    torch.testing.assert_close(generalized_box_iou(far[:1], far[1:]), torch.tensor([[-0.98]], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_boxes_give_finite_values_and_gradients(dtype):
    boxes = torch.tensor(
        [
            [0.3, 0.3, 0.3, 0.3],  # a point
            [0.3, 0.3, 0.3, 0.3],  # the same point: union and hull both zero
            [0.1, 0.2, 0.1, 0.6],  # a zero-width segment
            [0.8, 0.8, 0.2, 0.2],  # inverted
            [0.0, 0.0, 1.0, 1.0],  # a valid box
        ],
        dtype=dtype,
        requires_grad=True,
    )
    other = boxes.detach().flip(0).clone().requires_grad_(True)
    pairwise = generalized_box_iou(boxes, other)
    elementwise = elementwise_generalized_box_iou(boxes, other)
    iou, union = box_iou(boxes, other)
    for values in (pairwise, elementwise, iou, union):
        assert torch.isfinite(values).all()
    assert ((pairwise >= -1) & (pairwise <= 1)).all()
    (pairwise.sum() + elementwise.sum() + iou.sum()).backward()
    assert torch.isfinite(boxes.grad).all() and torch.isfinite(other.grad).all()
    # the valid box against itself is still exactly 1
    assert pairwise[4, 0].item() == pytest.approx(1.0)
    assert box_area(boxes.detach())[3].item() == 0.0  # inverted -> zero area


@pytest.mark.parametrize("dtype", DTYPES)
def test_format_round_trips(dtype):
    generator = torch.Generator().manual_seed(5)
    cxcywh = torch.rand(2, 13, 4, generator=generator, dtype=dtype)  # leading dims are kept
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(
        xyxy, torchvision.ops.box_convert(cxcywh.reshape(-1, 4), "cxcywh", "xyxy").reshape(2, 13, 4)
    )
    xywh = torch.rand(9, 4, generator=generator, dtype=dtype) * 100
    torch.testing.assert_close(box_xywh_to_xyxy(xywh), torchvision.ops.box_convert(xywh, "xywh", "xyxy"))
    # hand-checked: COCO [10, 20, 30, 40] -> corners [10, 20, 40, 60] -> centre (25, 40), size (30, 40)
    coco = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=dtype)
    torch.testing.assert_close(box_xywh_to_xyxy(coco), torch.tensor([10.0, 20.0, 40.0, 60.0], dtype=dtype))
    torch.testing.assert_close(
        box_xyxy_to_cxcywh(box_xywh_to_xyxy(coco)), torch.tensor([25.0, 40.0, 30.0, 40.0], dtype=dtype)
    )


def test_half_precision_is_computed_in_float32():
    a = random_boxes_xyxy(8, torch.float32, 7) * 20  # areas up to ~ (800)^2 overflow float16 products
    iou_half, _ = box_iou(a.half(), a.half())
    assert iou_half.dtype == torch.float32 and torch.isfinite(iou_half).all()
    torch.testing.assert_close(iou_half, torchvision.ops.box_iou(a.half().float(), a.half().float()))


def test_elementwise_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        elementwise_generalized_box_iou(torch.zeros(3, 4), torch.zeros(2, 4))
