#!/usr/bin/env bash
# GKD on toy:add: the 2-layer toy-small student (from scratch) distilled from the fully trained toy-sft-full teacher,
# over β (0 forward KL, 0.5 JSD, 1 reverse KL) and λ (fraction of on-policy steps), with sequence-level KD and an
# SFT baseline (the same student trained by sft.py on the gold completions, same steps and learning rate), 3 seeds.
# Runs go to runs/bench/gkd/; curves, a table (student vs teacher held-out greedy exact match, peak memory) and a
# README to benchmarks/results/gkd/.
# Then, from each seed's final β 0 λ 0 student (close to the teacher), WARM_STEPS more steps with λ 0 (control), with
# λ 1 and the forward KL, and with on-policy distillation (λ 1, β 1): on-policy steps from a student whose samples
# are mostly right, to separate the λ mechanism from the quality of a fresh student's samples.
#   bash benchmarks/gkd.sh                                   # 21 + 9 runs, 2 at a time, then the table and plots
#   SEEDS=1 MAX_STEPS=300 PARALLEL=1 bash benchmarks/gkd.sh  # the short version (1 seed, 300 steps)
#   NAMES="kd_fkl gkd_jsd_l05 onpolicy_rkl" bash benchmarks/gkd.sh   # a subset of the configurations (+ SFT)
#   WARM_STEPS=0 SFT=0 bash benchmarks/gkd.sh                # without the runs from the distilled student and SFT
#   SEEDS=1 STAGES=warm bash benchmarks/gkd.sh               # only the runs from the distilled student (of seed 1)
# Every invocation appends its command and the load average to $OUT/load.txt; the table covers every run folder.
#   PLOT_ONLY=1 bash benchmarks/gkd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
MAX_STEPS=${MAX_STEPS:-1000}
ALL_NAMES="kd_fkl kd_jsd seqkd_fkl gkd_fkl_l05 gkd_jsd_l05 onpolicy_rkl"
NAMES=${NAMES:-$ALL_NAMES}
WARM_STEPS=${WARM_STEPS:-200}
STAGES=${STAGES:-"sweep warm"}
SFT=${SFT:-1}
RUNS=${RUNS:-runs/bench/gkd}
OUT=${OUT:-benchmarks/results/gkd}
mkdir -p "$RUNS" "$OUT"
COMMON="--max_steps $MAX_STEPS --learning_rate 3e-3 --eval_steps 100 --logging_steps 20 --save_steps 0"
declare -A CONFIGS=(
  [kd_fkl]="--beta 0 --lmbda 0"                     # supervised KD: forward KL on the dataset completions
  [kd_jsd]="--beta 0.5 --lmbda 0"                   # supervised KD with the JSD
  [seqkd_fkl]="--beta 0 --lmbda 0 --seq_kd True"    # sequence-level KD: forward KL on teacher samples
  [gkd_fkl_l05]="--beta 0 --lmbda 0.5"              # half the steps on-policy, forward KL
  [gkd_jsd_l05]="--beta 0.5 --lmbda 0.5"            # TRL's defaults
  [onpolicy_rkl]="--beta 1 --lmbda 1"               # on-policy distillation: student samples, reverse KL
)
declare -A WARM=(  # from the seed's final kd_fkl student, constant learning rate 1e-3
  [warm_kd_fkl]="--beta 0 --lmbda 0"                # control: more supervised KD
  [warm_gkd_fkl_l1]="--beta 0 --lmbda 1"            # every step on-policy, forward KL
  [warm_onpolicy_rkl]="--beta 1 --lmbda 1"          # on-policy distillation
)
WARM_COMMON="--max_steps $WARM_STEPS --learning_rate 1e-3 --lr_scheduler constant --warmup_steps 0 --eval_steps 50 --logging_steps 10 --save_steps 0"

