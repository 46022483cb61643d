"""Seconds per optimizer step of algos/dpo.py vs TRL 1.16's DPOTrainer and a plain PyTorch loop, at matched settings.

    python benchmarks/dpo_speed.py                         # 5 repeats x 30 steps each -> benchmarks/results/dpo/
    python benchmarks/dpo_speed.py --repeats 2 --steps 20  # a quicker look

Matched settings: the same model folder (the toy SFT policy, toy-sft, about 0.9M parameters), the toy:add preference
pairs, 64 pairs per optimizer step (one micro-batch, one process), β = 0.1, the sigmoid loss, a reference model held
in memory, float32, fused AdamW at lr 1e-4 (TRL's default optimizer), gradient clipping at 1.0, the same thread
count (--threads), metrics logged every --logging_steps steps (default every step), no evaluation, no checkpoints.
TRL runs with gradient checkpointing off and on (its DPOConfig default is on).

dpo.py runs in its default layout (one row per pair, the prompt shared by chosen and rejected) and in TRL's (two
rows per pair, --share_prompt False). The plain loop does the same forwards as dpo.py's default (one policy forward
with grad and one reference forward without, through dpo.py's forward_pairs) and nothing else: no metrics, no
logging, no accelerate: the floor the script's plumbing is measured against.

TRL is never a dependency of the project: this script makes a scratch virtualenv of its own (--trl_venv, default
.cache/venv-trl-1.16.0, made with --system-site-packages so it runs on the project's torch and transformers) and
installs trl==1.16.0 there with --no-deps. Each measurement runs in its own process, so its peak resident memory
(ru_maxrss) is its own. Time per step of a run: the median of its step durations after --warmup, read at each
step's end (dpo.py: its main() as the command line runs it, clocked at each tracker.log call; TRL: a callback; the
plain loop: its own clock), both as wall time and as the process's CPU time. With one thread per program the CPU
time is what a quiet machine's wall time would be, and it hardly moves when other jobs share the cores (the wall
time does). The programs run interleaved, --repeats times; the table gives the CPU time of the median repeat and
the wall time of the best and the median repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "algos"))
os.environ.setdefault("CLEANALIGN_CACHE", str(ROOT / ".cache"))
TRL_VERSION = "1.16.0"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def set_threads(n: int):
    import torch

    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the measured programs (child processes)
def child_trl(a) -> dict:
    """TRL's DPOTrainer, timed by a callback at the end of every optimizer step."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from common import toy

    set_threads(a.threads)
    ds = toy.make_dataset("add", "preference", "train")
    tok = AutoTokenizer.from_pretrained(a.model)
    points: list[list[float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            points.append(clock(state.global_step))

    cfg = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                    learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    max_grad_norm=1.0, max_steps=a.steps, beta=0.1, loss_type=["sigmoid"], max_length=1024,
                    bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=bool(a.gradient_checkpointing),
                    logging_steps=a.logging_steps, save_strategy="no", eval_strategy="no", report_to=[], seed=1,
                    dataloader_num_workers=0, disable_dropout=True, model_init_kwargs={"dtype": torch.float32},
                    disable_tqdm=True)
    trainer = DPOTrainer(model=a.model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"points": points, "peak_rss_mb": peak_rss_mb()}


def child_plain(a) -> dict:
    """The same forwards, backward and AdamW step as dpo.py's default sigmoid run, with nothing else."""
    import copy

    import torch
    import torch.nn.functional as F

    from common import data, model as model_utils
    from dpo import forward_pairs, pair_batch, tokenize_pairs

    set_threads(a.threads)
    tok = model_utils.load_tokenizer("toy-sft")
    model = model_utils.load_causal_lm(a.model, tok)
    ref = copy.deepcopy(model).eval()
    rows, _ = tokenize_pairs(data.load_data("toy:add", "train", toy_kind="preference"), tok, 1024, None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)  # as dpo.py and TRL
    model.train()
    points = []
    for step in range(a.steps):
        idx = data.batch_indices(len(rows), a.batch, step, 1)
        batch = pair_batch([rows[i] for i in idx], tok.pad_token_id, "cpu")  # dpo.py's default layout (shared prompt)
        mask = batch["completion_mask"].float()
        with torch.no_grad():
            ref_seq = (forward_pairs(ref, batch)[0] * mask).sum(1)
        seq = (forward_pairs(model, batch)[0] * mask).sum(1)
        B = len(idx)
        h = (seq[:B] - ref_seq[:B]) - (seq[B:] - ref_seq[B:])
        loss = -F.logsigmoid(0.1 * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        points.append(clock(step + 1))
    return {"points": points, "peak_rss_mb": peak_rss_mb()}


def child_ours(a) -> dict:
    """algos/dpo.py's main, as `python algos/dpo.py ...` runs it; the clock is read at every tracker.log call (every
    --logging_steps steps, after the step's update)."""
    import tyro

    import dpo
    from common import tracking

    set_threads(a.threads)
    points = []
    log = tracking.Tracker.log

    def timed_log(self, metrics, step, total_steps=None):
        points.append(clock(step))
        return log(self, metrics, step, total_steps)

    tracking.Tracker.log = timed_log
    flags = ["--model_name_or_path", a.model, "--max_steps", str(a.steps), "--per_device_train_batch_size",
             str(a.batch), "--beta", "0.1", "--loss_type", "sigmoid", "--learning_rate", "1e-4", "--logging_steps",
             str(a.logging_steps), "--eval_steps", "0", "--save_steps", "0", "--output_dir", a.out,
             "--overwrite_output_dir", "True", *a.dpo_flags]
    dpo.main(tyro.cli(dpo.Args, args=flags, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
    return {"points": points, "peak_rss_mb": peak_rss_mb()}


def clock(step: int) -> list[float]:
    """(step, wall time, CPU time of this process): with one thread, the CPU time hardly changes when other jobs
    share the cores, the wall time does."""
    return [step, time.perf_counter(), time.process_time()]


# ----------------------------------------------------------------------------- the driver
def per_step(points: list[list[float]], warmup: int, which: int) -> float:
    """The median duration of the steps after `warmup` from (step, wall, cpu) points at step ends; which = 1 wall
    time, 2 CPU time. The median is robust to a few steps slowed down by other jobs."""
    pts = [p for p in points if p[0] >= warmup]
    if len(pts) < 2:
        raise SystemExit(f"fewer than two logged steps after --warmup {warmup}: raise --steps")
    return statistics.median((b[which] - a[which]) / (b[0] - a[0]) for a, b in zip(pts, pts[1:]))


def measure(programs: dict, repeats: int, warmup: int) -> dict:
    """Run every program (name -> a function returning a child's result) `repeats` times, interleaved so that a
    change in machine load hits every program alike, and summarise each: median CPU and wall seconds per step over
    the repeats, the best repeat's wall time, every repeat's numbers and the median peak RSS."""
    results = {name: [] for name in programs}
    for r in range(repeats):
        for name, fn in programs.items():
            res = fn()
            x = {"wall": per_step(res["points"], warmup, 1), "cpu": per_step(res["points"], warmup, 2),
                 "peak_rss_mb": res["peak_rss_mb"]}
            results[name].append(x)
            print(f"repeat {r + 1}/{repeats} {name}: {x['cpu']:.4f} CPU s/step, {x['wall']:.4f} wall s/step, "
                  f"peak RSS {x['peak_rss_mb']:.0f} MB", flush=True)
    med = statistics.median
    return {name: {"cpu_s_per_step": med(x["cpu"] for x in v), "wall_s_per_step_best": min(x["wall"] for x in v),
                   "wall_s_per_step_median": med(x["wall"] for x in v),
                   "cpu_all": [round(x["cpu"], 5) for x in v], "wall_all": [round(x["wall"], 5) for x in v],
                   "peak_rss_mb": med(x["peak_rss_mb"] for x in v)} for name, v in results.items()}


def run_child(python: str, kind: str, a, extra: list[str], out: Path) -> dict:
    import shutil

    res, run = out / f"{kind}.json", out / kind
    shutil.rmtree(run, ignore_errors=True)
    cmd = [python, str(Path(__file__).resolve()), "--child", kind, "--model", a.model, "--steps", str(a.steps),
           "--batch", str(a.batch), "--threads", str(a.threads), "--logging_steps", str(a.logging_steps),
           "--result", str(res), "--out", str(run), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(res.read_text())


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def trl_python(venv: Path) -> str:
    py = venv / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", f"import trl; assert trl.__version__ == '{TRL_VERSION}'"],
                                        capture_output=True).returncode == 0
    if not ok:
        print(f"making a scratch virtualenv with trl=={TRL_VERSION} in {venv} (not a project dependency)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}", "--no-deps"], check=True)
    return str(py)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (a multiple of "
                    "--logging_steps)")
    ap.add_argument("--logging_steps", type=int, default=1, help="metrics logged every this many steps (all programs)")
    ap.add_argument("--repeats", type=int, default=5, help="measurements of each program, interleaved")
    ap.add_argument("--batch", type=int, default=64, help="preference pairs per optimizer step")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every program")
    ap.add_argument("--trl_venv", default=str(ROOT / ".cache" / f"venv-trl-{TRL_VERSION}"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dpo"))
    # child-process arguments
    ap.add_argument("--child", choices=["trl", "plain", "ours"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dpo_flags", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gradient_checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.dpo_flags = a.dpo_flags.split()
        res = {"trl": child_trl, "plain": child_plain, "ours": child_ours}[a.child](a)
        Path(a.result).write_text(json.dumps(res) + "\n")
        return

    from common import toy

    a.model = str(toy.toy_policy_path("add"))
    out = Path(a.out)
    scratch = ROOT / "runs" / "bench" / "dpo_speed"
    scratch.mkdir(parents=True, exist_ok=True)
    py = trl_python(Path(a.trl_venv))
    load_before = os.getloadavg()
    programs = {
        "dpo.py": lambda: run_child(sys.executable, "ours", a, [], scratch),
        "dpo.py --share_prompt False (TRL's layout)": lambda: run_child(sys.executable, "ours", a,
                                                                        ["--dpo_flags=--share_prompt False"], scratch),
        "plain PyTorch loop": lambda: run_child(sys.executable, "plain", a, [], scratch),
        "TRL DPOTrainer, gradient checkpointing off": lambda: run_child(py, "trl", a, ["--gradient_checkpointing", "0"],
                                                                        scratch),
        "TRL DPOTrainer, gradient checkpointing on": lambda: run_child(py, "trl", a, ["--gradient_checkpointing", "1"],
                                                                       scratch),
    }
    summary = measure(programs, a.repeats, a.warmup)
    load_after = os.getloadavg()
    ours, plain = summary["dpo.py"], summary["plain PyTorch loop"]
    trl_off, trl_on = (summary[f"TRL DPOTrainer, gradient checkpointing {x}"] for x in ("off", "on"))
    checks = {}
    for key, what in (("cpu_s_per_step", "CPU time"), ("wall_s_per_step_best", "wall time, best repeat")):
        checks[f"speed-up vs TRL, checkpointing off ({what}); target >= 1.5x"] = trl_off[key] / ours[key]
        checks[f"speed-up vs TRL, checkpointing on ({what})"] = trl_on[key] / ours[key]
        checks[f"overhead vs the plain loop ({what}); target <= 15%"] = ours[key] / plain[key] - 1
    checks["peak RSS vs TRL, checkpointing off; target <= 1"] = ours["peak_rss_mb"] / trl_off["peak_rss_mb"]
    meta = {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "batch_pairs": a.batch, "threads": a.threads,
            "cpu": cpu_name(), "cores": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"meta": meta, "programs": summary, "checks": checks}, indent=2) + "\n")
    lines = ["| program | CPU s / step (median repeat) | wall s / step (best repeat) | wall (median repeat) | "
             "peak RSS (MB) |", "|---|---|---|---|---|"]
    for name, v in summary.items():
        lines.append(f"| {name} | {v['cpu_s_per_step']:.4f} | {v['wall_s_per_step_best']:.4f} | "
                     f"{v['wall_s_per_step_median']:.4f} | {v['peak_rss_mb']:.0f} |")
    lines += ["", "| check | measured |", "|---|---|"]
    for k, v in checks.items():
        lines.append(f"| {k} | {v:+.1%} |" if "overhead" in k else f"| {k} | {v:.2f}x |")
    lines += ["", f"{a.repeats} interleaved repeats x {a.steps} steps (per run: the median step after {a.warmup} "
              f"warm-up steps), {a.batch} pairs per step, {a.threads} thread(s) per program, {meta['cores']} cores "
              f"({meta['cpu']}), "
              f"load average {meta['loadavg_before']} before and {meta['loadavg_after']} after, {meta['date']}."]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
