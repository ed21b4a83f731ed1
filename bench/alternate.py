"""Compare two checkouts of detr_kit by running ``python -m bench`` in each, alternately, several rounds.

    python -m bench.alternate /path/to/other/checkout --rounds 3 -- --cases train infer

On one shared machine a single benchmark run swings by +-25 %; alternating the checkouts round by round spreads
that drift over both, and the medians over rounds of the peer ratios (the peer runs in the same invocation as
ours) and of the peak memory are compared. Each run's JSON is kept as ``bench/results_alternate_<label><round>.json``
of its checkout; the summary prints as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(checkout: Path, label: str, round_index: int, bench_args: list[str]) -> list[dict]:
    out = f"bench/results_alternate_{label}{round_index}.json"
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    started = time.time()
    subprocess.run([sys.executable, "-m", "bench", *bench_args, "--out", out], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    print(f"{label} round {round_index}: {time.time() - started:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    return json.loads((checkout / out).read_text())


def ratios(records: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (case, model): ours' median seconds and peak RSS, and the peer's time over ours."""
    ours = {(r["case"], r["model"]): r for r in records if r.get("impl") == "ours" and "median_s" in r}
    peer = {(r["case"], r["model"]): r for r in records if r.get("impl") == "hf" and "median_s" in r}
    return {
        key: {"ours_s": r["median_s"], "rss_mb": r["peak_rss_mb"],
              "peer_ratio": peer[key]["median_s"] / r["median_s"] if key in peer else float("nan"),
              "peer_rss_ratio": r["peak_rss_mb"] / peer[key]["peak_rss_mb"] if key in peer else float("nan")}
        for key, r in ours.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (e.g. the code before a change)")
    parser.add_argument("--rounds", type=int, default=3)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1:]  # after --: arguments of python -m bench
    checkouts = {"other": args.other.resolve(), "this": ROOT}
    results: dict[str, list[dict]] = {"other": [], "this": []}
    for round_index in range(args.rounds):
        order = ("other", "this") if round_index % 2 == 0 else ("this", "other")
        for label in order:
            results[label].append(ratios(run_bench(checkouts[label], label, round_index, bench_args)))
    keys = sorted(set().union(*(r.keys() for rounds in results.values() for r in rounds)))
    print("\n| case | model | checkout | ours median s (rounds) | peer / ours (rounds) | median ratio | "
          "peak RSS MB | RSS / peer's |")
    print("|---|---|---|---|---|---|---|---|")
    for key in keys:
        for label in ("other", "this"):
            rows = [r[key] for r in results[label] if key in r]
            if not rows:
                continue
            times = ", ".join(f"{row['ours_s']:.2f}" for row in rows)
            peer = ", ".join(f"{row['peer_ratio']:.2f}" for row in rows)
            print(f"| {key[0]} | {key[1]} | {label} | {times} | {peer} | "
                  f"{statistics.median(row['peer_ratio'] for row in rows):.2f}x | "
                  f"{statistics.median(row['rss_mb'] for row in rows):.0f} | "
                  f"{statistics.median(row['peer_rss_ratio'] for row in rows):.3f} |")


if __name__ == "__main__":
    main()
