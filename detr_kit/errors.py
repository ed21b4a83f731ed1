"""The errors a user can cause, and how the tools print them: ``error: <what> — <fix>``, one line, no traceback.

Every problem with an input a user gives (a config key, a checkpoint, a dataset, an output path) raises a
:class:`DetrKitError` that carries ``what`` went wrong (naming the file, record or key) and the ``fix`` (the
flag or key to set, the command to run). ``tools/*.py`` run their work through :func:`run_tool`, which prints
such an error as one line and returns its exit code; any other exception is a bug and keeps its traceback
(``--debug`` shows the traceback of user errors too). Exit codes: 2 when the command line or config must
change (ConfigError, OutputError), 1 when an input file is unusable (CheckpointError, DatasetError).

This module imports nothing beyond the standard library, so every part of detr_kit can raise these errors.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable, Sequence

TRUST_HINT = "refused for safety; pass --trusted if you trust its source"


class DetrKitError(Exception):
    """A user error: ``what`` went wrong (naming the file, record or key) and the ``fix``.

    Args:
        what: the problem, naming the file, record or key.
        fix: what to do about it: a flag or config key to set, a command to run.
        details: further lines (e.g. every problem of a dataset), printed after the first line.
    """

    exit_code = 1

    def __init__(self, what: str, fix: str = "", details: Sequence[str] = ()) -> None:
        super().__init__(what, fix, tuple(details))  # args, so the error pickles (DataLoader workers)
        self.what = what
        self.fix = fix
        self.details = tuple(details)

    def line(self) -> str:
        """``<what> — <fix>``: the one line the tools print after ``error:``."""
        return f"{self.what} — {self.fix}" if self.fix else self.what

    def __str__(self) -> str:
        return "\n".join([self.line(), *(f"  {d}" for d in self.details)])


class ConfigError(DetrKitError, ValueError):
    """A config file or override is invalid; names the file and the key, and suggests the closest valid key."""

    exit_code = 2


class OutputError(DetrKitError):
    """An output path cannot be written, or writing it would replace a file detr_kit did not create."""

    exit_code = 2


class CheckpointError(DetrKitError, RuntimeError):
    """A checkpoint could not be written or read; names the file and the cause."""


class PickledCodeError(CheckpointError):
    """A checkpoint holds pickled objects beyond tensors and plain values, so it was not loaded (it could run code)."""


class DatasetError(DetrKitError, ValueError):
    """A dataset cannot be used as given; names the folder, file or record, and the fix."""


def run_tool(body: Callable[[], int], debug: bool = False) -> int:
    """Run a tool's work; print a user error as ``error: <what> — <fix>`` (stderr) and return its exit code.

    Args:
        body: the tool's work, returning its exit code.
        debug: re-raise user errors (with their traceback) instead of printing one line.
    """
    try:
        return body()
    except DetrKitError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def _is_plain_pickle(path: str | Path) -> bool:
    """Whether ``path`` starts as ``pickle.dump`` writes (protocol 3-5); torch.save writes a zip (or protocol 2)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and head[1] in (3, 4, 5)


def checkpoint_load_error(path: str | Path, err: Exception) -> CheckpointError:
    """The error for a ``torch.load`` that failed: pickled code refused by ``weights_only``, or a broken file."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(err))
    if refused:
        return PickledCodeError(f"checkpoint {str(path)!r} holds pickled code (GLOBAL {refused.group(1)})", TRUST_HINT)
    message = " ".join(str(err).split())
    if _is_plain_pickle(path):  # pickle.dump's output: torch.load reads no such file
        return CheckpointError(f"checkpoint {str(path)!r} is a plain pickle, not a file written by torch.save",
                               "save the state dict with torch.save(state_dict, path), or give another checkpoint")
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        reason = "the file is empty, 0 bytes"
    elif message.startswith("Weights only load failed"):  # torch's advice on weights_only does not apply
        reason = "unreadable pickle data"
    else:
        reason = f"{type(err).__name__}: {message.split('. ')[0][:160]}" if message else type(err).__name__
    return CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated ({reason})",
                           "copy it again, or use another checkpoint")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DetrKitError",
    "OutputError",
    "PickledCodeError",
    "TRUST_HINT",
    "checkpoint_load_error",
    "run_tool",
]
