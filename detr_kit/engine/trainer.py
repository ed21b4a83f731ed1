"""The training loop: optimisation, AMP, accumulation, EMA, evaluation, checkpoints and clean stops.

``train(cfg, output_dir, resume)`` is the whole of ``tools/train.py``: it joins the ``torchrun`` process
group (if any), builds a :class:`Trainer` and runs it. The Trainer reads the config once, in its
constructor, and turns it into objects through ``detr_kit.build``; :func:`train_step` below it takes
plain objects only, so it can be tested (and reused) without any config.

Reliability rules this loop keeps:
- a non-finite loss skips its optimizer step (no update, gradients zeroed) and logs the batch's image ids;
  ``train.max_bad_steps`` such steps in a row raise ``FloatingPointError`` with the loss terms, leaving the
  last good checkpoint on disk untouched;
- SIGTERM / SIGINT finish the current step, write ``last.pth`` for that step and return normally; resuming
  continues from that very step, skipping the batches of the epoch that were already done (the sampler
  reshuffles identically from its epoch number);
- checkpoints are written atomically (``engine/checkpoint.py``), by rank 0 only.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from detr_kit.config import Config, save_config
from detr_kit.engine import distributed as dist_utils
from detr_kit.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_writable,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
)
from detr_kit.engine.ema import ModelEMA
from detr_kit.engine.logging import AP_KEYS, MetricsLogger, ProgressBar, Timer
from detr_kit.structures import DetectionOutput, ImageBatch, LabelMap, LossOutput, Target

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
EMA_WARMUP_STEPS = 2000  # time constant of the EMA decay warm-up, in optimizer steps


# ---------------------------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    """What one optimizer step did.

    ok:        False when the loss (on any rank) or the gradient norm was not finite: no update happened.
    loss:      the total loss of the step (mean over its micro-batches).
    terms:     every logged term (mean over micro-batches), plus ``loss``.
    grad_norm: the gradient norm before clipping (nan when not computed).
    image_ids: the ids of the step's images (for the bad-step diagnostic).
    """

    ok: bool
    loss: float
    terms: dict[str, float]
    grad_norm: float = float("nan")
    image_ids: list[int] = field(default_factory=list)


def _outputs_sum(output: DetectionOutput) -> torch.Tensor:
    """The sum of every tensor in ``output``; ``0 * this`` gives each used parameter a (zero) gradient."""
    tensors = [output.logits, output.boxes]
    for logits, boxes in output.aux:
        tensors += [logits, boxes]
    if output.encoder is not None:
        tensors += list(output.encoder)
    return sum(t.float().sum() for t in tensors)


def _to_float(output: DetectionOutput) -> DetectionOutput:
    """Cast AMP outputs to float32 so that the matcher and the losses run at full precision."""
    aux = tuple((logits.float(), boxes.float()) for logits, boxes in output.aux)
    encoder = None if output.encoder is None else (output.encoder[0].float(), output.encoder[1].float())
    return DetectionOutput(output.logits.float(), output.boxes.float(), aux, encoder)


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
                output = model(batch.images, batch.mask)
            output = _to_float(output)
            result: LossOutput = criterion(output, targets)
            loss = result.loss
            if touch_all_outputs:
                loss = loss + 0.0 * _outputs_sum(output)
            loss_value = float(loss.detach())
            finite = finite and math.isfinite(loss_value)
            scaled = loss / count
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss_value / count
        for key, value in result.terms.items():
            terms[key] = terms.get(key, 0.0) + float(value) / count
    terms["loss"] = total
    finite = dist_utils.all_reduce_min_bool(finite, device)
    if not finite:
        _restore(saved_buffers)
        optimizer.zero_grad(set_to_none=True)
        return StepResult(False, total, terms, image_ids=image_ids)

    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = clip_max_norm if clip_max_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    if scaler is not None:
        scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
        scaler.update()
    elif not math.isfinite(grad_norm):
        _restore(saved_buffers)
        optimizer.zero_grad(set_to_none=True)
        return StepResult(False, total, terms, grad_norm, image_ids)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(True, total, terms, grad_norm, image_ids)


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


# ---------------------------------------------------------------------------------------------- helpers


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


class _SkipBatches:
    """A batch sampler that drops the first ``skip`` batches of another one (mid-epoch resume)."""

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.batch_sampler):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


def _loader_skipping(loader: DataLoader, skip: int) -> DataLoader:
    """The same loader without its first ``skip`` batches, which are never loaded."""
    if skip <= 0:
        return loader
    kwargs: dict[str, Any] = dict(
        batch_sampler=_SkipBatches(loader.batch_sampler, skip),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        timeout=loader.timeout,
    )
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(loader.dataset, **kwargs)


def _set_epoch(loader: DataLoader, epoch: int, seed: int, rank: int) -> None:
    """Make the epoch's shuffling and augmentation a function of (seed, epoch, rank) alone.

    The sampler reshuffles from its epoch number; the loader's generator (which seeds the workers) and,
    without workers, the dataset's augmentation pipeline are reseeded, so a run resumed at an epoch
    boundary sees exactly the images and augmentations an uninterrupted run would.
    """
    for sampler in (loader.batch_sampler, loader.sampler):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            break
    epoch_seed = (seed * 1_000_003 + epoch * 1009 + rank) % 2**63
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)
    transforms = getattr(loader.dataset, "transforms", None)
    if loader.num_workers == 0 and transforms is not None and hasattr(transforms, "set_random_seed"):
        from detr_kit.data.transforms import seed_transforms

        seed_transforms(transforms, epoch_seed)


class _WorkerIgnoresStopSignals:
    """DataLoader ``worker_init_fn`` wrapper: workers ignore SIGTERM / SIGINT.

    Schedulers (SLURM, Kubernetes) and Ctrl-C signal the whole process group; a worker killed by it would
    crash the main process in the middle of its clean stop. The main process shuts its workers down itself.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def _shutdown_workers(iterator: Any) -> None:
    """Stop a DataLoader iterator's workers now (they ignore SIGTERM, so they must be told to exit).

    A partly consumed multi-process iterator that is still alive at interpreter exit would otherwise be
    terminated (SIGTERM, ignored) and joined by multiprocessing's exit handler: a hang.
    """
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


