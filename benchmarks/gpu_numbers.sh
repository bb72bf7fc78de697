#!/usr/bin/env bash
# The GPU numbers of benchmarks/RESULTS.md (issues 4, 5 and 6), in stages, on one machine:
#   bash benchmarks/gpu_numbers.sh speed    # throughput.py and latency.py
#   bash benchmarks/gpu_numbers.sh train    # the teacher, then the KD student (configs/fmnist/{teacher,kd}.yaml)
#   bash benchmarks/gpu_numbers.sh sweep    # both temperature sweeps, 4 workers each, beside ...
#                                           # ... prune-distill to 100k and to 50k (needs `train`)
# Each stage skips what is already done (the sweeps and prune-distill resume). Logs go to runs/logs/;
# when $OUT is set (the project's GPU tool), the tables and plots are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/logs
# Every process is Python-bound on the CPU: a few threads each, or parallel runs stall one another.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
distill=(python -m distill.cli)
collect() { [ -n "${OUT:-}" ] && cp "$@" "$OUT"/ 2>/dev/null || true; }

for stage in "$@"; do
  case $stage in
  speed)
    OMP_NUM_THREADS=4 python benchmarks/throughput.py 2>&1 | tee runs/logs/throughput.log | grep -v "^Loading\|stopped\|LitLogger\|available"
    OMP_NUM_THREADS=4 python benchmarks/latency.py 2>&1 | tee runs/logs/latency.log
    collect runs/logs/throughput.log runs/logs/latency.log
    ;;
  train)
    # the teacher (30 epochs), then the KD student (60 epochs), and their table
    [ -f runs/fmnist/kd/best.ckpt ] || python benchmarks/fmnist_recipes.py --teachers teacher --students kd 2>&1 | tee runs/logs/train.log
    ;;
  sweep)
    pids=()
    for config in sweep_temperature sweep_temperature_w050; do
      for worker in 1 2 3 4; do
        "${distill[@]}" sweep --config configs/fmnist/$config.yaml >runs/logs/$config.$worker.log 2>&1 &
        pids+=($!)
        sleep 2
      done
    done
    "${distill[@]}" prune-distill --config configs/fmnist/prune_distill.yaml >runs/logs/prune_100k.log 2>&1 &
    pids+=($!)
    "${distill[@]}" prune-distill --config configs/fmnist/prune_distill.yaml --target_params 50000 \
      --run_dir runs/fmnist/prune_distill_50k >runs/logs/prune_50k.log 2>&1 &
    pids+=($!)
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    for run in sweep_temperature sweep_temperature_w050; do
      cat runs/fmnist/$run/sweep.md 2>/dev/null || tail -n 5 runs/logs/$run.1.log
      for f in sweep.csv sweep.png; do [ -f runs/fmnist/$run/$f ] && cp runs/fmnist/$run/$f runs/logs/$run.$f; done
    done
    for run in prune_distill:100k prune_distill_50k:50k; do
      log=runs/logs/prune_${run#*:}.log run=${run%:*}
      cat runs/fmnist/$run/summary.md 2>/dev/null || tail -n 5 "$log"
      for f in rounds.csv pareto.png; do [ -f runs/fmnist/$run/$f ] && cp runs/fmnist/$run/$f runs/logs/$run.$f; done
    done
    collect runs/logs/*.csv runs/logs/*.png
    exit $status
    ;;
  *) echo "unknown stage $stage (speed, train, sweep)" >&2; exit 2 ;;
  esac
done
