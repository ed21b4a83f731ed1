"""ms_deform_attn against an independent explicit bilinear sampler (float64), gradcheck and gradients against a
plain grid_sample implementation for every training kernel, the recompute kernel's saved tensors, autocast, errors."""

from __future__ import annotations

import pytest
import torch

from detr_kit.ops import ms_deform_attn as msda
from detr_kit.ops.ms_deform_attn import ms_deform_attn
from references import bilinear_reference


def random_inputs(shapes, batch=2, heads=3, head_dim=5, queries=7, points=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, total, heads, head_dim, generator=gen, dtype=dtype)
    # -0.3..1.3: many samples fall (partly) outside the map.
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=dtype)
    return value, locations, weights


def shape_tensors(shapes):
    spatial = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial.prod(1)
    return spatial, torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


@pytest.mark.parametrize("shapes", [[(6, 9), (3, 5), (2, 2), (1, 3)], [(4, 4)], [(5, 3), (7, 2)]])
def test_matches_explicit_bilinear_reference(shapes):
    value, locations, weights = random_inputs(shapes)
    spatial, start = shape_tensors(shapes)
    out = ms_deform_attn(value, spatial, start, locations, weights)
    expected = bilinear_reference(value, shapes, locations, weights)
    assert out.shape == (2, 7, 15)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_spatial_shapes_as_list_equals_tensor():
    shapes = [(6, 9), (3, 5)]
    value, locations, weights = random_inputs(shapes, seed=1)
    spatial, start = shape_tensors(shapes)
    torch.testing.assert_close(
        ms_deform_attn(value, shapes, None, locations, weights), ms_deform_attn(value, spatial, start, locations, weights)
    )


def test_hand_computed_samples():
    # One 2x2 map, values 1, 2 / 3, 4, one head with Dh = 1, one point per query.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    locations = torch.tensor(
        [[0.25, 0.25], [0.5, 0.5], [0.75, 0.25], [1.5, 0.5], [1.0, 0.25]], dtype=torch.float64
    ).view(1, 5, 1, 1, 1, 2)
    weights = torch.ones(1, 5, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, [(2, 2)], None, locations, weights).flatten()
    # centre of pixel (0,0) -> 1; the map's centre -> mean 2.5; centre of (x=1, y=0) -> 2; far outside -> 0;
    # the right border at row 0: half of pixel (1, 0) and half of the zero padding -> 1.0.
    torch.testing.assert_close(out, torch.tensor([1.0, 2.5, 2.0, 0.0, 1.0], dtype=torch.float64))


def test_gradcheck():
    shapes = [(3, 4), (2, 2)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=2, head_dim=2, queries=3, points=2, seed=2)
    # Keep samples away from integer pixel coordinates, where bilinear interpolation is not differentiable.
    locations = locations.clamp(-0.2, 1.2)
    value.requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, None, loc, w), (value, locations, weights), eps=1e-6, atol=1e-5
    )


def test_autocast_bf16_samples_in_float32_and_returns_bf16():
    shapes = [(6, 9), (3, 5)]
    value, locations, weights = random_inputs(shapes, dtype=torch.float32, seed=3)
    value.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.to(torch.bfloat16), shapes, None, locations, weights)
    assert out.dtype == torch.bfloat16
    expected = bilinear_reference(value.detach().double(), shapes, locations.double(), weights.double())
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)  # bf16 rounding of input and output
    out.float().sum().backward()
    assert value.grad is not None and torch.isfinite(value.grad).all()


def test_shape_errors():
    shapes = [(3, 4), (2, 2)]
    value, locations, weights = random_inputs(shapes)
    with pytest.raises(ValueError, match="sum to"):
        ms_deform_attn(value[:, :-1], shapes, None, locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, None, locations, weights[..., :1])
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn(value, shapes[:1], None, locations, weights)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, torch.tensor([3, 4, 2, 2]), None, locations, weights)


