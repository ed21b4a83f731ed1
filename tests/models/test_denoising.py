"""Contrastive denoising (DINO §3.3): the attention mask against a plain construction, the noise statistics against
their settings, the query layout, the fixed denoising assignment and loss, and that the denoising queries never
reach the matching ones."""

from __future__ import annotations

import pytest
import torch
import torchvision

from detr_kit.models.criterion import SetCriterion, denoising_matches
from detr_kit.models.deformable.denoising import (
    ContrastiveDenoising,
    denoising_attention_mask,
    denoising_group_count,
    noise_boxes,
    noise_labels,
)
from detr_kit.models.matcher import HungarianMatcher
from detr_kit.models.transformer import MultiheadAttention
from detr_kit.structures import DenoisingOutput, DetectionOutput, Target


def plain_mask(num_groups: int, group_size: int, num_queries: int) -> torch.Tensor:
    """The rule written out query by query: True = the row query must not see the column query."""
    num_denoising = num_groups * group_size
    size = num_denoising + num_queries
    rows = []
    for i in range(size):
        row = []
        for j in range(size):
            if j >= num_denoising:  # a matching query is visible to everyone
                row.append(False)
            elif i >= num_denoising:  # a matching query never sees a denoising query
                row.append(True)
            else:  # denoising sees denoising of its own group only
                row.append(i // group_size != j // group_size)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(size, size)


@pytest.mark.parametrize("groups,size,queries", [(1, 2, 3), (3, 4, 5), (2, 6, 1), (4, 2, 0), (0, 0, 4), (5, 8, 7)])
def test_attention_mask_matches_the_plain_construction(groups: int, size: int, queries: int) -> None:
    torch.testing.assert_close(denoising_attention_mask(groups, size, queries), plain_mask(groups, size, queries))


def test_attention_mask_by_query_kind() -> None:
    # 2 groups of (2 positive + 2 negative), then 3 matching queries: indices 0-3 group 0, 4-7 group 1, 8-10 matching
    mask = denoising_attention_mask(2, 4, 3)
    positive_g0, negative_g0, positive_g1, negative_g1, matching = 0, 3, 4, 7, 9
    assert not mask[positive_g0, negative_g0] and not mask[negative_g0, positive_g0]  # one group sees itself
    assert mask[positive_g0, positive_g1] and mask[negative_g1, negative_g0]  # ... and no other group
    assert not mask[positive_g1, matching] and not mask[negative_g0, matching]  # denoising sees matching
    assert mask[matching, positive_g0] and mask[matching, negative_g1]  # matching sees no denoising query
    assert not mask[matching].narrow(0, 8, 3).any()  # matching queries see each other


def test_masked_attention_keeps_groups_and_matching_queries_apart() -> None:
    """Through attention: changing group 1 or every denoising query changes nothing it must not see."""
    torch.manual_seed(0)
    attention = MultiheadAttention(16, 2).double()
    mask = denoising_attention_mask(2, 4, 3)
    x = torch.randn(1, 11, 16, dtype=torch.float64)
    base = attention(x, x, x, attn_mask=mask)
    changed_group1 = x.clone()
    changed_group1[:, 4:8] += 5.0
    out = attention(changed_group1, changed_group1, changed_group1, attn_mask=mask)
    torch.testing.assert_close(out[:, :4], base[:, :4])  # group 0 unchanged
    torch.testing.assert_close(out[:, 8:], base[:, 8:])  # matching unchanged
    changed_matching = x.clone()
    changed_matching[:, 8:] += 5.0
    out = attention(changed_matching, changed_matching, changed_matching, attn_mask=mask)
    assert (out[:, :8] - base[:, :8]).abs().max() > 1e-3  # denoising queries do see the matching ones


def test_group_count_follows_the_largest_target_count() -> None:
    assert denoising_group_count(4, 100) == 25
    assert denoising_group_count(3, 100) == 33
    assert denoising_group_count(150, 100) == 1  # at least one group
    assert denoising_group_count(0, 100) == 0  # nothing to denoise


def test_label_noise_statistics() -> None:
    torch.manual_seed(0)
    labels = torch.zeros(200_000, dtype=torch.int64)
    noised = noise_labels(labels, label_noise_ratio=0.5, num_classes=5)
    # redrawn with probability 0.5 / 2, and a redraw keeps label 0 one time in 5
    changed = noised != 0
    assert abs(changed.float().mean().item() - 0.25 * 4 / 5) < 0.005
    counts = torch.bincount(noised[changed], minlength=5)[1:].float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.01  # the new labels are uniform over the other classes
    assert torch.equal(noise_labels(labels[:100], 0.0, 5), labels[:100])


def test_box_noise_statistics() -> None:
    torch.manual_seed(0)
    n, scale = 50_000, 0.4
    boxes = torch.tensor([0.5, 0.5, 0.2, 0.4]).expand(2, n, 4)  # far from the edges: nothing is clipped
    negative = torch.tensor([False, True])[:, None].expand(2, n)
    noised = noise_boxes(boxes, negative, scale)
    corners = lambda b: torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)  # noqa: E731
    half_sizes = torch.tensor([0.1, 0.2, 0.1, 0.2])
    relative = (corners(noised) - corners(boxes)) / (half_sizes * scale)  # [2, n, 4] in units of the noise scale
    positive, negative_ = relative[0].abs(), relative[1].abs()
    assert positive.max() < 1 + 1e-5 and abs(positive.mean().item() - 0.5) < 0.01  # uniform in [0, 1)
    assert negative_.min() > 1 - 1e-5 and negative_.max() < 2 + 1e-5 and abs(negative_.mean().item() - 1.5) < 0.01
    assert abs((relative > 0).float().mean().item() - 0.5) < 0.01  # both directions alike
    edge = noise_boxes(torch.tensor([[0.02, 0.98, 0.04, 0.04]]).expand(1000, 4), torch.ones(1000, dtype=torch.bool), 1.0)
    low, high = edge[:, :2] - edge[:, 2:] / 2, edge[:, :2] + edge[:, 2:] / 2
    assert low.min() >= -1e-6 and high.max() <= 1 + 1e-6  # corners clipped to the image
    assert torch.equal(noise_boxes(boxes, negative, 0.0), boxes)


