"""CPU time per optimizer step of algos/xpo.py and algos/nash_md.py vs TRL 1.13's XPOTrainer and NashMDTrainer.

    python benchmarks/online_pref_speed.py                         # both, 3 interleaved repeats x 40 steps
    python benchmarks/online_pref_speed.py --methods xpo --repeats 1 --steps 20   # a quicker look
    python benchmarks/online_pref_speed.py --rewrite               # speed.md again from speed.json

Results: benchmarks/results/online_pref/speed.md and speed.json (hardware, load, versions, settings, ratios).

TRL's trainers: XPOTrainer and NashMDTrainer live in trl.experimental.xpo / .nash_md of TRL 1.13, their last
release (TRL 1.16 has neither; PPO has no trainer in TRL 1.13 or 1.16), so TRL runs in the scratch virtualenv
.cache/venv-trl-1.13.0 (--trl_venv; made with --system-site-packages on the project's torch and transformers, trl
installed there with --no-deps; TRL is never a project dependency).

Matched settings, as benchmarks/vs_trl.py matches online_dpo.py against TRL's OnlineDPOTrainer: the same model
folder (the toy SFT policy, toy-sft) and a copy of it as the frozen reference, the toy:add prompts, 32 prompts per
optimizer step giving 32 pairs (the scripts count completions: --per_device_train_batch_size 64; TRL counts prompts:
32), one micro-batch, one process, 8 new tokens, temperature 1 with no top-k / top-p, the same preference source
(the toy reward model toy-rm, one-output sequence classifier, loaded by each program), β 0.1, the sigmoid loss, XPO's
α 1e-5 and Nash-MD's mixture coefficient 0.5 (both TRL's defaults), float32, AdamW at lr 2e-5 with a constant
schedule and no weight decay, gradient clipping at 1.0, no missing-EOS penalty, metrics every --logging_steps
steps, no evaluation, no checkpoints, no sample logging. Each program's own optimizer kernel (the scripts: torch's
default AdamW; TRL: its default, fused AdamW). TRL runs with gradient checkpointing off and with TRL's default (on).

The two sides do the same work per step: XPO samples from the policy and from the reference, scores both with the
reward model, runs the policy (with grad) and the reference (without) on both samples; Nash-MD samples from the
policy and from the per-token geometric mixture of policy and reference, scores both, and runs the policy and the
reference on the policy sample. How: xpo.py shares the prompt row of each pair's two samples in one forward; TRL's
mixture sampler (GeometricMixtureWrapper) runs generate with the KV cache off, nash_md.py's keeps both models' caches.

Timing: each program in its own process with one thread, through its real entry point (the script's main() as its
command line runs it, clocked at each tracker.log call; TRL's trainer.train(), clocked by a callback at the steps
that are multiples of --logging_steps), so both are timed over the same windows of --logging_steps steps, generation
and logging included. Per run: the median window after --warmup steps, per step, as CPU time of the process (with one
thread, what a quiet machine's wall time would be; it hardly moves when other jobs share the cores, the wall time
does) and wall time. The programs run interleaved, --repeats times (benchmarks/dpo_speed.py's `measure`): medians.
First logged metrics: the means over the first logging window of the first repeat. Both sides start from the same
weights and see the same prompts' distribution but draw different samples (different prompt order and random
streams), so they agree only up to sampling noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_speed import ROOT, clock, cpu_name, measure, peak_rss_mb, set_threads  # noqa: E402

TRL_VERSION = "1.13.0"
METHODS = {
    "xpo": {"trl": ("trl.experimental.xpo", "XPOConfig", "XPOTrainer"), "loss": {"alpha": [1e-5]},
            "flags": ["--alpha", "1e-5", "--loss_type", "sigmoid"],
            "compare": ("loss/dpo", "loss/xpo", "objective/model_scores", "objective/ref_scores", "objective/kl",
                        "objective/entropy")},
    "nash_md": {"trl": ("trl.experimental.nash_md", "NashMDConfig", "NashMDTrainer"),
                "loss": {"mixture_coef": [0.5]}, "flags": ["--mixture_coef", "0.5"],
                "compare": ("loss/kl", "loss/score", "rewards/probabilities", "objective/entropy")},
}
PAIRS = 32  # prompts (= pairs) per optimizer step
SETTINGS = {"prompts_per_step": PAIRS, "completions_per_prompt": 2, "script_per_device_train_batch_size": 2 * PAIRS,
            "trl_per_device_train_batch_size": PAIRS, "max_new_tokens": 8, "temperature": 1.0, "top_k": 0,
            "top_p": 1.0, "beta": 0.1, "loss_type": "sigmoid", "alpha (xpo)": 1e-5, "mixture_coef (nash_md)": 0.5,
            "learning_rate": 2e-5, "lr_scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0,
            "dtype": "float32", "reward": "toy-rm (toy reward model, one-output sequence classifier)",
            "reference": "a frozen copy of the start policy (toy-sft)", "missing_eos_penalty": None,
            "gradient_accumulation_steps": 1, "processes": 1, "optimizer": "AdamW (scripts: torch default kernel; "
            "TRL: its default adamw_torch_fused)"}


# ----------------------------------------------------------------------------- the measured programs (child processes)
def child_trl(a) -> dict:
    """TRL 1.13's trainer for the method, clocked by a callback at the end of every logging step."""
    import importlib

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from common import toy

    m = METHODS[a.method]
    mod = importlib.import_module(m["trl"][0])
    Config, Trainer = getattr(mod, m["trl"][1]), getattr(mod, m["trl"][2])
    set_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    rm_path = toy.toy_reward_model_path("add")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1, dtype=torch.float32)
    points: list[list[float]] = []
    logs_seen: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % a.logging_steps == 0:
                points.append(clock(state.global_step))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                logs_seen.append({"step": state.global_step, **{k: v for k, v in logs.items()
                                                                if isinstance(v, (int, float))}})

    cfg = Config(output_dir=a.out, per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1,
                 learning_rate=2e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                 max_grad_norm=1.0, max_steps=a.steps, bf16=False, fp16=False, use_cpu=True,
                 gradient_checkpointing=bool(a.gradient_checkpointing), logging_steps=a.logging_steps,
                 save_strategy="no", eval_strategy="no", report_to=[], seed=1, dataloader_num_workers=0,
                 disable_tqdm=True, model_init_kwargs={"dtype": torch.float32}, max_new_tokens=8, temperature=1.0,
                 top_k=0, top_p=1.0, beta=[0.1], loss_type="sigmoid", disable_dropout=True,
                 missing_eos_penalty=None, **m["loss"])
    kw = {"reward_processing_classes": AutoTokenizer.from_pretrained(rm_path)} if a.method == "xpo" else {}
    trainer = Trainer(model=a.model, reward_funcs=rm, args=cfg, processing_class=tok, callbacks=[Clock()],
                      train_dataset=toy.make_dataset("add", "prompt", "train"), **kw)
    trainer.train()
    return {"points": points, "peak_rss_mb": peak_rss_mb(), "logs": logs_seen}