def plain_grid_sample_reference(value, shapes, locations, weights):
    """A second plain implementation: one F.grid_sample per level and head, weighted sum by broadcasting."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = value.new_zeros(batch, queries, heads, head_dim)
    start = 0
    for level, (h, w) in enumerate(shapes):
        for m in range(heads):
            v = value[:, start : start + h * w, m].transpose(1, 2).reshape(batch, head_dim, h, w)  # [B, Dh, h, w]
            grid = locations[:, :, m, level] * 2 - 1  # [B, Q, P, 2]
            samples = torch.nn.functional.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out[:, :, m] += (samples * weights[:, None, :, m, level]).sum(-1).transpose(1, 2)  # [B, Q, Dh]
        start += h * w
    return out.reshape(batch, queries, heads * head_dim)


@pytest.fixture(params=["gather", "recompute", "autograd"])
def training_kernel(request, monkeypatch):
    monkeypatch.setattr(msda, "TRAINING_KERNEL", request.param)
    return request.param


def test_gradcheck_every_input_with_samples_outside(training_kernel):
    shapes = [(3, 4), (2, 2), (1, 3)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=2, head_dim=2, queries=3, points=2, seed=7)
    locations = locations * 1.25 - 0.125  # -0.5..1.5: whole samples and single corners outside the maps
    assert ((locations < 0) | (locations > 1)).any(-1).float().mean() > 0.3
    inputs = [t.requires_grad_(True) for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, None, loc, w), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_gradients_equal_plain_grid_sample(training_kernel, needs):
    shapes = [(6, 9), (3, 5), (2, 2), (1, 3)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=3, head_dim=4, queries=11, points=3, seed=8)
    grad_out = torch.randn(2, 11, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ours = [t.clone().requires_grad_(need) for t, need in zip((value, locations, weights), needs)]
    theirs = [t.clone().requires_grad_(need) for t, need in zip((value, locations, weights), needs)]
    (ms_deform_attn(ours[0], shapes, None, ours[1], ours[2]) * grad_out).sum().backward()
    (plain_grid_sample_reference(*theirs[:1], shapes, *theirs[1:]) * grad_out).sum().backward()
    for mine, reference, need in zip(ours, theirs, needs):
        if need:
            torch.testing.assert_close(mine.grad, reference.grad, atol=1e-10, rtol=0)
        else:
            assert mine.grad is None


def test_recompute_kernel_saves_only_its_inputs(monkeypatch):
    # Autograd may keep the value, the grid and the weights (one copy each), never the [B*M, Dh, P, Lq] samples.
    monkeypatch.setattr(msda, "TRAINING_KERNEL", "recompute")
    shapes = [(16, 16), (8, 8)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=2, head_dim=8, queries=320, points=4, seed=10)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    inputs = [t.requires_grad_(True) for t in (value, locations, weights)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = ms_deform_attn(*inputs[:1], shapes, None, *inputs[1:])
    out.sum().backward()
    assert 0 < sum(saved) <= value.numel() + locations.numel() + weights.numel()
    assert all(t.grad is not None for t in inputs)


def test_unknown_training_kernel(monkeypatch):
    monkeypatch.setattr(msda, "TRAINING_KERNEL", "cuda")
    value, locations, weights = random_inputs([(2, 2)])
    with pytest.raises(ValueError, match="TRAINING_KERNEL"):
        ms_deform_attn(value.requires_grad_(True), [(2, 2)], None, locations, weights)


def reference_gradients(value, shapes, locations, weights, grad_out):
    """Forward and the three gradients of the float64 explicit bilinear reference (autograd through it)."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    out = bilinear_reference(inputs[0], shapes, inputs[1], inputs[2])
    (out * grad_out).sum().backward()
    return out.detach(), [t.grad for t in inputs]


