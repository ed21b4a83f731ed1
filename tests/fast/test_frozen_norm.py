"""The frozen batch norms folded into a ResNet's convolutions (detr_kit.fast.frozen_norm) against torchvision's
ResNet with plain BatchNorm2d in float64, and the folded convolution under autocast."""

import pytest
import torch
import torchvision

from detr_kit.fast import optimize
from detr_kit.fast.frozen_norm import _ScaledConvolution
from detr_kit.models.backbone.resnet import FrozenBatchNorm2d, ResNetBackbone


def randomize_norms(module, seed=0):
    """Give every (frozen) batch norm non-trivial statistics so that folding errors show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_frozen_norms_match_torchvision_with_batchnorm_in_float64(name):
    """Frozen norms folded into the convolutions: same features and gradients as torchvision's ResNet with plain
    BatchNorm2d in eval mode (an independent reference), with and without autograd, for frozen stages and for
    trained weights (whose scaled weight is recomputed in backward), input gradient included."""
    reference = randomize_norms(getattr(torchvision.models, name)()).double().eval()
    backbone = ResNetBackbone(name, return_strides=(32,), trainable_stages=3).double()
    backbone.body.load_state_dict(reference.state_dict(), strict=False)
    optimize(backbone)
    assert not any(type(m) is FrozenBatchNorm2d for m in backbone.modules())  # every norm folded
    assert backbone.body.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)

    def plain(net, images):
        stem = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        return net.layer4(net.layer3(net.layer2(net.layer1(stem))))

    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x)[0].features, plain(reference, x))
    backbone.train()
    reference.requires_grad_(False)
    for stage in ("layer2", "layer3", "layer4"):
        getattr(reference, stage).requires_grad_(True)
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.requires_grad_(False)  # frozen, as FrozenBatchNorm2d's buffers
    x_ours, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    backbone(x_ours)[0].features.square().sum().backward()
    plain(reference, x_reference).square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_reference.grad)
    ours = dict(backbone.body.named_parameters())
    for key, param in reference.named_parameters():
        if key.startswith("fc.") or not param.requires_grad:
            continue
        assert (ours[key].grad is None) == (param.grad is None), key
        if param.grad is not None:
            torch.testing.assert_close(ours[key].grad, param.grad, msg=key)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_trained_folded_convolution_under_autocast_matches_the_unfolded_form(device_type):
    """A trained conv with its frozen norm folded in (scaled weight + bias, recomputed in backward): under bf16
    autocast it runs in bf16 like F.conv2d would, and its gradients match conv -> affine norm in float32."""
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12, device=device_type, requires_grad=True)
    weight = torch.randn(16, 8, 3, 3, device=device_type, requires_grad=True)
    scale, shift = torch.rand(16, device=device_type) + 0.5, torch.randn(16, device=device_type)
    grad = torch.randn(2, 16, 6, 6, device=device_type)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = _ScaledConvolution.apply(x, weight, scale, shift, (2, 2), (1, 1), (1, 1), 1)
    assert out.dtype == torch.bfloat16
    folded = torch.autograd.grad(out, (x, weight), grad.bfloat16())
    reference_out = torch.nn.functional.conv2d(x, weight, None, 2, 1) * scale[:, None, None] + shift[:, None, None]
    reference = torch.autograd.grad(reference_out, (x, weight), grad)
    torch.testing.assert_close(out.float(), reference_out, atol=0.1, rtol=0.02)
    for ours, plain in zip(folded, reference):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, plain, atol=0.1, rtol=0.02)
