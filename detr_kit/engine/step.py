"""One optimisation step: AMP autocast, gradient accumulation, clipping and non-finite handling.

:func:`train_step` takes plain objects only (model, criterion, optimizer, batches), so it can be tested and
reused without any config; the :class:`~detr_kit.engine.trainer.Trainer` calls it once per optimizer step.

Reliability rules a step keeps:
- a non-finite loss (on any rank) or, without a GradScaler, a non-finite gradient norm skips the update:
  the gradients are zeroed and the buffers (BatchNorm statistics) put back, so one bad batch changes nothing;
- under DDP only the last micro-batch synchronises gradients, and ``touch_all_outputs`` gives every
  parameter used in the forward pass a (zero) gradient even when a rank's images have no boxes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from detr_kit.engine import distributed as dist_utils
from detr_kit.engine.checkpoint import capture_rng_state, restore_rng_state
from detr_kit.data.loaders import shutdown_workers
from detr_kit.structures import DenoisingOutput, DetectionOutput, ImageBatch, LossOutput, Target

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    """What one optimizer step did.

    ok:        False when the loss (on any rank) or the gradient norm was not finite: no update happened.
    loss:      the total loss of the step (mean over its micro-batches).
    terms:     every logged term (mean over micro-batches), plus ``loss``.
    grad_norm: the gradient norm before clipping (nan when not computed).
    image_ids: the ids of the step's images (for the bad-step diagnostic).
    overflow:  fp16 only: the scaled gradients overflowed, so the GradScaler skipped the update and lowered its
               scale. Routine while the scale settles (the first steps of a run); not a bad batch, so ``ok`` stays
               True and the step counts, but no weight changed.
    """

    ok: bool
    loss: float
    terms: dict[str, float]
    grad_norm: float = float("nan")
    image_ids: list[int] = field(default_factory=list)
    overflow: bool = False


def outputs_sum(output: DetectionOutput) -> torch.Tensor:
    """The sum of every tensor in ``output``; ``0 * this`` gives each used parameter a (zero) gradient."""
    tensors = [output.logits, output.boxes]
    for logits, boxes in output.aux:
        tensors += [logits, boxes]
    if output.encoder is not None:
        tensors += list(output.encoder)
    if output.denoising is not None:
        tensors += [output.denoising.logits, output.denoising.boxes]
    return sum(t.float().sum() for t in tensors)


def outputs_to_float(output: DetectionOutput) -> DetectionOutput:
    """Cast AMP outputs to float32 so that the matcher and the losses run at full precision."""
    aux = tuple((logits.float(), boxes.float()) for logits, boxes in output.aux)
    encoder = None if output.encoder is None else (output.encoder[0].float(), output.encoder[1].float())
    denoising = output.denoising
    if denoising is not None:
        denoising = DenoisingOutput(denoising.logits.float(), denoising.boxes.float(), denoising.num_groups)
    return DetectionOutput(output.logits.float(), output.boxes.float(), aux, encoder, denoising)


def takes_targets(model: nn.Module) -> bool:
    """Whether ``model``'s forward accepts ``targets=`` (a detector with training-time uses of them, such as DINO's
    denoising queries), looking through DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return "targets" in inspect.signature(model.forward).parameters


