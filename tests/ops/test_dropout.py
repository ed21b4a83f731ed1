"""dropout / relu_dropout against binomial bounds, plain masked references written here, and float64 gradcheck."""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from detr_kit.ops.dropout import _ReLUDropout, _SeededDropout, dropout, random_int16, relu_dropout

CPU = torch.device("cpu")


def bit_frequency_z_scores(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """z-score of the frequency of 1s at each of the low ``num_bits`` bit positions against a fair coin."""
    values = values.to(torch.int64).flatten()
    n = values.numel()
    ones = torch.stack([((values >> bit) & 1).sum() for bit in range(num_bits)]).double()  # [num_bits]
    return (ones - n / 2) / math.sqrt(n / 4)


def chi_square(values: torch.Tensor, num_bins: int) -> float:
    counts = torch.bincount(values.flatten(), minlength=num_bins).double()
    expected = values.numel() / num_bins
    return float(((counts - expected) ** 2 / expected).sum())


# ------------------------------------------------------------------------------------------------ random bits


@pytest.mark.parametrize("seed", [0, 1])
def test_random_bits_are_fair_and_uniform(seed):
    bits = random_int16(torch.Size([1 << 20]), CPU, torch.Generator().manual_seed(seed))
    assert bits.dtype == torch.int16 and bits.shape == (1 << 20,)
    unsigned = bits.to(torch.int64) & 0xFFFF  # [N] in 0..65535
    assert bit_frequency_z_scores(unsigned, 16).abs().max() < 5.0
    # Each of the four 16-bit fields of a 64-bit word: the sign bit of the word is as fair as the others.
    for field in unsigned.view(-1, 4).unbind(1):
        assert bit_frequency_z_scores(field, 16).abs().max() < 5.0
    # High byte (what the threshold mostly reads): chi-square with 255 degrees of freedom, mean 255, sd 22.6.
    assert chi_square(unsigned >> 8, 256) < 255 + 6 * 22.6
    assert chi_square(unsigned & 0xFF, 256) < 255 + 6 * 22.6


def test_bit_check_rejects_int32_random_():
    """The check above can fail: ``random_()`` on int32 never sets the top bit, so bit 15 of the high half is 0."""
    words = torch.empty(1 << 18, dtype=torch.int32).random_(generator=torch.Generator().manual_seed(0))
    high_halves = (words.to(torch.int64) >> 16) & 0xFFFF
    assert bit_frequency_z_scores(high_halves, 16)[15].abs() > 100


# ------------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_and_exact_scale(p):
    torch.manual_seed(0)
    n = 1 << 20
    y = dropout(torch.ones(n), p, training=True)
    kept = y != 0
    keep_rate = kept.double().mean().item()
    bound = 6 * math.sqrt(p * (1 - p) / n) + 2.0**-16  # binomial sd, plus the quantisation of p
    assert abs(keep_rate - (1 - p)) < bound
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)  # what F.dropout multiplies by
    assert torch.equal(y[kept], scale.expand(int(kept.sum())))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_relu_dropout_keep_rate_and_values(p):
    torch.manual_seed(1)
    n = 1 << 20
    x = torch.randn(n, dtype=torch.float64)
    y = relu_dropout(x, p, training=True)
    positive = x > 0
    kept = y != 0
    assert not kept[~positive].any()  # relu: nothing negative survives
    keep_rate = kept[positive].double().mean().item()
    num_positive = int(positive.sum())
    assert abs(keep_rate - (1 - p)) < 6 * math.sqrt(p * (1 - p) / num_positive) + 2.0**-16
    torch.testing.assert_close(y[kept], x[kept] * (1 / (1 - p)), rtol=0, atol=0)  # the scale F.dropout uses


def test_masks_are_independent_of_position():
    """Neighbouring elements (which share a 64-bit word) are dropped independently: P(both) = p^2."""
    torch.manual_seed(2)
    p, n = 0.5, 1 << 20
    dropped = dropout(torch.ones(n), p, training=True).view(-1, 2) == 0  # [N / 2, 2]
    both = (dropped[:, 0] & dropped[:, 1]).double().mean().item()
    assert abs(both - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / (n / 2))


# ------------------------------------------------------------------------------------------------ modes


