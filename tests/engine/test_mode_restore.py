"""Evaluation, example drawing, Detector and EMA leave a model being trained exactly as they found it.

The evaluator, the example drawings and ``Detector`` run a model in eval mode (``evaluation_mode``); a model
trained in between must get back every submodule's train/eval flag, also when the evaluation fails, or its next
training step computes another function (eval-mode dropout, frozen batch-norm statistics switched to training). Each test compares the next training step with that of an untouched copy, on real photographs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from detr_kit.build import build_criterion, build_model, build_postprocessor
from detr_kit.config import Config, load_config
from detr_kit.data.coco import CocoDetection
from detr_kit.data.collate import collate
from detr_kit.data.transforms import eval_transforms
from detr_kit.engine.ema import ModelEMA
from detr_kit.engine.evaluator import evaluate
from detr_kit.engine.examples import draw_examples
from detr_kit.engine.step import train_step
from detr_kit.inference import Detector
from detr_kit.models.backbone.resnet import FrozenBatchNorm2d
from tiny_models import TINY_DEFORMABLE

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
COCO128 = ROOT / "data" / "coco128"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def photographs() -> CocoDetection:
    """coco128's validation photographs at 64..96 px (portrait and landscape: batches of two are padded)."""
    return CocoDetection(COCO128 / "images", COCO128 / "annotations" / "instances_val.json", eval_transforms(64, 96),
                         train=False)


def _model_and_criterion(photographs: CocoDetection, *overrides: str) -> tuple[nn.Module, nn.Module, Config]:
    """A tiny Deformable-DETR with a trained batch-norm ResNet-18 and dropout: train and eval mode differ."""
    cfg = load_config(QUICKSTART, [*TINY_DEFORMABLE, f"model.num_classes={photographs.num_classes}", "model.dropout=0.1",
                                   *overrides])
    torch.manual_seed(0)
    return build_model(cfg), build_criterion(cfg), cfg


def _batch(photographs: CocoDetection, indices: list[int]):  # noqa: ANN202
    return collate([photographs[i] for i in indices])


def _step_and_state(model: nn.Module, criterion: nn.Module, batch) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """One SGD step (without calling model.train(): it must be in the mode it was left in); the new state."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(1)
    assert train_step(model, criterion, optimizer, [batch], torch.device("cpu")).ok
    return {name: value.clone() for name, value in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float rounding (see tests/e2e/test_coco128.py); a mode left behind changes the step's weights by
    1e-3 or more (dropout off, batch-norm statistics)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _partly_frozen(model: nn.Module) -> nn.Module:
    """Train mode, except the backbone kept in eval mode by the caller (frozen batch-norm statistics)."""
    model.train()
    model.backbone.eval()
    return model


class _FailingLoader:
    """Yields the first batch of ``loader``, then raises: an evaluation that breaks half way."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self):  # noqa: ANN204
        yield next(iter(self.loader))
        raise RuntimeError("disk unplugged")


def test_evaluation_that_fails_half_way_restores_every_mode(photographs):
    model, criterion, cfg = _model_and_criterion(photographs)
    model, untouched = _partly_frozen(model), _partly_frozen(copy.deepcopy(model))
    modes = _modes(model)
    loader = DataLoader(Subset(photographs, range(4)), batch_size=2, collate_fn=collate)
    with pytest.raises(RuntimeError, match="disk unplugged"):
        evaluate(model, build_postprocessor(cfg), _FailingLoader(loader), photographs.coco, photographs.label_map,
                 "cpu", verbose=False)
    assert _modes(model) == modes
    batch = _batch(photographs, [0, 1])  # a padded batch: exact padding would change the batch-norm statistics
    _assert_same_state(_step_and_state(model, criterion, batch), _step_and_state(untouched, criterion, batch))


def test_detector_wrapping_a_model_in_training_changes_nothing(photographs):
    model, criterion, cfg = _model_and_criterion(photographs)
    model, untouched = _partly_frozen(model), _partly_frozen(copy.deepcopy(model))
    modes = _modes(model)
    detector = Detector(model, cfg, photographs.label_map, device="cpu", threshold=0.0)
    alone = detector(photographs.image_path(0))
    batched = detector([photographs.image_path(1), photographs.image_path(0)])[1]  # beside a larger image
    torch.testing.assert_close(batched.scores, alone.scores, atol=1e-4, rtol=0)  # exact padding was on
    assert _modes(model) == modes
    batch = _batch(photographs, [0, 1])
    _assert_same_state(_step_and_state(model, criterion, batch), _step_and_state(untouched, criterion, batch))


def test_drawing_examples_restores_every_mode(photographs, tmp_path):
    model, _, cfg = _model_and_criterion(photographs)
    _partly_frozen(model)
    modes = _modes(model)
    written = draw_examples(model, build_postprocessor(cfg), photographs, photographs.label_map.names, tmp_path, 0, 2,
                            torch.device("cpu"))
    assert len(written) == 2 and _modes(model) == modes


def test_ema_copy_evaluated_between_steps_is_its_own_model(photographs):
    """Frozen batch norm folded into its convolutions (the configs' default): the EMA copy's convolutions apply the
    copy's norms, not the live model's; its evaluation under inference_mode leaves nothing the training step sees."""
    model, criterion, cfg = _model_and_criterion(photographs, "model.backbone.norm=frozen_bn")
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms
    ema = ModelEMA(model, decay=0.5, warmup_steps=0)
    loader = DataLoader(Subset(photographs, range(2)), batch_size=2, collate_fn=collate)
    batch = _batch(photographs, [0, 1])
    untouched = copy.deepcopy(model)
    for _ in range(2):
        evaluate(ema.module, build_postprocessor(cfg), loader, photographs.coco, photographs.label_map, "cpu",
                 verbose=False)
        model.train()
        untouched.train()
        _assert_same_state(_step_and_state(model, criterion, batch), _step_and_state(untouched, criterion, batch))
        ema.update(model)
    assert not any(t.is_inference() for t in [*ema.module.parameters(), *ema.module.buffers()])

    with torch.inference_mode():
        before = ema.module(*batch[0]).logits
        for norm in norms:  # the live model's frozen statistics change (e.g. a checkpoint loaded into it)
            norm.running_mean.add_(1.0)
        after = ema.module(*batch[0]).logits
        live = model.eval()(*batch[0]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not torch.allclose(live, before)  # the control: those statistics do matter to the live model

