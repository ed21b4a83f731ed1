"""Peak resident memory of a ViT backbone forward at detection sizes, each size in a fresh process.

    python bench/vit_memory.py                       # ViT-S, windows of 14 with global blocks 2,5,8,11
    python bench/vit_memory.py --window-size 0       # global attention everywhere, for comparison
    python bench/vit_memory.py --train               # forward + backward in train mode

Prints one line per input size: peak RSS of the process (MiB), the RSS after building the model, their
difference (what the forward itself needed) and the forward time. Random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = ((512, 800), (800, 1333))


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _worker(args: argparse.Namespace) -> None:
    import torch

    from detr_kit.models.backbone.vit import ViTBackbone

    torch.manual_seed(0)
    model = ViTBackbone(
        args.size,
        return_strides=(8, 16, 32),
        window_size=args.window_size,
        global_blocks=tuple(args.global_blocks) if args.window_size else (),
        use_cls_token=False,
        drop_path=0.0,
    )
    model.train(args.train)
    images = torch.randn(1, 3, args.height, args.width)
    model_rss = _rss_mib()
    start = time.perf_counter()
    if args.train:
        sum(level.features.sum() for level in model(images)).backward()
    else:
        with torch.no_grad():
            model(images)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"peak_rss_mib": peak, "model_rss_mib": model_rss, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--window-size", type=int, default=14)
    parser.add_argument("--global-blocks", type=int, nargs="*", default=[2, 5, 8, 11])
    parser.add_argument("--train", action="store_true", help="forward + backward in train mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", type=int, nargs=2, metavar=("H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        args.height, args.width = args.worker
        _worker(args)
        return
    mode = "train fwd+bwd" if args.train else "inference"
    attention = f"windows {args.window_size}, global blocks {args.global_blocks}" if args.window_size else "global"
    print(f"ViT-{args.size[0].upper()} ({attention}), {mode}, {args.threads} threads, batch 1")
    for height, width in SIZES:
        command = [
            sys.executable, __file__, "--worker", str(height), str(width), "--size", args.size,
            "--window-size", str(args.window_size), "--threads", str(args.threads),
            "--global-blocks", *map(str, args.global_blocks), *(["--train"] if args.train else []),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        peak, built = result["peak_rss_mib"], result["model_rss_mib"]
        print(
            f"  {height}x{width}: peak RSS {peak:.0f} MiB (after building the model {built:.0f} MiB, "
            f"run +{peak - built:.0f} MiB), {result['seconds']:.2f} s"
        )


if __name__ == "__main__":
    main()
