"""CPU seconds per optimizer step of algos/gkd.py vs TRL 1.16's GKDTrainer and of algos/prm.py vs TRL 1.13's
PRMTrainer, at matched settings, with the per-step losses of the first steps side by side.

    python benchmarks/distill_prm_speed.py --method gkd   # -> benchmarks/results/gkd/speed.{md,json}
    python benchmarks/distill_prm_speed.py --method prm   # -> benchmarks/results/prm/speed.{md,json}
    python benchmarks/distill_prm_speed.py --method gkd --repeats 1 --steps 20   # a quicker look

gkd: the student is toy-small as gkd.py initialises it (seed 1), saved once to a folder both programs load; the
teacher is toy-sft-full (fp32, frozen). The toy:add prompt-completion rows as gkd.py tokenises them, in gkd.py's
batch order (TRL reads them through its own DataCollatorForChatML, from `input_ids` + `completion_mask`, with a
sampler that yields gkd.py's order), 64 sequences per optimizer step, AdamW at lr 3e-3 (gkd.py's default) with a
linear schedule and no warm-up (both give step s the same learning rate), clipping 1.0, weight decay 0, β 0.5
(both defaults), divergence at temperature 1, sampling temperature 0.9, top_k 0, at most 8 new tokens (gkd.py's
default; TRL's 128), seq_kd off, dropout off, max_length 128. Two settings: λ 0 (supervised KD on the dataset's
completions: the same inputs on both sides) and λ 1 (every step on-policy: the student samples 64 completions, then
the step; the samples differ between the programs, so the losses do too).
prm: toy-sft-full with a fresh two-class token head (torch.manual_seed(1) before from_pretrained on both sides, so
the same head), the toy:add stepwise training rows written to one jsonl file that both read (gkd.py's batch order
for TRL through its sampler), 64 rows per step, lr 2e-4 (prm.py's default), linear schedule without warm-up, clipping
1.0, step separator "\\n", train_on_last_step_only False, max_length 128, dropout off.
TRL runs with gradient checkpointing off and on (the default of its SFTConfig / PRMConfig). Each program as its
command line runs it (the scripts: torch's AdamW; TRL its default AdamW); no evaluation, no checkpoints, no sample
logs (gkd.py --log_completions_steps 0).

Timing: benchmarks/dpo_speed.measure and the child-process pattern of benchmarks/offline_pref_speed.py: each program
runs in its own process with one thread; the clock (wall and process CPU time) is read at every logging step (the
scripts: tracker.log; TRL: a callback at the steps that are multiples of --logging_steps); per run the median
--logging_steps window after --warmup steps, per step; programs interleaved, --repeats times; medians over the
repeats. With one thread the CPU time is what a quiet machine's wall time would be (other jobs inflate it a little).
Losses: every micro-batch loss of the first --loss_steps steps is recorded (detached, read after training) on both
sides: step 1 runs the same weights on the same inputs, later steps differ by the two AdamW kernels' rounding.

TRL is never a dependency of the project: its virtualenvs are the scratch ones of benchmarks/vs_trl.py (1.16) and
benchmarks/bco_trl_check.py (1.13), made on first use with --system-site-packages and trl installed with --no-deps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_speed import ROOT, clock, cpu_name, measure, peak_rss_mb, set_threads, trl_python  # noqa: E402

SEED = 1
GKD_LR, PRM_LR = 3e-3, 2e-4


# ----------------------------------------------------------------------------- the measured programs (child processes)
def _order(a) -> list[int]:
    return json.loads(Path(a.order).read_text())


def child_trl(a) -> dict:
    """TRL's trainer, clocked by a callback at the end of every logging step; micro-batch losses recorded."""
    import torch
    from datasets import Dataset
    from torch.utils.data import Sampler
    from transformers import AutoTokenizer, TrainerCallback

    set_threads(a.threads)
    points: list[list[float]] = []
    losses: list = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % a.logging_steps == 0:
                points.append(clock(state.global_step))

    class Ordered(Sampler):  # the script's batch order
        def __init__(self, order):
            self.order = order

        def __iter__(self):
            return iter(self.order)

        def __len__(self):
            return len(self.order)

    common = dict(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                  lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  max_steps=a.steps, max_length=128, bf16=False, fp16=False, use_cpu=True,
                  gradient_checkpointing=bool(a.gradient_checkpointing), logging_steps=a.logging_steps,
                  save_strategy="no", eval_strategy="no", report_to=[], seed=SEED, dataloader_num_workers=0,
                  disable_dropout=True, disable_tqdm=True)
    rows = [json.loads(line) for line in Path(a.rows).read_text().splitlines() if line]
    if a.method == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        tok = AutoTokenizer.from_pretrained(a.model)
        cfg = GKDConfig(**common, learning_rate=GKD_LR, lmbda=a.lmbda, beta=0.5, temperature=0.9, max_new_tokens=8,
                        seq_kd=False, model_init_kwargs={"dtype": torch.float32},
                        teacher_model_init_kwargs={"dtype": "float32"})
        trainer = GKDTrainer(model=a.model, teacher_model=a.teacher, args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[Clock()])
    else:
        from transformers import AutoModelForTokenClassification
        from trl.experimental.prm import PRMConfig, PRMTrainer

        LABELS = {0: "incorrect", 1: "correct"}  # prm.py's
        tok = AutoTokenizer.from_pretrained(a.model)
        torch.manual_seed(SEED)  # the same fresh head as prm.py's
        model = AutoModelForTokenClassification.from_pretrained(
            a.model, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        cfg = PRMConfig(**common, learning_rate=PRM_LR, step_separator="\n", train_on_last_step_only=False)
        trainer = PRMTrainer(model=model, args=cfg, train_dataset=Dataset.from_json(a.rows), processing_class=tok,
                             callbacks=[Clock()])
    order = _order(a)
    trainer._get_train_sampler = lambda *args, **kw: Ordered(order)
    compute_loss = trainer.compute_loss

    def recorded(*args, **kw):
        out = compute_loss(*args, **kw)
        if len(losses) < a.loss_steps:
            losses.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return out

    trainer.compute_loss = recorded
    trainer.train()
    return {"points": points, "peak_rss_mb": peak_rss_mb(), "step_losses": [float(x) for x in losses]}


def child_ours(a) -> dict:
    """algos/{gkd,prm}.py's main, as its command line runs it; the clock is read at every tracker.log call."""
    import importlib

    import tyro

    from common import tracking

    set_threads(a.threads)
    script = importlib.import_module(a.method)  # algos/ is on sys.path (dpo_speed)
    points, losses = [], []
    log = tracking.Tracker.log

    def timed_log(self, metrics, step, total_steps=None):
        points.append(clock(step))
        return log(self, metrics, step, total_steps)

    tracking.Tracker.log = timed_log
    name = "distill_micro_batch" if a.method == "gkd" else "step_loss"
    loss_fn = getattr(script, name)

    def recorded(*args, **kw):
        out = loss_fn(*args, **kw)
        if len(losses) < a.loss_steps:
            losses.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return out

    setattr(script, name, recorded)  # main looks the loss function up in the module
    flags = ["--model_name_or_path", a.model, "--max_steps", str(a.steps), "--per_device_train_batch_size",
             str(a.batch), "--warmup_steps", "0", "--max_grad_norm", "1.0", "--logging_steps", str(a.logging_steps),
             "--eval_steps", "0", "--save_steps", "0", "--seed", str(SEED), "--output_dir", a.out,
             "--overwrite_output_dir", "True"]
    if a.method == "gkd":
        flags += ["--teacher_model_name_or_path", a.teacher, "--learning_rate", str(GKD_LR), "--lr_scheduler",
                  "linear", "--beta", "0.5", "--lmbda", str(a.lmbda), "--temperature", "0.9", "--kd_temperature",
                  "1.0", "--max_new_tokens", "8", "--max_length", "128", "--log_completions_steps", "0"]
    else:
        flags += ["--dataset_name", a.rows, "--learning_rate", str(PRM_LR), "--step_separator", "\n",
                  "--train_on_last_step_only", "False", "--max_length", "128"]
    script.main(tyro.cli(script.Args, args=flags, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
    return {"points": points, "peak_rss_mb": peak_rss_mb(), "step_losses": [float(x) for x in losses]}


# ----------------------------------------------------------------------------- inputs written once by the parent
def gkd_inputs(a, scratch: Path) -> tuple[str, str, Path, Path]:
    """The student folder (toy-small as gkd.py initialises it with seed 1), the teacher folder, the training rows as
    gkd.py tokenises them (input_ids, completion_mask) and gkd.py's row order for --steps steps."""
    import gkd
    from common import data, model as model_utils, toy

    student = scratch / "gkd_student_toy_small_seed1"
    if not (student / "config.json").exists():
        tok = toy.make_tokenizer()
        model_utils.load_causal_lm("toy-small", tok, "toy:add", seed=SEED).save_pretrained(student)
        tok.save_pretrained(student)
    teacher = str(toy.toy_sft_full_path("add"))
    args = gkd.Args(model_name_or_path=str(student), teacher_model_name_or_path=teacher, eval_steps=0)
    train_ds, _ = data.load_splits(args, "prompt_completion", "gkd.py", toy_n=args.num_eval_prompts)
    tok = model_utils.load_tokenizer(str(student))
    train = gkd.tokenize_rows(train_ds, tok, args.max_length)
    rows = scratch / "gkd_rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": pr, "input_ids": p + c,
                                        "completion_mask": [0] * len(p) + [1] * len(c)}) + "\n"
                            for pr, (p, c) in zip(train_ds["prompt"], train)))
    order = [i for s in range(a.steps) for i in data.batch_indices(len(train), a.batch, s, SEED)]
    (scratch / "gkd_order.json").write_text(json.dumps(order))
    return str(student), teacher, rows, scratch / "gkd_order.json"


