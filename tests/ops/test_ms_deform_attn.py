"""ms_deform_attn: the reference against an independent explicit bilinear loop (float64); every kernel against the
reference (values and gradients, float64), gradcheck, grid_sample's slope convention at integer pixels,
non-finite and outside locations, autocast, the dispatch's choices, torch.compile and the meta device."""

from __future__ import annotations

import pytest
import torch

from detr_kit.ops.deform_attn import IMPLS, _choose_kernel, ms_deform_attn, ms_deform_attn_reference
from detr_kit.ops.deform_attn.gather import gather_sample_and_sum
from references import bilinear_reference

KERNELS = ["gather", "recompute"]


def random_inputs(shapes, batch=2, heads=3, head_dim=5, queries=7, points=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, total, heads, head_dim, generator=gen, dtype=dtype)
    # -0.3..1.3: many samples fall (partly) outside the map.
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=dtype)
    return value, locations, weights


def gradients(function, value, locations, weights, grad_out, needs=(True, True, True)):
    """Output and input gradients of ``(function(value, locations, weights) * grad_out).sum()``."""
    inputs = [t.detach().clone().requires_grad_(need) for t, need in zip((value, locations, weights), needs)]
    out = function(*inputs)
    (out * grad_out).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("shapes", [[(6, 9), (3, 5), (2, 2), (1, 3)], [(4, 4)], [(5, 3), (7, 2)]])