def test_denoising_queries_layout() -> None:
    torch.manual_seed(0)
    denoising = ContrastiveDenoising(num_classes=4, hidden_dim=8, dn_number=5, label_noise_ratio=0.0, box_noise_scale=0.4)
    targets = [
        Target(torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.4, 0.2]]), torch.tensor([1, 3])),
        Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)),
    ]
    queries = denoising(targets)
    groups, t_max = 2, 2  # 5 // 2 groups of 2 positive + 2 negative
    assert (queries.num_groups, queries.group_size) == (groups, 2 * t_max)
    assert queries.content.shape == (2, groups * 2 * t_max, 8) and queries.boxes.shape == (2, groups * 2 * t_max, 4)
    for group in range(groups):
        for kind in (0, 1):  # positive, negative
            for slot, label in enumerate((1, 3)):
                index = group * 2 * t_max + kind * t_max + slot
                torch.testing.assert_close(queries.content[0, index], denoising.label_enc.weight[label])
                moved = (queries.boxes[0, index, :2] - targets[0].boxes[slot, :2]).abs()
                limit = 0.4 * targets[0].boxes[slot, 2:] * (1 if kind == 0 else 2)  # centres move <= scale * size
                assert (moved <= limit + 1e-6).all()
    # the image without targets has only padding: zero content, centred half-image boxes
    assert not queries.content[1].any()
    torch.testing.assert_close(queries.boxes[1], torch.full((groups * 2 * t_max, 4), 0.5))
    empty = denoising([targets[1], targets[1]])
    assert empty.content.shape == (2, 0, 8) and empty.num_groups == 0
    assert empty.attention_mask(3).shape == (3, 3) and not empty.attention_mask(3).any()


def test_denoising_matches_by_hand() -> None:
    targets = [Target(torch.rand(2, 4), [0, 1]), Target(torch.zeros(0, 4), []), Target(torch.rand(3, 4), [2, 2, 0])]
    # 2 groups, T_max 3: group size 6, P = 12; positives at 0-2 and 6-8
    matches = denoising_matches(targets, num_groups=2, num_queries=12, device=torch.device("cpu"))
    assert [q.tolist() for q, _ in matches] == [[0, 1, 6, 7], [], [0, 1, 2, 6, 7, 8]]
    assert [t.tolist() for _, t in matches] == [[0, 1, 0, 1], [], [0, 1, 2, 0, 1, 2]]


