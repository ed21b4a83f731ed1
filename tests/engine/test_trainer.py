"""The training step (accumulation, non-finite losses, AMP), the optimizer groups and the lr schedule,
and whole Trainer runs on a tiny synthetic config (resume, bad steps, start-up errors)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from detr_kit.engine.optim import LrFactor, build_lr_scheduler, build_optimizer, freeze_untrained
from detr_kit.config import TrainConfig
from detr_kit.engine.step import train_step
from detr_kit.structures import DetectionOutput, ImageBatch, LossOutput, Target

# ---------------------------------------------------------------------------------------------- plain parts


class PlainDetector(nn.Module):
    """One box per image from the mean colour: enough to have real gradients, nothing random."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> DetectionOutput:
        pooled = images.mean(dim=(2, 3))  # [B, 3]
        boxes = self.proj(pooled).sigmoid()[:, None]  # [B, 1, 4]
        return DetectionOutput(boxes.new_zeros(boxes.shape[0], 1, 2), boxes)


class PlainCriterion(nn.Module):
    """Mean over images of the squared error of the single box; optionally NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.poison = False

    def forward(self, output: DetectionOutput, targets: list[Target]) -> LossOutput:
        per_image = torch.stack([((b[0] - t.boxes[0]) ** 2).sum() for b, t in zip(output.boxes, targets)])
        loss = per_image.mean()
        if self.poison:
            loss = loss * float("nan")
        return LossOutput(loss, {"loss_bbox": loss.detach()})


def _batch(seed: int, size: int) -> tuple[ImageBatch, list[Target]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, 8, 8, generator=g)
    targets = [Target(torch.rand(1, 4, generator=g) * 0.5 + 0.25, [0], image_id=seed * 10 + i) for i in range(size)]
    return ImageBatch(images, torch.zeros(size, 8, 8, dtype=torch.bool)), targets


def _split(batch):
    (images, mask), targets = batch
    return [(ImageBatch(images[i : i + 1], mask[i : i + 1]), [targets[i]]) for i in range(len(targets))]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_accumulation_equals_one_big_batch(optimizer_name):
    torch.manual_seed(0)
    model_a = PlainDetector()
    model_b = copy.deepcopy(model_a)

    def make(model):
        if optimizer_name == "sgd":  # SGD is sensitive to the loss scale, so a missing 1/N would show
            return torch.optim.SGD(model.parameters(), lr=0.5)
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)

    opt_a, opt_b = make(model_a), make(model_b)
    criterion = PlainCriterion()
    for seed in range(3):
        big = _batch(seed, 2)
        ra = train_step(model_a, criterion, opt_a, [big], torch.device("cpu"))
        rb = train_step(model_b, criterion, opt_b, _split(big), torch.device("cpu"))
        assert ra.ok and rb.ok
        assert rb.loss == pytest.approx(ra.loss, rel=1e-6)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_accumulation_against_hand_written_sgd():
    torch.manual_seed(0)
    model = PlainDetector()
    w0, b0 = model.proj.weight.detach().clone(), model.proj.bias.detach().clone()
    big = _batch(5, 2)
    # reference: the gradient of the batch-mean loss, in float64, by autograd on a separate copy
    w, b = w0.double().requires_grad_(), b0.double().requires_grad_()
    pooled = big[0].images.double().mean(dim=(2, 3))
    boxes = torch.sigmoid(pooled @ w.T + b)
    target = torch.stack([t.boxes[0] for t in big[1]]).double()
    ((boxes - target) ** 2).sum(-1).mean().backward()
    train_step(model, PlainCriterion(), torch.optim.SGD(model.parameters(), lr=0.3), _split(big), torch.device("cpu"))
    torch.testing.assert_close(model.proj.weight.double(), w0.double() - 0.3 * w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.proj.bias.double(), b0.double() - 0.3 * b.grad, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_skips_the_update():
    model = PlainDetector()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    criterion = PlainCriterion()
    criterion.poison = True
    result = train_step(model, criterion, opt, [_batch(1, 2)], torch.device("cpu"))
    assert not result.ok and math.isnan(result.loss)
    assert result.image_ids == [10, 11]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name])
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == 0  # AdamW never stepped


def test_grad_scaler_overflow_is_reported_and_changes_nothing():
    model = PlainDetector()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # 2**127 times a gradient above 2 overflows float32, as a too-large scale overflows fp16 on a GPU
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    loud = PlainCriterion()
    loud.forward = lambda output, targets: LossOutput(PlainCriterion.forward(loud, output, targets).loss * 1e6, {})
    result = train_step(model, loud, opt, [_batch(1, 2)], torch.device("cpu"), scaler=scaler)
    assert result.ok and result.overflow
    assert scaler.get_scale() == 2.0**126  # backed off once
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name])
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    result = train_step(model, PlainCriterion(), opt, [_batch(1, 2)], torch.device("cpu"), scaler=scaler)
    assert result.ok and not result.overflow
    assert not torch.equal(model.proj.weight, before["proj.weight"])


def test_gradient_clipping_limits_the_update():
    torch.manual_seed(0)
    model = PlainDetector()
    w0 = model.proj.weight.detach().clone()
    result = train_step(model, PlainCriterion(), torch.optim.SGD(model.parameters(), lr=1.0), [_batch(2, 2)],
                        torch.device("cpu"), clip_max_norm=1e-3)
    assert result.grad_norm > 1e-3
    moved = torch.cat([(model.proj.weight - w0).flatten(), model.proj.bias.flatten() * 0]).norm()
    assert moved <= 1e-3 + 1e-6


def test_bf16_autocast_step_on_cpu():
    model = PlainDetector()
    result = train_step(model, PlainCriterion(), torch.optim.AdamW(model.parameters(), lr=1e-3), [_batch(3, 2)],
                        torch.device("cpu"), amp="bf16")
    assert result.ok and math.isfinite(result.loss)
    with pytest.raises(ValueError, match="amp"):
        train_step(model, PlainCriterion(), torch.optim.SGD(model.parameters(), lr=1.0), [_batch(3, 2)],
                   torch.device("cpu"), amp="fp8")


# ---------------------------------------------------------------------------------------------- optimizer


class NamedParts(nn.Module):
    """Parameter names like a Deformable-DETR with a ViT backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.patch_embed = nn.Linear(4, 4)
        self.backbone.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.backbone.norm = nn.LayerNorm(4)
        self.sampling_offsets = nn.Linear(4, 4)
        self.reference_points = nn.Linear(4, 2)
        self.query_embed = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.class_head = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(4)