if [ -z "${PLOT_ONLY:-}" ]; then
  echo "\`SEEDS=\"${SEEDS}\" MAX_STEPS=${MAX_STEPS} NAMES=\"${NAMES}\" SFT=${SFT} WARM_STEPS=${WARM_STEPS} STAGES=\"${STAGES}\" PARALLEL=${PARALLEL} bash benchmarks/gkd.sh\` ($(date -u +%H:%M) UTC): load average (1, 5, 15 min) at the start $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/load.txt"
  python -c "from common import toy; toy.toy_sft_full_path('add')"  # build the teacher once, outside the timings
  cmds=()
  for seed in $SEEDS; do
    [[ " $STAGES " == *" sweep "* ]] || break
    [ "$SFT" = 0 ] || cmds+=("python algos/sft.py --model_name_or_path toy-small --seed $seed $COMMON --num_eval_prompts 256 --output_dir $RUNS/sft__$seed --overwrite_output_dir True")
    for name in $NAMES; do
      cmds+=("python algos/gkd.py ${CONFIGS[$name]} --seed $seed $COMMON --output_dir $RUNS/${name}__$seed --overwrite_output_dir True")
    done
  done
  [ ${#cmds[@]} -eq 0 ] || printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
  if [ "$WARM_STEPS" -gt 0 ] && [[ " $STAGES " == *" warm "* ]]; then
    cmds=()
    for seed in $SEEDS; do
      for name in warm_kd_fkl warm_gkd_fkl_l1 warm_onpolicy_rkl; do
        cmds+=("python algos/gkd.py --model_name_or_path $RUNS/kd_fkl__$seed ${WARM[$name]} --seed $seed $WARM_COMMON --output_dir $RUNS/${name}__$seed --overwrite_output_dir True")
      done
    done
    [ ${#cmds[@]} -eq 0 ] || printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
  fi
  echo "  ... at the end ($(date -u +%H:%M) UTC): $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/load.txt"
fi

labels=()
for name in $ALL_NAMES; do labels+=("$name=$RUNS/${name}__*"); done
python benchmarks/plot.py --runs "${labels[@]}" --metrics eval/gold_reward eval/reverse_kl eval/forward_kl loss \
    --out "$OUT"
if ls -d "$RUNS"/warm_* > /dev/null 2>&1; then
  mkdir -p "$OUT/from_distilled"
  python benchmarks/plot.py --runs "warm_kd_fkl=$RUNS/warm_kd_fkl__*" "warm_gkd_fkl_l1=$RUNS/warm_gkd_fkl_l1__*" \
      "warm_onpolicy_rkl=$RUNS/warm_onpolicy_rkl__*" --metrics eval/gold_reward eval/reverse_kl eval/forward_kl loss \
      --out "$OUT/from_distilled"
fi
python - "$RUNS" "$OUT" "$MAX_STEPS" <<'EOF'
"""Student vs teacher table: final held-out greedy exact match (sft.py logs it as eval/accuracy), the teacher's, the
final held-out divergences, wall time and peak memory, mean ± std over seeds."""
import glob, json, statistics, sys
from pathlib import Path

runs, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
rows = [("sft", "SFT on the gold completions (sft.py)"), ("kd_fkl", "β 0, λ 0: supervised KD, forward KL"),
        ("kd_jsd", "β 0.5, λ 0: supervised KD, JSD"), ("seqkd_fkl", "β 0, λ 0, seq_kd: teacher samples"),
        ("gkd_fkl_l05", "β 0, λ 0.5: half on-policy, forward KL"), ("gkd_jsd_l05", "β 0.5, λ 0.5 (TRL defaults)"),
        ("onpolicy_rkl", "β 1, λ 1: on-policy distillation, reverse KL"),
        ("warm_kd_fkl", "from the β 0 λ 0 student: λ 0, forward KL (control)"),
        ("warm_gkd_fkl_l1", "from the β 0 λ 0 student: λ 1, forward KL"),
        ("warm_onpolicy_rkl", "from the β 0 λ 0 student: λ 1, β 1 (on-policy distillation)")]

def ms(v, digits=3):
    v = [x for x in v if x is not None]
    if not v:
        return "n/a"
    return f"{statistics.fmean(v):.{digits}f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.{digits}f}"

lines = ["| run | seeds | student gold, final | teacher gold | student gold at step 0 | eval/reverse_kl final | "
         "eval/forward_kl final | time (s) | peak memory (MB) |", "|---|---|---|---|---|---|---|---|---|"]
for key, what in rows:
    folders = sorted(glob.glob(str(runs / f"{key}__*")))
    recs = [[json.loads(l) for l in open(Path(f) / "metrics.jsonl")] for f in folders if (Path(f) / "perf.json").exists()]
    if not recs:
        continue
    gold = "eval/accuracy" if key == "sft" else "eval/gold_reward"
    ev = [[r for r in rs if gold in r] for rs in recs]
    perf = [json.loads((Path(f) / "perf.json").read_text()) for f in folders if (Path(f) / "perf.json").exists()]
    first = [e[0][gold] if e and e[0]["step"] == 0 else None for e in ev]
    lines.append(f"| {what} | {len(recs)} | {ms([e[-1][gold] for e in ev])} | "
                 f"{ms([e[-1].get('eval/teacher_gold_reward') for e in ev])} | {ms(first)} | "
                 f"{ms([e[-1].get('eval/reverse_kl') for e in ev])} | {ms([e[-1].get('eval/forward_kl') for e in ev])} | "
                 f"{ms([p['time'] for p in perf], 0)} | {ms([p['peak_rss_mb'] for p in perf], 0)} |")
(out / "students.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
{
  echo "# GKD on toy:add: a 2-layer student distilled from the toy SFT teacher"
  echo
  echo "Commands (OMP_NUM_THREADS=${OMP_NUM_THREADS}) and the load average while they ran:"
  echo
  sed 's/^/    /' "$OUT/load.txt"
  echo
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)')."
  echo "Teacher: toy-sft-full (4 layers, hidden 128). Student: toy-small (2 layers, hidden 64, fresh init), ${MAX_STEPS} steps of 64"
  echo "sequences, learning rate 3e-3 (warm-up 20, linear decay). Gold: greedy exact match on 256 held-out prompts."
  echo "eval/*_kl: token means on the held-out rows' dataset completions. Peak memory: resident set of the process (CPU)."
  echo "Wall times were measured with other jobs sharing the cores (load above)."
  echo
  cat "$OUT/students.md"
  echo
  echo "![held-out gold reward vs step](eval_gold_reward_vs_step.png) ![reverse KL vs step](eval_reverse_kl_vs_step.png)"
  if [ -f "$OUT/from_distilled/table.md" ]; then
    echo
    echo "From the distilled student (constant learning rate 1e-3, eval every 50 steps):"
    echo
    cat "$OUT/from_distilled/table.md"
    echo
    echo "![from the distilled student: gold vs step](from_distilled/eval_gold_reward_vs_step.png)"
  fi
  if [ -f "$OUT/analysis.md" ]; then echo; cat "$OUT/analysis.md"; fi
} > "$OUT/README.md"
cat "$OUT/README.md"
