"""Atomic checkpoint files and the random-number-generator state that travels inside them.

A checkpoint is a plain dict (see docs/architecture.md): ``model``, ``optimizer``, ``lr_scheduler``,
``scaler``, ``ema``, ``epoch``, ``step``, ``batch_in_epoch``, ``rng``, ``config``, ``label_map``,
``id2label``, ``metrics``. It is written to a temporary file in the destination folder, flushed and
fsync'ed, then renamed over the old file, so a crash or a full disk never leaves a half-written
``last.pth`` behind: either the old file or the new one is on disk, complete.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from detr_kit.engine.outputs import why_unwritable
from detr_kit.errors import CheckpointError, PickledCodeError, checkpoint_load_error


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder (same file system, so the final rename is
    atomic), which is flushed and fsync'ed before ``os.replace`` puts it in place.

    Raises:
        CheckpointError: when writing fails (e.g. disk full); the previous file at ``path`` is untouched
            and the temporary file is removed.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {str(path)!r} ({why_unwritable(folder, err)})",
                              "choose a writable output folder") from err
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:  # also KeyboardInterrupt: never leave the temporary file behind
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(err, Exception):
            raise CheckpointError(
                f"writing checkpoint {str(path)!r} failed ({type(err).__name__}: {err})",
                "free disk space or choose another output folder; the previous file, if any, is intact",
            ) from err
        raise
    _fsync_folder(folder)
    return path


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files of writes that a killed process (SIGKILL, power loss) left in ``folder``.

    Only names :func:`save_checkpoint` creates (``.<name>.<random>.tmp``) are touched. Call it at start-up,
    while no other process writes checkpoints into ``folder``.
    """
    removed = []
    for path in Path(folder).glob(".*.pth.*.tmp"):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", weights_only: bool = True) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.pth`` file.
        map_location: where tensors go (default CPU; the trainer moves the model afterwards).
        weights_only: refuse pickled code (safe for files from elsewhere); our checkpoints hold only
            tensors and plain Python values. False only for files the user trusts.

    Raises:
        CheckpointError: when ``path`` does not exist, or is truncated, corrupt or not a checkpoint dict.
        PickledCodeError: when the file holds pickled objects that ``weights_only`` refuses.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}", "give the path of a .pth file")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it did not write
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:
        raise checkpoint_load_error(path, err) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict",
                              "give a checkpoint written by detr_kit (tools/train.py or tools/convert.py)")
    return state


# ------------------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """The state of every random generator the training loop draws from (torch, CUDA, NumPy, Python).

    NumPy's state is stored as tensors and ints so that the checkpoint loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [int(version), [int(v) for v in internal], gauss]


def _python_state_from_plain(state: list) -> tuple:
    version, internal, gauss = state
    return (int(version), tuple(int(v) for v in internal), gauss)


__all__ = [
    "CheckpointError",
    "PickledCodeError",
    "capture_rng_state",
    "load_checkpoint",
    "remove_stale_temp_files",
    "restore_rng_state",
    "save_checkpoint",
]