def _groups_by_param(optimizer):
    return {name: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for name in g["param_names"]}


def test_optimizer_groups():
    model = NamedParts()
    cfg = TrainConfig(lr=1e-3, lr_backbone=1e-4, lr_linear_proj_mult=0.1, weight_decay=0.05,
                      no_weight_decay_on_norm_bias=True, layer_decay=0.5)
    groups = _groups_by_param(build_optimizer(model, cfg))
    assert groups["class_head.weight"] == (1e-3, 0.05)
    assert groups["class_head.bias"] == (1e-3, 0.0)
    assert groups["norm.weight"] == (1e-3, 0.0)
    assert groups["query_embed.weight"] == (1e-3, 0.0)
    assert groups["level_embed"] == (1e-3, 0.0)
    assert groups["sampling_offsets.weight"] == pytest.approx((1e-4, 0.05))
    assert groups["reference_points.bias"] == pytest.approx((1e-4, 0.0))
    # 3 blocks: block i -> 0.5 ** (3 - i); patch embedding -> 0.5 ** 4; the rest of the backbone -> 1
    for i in range(3):
        assert groups[f"backbone.blocks.{i}.weight"] == pytest.approx((1e-4 * 0.5 ** (3 - i), 0.05))
    assert groups["backbone.patch_embed.weight"] == pytest.approx((1e-4 * 0.5**4, 0.05))
    assert groups["backbone.norm.weight"] == pytest.approx((1e-4, 0.0))
    assert len(groups) == len(list(model.parameters()))


def test_zero_backbone_lr_freezes_the_backbone():
    model = NamedParts()
    cfg = TrainConfig(lr=1e-3, lr_backbone=0.0)
    frozen = freeze_untrained(model, cfg)
    assert sorted(frozen) == sorted(n for n, _ in model.named_parameters() if n.startswith("backbone."))
    optimizer = build_optimizer(model, cfg)
    names = set(_groups_by_param(optimizer))
    assert not any(n.startswith("backbone.") for n in names)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert {g["weight_decay"] for g in optimizer.param_groups} == {1e-4}  # decay everywhere by default


def test_step_schedule_with_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, TrainConfig(lr=1.0, epochs=4, lr_drop_epochs=(2, 3), lr_drop_factor=0.1,
                                                 warmup_steps=4), steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.01]
    assert lrs == pytest.approx(expected)


