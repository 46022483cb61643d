"""Seconds per optimizer step of algos/dpo.py vs TRL 1.16's DPOTrainer and a plain PyTorch loop, at matched settings.

    python benchmarks/dpo_speed.py                         # 5 repeats x 30 steps each -> benchmarks/results/dpo/
    python benchmarks/dpo_speed.py --repeats 2 --steps 20  # a quicker look
    python benchmarks/dpo_speed.py --section packing       # variable-length pairs -> benchmarks/results/dpo/packing/

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

--section packing: tokens per second on variable-length preference pairs (varlen_pairs: prompt + chosen and prompt +
rejected each 5 to 200 tokens, from benchmarks/vs_trl.py's varlen_dataset), --varlen_batch pairs per step, for
dpo.py padded, dpo.py --packing (whole pairs packed, the prompt shared), dpo.py --packing --share_prompt False
(sequences packed by position ids), TRL's DPOTrainer with its defaults (gradient checkpointing on) and TRL with
padding_free=True and checkpointing off. Every program trains on the same batches in the same order (TRL reads a
file written in dpo.py's batch order, without shuffling), so the tokens per step are the same and tokens per second
compare as the inverse of the time: tokens = prompt + chosen + prompt + rejected of the step's pairs (dpo.py's
tokenisation), time = the process's CPU time (or wall time) from the end of step --warmup to the last step, over
the tokens of those steps. The logged losses of the first steps are kept to check that the programs do the same
work (step 1 is log 2 for all of them).
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
    if a.varlen:  # the pairs in dpo.py's batch order (written by the parent), read without shuffling
        from datasets import Dataset

        ds = Dataset.from_list([json.loads(line) for line in Path(a.varlen).read_text().splitlines()])
    else:
        ds = toy.make_dataset("add", "preference", "train")
    tok = AutoTokenizer.from_pretrained(a.model)
    points: list[list[float]] = []
    losses: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            points.append(clock(state.global_step))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    cfg = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                    learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    max_grad_norm=1.0, max_steps=a.steps, beta=0.1, loss_type=["sigmoid"], max_length=1024,
                    bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=bool(a.gradient_checkpointing),
                    logging_steps=a.logging_steps, save_strategy="no", eval_strategy="no", report_to=[], seed=1,
                    dataloader_num_workers=0, disable_dropout=True, model_init_kwargs={"dtype": torch.float32},
                    disable_tqdm=True, padding_free=a.trl_mode == "padding_free")
    cls = DPOTrainer
    if a.varlen:
        class InOrder(DPOTrainer):  # the file is already in the order dpo.py draws its batches
            def _get_train_sampler(self, train_dataset=None):
                return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None
                                                          else self.train_dataset)

        cls = InOrder
    trainer = cls(model=a.model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"points": points, "peak_rss_mb": peak_rss_mb(), "losses": losses}


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
    points, losses = [], {}
    log = tracking.Tracker.log

    def timed_log(self, metrics, step, total_steps=None):
        points.append(clock(step))
        if "loss" in metrics:
            losses[step] = metrics["loss"]
        return log(self, metrics, step, total_steps)

    tracking.Tracker.log = timed_log
    flags = ["--model_name_or_path", a.model, "--max_steps", str(a.steps), "--per_device_train_batch_size",
             str(a.batch), "--beta", "0.1", "--loss_type", "sigmoid", "--learning_rate", "1e-4", "--logging_steps",
             str(a.logging_steps), "--eval_steps", "0", "--save_steps", "0", "--output_dir", a.out,
             "--overwrite_output_dir", "True", *a.dpo_flags]
    if a.varlen:
        flags += ["--dataset_name", a.varlen, "--num_eval_prompts", "0"]
    dpo.main(tyro.cli(dpo.Args, args=flags, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
    return {"points": points, "peak_rss_mb": peak_rss_mb(), "losses": losses}


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


def varlen_pairs(n: int = 4096, seed: int = 0):
    """Variable-length preference pairs from vs_trl.py's language-modelling mix (texts of 5 to 200 tokens): each
    pair's prompt is a random-length head of one text and its chosen completion the rest of it; the rejected one is
    the tail of another text, so prompt + rejected is also 5 to 200 tokens and completions of a pair differ in
    length (deterministic)."""
    import random

    from datasets import Dataset

    from benchmarks.vs_trl import varlen_dataset

    rng = random.Random(seed)
    texts = varlen_dataset(2 * n, seed)["text"]
    rows = []
    for a, b in zip(texts[0::2], texts[1::2]):
        k = rng.randint(1, max(1, len(a) - 1))  # a non-empty prompt and a non-empty chosen completion
        rows.append({"prompt": a[:k], "chosen": a[k:] or a[-1:], "rejected": b[-max(1, len(b) - k):]})
    return Dataset.from_list(rows)


def measure_tokens(programs: dict, repeats: int, warmup: int, tokens: list[int]) -> dict:
    """Like measure, per token: each run's CPU and wall seconds from the end of step `warmup` to its last step over
    the tokens of those steps (tokens[s] = the tokens of step s + 1, the same for every program), interleaved
    repeats, medians; plus the first logged losses of the first repeat."""
    results = {name: [] for name in programs}
    first_losses = {}
    for r in range(repeats):
        for name, fn in programs.items():
            res = fn()
            pts = {int(p[0]): p for p in res["points"]}
            last = max(pts)
            n_tok = sum(tokens[warmup:last])
            x = {"cpu": (pts[last][2] - pts[warmup][2]) / n_tok, "wall": (pts[last][1] - pts[warmup][1]) / n_tok,
                 "steps": last - warmup, "peak_rss_mb": res["peak_rss_mb"]}
            results[name].append(x)
            first_losses.setdefault(name, {int(k): v for k, v in sorted(res["losses"].items(), key=lambda kv:
                                                                         int(kv[0]))[:5]})
            print(f"repeat {r + 1}/{repeats} {name}: {1 / x['cpu']:.0f} tokens per CPU s, {1 / x['wall']:.0f} per "
                  f"wall s, peak RSS {x['peak_rss_mb']:.0f} MB", flush=True)
    med = statistics.median
    return {name: {"tokens_per_cpu_s": 1 / med(x["cpu"] for x in v),
                   "tokens_per_wall_s_median": 1 / med(x["wall"] for x in v),
                   "tokens_per_wall_s_best": 1 / min(x["wall"] for x in v),
                   "tokens_per_cpu_s_all": [round(1 / x["cpu"], 1) for x in v],
                   "peak_rss_mb": med(x["peak_rss_mb"] for x in v), "first_losses": first_losses[name]}
            for name, v in results.items()}


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
    ap.add_argument("--varlen", default="", help=argparse.SUPPRESS)
    ap.add_argument("--trl_mode", default="", help=argparse.SUPPRESS)
    ap.add_argument("--section", choices=["toy", "packing"], default="toy", help="toy: the toy:add pairs (default); "
                    "packing: tokens per second on variable-length pairs -> OUT/packing/")
    ap.add_argument("--varlen_batch", type=int, default=16, help="packing section: pairs per optimizer step")
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
    if a.section == "packing":
        return packing_section(a, py, out / "packing", scratch / "packing")
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


def packing_section(a, py: str, out: Path, scratch: Path):
    """Tokens per second of dpo.py (padded, packed) and TRL (defaults, padding_free) on the same variable-length
    batches (see the module docstring)."""
    from common import data, model as model_utils
    from dpo import tokenize_pairs

    scratch.mkdir(parents=True, exist_ok=True)
    ds = varlen_pairs()
    ours_file, trl_file = scratch / "varlen_pairs.jsonl", scratch / "varlen_pairs_in_dpo_order.jsonl"
    ds.to_json(str(ours_file))
    tok = model_utils.load_tokenizer(a.model)
    rows, dropped = tokenize_pairs(ds, tok, 1024, None)
    assert not dropped and len(rows) == len(ds)
    order = [data.batch_indices(len(rows), a.varlen_batch, s, 1) for s in range(a.steps)]  # dpo.py's draws (seed 1)
    ds.select([i for idx in order for i in idx]).to_json(str(trl_file))
    tokens = [sum(2 * len(rows[i][0]) + len(rows[i][1]) + len(rows[i][2]) for i in idx) for idx in order]
    lengths = sorted([len(p) + len(c) for p, c, _ in rows] + [len(p) + len(r) for p, _, r in rows])
    a.batch = a.varlen_batch

    def ours(flags: str) -> dict:
        return run_child(sys.executable, "ours", a, ["--varlen", str(ours_file), f"--dpo_flags={flags}"], scratch)

    def trl(ckpt: int, mode: str = "") -> dict:
        return run_child(py, "trl", a, ["--varlen", str(trl_file), "--gradient_checkpointing", str(ckpt),
                                        f"--trl_mode={mode}"], scratch)

    programs = {
        "dpo.py (padded)": lambda: ours(""),
        "dpo.py --packing": lambda: ours("--packing True"),
        "dpo.py --packing --share_prompt False": lambda: ours("--packing True --share_prompt False"),
        "TRL DPOTrainer, defaults": lambda: trl(1),
        "TRL DPOTrainer, padding_free=True (checkpointing off)": lambda: trl(0, "padding_free"),
    }
    load_before = os.getloadavg()
    t0 = time.time()
    summary = measure_tokens(programs, a.repeats, a.warmup, tokens)
    meta = {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "batch_pairs": a.varlen_batch,
            "threads": a.threads, "cpu": cpu_name(), "cores": os.cpu_count(),
            "sequence_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
            "tokens_per_step_mean": statistics.mean(tokens[a.warmup:]),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "minutes": round((time.time() - t0) / 60, 1),
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    packed, padded = summary["dpo.py --packing"], summary["dpo.py (padded)"]
    trl_def = summary["TRL DPOTrainer, defaults"]
    trl_pf = summary["TRL DPOTrainer, padding_free=True (checkpointing off)"]
    checks = {}
    for key, what in (("tokens_per_cpu_s", "CPU time"), ("tokens_per_wall_s_best", "wall time, best repeat")):
        checks[f"dpo.py --packing vs TRL defaults ({what}); target >= 2x"] = packed[key] / trl_def[key]
        checks[f"dpo.py --packing vs TRL padding_free ({what}); target >= 1.2x"] = packed[key] / trl_pf[key]
        checks[f"dpo.py --packing vs dpo.py padded ({what})"] = packed[key] / padded[key]
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"meta": meta, "programs": summary, "checks": checks}, indent=2) + "\n")
    lines = ["| program | tokens / CPU s (median repeat) | tokens / wall s (best) | tokens / wall s (median) | "
             "peak RSS (MB) | loss at steps 1, 2, 3 |", "|---|---|---|---|---|---|"]
    for name, v in summary.items():
        fl = ", ".join(f"{x:.4f}" for _, x in sorted(v["first_losses"].items())[:3])
        lines.append(f"| {name} | {v['tokens_per_cpu_s']:.0f} | {v['tokens_per_wall_s_best']:.0f} | "
                     f"{v['tokens_per_wall_s_median']:.0f} | {v['peak_rss_mb']:.0f} | {fl} |")
    lines += ["", "| check | measured |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in checks.items()]
    sl = meta["sequence_tokens"]
    lines += ["", f"{a.repeats} interleaved repeats x {a.steps} steps (tokens and time from the end of step {a.warmup} "
              f"on), {a.varlen_batch} pairs per step ({meta['tokens_per_step_mean']:.0f} tokens per step on average: "
              f"prompt + chosen + prompt + rejected), sequences of {sl['min']} to {sl['max']} tokens (median "
              f"{sl['median']}), the same batches in the same order for every program, {a.threads} thread(s) per "
              f"program, {meta['cores']} cores ({meta['cpu']}), load average {meta['loadavg_before']} before and "
              f"{meta['loadavg_after']} after ({meta['minutes']} min), {meta['date']} UTC. TRL 1.16's DPOTrainer "
              "ignores padding_free=True (it warns that the option is disabled and pads), so that row is TRL padded "
              "with checkpointing off."]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
