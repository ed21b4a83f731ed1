"""Every user error is one line, ``error: <what> — <fix>``, before any work: the bad-input table.

Each bad input (config typo, wrong type, missing config, missing dataset, missing checkpoint, an output under a
file, a checkpoint that runs code when unpickled, a broken dataset, the user's data with data.dataset=synthetic,
an output that is an existing file) goes to every tool it applies to; the exact line and exit code are pinned,
and every key and flag a hint names must exist. Run this file as a script to print the table (markdown) from
real subprocess runs: ``PYTHONPATH=. python tests/test_user_errors.py``.
"""

from __future__ import annotations

import re
import shutil
import sys
import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

from user_files import (
    TINY_CONFIG,
    RunsCodeWhenLoaded,
    load_tool,
    make_broken_data,
    make_user_data,
    run_tool,
    save_tiny_checkpoint,
)

COCO = ["data.dataset=coco", "data.train_images=images", "data.val_images=images",
        "data.train_annotations=train.json", "data.val_annotations=val.json"]
UNDER_A_FILE = "is not writable (a_file is a file)"
PICKLED = "checkpoint 'evil.pth' holds pickled code (GLOBAL posix.mkdir) — refused for safety"
TRUSTED = f"error: {PICKLED}; pass --trusted if you trust its source"
NOT_OURS = ("holds files detr_kit did not write, and data.dataset=synthetic would write shapes there — set "
            "data.dataset=coco to train on them, or point data.root at an empty folder")
NO_CONFIG = "error: nope.yaml: config file not found — pass the path of a YAML config, e.g. one of configs/*.yaml"
EXISTS = "already exists — choose another file with --out, or pass --overwrite to replace it"
MISSING_DATA = ("error: data.root=no_data: dataset not found (no folder no_data) — point data.root at your COCO-format "
                "data (data.train_images, data.train_annotations, data.val_images and data.val_annotations are "
                "relative to it), or get COCO 2017 from https://cocodataset.org/#download (data.dataset=synthetic "
                "needs no download)")
BROKEN_SUMMARY = ("7 problem(s) make this dataset unusable (duplicate_image_id x1, unknown_category x1, "
                  "duplicate_annotation_id x1, bad_bbox x1, unknown_image x1, bad_record x1, missing_image x1)")
BROKEN = (f"error: broken/train.json: {BROKEN_SUMMARY}; broken/val.json: {BROKEN_SUMMARY} — fix them; the dataset "
          "doctor lists each with its fix: python tools/check_data.py --images broken/images --annotations "
          "broken/train.json and python tools/check_data.py --images broken/images --annotations broken/val.json")
BROKEN_VAL = (f"error: broken/val.json: {BROKEN_SUMMARY} — fix them; the dataset doctor lists each with its fix: "
              "python tools/check_data.py --images broken/images --annotations broken/val.json")  # eval reads val only
AUG = ["--images", "my_data/images", "--annotations", "my_data/train.json", "--show-aug", "1"]


class Case(NamedTuple):
    bad_input: str
    tool: str
    args: list[str]
    exit_code: int
    line: str  # the first line starting with "error:" on stderr (the doctor: a line of its report on stdout)


