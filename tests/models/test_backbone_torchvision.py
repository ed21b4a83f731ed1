"""torchvision classification backbones: the catalog against torchvision, every family's features against
torchvision's own, the norm and frozen-stage policy, weights from files and torch hub's cache, the offline error,
the fast path, and one family compiled and run on the meta device."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from detr_kit.build import build_model
from detr_kit.config import BACKBONES, load_config
from detr_kit.errors import CheckpointError, ConfigError, run_tool
from detr_kit.fast import optimize
from detr_kit.models.backbone.catalog import FAMILIES, RESNETS, VARIANTS
from detr_kit.models.backbone.resnet import _CHANNELS, FrozenBatchNorm2d, ResNetBackbone
from detr_kit.models.backbone.torchvision_backbone import TorchvisionBackbone

# The smallest network of each family; the two ResNet variants run as ResNetBackbone.
SMALLEST = ["regnet_x_400mf", "regnet_y_400mf", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
            "efficientnet_v2_s", "convnext_tiny", "swin_t", "swin_v2_t"]
RESNET_FAMILY = ["resnext50_32x4d", pytest.param("wide_resnet50_2", marks=pytest.mark.slow)]  # 69 M parameters
SMALL_DETR = ["model.num_classes=3", "model.hidden_dim=32", "model.num_heads=2", "model.num_encoder_layers=1",
              "model.num_decoder_layers=2", "model.dim_feedforward=48", "model.num_queries=12"]


def make_backbone(name: str, **kwargs) -> nn.Module:
    return (ResNetBackbone if name in RESNETS else TorchvisionBackbone)(name, **kwargs)


def randomize_batch_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch norm statistics, so that a norm loaded wrongly or skipped shows in the features."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                shape = norm.weight.shape
                norm.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(shape, generator=generator) * 0.2)
                norm.running_mean.copy_(torch.randn(shape, generator=generator) * 0.2)
                norm.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
    return module


def layers_of(model: nn.Module) -> list[nn.Module]:
    """A torchvision classifier's feature layers in the order they run (everything before its pooling)."""
    if hasattr(model, "trunk_output"):  # RegNet
        return [model.stem, *model.trunk_output]
    if hasattr(model, "features"):
        return list(model.features)
    return [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4]


def stage_outputs(model: nn.Module, images: torch.Tensor, tokens_last: bool) -> dict[int, torch.Tensor]:
    """Output stride -> the output of the last layer at that stride, read off the feature sizes (not the catalog)."""
    x, by_stride = images, {}
    for layer in layers_of(model):
        x = layer(x)
        features = x.permute(0, 3, 1, 2) if tokens_last else x  # [B, C, h, w]
        by_stride[images.shape[-1] // features.shape[-1]] = features  # deeper layers at a stride replace earlier ones
    return by_stride


def nearest_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The mask resized by nearest neighbour, from its definition: output (i, j) reads input (floor(i H/h), floor(j W/w))."""
    height, width = mask.shape[-2:]
    rows = [math.floor(i * height / size[0]) for i in range(size[0])]
    cols = [math.floor(j * width / size[1]) for j in range(size[1])]
    return mask[:, rows][:, :, cols]


def regnet_widths_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's RegNet builders compute their widths with tensors, which fails on the meta device."""
    from torchvision.models.regnet import BlockParams

    original = BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):  # noqa: ANN001, ANN202
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    monkeypatch.setattr(BlockParams, "from_init_params", classmethod(on_cpu))


