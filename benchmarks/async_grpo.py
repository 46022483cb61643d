"""Synchronous vs --async_generation for the online scripts (grpo.py by default; --script gmpo, rloo, vmpo,
online_dpo): optimizer steps per second and held-out gold reward per sample.

Each seed runs every mode once, interleaved (so a change in the machine's load hits all modes alike), on the script's
default toy setup (toy-sft policy on toy:add; grpo, gmpo, rloo: 8 prompts x 8 completions, 8 new tokens):
    sync1   synchronous, 1 torch thread            (OMP_NUM_THREADS=1)
    sync2   synchronous, 2 torch threads           (the whole 2-core budget for the one process; MODES=... to add it:
            on a machine loaded by other jobs its spinning threads ran 40x slower than sync1)
    async   --async_generation --max_staleness 1, trainer 1 thread + worker 1 thread
steps/s is measured from the metrics' wall clock between the warm-up step and the last step (the final evaluation
excluded); the gold reward is eval/gold_reward after the last step (greedy, held-out prompts). Writes
benchmarks/results/async/results.json (grpo) or results_<script>.json, with the hardware and the load averages
before and after, and rebuilds benchmarks/results/async/README.md from every results file there (one section each).
The flags in which the scripts differ (the name of the group size; extra flags) are the SCRIPTS table below.

    python benchmarks/async_grpo.py                      # grpo, 3 seeds x 60 steps, sync1 and async
    SEEDS=1,2 STEPS=40 MODES=sync1,sync2,async python benchmarks/async_grpo.py --script rloo
    GROUP=8 python benchmarks/async_grpo.py --script vmpo   # pass the group size (--k 8 for vmpo)
    APPEND=1 SEEDS=4,5 python benchmarks/async_grpo.py --script gmpo   # more seeds, kept with the earlier ones
    python benchmarks/async_grpo.py --render             # only rebuild README.md from the results files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
# per script: the flag naming its group size (completions per prompt; None: the script has none) and extra flags.
# The async flags (--async_generation, --max_staleness, --async_worker_threads) are the same in every script.
SCRIPTS = {
    "grpo": {"group_flag": "--num_generations", "flags": []},
    "gmpo": {"group_flag": "--num_generations", "flags": []},
    "rloo": {"group_flag": "--num_generations", "flags": []},
    "vmpo": {"group_flag": "--k", "flags": []},
    "online_dpo": {"group_flag": None, "flags": []},
}
ORDER = list(SCRIPTS)


def results_path(script: str) -> Path:
    return OUT / ("results.json" if script == "grpo" else f"results_{script}.json")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process (all its threads) from /proc; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in descendants(k)]


def last_step(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else -1
    except (OSError, ValueError):
        return -1


def run(script: str, mode: str, seed: int, steps: int, work: Path, group: int | None = None) -> dict:
    """One run; CPU seconds of the trainer and of its worker process between the warm-up and the last step."""
    env_extra, flags = MODES[mode]
    spec = SCRIPTS[script]
    if group is not None and spec["group_flag"] is None:
        raise ValueError(f"GROUP={group}: {script}.py has no group-size flag (SCRIPTS table)")
    out = work / f"{script}-{mode}-{seed}"
    cmd = [sys.executable, str(ROOT / "algos" / f"{script}.py"), "--seed", str(seed), "--max_steps", str(steps),
           "--logging_steps", "1", "--eval_steps", str(steps), "--log_completions_steps", "0",
           "--output_dir", str(out), "--overwrite_output_dir", "True", *spec["flags"],
           *([spec["group_flag"], str(group)] if group is not None else []), *flags]
    shutil.rmtree(out, ignore_errors=True)  # no earlier metrics.jsonl for the CPU snapshots to read
    load = os.getloadavg()
    log = open(work / f"{script}-{mode}-{seed}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env_extra})
    snaps = {}
    while proc.poll() is None:
        s = last_step(out / "metrics.jsonl")
        for mark in (WARMUP, steps - 1):
            if s >= mark and mark not in snaps:
                snaps[mark] = (cpu_seconds(proc.pid), sum(cpu_seconds(d) for d in descendants(proc.pid)))
        time.sleep(0.05)
    log.close()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: see {log.name}")
    recs = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    t0, t1 = recs[WARMUP]["time"], recs[steps - 1]["time"]
    n = steps - 1 - WARMUP
    (a0, w0), (a1, w1) = snaps[WARMUP], snaps[steps - 1]
    return {"script": script, "mode": mode, "seed": seed, "steps_per_s": n / (t1 - t0),
            "trainer_cpu_s_per_step": (a1 - a0) / n, "worker_cpu_s_per_step": (w1 - w0) / n,
            "gold_reward": recs[steps]["eval/gold_reward"], "gold_reward_start": recs[0]["eval/gold_reward"],
            "staleness": statistics.mean(recs[s].get("async/staleness", 0.0) for s in range(1, steps + 1)),
            "load_before": load, "load_after": os.getloadavg()}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def measure(script: str, seeds: list[int], modes: list[str], steps: int, work: Path, group: int | None,
            previous: dict | None = None) -> dict:
    """Every mode once per seed, interleaved; the summary that `render` turns into a README section. `previous`: an
    earlier results file of the same script, steps and modes whose runs are kept (more seeds)."""
    load0, rows = os.getloadavg(), []
    if previous is not None:
        group_flag = None if group is None else [SCRIPTS[script]["group_flag"], group]
        if previous["steps"] != steps or list(previous["steps_per_s_mean"]) != modes \
                or previous.get("group_size_flag") != group_flag:
            raise ValueError("APPEND=1: the earlier results file has other STEPS, MODES or GROUP; run without APPEND")
        if set(seeds) & set(previous["seeds"]):
            raise ValueError(f"APPEND=1: seeds {sorted(set(seeds) & set(previous['seeds']))} were already run")
        load0, rows = previous["load_before"], list(previous["rows"])
        seeds = previous["seeds"] + seeds
    for i, seed in enumerate(seeds):
        if any(r["seed"] == seed for r in rows):
            continue
        order = modes if i % 2 == 0 else modes[::-1]
        for mode in order:
            rows.append(run(script, mode, seed, steps, work, group))
            print(json.dumps(rows[-1]), flush=True)
    by = {m: [r for r in rows if r["mode"] == m] for m in modes}
    sps = {m: statistics.mean(r["steps_per_s"] for r in by[m]) for m in modes}
    best_sync = max((m for m in modes if m.startswith("sync")), key=lambda m: sps[m])
    speedup = sps["async"] / sps[best_sync]
    # CPU seconds per step: if the trainer and the worker each had a core of their own (an idle 2-core machine),
    # a step would take max(trainer, worker) CPU seconds instead of the synchronous process's total
    cpu = {m: {k: statistics.mean(r[k] for r in by[m]) for k in ("trainer_cpu_s_per_step", "worker_cpu_s_per_step")}
           for m in modes}
    projected = (cpu["sync1"]["trainer_cpu_s_per_step"] / max(cpu["async"].values())
                 if "sync1" in cpu and "async" in cpu else None)
    # paired per seed: async vs the best synchronous mode
    per_seed = [a["steps_per_s"] / s["steps_per_s"] for a, s in zip(by["async"], by[best_sync])]
    cpu_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch
    import transformers

    try:
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        autogroup = False

    return {"script": script, "group_size_flag": None if group is None else [SCRIPTS[script]["group_flag"], group],
            "seeds": seeds, "steps": steps, "warmup_steps": WARMUP, "rows": rows,
            "steps_per_s_mean": sps, "best_sync": best_sync, "speedup_vs_best_sync": speedup,
            "speedup_per_seed": per_seed, "target_speedup": 1.5, "target_met": speedup >= 1.5,
            "cpu_s_per_step": cpu, "projected_speedup_idle_2_cores": projected,
            "hardware": {"cpu": cpu_name, "cores": os.cpu_count(), "python": platform.python_version(),
                         "torch": torch.__version__, "transformers": transformers.__version__},
            "sched_autogroup": autogroup,
            "load_before": load0, "load_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime())}


def render(result: dict) -> list[str]:
    """One README section from a results file."""
    script = result.get("script", "grpo")  # grpo's first results file predates the field
    rows, seeds, steps = result["rows"], result["seeds"], result["steps"]
    modes = list(result["steps_per_s_mean"])
    by = {m: [r for r in rows if r["mode"] == m] for m in modes}
    cpu, hw, autogroup = result["cpu_s_per_step"], result["hardware"], result["sched_autogroup"]
    load0, load1 = result["load_before"], result["load_after"]
    best_sync, speedup, per_seed = result["best_sync"], result["speedup_vs_best_sync"], result["speedup_per_seed"]
    projected = result.get("projected_speedup_idle_2_cores")
    group = result.get("group_size_flag")
    cmd = (f"{'GROUP=' + str(group[1]) + ' ' if group else ''}"
           f"{'SEEDS=' + ','.join(map(str, seeds)) + ' ' if seeds != [1, 2, 3] else ''}"
           f"{'STEPS=' + str(steps) + ' ' if steps != 60 else ''}"
           f"{'MODES=' + ','.join(modes) + ' ' if modes != ['sync1', 'async'] else ''}"
           f"python benchmarks/async_grpo.py{'' if script == 'grpo' else ' --script ' + script}")
    lines = [
        f"## {script}.py",
        "",
        f"`{cmd}` ({len(seeds)} seeds x {steps} steps, default toy setup, modes interleaved per seed; "
        f"{result.get('date', '')}). Hardware: {hw['cpu']}, {hw['cores']} cores; torch {hw['torch']}, transformers "
        f"{hw['transformers']}. Load average (1/5/15 min) at the start {tuple(round(x, 2) for x in load0)}, "
        f"at the end {tuple(round(x, 2) for x in load1)} (other jobs shared the machine: steps/s is wall clock, "
        f"measured under that load).",
        "",
        f"The kernel's autogroup scheduling is {'on' if autogroup else 'off'}"
        + (": the trainer and its worker, started from one session, share one group's CPU share, so under load the"
           " worker's core-time comes out of the trainer's." if autogroup else "."),
        "",
        "| mode | steps/s | held-out gold reward after the last step | mean staleness | CPU s/step trainer | "
        "CPU s/step worker |",
        "|---|---|---|---|---|---|",
    ]
    for m in modes:
        lines.append(f"| {m} | {mean_std([r['steps_per_s'] for r in by[m]])} | "
                     f"{mean_std([r['gold_reward'] for r in by[m]])} | "
                     f"{statistics.mean(r['staleness'] for r in by[m]):.2f} | "
                     f"{cpu[m]['trainer_cpu_s_per_step']:.3f} | {cpu[m]['worker_cpu_s_per_step']:.3f} |")
    start = statistics.mean(r["gold_reward_start"] for r in rows)
    # gold reward: async vs sync1 paired by seed; "within seed noise" = |mean difference| <= 2 std of sync1 over seeds
    ref = "sync1" if "sync1" in by else best_sync
    diffs = [a["gold_reward"] - s["gold_reward"] for a, s in zip(by["async"], by[ref])]
    noise = statistics.stdev(r["gold_reward"] for r in by[ref]) if len(by[ref]) > 1 else float("nan")
    within = abs(statistics.mean(diffs)) <= 2 * noise
    lines += [
        "",
        f"Gold reward before training: {start:.3f}. Speed-up of async over the faster synchronous mode ({best_sync}):"
        f" {speedup:.2f}x (per seed: {', '.join(f'{x:.2f}' for x in per_seed)}); target 1.5x: "
        f"{'met' if speedup >= 1.5 else 'MISSED'} (measured, under the load above).",
        "",
        f"Held-out gold reward, async - {ref} paired by seed: {statistics.mean(diffs):+.3f} (per seed: "
        f"{', '.join(f'{d:+.3f}' for d in diffs)}); {ref}'s std over seeds {noise:.3f}: "
        f"{'within' if within else 'NOT within'} seed noise (|mean difference| <= 2 std).",
        "",
    ] + ([
        f"Projection, not a measurement: with a core each for the trainer and the worker (an otherwise idle 2-core "
        f"machine) a step would take max(trainer, worker) CPU seconds: {projected:.2f}x the synchronous steps/s "
        f"(sync1 CPU s/step / max of the async columns; memory-bandwidth sharing and the OS ignored).",
        "",
    ] if projected is not None else []) + [
        "Per run (load average when it started):",
        "",
        "| mode | seed | steps/s | gold reward | load |",
        "|---|---|---|---|---|",
    ] + [f"| {r['mode']} | {r['seed']} | {r['steps_per_s']:.3f} | {r['gold_reward']:.3f} | "
         f"{r['load_before'][0]:.2f} |" for r in rows]
    return lines


def write_readme():
    """README.md from every results file in the folder, in the SCRIPTS order."""
    lines = ["# Synchronous vs --async_generation", "",
             "Written by `benchmarks/async_grpo.py` (one section per script, each from its results file: grpo's "
             "results.json, the others' results_<script>.json).", ""]
    for script in ORDER:
        path = results_path(script)
        if path.exists():
            lines += render(json.loads(path.read_text())) + [""]
    (OUT / "README.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--script", choices=ORDER, default="grpo", help="the algorithm script to benchmark")
    ap.add_argument("--render", action="store_true", help="only rebuild README.md from the results files")
    cli = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not cli.render:
        seeds = [int(s) for s in os.environ.get("SEEDS", "1,2,3").split(",")]
        modes = os.environ.get("MODES", "sync1,async").split(",")
        if "async" not in modes or not any(m.startswith("sync") for m in modes):
            raise ValueError(f"MODES={','.join(modes)}: needs async and at least one of sync1, sync2")
        steps = int(os.environ.get("STEPS", "60"))
        group = int(os.environ["GROUP"]) if os.environ.get("GROUP") else None
        work = Path(os.environ.get("WORK", "/tmp/cleanalign-async-bench"))
        work.mkdir(parents=True, exist_ok=True)
        append = os.environ.get("APPEND") == "1" and results_path(cli.script).exists()
        previous = json.loads(results_path(cli.script).read_text()) if append else None
        result = measure(cli.script, seeds, modes, steps, work, group, previous)
        results_path(cli.script).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(write_readme()))


if __name__ == "__main__":
    main()