def test_denoising_loss_against_torchvision_focal_loss() -> None:
    torch.manual_seed(0)
    num_classes, groups, t_max = 3, 2, 2
    targets = [Target(torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.4]]), [2, 0]),
               Target(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), [1])]
    num_denoising = groups * 2 * t_max
    logits = torch.randn(1, 2, num_denoising, num_classes)
    boxes = torch.rand(1, 2, num_denoising, 4) * 0.5 + 0.25
    criterion = SetCriterion(num_classes, HungarianMatcher(focal=True), class_weight=1.0, bbox_weight=5.0,
                             giou_weight=2.0, focal=True)
    output = DetectionOutput(torch.zeros(2, 1, num_classes), torch.full((2, 1, 4), 0.5),
                             denoising=DenoisingOutput(logits, boxes, groups))
    terms = criterion(output, targets).terms
    # independent: one-hot of the positives' labels, "no object" elsewhere (negatives and padding)
    one_hot = torch.zeros(2, num_denoising, num_classes)
    pairs = []  # (image, query, target)
    for image, target in enumerate(targets):
        for group in range(groups):
            for slot in range(len(target)):
                query = group * 2 * t_max + slot
                one_hot[image, query, target.labels[slot]] = 1.0
                pairs.append((image, query, slot))
    normaliser = 3 * groups  # 3 boxes in the batch, times the groups
    focal = torchvision.ops.sigmoid_focal_loss(logits[0], one_hot, alpha=0.25, gamma=2.0, reduction="sum")
    torch.testing.assert_close(terms["loss_class_dn"], focal / normaliser)
    predicted = torch.stack([boxes[0, i, q] for i, q, _ in pairs])
    wanted = torch.stack([targets[i].boxes[t] for i, _, t in pairs])
    torch.testing.assert_close(terms["loss_bbox_dn"], 5.0 * (predicted - wanted).abs().sum() / normaliser)
    giou = torchvision.ops.generalized_box_iou(torchvision.ops.box_convert(predicted, "cxcywh", "xyxy"),
                                               torchvision.ops.box_convert(wanted, "cxcywh", "xyxy")).diagonal()
    torch.testing.assert_close(terms["loss_giou_dn"], 2.0 * (1 - giou).sum() / normaliser)


def test_denoising_terms_exist_for_a_batch_without_targets() -> None:
    """Every rank logs the same terms, even one whose images have no boxes (P = 0)."""
    criterion = SetCriterion(3, HungarianMatcher(focal=True), focal=True)
    empty = [Target(torch.zeros(0, 4), []), Target(torch.zeros(0, 4), [])]
    aux = ((torch.zeros(2, 1, 3), torch.full((2, 1, 4), 0.5)),)
    output = DetectionOutput(torch.zeros(2, 1, 3), torch.full((2, 1, 4), 0.5), aux,
                             denoising=DenoisingOutput(torch.zeros(2, 2, 0, 3), torch.zeros(2, 2, 0, 4), 0))
    result = criterion(output, empty)
    for name in ("loss_class_dn", "loss_bbox_dn", "loss_giou_dn", "loss_class_aux0_dn"):
        assert result.terms[name] == 0.0
    assert torch.isfinite(result.loss)


def _tiny_dino(dn_number: int) -> torch.nn.Module:
    from detr_kit.build import build_model
    from detr_kit.config import load_config

    from tiny_models import TINY_DEFORMABLE

    overrides = [*TINY_DEFORMABLE, "model.deformable.box_refine=true", "model.deformable.two_stage=true",
                 "model.deformable.mixed_query_selection=true", "model.deformable.look_forward_twice=true",
                 "model.deformable.share_heads=true", "model.deformable.decoder_norm=true",
                 f"model.deformable.dn_number={dn_number}"]
    torch.manual_seed(0)
    return build_model(load_config("configs/deformable_detr.yaml", overrides))


def test_denoising_queries_change_nothing_the_matching_queries_compute() -> None:
    """End to end: the same weights with and without denoising give the matching queries the same outputs, in
    training (the mask hides the denoising queries from them) and in evaluation (where none are made), so the
    inference cost and results are those of the model without denoising."""
    with_dn, without_dn = _tiny_dino(dn_number=12), _tiny_dino(dn_number=0)
    missing = without_dn.load_state_dict(with_dn.state_dict(), strict=False)
    assert missing.unexpected_keys == ["denoising.label_enc.weight"] and not missing.missing_keys
    images, mask = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    targets = [Target(torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]]), [0, 2, 1]),
               Target(torch.zeros(0, 4), [])]
    for train in (True, False):
        with_dn.train(train), without_dn.train(train)
        got = with_dn(images, mask, targets=targets)
        expected = without_dn(images, mask)
        assert (got.denoising is not None) == train
        if train:
            assert got.denoising.num_groups == 4 and got.denoising.logits.shape[2] == 4 * 2 * 3  # 12 // 3 groups
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.boxes, expected.boxes, atol=1e-5, rtol=0)
        for (logits, boxes), (logits_ref, boxes_ref) in zip(got.aux, expected.aux):
            torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(boxes, boxes_ref, atol=1e-5, rtol=0)
