"""What a training run reports: a progress bar, ``metrics.jsonl``, TensorBoard and PNG plots.

Everything here is a no-op on ranks other than 0 (pass ``enabled=False``), so the trainer calls it
unconditionally.

``metrics.jsonl`` holds one JSON record per line: ``{"kind": "step", "epoch", "step", "lr", "loss",
<terms>}`` every ``log_every_steps`` optimizer steps and ``{"kind": "epoch", "epoch", "step", "time_s",
<mean train terms as train/...>, <AP numbers as val/...>, <the constant-box baseline's as baseline/...>}`` after each
epoch; ``{"kind": "baseline", "epoch", "step", "AP", "AP50"}`` when a run starts (``engine/baseline.py``). The plots
are redrawn from the records after each epoch: ``plots/losses.png`` (train loss terms per epoch) and
``plots/ap.png`` (AP, AP50, AP75 per evaluated epoch; the baseline's AP and AP50 as dashed lines).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class ProgressBar:
    """A tqdm bar over one epoch's optimizer steps showing the loss terms, lr, it/s and ETA.

    Args:
        total: number of steps in the epoch.
        desc: the prefix, e.g. "epoch 3/50".
        enabled: False on non-zero ranks (then nothing is printed).
        initial: steps already done (a resumed epoch).
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
                             file=sys.stderr, mininterval=1.0)

    def update(self, terms: Mapping[str, float], lr: float) -> None:
        """Advance by one step and show ``loss`` plus the main terms and the lr."""
        if self._bar is None:
            return
        shown = {k: v for k, v in terms.items() if k == "loss" or ("aux" not in k and "enc" not in k and k.startswith("loss"))}
        postfix = {k.removeprefix("loss_") if k != "loss" else k: f"{v:.3f}" for k, v in shown.items()}
        postfix["lr"] = f"{lr:.2e}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is None:
            return
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def track(iterable: Iterable, total: int, desc: str, enabled: bool = True) -> Iterator:
    """A tqdm-wrapped iterable (evaluation loops); the plain iterable when disabled."""
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr))


class MetricsLogger:
    """Writes ``metrics.jsonl``, TensorBoard scalars (when available) and the PNG plots of one run.

    Args:
        output_dir: the run folder.
        enabled: False on non-zero ranks.
        tensorboard: try to open a ``torch.utils.tensorboard`` SummaryWriter in ``output_dir/tensorboard``.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.path = self.output_dir / "metrics.jsonl"
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    def _append(self, record: Mapping[str, Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(_plain(record)) + "\n")

    def log_step(self, epoch: int, step: int, lr: float, terms: Mapping[str, float]) -> None:
        """One record of training terms at optimizer step ``step``."""
        if not self.enabled:
            return
        self._append({"kind": "step", "epoch": epoch, "step": step, "lr": lr, **terms})
        if self._writer is not None:
            for key, value in terms.items():
                self._writer.add_scalar(f"train/{key}", value, step)
            self._writer.add_scalar("train/lr", lr, step)

    def log_baseline(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        """The constant-box baseline's AP numbers, once when a run (or a resumed one) starts."""
        if not self.enabled:
            return
        self._append({"kind": "baseline", "epoch": epoch, "step": step, **metrics})

    def log_epoch(self, epoch: int, step: int, record: Mapping[str, Any]) -> None:
        """One record per epoch (mean train terms, evaluation metrics, times), then redraw the plots."""
        if not self.enabled:
            return
        self._append({"kind": "epoch", "epoch": epoch, "step": step, **record})
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"epoch/{key}", value, epoch)
            self._writer.flush()
        plot_metrics(self.path, self.output_dir / "plots")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(record: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in record.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no NaN/inf
        out[key] = value
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file; a torn last line (a killed run) is ignored."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(metrics_path: str | Path, plots_dir: str | Path) -> list[Path]:
    """Draw ``losses.png`` and ``ap.png`` from the epoch records of ``metrics_path``.

    Returns:
        The files written (``ap.png`` only once some epoch has AP numbers).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = {}
    baseline: dict = {}
    for record in read_metrics(metrics_path):
        if record.get("kind") == "epoch":
            epochs[record["epoch"]] = record  # a resumed epoch overwrites its first attempt
        elif record.get("kind") == "baseline":
            baseline = record  # the latest run's
    if not epochs:
        return []
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    records = [epochs[e] for e in sorted(epochs)]
    written = []

    loss_keys = sorted({k for r in records for k in r if k.startswith("train/loss") and "aux" not in k})
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in loss_keys:
        xs = [r["epoch"] for r in records if isinstance(r.get(key), (int, float))]
        ys = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        ax.plot(xs, ys, marker="o", label=key.removeprefix("train/"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (weighted)")
    ax.set_yscale("log" if all(r.get("train/loss", 1) > 0 for r in records) else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots_dir / "losses.png", dpi=100)
    plt.close(fig)
    written.append(plots_dir / "losses.png")

    evaluated = [r for r in records if isinstance(r.get("val/AP"), (int, float))]
    if evaluated:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("AP", "AP50", "AP75"):
            line, = ax.plot([r["epoch"] for r in evaluated], [r.get(f"val/{key}", float("nan")) for r in evaluated],
                            marker="o", label=key)
            if isinstance(baseline.get(key), (int, float)):
                ax.axhline(baseline[key], color=line.get_color(), linestyle="--", linewidth=1.2,
                           label=f"{key} of a constant box per class")
        ax.set_xlabel("epoch")
        ax.set_ylabel("COCO bbox AP")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plots_dir / "ap.png", dpi=100)
        plt.close(fig)
        written.append(plots_dir / "ap.png")
    return written


class Timer:
    """Wall-clock seconds since construction or the last ``reset``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def reset(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


__all__ = ["AP_KEYS", "MetricsLogger", "ProgressBar", "Timer", "plot_metrics", "read_metrics", "track"]