def run_model(model: nn.Module, batch: ImageBatch, targets: Sequence[Target]) -> DetectionOutput:
    """The training forward pass: ``model(images, mask)``, with ``targets=`` for models that take them."""
    if takes_targets(model):
        return model(batch.images, batch.mask, targets=list(targets))
    return model(batch.images, batch.mask)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for amp "bf16" / "fp16"; a null context for "off"."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp={amp!r} is invalid; allowed: 'off', 'bf16', 'fp16'")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[ImageBatch, Sequence[Target]]],
    device: torch.device,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
    clip_max_norm: float = 0.0,
    touch_all_outputs: bool = False,
) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation when there are several).

    Each micro-batch's loss is divided by the number of micro-batches, so with a mean-reduced loss the
    update equals that of one batch holding all of them. Under DDP only the last micro-batch
    synchronises gradients.

    Args:
        model: the detector (possibly DDP-wrapped), in train mode.
        criterion: ``criterion(output, targets) -> LossOutput``.
        optimizer: the optimizer; its gradients are zeroed before and after the step.
        micro_batches: ``(ImageBatch, targets)`` pairs, on any device.
        device: where the model lives.
        amp: "off", "bf16" or "fp16" autocast of the forward pass.
        scaler: a GradScaler for fp16 (None otherwise).
        clip_max_norm: clip the global gradient norm to this value; 0 = no clipping.
        touch_all_outputs: add ``0 * sum(outputs)`` to the loss, so that under DDP every parameter used in
            the forward pass gets a gradient even when a rank's images have no boxes.

    Returns:
        A :class:`StepResult`; ``ok`` is False (and nothing was updated) for a non-finite loss on any
        rank or, without a scaler, a non-finite gradient norm.
    """
    if not micro_batches:
        raise ValueError("train_step: micro_batches is empty; pass at least one (ImageBatch, targets) pair")
    optimizer.zero_grad(set_to_none=True)
    # Buffers (BatchNorm running statistics and counters) change in the forward pass; a bad step puts them
    # back, so that one non-finite batch cannot poison the model for good.
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    total, terms, image_ids, finite = _accumulate_gradients(
        model, criterion, micro_batches, device, amp, scaler, touch_all_outputs
    )
    finite = dist_utils.all_reduce_min_bool(finite, device)
    if not finite:
        _restore_buffers(saved_buffers)
        optimizer.zero_grad(set_to_none=True)
        return StepResult(False, total, terms, image_ids=image_ids)

    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = clip_max_norm if clip_max_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    overflow = False
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
        scaler.update()
        overflow = scaler.get_scale() < scale  # the scaler backs off only after an overflow
    elif not math.isfinite(grad_norm):
        _restore_buffers(saved_buffers)
        optimizer.zero_grad(set_to_none=True)
        return StepResult(False, total, terms, grad_norm, image_ids)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(True, total, terms, grad_norm, image_ids, overflow)


def _accumulate_gradients(
    model: nn.Module,
    criterion: nn.Module,
    micro_batches: Sequence[tuple[ImageBatch, Sequence[Target]]],
    device: torch.device,
    amp: str,
    scaler: torch.amp.GradScaler | None,
    touch_all_outputs: bool,
) -> tuple[float, dict[str, float], list[int], bool]:
    """Forward and backward every micro-batch (losses divided by their count; under DDP only the last one
    synchronises gradients). Returns the mean loss, the mean terms (with ``loss``), the image ids and whether every
    loss was finite on this rank."""
    count = len(micro_batches)
    finite = True
    terms: dict[str, float] = {}
    total = 0.0
    image_ids: list[int] = []
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for index, (batch, targets) in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        targets = [t.to(device, non_blocking=True) for t in targets]
        image_ids += [int(t.image_id) for t in targets]
        sync = model.no_sync() if is_ddp and index < count - 1 else contextlib.nullcontext()
        with sync:
            with autocast(device, amp):
                output = run_model(model, batch, targets)
            output = outputs_to_float(output)
            result: LossOutput = criterion(output, targets)
            loss = result.loss
            if touch_all_outputs:
                loss = loss + 0.0 * outputs_sum(output)
            loss_value = float(loss.detach())
            finite = finite and math.isfinite(loss_value)
            scaled = loss / count
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss_value / count
        for key, value in result.terms.items():
            terms[key] = terms.get(key, 0.0) + float(value) / count
    terms["loss"] = total
    return total, terms, image_ids, finite


def _restore_buffers(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


def probe_unused_parameters(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable[tuple[ImageBatch, Sequence[Target]]],
    device: torch.device,
    amp: str = "off",
) -> list[str]:
    """Run one forward/backward on the first batch of ``loader`` to find parameters that get no gradient.

    The model's state, its gradients and the RNG (also what drawing the batch consumed) are restored
    afterwards, so the probe changes nothing.

    Args:
        model: the detector (not DDP-wrapped); it is left in train mode.
        criterion: ``criterion(output, targets) -> LossOutput``.
        loader: the training loader; only its first batch is loaded, and its workers are stopped after it.
        device: where the model lives.
        amp: "off", "bf16" or "fp16" autocast of the forward pass.

    Returns:
        The names of this process's trainable parameters without a gradient (see
        ``distributed.unused_parameters``).
    """
    saved_state = copy.deepcopy(model.state_dict())
    saved_rng = capture_rng_state()
    iterator = iter(loader)
    batch, targets = next(iterator)
    shutdown_workers(iterator)
    batch = batch.to(device)
    targets = [t.to(device) for t in targets]
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(device, amp):
        output = run_model(model, batch, targets)
    output = outputs_to_float(output)
    (criterion(output, targets).loss + 0.0 * outputs_sum(output)).backward()
    unused = dist_utils.unused_parameters(model)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved_state)
    restore_rng_state(saved_rng)
    return unused


__all__ = [
    "AMP_DTYPES",
    "StepResult",
    "autocast",
    "outputs_sum",
    "outputs_to_float",
    "probe_unused_parameters",
    "run_model",
    "takes_targets",
    "train_step",
]
