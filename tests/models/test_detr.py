"""The DETR detector: parameter counts, padding invariance, and overfitting one batch."""

import time

import pytest
import torch
from torch import nn

from detr_kit.build import build_model
from detr_kit.config import load_config
from detr_kit.models.backbone.resnet import FrozenBatchNorm2d, ResNetBackbone
from detr_kit.models.criterion import SetCriterion
from detr_kit.models.detr import DETR
from detr_kit.models.matcher import HungarianMatcher
from detr_kit.models.position import LearnedPositionEncoding, SinePositionEncoding
from detr_kit.models.transformer import Transformer
from detr_kit.structures import FeatureMap, Target


class FeaturesAsImages(nn.Module):
    """A 'backbone' that returns its input as the one feature level, to test everything after the backbone."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels, self.strides = (channels,), (32,)

    def forward(self, images, mask):
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        return [FeatureMap(images, mask)]


def tiny_detr(backbone, position="sine", hidden=32, layers=2, dropout=0.0, **kwargs):
    encoding = SinePositionEncoding(hidden // 2) if position == "sine" else LearnedPositionEncoding(hidden // 2, max_size=16)
    transformer = Transformer(hidden, 4, layers, layers, 2 * hidden, dropout)
    return DETR(backbone, encoding, transformer, num_classes=3, num_queries=10, **kwargs)


def outputs_of(output, index):
    """Every tensor of one image in a DetectionOutput, last layer first."""
    pairs = [(output.logits, output.boxes), *output.aux]
    return [t[index] for pair in pairs for t in pair]


@pytest.mark.parametrize("name,total,trainable", [("resnet50", 41_524_768, 41_302_368), ("resnet101", 60_464_672, 60_242_272)])
def test_parameter_counts_match_official_detr(name, total, trainable):
    cfg = load_config("configs/detr_r50.yaml", ["model.num_classes=91", "model.backbone.weights=null", f"model.backbone.name={name}"])
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    keys = set(model.state_dict())
    assert {"backbone.body.conv1.weight", "backbone.body.layer4.2.bn3.running_var", "input_proj.weight",
            "query_embed.weight", "class_embed.bias", "bbox_embed.layers.2.weight", "transformer.decoder.norm.weight",
            "transformer.decoder.layers.5.multihead_attn.in_proj_weight", "transformer.encoder.layers.5.linear2.bias"} <= keys


@pytest.mark.parametrize("position", ["sine", "learned"])
def test_transformer_and_heads_ignore_padding(position):
    torch.manual_seed(0)
    model = tiny_detr(FeaturesAsImages(8), position).eval()
    alone = torch.randn(1, 8, 3, 4)
    batch = torch.randn(2, 8, 5, 6)
    batch[0] = 0
    batch[0, :, :3, :4] = alone[0]
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[0, 3:] = True
    mask[0, :, 4:] = True
    with torch.no_grad():
        single, batched = model(alone), model(batch, mask)
    for a, b in zip(outputs_of(single, 0), outputs_of(batched, 0)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # The padding matters if the mask is dropped: the test can fail.
    with torch.no_grad():
        unmasked = model(batch)
    assert not torch.allclose(unmasked.boxes[0], single.boxes[0], atol=1e-3)


def test_exact_padding_makes_outputs_independent_of_the_batch():
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", trainable_stages=0)
    with torch.no_grad():  # non-trivial frozen statistics, so that padded pixels become non-zero features
        for m in backbone.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.bias.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    model = tiny_detr(backbone, hidden=32, layers=1).eval()
    small = torch.randn(1, 3, 70, 90)
    images = torch.zeros(2, 3, 128, 96)
    images[0, :, :70, :90] = small[0]
    images[1] = torch.randn(3, 128, 96)
    mask = torch.ones(2, 128, 96, dtype=torch.bool)
    mask[0, :70, :90] = False
    mask[1] = False
    with torch.no_grad():
        single = model(small)
        exact = model(images, mask, exact_padding=True)
        plain = model(images, mask)
    for a, b in zip(outputs_of(single, 0), outputs_of(exact, 0)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert (plain.boxes[0] - single.boxes[0]).abs().max() > 1e-3


def test_output_structure_and_errors():
    model = tiny_detr(FeaturesAsImages(8), aux_loss=False).eval()
    out = model(torch.randn(2, 8, 3, 3))
    assert out.logits.shape == (2, 10, 4) and out.boxes.shape == (2, 10, 4) and out.aux == () and out.encoder is None
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    assert model.num_classes == 3 and model.num_queries == 10
    with pytest.raises(ValueError, match="num_pos_feats=16"):
        DETR(FeaturesAsImages(8), SinePositionEncoding(8), Transformer(32, 4, 1, 1, 64, 0.0), 3, 10)
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(2, 8, 3, 3), torch.zeros(2, 3, 4, dtype=torch.bool))


def synthetic_batch():
    """Two 96 x 96 images with filled rectangles, and their targets (cxcywh normalised)."""
    images = torch.full((2, 3, 96, 96), -1.0)
    rects = [[(4, 4, 60, 70, 0), (50, 40, 94, 92, 1)], [(2, 30, 70, 94, 2), (40, 2, 94, 50, 0)]]  # x0, y0, x1, y1, label
    colours = torch.tensor([[1.5, -0.5, -0.5], [-0.5, 1.5, -0.5], [-0.5, -0.5, 1.5]])
    targets = []
    for i, boxes in enumerate(rects):
        cxcywh = []
        for x0, y0, x1, y1, label in boxes:
            images[i, :, y0:y1, x0:x1] = colours[label][:, None, None]
            cxcywh.append([(x0 + x1) / 192, (y0 + y1) / 192, (x1 - x0) / 96, (y1 - y0) / 96])
        targets.append(Target(torch.tensor(cxcywh), torch.tensor([b[4] for b in boxes]), size=(96, 96)))
    return images, targets


def test_overfits_one_batch():
    torch.manual_seed(0)
    # C4 (stride 16) drops layer4, three quarters of resnet18's weights: 4x faster and a 6 x 6 map for 96 px images.
    backbone = ResNetBackbone("resnet18", return_strides=(16,), norm="bn", trainable_stages=5)
    model = tiny_detr(backbone, hidden=64, layers=2).train()
    criterion = SetCriterion(3, HungarianMatcher(), class_weight=1.0, bbox_weight=5.0, giou_weight=2.0, eos_coef=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, foreach=True)
    images, targets = synthetic_batch()
    losses = []
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tiny ops gain nothing from a second thread and lose much on a shared machine
    try:
        for _ in range(50):
            loss = criterion(model(images), targets).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.5 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - start:.1f}s"
