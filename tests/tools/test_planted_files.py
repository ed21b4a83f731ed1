"""Every tool, run as a user would run it with plausible wrong arguments against a folder of the user's files,
refuses with one line and leaves every file byte for byte as it was (and adds none)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from user_files import TINY_CONFIG, fingerprint, make_user_data, run_tool, save_tiny_checkpoint


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """``root/user``: a user's folder; ``root`` is the working directory the tools run in."""
    root = tmp_path_factory.mktemp("planted")
    user = root / "user"
    make_user_data(user / "my_data")
    (user / "photos").mkdir()
    shutil.copy(user / "my_data" / "images" / "a.jpg", user / "photos" / "a.jpg")
    save_tiny_checkpoint(user / "weights.pth")  # the user's own detr_kit checkpoint
    files = {
        "config.yaml": "my_setting: 1\n",
        "metrics.jsonl": '{"epoch": 1, "my_score": 0.5}\n',
        "metrics.json": '{"mine": true}\n',
        "detections.json": "[]\n",
        "notes.txt": "do not lose these notes\n",
        "last.pth": "not a checkpoint, but the user's file\n",
        "best.pth": "also the user's\n",
        "model.onnx": "an onnx model of the user's\n",
        "weights.onnx": "the default name export.py would choose for weights.pth\n",
        "weights.pt": "the default torchscript name for weights.pth\n",
    }
    for name, text in files.items():
        (user / name).write_text(text)
    return root


# (tool, arguments, a phrase of the refusal); paths are relative to the workspace, "user" is the user's folder
WRONG_RUNS = [
    ("train.py", [str(TINY_CONFIG), "data.root=user/my_data", "--output-dir", "runs/t1"],
     "data.root=user/my_data holds files detr_kit did not write, and data.dataset=synthetic would write shapes there"),
    ("train.py", [str(TINY_CONFIG), "data.root=synth", "--output-dir", "user"],
     "output folder user holds files detr_kit did not write"),
    ("train.py", [str(TINY_CONFIG), "data.root=synth", "train.output_dir=user"],
     "output folder user holds files detr_kit did not write"),
    ("train.py", [str(TINY_CONFIG), "data.dataset=coco", "data.root=user/my_data", "data.train_images=images",
                  "data.val_images=images", "data.train_annotations=train.json", "data.val_annotations=val.json",
                  "--output-dir", "user/my_data"], "output folder user/my_data holds files detr_kit did not write"),
    ("train.py", [str(TINY_CONFIG), "data.root=synth", "--output-dir", "user/notes.txt"], "output folder user/notes.txt is a file"),
    ("train.py", [str(TINY_CONFIG), "data.root=synth", "--resume", "user/last.pth", "--output-dir", "runs/t6"],
     "checkpoint 'user/last.pth' is corrupt or truncated"),
    ("eval.py", [str(TINY_CONFIG), "data.root=synth", "--checkpoint", "user/weights.pth", "--output-dir", "user"],
     "output folder user holds files detr_kit did not write"),
    ("eval.py", [str(TINY_CONFIG), "data.root=user/my_data", "--checkpoint", "user/weights.pth"],
     "data.root=user/my_data holds files detr_kit did not write"),
    ("infer.py", ["--checkpoint", "user/weights.pth", "user/photos", "--out", "user/photos", "--overwrite"],
     "--out user/photos would overwrite the input(s) user/photos/a.jpg"),
    ("infer.py", ["--checkpoint", "user/weights.pth", "user/photos", "--out", "user"],
     "output folder user holds files detr_kit did not write"),
    ("infer.py", ["--checkpoint", "user/weights.pth", "user/photos", "--out", "user/notes.txt"], "user/notes.txt is a file"),
    ("export.py", ["--checkpoint", "user/weights.pth", "--format", "onnx", "--out", "user/model.onnx"],
     "--out user/model.onnx already exists"),
    ("export.py", ["--checkpoint", "user/weights.pth", "--format", "onnx"], "--out user/weights.onnx already exists"),
    ("export.py", ["--checkpoint", "user/weights.pth", "--format", "torchscript", "--out", "user/weights.pth", "--overwrite"],
     "--out user/weights.pth is the input the tool reads"),
    ("convert.py", ["user/weights.pth", "--out", "user/weights.pth", "--overwrite"], "is the input the tool reads"),
    ("convert.py", ["user/last.pth", "--out", "user/best.pth"], "--out user/best.pth already exists"),
    ("convert.py", ["user/last.pth", "--out", "user/my_data"], "--out user/my_data is a folder"),
    ("check_data.py", ["--images", "user/my_data/images", "--annotations", "user/my_data/train.json", "--show-aug", "2",
                       "--out", "user"], "output folder user holds files detr_kit did not write"),
    ("check_data.py", ["--images", "user/my_data/images", "--annotations", "user/my_data/train.json", "--show-aug", "1",
                       "--out", "user/my_data/images"], "output folder user/my_data/images holds files detr_kit did not write"),
]


@pytest.mark.slow
def test_no_tool_touches_the_users_files(workspace):
    user = workspace / "user"
    before = fingerprint(user)
    assert len(before) == 16  # 4 dataset files, a photo, a checkpoint and 10 more
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: most of each run is importing torch
        results = list(pool.map(lambda run: run_tool(run[0], *run[1], cwd=workspace), WRONG_RUNS))
    failures = []
    for (tool, args, phrase), result in zip(WRONG_RUNS, results):
        lines = result.stderr.strip().splitlines()
        ok = (result.returncode in (1, 2) and "Traceback" not in result.stderr and lines
              and lines[-1].startswith("error: ") and " — " in lines[-1] and phrase in lines[-1])
        if not ok:
            failures.append(f"{tool} {' '.join(args)} -> exit {result.returncode}\n{result.stderr[-2000:]}")
    assert fingerprint(user) == before  # every planted file byte for byte, and no file added
    assert not failures, "\n\n".join(failures)
    # a correct call next to the user's files still works, and adds only its own outputs elsewhere
    result = run_tool("check_data.py", "--images", "user/my_data/images", "--annotations", "user/my_data/train.json",
                      cwd=workspace)
    assert result.returncode == 0 and "0 errors" in result.stdout, result.stdout + result.stderr
    assert fingerprint(user) == before
    assert not (workspace / "synth").exists()  # refused before the synthetic dataset would have been generated