def prm_inputs(a, scratch: Path) -> tuple[str, Path, Path]:
    """The backbone folder, the toy:add stepwise training rows in one jsonl file and prm.py's row order."""
    from common import data, toy

    ds = toy.make_dataset("add", "stepwise", "train")
    rows = scratch / "prm_rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ds))
    order = [i for s in range(a.steps) for i in data.batch_indices(len(ds), a.batch, s, SEED)]
    (scratch / "prm_order.json").write_text(json.dumps(order))
    return str(toy.toy_sft_full_path("add")), rows, scratch / "prm_order.json"


# ----------------------------------------------------------------------------- the driver
def run_child(python: str, kind: str, a, scratch: Path, lmbda: float = 0.0, checkpointing: int = 0) -> dict:
    tag = f"{a.method}_{kind}_l{lmbda:g}_gc{checkpointing}"
    res, run = scratch / f"{tag}.json", scratch / tag
    shutil.rmtree(run, ignore_errors=True)
    cmd = [python, str(Path(__file__).resolve()), "--child", kind, "--method", a.method, "--model", a.model,
           "--teacher", a.teacher, "--rows", str(a.rows), "--order", str(a.order), "--steps", str(a.steps),
           "--batch", str(a.batch), "--threads", str(a.threads), "--logging_steps", str(a.logging_steps),
           "--loss_steps", str(a.loss_steps), "--lmbda", str(lmbda), "--gradient_checkpointing", str(checkpointing),
           "--result", str(res), "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} ({python}) failed:\n{done.stderr[-3000:]}")
    return json.loads(res.read_text())


