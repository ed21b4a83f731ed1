"""A user's folder for the tests that check that detr_kit never harms one: their data, their files, a checkpoint
of theirs, one that runs code when unpickled, and helpers that run the tools (subprocess or in-process) and
fingerprint every file."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
TINY_CONFIG = ROOT / "tests" / "engine" / "tiny.yaml"  # the engine tests' tiny DETR on synthetic shapes


class RunsCodeWhenLoaded:
    """Unpickling this creates the folder ``flag`` (``os.mkdir``): proof that the checkpoint's code ran."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (os.mkdir, (str(self.flag),))


def _coco(images: list[tuple[str, int, int]], annotations: list[dict]) -> dict:
    return {"images": [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h) in enumerate(images, 1)],
            "annotations": annotations, "categories": [{"id": 1, "name": "raccoon"}]}


def make_user_data(folder: Path) -> Path:
    """A small, valid COCO-format dataset of the user's: images/ with two photos, train.json, val.json."""
    (folder / "images").mkdir(parents=True)
    for name, colour in (("a.jpg", (200, 30, 30)), ("b.jpg", (30, 200, 30))):
        Image.new("RGB", (64, 48), colour).save(folder / "images" / name)
    boxes = [{"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 16], "area": 320, "iscrowd": 0} for i in (1, 2)]
    data = _coco([("a.jpg", 64, 48), ("b.jpg", 64, 48)], boxes)
    (folder / "train.json").write_text(json.dumps(data))
    (folder / "val.json").write_text(json.dumps(data))
    return folder


def make_broken_data(folder: Path) -> Path:
    """A dataset whose jsons hold seven error-level problems of different kinds, and one warning."""
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(folder / "images" / "a.jpg")
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10]},  # unknown category
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10]},  # duplicated id, malformed bbox
        {"id": 3, "image_id": 9, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image
        {"id": 4, "image_id": 1, "category_id": 1},  # no bbox
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [30, 20, 20, 20]},  # out of bounds: a warning only
    ]
    data = _coco([("a.jpg", 40, 30), ("gone.jpg", 40, 30)], annotations)  # gone.jpg: missing
    data["images"].append({"id": 2, "file_name": "a.jpg", "width": 40, "height": 30})  # duplicated image id
    for split in ("train", "val"):
        (folder / f"{split}.json").write_text(json.dumps(data))
    return folder


def save_tiny_checkpoint(path: Path, extra: dict | None = None) -> Path:
    """A detr_kit checkpoint of tests/engine/tiny.yaml's model for 3 classes (what tools/train.py would write)."""
    from detr_kit.build import build_model
    from detr_kit.config import load_config
    from detr_kit.engine.checkpoint import save_checkpoint
    from detr_kit.structures import LabelMap

    cfg = load_config(TINY_CONFIG)
    label_map = LabelMap((1, 2, 3), ("circle", "square", "triangle"))
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=len(label_map))
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "label_map": label_map.to_dict(),
             "id2label": label_map.id2label, "epoch": 0, "step": 0}
    if extra is None:
        return save_checkpoint(path, state)
    torch.save({**state, **extra}, path)  # not through save_checkpoint: a file from elsewhere
    return path


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest); folders themselves are not listed."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_tool(tool: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python tools/<tool> args...`` in ``cwd``, importing this checkout's detr_kit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(TOOLS / tool), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def load_tool(tool: str) -> ModuleType:
    """A tools/*.py script as a module, to call its ``main(argv)`` in this process."""
    name = f"detr_kit_tool_{Path(tool).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / tool)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
