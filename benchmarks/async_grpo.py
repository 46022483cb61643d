"""grpo.py synchronous vs --async_generation: optimizer steps per second and held-out gold reward per sample.

Each seed runs every mode once, interleaved (so a change in the machine's load hits all modes alike), on the default
toy setup (toy-sft policy on toy:add, 8 prompts x 8 completions, 8 new tokens):
    sync1   synchronous, 1 torch thread            (OMP_NUM_THREADS=1)
    sync2   synchronous, 2 torch threads           (the whole 2-core budget for the one process; MODES=... to add it:
            on a machine loaded by other jobs its spinning threads ran 40x slower than sync1)
    async   --async_generation --max_staleness 1, trainer 1 thread + worker 1 thread
steps/s is measured from the metrics' wall clock between the warm-up step and the last step (the final evaluation
excluded); the gold reward is eval/gold_reward after the last step (greedy, held-out prompts). Writes
benchmarks/results/async/{results.json,README.md} with the hardware and the load averages before and after.

    python benchmarks/async_grpo.py                      # 3 seeds x 60 steps, sync1 and async
    SEEDS=1,2 STEPS=40 MODES=sync1,sync2,async python benchmarks/async_grpo.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "async"
MODES = {
    "sync1": ({"OMP_NUM_THREADS": "1"}, []),
    "sync2": ({"OMP_NUM_THREADS": "2"}, []),
    "async": ({"OMP_NUM_THREADS": "1"}, ["--async_generation", "True", "--max_staleness", "1",
                                         "--async_worker_threads", "1"]),
}
WARMUP = 5


def run(mode: str, seed: int, steps: int, work: Path) -> dict:
    env_extra, flags = MODES[mode]
    out = work / f"{mode}-{seed}"
    cmd = [sys.executable, str(ROOT / "algos" / "grpo.py"), "--seed", str(seed), "--max_steps", str(steps),
           "--logging_steps", "1", "--eval_steps", str(steps), "--log_completions_steps", "0",
           "--output_dir", str(out), "--overwrite_output_dir", "True", *flags]
    load = os.getloadavg()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env_extra})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    recs = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    t0, t1 = recs[WARMUP]["time"], recs[steps - 1]["time"]
    return {"mode": mode, "seed": seed, "steps_per_s": (steps - 1 - WARMUP) / (t1 - t0),
            "gold_reward": recs[steps]["eval/gold_reward"], "gold_reward_start": recs[0]["eval/gold_reward"],
            "staleness": statistics.mean(recs[s].get("async/staleness", 0.0) for s in range(1, steps + 1)),
            "load_before": load, "load_after": os.getloadavg()}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main():
    seeds = [int(s) for s in os.environ.get("SEEDS", "1,2,3").split(",")]
    modes = os.environ.get("MODES", "sync1,async").split(",")
    steps = int(os.environ.get("STEPS", "60"))
    work = Path(os.environ.get("WORK", "/tmp/cleanalign-async-bench"))
    OUT.mkdir(parents=True, exist_ok=True)
    load0, rows = os.getloadavg(), []
    for i, seed in enumerate(seeds):
        order = modes if i % 2 == 0 else modes[::-1]
        for mode in order:
            rows.append(run(mode, seed, steps, work))
            print(json.dumps(rows[-1]), flush=True)
    by = {m: [r for r in rows if r["mode"] == m] for m in modes}
    sps = {m: statistics.mean(r["steps_per_s"] for r in by[m]) for m in modes}
    best_sync = max((m for m in modes if m.startswith("sync")), key=lambda m: sps[m])
    speedup = sps["async"] / sps[best_sync]
    # paired per seed: async vs the best synchronous mode
    per_seed = [a["steps_per_s"] / s["steps_per_s"] for a, s in zip(by["async"], by[best_sync])]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch
    import transformers

    result = {"seeds": seeds, "steps": steps, "warmup_steps": WARMUP, "rows": rows,
              "steps_per_s_mean": sps, "best_sync": best_sync, "speedup_vs_best_sync": speedup,
              "speedup_per_seed": per_seed, "target_speedup": 1.5, "target_met": speedup >= 1.5,
              "hardware": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__, "transformers": transformers.__version__},
              "load_before": load0, "load_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                          time.gmtime())}
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# grpo.py: synchronous vs --async_generation",
        "",
        f"`python benchmarks/async_grpo.py` ({len(seeds)} seeds x {steps} steps, default toy setup, modes interleaved"
        f" per seed). Hardware: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
        f"{transformers.__version__}. Load average (1/5/15 min) at the start {tuple(round(x, 2) for x in load0)}, "
        f"at the end {tuple(round(x, 2) for x in result['load_after'])} (other jobs shared the machine).",
        "",
        "| mode | steps/s | held-out gold reward after the last step | mean staleness |",
        "|---|---|---|---|",
    ]
    for m in modes:
        lines.append(f"| {m} | {mean_std([r['steps_per_s'] for r in by[m]])} | "
                     f"{mean_std([r['gold_reward'] for r in by[m]])} | "
                     f"{statistics.mean(r['staleness'] for r in by[m]):.2f} |")
    start = statistics.mean(r["gold_reward_start"] for r in rows)
    lines += [
        "",
        f"Gold reward before training: {start:.3f}. Speed-up of async over the faster synchronous mode ({best_sync}):"
        f" {speedup:.2f}x (per seed: {', '.join(f'{x:.2f}' for x in per_seed)}); target 1.5x: "
        f"{'met' if speedup >= 1.5 else 'MISSED'}.",
        "",
        "Per run (load average when it started):",
        "",
        "| mode | seed | steps/s | gold reward | load |",
        "|---|---|---|---|---|",
    ] + [f"| {r['mode']} | {r['seed']} | {r['steps_per_s']:.3f} | {r['gold_reward']:.3f} | "
         f"{r['load_before'][0]:.2f} |" for r in rows]
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
