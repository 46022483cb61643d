#!/usr/bin/env bash
# ORPO on toy:add, 3 seeds each: the default (SFT term on prompt + chosen, as TRL), the SFT term on the chosen
# completion only (--disable_prompt_loss True), and the control λ = 0 (the SFT term alone, no odds ratio), each from
# the toy SFT policy with orpo.py's defaults (λ 0.1, 64 pairs per step, lr 1e-4, 200 steps). Runs go to
# runs/bench/orpo/; curves of the held-out greedy gold reward, the held-out reward accuracy, the NLL and the
# log-odds terms vs step and vs wall time, and a table, go to benchmarks/results/orpo/.
#   bash benchmarks/orpo.sh                              # 9 runs, 2 at a time, then the plots
#   SEEDS=1 bash benchmarks/orpo.sh                      # a short look (one seed)
#   PARALLEL=1 bash benchmarks/orpo.sh                   # one run at a time (cleaner wall-time numbers)
#   PLOT_ONLY=1 bash benchmarks/orpo.sh
#   SKIP_DONE=1 bash benchmarks/orpo.sh                   # only the runs without a finished folder (perf.json)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
MAX_STEPS=${MAX_STEPS:-200}
EVAL_STEPS=${EVAL_STEPS:-25}
RUNS=runs/bench/orpo
OUT=benchmarks/results/orpo
mkdir -p "$RUNS" "$OUT"

declare -A CONFIGS=(
  [orpo]=""
  [orpo_completion_nll]="--disable_prompt_loss True"
  [nll_only]="--beta 0"
)
ORDER=${ORDER:-"orpo orpo_completion_nll nll_only"}  # a subset: ORDER="orpo ..." bash benchmarks/orpo.sh

if [ -z "${PLOT_ONLY:-}" ]; then
  python -c "from common import toy; toy.toy_policy_path('add')"  # build the starting policy once, outside the timings
  cmds=()
  for seed in $SEEDS; do
    for name in $ORDER; do
      [ -n "${SKIP_DONE:-}" ] && [ -f "$RUNS/${name}__$seed/perf.json" ] && continue
      cmds+=("python algos/orpo.py ${CONFIGS[$name]} --seed $seed --max_steps $MAX_STEPS --eval_steps $EVAL_STEPS \
--output_dir $RUNS/${name}__$seed --overwrite_output_dir True")
    done
  done
  [ ${#cmds[@]} -eq 0 ] || printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
fi

runs=()
for name in $ORDER; do runs+=("$name=$RUNS/${name}__*"); done
python benchmarks/plot.py --runs "${runs[@]}" --metrics eval/gold_reward eval/rewards/accuracies eval/nll_loss \
    log_odds_ratio log_odds_chosen rewards/margins --out "$OUT"
{
  echo "# ORPO on toy:add (orpo.py defaults)"
  echo
  echo "Command: \`SEEDS=\"$SEEDS\" MAX_STEPS=$MAX_STEPS bash benchmarks/orpo.sh\` (PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)'). Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Start: the toy SFT policy (toy-sft); data: toy:add preference pairs (chosen = the right sum, rejected = a near miss);"
  echo "λ 0.1, 64 pairs per step, lr 1e-4 (constant), no reference model. orpo: SFT term on prompt + chosen (TRL);"
  echo "orpo_completion_nll: --disable_prompt_loss True; nll_only: --beta 0 (the SFT term of orpo alone)."
  echo "eval/gold_reward: greedy exact match on 256 held-out prompts; eval/rewards/accuracies: fraction of 512 held-out"
  echo "pairs with S̄_w > S̄_l; eval/nll_loss: the SFT term on those pairs (its tokens differ between the configurations)."
  echo
  cat "$OUT/table.md"
  echo
  echo "![held-out gold reward vs step](eval_gold_reward_vs_step.png) ![vs time](eval_gold_reward_vs_time.png)"
  echo "![held-out reward accuracy vs step](eval_rewards_accuracies_vs_step.png) ![log σ of the log odds ratio](log_odds_ratio_vs_step.png)"
} > "$OUT/benchmark.md"
cat "$OUT/benchmark.md"
