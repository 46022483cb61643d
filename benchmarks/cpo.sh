#!/usr/bin/env bash
# CPO, SimPO, CPO-SimPO and AlphaPO on toy:add, 3 seeds each, from the toy SFT policy with cpo.py's defaults
# (64 pairs per step, lr 1e-4, 200 steps) and these loss settings:
#   cpo        --loss_type sigmoid, β 0.1, cpo_alpha 1 (the defaults)
#   simpo      --loss_type simpo, β 2, γ 1 (γ/β = 0.5, the SimPO paper's range), cpo_alpha 0
#   cpo_simpo  the same with cpo_alpha 1
#   alphapo    simpo with --alpha 0.25
# Runs go to runs/bench/cpo/; curves of the held-out greedy gold reward, the held-out reward accuracy and margins and
# the chosen NLL vs step and vs wall time, and a table, go to benchmarks/results/cpo/.
#   bash benchmarks/cpo.sh                               # 12 runs, 2 at a time, then the plots
#   SEEDS=1 bash benchmarks/cpo.sh                       # a short look (one seed)
#   PARALLEL=1 bash benchmarks/cpo.sh                    # one run at a time (cleaner wall-time numbers)
#   PLOT_ONLY=1 bash benchmarks/cpo.sh
#   SKIP_DONE=1 bash benchmarks/cpo.sh                   # only the runs without a finished folder (perf.json)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
MAX_STEPS=${MAX_STEPS:-200}
EVAL_STEPS=${EVAL_STEPS:-25}
RUNS=runs/bench/cpo
OUT=benchmarks/results/cpo
mkdir -p "$RUNS" "$OUT"

SIMPO="--loss_type simpo --beta 2.0 --simpo_gamma 1.0"
declare -A CONFIGS=(
  [cpo]=""
  [simpo]="$SIMPO --cpo_alpha 0"
  [cpo_simpo]="$SIMPO --cpo_alpha 1"
  [alphapo]="$SIMPO --cpo_alpha 0 --alpha 0.25"
)
ORDER=${ORDER:-"cpo simpo cpo_simpo alphapo"}  # a subset: ORDER="cpo ..." bash benchmarks/cpo.sh

if [ -z "${PLOT_ONLY:-}" ]; then
  python -c "from common import toy; toy.toy_policy_path('add')"  # build the starting policy once, outside the timings
  cmds=()
  for seed in $SEEDS; do
    for name in $ORDER; do
      [ -n "${SKIP_DONE:-}" ] && [ -f "$RUNS/${name}__$seed/perf.json" ] && continue
      cmds+=("python algos/cpo.py ${CONFIGS[$name]} --seed $seed --max_steps $MAX_STEPS --eval_steps $EVAL_STEPS \
--output_dir $RUNS/${name}__$seed --overwrite_output_dir True")
    done
  done
  [ ${#cmds[@]} -eq 0 ] || printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
fi

runs=()
for name in $ORDER; do runs+=("$name=$RUNS/${name}__*"); done
python benchmarks/plot.py --runs "${runs[@]}" --metrics eval/gold_reward eval/rewards/accuracies eval/rewards/margins \
    eval/nll_loss rewards/accuracies --out "$OUT"
{
  echo "# CPO, SimPO, CPO-SimPO and AlphaPO on toy:add (cpo.py)"
  echo
  echo "Command: \`SEEDS=\"$SEEDS\" MAX_STEPS=$MAX_STEPS bash benchmarks/cpo.sh\` (PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)'). Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Start: the toy SFT policy (toy-sft); data: toy:add preference pairs (chosen = the right sum, rejected = a near miss);"
  echo "64 pairs per step, lr 1e-4 (constant), no reference model. cpo: sigmoid, β 0.1, cpo_alpha 1; simpo: β 2, γ 1,"
  echo "cpo_alpha 0; cpo_simpo: the same with cpo_alpha 1; alphapo: simpo with α 0.25."
  echo "eval/gold_reward: greedy exact match on 256 held-out prompts; eval/rewards/accuracies: fraction of 512 held-out"
  echo "pairs with r_w > r_l (sums for cpo, mean log-probs for the others); eval/nll_loss: NLL of the chosen completions."
  echo
  cat "$OUT/table.md"
  echo
  echo "![held-out gold reward vs step](eval_gold_reward_vs_step.png) ![vs time](eval_gold_reward_vs_time.png)"
  echo "![held-out reward accuracy vs step](eval_rewards_accuracies_vs_step.png) ![chosen NLL](eval_nll_loss_vs_step.png)"
} > "$OUT/benchmark.md"
cat "$OUT/benchmark.md"
