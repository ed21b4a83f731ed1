"""The fast layers (detr_kit.fast.layers) against the plain ones, and against plain formulas written here: cheap
dropout masks replayed, checkpointed feed-forward blocks, chunked inference, query_pos kept apart."""

import pytest
import torch
import torch.nn.functional as F

from detr_kit.fast.deform_attn import FastMSDeformAttn, LinearOfSum
from detr_kit.fast.feed_forward import INFERENCE_ROWS, ReLUDropout, _chunked, feed_forward
from detr_kit.fast.layers import (
    FastDeformableEncoderLayer,
    FastTransformerDecoderLayer,
    FastTransformerEncoderLayer,
)
from detr_kit.models.deformable import DeformableEncoder, DeformableEncoderLayer, MSDeformAttn
from detr_kit.models.transformer import TransformerDecoderLayer, TransformerEncoderLayer
from detr_kit.ops.dropout import dropout, relu_dropout

SHAPES = [(4, 4), (2, 2)]


def fast_encoder(p: float, whole: bool, ffn: bool) -> DeformableEncoder:
    torch.manual_seed(0)
    encoder = DeformableEncoder(DeformableEncoderLayer(16, 32, 2, 2, 2, dropout=p), 2, activation_checkpointing=whole)
    encoder.layers = torch.nn.ModuleList(FastDeformableEncoderLayer(layer, ffn) for layer in encoder.layers)
    return encoder.train()


def test_deformable_encoder_checkpointing_matches_the_unrecomputed_encoder():
    """Whole layers or feed-forward blocks recomputed in backward: the same outputs and gradients, dropout masks
    included (checkpoint restores the RNG state the masks are drawn from)."""
    encoders = [fast_encoder(0.3, whole, ffn) for whole, ffn in ((False, False), (True, False), (False, True))]
    src, pos, reference_points = torch.randn(2, 20, 16), torch.randn(2, 20, 16), torch.rand(2, 20, 2, 2)
    grads = []
    for encoder in encoders:
        torch.manual_seed(11)
        inputs = src.clone().requires_grad_()
        out = encoder(inputs, pos, reference_points, SHAPES, None)
        grads.append(torch.autograd.grad(out.square().sum(), (inputs, *encoder.parameters())))
    for plain, *recomputed in zip(*grads):
        for each in recomputed:
            torch.testing.assert_close(each, plain)


def test_ffn_checkpointing_keeps_no_feed_forward_hidden_for_backward():
    src, pos, reference_points = torch.randn(2, 20, 16, requires_grad=True), torch.randn(2, 20, 16), torch.rand(2, 20, 2, 2)
    kept = {}
    for ffn in (False, True):
        encoder = fast_encoder(0.1, False, ffn)
        shapes_kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes_kept.append(tuple(t.shape)) or t, lambda t: t):
            out = encoder(src, pos, reference_points, SHAPES, None)
        out.sum().backward()  # the recomputation runs here, outside the hooks
        kept[ffn] = shapes_kept
    hidden = {(2, 20, 32), (40, 32)}  # the [B, S, dim_feedforward] hidden of each layer (or its [B*S, F] rows)
    assert hidden & set(kept[False])
    assert not hidden & set(kept[True])


@pytest.mark.parametrize("kind", ["detr", "deformable"])
def test_encoder_layers_in_eval_mode_ignore_dropout(kind):
    torch.manual_seed(10)
    if kind == "detr":
        make = lambda p: FastTransformerEncoderLayer(TransformerEncoderLayer(16, 2, 32, p))  # noqa: E731
    else:
        make = lambda p: FastDeformableEncoderLayer(DeformableEncoderLayer(16, 32, 1, 2, 2, dropout=p))  # noqa: E731
    with_dropout, without = make(0.5).eval(), make(0.0).eval()
    without.load_state_dict(with_dropout.state_dict())
    src, pos = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    args = (src, None, pos) if kind == "detr" else (src, pos, torch.rand(2, 9, 1, 2), [(3, 3)], None)
    torch.testing.assert_close(with_dropout(*args), without(*args), rtol=0, atol=0)
    assert not torch.equal(with_dropout.train()(*args), without.train()(*args))


def test_transformer_decoder_layer_matches_the_plain_formula_with_its_masks():
    """The fast layer in training mode equals the plain formula with the masks it drew, replayed here."""
    torch.manual_seed(12)
    layer = FastTransformerDecoderLayer(TransformerDecoderLayer(16, 2, 32, 0.3, attention_dropout=0.0)).train()
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)

    torch.manual_seed(13)
    out = layer(tgt, memory, None, None, None)

    # Replay the RNG: the layer draws (seed for dropout1, seed for dropout2, relu_dropout bits, seed for dropout3).
    torch.manual_seed(13)
    keeps = []
    for shape in [(2, 5, 16), (2, 5, 16), (2, 5, 32), (2, 5, 16)]:
        keeps.append(dropout(torch.ones(shape), 0.3, True) != 0 if shape[-1] == 16 else
                     relu_dropout(torch.ones(shape), 0.3, True) != 0)
    scale = 1 / 0.7
    x = layer.norm1(tgt + layer.self_attn(tgt, tgt, tgt) * keeps[0] * scale)
    x = layer.norm2(x + layer.multihead_attn(x, memory, memory) * keeps[1] * scale)
    hidden = F.relu(layer.linear1(x)) * keeps[2] * scale
    x = layer.norm3(x + layer.linear2(hidden) * keeps[3] * scale)
    torch.testing.assert_close(out, x)


def test_feed_forward_in_chunks_without_autograd_equals_the_plain_block():
    """Without autograd on the CPU, long inputs run the feed-forward block in row chunks: same result as the plain
    linear -> ReLU -> linear in float64 (a row count that is not a multiple of the chunk)."""
    torch.manual_seed(0)
    linear1, linear2 = torch.nn.Linear(8, 24).double(), torch.nn.Linear(24, 8).double()
    x = torch.randn(3, 2 * INFERENCE_ROWS + 77, 8, dtype=torch.float64)
    expected = linear2(torch.relu(linear1(x)))
    with torch.no_grad():
        assert _chunked(x.reshape(-1, 8), linear2)
        out = feed_forward(x, linear1, ReLUDropout(0.1).eval(), linear2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_query_pos_inside_msdeformattn_gives_the_plain_sum_gradients():
    """query_pos added inside (the sum recomputed in backward) == the plain module on the sum, outputs and every
    gradient; and the fused projection against finite differences."""
    torch.manual_seed(0)
    plain = MSDeformAttn(16, num_levels=2, num_heads=2, num_points=2).double()
    with torch.no_grad():
        for param in plain.parameters():
            param.normal_(0, 0.3)
    fast = FastMSDeformAttn(plain)
    query, pos = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    value_input = torch.randn(2, 20, 16, dtype=torch.float64)
    reference_points = torch.rand(2, 5, 2, 2, dtype=torch.float64)
    results = []
    for module in (plain, fast):
        inputs = [t.clone().requires_grad_() for t in (query, pos, value_input)]
        q, p, v = inputs
        out = module(q + p, reference_points, v, SHAPES) if module is plain else module(q, reference_points, v, SHAPES, query_pos=p)
        grads = torch.autograd.grad(out.square().sum(), [*inputs, *plain.parameters()])
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0])
    for fast_grad, plain_grad in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(fast_grad, plain_grad)
    a = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True)  # a broadcast addend
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LinearOfSum.apply, (a, b, w, bias))
