"""Positional encodings against plain float64 loops written here."""

import math

import pytest
import torch

from detr_kit.models.position import LearnedPositionEncoding, SinePositionEncoding


def sine_reference(mask: torch.Tensor, num_feats: int, temperature: float, normalize: bool, scale: float, offset: float):
    """Pixel-by-pixel float64 version of DETR's 2-D sine encoding."""
    batch, height, width = mask.shape
    out = torch.zeros(batch, 2 * num_feats, height, width, dtype=torch.float64)
    for b in range(batch):
        valid = ~mask[b]
        for i in range(height):
            for j in range(width):
                y = float(valid[: i + 1, j].sum())  # valid pixels above and at (i, j) in column j
                x = float(valid[i, : j + 1].sum())
                if normalize:
                    y = (y + offset) / (float(valid[:, j].sum()) + 1e-6) * scale
                    x = (x + offset) / (float(valid[i, :].sum()) + 1e-6) * scale
                for k in range(num_feats):
                    freq = temperature ** (2 * (k // 2) / num_feats)
                    trig = math.sin if k % 2 == 0 else math.cos
                    out[b, k, i, j] = trig(y / freq)
                    out[b, num_feats + k, i, j] = trig(x / freq)
    return out


@pytest.mark.parametrize("normalize,offset", [(True, 0.0), (True, -0.5), (False, 0.0)])
def test_sine_matches_float64_loop(normalize, offset):
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[0, 3:, :] = True  # image 0 is 3 x 5
    mask[0, :, 5:] = True
    mask[1, :, 6:] = True  # image 1 is 5 x 6
    encoding = SinePositionEncoding(8, temperature=100.0, normalize=normalize, scale=2 * math.pi, offset=offset)
    out = encoding(mask)
    assert out.shape == (2, 16, 5, 7) and out.dtype == torch.float32
    expected = sine_reference(mask, 8, 100.0, normalize, 2 * math.pi, offset)
    valid = ~mask[:, None].expand_as(out)
    torch.testing.assert_close(out.double()[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_sine_is_padding_invariant():
    encoding = SinePositionEncoding(16)
    alone = encoding(torch.zeros(1, 4, 6, dtype=torch.bool))
    mask = torch.ones(1, 9, 11, dtype=torch.bool)
    mask[0, :4, :6] = False
    padded = encoding(mask)
    torch.testing.assert_close(padded[..., :4, :6], alone)


def test_sine_rejects_odd_features():
    with pytest.raises(ValueError, match="even"):
        SinePositionEncoding(7)


def test_learned_layout_and_limit():
    encoding = LearnedPositionEncoding(4, max_size=10)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    out = encoding(mask)
    assert out.shape == (2, 8, 3, 5)
    # DETR's order: column (x) embedding in the first half, row (y) embedding in the second.
    for i in range(3):
        for j in range(5):
            torch.testing.assert_close(out[1, :4, i, j], encoding.col_embed.weight[j])
            torch.testing.assert_close(out[1, 4:, i, j], encoding.row_embed.weight[i])
    assert encoding.row_embed.weight.min() >= 0 and encoding.row_embed.weight.max() <= 1  # uniform init
    with pytest.raises(ValueError, match="max_size"):
        encoding(torch.zeros(1, 11, 2, dtype=torch.bool))
