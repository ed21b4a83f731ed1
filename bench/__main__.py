"""detr_kit benchmarks against their peers: ``python -m bench [--cases train infer matcher data eval]``.

Each measurement runs in its own subprocess (``bench/worker.py``) so its peak RSS is its own; ours and the
peer run one after the other in the same invocation, on the same machine. Results print as Markdown
tables (paste them into docs/benchmarks.md) and are saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PAIRS = {
    "train": [(m, impl) for m in ("detr", "deformable", "deformable_two_stage") for impl in ("ours", "hf")],
    "infer": [(m, impl) for m in ("detr", "deformable", "deformable_two_stage") for impl in ("ours", "hf")],
    "matcher": [(m, impl) for m in ("16x300x50", "16x900x100") for impl in ("ours", "batch_wide")],
    "data": [("coco128", "ours")],
}
PEER_NAME = {
    "hf": "Hugging Face transformers, the papers' dropout",
    "hf_default": "Hugging Face transformers, its default dropout (none on attention weights or after the FFN activation)",
    "batch_wide": "batch-wide cost matrix (reference formulation)",
}


def run_worker(case: str, model: str, impl: str, repeats: int, threads: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.worker", case, model, impl, "--repeats", str(repeats), "--threads", str(threads), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"case": case, "model": model, "impl": impl, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def table(records: list[dict]) -> str:
    """Markdown rows; the ratio column is peer time / our time (> 1: we are faster).

    Peer rows get their ratio to plain ``ours`` (``hf_default`` to ``ours_hf_dropout``, the same dropout); an
    ``ours_compiled`` row gets the peer's time over its own.
    """
    gpu = any("peak_gpu_mb" in r for r in records)
    head = "| case | model | impl | median s | runs s | peak RSS MB |" + (" peak GPU MB |" if gpu else "") + " ratio (peer / ours) |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    ours = {(r["case"], r["model"]): r for r in records if r.get("impl") == "ours" and "median_s" in r}
    ours_hf_dropout = {(r["case"], r["model"]): r for r in records if r.get("impl") == "ours_hf_dropout" and "median_s" in r}
    peers = {(r["case"], r["model"]): r for r in records if r.get("impl") in ("hf", "batch_wide") and "median_s" in r}
    for r in records:
        if "error" in r:
            rows.append(f"| {r['case']} | {r['model']} | {r['impl']} | error: {r['error']} |" + " |" * (head.count("|") - 5))
            continue
        key = (r["case"], r["model"])
        if r["impl"] in ("ours", "ours_hf_dropout"):
            ratio = ""
        elif r["impl"] == "hf_default":
            ratio = f"{r['median_s'] / ours_hf_dropout[key]['median_s']:.2f}x" if key in ours_hf_dropout else ""
        elif r["impl"] == "ours_compiled":
            ratio = f"{peers[key]['median_s'] / r['median_s']:.2f}x" if key in peers else ""
        else:
            ratio = f"{r['median_s'] / ours[key]['median_s']:.2f}x" if key in ours else ""
        extra = f" ({r['images_per_s']:.1f} img/s)" if "images_per_s" in r else ""
        gpu_cell = f" {r.get('peak_gpu_mb', '')} |" if gpu else ""
        rows.append(
            f"| {r['case']} | {r['model']} | {r['impl']} | {r['median_s']:.3f}{extra} | "
            f"{', '.join(f'{t:.2f}' for t in r['times_s'])} | {r['peak_rss_mb']:.0f} |{gpu_cell} {ratio} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["train", "infer", "matcher", "data", "eval"])
    parser.add_argument("--models", nargs="+", default=None, help="restrict to these models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where the train and infer cases run")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast both sides of train/infer")
    parser.add_argument("--compiled", action="store_true",
                        help="also measure ours with model.compile=true (torch.compile), in the same run as the peer")
    parser.add_argument("--peer-defaults", action="store_true",
                        help="also train both with transformers' default dropout (none on attention weights or after "
                        "the FFN activation: ours_hf_dropout, hf_default), in the same run")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} · {platform.processor() or platform.machine()} · {torch.get_num_threads()} threads "
          f"available, {args.threads} used · torch {torch.__version__} · python {platform.python_version()}")
    records: list[dict] = []
    for case in args.cases:
        if case == "eval":
            proc = subprocess.run([sys.executable, "-m", "bench.eval_bench"], cwd=ROOT, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            records.extend(json.loads(line) for line in lines)
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
            continue
        pairs = PAIRS[case]
        if case in ("train", "infer"):  # per model: ours, [ours compiled], the peer, [the peer's default dropout]
            impls = ["ours", *(["ours_compiled"] if args.compiled else []), "hf"]
            impls += ["ours_hf_dropout", "hf_default"] if args.peer_defaults and case == "train" else []
            pairs = [(model, impl) for model in dict(pairs) for impl in impls]
        for model, impl in pairs:
            if args.models and case in ("train", "infer") and model not in args.models:
                continue
            repeats = args.repeats if case in ("train", "infer") else max(args.repeats, 5)
            device = ["--device", args.device, "--amp", args.amp] if case in ("train", "infer") else []
            record = run_worker(case, model, impl, repeats, args.threads, device)
            records.append(record)
            print(json.dumps(record), flush=True)
    print()
    print(table([r for r in records if r.get("case") != "eval"]))
    for r in records:
        if r.get("case") == "eval":
            print(f"\neval {r['impl']}: {r['median_s']:.2f} s, identical stats: {r.get('identical')}")
    Path(ROOT / args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
