"""Where the tools write, so that no file a user made is ever replaced.

Two rules, checked before any long work starts:

- **Output folders are claimed.** A tool writes into a folder (a training run, ``eval.py --output-dir``,
  ``infer.py --out``, ``check_data.py --out``) only when the folder did not exist, was empty, or holds the
  marker file ``.detr_kit_outputs`` that an earlier claim wrote. Claiming writes that marker, which also proves
  the folder is writable. Inside a claimed folder detr_kit writes and replaces its own outputs (checkpoints,
  metrics, plots); a folder holding anything else is refused, naming the flag that picks another folder.
- **Output files are new.** A single output file (``convert.py --out``, ``export.py --out``) is never written
  over an existing file unless the user passes ``--overwrite``, and never over the tool's own input; it is
  written to a temporary file beside it and renamed into place (:func:`atomic_output`).

A folder made by a detr_kit older than these rules holds no marker; creating an empty ``.detr_kit_outputs`` in
it hands it back to detr_kit.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from detr_kit.errors import OutputError

MARKER = ".detr_kit_outputs"
_LISTED = 5  # foreign names shown in an error


def check_output_folder(folder: str | os.PathLike, option: str) -> Path:
    """Refuse ``folder`` now if claiming it later would fail; creates and writes nothing.

    Lets a tool refuse a bad output folder before long work (e.g. generating a dataset) without leaving a new
    folder behind when that work fails for another reason. Raises what :func:`claim_output_folder` raises,
    except that writability is only checked by permissions here.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is a file", f"choose a folder with {option}")
    names = os.listdir(folder) if folder.is_dir() else []
    if MARKER not in names:
        in_flight = f".{MARKER}."  # the temporary file of another process's claim (atomic_output's name)
        foreign = sorted(name for name in names if not name.startswith(in_flight))
        # Claims write the marker before anything else: one that appeared after the listing (another rank of
        # the same run) makes the folder ours.
        if foreign and not (folder / MARKER).is_file():
            shown = ", ".join(foreign[:_LISTED]) + (f", ... ({len(foreign)} in all)" if len(foreign) > _LISTED else "")
            raise OutputError(
                f"output folder {folder} holds files detr_kit did not write ({shown})",
                f"choose a new or empty folder with {option} (if an older detr_kit made this folder, "
                f"create an empty {MARKER} file in it to let detr_kit write there)",
            )
    existing = _nearest_existing(folder)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} is a file" if not existing.is_dir() else f"{existing} is not writable"
        raise OutputError(f"output folder {folder} is not writable ({reason})", f"choose another folder with {option}")
    return folder


def claim_output_folder(folder: str | os.PathLike, option: str, tool: str = "detr_kit") -> Path:
    """Make ``folder`` (a new, empty or already claimed folder) detr_kit's, or refuse.

    Args:
        folder: the output folder.
        option: the flag or key that chooses it, for the error's fix (e.g. ``"--output-dir"``).
        tool: recorded in the marker (e.g. ``"tools/train.py"``).

    Returns:
        ``folder`` as a Path; it exists, holds the marker and is writable.

    Raises:
        OutputError: the folder is a file, lies under a file, is not writable, or holds files without the
            marker (files detr_kit did not write).
    """
    folder = check_output_folder(folder, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        note = {"written_by": "detr_kit", "tool": tool,
                "note": "detr_kit writes and replaces its outputs in this folder; delete this file to stop that"}
        with atomic_output(folder / MARKER) as tmp:
            tmp.write_text(json.dumps(note, indent=1) + "\n")
    except OSError as err:
        raise OutputError(f"output folder {folder} is not writable ({why_unwritable(folder, err)})",
                          f"choose another folder with {option}") from err
    return folder


def check_output_file(
    path: str | os.PathLike, option: str, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Check that ``path`` may be written: new (or ``overwrite``), not an input, in a writable folder.

    Creates and writes nothing (:func:`atomic_output` makes a missing parent folder when the file is written).

    Args:
        path: the output file.
        option: the flag that names it (e.g. ``"--out"``); the tool must also have ``--overwrite``.
        overwrite: the user allowed replacing an existing file.
        inputs: the files the tool reads; the output may never replace one of them.

    Raises:
        OutputError: naming the path and the flag to change.
    """
    path = Path(path)
    for source in inputs:
        if Path(source).exists() and path.exists() and os.path.samefile(source, path):
            raise OutputError(f"{option} {path} is the input the tool reads", f"choose another file with {option}")
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder", f"name the file to write with {option}, e.g. {path / 'out'}")
    if path.exists() and not overwrite:
        raise OutputError(f"{option} {path} already exists",
                          f"choose another file with {option}, or pass --overwrite to replace it")
    folder = _nearest_existing(path.parent)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        reason = f"{folder} is a file" if not folder.is_dir() else f"{folder} is not writable"
        raise OutputError(f"{option} {path} cannot be written ({reason})", f"choose another file with {option}")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed over ``path``.

    Either the old file or the complete new one is at ``path``, whatever happens; the temporary file is
    removed when the block fails (also on KeyboardInterrupt). Writers that pick a format from the file name
    must be told the format (the temporary name ends in ``.tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes the file private; an output is as open as any new file
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing parent (as given, so that messages keep the user's relative path)."""
    return next(p for p in (path, *path.parents, *path.absolute().parents) if p.exists())


def why_unwritable(folder: str | os.PathLike, err: OSError) -> str:
    """Why ``folder`` cannot be made or written: the file in its way, else the system's reason."""
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file"
            break
    return err.strerror or str(err)


__all__ = [
    "MARKER",
    "atomic_output",
    "check_output_file",
    "check_output_folder",
    "claim_output_folder",
    "why_unwritable",
]
