#!/usr/bin/env bash
# Foundation benchmark: the default SFT run (the RL scripts' starting policy) and the default reward model,
# 3 seeds each, on the toy addition task. Records held-out greedy exact match (sft) and held-out pairwise accuracy
# (reward) with time and peak memory in benchmarks/results/foundation/.
#   bash benchmarks/foundation.sh          (about 10 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline
OUT=runs/bench/foundation
for seed in 1 2 3; do
  python algos/sft.py --seed "$seed" --output_dir "$OUT/sft__$seed" --save_steps 0 --eval_steps 100
done
for seed in 1 2 3; do
  python algos/reward.py --seed "$seed" --output_dir "$OUT/reward__$seed" --save_steps 0
done
python benchmarks/plot.py --runs "sft (default)=$OUT/sft__*" --metrics eval/accuracy loss \
    --out benchmarks/results/foundation/sft
python benchmarks/plot.py --runs "reward (default)=$OUT/reward__*" --metrics eval/accuracy loss \
    --out benchmarks/results/foundation/reward
{
  echo "# Foundation benchmark"
  echo
  echo "Command: \`bash benchmarks/foundation.sh\`. Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  echo
  echo "## sft.py default run (the RL starting policy): held-out greedy exact match on toy:add"
  echo
  cat benchmarks/results/foundation/sft/table.md
  echo
  echo "## reward.py default run (the toy reward model): held-out pairwise accuracy on toy:add"
  echo
  cat benchmarks/results/foundation/reward/table.md
} > benchmarks/results/foundation/README.md
cat benchmarks/results/foundation/README.md
