#!/usr/bin/env bash
# PPO on the toy addition task, 3 seeds each with the toy reward model (the default run) and with the gold reward
# (--reward_funcs add; the value model then starts from the policy). Same start policy (toy-sft) and the same number
# of samples (150 rollouts x 64 completions = 9600) as the GRPO and RLOO runs of benchmarks/pg.sh, which are drawn
# next to PPO when their runs exist under runs/bench/pg/. Runs go to runs/bench/ppo/; curves (vs step and vs wall
# time), a table (start/final, wall time, peak memory) and time and peak memory per rollout go to
# benchmarks/results/ppo/.
#   bash benchmarks/ppo.sh               # 6 runs, 2 at a time, then the plots
#   SEEDS=1 PARALLEL=1 bash benchmarks/ppo.sh   # one seed of each, one run at a time (cleaner wall times)
#   WITH_PG=1 bash benchmarks/ppo.sh     # also (re)run pg.sh's GRPO and RLOO runs for these seeds, for the comparison
#   PLOT_ONLY=1 bash benchmarks/ppo.sh   # (NOTE="..." adds a line to the README, e.g. where the runs came from)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
RUNS=runs/bench/ppo
PG=runs/bench/pg
OUT=benchmarks/results/ppo
mkdir -p "$RUNS" "$OUT"

if [ -z "${PLOT_ONLY:-}" ]; then
  # build the start policy and the reward model once, outside the timings
  python -c "from common import toy; toy.toy_policy_path('add'); toy.toy_reward_model_path('add')"
  LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
  cmds=()
  for seed in $SEEDS; do
    cmds+=("python algos/ppo.py --seed $seed --output_dir $RUNS/ppo_rm__$seed --overwrite_output_dir True")
    cmds+=("python algos/ppo.py --seed $seed --reward_funcs add --output_dir $RUNS/ppo_gold__$seed --overwrite_output_dir True")
    if [ -n "${WITH_PG:-}" ]; then  # benchmarks/pg.sh's commands
      for algo in grpo rloo; do cmds+=("python algos/$algo.py --seed $seed --output_dir $PG/${algo}__$seed --overwrite_output_dir True"); done
    fi
  done
  printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
  echo "$LOAD_BEFORE before the runs, $(cut -d' ' -f1-3 /proc/loadavg) after" > "$RUNS/load.txt"
fi

groups=("ppo (toy-rm)=$RUNS/ppo_rm__*" "ppo (gold reward)=$RUNS/ppo_gold__*")
for algo in grpo rloo; do
  if ls -d $PG/${algo}__* >/dev/null 2>&1; then groups+=("$algo (gold reward)=$PG/${algo}__*"); fi
done
python benchmarks/plot.py --runs "${groups[@]}" \
    --metrics eval/gold_reward train/gold_reward objective/scores objective/kl loss/value_avg policy/clipfrac_avg \
    --out "$OUT"
per_rollout=$(python - "$RUNS" <<'EOF'
import glob, json, statistics, sys
from pathlib import Path

for label, pattern in (("ppo (toy-rm)", "ppo_rm__*"), ("ppo (gold reward)", "ppo_gold__*")):
    t, m = [], []
    for d in sorted(glob.glob(f"{sys.argv[1]}/{pattern}")):
        perf, args = Path(d) / "perf.json", Path(d) / "args.json"
        if perf.exists():
            p = json.loads(perf.read_text())
            t.append(p["time"] / json.loads(args.read_text())["max_steps"])
            m.append(p["peak_rss_mb"])
    if t:
        print(f"| {label} | {len(t)} | {statistics.fmean(t):.2f} | {max(m):.0f} |")
EOF
)
{
  echo "# PPO on toy:add (reward model and gold reward)$([ ${#groups[@]} -gt 2 ] && echo ', next to GRPO and RLOO')"
  echo
  echo "Command: \`bash benchmarks/ppo.sh\` (SEEDS=\"${SEEDS}\", PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  echo "Load average (1, 5, 15 min): $(cat "$RUNS/load.txt" 2>/dev/null || echo n/a). The cores were shared with other"
  echo "jobs, so wall times are upper bounds."
  if [ -n "${NOTE:-}" ]; then echo "$NOTE"; fi
  echo "Start: the toy SFT policy toy-sft ($(python -c "from common import toy; print(toy.toy_policy_path('add').name)")); reward model toy-rm ($(python -c "from common import toy; print(toy.toy_reward_model_path('add').name)"))."
  echo "Each PPO run: 150 rollouts x 64 completions (one per prompt), 4 epochs of 1 mini-batch each (600 optimizer"
  echo "steps), beta 0.05 (k1), gamma 1, lambda 0.95, lr 3e-5 for the policy and the value model. In the PPO curves a"
  echo "step (the x axis says optimizer step) is one rollout of 64 samples, as one GRPO/RLOO step."
  echo "GRPO/RLOO (benchmarks/pg.sh, gold reward): 150 steps x 8 prompts x 8 completions, the same 9600 samples."
  echo "eval/gold_reward: greedy exact match on 256 held-out prompts; train/gold_reward: gold reward of the sampled"
  echo "completions (temperature 1), logged whatever the training reward; objective/scores: the reward PPO trains on."
  echo
  cat "$OUT/table.md"
  echo
  echo "Time and peak memory per rollout (wall time / rollouts; peak resident memory of the process):"
  echo
  echo "| run | seeds | s per rollout | peak RSS (MB) |"
  echo "|---|---|---|---|"
  echo "$per_rollout"
  echo
  echo "![held-out gold reward vs step](eval_gold_reward_vs_step.png) ![vs time](eval_gold_reward_vs_time.png)"
  echo "![sampled gold reward vs step](train_gold_reward_vs_step.png) ![KL vs step](objective_kl_vs_step.png)"
  echo "![value loss vs step](loss_value_avg_vs_step.png)"
} > "$OUT/README.md"
cat "$OUT/README.md"
