"""ResNet backbone, FrozenBatchNorm2d, weight loading and exact padding."""

import pytest
import torch
import torchvision

from detr_kit.errors import CheckpointError
from detr_kit.models.backbone.padding import run_backbone
from detr_kit.models.backbone.resnet import FrozenBatchNorm2d, ResNetBackbone


def randomize_norms(module, seed=0):
    """Give every (frozen) batch norm non-trivial statistics so that padding and loading errors show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def test_frozen_batchnorm_equals_batchnorm_eval():
    bn = randomize_norms(torch.nn.BatchNorm2d(6)).eval()
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is ignored, nothing else missing
    x = torch.randn(2, 6, 5, 4)
    torch.testing.assert_close(frozen(x), bn(x))
    assert not list(frozen.parameters())  # buffers only: never trained, not counted


def test_load_torchvision_state_dict_from_file(tmp_path):
    reference = randomize_norms(torchvision.models.resnet18()).eval()
    path = tmp_path / "r18.pth"
    torch.save({"model": reference.state_dict()}, path)
    backbone = ResNetBackbone("resnet18", return_strides=(8, 16, 32), weights=str(path)).eval()
    assert backbone.load_report.missing == [] and backbone.load_report.unexpected == [] and backbone.load_report.ok
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = backbone(x)
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        c3 = reference.layer2(reference.layer1(stem))
        c5 = reference.layer4(reference.layer3(c3))
    torch.testing.assert_close(outs[0].features, c3, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[2].features, c5, atol=1e-4, rtol=1e-4)

    broken = reference.state_dict()
    del broken["layer1.0.conv1.weight"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match=r"layer1\.0\.conv1\.weight.*extra\.weight"):
        ResNetBackbone("resnet18", weights=str(path))
    with pytest.raises(CheckpointError, match="missing.pth' does not exist"):
        ResNetBackbone("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        ResNetBackbone("resnet18", weights="NOT_A_WEIGHTS_NAME")


def test_levels_channels_strides_and_masks():
    backbone = ResNetBackbone("resnet18", return_strides=(8, 16, 32), norm="bn").eval()
    assert backbone.channels == (128, 256, 512) and backbone.strides == (8, 16, 32)
    mask = torch.ones(2, 64, 64, dtype=torch.bool)
    mask[0, :32, :48] = False
    mask[1] = False
    outs = backbone(torch.randn(2, 3, 64, 64), mask)
    assert [tuple(o.features.shape) for o in outs] == [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    # Nearest resizing to 2 x 2 samples pixels 0 and 32: row 32 is padding (h = 32), column 32 is valid (w = 48).
    expected = torch.tensor([[False, False], [True, True]])
    assert torch.equal(outs[2].mask[0], expected) and not outs[2].mask[1].any()
    assert torch.equal(outs[0].mask[0, :, 6:], torch.ones(8, 2, dtype=torch.bool))  # columns from pixel 48 on
    only_c4 = ResNetBackbone("resnet18", return_strides=(16,))
    assert only_c4.channels == (256,) and not hasattr(only_c4.body, "layer4")


def test_c2_level_is_layer1_output():
    """DINO-5scale reads C2 (stride 4): the output of layer1, computed by hand from the torchvision body."""
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet50", return_strides=(4, 8, 16, 32)).eval()
    assert backbone.channels == (256, 512, 1024, 2048) and backbone.strides == (4, 8, 16, 32)
    images = torch.randn(1, 3, 64, 96)
    body = backbone.body
    with torch.no_grad():
        outs = backbone(images)
        c2 = body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(images)))))
    assert [tuple(o.features.shape[-2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    torch.testing.assert_close(outs[0].features, c2)
    only_c2 = ResNetBackbone("resnet18", return_strides=(4,))
    assert only_c2.channels == (64,) and not hasattr(only_c2.body, "layer2")


def test_dc5_strides():
    backbone = ResNetBackbone("resnet50", return_strides=(8, 16, 16), dilation=True).eval()
    assert backbone.strides == (8, 16, 16) and backbone.channels == (512, 1024, 2048)
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 64))
    assert [o.features.shape[-1] for o in outs] == [8, 4, 4]
    assert ResNetBackbone("resnet50", return_strides=(16,), dilation=True).channels == (2048,)  # DC5's C5
    with pytest.raises(ValueError, match="return_strides"):
        ResNetBackbone("resnet50", return_strides=(32,), dilation=True)
    with pytest.raises(ValueError, match="resnet50"):
        ResNetBackbone("resnet18", dilation=True)


@pytest.mark.parametrize("stages,trainable", [(0, []), (3, ["layer2", "layer3", "layer4"]), (5, ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"])])
def test_trainable_stages(stages, trainable):
    backbone = ResNetBackbone("resnet18", trainable_stages=stages, norm="bn").train()
    trains = {name.split(".")[1] for name, p in backbone.named_parameters() if p.requires_grad}
    assert trains == set(trainable)
    for name, module in backbone.body.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # frozen stages keep their statistics in train mode
            top = name.split(".")[0]
            assert module.training == (top in trainable)


def test_group_norm_and_bad_arguments():
    backbone = ResNetBackbone("resnet18", norm="gn")
    assert isinstance(backbone.body.bn1, torch.nn.GroupNorm) and backbone.body.bn1.num_groups == 32
    for kwargs, match in [({"name": "resnet9"}, "resnet18"), ({"name": "resnet18", "norm": "ln"}, "frozen_bn"),
                          ({"name": "resnet18", "trainable_stages": 6}, "0..5"),
                          ({"name": "resnet18", "return_strides": (2,)}, "return_strides")]:
        with pytest.raises(ValueError, match=match):
            ResNetBackbone(**kwargs)


def test_run_backbone_exact_equals_each_image_alone():
    torch.manual_seed(0)
    backbone = randomize_norms(ResNetBackbone("resnet18", return_strides=(8, 32))).eval()
    sizes = [(70, 90), (128, 96), (70, 90)]
    images = torch.zeros(3, 3, 128, 96)
    mask = torch.ones(3, 128, 96, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w)
        mask[i, :h, :w] = False
    with torch.no_grad():
        exact = run_backbone(backbone, images, mask, exact=True)
        batched = run_backbone(backbone, images, mask, exact=False)
        for i, (h, w) in enumerate(sizes):
            alone = backbone(images[i : i + 1, :, :h, :w].clone(), None)
            for level, ref in zip(exact, alone):
                fh, fw = ref.features.shape[-2:]
                torch.testing.assert_close(level.features[i : i + 1, :, :fh, :fw], ref.features, atol=1e-4, rtol=1e-4)
                assert not level.features[i, :, fh:].any() and not level.features[i, :, :, fw:].any()
                assert not level.mask[i, :fh, :fw].any() and level.mask[i, fh:].all() and level.mask[i, :, fw:].all()
    # The plain batched call sees the padding: the 70 x 90 image's features change.
    fh, fw = alone[-1].features.shape[-2:]
    assert not torch.allclose(batched[-1].features[0, :, :2, :2], exact[-1].features[0, :, :2, :2], atol=1e-3)
