#!/usr/bin/env bash
# Two checkouts of detr_kit, alternately, by process CPU time (user + sys, one thread) and peak RSS of
# bench.worker runs: a comparison that a shared, loaded machine disturbs far less than wall time.
#   bash bench/ab_cpu_time.sh /path/to/before /path/to/after [rounds] > ab.txt
set -euo pipefail
before=$(cd "$1" && pwd); after=$(cd "$2" && pwd); rounds=${3:-2}
for round in $(seq 1 "$rounds"); do
  order="$before $after"; [ $((round % 2)) = 0 ] && order="$after $before"
  for checkout in $order; do
    for case in "train deformable" "infer deformable" "train deformable_two_stage"; do
      # shellcheck disable=SC2086  # $case is two words: the case and the model
      line=$(cd "$checkout" && { PYTHONPATH="$checkout" OMP_NUM_THREADS=1 /usr/bin/time -f "CPU %U %S" \
        python -m bench.worker $case ours --repeats 4 --warmup 1 --threads 1; } 2>&1 | grep -E "^\{|^CPU" | tr '\n' ' ')
      echo "$round $checkout $case :: $line :: load $(cut -d' ' -f1 /proc/loadavg)"
    done
  done
done