def kernel_gradients(value, shapes, locations, weights, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    out = ms_deform_attn(inputs[0], shapes, None, inputs[1], inputs[2])
    (out * grad_out).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize(
    "shapes, batch", [([(1, 1), (2, 3)], 1), ([(5, 3), (1, 7), (4, 4)], 2), ([(6, 9), (3, 5), (2, 2), (1, 3)], 2)]
)
def test_gather_kernel_forward_and_gradients_match_reference(monkeypatch, shapes, batch):
    # Tiny and non-square levels; samples on the map borders (0 and 1), just and far outside, and inside.
    monkeypatch.setattr(msda, "TRAINING_KERNEL", "gather")
    value, locations, weights = random_inputs(shapes, batch=batch, heads=2, head_dim=3, queries=9, points=4, seed=11)
    special = torch.tensor([0.0, 1.0, -0.3, 1.7, -5.0, 0.999, 0.0001])
    locations.view(-1)[: 7 * 40 : 40] = special.double()
    locations[0, 0, 0, :, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # a corner of every level
    grad_out = torch.randn(batch, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    out, grads = kernel_gradients(value, shapes, locations, weights, grad_out)
    expected, expected_grads = reference_gradients(value, shapes, locations, weights, grad_out)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    for name, grad, expected_grad in zip(("value", "locations", "weights"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0, msg=lambda m: f"{name}: {m}")


def test_gather_kernel_gradients_at_integer_pixels_follow_grid_sample(monkeypatch):
    """Samples exactly on pixel centres (where bilinear weights are not differentiable), one pixel outside and on
    the last pixel: the gather kernel's location gradient takes grid_sample's one-sided convention there. Sizes
    are powers of two, so that both sides map locations to exactly the same pixel coordinates."""
    monkeypatch.setattr(msda, "TRAINING_KERNEL", "gather")
    shapes = [(4, 8), (1, 2), (2, 1)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=2, head_dim=3, queries=6, points=3, seed=21)
    generator = torch.Generator().manual_seed(22)
    for level, (height, width) in enumerate(shapes):
        for axis, size in ((0, width), (1, height)):
            pixel = torch.randint(-1, size + 1, locations[..., level, :, axis].shape, generator=generator)
            locations[..., level, :, axis] = (pixel.double() + 0.5) / size  # pixel centres -1 .. size
    grad_out = torch.randn(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    ours = [t.clone().requires_grad_() for t in (value, locations, weights)]
    theirs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    (ms_deform_attn(ours[0], shapes, None, ours[1], ours[2]) * grad_out).sum().backward()
    (plain_grid_sample_reference(theirs[0], shapes, theirs[1], theirs[2]) * grad_out).sum().backward()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-10, rtol=0)


def test_gather_kernel_nan_locations_contribute_nothing(monkeypatch):
    monkeypatch.setattr(msda, "TRAINING_KERNEL", "gather")
    shapes = [(4, 5), (2, 3)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=2, head_dim=3, queries=6, points=2, seed=13)
    nan = torch.rand(locations.shape[:-1], generator=torch.Generator().manual_seed(14)) < 0.3  # [B, Q, M, L, P]
    nan_locations = locations.clone()
    nan_locations[nan] = float("nan")
    nan_locations[0, 0, 0, 0, 0, 0] = float("nan")  # only x of a sample
    nan[0, 0, 0, 0, 0] = True
    far = locations.clone()
    far[nan] = 5.0  # far outside: contributes 0 with zero gradients, in the reference too
    grad_out = torch.randn(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    out, grads = kernel_gradients(value, shapes, nan_locations, weights, grad_out)
    expected, expected_grads = reference_gradients(value, shapes, far, weights, grad_out)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0)
    assert grads[1][nan].abs().max() == 0


def test_auto_kernel_is_gather_on_cpu_and_works_under_checkpoint(monkeypatch):
    monkeypatch.setattr(msda, "TRAINING_KERNEL", "auto")
    shapes = [(6, 9), (3, 5)]
    value, locations, weights = random_inputs(shapes, seed=18)
    inputs = [t.requires_grad_(True) for t in (value, locations, weights)]
    out = ms_deform_attn(inputs[0], shapes, None, inputs[1], inputs[2])
    assert "GatherSampleAndSum" in type(out.grad_fn).__name__
    out.square().sum().backward()
    plain = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    checkpointed = torch.utils.checkpoint.checkpoint(
        lambda v, loc, w: ms_deform_attn(v, shapes, None, loc, w), *inputs, use_reentrant=False
    )
    checkpointed.square().sum().backward()
    for t, expected in zip(inputs, plain):
        torch.testing.assert_close(t.grad, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk_samples", [1, 20, 10**9])
def test_inference_chunks_borders_size_one_levels_and_non_finite_locations(monkeypatch, chunk_samples):
    # Size-1 levels (no second pixel per axis), samples at and beyond every border, NaN and +-inf locations,
    # bags split into ragged chunks (1 bag, 20 // K bags, all at once): all against the float64 reference.
    monkeypatch.setattr(msda, "_CHUNK_SAMPLES", chunk_samples)
    shapes = [(5, 7), (1, 4), (3, 1), (1, 1)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=2, head_dim=3, queries=9, points=3, seed=21)
    gen = torch.Generator().manual_seed(22)
    edges = torch.tensor([-0.6, -0.5, 0.0, 1e-7, 0.5, 1.0 - 1e-7, 1.0, 1.4, 1.6], dtype=torch.float64)
    locations[0, :, 0] = edges[torch.randint(0, 9, locations[0, :, 0].shape, generator=gen)]
    bad = torch.rand(locations.shape[:-1], generator=gen) < 0.2  # [B, Q, M, L, P]
    far = locations.clone()
    far[bad] = 5.0  # far outside: the reference gives 0
    odd = locations.clone()
    odd[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)[
        torch.randint(0, 3, (int(bad.sum()), 1), generator=gen)
    ]
    odd[0, 0, 0, 0, 0, 0], far[0, 0, 0, 0, 0] = float("nan"), 5.0  # only x is NaN
    with torch.no_grad():
        out = ms_deform_attn(value, shapes, None, odd, weights)
    torch.testing.assert_close(out, bilinear_reference(value, shapes, far, weights), atol=1e-12, rtol=0)
    with torch.inference_mode():
        out32 = ms_deform_attn(value.float(), shapes, None, locations.float(), weights.float())
    torch.testing.assert_close(out32.double(), bilinear_reference(value, shapes, locations, weights), atol=1e-5, rtol=0)
