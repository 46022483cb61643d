#!/usr/bin/env bash
# Process reward model on the toy stepwise data of toy:add (one step per answer digit, half the rows wrong from some
# digit on), from the fully trained toy SFT model: prm.py's defaults (every step labelled) and
# --train_on_last_step_only True (outcome labels only), 3 seeds. Held-out step accuracy (every step of 512 held-out
# rows), per true class, and the outcome accuracy of the minimum-aggregated score (the prm: reward's decision at 0.5).
# Runs go to runs/bench/prm/; curves, a table and a README to benchmarks/results/prm/.
#   bash benchmarks/prm.sh                                    # 6 runs, 2 at a time
#   SEEDS=1 bash benchmarks/prm.sh                           # the short version (1 seed)
#   PLOT_ONLY=1 bash benchmarks/prm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
MAX_STEPS=${MAX_STEPS:-2000}
RUNS=${RUNS:-runs/bench/prm}
OUT=${OUT:-benchmarks/results/prm}
mkdir -p "$RUNS" "$OUT"
COMMON="--max_steps $MAX_STEPS --eval_steps 100 --logging_steps 20 --save_steps 0 --overwrite_output_dir True"

if [ -z "${PLOT_ONLY:-}" ]; then
  echo "load average (1, 5, 15 min) at the start: $(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/load.txt"
  python -c "from common import toy; toy.toy_sft_full_path('add')"  # build the backbone once, outside the timings
  cmds=()
  for seed in $SEEDS; do
    cmds+=("python algos/prm.py --seed $seed $COMMON --output_dir $RUNS/all_steps__$seed")
    cmds+=("python algos/prm.py --seed $seed $COMMON --train_on_last_step_only True --output_dir $RUNS/last_step__$seed")
  done
  printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
fi

python benchmarks/plot.py --runs "all steps=$RUNS/all_steps__*" "last step only=$RUNS/last_step__*" \
    --metrics eval/accuracy eval/outcome_accuracy eval/accuracy_correct_steps eval/accuracy_incorrect_steps loss \
    --out "$OUT"
{
  echo "# Process reward model on toy:add stepwise data"
  echo
  echo "Command: \`SEEDS=\"${SEEDS}\" MAX_STEPS=${MAX_STEPS} PARALLEL=${PARALLEL} bash benchmarks/prm.sh\` (OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  echo "Backbone: toy-sft-full with a fresh two-class token head; ${MAX_STEPS} steps of 64 rows, learning rate 2e-4."
  echo "eval/accuracy: argmax at every step separator of 512 held-out rows (test split; every step labelled, also for"
  echo "the last-step-only runs); eval/accuracy_{correct,incorrect}_steps: the same per true class;"
  echo "eval/outcome_accuracy: min over the steps of P(correct) > 0.5 against 'every step correct'."
  echo "Wall times were measured with other jobs sharing the cores; $(cat "$OUT/load.txt" 2>/dev/null || echo "load not recorded")."
  echo
  cat "$OUT/table.md"
  echo
  echo "![held-out step accuracy vs step](eval_accuracy_vs_step.png) ![outcome accuracy vs step](eval_outcome_accuracy_vs_step.png)"
} > "$OUT/README.md"
cat "$OUT/README.md"
