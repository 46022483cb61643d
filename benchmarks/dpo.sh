#!/usr/bin/env bash
# Offline DPO family on toy:add: sigmoid (DPO), ipo, hinge, robust, apo_zero, sppo_hard, discopop and MPO (sigmoid +
# bco_pair + sft), 3 seeds each, each from the toy SFT policy with dpo.py's defaults (β 0.1, 64 pairs per step,
# lr 1e-4, 200 steps). Runs go to runs/bench/dpo/; curves of the held-out greedy gold reward and the held-out and
# training reward accuracy vs step and vs wall time, and a table, go to benchmarks/results/dpo/.
#   bash benchmarks/dpo.sh                               # 24 runs, 2 at a time, then the plots
#   SEEDS=1 MAX_STEPS=60 bash benchmarks/dpo.sh          # a short look (one seed, 60 steps)
#   PARALLEL=1 bash benchmarks/dpo.sh                    # one run at a time (cleaner wall-time numbers)
#   PLOT_ONLY=1 bash benchmarks/dpo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
MAX_STEPS=${MAX_STEPS:-200}
EVAL_STEPS=${EVAL_STEPS:-25}
RUNS=runs/bench/dpo
OUT=benchmarks/results/dpo
mkdir -p "$RUNS" "$OUT"

declare -A CONFIGS=(
  [sigmoid]="--loss_type sigmoid"
  [ipo]="--loss_type ipo"
  [hinge]="--loss_type hinge"
  [robust]="--loss_type robust --label_smoothing 0.1"
  [apo_zero]="--loss_type apo_zero"
  [sppo_hard]="--loss_type sppo_hard"
  [discopop]="--loss_type discopop"
  [mpo]="--loss_type sigmoid bco_pair sft --loss_weights 0.8 0.2 1.0"
)
ORDER="sigmoid ipo hinge robust apo_zero sppo_hard discopop mpo"

if [ -z "${PLOT_ONLY:-}" ]; then
  python -c "from common import toy; toy.toy_policy_path('add')"  # build the starting policy once, outside the timings
  cmds=()
  for seed in $SEEDS; do
    for name in $ORDER; do
      cmds+=("python algos/dpo.py ${CONFIGS[$name]} --seed $seed --max_steps $MAX_STEPS --eval_steps $EVAL_STEPS \
--output_dir $RUNS/${name}__$seed --overwrite_output_dir True")
    done
  done
  printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
fi

runs=()
for name in $ORDER; do runs+=("$name=$RUNS/${name}__*"); done
python benchmarks/plot.py --runs "${runs[@]}" --metrics eval/gold_reward eval/rewards/accuracies rewards/accuracies \
    eval/rewards/margins --out "$OUT"
{
  echo "# DPO loss family on toy:add (dpo.py defaults)"
  echo
  echo "Command: \`SEEDS=\"$SEEDS\" MAX_STEPS=$MAX_STEPS bash benchmarks/dpo.sh\` (PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)'). Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Start: the toy SFT policy (toy-sft); data: toy:add preference pairs (chosen = the right sum, rejected = a near miss);"
  echo "β 0.1, 64 pairs per step, lr 1e-4 (constant), reference = the starting policy."
  echo "eval/gold_reward: greedy exact match on 256 held-out prompts; eval/rewards/accuracies: fraction of 512 held-out"
  echo "pairs with β(Δ_w - Δ_l) > 0; rewards/accuracies: the same on the training batches."
  echo
  cat "$OUT/table.md"
  echo
  echo "![held-out gold reward vs step](eval_gold_reward_vs_step.png) ![vs time](eval_gold_reward_vs_time.png)"
  echo "![held-out reward accuracy vs step](eval_rewards_accuracies_vs_step.png) ![training reward accuracy](rewards_accuracies_vs_step.png)"
} > "$OUT/benchmark.md"
cat "$OUT/benchmark.md"
