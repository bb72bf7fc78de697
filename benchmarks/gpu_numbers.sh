#!/usr/bin/env bash
# The GPU numbers of benchmarks/RESULTS.md (issues 4, 5 and 6), in stages, on one machine:
#   bash benchmarks/gpu_numbers.sh speed    # throughput.py (eager, then compiled), latency.py, ema_update.py
#   bash benchmarks/gpu_numbers.sh teacher  # the teacher alone (configs/fmnist/teacher.yaml)
#   bash benchmarks/gpu_numbers.sh train    # the teacher, then the KD student (configs/fmnist/{teacher,kd}.yaml)
#   bash benchmarks/gpu_numbers.sh sweep    # both temperature sweeps
#   bash benchmarks/gpu_numbers.sh levers   # issue 17: each recipe lever against the KD recipe
#   bash benchmarks/gpu_numbers.sh losses   # issue 17: KD, DKD, logit standardisation, DIST
#   bash benchmarks/gpu_numbers.sh teachers # issue 17: label-smoothed and random-erasing teachers, a 2-teacher ensemble
#   bash benchmarks/gpu_numbers.sh small    # issue 17: StudentNet at 100k and 50k parameters, with 3 pools and with 2
#   bash benchmarks/gpu_numbers.sh prune    # prune-distill to 100k and to 50k, side by side (from `train`'s student)
#   bash benchmarks/gpu_numbers.sh front    # prune-distill to a latency on the GPU against the width family (issue 15)
#   bash benchmarks/gpu_numbers.sh sweep prune   # the stages in turn
# Each stage first trains the teachers (and students) it starts from, unless fmnist_recipes.py finished them, and
# skips what is already done (the sweeps and prune-distill resume). Logs go to runs/logs/;
# when $OUT is set (the project's GPU tool), the tables and plots are copied there. Fashion-MNIST's four
# .gz files carried in .data/fashion-mnist/ are copied to where the data module looks (~/.cache/distill).
# A teacher or KD student trained here goes into $OUT in parts (benchmarks/carry.py); copied into .data/carry/ and
# carried with the next call, it is unpacked first, and that call starts from it instead of training it again.
# RECIPES_ARGS adds options to benchmarks/fmnist_recipes.py (wherever a stage trains a recipe); a dry run on a CPU
# (2 cores, 2026-12-07: `levers` 6.5 min, then `train prune` about 7 min, with PATH holding the venv's python):
#   export RECIPES_ARGS="--teacher-epochs 1 --student-epochs 1 --limit 0.005" WORKERS=2 OMP_NUM_THREADS=1
#   LEVERS_OVERRIDES='{trainer: {max_epochs: 1, limit_train_batches: 2, limit_val_batches: 1, limit_test_batches: 1}}' \
#     bash benchmarks/gpu_numbers.sh levers
#   PRUNE_ARGS='--rounds 1 --epochs_per_round 1 --final_epochs 0 --overrides {"trainer":{"limit_train_batches":2,"limit_val_batches":1,"limit_test_batches":1}}' \
#     bash benchmarks/gpu_numbers.sh train prune
set -euo pipefail
stages="speed teacher train sweep levers losses teachers small prune front"
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu_numbers.sh STAGE... (stages: $stages)" >&2; exit 2; }
for stage in "$@"; do  # all checked before anything runs
  [[ $stage =~ ^[a-z]+$ && " $stages " == *" $stage "* ]] || { echo "unknown stage '$stage': choose from $stages" >&2; exit 2; }