def test_reference_matches_explicit_bilinear_loop(shapes):
    value, locations, weights = random_inputs(shapes)
    grad_out = torch.randn(2, 7, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, grads = gradients(
        lambda v, loc, w: ms_deform_attn_reference(v, shapes, loc, w), value, locations, weights, grad_out
    )
    expected, expected_grads = gradients(
        lambda v, loc, w: bilinear_reference(v, shapes, loc, w), value, locations, weights, grad_out
    )
    assert out.shape == (2, 7, 15)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    for grad, expected_grad in zip(grads, expected_grads):  # random locations: never on an integer pixel
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_every_impl_matches_reference(impl, grad):
    shapes = [(6, 9), (3, 5), (2, 2), (1, 3)]
    value, locations, weights = random_inputs(shapes, seed=2)
    with torch.set_grad_enabled(grad):
        out = ms_deform_attn(value.requires_grad_(grad), shapes, locations, weights, impl=impl)
    assert out.shape == (2, 7, 15)
    expected = ms_deform_attn_reference(value.detach(), shapes, locations, weights)
    torch.testing.assert_close(out.detach(), expected, atol=1e-12, rtol=0)


def test_spatial_shapes_as_tensor_equals_list():
    shapes = [(6, 9), (3, 5)]
    value, locations, weights = random_inputs(shapes, seed=1)
    torch.testing.assert_close(
        ms_deform_attn(value, torch.tensor(shapes), locations, weights),
        ms_deform_attn(value, shapes, locations, weights),
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_samples(impl):
    # One 2x2 map, values 1, 2 / 3, 4, one head with Dh = 1, one point per query.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    locations = torch.tensor(
        [[0.25, 0.25], [0.5, 0.5], [0.75, 0.25], [1.5, 0.5], [1.0, 0.25]], dtype=torch.float64
    ).view(1, 5, 1, 1, 1, 2)
    weights = torch.ones(1, 5, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, [(2, 2)], locations, weights, impl=impl).flatten()
    # centre of pixel (0,0) -> 1; the map's centre -> mean 2.5; centre of (x=1, y=0) -> 2; far outside -> 0;
    # the right border at row 0: half of pixel (1, 0) and half of the zero padding -> 1.0.
    torch.testing.assert_close(out, torch.tensor([1.0, 2.5, 2.0, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_every_input_with_samples_outside(impl):
    shapes = [(3, 4), (2, 2), (1, 3)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=2, head_dim=2, queries=3, points=2, seed=7)
    locations = locations * 1.25 - 0.125  # -0.5..1.5: whole samples and single corners outside the maps
    assert ((locations < 0) | (locations > 1)).any(-1).float().mean() > 0.3
    inputs = [t.requires_grad_(True) for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, impl=impl), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize(
    "needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
)
def test_kernel_gradients_equal_reference(impl, needs):
    shapes = [(6, 9), (3, 5), (2, 2), (1, 3)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=3, head_dim=4, queries=11, points=3, seed=8)
    grad_out = torch.randn(2, 11, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    _, grads = gradients(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, impl=impl), value, locations, weights,
                         grad_out, needs)
    _, expected = gradients(lambda v, loc, w: ms_deform_attn_reference(v, shapes, loc, w), value, locations, weights,
                            grad_out, needs)
    for grad, expected_grad, need in zip(grads, expected, needs):
        if need:
            torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0)
        else:
            assert grad is None


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize(
    "shapes, batch", [([(1, 1), (2, 3)], 1), ([(5, 3), (1, 7), (4, 4)], 2), ([(6, 9), (3, 5), (2, 2), (1, 3)], 2)]
)
def test_kernel_on_borders_and_tiny_levels_matches_bilinear_loop(impl, shapes, batch):
    # Tiny and non-square levels; samples on the map borders (0 and 1), just and far outside, and inside.
    value, locations, weights = random_inputs(shapes, batch=batch, heads=2, head_dim=3, queries=9, points=4, seed=11)
    special = torch.tensor([0.0, 1.0, -0.3, 1.7, -5.0, 0.999, 0.0001])
    locations.view(-1)[: 7 * 40 : 40] = special.double()
    locations[0, 0, 0, :, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # a corner of every level
    grad_out = torch.randn(batch, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    out, grads = gradients(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, impl=impl), value, locations, weights,
                           grad_out)
    expected, expected_grads = gradients(lambda v, loc, w: bilinear_reference(v, shapes, loc, w), value, locations,
                                         weights, grad_out)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    for name, grad, expected_grad in zip(("value", "locations", "weights"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_gradients_at_integer_pixels_follow_grid_sample(impl):
    """Samples exactly on pixel centres (where bilinear weights are not differentiable), one pixel outside and on
    the last pixel: every kernel's location gradient takes grid_sample's one-sided convention there. Sizes are
    powers of two, so that both sides map locations to exactly the same pixel coordinates."""
    shapes = [(4, 8), (1, 2), (2, 1)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=2, head_dim=3, queries=6, points=3, seed=21)
    generator = torch.Generator().manual_seed(22)
    for level, (height, width) in enumerate(shapes):
        for axis, size in ((0, width), (1, height)):
            pixel = torch.randint(-1, size + 1, locations[..., level, :, axis].shape, generator=generator)
            locations[..., level, :, axis] = (pixel.double() + 0.5) / size  # pixel centres -1 .. size
    grad_out = torch.randn(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    _, grads = gradients(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, impl=impl), value, locations, weights,
                         grad_out)
    _, expected = gradients(lambda v, loc, w: ms_deform_attn_reference(v, shapes, loc, w), value, locations, weights,
                            grad_out)
    assert expected[1].abs().sum() > 0
    for grad, expected_grad in zip(grads, expected):
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0)


def test_gather_nan_locations_contribute_nothing():
    # The gather kernel (the CPU default) treats NaN locations as outside; grid_sample returns NaN for them.
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
    out, grads = gradients(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, impl="gather"), value, nan_locations,
                           weights, grad_out)
    expected, expected_grads = gradients(lambda v, loc, w: bilinear_reference(v, shapes, loc, w), value, far, weights,
                                         grad_out)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0)
    assert grads[1][nan].abs().max() == 0


@pytest.mark.parametrize("chunk_samples", [1, 20, 10**9])
def test_gather_chunks_borders_size_one_levels_and_non_finite_locations(chunk_samples):
    # Size-1 levels (no second pixel per axis), samples at and beyond every border, NaN and +-inf locations,
    # bags split into ragged chunks (1 bag, 20 // K bags, all at once): all against the float64 loop.
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
    grad_out = torch.randn(2, 9, 6, dtype=torch.float64, generator=gen)
    out, grads = gradients(lambda v, loc, w: gather_sample_and_sum(v, shapes, loc, w, chunk_samples), value, odd,
                           weights, grad_out)
    torch.testing.assert_close(out, bilinear_reference(value, shapes, far, weights), atol=1e-12, rtol=0)
    # Gradients against grid_sample's (samples on integer pixels take its one-sided slopes).
    _, expected_grads = gradients(lambda v, loc, w: ms_deform_attn_reference(v, shapes, loc, w), value, far, weights,
                                  grad_out)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0)
    with torch.inference_mode():
        out32 = gather_sample_and_sum(value.float(), shapes, locations.float(), weights.float(), chunk_samples)
    torch.testing.assert_close(out32.double(), bilinear_reference(value, shapes, locations, weights), atol=1e-5, rtol=0)


def test_recompute_kernel_saves_only_its_inputs():
    # Autograd may keep the value, the grid and the weights (one copy each), never the [B*M, Dh, P, Lq] samples.
    shapes = [(16, 16), (8, 8)]
    value, locations, weights = random_inputs(shapes, batch=2, heads=2, head_dim=8, queries=320, points=4, seed=10)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    inputs = [t.requires_grad_(True) for t in (value, locations, weights)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], impl="recompute")
    out.sum().backward()
    assert 0 < sum(saved) <= value.numel() + locations.numel() + weights.numel()
    assert all(t.grad is not None for t in inputs)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_bf16_samples_in_float32_and_returns_bf16(impl):
    shapes = [(6, 9), (3, 5)]
    value, locations, weights = random_inputs(shapes, dtype=torch.float32, seed=3)
    value.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.to(torch.bfloat16), shapes, locations, weights, impl=impl)
        out.float().sum().backward()  # backward under autocast: the kernels' backward keeps float32
    assert out.dtype == torch.bfloat16
    expected = bilinear_reference(value.detach().double(), shapes, locations.double(), weights.double())
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)  # bf16 rounding of input and output
    reference_value = value.detach().clone().requires_grad_(True)
    ms_deform_attn_reference(reference_value.to(torch.bfloat16).float(), shapes, locations, weights).sum().backward()
    torch.testing.assert_close(value.grad, reference_value.grad, atol=1e-5, rtol=1e-5)


