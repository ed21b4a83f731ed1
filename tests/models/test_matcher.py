"""HungarianMatcher against brute force over every assignment, with costs recomputed in float64 here."""

import itertools

import numpy as np
import pytest
import torch
import torchvision

from detr_kit.models.matcher import HungarianMatcher, hungarian_match
from detr_kit.structures import Target

NUM_CLASSES = 4


def reference_cost(logits, boxes_cxcywh, target, focal, weights=(1.0, 5.0, 2.0), alpha=0.25, gamma=2.0):
    """[Q, T] matching cost in float64, class cost from the formula, box geometry from torchvision."""
    logits, boxes_cxcywh = logits.double(), boxes_cxcywh.double()
    target_boxes = target.boxes.double()
    giou = torchvision.ops.generalized_box_iou(
        torchvision.ops.box_convert(boxes_cxcywh, "cxcywh", "xyxy"),
        torchvision.ops.box_convert(target_boxes, "cxcywh", "xyxy"),
    )  # [Q, T]
    l1 = (boxes_cxcywh[:, None, :] - target_boxes[None, :, :]).abs().sum(-1)  # [Q, T]
    if focal:
        p = torch.sigmoid(logits)[:, target.labels]  # [Q, T]
        class_cost = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8) - (1 - alpha) * p**gamma * -torch.log(1 - p + 1e-8)
    else:
        class_cost = -torch.softmax(logits, -1)[:, target.labels]
    return weights[0] * class_cost + weights[1] * l1 - weights[2] * giou


def brute_force_minimum(cost):
    """Minimum total cost over every one-to-one assignment of min(Q, T) pairs."""
    cost = cost.numpy()
    if cost.shape[1] > cost.shape[0]:
        cost = cost.T
    num_rows, num_cols = cost.shape  # num_cols <= num_rows: every column gets a distinct row
    rows = np.array(list(itertools.permutations(range(num_rows), num_cols)))  # [P, num_cols]
    return float(cost[rows, np.arange(num_cols)].sum(1).min())