done
cd "$(dirname "$0")/.."
mkdir -p runs/logs
if [ -d .data/fashion-mnist ]; then
  mkdir -p ~/.cache/distill/fashion-mnist && cp -u .data/fashion-mnist/*.gz ~/.cache/distill/fashion-mnist/
elif [ -z "$(ls /usr/share/datasets/fashion-mnist/*.gz ~/.cache/distill/fashion-mnist/*.gz 2>/dev/null)" ]; then
  echo "warning: no Fashion-MNIST here (carry its four .gz files in .data/fashion-mnist): runs will try to download it" >&2
fi
if [ -d .data/carry ]; then  # recipes an earlier call trained: its teacher (and student), not trained again
  python benchmarks/carry.py unpack .data/carry || echo "warning: nothing unpacked; the stages train what they need" >&2
fi
# Every process is Python-bound on the CPU: a few threads each, or parallel runs stall one another.
# A sweep's trials are shared by WORKERS processes on the one GPU (default 6; up to one per CPU core,
# e.g. WORKERS=15 OMP_NUM_THREADS=1 runs all 15 trials of `levers` at once on a 16-core machine).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
WORKERS=${WORKERS:-6}
distill=(python -m distill.cli)
runs=()  # the runs started in the background, for wait_runs
wait_runs() {  # wait for them (a failed run shows in its log and its table)
  [ ${#runs[@]} -eq 0 ] || wait "${runs[@]}" || true
  runs=()
}
collect() {  # into $OUT, named after their path: runs/fmnist/kd/x.csv -> kd_x.csv (a missing file is skipped)
  local f
  if [ -n "${OUT:-}" ]; then
    for f in "$@"; do [ ! -f "$f" ] || cp "$f" "$OUT/$(echo "${f#runs/fmnist/}" | tr / _)"; done
  fi
}
sweep_workers() {  # sweep_workers CONFIG RUN [OVERRIDES]: $WORKERS workers share the grid
  local opts=() worker
  [ -n "${3:-}" ] && opts=(--overrides "$3")
  for worker in $(seq "$WORKERS"); do
    "${distill[@]}" sweep --config "configs/fmnist/$1.yaml" "${opts[@]}" >"runs/logs/$2.$worker.log" 2>&1 &
    runs+=($!)
    sleep 1
  done
}
logs_tail() {  # the end of every log into $OUT (progress bars included: how far each run got, and how fast)
  local f
  for f in runs/logs/*.log runs/fmnist/*.log runs/fmnist/*/metrics.csv; do
    [ -f "$f" ] && printf '== %s\n%s\n' "$f" "$(tail -c 1500 "$f" | tr '\r' '\n' | tail -n 8)"
  done >"$OUT/logs_tail.txt" || true
}
# Every 30 s and at the end, so that a call stopped at its time limit still tells how far each run got.
if [ -n "${OUT:-}" ]; then
  (exec >/dev/null 2>&1; while sleep 30; do logs_tail; done) &
  reporter=$!
  too_many() {  # the device tool returns at most 8 files from $OUT
    local n
    n=$(find "$OUT" -type f | wc -l)
    [ "$n" -le 8 ] || echo "warning: $n files in \$OUT, more than the 8 that come back: run fewer stages per call" >&2
  }
  trap 'kill $reporter 2>/dev/null || true; logs_tail; too_many' EXIT
fi
untrained() {  # the recipes among "$@" that benchmarks/fmnist_recipes.py has not finished training
  local recipe
  for recipe in "$@"; do [ -f "runs/fmnist/$recipe/finished" ] || echo "$recipe"; done
}
recipes() {  # recipes LOG TEACHERS STUDENTS: train those not trained yet (benchmarks/fmnist_recipes.py), print the table
  local teachers students status=0
  # shellcheck disable=SC2086
  teachers=$(untrained $2) students=$(untrained $3)
  # the teachers first, and into $OUT before the students train: a call stopped meanwhile still returns them
  if [ -n "$teachers" ]; then
    # shellcheck disable=SC2086
    python benchmarks/fmnist_recipes.py --teachers $teachers --students ${RECIPES_ARGS:-} 2>&1 |
      tee -a "runs/logs/$1.log" || status=$?
    # shellcheck disable=SC2086
    carry_out $teachers
  fi
  if [ -n "$students" ] && [ $status -eq 0 ]; then
    # shellcheck disable=SC2086
    python benchmarks/fmnist_recipes.py --teachers --students $students ${RECIPES_ARGS:-} 2>&1 |
      tee -a "runs/logs/$1.log" || status=$?
    # shellcheck disable=SC2086
    carry_out $students
  fi
  collect runs/fmnist/recipes.md
  return $status
}
carry_out() {  # carry_out RECIPE...: the finished teacher and KD student among them into $OUT, for the next call
  local recipe
  [ -n "${OUT:-}" ] || return 0
  for recipe in "$@"; do
    [ -f "runs/fmnist/$recipe/finished" ] || continue
    # the teacher's 45 MB of float32 weights in float16, 2 parts (--check: how much that changes its predictions);
    # the student's 1 MB as it is. A failure costs the next call the recipe, not this call its stage.
    case $recipe in
    teacher) python benchmarks/carry.py pack "$OUT" teacher --half --check 2>&1 | tee -a runs/logs/carry.log ;;
    kd) python benchmarks/carry.py pack "$OUT" kd 2>&1 | tee -a runs/logs/carry.log ;;
    esac || echo "packing $recipe failed: see runs/logs/carry.log"
  done
}
report() {  # report RUN: the sweep's table, and its files into $OUT
  if [ -f "runs/fmnist/$1/sweep.md" ]; then cat "runs/fmnist/$1/sweep.md"; else echo "no table: see runs/logs/"; fi
  collect "runs/fmnist/$1/sweep.csv" "runs/fmnist/$1/sweep.png"
}