CASES = [
    Case("config key typo", "train.py", ["tiny.yaml", "train.lr_drop=5", "--output-dir", "runs/t"], 2,
         "error: tiny.yaml (command-line override 'train.lr_drop=5'): unknown key 'train.lr_drop' — did you mean "
         "'train.lr_drop_factor'?"),
    Case("config key typo", "eval.py", ["tiny.yaml", "eval.batch_sise=4", "--checkpoint", "tiny.pth"], 2,
         "error: tiny.yaml (command-line override 'eval.batch_sise=4'): unknown key 'eval.batch_sise' — did you "
         "mean 'eval.batch_size'?"),
    Case("config key typo (in the file)", "train.py", ["typo.yaml", "--output-dir", "runs/t"], 2,
         "error: typo.yaml: unknown key 'train.epoch' — did you mean 'train.epochs'?"),
    Case("config key typo (in the file)", "convert.py", ["official.pth", "--out", "c.pth", "--config", "typo.yaml"], 2,
         "error: typo.yaml: unknown key 'train.epoch' — did you mean 'train.epochs'?"),
    Case("config key typo (in the file)", "check_data.py", [*AUG, "--out", "aug", "--config", "typo.yaml"], 2,
         "error: typo.yaml: unknown key 'train.epoch' — did you mean 'train.epochs'?"),
    Case("wrong type", "train.py", ["tiny.yaml", "train.epochs=many", "--output-dir", "runs/t"], 2,
         "error: tiny.yaml: train.epochs must be int, got 'many' — set train.epochs to int"),
    Case("wrong type", "eval.py", ["tiny.yaml", "eval.batch_size=1.5", "--checkpoint", "tiny.pth"], 2,
         "error: tiny.yaml: eval.batch_size must be int, got 1.5 — set eval.batch_size to int"),
    Case("missing config file", "train.py", ["nope.yaml"], 2, NO_CONFIG),
    Case("missing config file", "eval.py", ["nope.yaml", "--checkpoint", "tiny.pth"], 2, NO_CONFIG),
    Case("missing config file", "convert.py", ["official.pth", "--out", "c.pth", "--config", "nope.yaml"], 2, NO_CONFIG),
    Case("missing config file", "check_data.py", [*AUG, "--out", "aug", "--config", "nope.yaml"], 2, NO_CONFIG),
    Case("missing dataset folder", "train.py", ["tiny.yaml", "data.dataset=coco", "data.root=no_data",
                                                "--output-dir", "runs/t"], 1, MISSING_DATA),
    Case("missing dataset folder", "eval.py", ["tiny.yaml", "data.dataset=coco", "data.root=no_data",
                                               "--checkpoint", "tiny.pth", "--output-dir", "ev"], 1, MISSING_DATA),
    Case("missing dataset folder", "check_data.py", ["--images", "no_data/images", "--annotations", "my_data/train.json"],
         1, "error: --images no_data/images does not exist — pass the folder the json's file_name entries are relative "
            "to with --images"),
    Case("missing dataset folder", "infer.py", ["--checkpoint", "tiny.pth", "no_data/images", "--out", "pred"], 1,
         "error: no image files found in no_data/images — give image files, folders or glob patterns"),
    Case("missing checkpoint", "train.py", ["tiny.yaml", "data.root=synth", "--resume", "nope.pth",
                                            "--output-dir", "runs/t"], 1,
         "error: --resume 'nope.pth' does not exist — give the last.pth of a run, or --resume alone for "
         "<output dir>/last.pth"),
    Case("missing checkpoint", "train.py", ["tiny.yaml", "data.root=synth", "train.init_from=nope.pth",
                                            "--output-dir", "runs/t"], 1,
         "error: train.init_from=nope.pth does not exist — give a detr_kit, official or Hugging Face checkpoint "
         "file or folder"),
    Case("missing checkpoint", "eval.py", ["tiny.yaml", "data.root=synth", "--checkpoint", "nope.pth"], 1,
         "error: checkpoint 'nope.pth' does not exist — give the path of a .pth file"),
    Case("missing checkpoint", "infer.py", ["--checkpoint", "nope.pth", "my_data/images", "--out", "pred"], 1,
         "error: checkpoint 'nope.pth' does not exist — give the path of a .pth file"),
    Case("missing checkpoint", "export.py", ["--checkpoint", "nope.pth", "--format", "onnx", "--out", "x.onnx"], 1,
         "error: checkpoint 'nope.pth' does not exist — give the path of a .pth file"),
    Case("missing checkpoint", "convert.py", ["nope.pth", "--out", "c.pth"], 1,
         "error: checkpoint 'nope.pth' does not exist — give the path of a checkpoint file or folder"),
    Case("output under a file", "train.py", ["tiny.yaml", "data.root=synth", "--output-dir", "a_file/run"], 2,
         f"error: output folder a_file/run {UNDER_A_FILE} — choose another folder with --output-dir or train.output_dir"),
    Case("output under a file", "eval.py", ["tiny.yaml", "data.root=synth", "--checkpoint", "tiny.pth",
                                            "--output-dir", "a_file/eval"], 2,
         f"error: output folder a_file/eval {UNDER_A_FILE} — choose another folder with --output-dir"),
    Case("output under a file", "infer.py", ["--checkpoint", "tiny.pth", "my_data/images", "--out", "a_file/pred"], 2,
         f"error: output folder a_file/pred {UNDER_A_FILE} — choose another folder with --out"),
    Case("output under a file", "export.py", ["--checkpoint", "tiny.pth", "--format", "onnx", "--out", "a_file/x.onnx"],
         2, "error: --out a_file/x.onnx cannot be written (a_file is a file) — choose another file with --out"),
    Case("output under a file", "convert.py", ["official.pth", "--out", "a_file/c.pth"], 2,
         "error: --out a_file/c.pth cannot be written (a_file is a file) — choose another file with --out"),
    Case("output under a file", "check_data.py", [*AUG, "--out", "a_file/aug"], 2,
         f"error: output folder a_file/aug {UNDER_A_FILE} — choose another folder with --out"),
    Case("malicious pickle", "train.py", ["tiny.yaml", "data.root=synth", "--resume", "evil.pth",
                                          "--output-dir", "runs/t"], 1,
         f"error: {PICKLED}; resume only from checkpoints detr_kit wrote (train.init_from with "
         "train.init_from_trusted=true starts from its weights)"),
    Case("malicious pickle", "train.py", ["tiny.yaml", "data.root=synth", "train.init_from=evil.pth",
                                          "--output-dir", "runs/t"], 1,
         f"error: train.init_from: {PICKLED}; set train.init_from_trusted=true if you trust its source"),
    Case("malicious pickle", "eval.py", ["tiny.yaml", "data.root=synth", "--checkpoint", "evil.pth"], 1, TRUSTED),
    Case("malicious pickle", "infer.py", ["--checkpoint", "evil.pth", "my_data/images", "--out", "pred"], 1, TRUSTED),
    Case("malicious pickle", "export.py", ["--checkpoint", "evil.pth", "--format", "onnx", "--out", "x.onnx"], 1, TRUSTED),
    Case("malicious pickle", "convert.py", ["evil.pth", "--out", "c.pth"], 1, TRUSTED),
    Case("broken dataset (7 problems)", "train.py", ["tiny.yaml", *COCO, "data.root=broken", "--output-dir", "runs/t"],
         1, BROKEN),
    Case("broken dataset (7 problems)", "eval.py", ["tiny.yaml", *COCO, "data.root=broken", "--checkpoint", "tiny.pth",
                                                    "--output-dir", "ev"], 1, BROKEN_VAL),
    Case("broken dataset (7 problems)", "check_data.py", ["--images", "broken/images", "--annotations", "broken/train.json"],
         1, "7 errors, 1 warnings"),
    Case("user data, data.dataset=synthetic", "train.py", ["tiny.yaml", "data.root=my_data", "--output-dir", "runs/t"],
         1, f"error: data.root=my_data {NOT_OURS}"),
    Case("user data, data.dataset=synthetic", "eval.py", ["tiny.yaml", "data.root=my_data", "--checkpoint", "tiny.pth"],
         1, f"error: data.root=my_data {NOT_OURS}"),
    Case("output is an existing file", "train.py", ["tiny.yaml", "data.root=synth", "--output-dir", "notes.txt"], 2,
         "error: output folder notes.txt is a file — choose a folder with --output-dir or train.output_dir"),
    Case("output is an existing file", "eval.py", ["tiny.yaml", "data.root=synth", "--checkpoint", "tiny.pth",
                                                   "--output-dir", "notes.txt"], 2,
         "error: output folder notes.txt is a file — choose a folder with --output-dir"),
    Case("output is an existing file", "infer.py", ["--checkpoint", "tiny.pth", "my_data/images", "--out", "notes.txt"],
         2, "error: output folder notes.txt is a file — choose a folder with --out"),
    Case("output is an existing file", "export.py", ["--checkpoint", "tiny.pth", "--format", "onnx", "--out",
                                                     "model.onnx"], 2, f"error: --out model.onnx {EXISTS}"),
    Case("output is an existing file", "convert.py", ["official.pth", "--out", "model.onnx"], 2,
         f"error: --out model.onnx {EXISTS}"),
    Case("output is an existing file", "check_data.py", [*AUG, "--out", "notes.txt"], 2,
         "error: output folder notes.txt is a file — choose a folder with --out"),
]


