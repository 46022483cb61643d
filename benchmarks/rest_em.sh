#!/usr/bin/env bash
# ReST-EM on toy:add from the toy SFT policy: the held-out greedy gold reward per iteration, 3 seeds, for ReST-EM
# (every M-step from the base model, the default) and expert iteration (--continue_from_previous True). Runs go to
# runs/bench/rest_em/, curves (step = iteration), a table and a README to benchmarks/results/rest_em/.
#   bash benchmarks/rest_em.sh                      # 6 runs, 2 at a time, then the plots
#   SEEDS=1 VARIANTS=rest_em bash benchmarks/rest_em.sh   # one seed of the default (the short version)
#   PLOT_ONLY=1 bash benchmarks/rest_em.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
VARIANTS=${VARIANTS:-"rest_em expert_iteration"}
ITERATIONS=${ITERATIONS:-3}
RUNS=${RUNS:-runs/bench/rest_em}
OUT=${OUT:-benchmarks/results/rest_em}
mkdir -p "$RUNS" "$OUT"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -n "${PLOT_ONLY:-}" ]; then LOAD_BEFORE="not measured (PLOT_ONLY: plots of earlier runs)"; fi

if [ -z "${PLOT_ONLY:-}" ]; then
  python -c "from common import toy; toy.toy_policy_path('add')"  # build the starting policy once, outside the timings
  cmds=()
  for seed in $SEEDS; do
    for v in $VARIANTS; do
      flags=""
      if [ "$v" = expert_iteration ]; then flags="--continue_from_previous True"; fi
      cmds+=("python algos/rest_em.py --seed $seed --iterations $ITERATIONS $flags --output_dir $RUNS/${v}__$seed --overwrite_output_dir True")
    done
  done
  printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -n "${PLOT_ONLY:-}" ]; then LOAD_AFTER="not measured"; fi

runs=()
for v in $VARIANTS; do
  if ls -d "$RUNS/${v}__"* > /dev/null 2>&1; then runs+=("$v=$RUNS/${v}__*"); fi
done
python benchmarks/plot.py --runs "${runs[@]}" --metrics eval/gold_reward kept_fraction reward sft/loss --out "$OUT"
python - "$RUNS" "$OUT" $VARIANTS <<'EOF'
"""Held-out gold reward at every iteration (mean ± std over seeds): iteration 0 is the starting policy."""
import glob, json, statistics, sys
from pathlib import Path

runs, out, variants = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
lines = ["| variant | seeds | iteration | eval/gold_reward | kept_fraction | sft/loss |", "|---|---|---|---|---|---|"]
for v in variants:
    recs = [[json.loads(line) for line in Path(p).read_text().splitlines() if line]
            for p in sorted(glob.glob(str(runs / f"{v}__*" / "metrics.jsonl")))]
    if not recs:
        continue
    for it in sorted({r["step"] for r in recs[0]}):
        cells = []
        for key in ("eval/gold_reward", "kept_fraction", "sft/loss"):
            vals = [r[key] for rs in recs for r in rs if r["step"] == it and r.get(key) is not None]
            cells.append("%.3f ± %.3f" % (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
                         if vals else "")
        lines.append(f"| {v} | {len(recs)} | {it} | " + " | ".join(cells) + " |")
(out / "per_iteration.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

{
  echo "# ReST-EM on toy:add"
  echo
  echo "Command: \`SEEDS=\"${SEEDS}\" VARIANTS=\"${VARIANTS}\" bash benchmarks/rest_em.sh\` (PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  echo "Load average (1, 5, 15 min) before the runs: ${LOAD_BEFORE}; after: ${LOAD_AFTER} (other jobs shared the cores)."
  if [ "$(echo $SEEDS | wc -w)" -eq 1 ]; then echo "One seed: the short version of this benchmark (its default is 3 seeds: \`bash benchmarks/rest_em.sh\`)."; fi
  echo
  echo "Defaults of algos/rest_em.py: base model toy-sft; per iteration 512 training prompts x 8 samples (temperature 1),"
  echo "keep gold reward >= 1 (the correct answers, EOS-terminated), then 60 AdamW steps of 64 sequences (lr 1e-4,"
  echo "10 warm-up steps) from the base model (rest_em) or from the previous policy (expert_iteration)."
  echo "eval/gold_reward: greedy exact match on 256 held-out prompts after each iteration (iteration 0: the base model)."
  echo "In the curves, 'optimizer step' on the x axis is the iteration."
  echo
  echo "Context: toy-sft is sft.py's default run stopped at step 475 of 1000 (the full run's held-out accuracy is in"
  echo "benchmarks/results/foundation/README.md), so most of what ReST-EM gains here is what more supervised training"
  echo "on correct answers teaches; the difference is that the answers are the policy's own, checked by the reward."
  echo
  cat "$OUT/per_iteration.md"
  echo
  cat "$OUT/table.md"
  echo
  echo "![held-out gold reward per iteration](eval_gold_reward_vs_step.png) ![kept fraction](kept_fraction_vs_step.png)"
} > "$OUT/README.md"
cat "$OUT/README.md"
