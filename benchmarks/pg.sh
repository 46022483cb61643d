#!/usr/bin/env bash
# Group-sampled policy gradient with the toy gold reward: GRPO, GMPO and RLOO, each with its script's defaults
# (toy SFT policy on toy:add, exact-match reward), 3 seeds each. Runs go to runs/bench/pg/, curves of the held-out
# greedy gold reward and the training reward vs step and vs wall time, and a table (start/final, time, peak memory)
# to benchmarks/results/pg/.
#   bash benchmarks/pg.sh               # 9 runs, 2 at a time, then the plots
#   PARALLEL=1 bash benchmarks/pg.sh    # one run at a time (cleaner wall-time numbers)
#   PLOT_ONLY=1 bash benchmarks/pg.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
RUNS=runs/bench/pg
OUT=benchmarks/results/pg
mkdir -p "$RUNS" "$OUT"

if [ -z "${PLOT_ONLY:-}" ]; then
  python -c "from common import toy; toy.toy_policy_path('add')"  # build the starting policy once, outside the timings
  cmds=()
  for seed in $SEEDS; do
    for algo in grpo gmpo rloo; do
      cmds+=("python algos/$algo.py --seed $seed --output_dir $RUNS/${algo}__$seed")
    done
  done
  printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
fi

python benchmarks/plot.py --runs "grpo=$RUNS/grpo__*" "gmpo=$RUNS/gmpo__*" "rloo=$RUNS/rloo__*" \
    --metrics eval/gold_reward reward tokens_per_second/generation tokens_per_second/training --out "$OUT"
{
  echo "# GRPO, GMPO, RLOO on toy:add (default runs)"
  echo
  echo "Command: \`bash benchmarks/pg.sh\` (PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  echo "Start: the toy SFT policy toy-sft ($(python -c "from common import toy; print(toy.toy_policy_path('add').name)")). eval/gold_reward: greedy exact match on 256 held-out prompts;"
  echo "reward: mean gold reward of the sampled training completions (temperature 1)."
  echo "tokens_per_second: completion tokens generated per second of sampling, and trained per second of update."
  echo "Wall times include the 7 held-out evaluations and were measured with other jobs sharing the cores."
  echo
  cat "$OUT/table.md"
  echo
  echo "![held-out gold reward vs step](eval_gold_reward_vs_step.png) ![vs time](eval_gold_reward_vs_time.png)"
  echo "![training reward vs step](reward_vs_step.png)"
} > "$OUT/README.md"
cat "$OUT/README.md"
