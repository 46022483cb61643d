#!/usr/bin/env bash
# Tools and environments in GRPO (common/agents.py), 3 seeds each, on the toy SFT policies of the agent tasks:
#   mul_tool       toy:mul_tool with the calculator tool (--tools common.toy_agents:calc), at most 2 turns
#   mul_no_tool    the same policy and task without the tool (control: the tiny model cannot multiply alone)
#   guess          toy:guess with the higher/lower environment (--environment common.toy_agents:GuessEnv), 5 turns
# Runs go to runs/bench/agents/, curves (held-out greedy gold reward, training reward, tool calls and turns per
# episode) and a table to benchmarks/results/agents/.
#   bash benchmarks/agents.sh                       # 9 runs, 2 at a time, then the plots
#   SEEDS=1 MAX_STEPS=40 bash benchmarks/agents.sh  # the short version (1 seed)
#   CONTROL_SEEDS=1 MAX_STEPS=30 LR=1e-4 EVAL_STEPS=10 NUM_EVAL=64 PARALLEL=1 bash benchmarks/agents.sh
#                                                   # a loaded machine: shorter runs, one control seed
#   PLOT_ONLY=1 bash benchmarks/agents.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline
PARALLEL=${PARALLEL:-2}
SEEDS=${SEEDS:-"1 2 3"}
CONTROL_SEEDS=${CONTROL_SEEDS:-$SEEDS}  # seeds of the no-tool control
MAX_STEPS=${MAX_STEPS:-100}
LR=${LR:-3e-5}
EVAL_STEPS=${EVAL_STEPS:-20}
NUM_EVAL=${NUM_EVAL:-128}
RUNS=runs/bench/agents
OUT=benchmarks/results/agents
mkdir -p "$RUNS" "$OUT"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
COMMON="--max_steps $MAX_STEPS --learning_rate $LR --eval_steps $EVAL_STEPS --num_eval_prompts $NUM_EVAL --logging_steps 5"

if [ -z "${PLOT_ONLY:-}" ]; then
  # build the starting policies once, outside the timings (sft.py on each task's SFT traces)
  python -c "from common import toy; toy.toy_policy_path('mul_tool'); toy.toy_policy_path('guess')"
  cmds=()
  for seed in $SEEDS; do
    cmds+=("python algos/grpo.py --seed $seed --dataset_name toy:mul_tool --tools common.toy_agents:calc --max_new_tokens 32 --max_turns 2 $COMMON --output_dir $RUNS/mul_tool__$seed --overwrite_output_dir True")
    cmds+=("python algos/grpo.py --seed $seed --dataset_name toy:guess --environment common.toy_agents:GuessEnv --max_new_tokens 3 --max_turns 5 $COMMON --output_dir $RUNS/guess__$seed --overwrite_output_dir True")
  done
  for seed in $CONTROL_SEEDS; do
    cmds+=("python algos/grpo.py --seed $seed --dataset_name toy:mul_tool --max_new_tokens 32 $COMMON --output_dir $RUNS/mul_no_tool__$seed --overwrite_output_dir True")
  done
  printf '%s\n' "${cmds[@]}" | xargs -P "$PARALLEL" -I{} sh -c '{} > /dev/null 2>&1 || echo "FAILED: {}"'
fi

if [ -z "${PLOT_ONLY:-}" ]; then
  LOAD_LINE="Load average (1, 5, 15 min) at the start: ${LOAD_START}, at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
else
  LOAD_LINE="(Written with PLOT_ONLY=1: the load during the runs is in the notes below.)"
fi
python benchmarks/plot.py --runs "mul_tool=$RUNS/mul_tool__*" "mul_no_tool=$RUNS/mul_no_tool__*" "guess=$RUNS/guess__*" \
    --metrics eval/gold_reward eval/tool_calls_per_episode eval/turns_per_episode reward tools/call_frequency \
    tools/failure_frequency agents/turns_per_episode agents/trained_token_fraction agents/truncated_ratio --out "$OUT"
# the table: the headline metrics only (the call above wrote every curve)
python benchmarks/plot.py --runs "mul_tool=$RUNS/mul_tool__*" "mul_no_tool=$RUNS/mul_no_tool__*" "guess=$RUNS/guess__*" \
    --metrics eval/gold_reward eval/tool_calls_per_episode eval/turns_per_episode reward --out "$OUT" > /dev/null
{
  echo "# GRPO with tools (toy:mul_tool) and with an environment (toy:guess)"
  echo
  echo "Command: \`SEEDS=\"${SEEDS}\" CONTROL_SEEDS=\"${CONTROL_SEEDS}\" MAX_STEPS=${MAX_STEPS} LR=${LR} EVAL_STEPS=${EVAL_STEPS} NUM_EVAL=${NUM_EVAL} bash benchmarks/agents.sh\` (PARALLEL=${PARALLEL} runs at a time, OMP_NUM_THREADS=${OMP_NUM_THREADS})."
  echo "Date: $(date -u +%Y-%m-%d). Hardware: $(nproc --all) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, torch $(python -c 'import torch; print(torch.__version__)'). ${LOAD_LINE}"
  echo "Start: toy-sft on each task (sft.py on the SFT traces of common/toy_agents.py: a calculator call or a direct"
  echo "answer for mul_tool, binary search or a scan up from 0 for guess)."
  echo "eval/gold_reward: greedy multi-turn episodes on ${NUM_EVAL} held-out prompts, exact match of the final answer; reward:"
  echo "the training reward (gold exact match for mul_tool, the environment's summed reward for guess)."
  echo "Only the policy's own tokens are trained on (agents/trained_token_fraction = their share of the completion tokens)."
  echo
  cat "$OUT/table.md"
  echo
  echo "![held-out gold reward vs step](eval_gold_reward_vs_step.png) ![held-out tool calls per episode](eval_tool_calls_per_episode_vs_step.png)"
  echo "![training reward vs step](reward_vs_step.png) ![tool calls per training episode](tools_call_frequency_vs_step.png)"
  echo "![turns per training episode](agents_turns_per_episode_vs_step.png) ![held-out turns per episode](eval_turns_per_episode_vs_step.png)"
  if [ -f "$OUT/NOTES.md" ]; then echo; cat "$OUT/NOTES.md"; fi  # what the numbers of this run mean, by hand
} > "$OUT/README.md"
cat "$OUT/README.md"
