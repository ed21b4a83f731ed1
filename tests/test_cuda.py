"""CUDA paths, checked against the CPU and float64 references; skipped where no GPU is present (CI).

Run on a GPU machine with ``python -m pytest tests/test_cuda.py -q``. What it covers that the CPU suite cannot:
the deformable core on CUDA tensors (grid_sample / embedding_bag CUDA kernels), the models on CUDA against
the same weights on the CPU, the stacked-cost matcher path (the default on CUDA), fp16 GradScaler and bf16
training through the Trainer, a CUDA checkpoint restored on the CPU, the Detector on CUDA, and tools/train.py
under torchrun on the GPU (one process: NCCL refuses two ranks on one device, so a real NCCL group needs two GPUs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from references import bilinear_reference
from tiny_models import TINY_DEFORMABLE, TINY_DETR

from detr_kit.build import build_model
from detr_kit.config import load_config
from detr_kit.models.matcher import HungarianMatcher
from detr_kit.ops.deform_attn import ms_deform_attn
from detr_kit.structures import Target

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY_ENGINE = ROOT / "tests" / "engine" / "tiny.yaml"
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """Compare float32 CUDA results with the CPU at float32 precision (TF32 matmuls would differ by ~1e-3)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _core_inputs(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 9), (4, 5), (1, 3)]
    batch, queries, heads, head_dim, points = 2, 11, 2, 8, 3
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, head_dim, generator=g, dtype=dtype)
    # -0.2..1.2: some samples fall outside the map, some on its border
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=dtype).softmax(-1)
    return value, shapes, locations, weights


