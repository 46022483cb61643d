"""Seconds per optimizer step of algos/kto.py, orpo.py and cpo.py vs TRL 1.16's trainers, at matched settings.

    python benchmarks/offline_pref_speed.py --method orpo  # 3 repeats x 40 steps -> benchmarks/results/orpo/
    python benchmarks/offline_pref_speed.py --method cpo
    python benchmarks/offline_pref_speed.py --method kto   # = python benchmarks/kto_speed.py
    python benchmarks/offline_pref_speed.py --method orpo --repeats 1 --steps 20   # a quicker look

TRL's trainers: KTOTrainer (trl), ORPOTrainer and CPOTrainer (trl.experimental.orpo / .cpo). Matched settings: the
same model folder (the toy SFT policy, toy-sft), the toy:add rows (unpaired for kto, preference pairs for orpo and
cpo), 64 examples (kto) or pairs (orpo, cpo) per optimizer step (one micro-batch, one process), float32, AdamW at
lr 1e-4 with a constant schedule, gradient clipping at 1.0, the same thread count (--threads), metrics logged every
--logging_steps steps, no evaluation, no checkpoints, and each method's loss settings:
    kto   loss_type kto, β 0.1 (both compute the reference point z from the mismatched pairs of the batch: four
          forwards per step, one with gradient; a reference model held in memory)
    orpo  λ (TRL's beta) 0.1, the NLL on prompt + chosen (both defaults); no reference model
    cpo   loss_type sigmoid, β 0.1, cpo_alpha 1 (both defaults); no reference model
TRL runs with gradient checkpointing off and on (its configs' default is on). Each script runs as its command line
runs it (its main(), its own optimizer: the scripts use torch's AdamW, TRL its default fused AdamW).

TRL is never a dependency of the project: this script uses a scratch virtualenv of its own (--trl_venv, default
.cache/venv-trl-1.16.0, made with --system-site-packages so it runs on the project's torch and transformers) with
trl==1.16.0 installed there with --no-deps. Each measurement runs in its own process, so its peak resident memory
(ru_maxrss) is its own. The clock (wall time and the process's CPU time) is read at the end of every step that logs
(the scripts: at each tracker.log call; TRL: a callback at the steps that are multiples of --logging_steps), so both
sides are timed over the same windows of --logging_steps steps, logging step included; per run: the median window
after --warmup steps, per step. With one thread per program the CPU time is what a quiet machine's wall time would
be, and it hardly moves when other jobs share the cores (the wall time does). The programs run interleaved,
--repeats times; the table gives the CPU time and the wall time of the median repeat and the best wall time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_speed import (ROOT, TRL_VERSION, clock, cpu_name, measure, peak_rss_mb, set_threads,  # noqa: E402
                       trl_python)

# per method: the script, the toy rows, TRL's module / config / trainer, and the loss settings on each side
METHODS = {
    "kto": {"script": "kto", "kind": "unpaired", "trl": ("trl", "KTOConfig", "KTOTrainer"),
            "trl_loss": {"loss_type": "kto", "beta": 0.1}, "flags": ["--loss_type", "kto", "--beta", "0.1"]},
    "orpo": {"script": "orpo", "kind": "preference", "trl": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
             "trl_loss": {"beta": 0.1}, "flags": ["--beta", "0.1"]},
    "cpo": {"script": "cpo", "kind": "preference", "trl": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
            "trl_loss": {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0},
            "flags": ["--loss_type", "sigmoid", "--beta", "0.1", "--cpo_alpha", "1.0"]},
}


# ----------------------------------------------------------------------------- the measured programs (child processes)
def child_trl(a) -> dict:
    """TRL's trainer for the method, clocked by a callback at the end of every logging step."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from common import toy

    m = METHODS[a.method]
    mod = importlib.import_module(m["trl"][0])
    Config, Trainer = getattr(mod, m["trl"][1]), getattr(mod, m["trl"][2])
    set_threads(a.threads)
    ds = toy.make_dataset("add", m["kind"], "train")
    tok = AutoTokenizer.from_pretrained(a.model)
    points: list[list[float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % a.logging_steps == 0:
                points.append(clock(state.global_step))

    cfg = Config(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                 learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                 max_grad_norm=1.0, max_steps=a.steps, max_length=1024, bf16=False, fp16=False, use_cpu=True,
                 gradient_checkpointing=bool(a.gradient_checkpointing), logging_steps=a.logging_steps,
                 save_strategy="no", eval_strategy="no", report_to=[], seed=1, dataloader_num_workers=0,
                 disable_dropout=True, model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True, **m["trl_loss"])
    trainer = Trainer(model=a.model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"points": points, "peak_rss_mb": peak_rss_mb()}


def child_ours(a) -> dict:
    """algos/{method}.py's main, as its command line runs it; the clock is read at every tracker.log call (every
    --logging_steps steps, after the step's update)."""
    import tyro

    from common import tracking

    m = METHODS[a.method]
    script = importlib.import_module(m["script"])
    set_threads(a.threads)
    points = []
    log = tracking.Tracker.log

    def timed_log(self, metrics, step, total_steps=None):
        points.append(clock(step))
        return log(self, metrics, step, total_steps)

    tracking.Tracker.log = timed_log
    flags = ["--model_name_or_path", a.model, "--max_steps", str(a.steps), "--per_device_train_batch_size",
             str(a.batch), "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--max_grad_norm", "1.0",
             "--logging_steps", str(a.logging_steps), "--eval_steps", "0", "--save_steps", "0",
             "--output_dir", a.out, "--overwrite_output_dir", "True", *m["flags"]]
    script.main(tyro.cli(script.Args, args=flags, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
    return {"points": points, "peak_rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------- the driver
def run_child(python: str, kind: str, a, out: Path, checkpointing: int = 0) -> dict:
    res, run = out / f"{a.method}_{kind}.json", out / f"{a.method}_{kind}"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [python, str(Path(__file__).resolve()), "--child", kind, "--method", a.method, "--model", a.model,
           "--steps", str(a.steps), "--batch", str(a.batch), "--threads", str(a.threads), "--logging_steps",
           str(a.logging_steps), "--result", str(res), "--out", str(run), "--gradient_checkpointing",
           str(checkpointing)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} ({python}) failed:\n{done.stderr[-3000:]}")
    return json.loads(res.read_text())


def main(default_method: str | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=sorted(METHODS), default=default_method, required=default_method is None,
                    help="which script and TRL trainer")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (a multiple of "
                    "--logging_steps)")
    ap.add_argument("--logging_steps", type=int, default=10, help="metrics logged every this many steps (both)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each program, interleaved")
    ap.add_argument("--batch", type=int, default=64, help="examples (kto) or pairs (orpo, cpo) per optimizer step")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every program")
    ap.add_argument("--trl_venv", default=str(ROOT / ".cache" / f"venv-trl-{TRL_VERSION}"))
    ap.add_argument("--out", default=None, help="where speed.md / speed.json go (default benchmarks/results/{method})")
    # child-process arguments
    ap.add_argument("--child", choices=["trl", "ours"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gradient_checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = {"trl": child_trl, "ours": child_ours}[a.child](a)
        Path(a.result).write_text(json.dumps(res) + "\n")
        return
    if a.warmup % a.logging_steps or a.steps < a.warmup + 2 * a.logging_steps:
        raise SystemExit("--warmup must be a multiple of --logging_steps and --steps >= --warmup + 2 x "
                         "--logging_steps (two timed windows at least)")

    from common import toy

    m = METHODS[a.method]
    a.model = str(toy.toy_policy_path("add"))
    out = Path(a.out or ROOT / "benchmarks" / "results" / a.method)
    scratch = ROOT / "runs" / "bench" / "offline_pref_speed"
    scratch.mkdir(parents=True, exist_ok=True)
    py = trl_python(Path(a.trl_venv))
    ours_name, trl_name = f"{m['script']}.py", f"TRL {m['trl'][2]}"
    programs = {
        ours_name: lambda: run_child(sys.executable, "ours", a, scratch),
        f"{trl_name}, gradient checkpointing off": lambda: run_child(py, "trl", a, scratch, 0),
        f"{trl_name}, gradient checkpointing on": lambda: run_child(py, "trl", a, scratch, 1),
    }
    load_before = os.getloadavg()
    summary = measure(programs, a.repeats, a.warmup)
    load_after = os.getloadavg()
    for v in summary.values():
        v["s_per_step"] = v["wall_s_per_step_median"]
    ours = summary[ours_name]
    checks = {}
    for key, what in (("cpu_s_per_step", "CPU time"), ("s_per_step", "wall time, median repeat")):
        for name, v in summary.items():
            if name != ours_name:
                checks[f"speed-up vs {name} ({what})"] = v[key] / ours[key]
    checks["peak RSS of TRL (checkpointing off) / the script's"] = (
        summary[f"{trl_name}, gradient checkpointing off"]["peak_rss_mb"] / ours["peak_rss_mb"])
    meta = {"method": a.method, "steps": a.steps, "warmup": a.warmup, "logging_steps": a.logging_steps,
            "repeats": a.repeats, "batch": a.batch, "threads": a.threads, "cpu": cpu_name(), "cores": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"meta": meta, "programs": summary, "checks": checks}, indent=2) + "\n")
    lines = ["| program | CPU s / step (median repeat) | wall s / step (median repeat) | wall (best repeat) | "
             "CPU per repeat | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for name, v in summary.items():
        lines.append(f"| {name} | {v['cpu_s_per_step']:.4f} | {v['s_per_step']:.4f} | {v['wall_s_per_step_best']:.4f} "
                     f"| {', '.join(f'{x:.4f}' for x in v['cpu_all'])} | {v['peak_rss_mb']:.0f} |")
    lines += ["", "| check (> 1 = the script is faster / TRL uses more) | measured |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in checks.items()]
    unit = "examples" if a.method == "kto" else "pairs"
    lines += ["", f"`python benchmarks/offline_pref_speed.py --method {a.method}`: {a.repeats} interleaved repeats x "
              f"{a.steps} steps (per run: the median {a.logging_steps}-step window after {a.warmup} warm-up steps), "
              f"{a.batch} {unit} per step, {a.threads} thread(s) per program, {meta['cores']} cores ({meta['cpu']}), "
              f"no GPU, load average {meta['loadavg_before']} before and {meta['loadavg_after']} after (other jobs "
              f"shared the cores: the CPU times are the measure), {meta['date']}."]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