def test_cosine_schedule():
    factor = LrFactor(steps_per_epoch=10, epochs=2, schedule="cosine")
    assert factor(0) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(0.5)
    assert factor(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert factor(20) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        LrFactor(10, 2, schedule="linear")


# ---------------------------------------------------------------------------------------------- whole runs

from pathlib import Path  # noqa: E402

from detr_kit.config import load_config  # noqa: E402
from detr_kit.engine.checkpoint import load_checkpoint  # noqa: E402
from detr_kit.engine.logging import read_metrics  # noqa: E402
from detr_kit.engine.trainer import Trainer, train  # noqa: E402
from detr_kit.errors import OutputError  # noqa: E402

TINY_CONFIG = Path(__file__).with_name("tiny.yaml")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_tiny")


@pytest.fixture()
def tiny_cfg(synthetic_root):
    def make(*overrides: str):
        return load_config(TINY_CONFIG, [f"data.root={synthetic_root}", *overrides])

    return make


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_cfg, tmp_path):
    # one step of 8 images per epoch; the lr warm-up makes the schedule position matter too
    quiet = ("train.eval_every_epochs=0", "train.num_vis_images=0", "train.log_every_steps=0",
             "data.batch_size=8", "train.warmup_steps=3")
    train(tiny_cfg("train.epochs=2", *quiet), tmp_path / "straight", device="cpu")
    train(tiny_cfg("train.epochs=1", *quiet), tmp_path / "split", device="cpu")
    first = load_checkpoint(tmp_path / "split" / "last.pth")
    assert (first["epoch"], first["step"], first["batch_in_epoch"]) == (1, 1, 0)
    result = train(tiny_cfg("train.epochs=2", *quiet), tmp_path / "split", resume=True, device="cpu")
    assert result["step"] == 2 and not result["stopped"]
    a = load_checkpoint(tmp_path / "straight" / "last.pth")
    b = load_checkpoint(tmp_path / "split" / "last.pth")
    assert a["step"] == b["step"] == 2
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0, msg=name)
    for name, value in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][name]["exp_avg"], value["exp_avg"], rtol=0, atol=0)
    # and the uninterrupted weights did move: the comparison above can fail
    assert any(not torch.equal(first["model"][n], v) for n, v in a["model"].items() if v.is_floating_point())


def test_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(tiny_cfg, tmp_path):
    quiet = ("train.eval_every_epochs=0", "train.num_vis_images=0", "train.max_bad_steps=2")
    train(tiny_cfg("train.epochs=1", *quiet), tmp_path, device="cpu")
    good = load_checkpoint(tmp_path / "last.pth")
    trainer = Trainer.create(tiny_cfg("train.epochs=2", *quiet), tmp_path, device="cpu", resume=True)
    real_forward = trainer.criterion.forward

    def poisoned(output, targets):
        result = real_forward(output, targets)
        return LossOutput(result.loss * float("inf"), result.terms)

    trainer.criterion.forward = poisoned
    with pytest.raises(FloatingPointError, match=r"2 consecutive steps.*loss_bbox"):
        trainer.train()
    # no update was applied, and the BatchNorm statistics of the bad forward passes were put back
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, good["model"][name], rtol=0, atol=0, msg=name)
    after = load_checkpoint(tmp_path / "last.pth")  # still the good one, and loadable
    assert after["step"] == good["step"] == 2


def test_bf16_overfit_run_writes_every_artifact(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.epochs=1", "train.amp=bf16", "train.overfit_batches=1", "train.ema=true",
                   "train.num_vis_images=1")
    result = train(cfg, tmp_path, device="cpu")
    records = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"])  # one batch of 4 images = one step
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 1 and 0.0 <= epochs[0]["val/AP"] <= 1.0
    assert result["metrics"]["AP"] == epochs[0]["val/AP"]
    for name in ("config.yaml", "last.pth", "best.pth", "plots/losses.png", "plots/ap.png",
                 "eval/metrics.json", "eval/detections.json"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "vis").glob("epoch_000_*.png"))) == 1
    state = load_checkpoint(tmp_path / "best.pth")
    expected_keys = {"model", "optimizer", "lr_scheduler", "scaler", "ema", "epoch", "step", "rng", "config",
                     "label_map", "id2label", "metrics"}
    assert expected_keys <= set(state)
    assert state["ema"]["updates"] == 1 and state["id2label"] == {0: "circle", 1: "square", 2: "triangle"}
    assert load_config(tmp_path / "config.yaml").train.amp == "bf16"


def test_unwritable_output_folder_fails_at_start_up(tiny_cfg, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputError, match=r"a_file/run is not writable \(.*a_file is a file\) — choose another "
                                          r"folder with --output-dir or train.output_dir"):
        train(tiny_cfg(), tmp_path / "a_file" / "run", device="cpu")
    with pytest.raises(OutputError, match="not writable"):
        train(tiny_cfg(), "/proc/detr_kit_run", device="cpu")  # not creatable, even for root
