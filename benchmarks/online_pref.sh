#!/usr/bin/env bash
# Online preference optimisation on toy:add: online DPO, XPO and Nash-MD, each with its script's defaults (toy SFT
# policy, preferences from the toy reward model toy-rm), 3 seeds each. Runs go to runs/bench/online_pref/; curves of
# the gold reward of the sampled training completions, the held-out greedy gold reward and the KL of the policy's
# samples to the reference, vs step and vs wall time, and a table (start/final, time, peak memory) go to
# benchmarks/results/online_pref/. Batch: --per_device_train_batch_size counts completions; 64 = 32 prompts with a pair
# each, the batch of the recorded results (given explicitly, so the benchmark does not follow a change of default).
#   bash benchmarks/online_pref.sh               # 9 runs, 2 at a time, then the plots
#   PARALLEL=1 bash benchmarks/online_pref.sh    # one run at a time (cleaner wall-time numbers)
#   PLOT_ONLY=1 bash benchmarks/online_pref.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
RUNS=runs/bench/online_pref
OUT=benchmarks/results/online_pref
mkdir -p "$RUNS" "$OUT"

if [ -z "${PLOT_ONLY:-}" ]; then
  # build the starting policy and the reward model once, outside the timings
  python -c "from common import toy; toy.toy_policy_path('add'); toy.toy_reward_model_path('add')"
  cmds=()
  for seed in $SEEDS; do
    for algo in online_dpo xpo nash_md; do
      cmds+=("python algos/$algo.py --seed $seed --per_device_train_batch_size 64 --output_dir $RUNS/${algo}__$seed --overwrite_output_dir True")
    done
  done
  printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
fi

python benchmarks/plot.py --runs "online_dpo=$RUNS/online_dpo__*" "xpo=$RUNS/xpo__*" "nash_md=$RUNS/nash_md__*" \
    --metrics train/gold_reward eval/gold_reward objective/model_kl objective/model_scores --out "$OUT"
{
  echo "# Online DPO, XPO, Nash-MD on toy:add (default runs)"
  echo
  echo "Command: \`bash benchmarks/online_pref.sh\` (PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  echo "Start: the toy SFT policy (toy-sft); preferences from the toy reward model (toy-rm), never from the gold reward."
  echo "Batch: 64 completions per step (32 prompts, one pair each: --per_device_train_batch_size 64), 150 steps."
  echo "train/gold_reward: exact-match rate of the policy's sampled training completions (temperature 1);"
  echo "eval/gold_reward: greedy exact match on 256 held-out prompts; objective/model_kl: mean Σ_t (log π_θ - log π_ref)"
  echo "over the policy's own samples (k1); objective/model_scores: the reward model's mean score of those samples."
  echo "Wall times include the evaluations and were measured with other jobs sharing the 2 cores; peak RSS is per process."
  echo
  cat "$OUT/table.md"
  echo
  echo "![gold reward of samples vs step](train_gold_reward_vs_step.png) ![vs time](train_gold_reward_vs_time.png)"
  echo "![held-out gold reward vs step](eval_gold_reward_vs_step.png) ![vs time](eval_gold_reward_vs_time.png)"
  echo "![KL to the reference vs step](objective_model_kl_vs_step.png) ![reward-model score vs step](objective_model_scores_vs_step.png)"
} > "$OUT/README.md"
cat "$OUT/README.md"