for stage in "$@"; do
  case $stage in
  speed)
    OMP_NUM_THREADS=4 python benchmarks/throughput.py 2>&1 | tee runs/logs/throughput.log | grep -v "^Loading\|stopped\|LitLogger\|available"
    OMP_NUM_THREADS=4 python benchmarks/latency.py 2>&1 | tee runs/logs/latency.log
    python benchmarks/ema_update.py 2>&1 | tee runs/logs/ema_update.log  # distill.EMA against Lightning's, per update
    # torch.compile of the project's path against the same (eager) plain loop: COMPILE_MODES, e.g. "" to skip
    for mode in ${COMPILE_MODES-default reduce-overhead}; do
      OMP_NUM_THREADS=4 python benchmarks/throughput.py --settings plain project --repeats 2 --compile "$mode" 2>&1 |
        tee "runs/logs/throughput_$mode.log" | grep -v "^Loading\|stopped\|LitLogger\|available" ||
        echo "compile=$mode failed: see runs/logs/throughput_$mode.log"
    done
    collect runs/logs/throughput*.log runs/logs/latency.log runs/logs/ema_update.log
    ;;
  teacher) recipes teacher teacher "" ;;
  train) recipes train teacher kd ;;  # the teacher (30 epochs), then the KD student (60 epochs)
  sweep)
    # SWEEP_OVERRIDES / SWEEP_OVERRIDES_W050 replace the configs' overrides (e.g. fewer epochs);
    # benchmarks/RESULTS.md gives the values of each recorded run.
    recipes teacher teacher ""
    sweep_workers sweep_temperature s10 "${SWEEP_OVERRIDES:-}"
    sweep_workers sweep_temperature_w050 s05 "${SWEEP_OVERRIDES_W050:-}"
    wait_runs
    report sweep_temperature && report sweep_temperature_w050
    ;;
  levers | losses | teachers | small)
    # LEVERS_OVERRIDES / LOSSES_OVERRIDES / TEACHERS_OVERRIDES / SMALL_OVERRIDES replace the configs' overrides (e.g. fewer epochs;
    # repeat the others: sweep_losses.yaml's `data: {init_args: {augment: false}}` keeps the teacher's logits cached)
    if [ "$stage" = teachers ]; then  # the other teachers (30 epochs each), side by side
      recipes teachers "teacher teacher_seed1 teacher_ls teacher_re" ""
    else
      recipes teacher teacher ""
    fi
    overrides_var="$(echo "$stage" | tr a-z A-Z)_OVERRIDES"
    sweep_workers "sweep_$stage" "$stage" "${!overrides_var:-}"
    wait_runs
    report "sweep_$stage"
    ;;
  prune)
    # PRUNE_ARGS adds options to both runs (e.g. a shorter schedule); RESULTS.md gives the recorded values.
    recipes train teacher kd  # both start from the KD student
    # shellcheck disable=SC2086
    "${distill[@]}" prune-distill --config configs/fmnist/prune_distill.yaml ${PRUNE_ARGS:-} >runs/logs/p100.log 2>&1 &
    runs+=($!)
    # shellcheck disable=SC2086
    "${distill[@]}" prune-distill --config configs/fmnist/prune_distill.yaml ${PRUNE_ARGS:-} --target_params 50000 \
      --run_dir runs/fmnist/prune_distill_50k >runs/logs/p50.log 2>&1 &
    runs+=($!)
    wait_runs
    for run in prune_distill prune_distill_50k; do
      cat runs/fmnist/$run/summary.md || echo "no summary: see runs/logs/"
      collect runs/fmnist/$run/rounds.csv runs/fmnist/$run/pareto.png
    done
    ;;
  front)
    # the latency front of issue 15, timed in eager PyTorch on the GPU (FRONT_ARGS adds options)
    # shellcheck disable=SC2086
    python benchmarks/latency_front.py --recipe configs/fmnist/kd.yaml --runtime torch-cuda --train-fraction 1.0 \
      --start-epochs 20 --out runs/fmnist/latency_front ${FRONT_ARGS:-} 2>&1 | tee runs/logs/front.log
    collect runs/logs/front.log
    ;;
  esac
done