def random_target(num_targets, generator):
    center = torch.rand(num_targets, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(num_targets, 2, generator=generator) * 0.3 + 0.05
    return Target(torch.cat((center, size), 1), torch.randint(0, NUM_CLASSES, (num_targets,), generator=generator))


def random_predictions(batch_size, num_queries, focal, generator):
    logits = torch.randn(batch_size, num_queries, NUM_CLASSES + (0 if focal else 1), generator=generator) * 2
    boxes = torch.rand(batch_size, num_queries, 4, generator=generator) * 0.5 + 0.1
    return logits, boxes


@pytest.mark.parametrize("stack_images", [False, True])
@pytest.mark.parametrize("focal", [False, True])
def test_matched_cost_is_the_brute_force_minimum(focal, stack_images):
    matcher = HungarianMatcher(cost_class=2.0 if focal else 1.0, cost_bbox=5.0, cost_giou=2.0, focal=focal,
                               stack_images=stack_images)
    generator = torch.Generator().manual_seed(1234 + focal)
    for seed in range(40):
        num_queries = 1 + seed % 7
        num_targets = [1 + (seed * 3 + b) % num_queries for b in range(2)]  # 1..Q targets per image
        logits, boxes = random_predictions(2, num_queries, focal, generator)
        targets = [random_target(n, generator) for n in num_targets]
        matches = matcher(logits, boxes, targets)
        for b, (query_idx, target_idx) in enumerate(matches):
            cost = reference_cost(logits[b], boxes[b], targets[b], focal, weights=(matcher.cost_class, 5.0, 2.0))
            assert query_idx.dtype == target_idx.dtype == torch.int64
            assert len(query_idx) == len(target_idx) == num_targets[b]
            assert sorted(target_idx.tolist()) == list(range(num_targets[b]))  # every target used once
            assert len(set(query_idx.tolist())) == num_targets[b]
            assert query_idx.tolist() == sorted(query_idx.tolist())
            matched_total = cost[query_idx, target_idx].sum().item()
            assert matched_total == pytest.approx(brute_force_minimum(cost), abs=1e-4), f"seed {seed}, image {b}"


def test_more_targets_than_queries_matches_every_query_optimally():
    matcher = HungarianMatcher()
    generator = torch.Generator().manual_seed(7)
    logits, boxes = random_predictions(1, 3, False, generator)
    target = random_target(6, generator)
    query_idx, target_idx = matcher(logits, boxes, [target])[0]
    assert query_idx.tolist() == [0, 1, 2]
    cost = reference_cost(logits[0], boxes[0], target, focal=False)
    assert cost[query_idx, target_idx].sum().item() == pytest.approx(brute_force_minimum(cost), abs=1e-4)


@pytest.mark.parametrize("stack_images", [False, True])
@pytest.mark.parametrize("focal", [False, True])
def test_zero_targets_and_mixed_batch(focal, stack_images):
    matcher = HungarianMatcher(focal=focal, stack_images=stack_images)
    generator = torch.Generator().manual_seed(3)
    logits, boxes = random_predictions(3, 6, focal, generator)
    targets = [random_target(0, generator), random_target(1, generator), random_target(5, generator)]
    matches = matcher(logits, boxes, targets)
    assert [len(q) for q, _ in matches] == [0, 1, 5]
    assert matches[0][0].dtype == matches[0][1].dtype == torch.int64
    # each image is matched exactly as it would be on its own
    for b in (1, 2):
        alone = matcher(logits[b : b + 1], boxes[b : b + 1], [targets[b]])[0]
        assert torch.equal(alone[0], matches[b][0]) and torch.equal(alone[1], matches[b][1])
    # a batch with no targets at all
    empty = matcher(logits, boxes, [random_target(0, generator)] * 3)
    assert all(q.numel() == 0 and t.numel() == 0 for q, t in empty)


@pytest.mark.parametrize("stack_images", [False, True])
@pytest.mark.parametrize("focal", [False, True])
def test_non_finite_predictions_do_not_crash(focal, stack_images):
    matcher = HungarianMatcher(focal=focal, stack_images=stack_images)
    generator = torch.Generator().manual_seed(11)
    logits, boxes = random_predictions(2, 5, focal, generator)
    logits[0, 1] = float("nan")
    logits[1] = float("nan")  # a whole image diverged
    boxes[0, 3] = float("inf")
    boxes[1, 0] = float("nan")
    targets = [random_target(3, generator), random_target(4, generator)]
    matches = matcher(logits, boxes, targets)
    assert [len(q) for q, _ in matches] == [3, 4]
    for (query_idx, target_idx), n in zip(matches, (3, 4)):
        assert sorted(target_idx.tolist()) == list(range(n)) and len(set(query_idx.tolist())) == n
    # the finite queries of image 0 are preferred over the diverged ones
    assert 1 not in matches[0][0].tolist() and 3 not in matches[0][0].tolist()


@pytest.mark.parametrize("num_queries", [30, 700])  # 700 x 60 costs are built in 3 query tiles on CPU
@pytest.mark.parametrize("focal", [False, True])
def test_stacked_and_per_image_costs_agree(focal, num_queries):
    matcher = HungarianMatcher(focal=focal)
    generator = torch.Generator().manual_seed(9)
    logits, boxes = random_predictions(4, num_queries, focal, generator)
    targets = [random_target(n, generator) for n in (7, 0, 2, 60)]
    class_cost = matcher.class_cost_table(logits)
    per_image = matcher._per_image_costs(class_cost, boxes, targets)
    stacked = matcher._stacked_costs(class_cost, boxes, targets)
    for b, (one, other) in enumerate(zip(per_image, stacked)):
        assert one.shape == other.shape == (num_queries, len(targets[b]))
        torch.testing.assert_close(one, other)
        torch.testing.assert_close(one.double(), reference_cost(logits[b], boxes[b], targets[b], focal,
                                                                weights=(1.0, 5.0, 2.0)), rtol=1e-4, atol=1e-4)


def test_costs_are_float32_under_autocast():
    matcher = HungarianMatcher()
    generator = torch.Generator().manual_seed(5)
    logits, boxes = random_predictions(2, 7, False, generator)
    logits, boxes = logits.bfloat16(), boxes.bfloat16()
    targets = [random_target(4, generator), random_target(6, generator)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        matches = matcher(logits, boxes, targets)
    for b, (query_idx, target_idx) in enumerate(matches):
        cost = reference_cost(logits[b].float(), boxes[b].float(), targets[b], focal=False)
        assert cost[query_idx, target_idx].sum().item() == pytest.approx(brute_force_minimum(cost), abs=1e-4)


def test_hungarian_match_on_a_hand_made_matrix():
    # the greedy choice (query 0 -> target 0, cost 1) forces cost 1 + 10; the optimum is 2 + 3 = 5
    cost = torch.tensor([[1.0, 2.0], [3.0, 10.0], [20.0, 20.0]])
    (query_idx, target_idx), (empty_q, empty_t) = hungarian_match([cost, torch.zeros(3, 0)])
    assert query_idx.tolist() == [0, 1] and target_idx.tolist() == [1, 0]
    assert empty_q.numel() == 0 and empty_t.numel() == 0 and empty_q.dtype == torch.int64


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="non-negative"):
        HungarianMatcher(cost_class=-1.0)
    with pytest.raises(ValueError, match="not all zero"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    with pytest.raises(ValueError, match="agree on B"):
        HungarianMatcher()(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4), [Target(torch.zeros(0, 4), torch.zeros(0))])
