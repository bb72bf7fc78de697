#!/usr/bin/env bash
# The GPU numbers of benchmarks/RESULTS.md (issues 4, 5 and 6), in stages, on one machine:
#   bash benchmarks/gpu_numbers.sh speed    # throughput.py and latency.py
#   bash benchmarks/gpu_numbers.sh train    # the teacher, then the KD student (configs/fmnist/{teacher,kd}.yaml)
#   bash benchmarks/gpu_numbers.sh sweep    # both temperature sweeps, 6 workers each (needs `train`)
#   bash benchmarks/gpu_numbers.sh levers   # issue 17: each recipe lever against the KD recipe, 6 workers (needs `train`)
#   bash benchmarks/gpu_numbers.sh losses   # issue 17: KD, DKD, logit standardisation, DIST, 6 workers (needs `train`)
#   bash benchmarks/gpu_numbers.sh teachers # issue 17: a label-smoothed teacher and a 2-teacher ensemble (needs `train`)
#   bash benchmarks/gpu_numbers.sh prune    # prune-distill to 100k and to 50k, side by side (needs `train`)
#   bash benchmarks/gpu_numbers.sh front    # prune-distill to a latency on the GPU against the width family (issue 15)
#   bash benchmarks/gpu_numbers.sh sweep prune   # the stages in turn
# Each stage skips what is already done (the sweeps and prune-distill resume). Logs go to runs/logs/;
# when $OUT is set (the project's GPU tool), the tables and plots are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/logs
# Every process is Python-bound on the CPU: a few threads each, or parallel runs stall one another.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
distill=(python -m distill.cli)
collect() {  # into $OUT, named after their path: runs/fmnist/kd/x.csv -> kd_x.csv
  if [ -n "${OUT:-}" ]; then for f in "$@"; do cp "$f" "$OUT/$(echo "${f#runs/fmnist/}" | tr / _)"; done; fi
}
sweep_workers() {  # sweep_workers CONFIG RUN [OVERRIDES]: 6 workers share the grid; then its table
  local opts=() worker
  [ -n "${3:-}" ] && opts=(--overrides "$3")
  for worker in 1 2 3 4 5 6; do
    "${distill[@]}" sweep --config "configs/fmnist/$1.yaml" "${opts[@]}" >"runs/logs/$2.$worker.log" 2>&1 &
    sleep 1
  done
}
report() {  # report RUN: the sweep's table, and its files into $OUT
  cat "runs/fmnist/$1/sweep.md" && collect "runs/fmnist/$1/sweep.csv" "runs/fmnist/$1/sweep.png"
}

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
    # SWEEP_OVERRIDES / SWEEP_OVERRIDES_W050 replace the configs' overrides (e.g. fewer epochs);
    # benchmarks/RESULTS.md gives the values of each recorded run.
    sweep_workers sweep_temperature s10 "${SWEEP_OVERRIDES:-}"
    sweep_workers sweep_temperature_w050 s05 "${SWEEP_OVERRIDES_W050:-}"
    wait || true
    report sweep_temperature && report sweep_temperature_w050
    ;;
  levers | losses | teachers)
    # LEVERS_OVERRIDES / LOSSES_OVERRIDES / TEACHERS_OVERRIDES replace the configs' overrides (e.g. fewer epochs)
    if [ "$stage" = teachers ]; then  # the two other teachers, side by side (30 epochs each), and their table
      [ -f runs/fmnist/teacher_ls/best.ckpt ] && [ -f runs/fmnist/teacher_seed1/best.ckpt ] ||
        python benchmarks/fmnist_recipes.py --teachers teacher_seed1 teacher_ls --students 2>&1 | tee runs/logs/teachers.log
    fi
    overrides_var="$(echo "$stage" | tr a-z A-Z)_OVERRIDES"
    sweep_workers "sweep_$stage" "$stage" "${!overrides_var:-}"
    wait || true
    report "sweep_$stage"
    ;;
  prune)
    # PRUNE_ARGS adds options to both runs (e.g. a shorter schedule); RESULTS.md gives the recorded values.
    # shellcheck disable=SC2086
    "${distill[@]}" prune-distill --config configs/fmnist/prune_distill.yaml ${PRUNE_ARGS:-} >runs/logs/p100.log 2>&1 &
    # shellcheck disable=SC2086
    "${distill[@]}" prune-distill --config configs/fmnist/prune_distill.yaml ${PRUNE_ARGS:-} --target_params 50000 \
      --run_dir runs/fmnist/prune_distill_50k >runs/logs/p50.log 2>&1 &
    wait || true
    for run in prune_distill prune_distill_50k; do
      cat runs/fmnist/$run/summary.md && collect runs/fmnist/$run/rounds.csv runs/fmnist/$run/pareto.png
    done
    ;;
  front)
    # the latency front of issue 15, timed in eager PyTorch on the GPU (FRONT_ARGS adds options)
    # shellcheck disable=SC2086
    python benchmarks/latency_front.py --recipe configs/fmnist/kd.yaml --runtime torch-cuda --train-fraction 1.0 \
      --start-epochs 20 --out runs/fmnist/latency_front ${FRONT_ARGS:-} 2>&1 | tee runs/logs/front.log
    collect runs/logs/front.log
    ;;
  *) echo "unknown stage $stage (speed, train, sweep, levers, losses, teachers, prune, front)" >&2; exit 2 ;;
  esac
done
