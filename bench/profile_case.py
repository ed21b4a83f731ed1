"""Profile one benchmark case, ours and the peer: ``python -m bench.profile_case infer detr --device cuda``.

Prints the mean wall time over 5 iterations after 3 warm-ups, then a ``torch.profiler`` table of one iteration
sorted by device time (CPU time on the CPU), and on CUDA the number of kernel launches and synchronisations:
where the wall time is far above the summed kernel time, the step is launch-bound, not compute-bound.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.worker import hf_inference, hf_train_step, ours_inference, ours_train_step, synchronize


def run(name: str, fn, device: torch.device, rows: int) -> None:
    for _ in range(3):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        fn()
    synchronize(device)
    print(f"== {name}: {(time.perf_counter() - start) / 5 * 1e3:.1f} ms per iteration")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.key_averages()
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=50))
    if device.type == "cuda":
        launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel"))
        syncs = {e.key: e.count for e in events if "Synchronize" in e.key}
        print(f"kernel launches: {launches}; synchronisations: {syncs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["train", "infer"])
    parser.add_argument("model", choices=["detr", "deformable", "deformable_two_stage"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.case == "infer":
        cases = {"ours": ours_inference(args.model, 800, 1066, [], device), "hf": hf_inference(args.model, 800, 1066, device)}
    else:
        cases = {"ours": ours_train_step(args.model, 2, 512, [], device), "hf": hf_train_step(args.model, 2, 512, device)}
    for impl, fn in cases.items():
        run(f"{impl} {args.model} {args.case} on {device}", fn, device, args.rows)


if __name__ == "__main__":
    main()
