#!/usr/bin/env bash
# V-MPO (K = 2 and K = 4, KL estimators old_policy_ref and ref) and DAR on the toy addition task, 3 seeds each,
# next to GRPO when algos/grpo.py is present. Writes runs under runs/bench/vmpo/ and curves + a table under
# benchmarks/results/vmpo/.
#   bash benchmarks/vmpo.sh            # all runs, then the plots
#   PARALLEL=1 bash benchmarks/vmpo.sh # one run at a time (default: 2 at a time)
#   PLOT_ONLY=1 bash benchmarks/vmpo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
STEPS=${STEPS:-150}
RUNS=runs/bench/vmpo
OUT=benchmarks/results/vmpo
mkdir -p "$RUNS"

# --per_device_train_batch_size counts completions (prompts x K): the default 64 is 32 prompts x K=2, and the K=4 runs
# pass 128 so they keep 32 prompts per step, the batch of the results in benchmarks/results/vmpo/.
cmds=()
for seed in $SEEDS; do
  cmds+=("python algos/vmpo.py --seed $seed --k 2 --kl_estimator old_policy_ref --max_steps $STEPS --output_dir $RUNS/vmpo_k2_oldref__$seed")
  cmds+=("python algos/vmpo.py --seed $seed --k 4 --per_device_train_batch_size 128 --kl_estimator old_policy_ref --max_steps $STEPS --output_dir $RUNS/vmpo_k4_oldref__$seed")
  cmds+=("python algos/vmpo.py --seed $seed --k 2 --kl_estimator ref --max_steps $STEPS --output_dir $RUNS/vmpo_k2_ref__$seed")
  cmds+=("python algos/vmpo.py --seed $seed --k 4 --per_device_train_batch_size 128 --kl_estimator ref --max_steps $STEPS --output_dir $RUNS/vmpo_k4_ref__$seed")
  cmds+=("python algos/dar.py --seed $seed --k 2 --max_steps $STEPS --output_dir $RUNS/dar_k2__$seed")
  if [ -f algos/grpo.py ]; then
    cmds+=("python algos/grpo.py --seed $seed --max_steps $STEPS --output_dir $RUNS/grpo__$seed")
  fi
done

if [ -z "${PLOT_ONLY:-}" ]; then
  running=0
  for c in "${cmds[@]}"; do
    name=$(echo "$c" | sed 's/.*--output_dir //')
    if [ -f "$name/perf.json" ]; then echo "done already: $name"; continue; fi
    echo "+ $c"
    $c > "$name.log" 2>&1 &
    running=$((running + 1))
    if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
  done
  wait
fi

groups=("vmpo K2 old_policy_ref=$RUNS/vmpo_k2_oldref__*" "vmpo K4 old_policy_ref=$RUNS/vmpo_k4_oldref__*"
        "vmpo K2 ref=$RUNS/vmpo_k2_ref__*" "vmpo K4 ref=$RUNS/vmpo_k4_ref__*" "dar K2=$RUNS/dar_k2__*")
if ls -d $RUNS/grpo__* >/dev/null 2>&1; then groups+=("grpo=$RUNS/grpo__*"); fi
python benchmarks/plot.py --runs "${groups[@]}" \
  --metrics eval/gold_reward vmpo/rewards_mean dar/rewards_mean reward vmpo/eta vmpo/alpha vmpo/kl_mean \
            vmpo/weights_kl_uniform kl_ref dar/kl_from_ref \
  --out "$OUT"
