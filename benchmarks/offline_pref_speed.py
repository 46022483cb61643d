"""Seconds per optimizer step of algos/kto.py, bco.py, orpo.py and cpo.py vs TRL's trainers, at matched settings;
also the peak memory of a step at a 151,936-token vocabulary and tokens/s with --packing on variable-length rows.

    python benchmarks/offline_pref_speed.py --method orpo  # 3 repeats x 40 steps -> benchmarks/results/orpo/
    python benchmarks/offline_pref_speed.py --method cpo
    python benchmarks/offline_pref_speed.py --method kto   # = python benchmarks/kto_speed.py
    python benchmarks/offline_pref_speed.py --method bco   # vs TRL 1.13's BCOTrainer (its last release)
    python benchmarks/offline_pref_speed.py --method orpo --repeats 1 --steps 20   # a quicker look
    python benchmarks/offline_pref_speed.py --method kto --section memory   # -> benchmarks/results/kto/memory.md
    python benchmarks/offline_pref_speed.py --method kto --section packing  # -> benchmarks/results/kto/packing.md
    python benchmarks/offline_pref_speed.py --method orpo --section memory  # (and cpo; --section packing too)

TRL's trainers: KTOTrainer (trl), ORPOTrainer and CPOTrainer (trl.experimental.orpo / .cpo), BCOTrainer
(trl.experimental.bco in TRL 1.13, removed after; a venv of its own). Matched settings: the
same model folder (the toy SFT policy, toy-sft), the toy:add rows (unpaired for kto, preference pairs for orpo and
cpo), 64 examples (kto) or pairs (orpo, cpo) per optimizer step (one micro-batch, one process), float32, AdamW at
lr 1e-4 with a constant schedule, gradient clipping at 1.0, the same thread count (--threads), metrics logged every
--logging_steps steps, no evaluation, no checkpoints, and each method's loss settings:
    kto   loss_type kto, β 0.1 (both compute the reference point z from the mismatched pairs of the batch: four
          forwards per step, one with gradient; a reference model held in memory)
    bco   β 0.1, no UDM (both: the running reward mean δ; two forwards per step, one with gradient; a reference model)
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

--section memory (kto, bco, orpo, cpo): the same programs on benchmarks/vs_trl.py's big_vocab_model() (toy-sft with its
vocabulary padded to 151,936 tokens, Qwen2's, hidden size 128), a few steps. A global optimizer-step hook
(vs_trl.StepClock) resets the resident-set high-water mark after --warmup steps: `step peak` is the high-water mark
over the measured steps, `step extra` that peak minus the resident set between two steps (what a step allocates on
top of weights, optimizer state and caches).

--section packing (kto, bco, orpo, cpo): variable-length unpaired rows (varlen_unpaired: vs_trl.varlen_dataset's 5-200 token
texts split into a prompt and a completion at a problem boundary, every other row desirable, the others with their
last answer digit changed), --varlen_batch examples per step, for the script padded, the script with --packing,
TRL with gradient checkpointing off and TRL's defaults (TRL's KTOTrainer and BCOTrainer have no padding-free or
packing option). Every program trains on the same batches in the same order (TRL reads the rows in the script's
batch order, sequentially), so the tokens per step are the same and tokens per second compare as the inverse of the
time: tokens = prompt + completion of the step's examples (the script's tokenisation; kto's mismatched pairs are
extra work on the same tokens, in both programs). orpo and cpo: variable-length pairs (varlen_pairs: the same split
texts, chosen = the completion, rejected = its last digit changed), --batch pairs per step, tokens = 2 x prompt +
chosen + rejected (TRL's ORPOTrainer and CPOTrainer have no padding-free or packing option either).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
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
    "bco": {"script": "bco", "kind": "unpaired", "trl": ("trl.experimental.bco", "BCOConfig", "BCOTrainer"),
            "trl_version": "1.13.0", "trl_loss": {"beta": 0.1}, "flags": ["--beta", "0.1"]},
    "orpo": {"script": "orpo", "kind": "preference", "trl": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
             "trl_loss": {"beta": 0.1}, "flags": ["--beta", "0.1"]},
    "cpo": {"script": "cpo", "kind": "preference", "trl": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
            "trl_loss": {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0},
            "flags": ["--loss_type", "sigmoid", "--beta", "0.1", "--cpo_alpha", "1.0"]},
}

SECTIONS = ("speed", "memory", "packing")
PER_SECTION = {"memory": ("kto", "bco", "orpo", "cpo"), "packing": ("kto", "bco", "orpo", "cpo")}  # the methods each
# other section measures


def trl_python_for(method: str, venv: str | None) -> str:
    """The python of the scratch virtualenv holding the TRL release the method is compared with."""
    version = METHODS[method].get("trl_version", TRL_VERSION)
    path = Path(venv or ROOT / ".cache" / f"venv-trl-{version}")
    if version == TRL_VERSION:
        return trl_python(path)
    from bco_trl_check import TRL_VERSION as BCO_TRL, trl_python as trl_python_bco  # TRL 1.13's venv

    assert version == BCO_TRL, version
    return trl_python_bco(path)


def varlen_unpaired(n: int = 2048, seed: int = 0):
    """Variable-length unpaired rows from vs_trl.varlen_dataset (5 to 200 tokens): each text split at a problem
    boundary (';') near a random point, or after its '=' when it is one problem; rows alternate desirable (the text
    as it is) and undesirable (the last digit of the completion changed)."""
    import random

    from datasets import Dataset
    from vs_trl import varlen_dataset

    rng = random.Random(seed)
    rows = []
    for i, text in enumerate(varlen_dataset(n, seed)["text"]):
        cuts = [j + 1 for j, ch in enumerate(text) if ch == ";"] or [text.index("=") + 1]
        k = cuts[rng.randrange(len(cuts))]
        prompt, completion = text[:k], text[k:]
        if i % 2:
            digits = [j for j, ch in enumerate(completion) if ch.isdigit()]
            if digits:
                j = digits[-1]
                completion = completion[:j] + str((int(completion[j]) + 1) % 10) + completion[j + 1:]
        rows.append({"prompt": prompt, "completion": completion, "label": i % 2 == 0})
    return Dataset.from_list(rows)


def varlen_pairs(n: int = 2048, seed: int = 0):
    """Variable-length preference pairs from the same split texts as varlen_unpaired: chosen = the completion as it
    is, rejected = the completion with its last digit changed (texts whose completion has no digit are left out)."""
    from datasets import Dataset

    rows = []
    for r in varlen_unpaired(n, seed):
        digits = [j for j, ch in enumerate(r["completion"]) if ch.isdigit()]
        if r["label"] and digits:  # the desirable rows: their completion is the right one
            c, j = r["completion"], digits[-1]
            rows.append({"prompt": r["prompt"], "chosen": c, "rejected": c[:j] + str((int(c[j]) + 1) % 10) + c[j + 1:]})
    return Dataset.from_list(rows)


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
    if a.rows:  # the rows in the script's batch order (written by the parent), read sequentially
        from datasets import Dataset

        ds = Dataset.from_list([json.loads(line) for line in Path(a.rows).read_text().splitlines()])
    else:
        ds = toy.make_dataset("add", m["kind"], "train")
    tok = AutoTokenizer.from_pretrained(a.model)
    points: list[list[float]] = []
    step_clock = None
    if a.section == "memory":
        from vs_trl import StepClock

        step_clock = StepClock(a.warmup)

    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % a.logging_steps == 0:
                points.append(clock(state.global_step))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    cfg = Config(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                 learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                 max_grad_norm=1.0, max_steps=a.steps, max_length=1024, bf16=False, fp16=False, use_cpu=True,
                 gradient_checkpointing=bool(a.gradient_checkpointing), logging_steps=a.logging_steps,
                 save_strategy="no", eval_strategy="no", report_to=[], seed=1, dataloader_num_workers=0,
                 disable_dropout=True, model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True, **m["trl_loss"])
    trainer = Trainer(model=a.model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    if a.rows:
        from torch.utils.data import SequentialSampler

        trainer._get_train_sampler = lambda *args, **kw: SequentialSampler(trainer.train_dataset)
    trainer.train()
    return {"points": points, "peak_rss_mb": peak_rss_mb(), "losses": losses,
            **(step_clock.result() if step_clock else {})}


def child_ours(a) -> dict:
    """algos/{method}.py's main, as its command line runs it; the clock is read at every tracker.log call (every
    --logging_steps steps, after the step's update)."""
    import tyro

    from common import tracking

    m = METHODS[a.method]
    script = importlib.import_module(m["script"])
    set_threads(a.threads)
    points = []
    step_clock = None
    if a.section == "memory":
        from vs_trl import StepClock

        step_clock = StepClock(a.warmup)
    log = tracking.Tracker.log

    def timed_log(self, metrics, step, total_steps=None):
        points.append(clock(step))
        return log(self, metrics, step, total_steps)

    tracking.Tracker.log = timed_log
    flags = ["--model_name_or_path", a.model, "--max_steps", str(a.steps), "--per_device_train_batch_size",
             str(a.batch), "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--max_grad_norm", "1.0",
             "--logging_steps", str(a.logging_steps), "--eval_steps", "0", "--save_steps", "0",
             "--output_dir", a.out, "--overwrite_output_dir", "True", *m["flags"], *a.extra.split()]
    if a.rows:
        flags += ["--dataset_name", a.rows, "--num_eval_prompts", "0"]
    script.main(tyro.cli(script.Args, args=flags, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
    metrics = [json.loads(x) for x in (Path(a.out) / "metrics.jsonl").read_text().splitlines() if x]
    return {"points": points, "peak_rss_mb": peak_rss_mb(), "losses": [x["loss"] for x in metrics if "loss" in x],
            **(step_clock.result() if step_clock else {})}


# ----------------------------------------------------------------------------- the driver
def run_child(python: str, kind: str, a, out: Path, checkpointing: int = 0, extra: str = "") -> dict:
    tag = f"{a.method}_{a.section}_{kind}{'_packing' if extra else ''}"
    res, run = out / f"{tag}.json", out / tag
    shutil.rmtree(run, ignore_errors=True)
    cmd = [python, str(Path(__file__).resolve()), "--child", kind, "--method", a.method, "--model", a.model,
           "--steps", str(a.steps), "--batch", str(a.batch), "--threads", str(a.threads), "--logging_steps",
           str(a.logging_steps), "--result", str(res), "--out", str(run), "--gradient_checkpointing",
           str(checkpointing), "--section", a.section, "--warmup", str(a.warmup),
           "--rows", getattr(a, "rows_trl", a.rows) if kind == "trl" else a.rows,
           f"--extra={extra}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} ({python}) failed:\n{done.stderr[-3000:]}")
    return json.loads(res.read_text())


DEFAULTS = {  # per section: steps, warmup, logging_steps, batch, repeats
    "speed": (40, 10, 10, 64, 3), "memory": (5, 2, 1, 64, 1), "packing": (12, 4, 2, 32, 3)}


def main(default_method: str | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=sorted(METHODS), default=default_method, required=default_method is None,
                    help="which script and TRL trainer")
    ap.add_argument("--section", choices=SECTIONS, default="speed", help="speed (toy:add), memory (151,936-token "
                    "vocabulary) or packing (variable-length rows); memory and packing for kto and bco")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per measurement (default: speed 40, "
                    "memory 5, packing 12)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing, a multiple of "
                    "--logging_steps (default: speed 10, memory 2, packing 4)")
    ap.add_argument("--logging_steps", type=int, default=None, help="metrics logged every this many steps (both; "
                    "default: speed 10, memory 1, packing 2)")
    ap.add_argument("--repeats", type=int, default=None, help="measurements of each program, interleaved (default: "
                    "3, memory 1)")
    ap.add_argument("--batch", type=int, default=None, help="examples (kto, bco) or pairs (orpo, cpo) per optimizer "
                    "step (default: 64, packing 32)")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every program")
    ap.add_argument("--trl_venv", default=None, help="the TRL virtualenv (default .cache/venv-trl-{version})")
    ap.add_argument("--out", default=None, help="where {section}.md / .json go (default benchmarks/results/{method})")
    # child-process arguments
    ap.add_argument("--child", choices=["trl", "ours"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gradient_checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default="", help=argparse.SUPPRESS)  # a jsonl of rows instead of toy:add
    ap.add_argument("--extra", default="", help=argparse.SUPPRESS)  # extra script flags, one string
    a = ap.parse_args()
    for k, v in zip(("steps", "warmup", "logging_steps", "batch", "repeats"), DEFAULTS[a.section]):
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.child:
        res = {"trl": child_trl, "ours": child_ours}[a.child](a)
        Path(a.result).write_text(json.dumps(res) + "\n")
        return
    if a.section != "speed" and a.method not in PER_SECTION[a.section]:
        raise SystemExit(f"--section {a.section} measures {' and '.join(PER_SECTION[a.section])}, not {a.method}")
    if a.warmup % a.logging_steps or a.steps < a.warmup + 2 * a.logging_steps:
        raise SystemExit("--warmup must be a multiple of --logging_steps and --steps >= --warmup + 2 x "
                         "--logging_steps (two timed windows at least)")

    from common import toy

    m = METHODS[a.method]
    a.model = str(toy.toy_policy_path("add"))
    out = Path(a.out or ROOT / "benchmarks" / "results" / a.method)
    scratch = ROOT / "runs" / "bench" / "offline_pref_speed"
    scratch.mkdir(parents=True, exist_ok=True)
    py = trl_python_for(a.method, a.trl_venv)
    ours_name, trl_name = f"{m['script']}.py", f"TRL {m['trl'][2]}"
    tokens_per_step = None
    if a.section == "memory":
        from vs_trl import big_vocab_model

        a.model = str(big_vocab_model())
    if a.section == "packing":
        tokens_per_step = write_varlen_rows(a, scratch)
    programs = {ours_name + (" (padded)" if a.section == "packing" else ""):
                lambda: run_child(sys.executable, "ours", a, scratch)}
    if a.section == "packing":
        programs[f"{ours_name} --packing"] = lambda: run_child(sys.executable, "ours", a, scratch,
                                                               extra="--packing True")
    programs[f"{trl_name}, gradient checkpointing off"] = lambda: run_child(py, "trl", a, scratch, 0)
    programs[f"{trl_name}, gradient checkpointing on"] = lambda: run_child(py, "trl", a, scratch, 1)
    raw = {name: [] for name in programs}  # every child's full result (memory, losses)

    def keep(name, fn):
        def run():
            res = fn()
            raw[name].append(res)
            return res
        return run

    load_before = os.getloadavg()
    t0 = time.time()
    summary = measure({name: keep(name, fn) for name, fn in programs.items()}, a.repeats, a.warmup)
    load_after = os.getloadavg()
    med = statistics.median
    for name, v in summary.items():
        v["s_per_step"] = v["wall_s_per_step_median"]
        if a.section == "memory":
            v["step_peak_mb"] = med(r["step_peak_mb"] for r in raw[name])
            v["step_extra_mb"] = med(r["step_extra_mb"] for r in raw[name])
        if "losses" in raw[name][0]:
            v["losses"] = raw[name][0]["losses"]
        if tokens_per_step:
            v["tokens_per_cpu_s"] = tokens_per_step / v["cpu_s_per_step"]
            v["tokens_per_wall_s"] = tokens_per_step / v["s_per_step"]
    ours_key = next(iter(programs))
    ours = summary[ours_key]
    trl_off, trl_on = f"{trl_name}, gradient checkpointing off", f"{trl_name}, gradient checkpointing on"
    checks = {}
    if a.section == "speed":
        for key, what in (("cpu_s_per_step", "CPU time"), ("s_per_step", "wall time, median repeat")):
            for name, v in summary.items():
                if name != ours_key:
                    checks[f"speed-up vs {name} ({what})"] = v[key] / ours[key]
        checks["peak RSS of TRL (checkpointing off) / the script's"] = (summary[trl_off]["peak_rss_mb"]
                                                                      / ours["peak_rss_mb"])
    elif a.section == "memory":
        for key, what in (("step_peak_mb", "step peak RSS"), ("step_extra_mb", "step extra")):
            for trl in (trl_off, trl_on):
                checks[f"{what}: the script / {trl} (target <= 0.5)"] = ours[key] / summary[trl][key]
        checks[f"speed-up vs {trl_off} (CPU time)"] = summary[trl_off]["cpu_s_per_step"] / ours["cpu_s_per_step"]
    else:
        packed = summary[f"{ours_name} --packing"]
        checks[f"tokens/s: --packing / {trl_on} (TRL's defaults; target >= 2)"] = (
            packed["tokens_per_cpu_s"] / summary[trl_on]["tokens_per_cpu_s"])
        checks[f"tokens/s: --packing / {trl_off}"] = packed["tokens_per_cpu_s"] / summary[trl_off]["tokens_per_cpu_s"]
        checks["tokens/s: --packing / padded"] = packed["tokens_per_cpu_s"] / ours["tokens_per_cpu_s"]
        checks["largest |logged loss, --packing - padded| (same batches: 0 up to rounding)"] = max(
            abs(x - y) for x, y in zip(packed["losses"], ours["losses"]))
    meta = {"method": a.method, "section": a.section, "steps": a.steps, "warmup": a.warmup,
            "logging_steps": a.logging_steps, "repeats": a.repeats, "batch": a.batch, "threads": a.threads,
            "model": Path(a.model).name, "cpu": cpu_name(), "cores": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
            "minutes": round((time.time() - t0) / 60, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if tokens_per_step:
        meta["tokens_per_step"] = tokens_per_step
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.section}.json").write_text(json.dumps({"meta": meta, "programs": summary, "checks": checks},
                                                      indent=2) + "\n")
    lines = table(a.section, summary)
    lines += ["", "| check | measured |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" if k.startswith("largest") else f"| {k} | {v:.2f}x |" for k, v in checks.items()]
    unit = "examples" if METHODS[a.method]["kind"] == "unpaired" else "pairs"
    flags = f" --section {a.section}" if a.section != "speed" else ""
    data_note = {"speed": "toy-sft on toy:add",
                 "memory": f"{meta['model']} (151,936-token vocabulary, hidden 128) on toy:add",
                 "packing": f"toy-sft on {'varlen_pairs' if unit == 'pairs' else 'varlen_unpaired'} "
                            f"({tokens_per_step:.0f} tokens per step)"
                 if tokens_per_step else ""}[a.section]
    lines += ["", f"`python benchmarks/offline_pref_speed.py --method {a.method}{flags}`: {data_note}, {a.repeats} "
              f"interleaved repeat(s) x {a.steps} steps (per run: the median {a.logging_steps}-step window after "
              f"{a.warmup} warm-up steps), {a.batch} {unit} per step, {a.threads} thread(s) per program, "
              f"{meta['cores']} cores ({meta['cpu']}), no GPU, load average {meta['loadavg_before']} before and "
              f"{meta['loadavg_after']} after ({meta['minutes']} min; other jobs shared the cores: the CPU times are "
              f"the measure), {meta['date']}."]
    (out / f"{a.section}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_varlen_rows(a, scratch: Path) -> float:
    """The packing section's data: the rows file the script reads (--rows) and, for TRL, the same rows in the
    script's batch order (read sequentially); returns the mean tokens (prompt + completion) per step."""
    from common import data, model as model_utils, preference

    paired = METHODS[a.method]["kind"] == "preference"  # orpo, cpo: pairs (prompt + chosen, prompt + rejected)
    name = "varlen_pairs" if paired else "varlen_unpaired"
    ds = varlen_pairs(4096) if paired else varlen_unpaired()
    rows_file = scratch / f"{name}.jsonl"
    ds.to_json(str(rows_file))
    tok = model_utils.load_tokenizer(a.model)
    if paired:
        tokenised, dropped = preference.tokenize_pairs(ds, tok, 1024, None)
        n_tokens = [2 * len(p) + len(c) + len(r) for p, c, r in tokenised]
    else:
        tokenised, dropped = preference.tokenize_unpaired(ds, tok, 1024, None)
        n_tokens = [len(p) + len(c) for p, c, *_ in tokenised]
    assert not dropped and len(tokenised) == len(ds)
    order = [i for step in range(a.steps) for i in data.batch_indices(len(ds), a.batch, step, 1)]  # seed 1 (both)
    trl_file = scratch / f"{name}_trl_order.jsonl"
    trl_file.write_text("".join(json.dumps(ds[i]) + "\n" for i in order))
    a.rows, a.rows_trl = str(rows_file), str(trl_file)
    measured = order[a.warmup * a.batch:]
    return sum(n_tokens[i] for i in measured) / (a.steps - a.warmup)


def table(section: str, summary: dict) -> list[str]:
    if section == "speed":
        lines = ["| program | CPU s / step (median repeat) | wall s / step (median repeat) | wall (best repeat) | "
                 "CPU per repeat | peak RSS (MB) |", "|---|---|---|---|---|---|"]
        for name, v in summary.items():
            lines.append(f"| {name} | {v['cpu_s_per_step']:.4f} | {v['s_per_step']:.4f} | "
                         f"{v['wall_s_per_step_best']:.4f} | {', '.join(f'{x:.4f}' for x in v['cpu_all'])} | "
                         f"{v['peak_rss_mb']:.0f} |")
    elif section == "memory":
        lines = ["| program | CPU s / step | wall s / step | step peak RSS (MB) | step extra (MB) | process peak RSS "
                 "(MB) |", "|---|---|---|---|---|---|"]
        for name, v in summary.items():
            lines.append(f"| {name} | {v['cpu_s_per_step']:.3f} | {v['s_per_step']:.3f} | {v['step_peak_mb']:.0f} | "
                         f"{v['step_extra_mb']:.0f} | {v['peak_rss_mb']:.0f} |")
        lines += ["", "step peak = the resident-set high-water mark over the measured steps (the whole process); step "
                  "extra = that peak minus the resident set between two steps, i.e. what a step allocates on top of "
                  "what stays."]
    else:
        lines = ["| program | CPU s / step | wall s / step | tokens per CPU second | tokens per wall second | "
                 "first logged losses |", "|---|---|---|---|---|---|"]
        for name, v in summary.items():
            losses = ", ".join(f"{x:.5f}" for x in v.get("losses", [])[:3]) or "-"
            lines.append(f"| {name} | {v['cpu_s_per_step']:.3f} | {v['s_per_step']:.3f} | "
                         f"{v['tokens_per_cpu_s']:.0f} | {v['tokens_per_wall_s']:.0f} | {losses} |")
    return lines

if __name__ == "__main__":
    main()
