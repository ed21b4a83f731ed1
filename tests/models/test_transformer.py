"""DETR transformer: attention vs torch.nn.MultiheadAttention, layers vs plain references written here."""

import pytest
import torch
import torch.nn.functional as F

from detr_kit.models.transformer import MultiheadAttention, Transformer


def plain_attention(attn, query, key, value, key_padding_mask=None):
    """Softmax attention spelled out with explicit per-head loops (float64 friendly)."""
    c = query.shape[-1]
    m = attn.num_heads
    dh = c // m
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = query @ w[:c].T + b[:c]
    k = key @ w[c : 2 * c].T + b[c : 2 * c]
    v = value @ w[2 * c :].T + b[2 * c :]
    heads = []
    for h in range(m):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / dh**0.5  # [B, Lq, Lk]
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        heads.append(scores.softmax(-1) @ v[..., sl])
    return torch.cat(heads, -1) @ attn.out_proj.weight.T + attn.out_proj.bias


def randomize(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = randomize(MultiheadAttention(16, 4))
    reference = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    reference.load_state_dict(ours.state_dict())  # same parameter names and shapes
    query, key = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    value = torch.randn(3, 7, 16)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 4:] = True
    mask[2, 1:] = True
    for q, k, v in ((query, key, value), (key, key, value)):  # cross and self (fused q/k projection)
        expected, _ = reference(q, k, v, key_padding_mask=mask, need_weights=False)
        torch.testing.assert_close(ours(q, k, v, key_padding_mask=mask), expected, atol=1e-5, rtol=1e-5)
    expected, _ = reference(query, key, value, need_weights=False)
    torch.testing.assert_close(ours(query, key, value), expected, atol=1e-5, rtol=1e-5)


def test_attention_dropout_only_in_training():
    attn = MultiheadAttention(8, 2, dropout=0.5)
    x = torch.randn(2, 6, 8)
    attn.eval()
    torch.testing.assert_close(attn(x, x, x), attn(x, x, x))
    attn.train()
    torch.manual_seed(0)
    assert not torch.allclose(attn(x, x, x), attn.eval()(x, x, x))
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)


def test_encoder_and_decoder_layers_match_plain_reference():
    model = randomize(Transformer(16, 2, 1, 1, 32, dropout=0.0)).double().eval()
    torch.manual_seed(2)
    src, pos = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    enc = model.encoder.layers[0]

    def ffn(layer, x):
        return layer.linear2(F.relu(layer.linear1(x)))

    def norm(layer_norm, x):
        return F.layer_norm(x, (16,), layer_norm.weight, layer_norm.bias, 1e-5)

    with torch.no_grad():
        x = norm(enc.norm1, src + plain_attention(enc.self_attn, src + pos, src + pos, src, mask))
        expected_memory = norm(enc.norm2, x + ffn(enc, x))
        torch.testing.assert_close(enc(src, mask, pos), expected_memory)

        dec = model.decoder.layers[0]
        tgt, query_pos = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
        t = norm(dec.norm1, tgt + plain_attention(dec.self_attn, tgt + query_pos, tgt + query_pos, tgt))
        t = norm(dec.norm2, t + plain_attention(dec.multihead_attn, t + query_pos, src + pos, src, mask))
        expected_tgt = norm(dec.norm3, t + ffn(dec, t))
        torch.testing.assert_close(dec(tgt, src, mask, pos, query_pos), expected_tgt)


def test_transformer_shapes_start_and_init():
    torch.manual_seed(0)
    model = Transformer(32, 4, 2, 3, 64, dropout=0.1).eval()
    src, pos = torch.randn(2, 32, 3, 4), torch.randn(2, 32, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    query = torch.randn(5, 32)
    out = model(src, mask, query, pos)
    assert out.shape == (3, 2, 5, 32)
    # Decoder states start at zero, queries enter only as positions; every layer output goes through decoder.norm.
    with torch.no_grad():
        memory = model.encoder(src.flatten(2).transpose(1, 2), mask.flatten(1), pos.flatten(2).transpose(1, 2))
        first = model.decoder.layers[0](torch.zeros(2, 5, 32), memory, mask.flatten(1), pos.flatten(2).transpose(1, 2), query.expand(2, -1, -1))
        torch.testing.assert_close(out[0], model.decoder.norm(first))
    # xavier_uniform_ bound sqrt(6 / (fan_in + fan_out)) on every matrix.
    weight = model.encoder.layers[0].linear1.weight
    assert weight.abs().max() <= (6 / (32 + 64)) ** 0.5
    assert weight.abs().max() > 0.8 * (6 / (32 + 64)) ** 0.5
    names = {n for n, _ in model.named_parameters()}
    assert {"decoder.norm.weight", "decoder.layers.2.multihead_attn.in_proj_weight", "encoder.layers.1.norm2.bias"} <= names
