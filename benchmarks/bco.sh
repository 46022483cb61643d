#!/usr/bin/env bash
# BCO on toy:add unpaired rows from the toy SFT policy: plain BCO and BCO with UDM (--udm True), each with the script's
# defaults (64 examples per step, β = 0.1, lr 3e-5, 200 steps), 3 seeds each. Runs go to runs/bench/bco/; curves of
# the held-out greedy gold reward and the eval reward margin vs step and vs wall time, and a table (start/final,
# time, peak memory) to benchmarks/results/bco/.
#   bash benchmarks/bco.sh                                  # 6 runs, 2 at a time, then the plots
#   SEEDS=1 STEPS=60 bash benchmarks/bco.sh                 # a 1-seed short version
#   PARALLEL=1 bash benchmarks/bco.sh                       # one run at a time (cleaner wall-time numbers)
#   PLOT_ONLY=1 bash benchmarks/bco.sh
#   SKIP_DONE=1 bash benchmarks/bco.sh                  # only the runs without a finished folder (perf.json)
#   python benchmarks/bco_trl_check.py                      # first-step metrics vs TRL 1.13's BCOTrainer
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
STEPS=${STEPS:-200}
RUNS=runs/bench/bco
OUT=benchmarks/results/bco
mkdir -p "$RUNS" "$OUT"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

if [ -z "${PLOT_ONLY:-}" ]; then
  python -c "from common import toy; toy.toy_policy_path('add')"  # build the starting policy once, outside the timings
  cmds=()
  for seed in $SEEDS; do
    for name in ${ORDER:-bco bco_udm}; do  # a subset: ORDER=bco
      [ -n "${SKIP_DONE:-}" ] && [ -f "$RUNS/${name}__$seed/perf.json" ] && continue
      flags=""; [ "$name" = bco_udm ] && flags="--udm True"
      cmds+=("python algos/bco.py $flags --seed $seed --max_steps $STEPS --eval_steps $(( STEPS / 4 )) --output_dir $RUNS/${name}__$seed --overwrite_output_dir True")
    done
  done
  [ ${#cmds[@]} -eq 0 ] || printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
  echo "Load average (1, 5, 15 min) before the runs: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg) (other jobs shared the cores)." > "$OUT/load.txt"
fi

python benchmarks/plot.py --runs "bco=$RUNS/bco__*" "bco + udm=$RUNS/bco_udm__*" \
    --metrics eval/gold_reward eval/rewards/margins loss delta --out "$OUT"
{
  echo "# BCO on toy:add (unpaired rows)"
  echo
  echo "Command: \`SEEDS=\"$SEEDS\" STEPS=$STEPS bash benchmarks/bco.sh\` (PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  cat "$OUT/load.txt" 2>/dev/null || true
  echo "Start: the toy SFT policy toy-sft ($(python -c "from common import toy; print(toy.toy_policy_path('add').name)")). eval/gold_reward: greedy exact match on 256 held-out prompts;"
  echo "eval/rewards/margins: mean implicit reward β·r of desirable minus undesirable held-out rows (512 rows)."
  echo
  cat "$OUT/table.md"
  [ -f "$OUT/notes.md" ] && { echo; cat "$OUT/notes.md"; }  # what the numbers say, written by hand
  echo
  echo "![held-out gold reward vs step](eval_gold_reward_vs_step.png) ![vs time](eval_gold_reward_vs_time.png)"
  echo "![eval reward margin vs step](eval_rewards_margins_vs_step.png) ![running reward shift δ vs step](delta_vs_step.png)"
  [ -f "$OUT/trl_check.md" ] && { echo; echo "## Same numbers as TRL 1.13 (\`python benchmarks/bco_trl_check.py\`)"; echo; cat "$OUT/trl_check.md"; }
  true
} > "$OUT/README.md"
cat "$OUT/README.md"