def test_shape_and_impl_errors():
    shapes = [(3, 4), (2, 2)]
    value, locations, weights = random_inputs(shapes)
    with pytest.raises(ValueError, match="sum to"):
        ms_deform_attn(value[:, :-1], shapes, locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, locations, weights[..., :1])
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn(value, shapes[:1], locations, weights)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, torch.tensor([3, 4, 2, 2]), locations, weights)
    with pytest.raises(ValueError, match="one sampling point"):
        ms_deform_attn(value, shapes, locations[..., :0, :], weights[..., :0])
    with pytest.raises(ValueError, match="impl must be one of"):
        ms_deform_attn(value, shapes, locations, weights, impl="cuda")


@pytest.mark.parametrize("device, expected", [("cpu", "gather"), ("meta", "recompute"), ("cuda", "recompute")])
def test_auto_choice_per_device(device, expected):
    assert _choose_kernel("auto", device) == expected
    assert _choose_kernel("reference", device) == "reference"


def test_auto_is_gather_on_cpu_and_works_under_checkpoint():
    shapes = [(6, 9), (3, 5)]
    value, locations, weights = random_inputs(shapes, seed=18)
    inputs = [t.requires_grad_(True) for t in (value, locations, weights)]
    out = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2])
    assert "GatherSampleAndSum" in type(out.grad_fn).__name__
    out.square().sum().backward()
    plain = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    checkpointed = torch.utils.checkpoint.checkpoint(
        lambda v, loc, w: ms_deform_attn(v, shapes, loc, w), *inputs, use_reentrant=False
    )
    checkpointed.square().sum().backward()
    for t, expected in zip(inputs, plain):
        torch.testing.assert_close(t.grad, expected, atol=1e-12, rtol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks become trace constants
@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.* is deprecated:FutureWarning")
def test_auto_traces_the_reference():
    shapes = [(6, 9), (3, 5)]
    value, locations, weights = random_inputs(shapes, dtype=torch.float32, seed=19)
    with torch.no_grad():
        traced = torch.jit.trace(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w), (value, locations, weights))
    graph = str(traced.graph)
    assert "grid_sampler" in graph and "embedding_bag" not in graph
    other = random_inputs(shapes, dtype=torch.float32, seed=20)
    expected = ms_deform_attn_reference(other[0], shapes, *other[1:])
    torch.testing.assert_close(traced(*other), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_auto_on_meta_device_forward_and_backward(grad):
    shapes = [(6, 9), (3, 5)]
    value, locations, weights = (t.to("meta").requires_grad_(grad) for t in random_inputs(shapes, dtype=torch.float32))
    out = ms_deform_attn(value, shapes, locations, weights)
    assert out.device.type == "meta" and out.shape == (2, 7, 15) and out.dtype == torch.float32
    if grad:
        out.sum().backward()
        for tensor in (value, locations, weights):
            assert tensor.grad.device.type == "meta" and tensor.grad.shape == tensor.shape


def _compiler_works() -> str | None:
    """None if torch.compile can build a CPU kernel here, else the reason it cannot (no C++ compiler, ...)."""
    try:
        torch.compile(lambda x: x.sin() + 1, fullgraph=True)(torch.ones(3))
    except Exception as error:  # noqa: BLE001 - any failure means "no working compiler here"
        return f"torch.compile does not work on this machine: {type(error).__name__}: {error}"[:300]
    return None


@pytest.mark.slow
def test_auto_compiles_to_one_graph_equal_to_eager():
    reason = _compiler_works()
    if reason is not None:
        pytest.skip(reason)
    shapes = [(6, 9), (3, 5)]
    value, locations, weights = random_inputs(shapes, dtype=torch.float32, seed=24)

    def attend(v, loc, w):
        return ms_deform_attn(v, shapes, loc, w, impl="auto") * 2

    compiled = torch.compile(attend, fullgraph=True)
    with torch.no_grad():
        expected = attend(value, locations, weights)
        torch.testing.assert_close(compiled(value, locations, weights), expected, atol=1e-5, rtol=0)