def trl_python_for(method: str) -> tuple[str, str]:
    if method == "gkd":
        from dpo_speed import TRL_VERSION

        return trl_python(ROOT / ".cache" / f"venv-trl-{TRL_VERSION}"), TRL_VERSION
    from bco_trl_check import TRL_VERSION, trl_python as trl_python_13

    return trl_python_13(ROOT / ".cache" / f"venv-trl-{TRL_VERSION}"), TRL_VERSION


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["gkd", "prm"], required=True)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (a multiple of "
                    "--logging_steps)")
    ap.add_argument("--logging_steps", type=int, default=5, help="metrics logged (and the clock read) every this many "
                    "steps, both sides")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each program, interleaved")
    ap.add_argument("--batch", type=int, default=64, help="sequences (gkd) or stepwise rows (prm) per optimizer step")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every program")
    ap.add_argument("--loss_steps", type=int, default=10, help="micro-batch losses recorded (from step 1)")
    ap.add_argument("--lmbdas", default="0,1", help="gkd: the λ settings measured (comma-separated)")
    ap.add_argument("--no_trl_checkpointing", action="store_true", help="leave out TRL with gradient checkpointing "
                    "on (its default)")
    ap.add_argument("--out", default=None, help="where speed.md / speed.json go (default benchmarks/results/{method})")
    # child-process arguments
    ap.add_argument("--child", choices=["trl", "ours"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rows", default="", help=argparse.SUPPRESS)
    ap.add_argument("--order", default="", help=argparse.SUPPRESS)
    ap.add_argument("--lmbda", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--gradient_checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="rewrite speed.md from speed.json (no measurement)")
    a = ap.parse_args()
    if a.render:
        out = Path(a.out or ROOT / "benchmarks" / "results" / a.method)
        write_md(out, json.loads((out / "speed.json").read_text()), ROOT / "runs" / "bench" / "distill_prm_speed")
        return
    if a.child:
        res = {"trl": child_trl, "ours": child_ours}[a.child](a)
        Path(a.result).write_text(json.dumps(res) + "\n")
        return
    if a.warmup % a.logging_steps or a.steps < a.warmup + 2 * a.logging_steps:
        raise SystemExit("--warmup must be a multiple of --logging_steps and --steps >= --warmup + 2 x "
                         "--logging_steps (two timed windows at least)")
    py, trl_version = trl_python_for(a.method)
    scratch = ROOT / "runs" / "bench" / "distill_prm_speed"
    scratch.mkdir(parents=True, exist_ok=True)
    if a.method == "gkd":
        a.model, a.teacher, a.rows, a.order = gkd_inputs(a, scratch)
        lmbdas = [float(x) for x in a.lmbdas.split(",")]
    else:
        (a.model, a.rows, a.order), lmbdas = prm_inputs(a, scratch), [0.0]
    trainer = {"gkd": "GKDTrainer", "prm": "PRMTrainer"}[a.method]
    programs, groups = {}, []  # groups: (label, ours, trl off, trl on)
    for lm in lmbdas:
        tag = f", λ {lm:g}" if a.method == "gkd" else ""
        ours, off, on = (f"{a.method}.py{tag}", f"TRL {trl_version} {trainer}{tag}, checkpointing off",
                         f"TRL {trl_version} {trainer}{tag}, checkpointing on")
        programs[ours] = lambda lm=lm: run_child(sys.executable, "ours", a, scratch, lm)
        programs[off] = lambda lm=lm: run_child(py, "trl", a, scratch, lm, 0)
        if not a.no_trl_checkpointing:
            programs[on] = lambda lm=lm: run_child(py, "trl", a, scratch, lm, 1)
        groups.append((lm, ours, off, on if not a.no_trl_checkpointing else None))
    raw = {name: [] for name in programs}

    def keep(name, fn):
        def run():
            res = fn()
            raw[name].append(res)
            return res
        return run

    load_before = Path("/proc/loadavg").read_text().strip()
    t0 = time.time()
    summary = measure({name: keep(name, fn) for name, fn in programs.items()}, a.repeats, a.warmup)
    load_after = Path("/proc/loadavg").read_text().strip()
    for name, v in summary.items():
        v["step_losses"] = raw[name][0]["step_losses"]  # the first repeat's (every repeat is deterministic)
    checks = {}
    for lm, ours, off, on in groups:
        for trl in (off, on):
            if trl:
                checks[f"CPU s/step: {trl} / {ours}"] = summary[trl]["cpu_s_per_step"] / summary[ours]["cpu_s_per_step"]
        diffs = [abs(x - y) for x, y in zip(summary[ours]["step_losses"], summary[off]["step_losses"])]
        checks[f"|loss at step 1, {ours} - TRL|"] = diffs[0]
        checks[f"largest |loss, {ours} - TRL| over steps 1-{len(diffs)}"] = max(diffs)
    import torch
    import transformers

    meta = {"method": a.method, "steps": a.steps, "warmup": a.warmup, "logging_steps": a.logging_steps,
            "repeats": a.repeats, "batch": a.batch, "threads": a.threads, "trl": trl_version,
            "torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu_name(),
            "cores": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
            "minutes": round((time.time() - t0) / 60, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": SETTINGS[a.method]}
    out = Path(a.out or ROOT / "benchmarks" / "results" / a.method)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "programs": summary, "checks": checks}
    (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    write_md(out, result, scratch)


def loss_notes(result: dict, scratch: Path) -> list[str]:
    """gkd λ 1: how far TRL's step-1 loss is from the script's, against the ratio of tokens trained on (the student's
    samples) to the dataset completions' tokens of the same rows (TRL's num_items_in_batch; gkd.py detail 5)."""
    progs, m = result["programs"], result["meta"]
    ours = next((k for k in progs if k.startswith("gkd.py, λ 1")), None)
    trl = next((k for k in progs if "λ 1" in k and "off" in k), None)
    metrics = scratch / "gkd_ours_l1_gc0" / "metrics.jsonl"
    if not (ours and trl and metrics.exists()):
        return []
    rows = [json.loads(x) for x in (scratch / "gkd_rows.jsonl").read_text().splitlines() if x]
    first = json.loads((scratch / "gkd_order.json").read_text())[:m["batch"]]
    data_len = sum(sum(rows[i]["completion_mask"]) for i in first) / len(first)
    sampled = json.loads(metrics.read_text().splitlines()[0]).get("completions/mean_length")
    ratio = progs[trl]["step_losses"][0] / progs[ours]["step_losses"][0]
    return [f"λ 1: TRL's step-1 loss is {ratio:.2f}x the script's. The samples differ (each program draws its own), "
            "and TRL's Trainer counts num_items_in_batch on the dataset's labels before GKD swaps in the sampled "
            f"completions: step 1's dataset rows have {data_len:.2f} completion tokens per row, while the script's "
            f"samples average {sampled:.2f} tokens per row over its first {m['logging_steps']} steps (a fresh "
            "student seldom samples EOS within 8 tokens), so TRL divides the divergence summed over about "
            f"{sampled:.1f} tokens per row by about {data_len:.1f}: a factor near {sampled / data_len:.2f}. gkd.py "
            "divides by the tokens it trains on (its detail 5). λ 0 runs on the same inputs: the losses agree."]


def write_md(out: Path, result: dict, scratch: Path):
    meta, summary, checks = result["meta"], result["programs"], result["checks"]
    lines = ["| program | CPU ms / step (median repeat) | CPU ms per repeat | wall ms / step (median repeat) | "
             "peak RSS (MB) | losses of steps 1-3 |", "|---|---|---|---|---|---|"]
    for name, v in summary.items():
        lines.append(f"| {name} | {1e3 * v['cpu_s_per_step']:.1f} | "
                     f"{', '.join(f'{1e3 * x:.1f}' for x in v['cpu_all'])} | {1e3 * v['wall_s_per_step_median']:.1f} | "
                     f"{v['peak_rss_mb']:.0f} | {', '.join(f'{x:.6f}' for x in v['step_losses'][:3])} |")
    lines += ["", "| check | measured |", "|---|---|"]
    lines += [f"| {k} | {v:.2g} |" if k.startswith("|") or k.startswith("largest") else f"| {k} | {v:.2f}x |"
              for k, v in checks.items()]
    method = meta["method"]
    lines += ["", "Ratios: TRL's CPU time per optimizer step over the script's (> 1: the script is faster). Losses: "
              "the step losses (one micro-batch per step) of the first repeat, both sides recorded the same way."]
    if method == "gkd":
        lines += [""] + loss_notes(result, scratch)
    ours = next(k for k in summary if k.startswith(f"{method}.py"))
    trl = next(k for k in summary if k.startswith("TRL") and "off" in k)
    diffs = [abs(x - y) for x, y in zip(summary[ours]["step_losses"], summary[trl]["step_losses"])]
    lines += ["", f"{ours} vs {trl}, |loss difference| at steps 1-{len(diffs)}: "
              + ", ".join(f"{d:.1e}" for d in diffs) + ". Step 1 is the same weights on the same inputs; after it the "
              "two programs differ only by float rounding (the optimizer kernels: torch's AdamW here, TRL's default "
              "there; the order of the sums), which Adam's early, nearly sign-like updates can amplify."]
    lines += ["", f"`python benchmarks/distill_prm_speed.py --method {method}`: {meta['repeats']} interleaved "
              f"repeat(s) x {meta['steps']} steps (per run: the median {meta['logging_steps']}-step window after "
              f"{meta['warmup']} warm-up steps), {meta['batch']} "
              f"{'sequences' if method == 'gkd' else 'stepwise rows'} per step, "
              f"{meta['threads']} thread per program, {meta['cores']} cores ({meta['cpu']}), no GPU, torch "
              f"{meta['torch']}, transformers {meta['transformers']}, TRL {meta['trl']}; /proc/loadavg "
              f"`{meta['loadavg_before']}` before and `{meta['loadavg_after']}` after ({meta['minutes']} min; other "
              "jobs shared the cores: the CPU times are the measure, the wall times are loaded), "
              f"{meta['date']}.", "", "Matched settings: " + meta["settings"]]
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

SETTINGS = {
    "gkd": "student toy-small as gkd.py initialises it (seed 1, saved to a folder both load), teacher toy-sft-full, "
           "fp32; toy:add rows as gkd.py tokenises them, in gkd.py's batch order (TRL: its DataCollatorForChatML on "
           "input_ids + completion_mask, a sampler in that order); 64 sequences per step, one micro-batch; AdamW lr "
           "3e-3, linear schedule, no warm-up, weight decay 0, clipping 1.0; β 0.5, divergence at temperature 1, "
           "sampling temperature 0.9, top_k 0, top_p 1, max_new_tokens 8, seq_kd off, dropout off, max_length 128; "
           "λ 0 (dataset completions: same inputs) and λ 1 (student samples every step: different samples, so "
           "different losses); no evaluation, checkpoints or sample logs.",
    "prm": "toy-sft-full with a fresh two-class token head (torch.manual_seed(1) before from_pretrained, the same head "
           "on both sides), fp32; the toy:add stepwise training rows in one jsonl file both read, prm.py's batch "
           "order (TRL: a sampler in that order); 64 rows per step, one micro-batch; AdamW lr 2e-4, linear schedule, "
           "no warm-up, weight decay 0, clipping 1.0; step separator '\\n', train_on_last_step_only False, "
           "max_length 128, dropout off; no evaluation or checkpoints.",
}

if __name__ == "__main__":
    main()