def make_workspace(root: Path) -> Path:
    """The files the cases name, in ``root`` (the tools' working directory)."""
    shutil.copy(TINY_CONFIG, root / "tiny.yaml")
    make_user_data(root / "my_data")
    make_broken_data(root / "broken")
    save_tiny_checkpoint(root / "tiny.pth")
    save_tiny_checkpoint(root / "evil.pth", {"payload": RunsCodeWhenLoaded(root / "PWNED")})
    (root / "official.pth").write_text("stands for an official checkpoint; refused before it is read")
    (root / "typo.yaml").write_text("_base_: tiny.yaml\ntrain:\n  epoch: 3\n")
    (root / "a_file").write_text("x")
    (root / "notes.txt").write_text("notes")
    (root / "model.onnx").write_text("an onnx file of the user's")
    return root


def reported_line(case: Case, stdout: str, stderr: str) -> str:
    if case.tool == "check_data.py" and not case.line.startswith("error:"):
        return next((line for line in stdout.splitlines() if line == case.line), stdout[-300:])
    return next((line for line in stderr.splitlines() if line.startswith("error:")), stderr[-300:])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("user_errors"))


@pytest.fixture(scope="module")
def printed(workspace) -> dict[int, tuple[int, str, str]]:
    """Every case run in this process (``main(argv)``), in the workspace: exit code, stdout, stderr."""
    import contextlib
    import io
    import os

    results = {}
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        for index, case in enumerate(CASES):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = load_tool(case.tool).main(list(case.args))
            results[index] = (code, out.getvalue(), err.getvalue())
    finally:
        os.chdir(cwd)
    return results


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c.tool}-{c.bad_input}" for c in CASES])
def test_each_bad_input_is_one_line_with_its_exit_code(printed, index):
    case = CASES[index]
    code, stdout, stderr = printed[index]
    assert reported_line(case, stdout, stderr) == case.line
    assert code == case.exit_code
    assert "Traceback" not in stdout + stderr
    if case.line.startswith("error:"):
        assert case.line.count(" — ") == 1 and stderr.count("error:") == 1


