#!/usr/bin/env bash
# Process reward model on the toy stepwise data of toy:add (one step per answer digit, half the rows wrong from some
# digit on), from the fully trained toy SFT model: prm.py's defaults (every step labelled) and
# --train_on_last_step_only True (outcome labels only), 3 seeds. Held-out step accuracy (every step of 512 held-out
# rows), per true class, and the outcome accuracy of the minimum-aggregated score (the prm: reward's decision at 0.5).
# Runs go to runs/bench/prm/; curves, a table and a README to benchmarks/results/prm/.
#   bash benchmarks/prm.sh                                    # 6 runs, 2 at a time
#   SEEDS=1 bash benchmarks/prm.sh                           # the short version (1 seed)
#   NAMES=all_steps SEEDS="2 3" bash benchmarks/prm.sh       # one configuration, some seeds
#   PLOT_ONLY=1 bash benchmarks/prm.sh
# Every invocation appends its command and the load average to $OUT/load.txt; the table covers every run folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
MAX_STEPS=${MAX_STEPS:-2000}
NAMES=${NAMES:-"all_steps last_step"}
RUNS=${RUNS:-runs/bench/prm}
OUT=${OUT:-benchmarks/results/prm}
mkdir -p "$RUNS" "$OUT"
COMMON="--max_steps $MAX_STEPS --eval_steps 100 --logging_steps 20 --save_steps 0 --overwrite_output_dir True"

if [ -z "${PLOT_ONLY:-}" ]; then
  echo "\`NAMES=\"${NAMES}\" SEEDS=\"${SEEDS}\" MAX_STEPS=${MAX_STEPS} PARALLEL=${PARALLEL} bash benchmarks/prm.sh\` ($(date -u +%H:%M) UTC): load average (1, 5, 15 min) at the start $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/load.txt"
  python -c "from common import toy; toy.toy_sft_full_path('add')"  # build the backbone once, outside the timings
  cmds=()
  declare -A FLAGS=([all_steps]="" [last_step]="--train_on_last_step_only True")
  for name in $NAMES; do
    for seed in $SEEDS; do
      cmds+=("python algos/prm.py --seed $seed $COMMON ${FLAGS[$name]} --output_dir $RUNS/${name}__$seed")
    done
  done
  printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
  echo "  ... at the end ($(date -u +%H:%M) UTC): $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/load.txt"
fi

python benchmarks/plot.py --runs "all steps=$RUNS/all_steps__*" "last step only=$RUNS/last_step__*" \
    --metrics eval/accuracy eval/outcome_accuracy eval/accuracy_correct_steps eval/accuracy_incorrect_steps loss \
    --out "$OUT"
{
  echo "# Process reward model on toy:add stepwise data"
  echo
  echo "Commands (OMP_NUM_THREADS=${OMP_NUM_THREADS}) and the load average while they ran:"
  echo
  sed 's/^/    /' "$OUT/load.txt"
  echo
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  echo "Backbone: toy-sft-full with a fresh two-class token head; ${MAX_STEPS} steps of 64 rows, learning rate 2e-4."
  echo "eval/accuracy: argmax at every step separator of 512 held-out rows (test split; every step labelled, also for"
  echo "the last-step-only runs); eval/accuracy_{correct,incorrect}_steps: the same per true class;"
  echo "eval/outcome_accuracy: min over the steps of P(correct) > 0.5 against 'every step correct'."
  echo "Wall times were measured with other jobs sharing the cores (load above)."
  echo
  cat "$OUT/table.md"
  echo
  echo "![held-out step accuracy vs step](eval_accuracy_vs_step.png) ![outcome accuracy vs step](eval_outcome_accuracy_vs_step.png)"
  if [ -f "$OUT/analysis.md" ]; then echo; cat "$OUT/analysis.md"; fi
} > "$OUT/README.md"
cat "$OUT/README.md"
