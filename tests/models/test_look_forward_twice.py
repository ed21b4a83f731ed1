"""Look forward twice (DINO §3.5): layer i's predicted box is layer i's correction applied to layer i-1's box *with*
its gradient, while the reference layer i attends around (and passes on) carries none."""

from __future__ import annotations

import pytest
import torch

from detr_kit.models.deformable import DeformableDecoder, DeformableDecoderLayer
from detr_kit.models.heads import MLP, inverse_sigmoid

HIDDEN, LAYERS, QUERIES = 16, 3, 5


def decoder(look_forward_twice: bool, with_norm: bool = False) -> DeformableDecoder:
    torch.manual_seed(0)
    layer = DeformableDecoderLayer(HIDDEN, 32, num_levels=1, num_heads=2, num_points=2, dropout=0.0)
    heads = [MLP(HIDDEN, HIDDEN, 4, 3) for _ in range(LAYERS)]  # one per layer, random (nonzero) last layers
    norm = None
    if with_norm:  # a random affine: the layers end in a LayerNorm already, so the default one would be an identity
        norm = torch.nn.LayerNorm(HIDDEN)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    return DeformableDecoder(layer, LAYERS, bbox_embed=heads, norm=norm, look_forward_twice=look_forward_twice).double()


def gradient_size(parameter: torch.nn.Parameter) -> float:
    return 0.0 if parameter.grad is None else parameter.grad.abs().sum().item()


def decode(model: DeformableDecoder):
    generator = torch.Generator().manual_seed(1)
    memory = torch.randn(1, 16, HIDDEN, generator=generator, dtype=torch.float64)  # one 4 x 4 level
    tgt = torch.randn(1, QUERIES, HIDDEN, generator=generator, dtype=torch.float64)
    query_pos = torch.randn(1, QUERIES, HIDDEN, generator=generator, dtype=torch.float64)
    boxes = torch.rand(1, QUERIES, 4, generator=generator, dtype=torch.float64) * 0.4 + 0.3
    return model(tgt, boxes, memory, [(4, 4)], torch.ones(1, 1, 2, dtype=torch.float64), query_pos, None)


def test_references_passed_on_carry_no_gradient() -> None:
    out = decode(decoder(look_forward_twice=True))
    assert all(not r.requires_grad for r in out.references[1:])
    assert out.boxes.requires_grad


def test_prediction_trains_the_previous_layers_box_only_with_look_forward_twice() -> None:
    grads = {}
    for flag in (False, True):
        model = decoder(look_forward_twice=flag)
        out = decode(model)
        out.boxes[1].sum().backward()  # the loss of layer 1's prediction
        grads[flag] = [gradient_size(p) for p in model.bbox_embed[0].parameters()]
        assert all(gradient_size(p) > 0 for p in model.bbox_embed[1].parameters())  # layer 1's own head: either way
        assert all(gradient_size(p) == 0 for p in model.bbox_embed[2].parameters())  # nothing reaches layer 2's
    assert all(g == 0 for g in grads[False])  # the detached reference: layer 0's box head gets nothing
    assert all(g > 0 for g in grads[True])  # looked forward twice: it does


def test_prediction_is_the_correction_of_the_previous_undetached_box() -> None:
    """Independently: box_i = sigmoid(head_i(h_i) + logit(box_{i-1})), box_{i-1} = sigmoid(head_{i-1}(h_{i-1}) +
    logit(reference_{i-1})); the values equal the plain refinement's, only the gradient path differs."""
    model = decoder(look_forward_twice=True)
    out = decode(model)
    plain = decode(decoder(look_forward_twice=False))
    torch.testing.assert_close(out.boxes, plain.boxes)
    states = out.hidden_states  # [D, B, Q, C]
    for i in range(1, LAYERS):
        previous = (model.bbox_embed[i - 1](states[i - 1]) + inverse_sigmoid(out.references[i - 1])).sigmoid()
        torch.testing.assert_close(out.references[i], previous.detach())
        expected = (model.bbox_embed[i](states[i]) + inverse_sigmoid(previous)).sigmoid()
        torch.testing.assert_close(out.boxes[i], expected)


@pytest.mark.parametrize("flag", [False, True])
def test_decoder_norm_feeds_the_prediction_not_the_reference(flag: bool) -> None:
    """DINO: the prediction's correction reads the normed state, the reference's the raw layer output."""
    model = decoder(look_forward_twice=flag, with_norm=True)
    out = decode(model)
    normed = out.hidden_states  # after the norm: what the heads read for the predictions
    for i in range(LAYERS):
        # the prediction: the normed state's correction of the reference (same values with and without LFT)
        torch.testing.assert_close(out.boxes[i], (model.bbox_embed[i](normed[i]) + inverse_sigmoid(out.references[i])).sigmoid())
    # the next reference: the raw state's correction, so it is not the prediction
    assert (out.references[1] - out.boxes[0]).abs().max() > 1e-3