@pytest.mark.parametrize("name", [n if n in SMALLEST else pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS])
def test_catalog_row_matches_the_torchvision_model(name, monkeypatch):
    """The row's stage ends and channels, measured on the torchvision model itself (meta device, shapes only)."""
    regnet_widths_on_cpu(monkeypatch)
    variant = VARIANTS[name]
    with torch.device("meta"):
        model = torchvision.models.get_model(name)
    x, strides, channels = torch.empty(1, 3, 128, 128, device="meta"), [], []
    for layer in layers_of(model):
        x = layer(x)
        height, num_channels = (x.shape[1], x.shape[3]) if FAMILIES[variant.family].channels_last else x.shape[2:0:-1]
        strides.append(128 // height)
        channels.append(num_channels)
    stem_end = variant.ends[0]
    assert max(strides[:stem_end]) <= 4
    for start, end, stride in zip(variant.ends, variant.ends[1:], (4, 8, 16, 32)):
        assert set(strides[start:end]) == {stride}, strides
    assert variant.ends[-1] == len(strides)  # the last stage runs to the end of the features
    assert variant.channels == tuple(channels[end - 1] for end in variant.ends[2:])


def test_config_lists_every_backbone_and_each_is_a_torchvision_model():
    assert set(RESNETS) == set(_CHANNELS) and set(VARIANTS) | set(RESNETS) <= set(BACKBONES)
    assert set(BACKBONES) - {"vit_tiny", "vit_small", "vit_base"} <= set(torchvision.models.list_models())


@pytest.mark.parametrize("name", [*SMALLEST, *RESNET_FAMILY])
def test_features_equal_torchvision_and_train(name, tmp_path):
    """A saved torchvision state dict (classifier included) loads without leftovers; C3-C5 equal torchvision's own
    stage outputs; masks are the nearest-resized image mask; a training step reaches the trained stages only."""
    torch.manual_seed(0)
    reference = randomize_batch_norms(torchvision.models.get_model(name)).eval()
    path = tmp_path / f"{name}.pth"
    torch.save({"model": reference.state_dict()}, path)
    backbone = make_backbone(name, return_strides=(8, 16, 32), weights=str(path)).eval()
    assert backbone.load_report.ok and backbone.strides == (8, 16, 32)
    reference, backbone = reference.double(), backbone.double()  # float64: frozen and plain BN agree to ~1e-12

    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    mask = torch.ones(2, 64, 96, dtype=torch.bool)
    mask[0, :40, :72] = False
    mask[1] = False
    with torch.no_grad():
        outputs = backbone(images, mask)
        expected = stage_outputs(reference, images, tokens_last=name.startswith("swin"))
    for output, stride, channels in zip(outputs, (8, 16, 32), backbone.channels):
        assert output.features.shape == (2, channels, 64 // stride, 96 // stride)
        torch.testing.assert_close(output.features, expected[stride], atol=1e-9, rtol=1e-9)
        assert torch.equal(output.mask, nearest_mask(mask, (64 // stride, 96 // stride)))
    assert outputs[0].mask[0].any() and not outputs[0].mask[1].any()

    backbone.train()
    trained = [p for p in backbone.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in backbone.parameters()]
    optimizer = torch.optim.SGD(trained, lr=0.1)
    sum(o.features.square().mean() for o in backbone(images, mask)).backward()
    assert all(p.grad is not None for p in trained)  # some may be 0: stochastic depth can drop a block for both images
    optimizer.step()
    changed = [not torch.equal(p, b) for p, b in zip(backbone.parameters(), before)]
    assert sum(changed) > len(trained) // 2 and all(p.requires_grad for c, p in zip(changed, backbone.parameters()) if c)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_x_400mf", "convnext_tiny"])
@pytest.mark.parametrize("trainable_stages", [0, 1, 3, 5])
def test_trainable_stages_freeze_the_shallow_layers(name, trainable_stages):
    """Layers at strides up to 4 / 8 / 16 / 32 freeze for 3 / 2 / 1 / 0 trainable stages (strides measured here)."""
    backbone = TorchvisionBackbone(name, return_strides=(8, 16, 32), trainable_stages=trainable_stages, norm="bn").train()
    deepest_frozen_stride = {5: 0, 3: 4, 1: 16, 0: 32}[trainable_stages]
    x = torch.zeros(1, 3, 64, 64)
    for path in backbone.layer_paths:
        layer = backbone.body.get_submodule(path)
        with torch.no_grad():
            x = layer(x)
        stride = 64 // x.shape[2]
        frozen = stride <= deepest_frozen_stride
        assert all(p.requires_grad != frozen for p in layer.parameters()), (path, stride)
        assert all(m.training != frozen for m in layer.modules()), (path, stride)  # norms, stochastic depth


def test_norm_choice_replaces_every_batch_norm():
    frozen = TorchvisionBackbone("mobilenet_v3_small", norm="frozen_bn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert {m.eps for m in frozen.modules() if isinstance(m, FrozenBatchNorm2d)} == {1e-3}  # MobileNetV3's own eps
    plain = TorchvisionBackbone("mobilenet_v3_small", norm="bn")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == sum(
        isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) > 0
    grouped = TorchvisionBackbone("mobilenet_v3_small", norm="gn")
    groups = {(m.num_groups, m.num_channels) for m in grouped.modules() if isinstance(m, nn.GroupNorm)}
    assert (32, 96) in groups and (8, 72) in groups and (16, 16) in groups  # 32 groups, else gcd(32, C)
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in grouped.modules())
    convnext = TorchvisionBackbone("convnext_tiny", norm="gn")
    assert convnext.norm == "layer_norm" and not any(isinstance(m, nn.GroupNorm) for m in convnext.modules())


def test_stages_deeper_than_needed_are_dropped_and_arguments_checked():
    only_c3 = TorchvisionBackbone("mobilenet_v2", return_strides=(8,))
    assert only_c3.channels == (32,) and len(only_c3.body.features) == 7 and not hasattr(only_c3.body, "classifier")
    assert only_c3(torch.randn(1, 3, 64, 64))[0].features.shape == (1, 32, 8, 8)
    assert TorchvisionBackbone("regnet_y_400mf", return_strides=(16,)).layer_paths[-1] == "trunk_output.block3"
    for kwargs, match in [({"name": "mobilenet_v4"}, "mobilenet_v2"), ({"name": "swin_t", "norm": "ln"}, "frozen_bn"),
                          ({"name": "swin_t", "trainable_stages": 6}, "0..5"),
                          ({"name": "swin_t", "return_strides": (32, 16)}, "ascending"),
                          ({"name": "swin_t", "return_strides": (4,)}, "return_strides")]:
        with pytest.raises(ValueError, match=match):
            TorchvisionBackbone(**kwargs)


# ------------------------------------------------------------------------------------------------ weights


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, and a download that fails as it does without a network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_offline_weights_name_is_one_line_naming_the_file_and_where_to_put_it(name, offline_hub, capsys):
    url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
    file_name = url.rsplit("/", 1)[1]
    with pytest.raises(CheckpointError) as caught:
        make_backbone(name, weights="IMAGENET1K_V1")
    line = caught.value.line()
    assert "\n" not in str(caught.value) and file_name in line and url in line
    assert str(offline_hub / file_name) in line and "local state-dict file" in line and "URLError" in line

    cfg = load_config("configs/deformable_detr.yaml", [*SMALL_DETR, f"model.backbone.name={name}",
                                                      "model.backbone.weights=IMAGENET1K_V1"])
    def build() -> int:
        build_model(cfg)
        return 0

    assert run_tool(build) == 1
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and printed.startswith("error: model.backbone.weights: ") and " — download " in printed


def test_weights_name_reads_torch_hub_cache_without_downloading(offline_hub):
    saved = randomize_batch_norms(torchvision.models.mobilenet_v3_small()).state_dict()
    url = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.url
    offline_hub.mkdir(parents=True)
    torch.save(saved, offline_hub / url.rsplit("/", 1)[1])
    backbone = TorchvisionBackbone("mobilenet_v3_small", return_strides=(8, 16, 32), weights="DEFAULT")
    assert backbone.load_report.ok
    torch.testing.assert_close(backbone.body.features[3].block[0][1].running_var, saved["features.3.block.0.1.running_var"])


def test_bad_weights_are_one_line_errors(tmp_path):
    for name in ("mobilenet_v3_small", "resnet18"):
        with pytest.raises(CheckpointError, match="does not exist") as caught:
            make_backbone(name, weights=str(tmp_path / "missing.pth"))
        assert "\n" not in str(caught.value) and "missing.pth" in caught.value.what
        with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
            make_backbone(name, weights="IMAGENET1K_V9")
    other = tmp_path / "regnet.pth"
    torch.save(torchvision.models.regnet_x_400mf().state_dict(), other)
    with pytest.raises(CheckpointError, match="do not fit mobilenet_v3_small") as caught:
        TorchvisionBackbone("mobilenet_v3_small", weights=str(other))
    assert "\n" not in str(caught.value) and "trunk_output" in caught.value.what
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        TorchvisionBackbone("mobilenet_v3_small", weights=str(broken))


# ------------------------------------------------------------------------------------------------ config, fast path, compile


def test_config_names_the_families_and_suggests_the_closest_name():
    for name in ("resnext50_32x4d", "regnet_y_800mf", "efficientnet_v2_s", "swin_v2_t"):
        assert load_config("configs/detr_r50.yaml", [f"model.backbone.name={name}"]).model.backbone.name == name
    with pytest.raises(ConfigError, match="'mobilenet_v3_large' \\(the closest name\\)") as caught:
        load_config("configs/detr_r50.yaml", ["model.backbone.name=mobilenet_v3_larg"])
    assert "convnext_tiny" in caught.value.fix and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="model.backbone.dilation"):
        load_config("configs/detr_r50.yaml", ["model.backbone.name=convnext_tiny", "model.backbone.dilation=true"])


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "swin_t"])
def test_optimize_folds_frozen_norms_and_keeps_the_function(name):
    backbone = randomize_batch_norms(TorchvisionBackbone(name, return_strides=(8, 16, 32), trainable_stages=5)).double().eval()
    norms = sum(type(m) is FrozenBatchNorm2d for m in backbone.modules())
    images = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = backbone(images)
        state = backbone.state_dict()
        optimize(backbone)
        got = backbone(images)
    assert not any(type(m) is FrozenBatchNorm2d for m in backbone.modules())  # every one folded (none in Swin)
    assert (norms > 0) == (name == "mobilenet_v3_small") and backbone.state_dict().keys() == state.keys()
    stem_weight = backbone.body.features[0][0].weight  # [C, 3, k, k]; Swin's patch embedding, else the stem conv
    assert stem_weight.is_contiguous(memory_format=torch.channels_last) == (name != "swin_t")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.features, b.features, atol=1e-10, rtol=1e-10)


def padded_batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 72, 100, generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.zeros(2, 72, 100, dtype=torch.bool, device=device)
    mask[1, 50:], mask[1, :, 80:] = True, True
    return images, mask


def test_a_detector_on_a_new_family_compiles_to_one_graph():
    """As tests/models/test_compile_and_meta.py does for the shipped configs: no host sync, no data-dependent
    Python control flow in the backbone (nor in the fast path's folded norms)."""
    torch._dynamo.reset()
    cfg = load_config("configs/deformable_detr.yaml", [*SMALL_DETR, "model.backbone.weights=null",
                                                      "model.backbone.name=mobilenet_v3_small",
                                                      "model.deformable.num_proposals=12"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images, mask = padded_batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break raises here
    with torch.no_grad():
        torch.testing.assert_close(compiled(images, mask).boxes, model(images, mask).boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["swin_t", "efficientnet_b0"])
def test_a_full_size_detector_on_a_new_family_runs_on_the_meta_device(name):
    cfg = load_config("configs/deformable_detr.yaml", ["model.num_classes=3", "model.backbone.weights=null",
                                                       f"model.backbone.name={name}"])
    with torch.device("meta"):
        model = build_model(cfg).train()
    output = model(*padded_batch("meta"))
    sum(t.sum() for t in [output.logits, output.boxes, *[t for pair in output.aux for t in pair]]).backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device.type == "meta" for p in trained)
