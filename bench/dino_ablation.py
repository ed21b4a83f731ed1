"""Time to accuracy of DINO's training ideas on the quickstart: ``python -m bench.dino_ablation``.

Each variant is the quickstart recipe (configs/quickstart.yaml: model size, data, step budget, schedule) with one
or all of DINO's options switched on; each trains in its own ``tools/train.py`` subprocess, one after the other,
and its AP per epoch is read from the run's metrics.jsonl. Then, in this process and interleaved so that the
machine's load hits every variant alike, the train step (forward, loss, backward, optimizer step on one fixed
training batch) and the inference forward (one batch of validation images) of every variant are timed: medians.

    python -m bench.dino_ablation                                   # all variants, the quickstart's 8 epochs
    python -m bench.dino_ablation --variants quickstart all --epochs 1 --max-steps 20   # a quick try
    python -m bench.dino_ablation --timing-only                     # step and inference times only

Wait for a quiet machine (``--max-load``: each run starts only when the 1-minute load average is below it).
Results print as Markdown and are saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

# variant -> (config, overrides); every idea alone on the quickstart, then all of them (configs/quickstart_dino.yaml)
VARIANTS: dict[str, tuple[Path, list[str]]] = {
    "quickstart": (QUICKSTART, []),
    "cdn": (QUICKSTART, ["model.deformable.dn_number=20"]),
    # the quickstart's 30 queries (two-stage would keep 300 proposals by default: ten times the decoder's work)
    "mixed_selection": (QUICKSTART, ["model.deformable.two_stage=true", "model.deformable.num_proposals=30",
                                     "model.deformable.mixed_query_selection=true"]),
    "look_forward_twice": (QUICKSTART, ["model.deformable.look_forward_twice=true"]),
    "all": (ROOT / "configs" / "quickstart_dino.yaml", []),
}
DESCRIPTION = {
    "quickstart": "Deformable-DETR + box refinement (the quickstart)",
    "cdn": "+ contrastive denoising (dn_number 20; queries become learned anchor boxes)",
    "mixed_selection": "+ two-stage with mixed query selection",
    "look_forward_twice": "+ look-forward-twice",
    "all": "all of DINO (configs/quickstart_dino.yaml: CDN + mixed selection + LFT + shared heads + decoder norm)",
}


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, poll_s: float, max_wait_s: float) -> float:
    """Block until the 1-minute load average is below ``max_load`` (or ``max_wait_s`` passed); returns the load."""
    start = time.time()
    while (load := load_average()) >= max_load and time.time() - start < max_wait_s:
        print(f"  load {load:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(poll_s)
    return load


QUICKSTART_STEPS, QUICKSTART_WARMUP, BATCH = 1024, 50, 8  # configs/quickstart.yaml: 8 epochs x 128 steps of 8


def budget_overrides(data_root: Path, epochs: int | None, max_steps: int | None) -> list[str]:
    """What every variant gets alike: its own data folder and, for a smaller budget, fewer images per epoch (the
    same 8-epoch cosine schedule, warm-up scaled with the step count)."""
    extra = [f"data.root={data_root}"]
    if epochs is not None:
        extra.append(f"train.epochs={epochs}")
    if max_steps is not None:
        total = max_steps * (epochs or 8)
        extra += [f"data.synthetic.num_train={max_steps * BATCH}",
                  f"train.warmup_steps={max(1, round(QUICKSTART_WARMUP * total / QUICKSTART_STEPS))}"]
    return extra


def train_variant(name: str, out_dir: Path, epochs: int | None, max_steps: int | None, threads: int) -> dict:
    """Train one variant in a subprocess; its per-epoch records and wall time."""
    config, overrides = VARIANTS[name]
    run_dir = out_dir / name
    extra = ["train.num_vis_images=0", "train.log_every_steps=0", *budget_overrides(out_dir / "data", epochs, max_steps)]
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), str(config), *overrides, *extra, "--output-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, **read_run(run_dir)}


def read_run(run_dir: Path) -> dict:
    """AP, AP50, epoch time and step of every evaluated epoch in a run folder's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs_done = [r for r in records if "val/AP" in r]
    return {
        "ap": [r["val/AP"] for r in epochs_done],
        "ap50": [r["val/AP50"] for r in epochs_done],
        "epoch_time_s": [r["time_s"] for r in epochs_done],
        "steps": [r.get("step") for r in epochs_done],
    }


