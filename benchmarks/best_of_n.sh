#!/usr/bin/env bash
# Best-of-N on toy:add: the held-out gold reward of best-of-n (n = 1, 2, 4, 8, 16) from the toy SFT policy, with the
# samples chosen by the gold reward itself (= pass@n, the ceiling) and by the toy reward model toy-rm (a learned
# proxy, judged by the gold reward), against greedy decoding; 3 seeds each. Runs go to runs/bench/best_of_n/, the
# curve (PNG), a table and a README to benchmarks/results/best_of_n/.
#   bash benchmarks/best_of_n.sh                 # 6 runs, 2 at a time, then the plot and table
#   SEEDS=1 bash benchmarks/best_of_n.sh         # one seed (the short version)
#   PLOT_ONLY=1 bash benchmarks/best_of_n.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
RUNS=${RUNS:-runs/bench/best_of_n}
OUT=${OUT:-benchmarks/results/best_of_n}
mkdir -p "$RUNS" "$OUT"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -n "${PLOT_ONLY:-}" ]; then LOAD_BEFORE="not measured (PLOT_ONLY: plots of earlier runs)"; fi

if [ -z "${PLOT_ONLY:-}" ]; then
  # build the cached toy models once, outside the timings
  python -c "from common import toy; toy.toy_policy_path('add'); toy.toy_reward_model_path('add')"
  cmds=()
  for seed in $SEEDS; do
    # --num_prompts 0: the held-out curve only (the datasets of the training prompts are not part of the benchmark)
    cmds+=("python algos/best_of_n.py --seed $seed --num_prompts 0 --output_dir $RUNS/gold__$seed --overwrite_output_dir True")
    cmds+=("python algos/best_of_n.py --seed $seed --num_prompts 0 --reward_model_name_or_path toy-rm --output_dir $RUNS/toy_rm__$seed --overwrite_output_dir True")
  done
  printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -n "${PLOT_ONLY:-}" ]; then LOAD_AFTER="not measured"; fi

python - "$RUNS" "$OUT" <<'EOF'
"""Table (mean ± std over seeds) and the curve of the held-out gold reward vs n, from each run's results.json."""
import glob, json, statistics, sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
labels = {"gold": "selected by the gold reward (pass@n)", "toy_rm": "selected by toy-rm"}
res = {k: [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(runs / f"{k}__*" / "results.json")))]
       for k in labels}
res = {k: v for k, v in res.items() if v}
if not res:
    sys.exit(f"no results.json under {runs}")


def ms(values):
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values):
    return "%.3f ± %.3f" % ms(values)


lines = ["| selection | seeds | n | gold reward of best-of-n | oracle (best gold among n) | selection reward | KL bound |",
         "|---|---|---|---|---|---|---|"]
for k, rs in res.items():
    for i, row in enumerate(rs[0]["best_of_n"]):
        n = row["n"]
        gold = [r["best_of_n"][i]["gold_reward"] for r in rs]
        oracle = [r["best_of_n"][i]["oracle_gold_reward"] for r in rs]
        sel = [r["best_of_n"][i]["reward"] for r in rs]
        lines.append(f"| {k} | {len(rs)} | {n} | {fmt(gold)} | {fmt(oracle)} | {fmt(sel)} | {row['kl_bound']:.3f} |")
    lines.append(f"| {k} | {len(rs)} | greedy | {fmt([r['greedy']['gold_reward'] for r in rs])} | | "
                 f"{fmt([r['greedy']['reward'] for r in rs])} | |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

fig, ax = plt.subplots(figsize=(6, 4))
for k, rs in res.items():
    ns = [row["n"] for row in rs[0]["best_of_n"]]
    stats = [ms([r["best_of_n"][i]["gold_reward"] for r in rs]) for i in range(len(ns))]
    line, = ax.plot(ns, [m for m, _ in stats], marker="o", label=f"{labels[k]} ({len(rs)} seeds)")
    ax.fill_between(ns, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2, color=line.get_color())
greedy = [r["greedy"]["gold_reward"] for rs in res.values() for r in rs]
ax.axhline(statistics.fmean(greedy), color="gray", ls="--", label="greedy decoding")
ax.set_xscale("log", base=2)
ax.set_xlabel("n (samples per prompt)")
ax.set_ylabel("held-out gold reward (exact match)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "gold_reward_vs_n.png", dpi=110)
EOF

{
  echo "# Best-of-N on toy:add"
  echo
  echo "Command: \`SEEDS=\"${SEEDS}\" bash benchmarks/best_of_n.sh\` (PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  echo "Load average (1, 5, 15 min) before the runs: ${LOAD_BEFORE}; after: ${LOAD_AFTER} (other jobs shared the cores)."
  if [ "$(echo $SEEDS | wc -w)" -eq 1 ]; then echo "One seed: the short version of this benchmark (its default is 3 seeds: \`bash benchmarks/best_of_n.sh\`)."; fi
  echo
  echo "Policy: the toy SFT policy toy-sft, temperature 1, 16 samples per held-out prompt, 256 held-out prompts (the"
  echo "toy task's test split). Gold reward: exact match. Each n's value is the exact mean over every n-subset of the 16"
  echo "samples (algos/best_of_n.py's estimator; ties: first index of the max). 'gold' selects with the gold reward"
  echo "itself, so its curve is pass@n (the oracle column); 'toy_rm' selects with the toy reward model and is judged"
  echo "by the gold reward: the gap to the oracle is what the reward model gets wrong. Selection reward = the"
  echo "selector's own score of the chosen sample. KL bound = log n - (n - 1)/n."
  echo
  cat "$OUT/table.md"
  echo
  echo "![held-out gold reward vs n](gold_reward_vs_n.png)"
} > "$OUT/README.md"
cat "$OUT/README.md"