def test_the_pickled_code_never_ran_and_nothing_was_written_for_refused_outputs(printed, workspace):
    assert not (workspace / "PWNED").exists()
    assert (workspace / "a_file").read_text() == "x" and (workspace / "notes.txt").read_text() == "notes"
    assert (workspace / "model.onnx").read_text() == "an onnx file of the user's"
    assert not any((workspace / name).exists() for name in ("c.pth", "x.onnx", "ev", "pred"))


def test_the_broken_dataset_error_lists_every_problem(printed):
    index = next(i for i, c in enumerate(CASES) if c.tool == "train.py" and c.bad_input.startswith("broken"))
    stderr = printed[index][2]
    for kind in ("duplicate_image_id", "unknown_category", "duplicate_annotation_id", "bad_bbox", "unknown_image",
                 "bad_record", "missing_image"):
        assert f"  train.json: {kind}: " in stderr and f"  val.json: {kind}: " in stderr and f"  fix {kind}: " in stderr
    assert "out_of_bounds" not in stderr  # a warning: the dataset clips such boxes, training goes on


# ------------------------------------------------------------------------------------------ hints name what exists

_KEY = re.compile(r"(?<![\w/.-])((?:model|data|train|eval)(?:\.[a-z_0-9]+)+)")
_FILE_SUFFIXES = {"json", "yaml", "pth", "pt", "py", "onnx", "txt", "jpg", "png", "jsonl"}
_TOOL_COMMAND = re.compile(r"python tools/(\w+\.py)")


def _is_config_key(dotted: str) -> bool:
    from detr_kit.config import Config

    cls: typing.Any = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if is_dataclass(cls) else {}
        if part not in hints:
            return False
        cls = next((t for t in (typing.get_args(hints[part]) or (hints[part],)) if is_dataclass(t)), None)
    return True


def _tool_flags(tool: str) -> set[str]:
    import contextlib
    import io

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        load_tool(tool).main(["--help"])
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text.getvalue()))