class _StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "_StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------- Trainer


class Trainer:
    """Everything a training run needs, built from a config.

    Args:
        cfg: the resolved config.
        output_dir: the run folder (checkpoints, config.yaml, metrics.jsonl, plots/, vis/, tensorboard/).
        device: "cpu", "cuda", ... or None for CUDA when available.
        resume: None/False for a fresh run; True for ``output_dir/last.pth`` if it exists (a fresh start
            otherwise); or the path of a checkpoint to continue from.
        dist_info: the process's place in a torchrun group (from ``init_distributed``); None = single process.

    Raises:
        CheckpointError: when ``output_dir`` is not writable, or the resume checkpoint is corrupt.
        FileNotFoundError: when an explicit resume path does not exist.
    """

    def __init__(
        self,
        cfg: Config,
        output_dir: str | Path,
        device: str | torch.device | None = None,
        resume: str | Path | bool | None = None,
        dist_info: dist_utils.DistributedInfo | None = None,
    ) -> None:
        from detr_kit import build

        self.cfg = cfg
        t = cfg.train
        self.output_dir = check_writable(output_dir)
        if dist_info is None:
            device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
            dist_info = dist_utils.DistributedInfo(device=device)
        self.dist = dist_info
        self.device = dist_info.device
        self.is_main = dist_info.rank == 0
        self.amp = t.amp
        if self.is_main:
            remove_stale_temp_files(self.output_dir)

        seed_everything(t.seed, t.deterministic)
        self.train_dataset, self.val_dataset = build.build_datasets(cfg)
        self.label_map: LabelMap = self.train_dataset.label_map
        self.model = build.build_model(cfg, num_classes=len(self.label_map)).to(self.device)
        if t.init_from:
            try:
                from detr_kit.compat import load_pretrained
            except ImportError as err:
                raise ImportError(
                    f"train.init_from={t.init_from!r} needs detr_kit.compat.load_pretrained, which failed to "
                    f"import ({err}); unset train.init_from or fix the compat package"
                ) from err
            load_pretrained(self.model, t.init_from)
        self.criterion = build.build_criterion(cfg, num_classes=len(self.label_map)).to(self.device)
        self.postprocessor = build.build_postprocessor(cfg)
        self._build_loaders(build)
        self.optimizer = build.build_optimizer(self.model, t)
        self.steps_per_epoch = max(1, math.ceil(len(self.train_loader) / t.accumulate_steps))
        self.lr_scheduler = build.build_lr_scheduler(self.optimizer, t, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if t.amp == "fp16" else None
        self.ema = ModelEMA(self.model, t.ema_decay, EMA_WARMUP_STEPS) if t.ema else None
        # Different augmentation streams per rank; the model was built (identically) before this.
        seed_everything(t.seed + dist_info.rank)

        self.epoch = 0  # the epoch in progress (or the next to start)
        self.step = 0  # optimizer steps done
        self.batch_in_epoch = 0  # batches of ``self.epoch`` already consumed
        self.best_ap = -math.inf
        self.metrics: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        resume_path = self._resume_path(resume)
        if resume_path is not None:
            self._load(resume_path)

        self.train_model = self.model
        if dist_info.enabled:
            unused = self._probe_unused_parameters()
            if unused and self.is_main:
                print(f"DDP: {len(unused)} trainable parameters get no gradient (e.g. {unused[:3]}); "
                      "using find_unused_parameters=True")
            self.train_model = dist_utils.wrap_ddp(self.model, self.device, find_unused_parameters=bool(unused))
        self.logger = MetricsLogger(self.output_dir, enabled=self.is_main)
        if self.is_main:
            save_config(cfg, self.output_dir / "config.yaml")

    # ------------------------------------------------------------------------------------------ set-up

    def _build_loaders(self, build: Any) -> None:
        cfg, d, t = self.cfg, self.cfg.data, self.cfg.train
        rank, world = self.dist.rank, self.dist.world_size
        if t.overfit_batches > 0:
            # The first N batches of the training images, without augmentation, for training and evaluation.
            train_as_eval = self._train_split_with_eval_transforms(build)
            # N batches per rank; a multiple of the world size so that every rank takes as many steps.
            count = min(len(train_as_eval), t.overfit_batches * d.batch_size * world)
            count -= count % world
            subset = Subset(train_as_eval, range(count))
            self.eval_source = train_as_eval
            self.train_loader = build.build_val_loader(subset, d.batch_size, d.num_workers, rank, world)
            self.val_loader = build.build_val_loader(subset, cfg.eval.batch_size, d.num_workers, rank, world)
            self.vis_dataset = subset
        else:
            self.eval_source = self.val_dataset
            self.train_loader = build.build_train_loader(
                self.train_dataset, d.batch_size, d.num_workers, d.aspect_ratio_grouping, t.seed, rank, world
            )
            self.val_loader = build.build_val_loader(self.val_dataset, cfg.eval.batch_size, d.num_workers, rank, world)
            self.vis_dataset = self.val_dataset
        self._shield_workers(self.train_loader)
        self._shield_workers(self.val_loader)

    @staticmethod
    def _shield_workers(loader: DataLoader) -> DataLoader:
        if loader.num_workers > 0 and not isinstance(loader.worker_init_fn, _WorkerIgnoresStopSignals):
            loader.worker_init_fn = _WorkerIgnoresStopSignals(loader.worker_init_fn)
        return loader

    def _train_split_with_eval_transforms(self, build: Any) -> Any:
        """The training split read with the evaluation transforms (no augmentation)."""
        d = self.cfg.data
        same = self.cfg.replace([f"data.val_images={d.train_images}", f"data.val_annotations={d.train_annotations}"])
        _, train_as_eval = build.build_datasets(same)
        return train_as_eval

    def _resume_path(self, resume: str | Path | bool | None) -> Path | None:
        if resume is None or resume is False:
            return None
        if resume is True:
            path = self.output_dir / "last.pth"
            if not path.is_file():
                if self.is_main:
                    print(f"resume: no checkpoint at {path}; starting from scratch")
                return None
            return path
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume checkpoint {str(path)!r} does not exist")
        return path

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        missing = [k for k in ("model", "optimizer", "epoch", "step") if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be resumed from: it has no {missing}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("lr_scheduler") is not None:
            scheduler_state = dict(state["lr_scheduler"])
            # Keep this run's schedule settings (e.g. more epochs); restore only the step counter and lrs.
            scheduler_state["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
            self.lr_scheduler.load_state_dict(scheduler_state)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema = ModelEMA(self.model, self.cfg.train.ema_decay, EMA_WARMUP_STEPS)
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.best_ap = float(state.get("best_ap", -math.inf))
        self.metrics = dict(state.get("metrics") or {})
        if state.get("rng") is not None and self.dist.world_size == 1 and int(state.get("world_size", 1)) == 1:
            restore_rng_state(state["rng"])  # a single process continues its exact random streams
        else:  # only rank 0's streams were saved: give every rank a fresh, distinct one
            seed_everything(self.cfg.train.seed + 1000 * self.step + self.dist.rank)
        self.resumed_from = path
        if self.is_main:
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step}, batch {self.batch_in_epoch} of the epoch")

    def _probe_unused_parameters(self) -> list[str]:
        """Run one forward/backward on a training batch to find parameters that get no gradient.

        The model's state, the gradients and the RNG are restored afterwards, so the probe changes nothing.
        """
        saved_state = copy.deepcopy(self.model.state_dict())
        saved_rng = capture_rng_state()
        iterator = iter(self.train_loader)
        batch, targets = next(iterator)
        _shutdown_workers(iterator)
        batch = batch.to(self.device)
        targets = [t.to(self.device) for t in targets]
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            output = self.model(batch.images, batch.mask)
        output = _to_float(output)
        (self.criterion(output, targets).loss + 0.0 * _outputs_sum(output)).backward()
        unused = dist_utils.unused_parameters(self.model)
        self.model.zero_grad(set_to_none=True)
        self.model.load_state_dict(saved_state)
        restore_rng_state(saved_rng)
        gathered = dist_utils.all_gather_object(unused)
        return sorted({name for names in gathered for name in names})

    # ------------------------------------------------------------------------------------------ checkpoints

    def checkpoint_state(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything needed to continue this run exactly where it is."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "best_ap": self.best_ap,
            "world_size": self.dist.world_size,
            "rng": capture_rng_state(),
            "config": self.cfg.to_dict(),
            "label_map": self.label_map.to_dict(),
            "id2label": self.label_map.id2label,
            "metrics": dict(metrics if metrics is not None else self.metrics),
        }

    def save(self, name: str = "last.pth", metrics: dict[str, Any] | None = None) -> Path | None:
        """Write ``output_dir/name`` (rank 0 only; other ranks return None)."""
        if not self.is_main:
            return None
        return save_checkpoint(self.output_dir / name, self.checkpoint_state(metrics))

    # ------------------------------------------------------------------------------------------ evaluation

    def eval_model(self) -> nn.Module:
        """The weights evaluation and best.pth use: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, epoch: int | None = None) -> dict[str, Any]:
        """COCO bbox metrics of :meth:`eval_model` on the validation loader (every rank takes part)."""
        from detr_kit.engine.evaluator import evaluate

        out_dir = self.output_dir / "eval" if self.is_main else None
        metrics = evaluate(
            self.eval_model(), self.postprocessor, self.val_loader, self.eval_source.coco, self.label_map,
            self.device, amp=self.amp, output_dir=out_dir, exact_padding=self.cfg.eval.exact_padding,
            verbose=self.is_main, backend=self.cfg.eval.backend,
        )
        if self.is_main and epoch is not None and self.cfg.train.num_vis_images > 0:
            self.draw_examples(epoch)
        return metrics

    @torch.no_grad()
    def draw_examples(self, epoch: int) -> list[Path]:
        """Draw the predictions of the first ``train.num_vis_images`` validation images into ``vis/``."""
        from detr_kit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from detr_kit.visualize import draw_detections

        model = self.eval_model()
        was_training = model.training
        model.eval()
        folder = self.output_dir / "vis"
        folder.mkdir(parents=True, exist_ok=True)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        written = []
        try:
            for index in range(min(self.cfg.train.num_vis_images, len(self.vis_dataset))):
                image, target = self.vis_dataset[index]  # [3, h, w] normalised
                with autocast(self.device, self.amp):
                    output = model(image[None].to(self.device), None)
                size = torch.tensor([list(image.shape[-2:])], device=self.device)  # [1, 2] (h, w) of this image
                detections = self.postprocessor(_to_float(output), size)[0].to("cpu")
                keep = detections.scores >= 0.3
                picture = (image.cpu() * std + mean).clamp(0, 1)  # [3, h, w] in 0..1
                drawn = draw_detections(picture, detections.filter(keep), names=list(self.label_map.names))
                path = folder / f"epoch_{epoch:03d}_{int(target.image_id)}.png"
                drawn.save(path)
                written.append(path)
        finally:
            model.train(was_training)
        return written

    # ------------------------------------------------------------------------------------------ training

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[ImageBatch, list[Target]]]:
        _set_epoch(self.train_loader, epoch, self.cfg.train.seed, self.dist.rank)
        return iter(_loader_skipping(self.train_loader, skip))

    def train(self) -> dict[str, Any]:
        """Train until ``train.epochs`` are done or a stop signal arrives.

        Returns:
            ``{"stopped": bool, "epoch", "step", "best_ap", "metrics"}`` (metrics of the last evaluation).

        Raises:
            FloatingPointError: after ``train.max_bad_steps`` consecutive non-finite losses.
        """
        with _StopSignal() as stop:
            try:
                return self._train(stop)
            finally:
                self.logger.close()

    def _train(self, stop: _StopSignal) -> dict[str, Any]:
        t = self.cfg.train
        log = print if self.is_main else (lambda *a, **k: None)
        touch = self.dist.enabled
        bad_in_a_row = 0
        num_batches = len(self.train_loader)
        while self.epoch < t.epochs:
            epoch = self.epoch
            timer = Timer()
            self.train_model.train()
            sums: dict[str, float] = {}
            done_steps = 0
            skipped_steps = 0
            batches = self._epoch_batches(epoch, self.batch_in_epoch)
            start_step_in_epoch = math.ceil(self.batch_in_epoch / t.accumulate_steps)
            bar = ProgressBar(self.steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}", self.is_main,
                              initial=start_step_in_epoch)
            try:
                while True:
                    micro = []
                    for _ in range(t.accumulate_steps):
                        item = next(batches, None)
                        if item is None:
                            break
                        micro.append(item)
                    if not micro:
                        break
                    result = train_step(
                        self.train_model, self.criterion, self.optimizer, micro, self.device,
                        amp=t.amp, scaler=self.scaler, clip_max_norm=t.clip_max_norm, touch_all_outputs=touch,
                    )
                    self.batch_in_epoch += len(micro)
                    if result.ok:
                        bad_in_a_row = 0
                        self.step += 1
                        self.lr_scheduler.step()
                        if self.ema is not None:
                            self.ema.update(self.model)
                        done_steps += 1
                        for key, value in result.terms.items():
                            sums[key] = sums.get(key, 0.0) + value
                    else:
                        bad_in_a_row += 1
                        skipped_steps += 1
                        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.terms.items()))
                        bar.write(f"step {self.step}: non-finite loss or gradient, update skipped "
                                  f"({bad_in_a_row}/{t.max_bad_steps} in a row); images {result.image_ids}; {shown}")
                        if bad_in_a_row >= t.max_bad_steps:
                            raise FloatingPointError(
                                f"{bad_in_a_row} consecutive steps had a non-finite loss or gradient "
                                f"(epoch {epoch}, step {self.step}); last loss terms: {shown}; last images: "
                                f"{result.image_ids}. Lower train.lr, enable train.clip_max_norm, try train.amp=off "
                                f"or bf16, or check those images. The last good checkpoint is "
                                f"{self.output_dir / 'last.pth'} (not overwritten)."
                            )
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.update(result.terms, lr)
                    if result.ok and t.log_every_steps > 0 and self.step % t.log_every_steps == 0:
                        terms = dist_utils.all_reduce_mean(result.terms, self.device)
                        self.logger.log_step(epoch, self.step, lr, terms)
                    if result.ok and t.checkpoint_every_steps > 0 and self.step % t.checkpoint_every_steps == 0:
                        if self.batch_in_epoch < num_batches:
                            self.save("last.pth")
                    if self._should_stop(stop):
                        if self.batch_in_epoch >= num_batches:
                            break  # the epoch is complete: finish it (evaluation, checkpoint) before stopping
                        self.save("last.pth")
                        log(f"\nstopped by {stop.requested or 'a signal on another rank'} at epoch {epoch}, "
                            f"step {self.step}; wrote {self.output_dir / 'last.pth'}. Continue with --resume.")
                        return self._result(stopped=True)
            finally:
                bar.close()
                _shutdown_workers(batches)

            # The epoch is complete.
            means = {f"train/{k}": v / max(1, done_steps) for k, v in sums.items()}
            means = dist_utils.all_reduce_mean(means, self.device)
            self.epoch = epoch + 1
            self.batch_in_epoch = 0
            record: dict[str, Any] = {**means, "time_s": timer.elapsed, "skipped_steps": skipped_steps,
                                      "lr": self.optimizer.param_groups[0]["lr"]}
            evaluated = t.eval_every_epochs > 0 and (self.epoch % t.eval_every_epochs == 0 or self.epoch == t.epochs)
            if evaluated:
                eval_timer = Timer()
                metrics = self.evaluate(epoch)
                self.metrics = {k: metrics[k] for k in AP_KEYS if k in metrics}
                record.update({f"val/{k}": v for k, v in self.metrics.items()})
                record["eval_time_s"] = eval_timer.elapsed
            self.logger.log_epoch(epoch, self.step, record)
            improved = evaluated and self.metrics.get("AP", -math.inf) > self.best_ap
            if improved:
                self.best_ap = self.metrics["AP"]  # before saving, so last.pth resumes with the right best_ap
            self.save("last.pth")
            if improved:
                self.save("best.pth")
            self._print_summary(epoch, record, log)
            if self._should_stop(stop):
                log(f"stopped by {stop.requested or 'a signal on another rank'} after epoch {epoch}; "
                    f"wrote {self.output_dir / 'last.pth'}. Continue with --resume.")
                return self._result(stopped=True)
        return self._result(stopped=False)

    def _should_stop(self, stop: _StopSignal) -> bool:
        if not self.dist.enabled:
            return stop.requested is not None
        return not dist_utils.all_reduce_min_bool(stop.requested is None, self.device)

    def _print_summary(self, epoch: int, record: dict[str, Any], log: Any) -> None:
        losses = ", ".join(
            f"{k.removeprefix('train/')}={v:.4f}" for k, v in record.items()
            if k.startswith("train/") and "aux" not in k and "enc" not in k
        )
        ap = ""
        if "val/AP" in record:
            ap = f" | AP {record['val/AP']:.4f}, AP50 {record['val/AP50']:.4f}, AP75 {record['val/AP75']:.4f}"
        bad_images = len(getattr(self.train_dataset, "bad_images", ()) or ())
        log(f"epoch {epoch + 1}/{self.cfg.train.epochs} done in {record['time_s']:.1f}s "
            f"(step {self.step}) | {losses}{ap} | skipped steps {record['skipped_steps']}, "
            f"skipped bad images {bad_images}")

    def _result(self, stopped: bool) -> dict[str, Any]:
        return {"stopped": stopped, "epoch": self.epoch, "step": self.step, "best_ap": self.best_ap,
                "metrics": dict(self.metrics)}


def default_output_dir(cfg: Config) -> Path:
    """``train.output_dir`` when set, else ``runs/<config name>``."""
    return Path(cfg.train.output_dir) if cfg.train.output_dir else Path("runs") / (cfg.name or "run")


def train(
    cfg: Config,
    output_dir: str | Path | None = None,
    resume: str | Path | bool | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in this process, joining the torchrun group if the environment describes one.

    Args:
        cfg: the resolved config.
        output_dir: the run folder; None = :func:`default_output_dir`.
        resume: see :class:`Trainer`.
        device: see :func:`detr_kit.engine.distributed.init_distributed`.

    Returns:
        :meth:`Trainer.train`'s summary (``stopped`` is True after SIGTERM / SIGINT).
    """
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(cfg)
    check_writable(output_dir)  # before joining a process group: fail fast and everywhere alike
    info = dist_utils.init_distributed(device)
    try:
        trainer = Trainer(cfg, output_dir, resume=resume, dist_info=info)
        result = trainer.train()
        dist_utils.barrier()
        return result
    finally:
        dist_utils.cleanup_distributed()


__all__ = ["StepResult", "Trainer", "autocast", "default_output_dir", "seed_everything", "train", "train_step"]
