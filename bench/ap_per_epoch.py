"""Print AP, AP50, AR100 and the training loss per epoch of the runs of bench/vit_two_phase.sh as a Markdown table.

    python bench/ap_per_epoch.py runs/vit_two_phase
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARMS = {"two-phase": ("phase1", "phase2"), "random-init ViT": ("vit_random",), "ResNet-18": ("resnet18",)}


def epochs(run: Path) -> list[dict]:
    """The epoch records of a run folder's metrics.jsonl, in order (none while the run has not started)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [record for record in map(json.loads, lines) if record.get("kind") == "epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the folder bench/vit_two_phase.sh wrote")
    root = parser.parse_args().root
    curves = {arm: [r for folder in folders for r in epochs(root / folder)] for arm, folders in ARMS.items()}
    print("| epoch | " + " | ".join(f"{arm}: AP / AP50 / AR100 / train loss" for arm in ARMS) + " |")
    print("|---" * (len(ARMS) + 1) + "|")
    for index in range(max(len(curve) for curve in curves.values())):
        cells = []
        for curve in curves.values():
            record = curve[index] if index < len(curve) else None
            cells.append(f"{record['val/AP']:.1e} / {record['val/AP50']:.1e} / {record['val/AR100']:.4f} / "
                         f"{record['train/loss']:.2f}" if record else "")  # AP in 0..1; .1e keeps tiny values
        print(f"| {index + 1} | " + " | ".join(cells) + " |")
    seconds = {arm: sum(r["time_s"] for r in curve) for arm, curve in curves.items()}
    print("\ntraining seconds (sum of epoch times): " + ", ".join(f"{arm} {s:.0f}" for arm, s in seconds.items()))


if __name__ == "__main__":
    main()
