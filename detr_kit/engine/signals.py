"""Clean stops: SIGTERM / SIGINT become a flag the training loop checks between steps.

Schedulers (SLURM, Kubernetes) and Ctrl-C signal the whole process group. The main process turns the signal
into a request to stop after the current step (:class:`StopSignal`); DataLoader workers ignore it
(:func:`shield_workers`) and are shut down by the main process itself (``data.loaders.shutdown_workers``).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from torch.utils.data import DataLoader


class WorkerIgnoresStopSignals:
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


def shield_workers(loader: DataLoader) -> DataLoader:
    """Make ``loader``'s worker processes (if any) ignore SIGTERM / SIGINT; returns the same loader."""
    if loader.num_workers > 0 and not isinstance(loader.worker_init_fn, WorkerIgnoresStopSignals):
        loader.worker_init_fn = WorkerIgnoresStopSignals(loader.worker_init_fn)
    return loader


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


__all__ = ["StopSignal", "WorkerIgnoresStopSignals", "shield_workers"]