def named_keys_and_flags(tool: str, line: str) -> tuple[set[str], dict[str, set[str]]]:
    """The config keys a line names, and the flags it names per tool (a quoted ``python tools/x.py`` command's
    flags belong to that tool, the rest to the tool that printed the line)."""
    keys = {k for k in _KEY.findall(line) if k.rsplit(".", 1)[-1] not in _FILE_SUFFIXES}
    flags: dict[str, set[str]] = {}
    pieces = _TOOL_COMMAND.split(line)  # [own text, tool, its command text, tool, ...]
    for owner, text in [(tool, pieces[0]), *zip(pieces[1::2], pieces[2::2])]:
        flags.setdefault(owner, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    return keys, flags


def test_the_checker_finds_what_it_checks():
    keys, flags = named_keys_and_flags("train.py", "error: x — set data.dataset=coco (not train.json); --output-dir "
                                       "or run python tools/check_data.py --images a --annotations b.json")
    assert keys == {"data.dataset"} and flags == {"train.py": {"--output-dir"}, "check_data.py": {"--images", "--annotations"}}
    assert _is_config_key("train.init_from_trusted") and _is_config_key("model.backbone.name")
    assert not _is_config_key("train.lr_drop") and not _is_config_key("model.backbone.name.x")


def test_every_key_and_flag_a_message_names_exists(printed):
    flags_of: dict[str, set[str]] = {}
    checked_keys, checked_flags = set(), set()
    for index, case in enumerate(CASES):
        code, stdout, stderr = printed[index]
        for line in stderr.splitlines():
            if not line.startswith("error:"):
                continue
            what, _, fix = line.partition(" — ")
            keys, flags = named_keys_and_flags(case.tool, fix)
            # a key the user mistyped is named in the "what"; every key the fix or the what names otherwise exists
            typed = set(re.findall(r"unknown key '([\w.]+)'", what))
            keys |= {k for k in named_keys_and_flags(case.tool, what)[0] if k not in typed}
            for key in keys:
                assert _is_config_key(key), f"{case.tool}: {line} names the config key {key}, which does not exist"
                checked_keys.add(key)
            for tool, names in flags.items():
                flags_of.setdefault(tool, _tool_flags(tool))
                for flag in names:
                    assert flag in flags_of[tool], f"{case.tool}: {line} names {flag}, which {tool} does not have"
                    checked_flags.add(f"{tool} {flag}")
    assert {"train.init_from_trusted", "data.dataset", "train.output_dir", "train.epochs"} <= checked_keys
    assert {"eval.py --trusted", "train.py --output-dir", "check_data.py --images", "export.py --overwrite"} <= checked_flags


# ------------------------------------------------------------------------------------------ trusted files


@pytest.fixture(scope="module")
def numpy_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint from elsewhere that holds a NumPy scalar: harmless, but more than weights_only allows."""
    import numpy as np

    return save_tiny_checkpoint(tmp_path_factory.mktemp("trusted") / "numpy.pth", {"best_score": np.float64(0.5)})


def test_trusted_loads_what_weights_only_refuses(workspace, numpy_checkpoint, tmp_path, capsys):
    infer = load_tool("infer.py")
    args = ["--checkpoint", str(numpy_checkpoint), str(workspace / "my_data" / "images" / "a.jpg"), "--device", "cpu"]
    assert infer.main([*args, "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert "holds pickled code (GLOBAL numpy." in err and "pass --trusted if you trust its source" in err
    assert not (tmp_path / "refused").exists()
    assert infer.main([*args, "--out", str(tmp_path / "trusted"), "--trusted"]) == 0
    assert (tmp_path / "trusted" / "a.jpg").is_file()


def test_train_init_from_trusted_reaches_the_loader(numpy_checkpoint, tmp_path):
    import torch

    from detr_kit.config import load_config
    from detr_kit.engine.trainer import Trainer
    from detr_kit.errors import PickledCodeError

    cfg = load_config(TINY_CONFIG, [f"data.root={tmp_path / 'synth'}", f"train.init_from={numpy_checkpoint}",
                                    "train.seed=7"])  # not the checkpoint's seed: equal weights must come from it
    with pytest.raises(PickledCodeError, match=r"^train.init_from: checkpoint .*numpy.pth' holds pickled code "
                                               r"\(GLOBAL numpy\..*\) — refused for safety; set train.init_from_trusted"):
        Trainer.create(cfg, tmp_path / "refused", device="cpu")
    trainer = Trainer.create(cfg.replace(["train.init_from_trusted=true"]), tmp_path / "trusted", device="cpu")
    weights = torch.load(numpy_checkpoint, weights_only=False)["model"]
    for key in ("class_embed.weight", "query_embed.weight"):
        torch.testing.assert_close(trainer.model.state_dict()[key], weights[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ real processes


def test_as_subprocesses_and_with_debug(workspace):
    case = CASES[0]
    result = run_tool(case.tool, *case.args, cwd=workspace)
    assert result.returncode == case.exit_code and result.stderr.strip() == case.line
    debug = run_tool(case.tool, *case.args, "--debug", cwd=workspace)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("detr_kit.errors.ConfigError: tiny.yaml")


def test_a_real_bug_keeps_its_traceback(workspace, monkeypatch):
    import detr_kit.config

    def broken_loader(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(detr_kit.config, "load_config", broken_loader)
    monkeypatch.chdir(workspace)
    with pytest.raises(ZeroDivisionError):
        load_tool("train.py").main(["tiny.yaml", "--output-dir", "runs/bug"])


def _table(root: Path) -> str:
    rows = ["| bad input | tool | exit | what the tool prints |", "|---|---|---|---|"]
    for case in CASES:
        result = run_tool(case.tool, *case.args, cwd=root)
        line = reported_line(case, result.stdout, result.stderr).replace("|", "\\|")
        shown = " ".join(["python", f"tools/{case.tool}", *case.args])
        trace = " **(traceback)**" if "Traceback" in result.stderr else ""
        rows.append(f"| {case.bad_input} | `{shown}` | {result.returncode} | `{line}`{trace} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(_table(make_workspace(Path(folder))))
    sys.exit(0)