def test_eval_and_zero_probability_are_plain_ops():
    x = torch.randn(4, 7, requires_grad=True)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    for y in (relu_dropout(x, 0.5, training=False), relu_dropout(x, 0.0, training=True)):
        torch.testing.assert_close(y, x.clamp(min=0), rtol=0, atol=0)
        assert "ReluBackward" in type(y.grad_fn).__name__  # no custom Function in the graph


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_probability_is_rejected(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout(torch.ones(3), p, training=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        relu_dropout(torch.ones(3), p, training=True)


def test_training_mode_uses_the_custom_functions():
    x = torch.randn(8, 8, requires_grad=True)
    assert type(dropout(x, 0.1, True).grad_fn).__name__ == _SeededDropout.__name__ + "Backward"
    assert type(relu_dropout(x, 0.1, True).grad_fn).__name__ == _ReLUDropout.__name__ + "Backward"


# ------------------------------------------------------------------------------------------------ gradients


def seeded(fn, seed):
    """``fn`` with the default generator reset before every call, so that every call draws the same mask."""

    def call(*args):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(*args)

    return call


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_output_and_gradient_match_plain_reference(p):
    shape = (3, 5, 17)  # 255 elements: not a multiple of the four fields of a random word
    run = seeded(lambda x: dropout(x, p, training=True), seed=3)
    keep = run(torch.ones(shape)) != 0  # the mask, recovered from an all-ones input
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(shape, dtype=torch.float64)
    y = run(x)
    (grad_x,) = torch.autograd.grad(y, x, grad_out)
    torch.testing.assert_close(y, x.detach() * keep / (1 - p))
    torch.testing.assert_close(grad_x, grad_out * keep / (1 - p))
    assert torch.autograd.gradcheck(run, (x,))


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_relu_dropout_gradient_matches_plain_reference(p):
    shape = (2, 9, 13)
    run = seeded(lambda x: relu_dropout(x, p, training=True), seed=4)
    keep = run(torch.ones(shape)) != 0
    x = torch.randn(shape, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, 0.5, x).requires_grad_()  # keep gradcheck's steps off relu's kink
    grad_out = torch.randn(shape, dtype=torch.float64)
    y = run(x)
    (grad_x,) = torch.autograd.grad(y, x, grad_out)
    torch.testing.assert_close(y, x.detach().clamp(min=0) * keep / (1 - p))
    torch.testing.assert_close(grad_x, grad_out * ((x.detach() > 0) & keep) / (1 - p))
    assert torch.autograd.gradcheck(run, (x,))


def test_inplace_relu_dropout_overwrites_its_input_with_the_same_result_and_gradient():
    p, shape = 0.3, (3, 7, 11)
    keep = seeded(lambda x: relu_dropout(x, p, training=True, inplace=True), seed=5)(torch.ones(shape)) != 0
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(shape, dtype=torch.float64)
    hidden = x * 1.0  # a fresh non-leaf, as a Linear's output
    torch.manual_seed(5)
    y = relu_dropout(hidden, p, training=True, inplace=True)
    assert y.data_ptr() == hidden.data_ptr()  # no second buffer
    torch.testing.assert_close(y, x.detach().clamp(min=0) * keep / (1 - p))
    (grad_x,) = torch.autograd.grad(y, x, grad_out)
    torch.testing.assert_close(grad_x, grad_out * ((x.detach() > 0) & keep) / (1 - p))
    evaluated = torch.randn(shape)
    expected = evaluated.clamp(min=0)
    assert torch.equal(relu_dropout(evaluated, p, training=False, inplace=True), expected)
    assert torch.equal(evaluated, expected)  # eval mode: ReLU in place


def test_relu_dropout_output_modified_in_place_is_an_error():
    x = torch.randn(6, 6, requires_grad=True)
    y = relu_dropout(x, 0.3, training=True)
    y.add_(1.0)  # the saved output changed: its version counter makes backward refuse
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_relu_dropout_saves_only_its_output():
    x = torch.randn(4, 8, requires_grad=True)
    y = relu_dropout(x, 0.3, training=True)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()


def test_dropout_saves_no_tensor():
    saved = []
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropout(x, 0.3, training=True).sum().backward()
    assert saved == []


# ------------------------------------------------------------------------------------------------ reproducibility


def test_manual_seed_reproduces_masks():
    x = torch.randn(64, 33)
    torch.manual_seed(5)
    first = (dropout(x, 0.3, True), relu_dropout(x, 0.3, True))
    torch.manual_seed(5)
    second = (dropout(x, 0.3, True), relu_dropout(x, 0.3, True))
    torch.manual_seed(6)
    other = dropout(x, 0.3, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other)


def test_checkpoint_recomputes_the_same_masks():
    """A small FFN block with every dropout kind: gradients under non-reentrant checkpoint equal those without."""
    torch.manual_seed(0)
    linear1, linear2 = torch.nn.Linear(8, 32).double(), torch.nn.Linear(32, 8).double()

    def block(x):
        return x + dropout(linear2(relu_dropout(linear1(x), 0.4, True)), 0.4, True)

    x = torch.randn(3, 50, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(7)
        y = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        y = block(y)  # a second draw after the checkpointed one: the RNG must move on identically
        grads.append(torch.autograd.grad(y.square().sum(), (x, linear1.weight, linear2.weight)))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    torch.manual_seed(8)
    x = torch.randn(16, 40, dtype=dtype, requires_grad=True)
    for fn in (dropout, relu_dropout):
        y = fn(x, 0.25, True)
        assert y.dtype == dtype
        (grad,) = torch.autograd.grad(y.float().sum(), x)
        assert grad.dtype == dtype
        kept = y != 0
        scale = torch.tensor(1 / 0.75, dtype=dtype)
        torch.testing.assert_close(grad, torch.where(kept, scale, 0).to(dtype), rtol=0, atol=0)


def test_autocast_linear_then_dropouts():
    torch.manual_seed(9)
    linear = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = relu_dropout(linear(x), 0.2, True)
        out = dropout(hidden, 0.2, True)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and linear.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_paths_keep_rate_gradient_and_checkpoint():
    device = torch.device("cuda")
    x = torch.randn(1 << 20, device=device, requires_grad=True)
    y, z = dropout(x, 0.1, True), relu_dropout(x, 0.1, True)
    assert abs((y != 0).double().mean().item() - 0.9) < 6 * math.sqrt(0.09 / (1 << 20))
    (grad,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(grad, (z > 0) * torch.tensor(1 / 0.9, device=device), rtol=0, atol=0)
    linear = torch.nn.Linear(8, 32).to(device)

    def block(inputs):
        return dropout(relu_dropout(linear(inputs), 0.4, True), 0.4, True)

    inputs = torch.randn(3, 50, 8, device=device, requires_grad=True)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(7)
        out = checkpoint(block, inputs, use_reentrant=False) if recompute else block(inputs)
        grads.append(torch.autograd.grad(out.square().sum(), (inputs, linear.weight)))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)