@pytest.mark.parametrize("impl", ["auto", "reference", "recompute"])  # the gather kernel is the CPU's
def test_deformable_core_on_cuda_matches_float64_reference(impl):
    value, shapes, locations, weights = _core_inputs(0, torch.float64)
    expected = bilinear_reference(value, shapes, locations, weights)  # [B, Q, M*Dh] float64 on the CPU
    inputs = [t.float().to(CUDA).requires_grad_() for t in (value, locations, weights)]
    with torch.inference_mode():
        inferred = ms_deform_attn(inputs[0].detach(), shapes, inputs[1].detach(), inputs[2].detach(), impl=impl)
    torch.testing.assert_close(inferred.cpu().double(), expected, atol=1e-5, rtol=1e-5)

    trained = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], impl=impl)
    torch.testing.assert_close(trained.detach().cpu().double(), expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    trained.backward(grad_out.float().to(CUDA))

    reference_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    bilinear_reference(reference_inputs[0], shapes, reference_inputs[1], reference_inputs[2]).backward(grad_out)
    for name, ours, ref in zip(("value", "locations", "weights"), inputs, reference_inputs):
        # bilinear gradients w.r.t. locations are piecewise: compare in float32 tolerance
        torch.testing.assert_close(ours.grad.cpu().double(), ref.grad, atol=2e-4, rtol=2e-4, msg=lambda m: f"{name}: {m}")


def test_deformable_core_under_cuda_autocast_returns_autocast_dtype_and_float32_accuracy():
    value, shapes, locations, weights = _core_inputs(2, torch.float64)
    expected = bilinear_reference(value, shapes, locations, weights)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ms_deform_attn(value.float().to(CUDA), shapes, locations.float().to(CUDA), weights.float().to(CUDA))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu().double(), expected, atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "config,overrides",
    [
        ("deformable_detr", TINY_DEFORMABLE),
        ("deformable_detr_two_stage", TINY_DEFORMABLE),
        ("detr_r50", TINY_DETR),
    ],
    ids=["deformable", "deformable_two_stage", "detr"],
)
def test_model_on_cuda_equals_model_on_cpu(config, overrides):
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / f"{config}.yaml", overrides)
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True  # the second image is padded on the right
    with torch.inference_mode():
        on_cpu = model(images, mask)
        on_gpu = model.to(CUDA)(images.to(CUDA), mask.to(CUDA))
    torch.testing.assert_close(on_gpu.logits.cpu(), on_cpu.logits, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(on_gpu.boxes.cpu(), on_cpu.boxes, atol=2e-4, rtol=1e-4)


def test_stacked_matcher_on_cuda_matches_per_image_matcher_on_cpu():
    g = torch.Generator().manual_seed(0)
    batch, queries, classes = 4, 30, 6
    logits = torch.randn(batch, queries, classes + 1, generator=g)
    boxes = torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25
    targets = []
    for count in (0, 3, 7, 1):  # one image without boxes
        cxcy = torch.rand(count, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(count, 2, generator=g) * 0.3 + 0.05
        targets.append(Target(torch.cat([cxcy, wh], 1), torch.randint(0, classes, (count,), generator=g)))
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    per_image = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2, stack_images=False)
    expected = per_image(logits, boxes, targets)
    got = matcher(logits.to(CUDA), boxes.to(CUDA), [t.to(CUDA) for t in targets])  # stacked by default on CUDA
    assert len(got) == batch
    for (query_idx, target_idx), (ref_query, ref_target) in zip(got, expected):
        assert query_idx.device.type == "cuda"
        assert torch.equal(query_idx.cpu(), ref_query) and torch.equal(target_idx.cpu(), ref_target)


def _synthetic_root(tmp_path: Path) -> Path:
    from detr_kit import build

    root = tmp_path / "data"
    build.build_datasets(load_config(TINY_ENGINE, [f"data.root={root}"]))  # generates the images once
    return root


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_trainer_on_cuda_trains_and_its_checkpoint_loads_on_cpu(tmp_path, amp):
    from detr_kit.engine.checkpoint import load_checkpoint
    from detr_kit.engine.trainer import Trainer

    root = _synthetic_root(tmp_path)
    # batch 1: 16 steps, enough for fp16's GradScaler to back off from its initial scale (2**16) and step
    cfg = load_config(TINY_ENGINE, [f"data.root={root}", "train.epochs=2", f"train.amp={amp}", "train.num_vis_images=0",
                                    "data.batch_size=1"])
    trainer = Trainer.create(cfg, tmp_path / "run", device="cuda")
    assert trainer.device.type == "cuda"
    assert (trainer.scaler is not None) == (amp == "fp16")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved, "no parameter changed in two epochs of training"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    state = load_checkpoint(tmp_path / "run" / "last.pth", map_location="cpu")
    on_cpu = build_model(load_config(TINY_ENGINE, [f"data.root={root}"]), num_classes=trainer.model.num_classes)
    on_cpu.load_state_dict(state["model"])
    assert all(t.device.type == "cpu" for t in state["model"].values())
    images = torch.rand(1, 3, 48, 48)
    with torch.inference_mode():
        expected = trainer.model.eval()(images.to(CUDA))
        got = on_cpu.eval()(images)
    torch.testing.assert_close(got.boxes, expected.boxes.cpu(), atol=1e-4, rtol=1e-4)

    # resume on CUDA from that checkpoint: one more epoch
    resumed = Trainer.create(cfg.replace(["train.epochs=3"]), tmp_path / "run", device="cuda", resume=True)
    assert resumed.epoch == 2
    resumed.train()


def test_detector_on_cuda_equals_detector_on_cpu():
    from detr_kit.inference import Detector
    from detr_kit.structures import LabelMap

    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "deformable_detr.yaml", [*TINY_DEFORMABLE, "data.train_scales=[96]", "data.crop_resize_scales=[]", "data.eval_size=96", "data.max_size=128"])
    model = build_model(cfg)
    label_map = LabelMap([1, 2, 3], ["a", "b", "c"])
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h)) for h, w in ((80, 120), (100, 70))]
    on_cpu = Detector(model, cfg, label_map, device="cpu", threshold=0.0)(images)
    on_gpu = Detector(model, cfg, label_map, device="cuda", threshold=0.0)(images)
    for ours, ref in zip(on_gpu, on_cpu):
        torch.testing.assert_close(ours.scores.cpu(), ref.scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.boxes.cpu(), ref.boxes, atol=1e-2, rtol=1e-4)  # pixels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_tools_train_under_torchrun_on_cuda(tmp_path):
    root = _synthetic_root(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
        str(ROOT / "tools" / "train.py"), str(TINY_ENGINE), "--output-dir", str(tmp_path / "run"),
        f"data.root={root}", "train.epochs=1", "train.num_vis_images=0",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "run" / "last.pth").is_file()

