"""The training loop: epochs, evaluation, EMA, checkpoints, resume and clean stops.

``train(cfg, output_dir, resume)`` is the whole of ``tools/train.py``: it joins the ``torchrun`` process
group (if any), creates a :class:`Trainer` and runs it. ``Trainer.create`` claims the run folder, reads the
checkpoint to resume from, and builds the run's parts once (``engine/setup.py``: data, model, losses, loaders,
optimizer); the Trainer receives them. One optimizer step is :func:`detr_kit.engine.step.train_step`, which takes
plain objects only.

Reliability rules this loop keeps:
- a step with a non-finite loss or gradient is skipped (``engine/step.py``) and its batch's image ids are
  logged; ``train.max_bad_steps`` such steps in a row raise ``FloatingPointError`` with the loss terms,
  leaving the last good checkpoint on disk untouched;
- SIGTERM / SIGINT (``engine/signals.py``) finish the current step, write ``last.pth`` for that step and
  return normally; resuming continues from that very step, skipping the batches of the epoch that were
  already done (``data/loaders.py``: the sampler reshuffles identically from its epoch number);
- checkpoints are written atomically (``engine/checkpoint.py``), by rank 0 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from detr_kit.config import Config, save_config
from detr_kit.engine.baseline import (
    baseline_line,
    constant_box_baseline,
    near_baseline_warning,
    small_dataset_warning,
)
from detr_kit.engine import distributed as dist_utils
from detr_kit.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
)
from detr_kit.engine.ema import ModelEMA
from detr_kit.engine.examples import draw_examples
from detr_kit.data.loaders import loader_skipping, set_epoch, shutdown_workers
from detr_kit.engine.logging import AP_KEYS, MetricsLogger, ProgressBar, Timer
from detr_kit.engine.outputs import check_output_folder, claim_output_folder
from detr_kit.engine.setup import TrainingParts, build_training_parts, seed_everything
from detr_kit.engine.signals import StopSignal
from detr_kit.engine.step import StepResult, probe_unused_parameters, train_step
from detr_kit.errors import CheckpointError, PickledCodeError
from detr_kit.structures import ImageBatch, Target

EMA_WARMUP_STEPS = 2000  # time constant of the EMA decay warm-up, in optimizer steps
OUTPUT_OPTION = "--output-dir or train.output_dir"  # how a user chooses the run folder


# ---------------------------------------------------------------------------------------------- Trainer


@dataclass
class EpochTally:
    """What the steps of one epoch did: summed loss terms of the good steps and the counts."""

    sums: dict[str, float] = field(default_factory=dict)
    done_steps: int = 0
    skipped_steps: int = 0
    overflow_steps: int = 0


class Trainer:
    """A training run: its parts, the run folder, and where it stands (epoch, step, best AP).

    Create one with :meth:`create`, which builds everything from the config.

    Args:
        cfg: the resolved config.
        parts: the data, model, losses, loaders and optimizer of the run (``engine/setup.py``).
        output_dir: the run folder, claimed (checkpoints, config.yaml, metrics.jsonl, plots/, vis/, tensorboard/).
        dist_info: the process's place in a torchrun group (or a single process).
        resume: (path, state) of a checkpoint to continue from, or None for a fresh run.
    """

    def __init__(
        self,
        cfg: Config,
        parts: TrainingParts,
        output_dir: Path,
        dist_info: dist_utils.DistributedInfo,
        resume: tuple[Path, dict[str, Any]] | None = None,
    ) -> None:
        t = cfg.train
        self.cfg, self.parts, self.output_dir = cfg, parts, output_dir
        self.dist, self.device, self.is_main, self.amp = dist_info, dist_info.device, dist_info.rank == 0, t.amp
        self.label_map, self.model, self.criterion = parts.label_map, parts.model, parts.criterion
        self.train_loader, self.val_loader = parts.train_loader, parts.val_loader
        self.optimizer, self.lr_scheduler, self.steps_per_epoch = parts.optimizer, parts.lr_scheduler, parts.steps_per_epoch
        self.scaler = torch.amp.GradScaler(self.device.type) if t.amp == "fp16" else None
        self.ema = ModelEMA(self.model, t.ema_decay, EMA_WARMUP_STEPS) if t.ema else None
        # Different augmentation streams per rank; the model was built (identically) before this.
        seed_everything(t.seed + dist_info.rank)

        self.epoch = 0  # the epoch in progress (or the next to start)
        self.step = 0  # optimizer steps done
        self.batch_in_epoch = 0  # batches of ``self.epoch`` already consumed
        self.best_ap = -math.inf
        self.metrics: dict[str, Any] = {}
        self.baseline: dict[str, float] = {}  # AP and AP50 of the constant-box baseline (engine/baseline.py)
        self._warned_near_baseline = False
        self.resumed_from: Path | None = None
        self._bad_in_a_row = 0  # consecutive steps with a non-finite loss or gradient
        if resume is not None:
            self._load(*resume)

        self.train_model = self.model
        if dist_info.enabled:
            unused = self._probe_unused_parameters()
            if unused and self.is_main:
                print(f"DDP: {len(unused)} trainable parameters get no gradient (e.g. {unused[:3]}); "
                      "using find_unused_parameters=True")
            self.train_model = dist_utils.wrap_ddp(self.model, self.device, find_unused_parameters=bool(unused))
        if self.is_main and t.eval_every_epochs > 0:  # tools/eval.py may write there later, as into its own
            claim_output_folder(self.output_dir / "eval", OUTPUT_OPTION, "tools/train.py")
        self.logger = MetricsLogger(self.output_dir, enabled=self.is_main)
        if self.is_main:
            save_config(cfg, self.output_dir / "config.yaml")

    @classmethod
    def create(
        cls,
        cfg: Config,
        output_dir: str | Path,
        device: str | torch.device | None = None,
        resume: str | Path | bool | None = None,
        dist_info: dist_utils.DistributedInfo | None = None,
    ) -> "Trainer":
        """Claim the run folder, read the checkpoint to resume from (failing before any long work) and build the run.

        Args:
            cfg: the resolved config.
            output_dir: the run folder.
            device: "cpu", "cuda", ... or None for CUDA when available (ignored with ``dist_info``).
            resume: None/False for a fresh run; True for ``output_dir/last.pth`` if it exists (a fresh start
                otherwise); or the path of a checkpoint to continue from.
            dist_info: the process's place in a torchrun group (from ``init_distributed``); None = single process.

        Raises:
            OutputError: when ``output_dir`` is not writable or holds files detr_kit did not write.
            CheckpointError: when the resume checkpoint or ``train.init_from`` is missing or unusable.
            DatasetError, ConfigError: for unusable data or settings.
        """
        output_dir = claim_output_folder(output_dir, OUTPUT_OPTION, "tools/train.py")
        if dist_info is None:
            device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
            dist_info = dist_utils.DistributedInfo(device=device)
        if dist_info.rank == 0:
            remove_stale_temp_files(output_dir)
        resume_path = _resume_path(resume, output_dir, dist_info.rank == 0)
        resume_state = _read_resume_checkpoint(resume_path) if resume_path is not None else None
        init_from = cfg.train.init_from
        if init_from and not Path(init_from).exists():  # before the datasets are read
            raise CheckpointError(f"train.init_from={init_from} does not exist",
                                  "give a detr_kit, official or Hugging Face checkpoint file or folder")
        parts = build_training_parts(cfg, dist_info)
        return cls(cfg, parts, output_dir, dist_info, None if resume_path is None else (resume_path, resume_state))

    # ------------------------------------------------------------------------------------------ set-up

    def _load(self, path: Path, state: dict[str, Any]) -> None:
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
        """The trainable parameters that get no gradient on any rank (one side-effect-free forward/backward)."""
        unused = probe_unused_parameters(self.model, self.criterion, self.train_loader, self.device, self.amp)
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
            self.eval_model(), self.parts.postprocessor, self.val_loader, self.parts.eval_dataset.coco, self.label_map,
            self.device, amp=self.amp, output_dir=out_dir, exact_padding=self.cfg.eval.exact_padding,
            verbose=self.is_main, backend=self.cfg.eval.backend,
        )
        if self.is_main and epoch is not None and self.cfg.train.num_vis_images > 0:
            self.draw_examples(epoch)
        return metrics

    def draw_examples(self, epoch: int) -> list[Path]:
        """Draw the predictions of the first ``train.num_vis_images`` validation images into ``vis/``."""
        return draw_examples(
            self.eval_model(), self.parts.postprocessor, self.parts.vis_dataset, self.label_map.names, self.output_dir / "vis",
            epoch, self.cfg.train.num_vis_images, self.device, self.amp,
        )

    # ------------------------------------------------------------------------------------------ training

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[ImageBatch, list[Target]]]:
        set_epoch(self.train_loader, epoch, self.cfg.train.seed, self.dist.rank)
        return iter(loader_skipping(self.train_loader, skip))

    def train(self) -> dict[str, Any]:
        """Train until ``train.epochs`` are done or a stop signal arrives.

        Returns:
            ``{"stopped": bool, "epoch", "step", "best_ap", "metrics"}`` (metrics of the last evaluation).

        Raises:
            FloatingPointError: after ``train.max_bad_steps`` consecutive non-finite losses.
        """
        with StopSignal() as stop:
            try:
                return self._train(stop)
            finally:
                self.logger.close()

    def _train(self, stop: StopSignal) -> dict[str, Any]:
        log = print if self.is_main else (lambda *a, **k: None)
        if self.epoch < self.cfg.train.epochs:
            self._report_start(log)
        while self.epoch < self.cfg.train.epochs:
            epoch, timer = self.epoch, Timer()
            tally = self._run_epoch(epoch, stop, log)
            if tally is None:  # stopped in the middle of the epoch; last.pth holds the step
                return self._result(stopped=True)
            self._finish_epoch(epoch, tally, timer, log)
            if self._should_stop(stop):
                log(f"stopped by {stop.requested or 'a signal on another rank'} after epoch {epoch}; "
                    f"wrote {self.output_dir / 'last.pth'}. Continue with --resume.")
                return self._result(stopped=True)
        return self._result(stopped=False)

    def _report_start(self, log: Callable[..., None]) -> None:
        """Warn about a random backbone on a small dataset; score, print and log the constant-box baseline."""
        t, m = self.cfg.train, self.cfg.model
        warning = small_dataset_warning(m.backbone.weights, t.init_from, len(self.parts.train_dataset),
                                        self.cfg.data.dataset)
        if warning:
            log(warning)
        if t.overfit_batches > 0 or t.eval_every_epochs <= 0:  # no validation AP to compare it with
            return
        metrics = constant_box_baseline(self.parts.train_dataset.coco, self.parts.eval_dataset.coco, self.label_map,
                                        self.cfg.eval.backend)
        self.baseline = {"AP": metrics["AP"], "AP50": metrics["AP50"]}
        log(baseline_line(metrics))
        self.logger.log_baseline(self.epoch, self.step, self.baseline)

    def _run_epoch(self, epoch: int, stop: StopSignal, log: Callable[..., None]) -> EpochTally | None:
        """The optimizer steps of one epoch (from ``batch_in_epoch`` on); None when a stop signal ended it early."""
        t = self.cfg.train
        num_batches = len(self.train_loader)
        tally = EpochTally()
        self.train_model.train()
        batches = self._epoch_batches(epoch, self.batch_in_epoch)
        bar = ProgressBar(self.steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}", self.is_main,
                          initial=math.ceil(self.batch_in_epoch / t.accumulate_steps))
        try:
            while micro := list(islice(batches, t.accumulate_steps)):  # one optimizer step's batches
                result = train_step(
                    self.train_model, self.criterion, self.optimizer, micro, self.device, amp=t.amp,
                    scaler=self.scaler, clip_max_norm=t.clip_max_norm, touch_all_outputs=self.dist.enabled,
                )
                self.batch_in_epoch += len(micro)
                self._count_step(result, tally, epoch, bar)
                if result.ok and t.checkpoint_every_steps > 0 and self.step % t.checkpoint_every_steps == 0:
                    if self.batch_in_epoch < num_batches:
                        self.save("last.pth")
                if self._should_stop(stop):
                    if self.batch_in_epoch >= num_batches:
                        break  # the epoch is complete: finish it (evaluation, checkpoint) before stopping
                    self.save("last.pth")
                    log(f"\nstopped by {stop.requested or 'a signal on another rank'} at epoch {epoch}, "
                        f"step {self.step}; wrote {self.output_dir / 'last.pth'}. Continue with --resume.")
                    return None
        finally:
            bar.close()
            shutdown_workers(batches)
        return tally

    def _count_step(self, result: StepResult, tally: EpochTally, epoch: int, bar: ProgressBar) -> None:
        """Advance the run by a good step (schedule, EMA, sums, step log) or count a bad one.

        Raises:
            FloatingPointError: after ``train.max_bad_steps`` bad steps in a row (the last checkpoint stays).
        """
        t = self.cfg.train
        if result.ok:
            self._bad_in_a_row = 0
            self.step += 1
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            tally.done_steps += 1
            tally.overflow_steps += result.overflow
            for key, value in result.terms.items():
                tally.sums[key] = tally.sums.get(key, 0.0) + value
        else:
            self._bad_in_a_row += 1
            tally.skipped_steps += 1
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.terms.items()))
            bar.write(f"step {self.step}: non-finite loss or gradient, update skipped "
                      f"({self._bad_in_a_row}/{t.max_bad_steps} in a row); images {result.image_ids}; {shown}")
            if self._bad_in_a_row >= t.max_bad_steps:
                raise FloatingPointError(
                    f"{self._bad_in_a_row} consecutive steps had a non-finite loss or gradient "
                    f"(epoch {epoch}, step {self.step}); last loss terms: {shown}; last images: "
                    f"{result.image_ids}. Lower train.lr, enable train.clip_max_norm, try train.amp=off "
                    f"or bf16, or check those images. The last good checkpoint is "
                    f"{self.output_dir / 'last.pth'} (not overwritten)."
                )
        lr = self.optimizer.param_groups[0]["lr"]
        bar.update(result.terms, lr)
        if result.ok and t.log_every_steps > 0 and self.step % t.log_every_steps == 0:
            self.logger.log_step(epoch, self.step, lr, dist_utils.all_reduce_mean(result.terms, self.device))

    def _finish_epoch(self, epoch: int, tally: EpochTally, timer: Timer, log: Callable[..., None]) -> None:
        """After an epoch's last step: the epoch's means, evaluation, the log record, last.pth and best.pth."""
        t = self.cfg.train
        means = {f"train/{k}": v / max(1, tally.done_steps) for k, v in tally.sums.items()}
        means = dist_utils.all_reduce_mean(means, self.device)
        self.epoch = epoch + 1
        self.batch_in_epoch = 0
        record: dict[str, Any] = {**means, "time_s": timer.elapsed, "skipped_steps": tally.skipped_steps,
                                  **({"fp16_overflow_steps": tally.overflow_steps} if self.scaler is not None else {}),
                                  "lr": self.optimizer.param_groups[0]["lr"]}
        evaluated = t.eval_every_epochs > 0 and (self.epoch % t.eval_every_epochs == 0 or self.epoch == t.epochs)
        if evaluated:
            eval_timer = Timer()
            metrics = self.evaluate(epoch)
            self.metrics = {k: metrics[k] for k in AP_KEYS if k in metrics}
            record.update({f"val/{k}": v for k, v in self.metrics.items()})
            record.update({f"baseline/{k}": v for k, v in self.baseline.items()})
            record["eval_time_s"] = eval_timer.elapsed
        self.logger.log_epoch(epoch, self.step, record)
        improved = evaluated and self.metrics.get("AP", -math.inf) > self.best_ap
        if improved:
            self.best_ap = self.metrics["AP"]  # before saving, so last.pth resumes with the right best_ap
        self.save("last.pth")
        if improved:
            self.save("best.pth")
        self._print_summary(epoch, record, log)
        if evaluated and self.baseline and not self._warned_near_baseline:
            warning = near_baseline_warning(self.epoch, t.epochs, self.metrics["AP"], self.baseline["AP"])
            if warning:
                log(warning)
                self._warned_near_baseline = True

    def _should_stop(self, stop: StopSignal) -> bool:
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
            if "baseline/AP" in record:
                ap += f" (constant-box baseline AP {record['baseline/AP']:.4f}, AP50 {record['baseline/AP50']:.4f})"
        bad_images = len(getattr(self.parts.train_dataset, "bad_images", ()) or ())
        log(f"epoch {epoch + 1}/{self.cfg.train.epochs} done in {record['time_s']:.1f}s "
            f"(step {self.step}) | {losses}{ap} | skipped steps {record['skipped_steps']}, "
            f"skipped bad images {bad_images}"
            + (f", fp16 overflow steps {record['fp16_overflow_steps']}" if "fp16_overflow_steps" in record else ""))

    def _result(self, stopped: bool) -> dict[str, Any]:
        return {"stopped": stopped, "epoch": self.epoch, "step": self.step, "best_ap": self.best_ap,
                "metrics": dict(self.metrics)}


def _resume_path(resume: str | Path | bool | None, output_dir: Path, is_main: bool) -> Path | None:
    """The checkpoint ``resume`` names: None for a fresh run, ``output_dir/last.pth`` for True (if it exists)."""
    if resume is None or resume is False:
        return None
    if resume is True:
        path = output_dir / "last.pth"
        if not path.is_file():
            if is_main:
                print(f"resume: no checkpoint at {path}; starting from scratch")
            return None
        return path
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {str(path)!r} does not exist",
                              "give the last.pth of a run, or --resume alone for <output dir>/last.pth")
    return path


def _read_resume_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = load_checkpoint(path)
    except PickledCodeError as err:
        raise PickledCodeError(err.what, "refused for safety; resume only from checkpoints detr_kit wrote "
                               "(train.init_from with train.init_from_trusted=true starts from its weights)") from err
    missing = [k for k in ("model", "optimizer", "epoch", "step") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be resumed from: it has no {missing}",
                              "resume from a last.pth that tools/train.py wrote, or start from its weights "
                              "with train.init_from")
    return state


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
        resume: see :meth:`Trainer.create`.
        device: see :func:`detr_kit.engine.distributed.init_distributed`.

    Returns:
        :meth:`Trainer.train`'s summary (``stopped`` is True after SIGTERM / SIGINT).
    """
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(cfg)
    check_output_folder(output_dir, OUTPUT_OPTION)  # before joining a process group: fail fast, everywhere alike
    info = dist_utils.init_distributed(device)
    try:
        trainer = Trainer.create(cfg, output_dir, resume=resume, dist_info=info)
        result = trainer.train()
        dist_utils.barrier()
        return result
    finally:
        dist_utils.cleanup_distributed()


__all__ = ["EMA_WARMUP_STEPS", "Trainer", "default_output_dir", "train"]
