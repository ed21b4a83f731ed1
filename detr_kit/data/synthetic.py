"""A small, learnable detection dataset of coloured shapes on textured backgrounds (COCO format).

Used by the quickstart and the tests: it needs no download and a small Deformable-DETR learns it on
a CPU in minutes. Each class has its own colour family (circles warm, squares green/teal, triangles
blue/violet) on muted, noisy gradient backgrounds, so shape and colour both carry the class.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from detr_kit.errors import DatasetError

CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"})
_PALETTES = {  # RGB colour families per category id, jittered per shape
    1: ((235, 50, 50), (245, 140, 30)),
    2: ((40, 200, 60), (30, 185, 170)),
    3: ((50, 90, 240), (165, 60, 230)),
}
_MAX_OVERLAP = 0.3  # shapes may overlap, but never hide one another
MARKER = ".detr_kit_synthetic"  # what makes a folder this generator's: its arguments and the files it wrote


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted gradient between two greyish colours plus pixel noise and soft blotches: [size, size, 3] uint8."""
    ends = rng.uniform(70, 170, size=(2, 1, 1, 1)) + rng.uniform(-20, 20, size=(2, 1, 1, 3))  # two low-saturation colours
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = np.cos(angle) * axis[None, :] + np.sin(angle) * axis[:, None]  # [size, size]
    ramp = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))[..., None]  # [size, size, 1] in 0..1
    image = ends[0, 0] * (1 - ramp) + ends[1, 0] * ramp  # [size, size, 3]
    cells = -(-size // 16)
    blotches = np.repeat(np.repeat(rng.normal(0, 12, size=(cells, cells, 1)), 16, axis=0), 16, axis=1)[:size, :size]
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * 8
    return np.clip(image + blotches + noise, 0, 255).astype(np.uint8)


def _overlap(a: list[int], b: list[int]) -> float:
    """Intersection over the smaller of two xywh boxes (1 when one lies inside the other)."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def _draw_image(rng: np.random.Generator, size: int, num_objects: int) -> tuple[Image.Image, list[tuple[int, list[int], float]]]:
    """One image and its (category_id, bbox xywh, area) objects."""
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    objects: list[tuple[int, list[int], float]] = []
    low, high = max(round(0.1 * size), 3), max(round(0.5 * size), 4)
    for _ in range(num_objects):
        for _attempt in range(20):
            side = int(rng.integers(low, high + 1))
            x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = [x0, y0, side, side]
            if all(_overlap(box, other) < _MAX_OVERLAP for _, other, _ in objects):
                break
        else:
            continue  # no room left for another shape
        category = int(rng.integers(1, 4))
        palette = _PALETTES[category]
        colour = np.array(palette[int(rng.integers(len(palette)))]) + rng.integers(-20, 21, size=3)
        fill = tuple(int(c) for c in np.clip(colour, 0, 255))
        x1, y1 = x0 + side - 1, y0 + side - 1  # inclusive pixel corners: the shape spans exactly `side` pixels
        if category == 1:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
            area = np.pi * side * side / 4
        elif category == 2:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
            area = float(side * side)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
            area = side * side / 2
        objects.append((category, box, round(float(area), 2)))
    return image, objects


def _num_objects(rng: np.random.Generator, min_objects: int, max_objects: int) -> int:
    """Uniform in [max(min_objects, 1), max_objects]; with min_objects == 0, one image in ten is empty."""
    if max_objects == 0 or (min_objects == 0 and rng.random() < 0.1):
        return 0
    return int(rng.integers(max(min_objects, 1), max_objects + 1))


def _write_split(root: Path, split: str, split_code: int, num_images: int, image_size: int, min_objects: int, max_objects: int, seed: int, params: dict) -> dict:
    folder = root / split
    folder.mkdir(parents=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_code, index])
        num_objects = _num_objects(rng, min_objects, max_objects)
        image, objects = _draw_image(rng, image_size, num_objects)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        image.save(folder / file_name, format="PNG", compress_level=1)  # noisy pixels barely compress
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for category, box, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [float(v) for v in box],
                    "area": area,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": f"detr_kit synthetic shapes ({split}, seed {seed})", "version": "1.0", "detr_kit_synthetic": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c, supercategory="shape") for c in CATEGORIES],
    }


def synthetic_params(num_train: int, num_val: int, image_size: int, min_objects: int, max_objects: int, seed: int) -> dict:
    """The generator arguments, as stored in the json's ``info.detr_kit_synthetic`` (to detect a stale dataset)."""
    return {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "seed": seed,
    }


def dataset_params(root: str | os.PathLike) -> dict | None:
    """The generator arguments of the shapes dataset at ``root`` if this generator made it, else None.

    A dataset made here holds the marker ``.detr_kit_synthetic`` (its arguments and files); one made before the
    marker existed is recognised when it holds exactly the files its two jsons list, and nothing else.
    """
    marker = _read_marker(Path(root))
    return marker["params"] if marker is not None else None


def folder_state(root: str | os.PathLike) -> Literal["missing", "empty", "ours", "foreign"]:
    """What is at ``root``: nothing, an empty folder, a dataset this generator made, or anything else."""
    root = Path(root)
    if not root.exists():
        return "missing"
    if not root.is_dir():
        return "foreign"
    if not any(root.iterdir()):
        return "empty"
    return "ours" if _read_marker(root) is not None else "foreign"


def generate_shapes_dataset(
    root: str | os.PathLike,
    num_train: int = 512,
    num_val: int = 64,
    image_size: int = 128,
    min_objects: int = 0,
    max_objects: int = 4,
    seed: int = 0,
) -> Path:
    """Write the shapes dataset: root/{train,val}/*.png and root/annotations/instances_{train,val}.json.

    Deterministic for a seed (byte-identical files). ``root`` must be missing, empty, or a dataset this
    generator made (see :func:`folder_state`); anything else is refused, so a user's folder is never touched.
    The dataset is written into a temporary folder beside ``root`` and renamed into place, so an interrupted run
    never leaves half a dataset; over an older dataset of this generator only its own files are replaced (files
    someone added survive), and the marker is written last.

    Args:
        root: output folder.
        num_train, num_val: images per split (>= 1 and >= 0).
        image_size: side of the square images in pixels (>= 16).
        min_objects, max_objects: objects per image; with min_objects=0 about 10% of images are empty.
        seed: random seed.
    Returns:
        ``root`` as a Path.
    Raises:
        DatasetError: ``root`` holds files this generator did not write.
    """
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got num_train={num_train}, num_val={num_val}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    params = synthetic_params(num_train, num_val, image_size, min_objects, max_objects, seed)
    root = Path(root)
    state = folder_state(root)
    if state == "foreign":
        raise DatasetError(f"{root} holds files the shapes generator did not write",
                           "pass a new or empty folder (or one that holds a shapes dataset)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is not
    try:
        (tmp / "annotations").mkdir()
        files = []
        for split, code, count in (("train", 0, num_train), ("val", 1, num_val)):
            data = _write_split(tmp, split, code, count, image_size, min_objects, max_objects, seed, params)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(data, indent=1, sort_keys=True))
            files += [f"{split}/{img['file_name']}" for img in data["images"]] + [f"annotations/instances_{split}.json"]
        _write_marker(tmp, params, files)  # last: a folder with the marker is complete
        if state == "ours":
            _replace_own_files(root, tmp, files)
        else:
            tmp.rename(root)  # over a missing or empty folder; fails if another process filled it meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_marker(root: Path, params: dict | None, files: list[str]) -> None:
    """Write ``root/.detr_kit_synthetic`` atomically: the generator arguments (None while incomplete) and files."""
    tmp = root / f"{MARKER}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"params": params, "files": sorted(files)}, indent=1))
    tmp.replace(root / MARKER)


def _read_marker(root: Path) -> dict | None:
    """``{"params", "files"}`` of a dataset this generator made (marker, or a complete older dataset), else None."""
    try:
        marker = json.loads((root / MARKER).read_text())
        if isinstance(marker, dict) and isinstance(marker.get("files"), list):
            return marker
        return {"params": None, "files": []}  # a damaged marker: ours, stale, no file known to be ours
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return {"params": None, "files": []}
    return _recognise_unmarked(root)


def _recognise_unmarked(root: Path) -> dict | None:
    """A dataset of this generator from before the marker: exactly the files its jsons list, nothing else."""
    files, params = [], None
    try:
        for split in ("val", "train"):  # the smaller json first: a user's COCO layout fails the test on it
            data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
            params = data["info"]["detr_kit_synthetic"]
            files += [f"{split}/{img['file_name']}" for img in data["images"]] + [f"annotations/instances_{split}.json"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}
    return {"params": params, "files": files} if present == set(files) else None


def _replace_own_files(root: Path, new: Path, new_files: list[str]) -> None:
    """Move the dataset at ``new`` over the one this generator made at ``root``, touching only its own files."""
    old_files = set((_read_marker(root) or {"files": []})["files"])
    clashes = [name for name in new_files if name not in old_files and (root / name).exists()]
    if clashes:
        raise DatasetError(f"{root} holds {clashes[0]}, which the shapes generator did not write",
                           "move that file away, or pass a new or empty folder")
    _write_marker(root, None, sorted(old_files | set(new_files)))  # an interruption from here on leaves it stale
    for name in new_files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(new / name, root / name)
    for name in old_files - set(new_files):
        (root / name).unlink(missing_ok=True)
    os.replace(new / MARKER, root / MARKER)


__all__ = ["CATEGORIES", "MARKER", "dataset_params", "folder_state", "generate_shapes_dataset", "synthetic_params"]