def time_variants(names: list[str], repeats: int, threads: int, data_root: Path) -> dict[str, dict[str, float]]:
    """Median train-step and inference times of every variant, measured interleaved in this process."""
    import torch

    from detr_kit.build import build_criterion, build_dataset, build_model
    from detr_kit.config import load_config
    from detr_kit.data.collate import collate
    from detr_kit.engine.optim import build_optimizer
    from detr_kit.engine.step import train_step

    torch.set_num_threads(threads)
    parts = {}
    for name in names:
        config, overrides = VARIANTS[name]
        cfg = load_config(config, [*overrides, "model.num_classes=3", f"data.root={data_root}"])
        torch.manual_seed(0)
        model = build_model(cfg)
        parts[name] = (cfg, model, build_criterion(cfg), build_optimizer(model, cfg.train))
    cfg = parts[names[0]][0]
    train_set, val_set = build_dataset(cfg.data, "train", train=True), build_dataset(cfg.data, "val")
    torch.manual_seed(1)
    train_batch = collate([train_set[i] for i in range(cfg.data.batch_size)])
    val_batch = collate([val_set[i] for i in range(cfg.eval.batch_size)])
    times: dict[str, dict[str, list[float]]] = {name: {"train_step_s": [], "infer_s": []} for name in names}
    for repeat in range(repeats + 1):  # the first round warms up
        for name in names:
            _, model, criterion, optimizer = parts[name]
            model.train()
            start = time.perf_counter()
            train_step(model, criterion, optimizer, [train_batch], torch.device("cpu"), clip_max_norm=1.0)
            step_s = time.perf_counter() - start
            model.eval()
            with torch.no_grad():
                start = time.perf_counter()
                model(val_batch[0].images, val_batch[0].mask)
                infer_s = time.perf_counter() - start
            if repeat:
                times[name]["train_step_s"].append(step_s)
                times[name]["infer_s"].append(infer_s)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def train_all(args: argparse.Namespace) -> dict[str, dict]:
    """Train every variant, ``--jobs`` at a time (each run is deterministic and measured in steps, so running them
    side by side changes their wall times, not their AP), in the order of ``--variants``."""
    work_dir = ROOT / args.work_dir

    def run(name: str) -> dict:
        load = wait_for_quiet(args.max_load, 30.0, args.max_wait_s)
        print(f"{name}: training (load {load:.2f})", flush=True)
        result = train_variant(name, work_dir, args.epochs, args.max_steps, args.threads)
        print(f"{name}: AP per epoch {[round(v, 3) for v in result['ap']]} ({result['wall_s'] / 60:.1f} min)", flush=True)
        return {**result, "load_at_start": load}

    if args.jobs > 1:  # the shared dataset is written once, before the runs start side by side
        from detr_kit.build import build_datasets
        from detr_kit.config import load_config

        config, overrides = VARIANTS[args.variants[0]]
        cfg = load_config(config, [*overrides, *budget_overrides(work_dir / "data", args.epochs, args.max_steps)])
        build_datasets(cfg)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(run, name) for name in args.variants}
        return {name: future.result() for name, future in futures.items()}


def steps_to_reach(ap: list[float], target: float, steps_per_epoch: int) -> int | None:
    """Steps of the first epoch whose AP reaches ``target`` (evaluated once per epoch), or None."""
    for epoch, value in enumerate(ap, start=1):
        if value >= target:
            return epoch * steps_per_epoch
    return None


def markdown(results: dict, steps_per_epoch: int) -> str:
    runs, timing = results.get("runs", {}), results.get("timing", {})
    lines = []
    if runs:
        epochs = max(len(r["ap"]) for r in runs.values())
        baseline = runs.get("quickstart")
        target = baseline["ap"][-1] if baseline else None
        head = "| variant | " + " | ".join(f"AP ep{e}" for e in range(1, epochs + 1)) + " | steps to quickstart's final AP | wall min |"
        lines += [head, "|" + "---|" * (epochs + 3)]
        for name, r in runs.items():
            reach = steps_to_reach(r["ap"], target, steps_per_epoch) if target is not None else None
            total = steps_per_epoch * len(r["ap"])
            reached = f"{reach} ({100 * reach / total:.0f} %)" if reach else "not reached"
            cells = " | ".join(f"{v:.3f}" for v in r["ap"])
            lines.append(f"| {name} | {cells} | {reached} | {r['wall_s'] / 60:.1f} |")
    if timing:
        lines += ["", "| variant | train step s (median) | vs quickstart | inference s (median, 16 images) | vs quickstart |",
                  "|---|---|---|---|---|"]
        base = timing.get("quickstart")
        for name, t in timing.items():
            ratio_step = f"{t['train_step_s'] / base['train_step_s']:.2f}x" if base else ""
            ratio_infer = f"{t['infer_s'] / base['infer_s']:.2f}x" if base else ""
            lines.append(f"| {name} | {t['train_step_s']:.3f} | {ratio_step} | {t['infer_s']:.4f} | {ratio_infer} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: the quickstart's 8)")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per epoch for a quick try (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: two oversubscribe a busy 2-core box)")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained side by side (1 = one after the other)")
    parser.add_argument("--timing-repeats", type=int, default=10)
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--collect", action="store_true", help="only print the table of the runs in --work-dir")
    parser.add_argument("--timing-json", default=None, help="with --collect: a --timing-only run's --out")
    parser.add_argument("--max-load", type=float, default=2.5, help="start each run below this 1-minute load")
    parser.add_argument("--max-wait-s", type=float, default=3600.0, help="give up waiting for quiet after this")
    parser.add_argument("--work-dir", default="runs/dino_ablation", help="the runs' folders (one per variant)")
    parser.add_argument("--out", default="bench/dino_ablation.json")
    args = parser.parse_args(argv)

    results: dict = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loads": {}}
    if args.collect:  # the table of runs already in --work-dir (e.g. of an interrupted invocation), with --timing-json
        runs = {}
        for name in args.variants:
            if (ROOT / args.work_dir / name / "metrics.jsonl").is_file():
                run = read_run(ROOT / args.work_dir / name)
                runs[name] = {"wall_s": sum(run["epoch_time_s"]), **run}
        timing = json.loads(Path(args.timing_json).read_text())["timing"] if args.timing_json else {}
        print(markdown({"runs": runs, "timing": timing}, args.max_steps or 128))
        return 0
    steps_per_epoch = (args.max_steps or 128)
    if not args.timing_only:
        results["runs"] = train_all(args)
    results["loads"]["timing"] = wait_for_quiet(args.max_load, 30.0, args.max_wait_s)
    results["timing"] = time_variants(args.variants, args.timing_repeats, args.threads, ROOT / args.work_dir / "data")
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out = ROOT / args.out
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    print(markdown(results, steps_per_epoch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