def child_ours(a) -> dict:
    """algos/{method}.py's main, as its command line runs it; the clock is read at every tracker.log call."""
    import importlib

    import tyro

    from common import tracking

    script = importlib.import_module(a.method)
    set_threads(a.threads)
    points = []
    log = tracking.Tracker.log

    def timed_log(self, metrics, step, total_steps=None):
        points.append(clock(step))
        return log(self, metrics, step, total_steps)

    tracking.Tracker.log = timed_log
    flags = ["--model_name_or_path", a.model, "--max_steps", str(a.steps), "--per_device_train_batch_size",
             str(2 * PAIRS), "--learning_rate", "2e-5", "--warmup_steps", "0", "--weight_decay", "0.0",
             "--max_grad_norm", "1.0", "--max_new_tokens", "8", "--temperature", "1.0", "--top_k", "0", "--top_p",
             "1.0", "--beta", "0.1", "--reward_model_name_or_path", "toy-rm",
             "--logging_steps", str(a.logging_steps), "--log_completions_steps", "0", "--eval_steps", "0",
             "--save_steps", "0", "--seed", "1", "--output_dir", a.out, "--overwrite_output_dir", "True",
             *METHODS[a.method]["flags"]]
    script.main(tyro.cli(script.Args, args=flags, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
    metrics = [json.loads(x) for x in (Path(a.out) / "metrics.jsonl").read_text().splitlines() if x]
    return {"points": points, "peak_rss_mb": peak_rss_mb(),
            "logs": [{k: v for k, v in x.items() if isinstance(v, (int, float))} for x in metrics]}


# ----------------------------------------------------------------------------- the driver
def trl_python(venv: Path) -> str:
    """The python of the scratch virtualenv holding TRL 1.13 (made once, trl installed there only)."""
    py = venv / "bin" / "python"
    check = f"import trl; assert trl.__version__ == '{TRL_VERSION}'"
    if not (py.exists() and subprocess.run([str(py), "-c", check], capture_output=True).returncode == 0):
        print(f"making a scratch virtualenv with trl=={TRL_VERSION} in {venv} (not a project dependency)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}", "--no-deps"], check=True)
    return str(py)


def run_child(python: str, kind: str, method: str, a, scratch: Path, checkpointing: int = 0) -> dict:
    tag = f"{method}_{kind}{'_ckpt' if checkpointing else ''}"
    res, run = scratch / f"{tag}.json", scratch / tag
    shutil.rmtree(run, ignore_errors=True)
    cmd = [python, str(Path(__file__).resolve()), "--child", kind, "--method", method, "--model", a.model,
           "--steps", str(a.steps), "--threads", str(a.threads), "--logging_steps", str(a.logging_steps),
           "--result", str(res), "--out", str(run), "--gradient_checkpointing", str(checkpointing)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{method} {kind} ({python}) failed:\n{done.stderr[-3000:]}")
    return json.loads(res.read_text())


def versions(python: str) -> dict:
    code = ("import json, torch, transformers, trl, accelerate; print(json.dumps({'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'accelerate': accelerate.__version__, "
            "'trl (TRL side)': trl.__version__}))")
    out = json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    out["python"] = sys.version.split()[0]
    probe = ("import importlib.util as u; print(','.join(m for m in ('trl.experimental.xpo', "
             "'trl.experimental.nash_md') if u.find_spec(m)))")
    ppo = ("import importlib.util as u, trl; print(hasattr(trl, 'PPOTrainer') or "
           "u.find_spec('trl.experimental.ppo') is not None)")
    out["a PPO trainer in trl 1.13.0"] = subprocess.run([python, "-c", ppo], capture_output=True,
                                                        text=True).stdout.strip()
    v116 = ROOT / ".cache" / "venv-trl-1.16.0" / "bin" / "python"
    if v116.exists():  # TRL 1.16 has no XPO, Nash-MD or PPO trainer (checked in its package)
        found = subprocess.run([str(v116), "-c", probe], capture_output=True, text=True)
        out["trl.experimental.xpo / .nash_md in trl 1.16.0"] = found.stdout.strip() or "none"
        out["a PPO trainer in trl 1.16.0"] = subprocess.run([str(v116), "-c", ppo], capture_output=True,
                                                            text=True).stdout.strip()
    return out


def first_window(logs: list[dict], keys: tuple[str, ...], logging_steps: int) -> dict:
    row = next((x for x in logs if x.get("step") == logging_steps and any(k in x for k in keys)), None)
    return {k: row[k] for k in keys if row and k in row}


def write_md(out: Path):
    """speed.md from speed.json (`--rewrite` redoes it without measuring)."""
    res = json.loads((out / "speed.json").read_text())
    meta = res["meta"]
    lines = ["# xpo.py and nash_md.py vs TRL 1.13's XPOTrainer and NashMDTrainer: CPU time per optimizer step", "",
             "Written by `python benchmarks/online_pref_speed.py` (its docstring says what is matched and how it is "
             "timed). TRL 1.16 has no XPO or Nash-MD trainer (checked in its package: no trl.experimental.xpo or "
             ".nash_md), so the comparison is with TRL 1.13, their last release. PPO has no trainer in TRL 1.13 or "
             "1.16: algos/ppo.py has no side-by-side.", "",
             "| program | CPU ms / step (median repeat) | wall ms / step (median repeat) | wall (best repeat) | "
             "CPU ms per repeat | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for name, v in res['programs'].items():
        lines.append(f"| {name} | {v['cpu_s_per_step'] * 1e3:.1f} | {v['wall_s_per_step_median'] * 1e3:.1f} | "
                     f"{v['wall_s_per_step_best'] * 1e3:.1f} | {', '.join(f'{x * 1e3:.1f}' for x in v['cpu_all'])} | "
                     f"{v['peak_rss_mb']:.0f} |")
    lines += ["", "| ratio (> 1: the script is faster) | measured |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in res['checks'].items()]
    lines += ["", f"First logged metrics (means over steps 1-{meta['logging_steps']}, first repeat). Same start "
              "weights, reference and reward model, but each side draws its own samples (its own prompt order and "
              "random streams), so these agree only up to sampling noise, not exactly. Where the samples cannot "
              "matter they agree: at step 1 the policy is the reference, so XPO's loss/dpo is log 2 = 0.6931 and "
              "every KL term is 0 on both sides (the window means include steps 2 and later).", ""]
    for meth in meta['methods']:
        ks = METHODS[meth]["compare"]
        lines += [f"| {meth} | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
        for name, vals in res['first_logged'].items():
            if name == f"{meth}.py" or name.startswith(f"TRL {METHODS[meth]['trl'][2]}"):
                lines.append(f"| {name} | " + " | ".join(f"{vals[k]:.4g}" if k in vals else "-" for k in ks) + " |")
        lines.append("")
        trl = [v for n, v in res["first_logged"].items() if n.startswith(f"TRL {METHODS[meth]['trl'][2]}")]
        if len(trl) == 2:
            same = ("log the same metrics" if trl[0] == trl[1] else
                    "log different metrics: TRL draws other samples with checkpointing on (not investigated)")
            lines += [f"TRL's two {meth} runs (checkpointing off and on, seed 1) {same}.", ""]
    s = meta["settings"]
    lines += ["Matched settings: toy-sft policy and a frozen copy as reference, toy:add prompts, "
              f"{s['prompts_per_step']} prompts x {s['completions_per_prompt']} completions (one pair) per optimizer "
              f"step (scripts --per_device_train_batch_size {s['script_per_device_train_batch_size']}, TRL "
              f"{s['trl_per_device_train_batch_size']}: TRL counts prompts), {s['max_new_tokens']} new tokens, "
              f"temperature 1, no top-k / top-p, reward model toy-rm for both, beta {s['beta']}, sigmoid loss, "
              f"xpo alpha {s['alpha (xpo)']}, nash_md mixture_coef {s['mixture_coef (nash_md)']}, lr "
              f"{s['learning_rate']} constant, no weight decay, clipping 1.0, float32, one process, one micro-batch; "
              "each side's default AdamW kernel (TRL: fused).", "",
              f"{meta['repeats']} interleaved repeat(s) x {meta['steps']} steps (per run: the median "
              f"{meta['logging_steps']}-step window after {meta['warmup']} warm-up steps), {meta['threads']} thread "
              f"per program, {meta['cores']} cores ({meta['cpu']}), no GPU; /proc/loadavg "
              f"`{meta['proc_loadavg_before']}` before and `{meta['proc_loadavg_after']}` after "
              f"({meta['minutes']} min; other jobs shared the cores, which inflates CPU times a little and wall "
              f"times a lot: the CPU times are the measure), {meta['date']}. Versions: "
              + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "."]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["xpo", "nash_md"])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (a multiple of "
                    "--logging_steps)")
    ap.add_argument("--logging_steps", type=int, default=5, help="metrics logged (and the clock read) every this "
                    "many steps, both sides")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements of each program (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every program")
    ap.add_argument("--no_trl_defaults", action="store_true", help="leave out TRL with gradient checkpointing on")
    ap.add_argument("--trl_venv", default=str(ROOT / ".cache" / f"venv-trl-{TRL_VERSION}"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "online_pref"))
    ap.add_argument("--rewrite", action="store_true", help="only rewrite speed.md from the speed.json in --out")
    # child-process arguments
    ap.add_argument("--child", choices=["trl", "ours"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gradient_checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = {"trl": child_trl, "ours": child_ours}[a.child](a)
        Path(a.result).write_text(json.dumps(res) + "\n")
        return
    if a.rewrite:
        return write_md(Path(a.out))
    if a.warmup % a.logging_steps or a.steps < a.warmup + 2 * a.logging_steps:
        raise SystemExit("--warmup must be a multiple of --logging_steps and --steps >= --warmup + 2 x "
                         "--logging_steps (two timed windows at least)")

    from common import toy

    a.model = str(toy.toy_policy_path("add"))
    toy.toy_reward_model_path("add")  # built (or found) before any timing
    py = trl_python(Path(a.trl_venv))
    scratch = ROOT / "runs" / "bench" / "online_pref_speed" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    programs, raw = {}, {}

    def keep(name, fn):
        def run():
            res = fn()
            raw.setdefault(name, []).append(res)
            return res
        return run

    for meth in a.methods:
        trl_name = METHODS[meth]["trl"][2]
        progs = {f"{meth}.py": lambda meth=meth: run_child(sys.executable, "ours", meth, a, scratch),
                 f"TRL {trl_name}, checkpointing off": lambda meth=meth: run_child(py, "trl", meth, a, scratch, 0)}
        if not a.no_trl_defaults:
            progs[f"TRL {trl_name}, defaults (checkpointing on)"] = lambda meth=meth: run_child(py, "trl", meth, a,
                                                                                             scratch, 1)
        programs.update({name: keep(name, fn) for name, fn in progs.items()})
    load_before = os.getloadavg()
    loadavg_before = Path("/proc/loadavg").read_text().strip()
    t0 = time.time()
    summary = measure(programs, a.repeats, a.warmup)
    loadavg_after = Path("/proc/loadavg").read_text().strip()
    load_after = os.getloadavg()
    checks, first = {}, {}
    for meth in a.methods:
        trl_name = METHODS[meth]["trl"][2]
        ours = summary[f"{meth}.py"]
        for name, v in summary.items():
            if name.startswith(f"TRL {trl_name}"):
                checks[f"{meth}: {name} / {meth}.py, CPU time"] = v["cpu_s_per_step"] / ours["cpu_s_per_step"]
                checks[f"{meth}: {name} / {meth}.py, wall time (median repeat)"] = (
                    v["wall_s_per_step_median"] / ours["wall_s_per_step_median"])
        for name in summary:
            if name == f"{meth}.py" or name.startswith(f"TRL {trl_name}"):
                first[name] = first_window(raw[name][0]["logs"], METHODS[meth]["compare"], a.logging_steps)
    meta = {"methods": a.methods, "steps": a.steps, "warmup": a.warmup, "logging_steps": a.logging_steps,
            "repeats": a.repeats, "threads": a.threads, "model": "toy-sft (" + Path(a.model).name + ")",
            "data": "toy:add prompts (train split)", "cpu": cpu_name(), "cores": os.cpu_count(), "gpu": "none",
            "proc_loadavg_before": loadavg_before, "proc_loadavg_after": loadavg_after,
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
            "minutes": round((time.time() - t0) / 60, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "versions": versions(py), "settings": SETTINGS,
            "notes": ["TRL 1.16 has no XPO or Nash-MD trainer (no trl.experimental.xpo / nash_md in its package): "
                      "TRL 1.13 is their last release.",
                      "PPO has no trainer in TRL 1.13 or 1.16, so algos/ppo.py has no side-by-side.",
                      "First logged metrics: means over the first logging window; the two sides draw different "
                      "samples (prompt order, random streams), so they agree only up to sampling noise."]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"meta": meta, "programs": summary, "checks": checks,
                                                "first_logged": first}, indent=2) + "\n")
    write_md(out)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
