"""OutputSavingLayerNorm against torch's LayerNorm in float64: outputs and every gradient, and what it keeps."""

import pytest
import torch

from detr_kit.ops.layer_norm import OutputSavingLayerNorm


def _pair(channels: int, weight: torch.Tensor, bias: torch.Tensor):
    ours, reference = OutputSavingLayerNorm(channels).double(), torch.nn.LayerNorm(channels).double()
    with torch.no_grad():
        for norm in (ours, reference):
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)
    return ours, reference


@pytest.mark.parametrize("case", ["random", "negative_and_small_weights", "tiny_weight_falls_back"])
def test_gradients_equal_torch_layer_norm_in_float64(case):
    torch.manual_seed(0)
    channels = 24
    weight = torch.randn(channels, dtype=torch.float64) + 1.0
    bias = torch.randn(channels, dtype=torch.float64)
    if case == "negative_and_small_weights":
        weight[:4] = torch.tensor([-2.0, -0.01, 0.002, 5.0], dtype=torch.float64)
    if case == "tiny_weight_falls_back":
        weight[0] = 1e-6  # |weight| < 1e-3 * |bias|: the plain layer_norm runs (and keeps its input)
    ours, reference = _pair(channels, weight, bias)
    x = torch.randn(3, 7, channels, dtype=torch.float64) * 3 + 1
    grad = torch.randn(3, 7, channels, dtype=torch.float64)
    results = []
    for norm in (ours, reference):
        inputs = x.clone().requires_grad_()
        out = norm(inputs)
        results.append((out, *torch.autograd.grad(out, (inputs, norm.weight, norm.bias), grad)))
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)


def test_keeps_its_output_and_not_its_input():
    torch.manual_seed(0)
    norm = OutputSavingLayerNorm(16)
    x = torch.randn(4, 5, 16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = norm(x * 2)  # the norm's input is a fresh tensor that nothing else keeps
    assert any(t is out or (t.data_ptr() == out.data_ptr() and t.shape == out.shape) for t in kept)
    assert not any(t.shape == x.shape and t.data_ptr() != out.data_ptr() for t in kept)
    out.sum().backward()
    assert x.grad is not None


def test_state_dict_and_eval_match_layer_norm():
    norm, reference = OutputSavingLayerNorm(8), torch.nn.LayerNorm(8)
    assert norm.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 8)
    torch.testing.assert_close(norm.eval()(x), reference(x))


def test_more_than_one_normalised_dimension_is_refused():
    with pytest.raises(ValueError, match="last dimension only"):
        OutputSavingLayerNorm((4, 8))
