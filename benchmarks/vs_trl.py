"""Seconds per optimizer step and peak memory of the scripts vs TRL 1.16's trainers and a plain PyTorch loop.

    python benchmarks/vs_trl.py                                 # every section, 3 interleaved repeats
    python benchmarks/vs_trl.py --sections speed --workloads sft grpo --repeats 1 --steps 20   # a quicker look
    python benchmarks/vs_trl.py --sections memory               # 150k-vocabulary model: peak memory of a step
    python benchmarks/vs_trl.py --sections memory --workloads dpo   # re-measure some workloads, keep the others'
    python benchmarks/vs_trl.py --sections packing              # variable-length SFT: tokens/s, packed vs padded
    python benchmarks/vs_trl.py --sections profile --workloads sft reward   # where a step's CPU time goes

Results: benchmarks/results/vs_trl/README.md (tables with the machine load) and results.json.

Sections
  speed    the toy SFT policy (toy-sft) on toy:add, per workload: sft (64 sequences), reward (64 pairs), dpo
           (64 pairs), grpo / gmpo / rloo (8 prompts x 8 completions, 8 new tokens), online_dpo (32 pairs); kto
           (64 examples) through benchmarks/kto_speed.py when asked for. Programs: the script, TRL with gradient
           checkpointing off, TRL's defaults (checkpointing on), and a plain PyTorch loop doing the same forwards,
           backward and AdamW step with no metrics or logging (the floor).
  memory   a locally built model with a 151,936-token vocabulary (Qwen2's) and hidden size 128 (toy-sft's weights
           for the toy tokens, zero head rows for the rest): dpo and grpo steps at the speed section's batches.
  packing  SFT on a variable-length mix of toy tasks (sequences of 5 to 200 tokens): tokens/s of sft.py padded and
           with --packing, TRL's defaults, TRL padding-free, TRL packing (best-fit decreasing), same loss per token.
  profile  (only when asked for) sft.py and reward.py on the speed section's workload, their step split into batch
           building, forward, output head, backward, clipping, AdamW update and the rest (CPU time per step).

Matched settings: the same model folder and rows, the same batch (completions per optimizer step, one micro-batch,
one process), learning rate, completions per prompt and new tokens, float32, AdamW, clipping at 1.0, constant
learning rate, `--threads` torch threads, metrics every --logging_steps steps, no evaluation, no checkpoints.

Timing: every program runs in a process of its own, through its real entry point (`algos/<script>.py` via runpy,
`Trainer.train()`), with a global torch optimizer-step hook that stamps the time of each optimizer step (so the
script and TRL are timed by the same clock, generation included for the online methods). Seconds per step = the
mean over the steps after --warmup; the table shows the median over repeats, which run interleaved (a change in
machine load hits every program alike). Memory: at the end of the warm-up the process's resident-set high-water
mark is reset (/proc/self/clear_refs); `step peak` is the high-water mark over the measured steps, and `step extra`
that peak minus the resident set between two steps (what a step allocates on top of weights, optimizer state and
caches).

TRL is never a dependency of the project: this script makes a virtualenv of its own (--trl_venv, default
.cache/venv-trl-1.16.0; --system-site-packages so it runs on the project's torch and transformers) and installs the
project's requirements.txt and trl==1.16.0 there (with a pip of that venv; nothing outside it changes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import shutil
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
SPEED_WORKLOADS = ("sft", "reward", "dpo", "grpo", "gmpo", "rloo", "online_dpo")
BIG_VOCAB = 151936
FUSED = "ours, --optim adamw_torch_fused"


# ----------------------------------------------------------------------------- clocks (in every child process)
def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


class StepClock:
    """A global optimizer-step hook: the time of every optimizer step; after `warmup` steps it resets the
    resident-set high-water mark and records the resident set between two steps."""

    def __init__(self, warmup: int):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.warmup, self.times, self.cpu, self.rss_between_mb = warmup, [], [], None
        self.handle = register_optimizer_step_post_hook(self)

    def __call__(self, optimizer, args, kwargs):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.times) == self.warmup:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            except OSError:
                pass
            self.rss_between_mb = _status_kb("VmRSS") / 1024

    def result(self, tokens: list[float] | None = None) -> dict:
        t = self.times
        n = len(t) - self.warmup
        c = self.cpu
        out = {"steps": len(t), "s_per_step": (t[-1] - t[self.warmup - 1]) / n if n > 0 else float("nan"),
               "cpu_s_per_step": (c[-1] - c[self.warmup - 1]) / n if n > 0 else float("nan"),
               "step_peak_mb": _status_kb("VmHWM") / 1024, "rss_between_mb": self.rss_between_mb}
        out["step_extra_mb"] = out["step_peak_mb"] - (self.rss_between_mb or 0.0)
        return out


def set_threads(n: int):
    import torch

    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- data and models of the benchmark
def varlen_dataset(n: int = 4096, seed: int = 0):
    """A variable-length language-modelling mix of the toy tasks: solved add and reverse problems chained into one
    text, 5 to 200 tokens with <bos> and <eos>, lengths spread roughly uniformly (deterministic)."""
    import random

    from datasets import Dataset

    from common import toy

    rng = random.Random(seed)
    pool = toy.problems("add", "train") + toy.problems("reverse", "train")
    rows = []
    for _ in range(n):
        target = rng.randint(3, 198)  # characters = tokens (character-level tokenizer), before <bos> and <eos>
        text = ""
        while True:
            p, ans = pool[rng.randrange(len(pool))]
            piece = (";" if text else "") + p + ans
            if text and len(text) + len(piece) > target:
                break
            text += piece
            if len(text) >= target:
                break
        rows.append({"text": text})  # language modelling: every token is trained
    return Dataset.from_list(rows)


def big_vocab_model(vocab: int = BIG_VOCAB) -> Path:
    """toy-sft with its vocabulary padded to `vocab` (zero head / embedding rows past the toy tokens), saved once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import toy

    out = toy.cache_dir() / f"bench-toy-sft-vocab{vocab}"
    if (out / ".built").exists():
        return out
    src = toy.toy_policy_path("add")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    n = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[n:] = 0.0
        model.get_output_embeddings().weight[n:] = 0.0
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    (out / ".built").write_text("ok\n")
    return out


# ----------------------------------------------------------------------------- our scripts (child process)
def our_command(w: str, a) -> list[str]:
    """algos/<script>.py arguments for workload w, matched to the TRL configuration below."""
    common = ["--model_name_or_path", a.model, "--max_steps", str(a.steps), "--logging_steps", str(a.logging_steps),
              "--eval_steps", "0", "--save_steps", "0", "--output_dir", a.out, "--overwrite_output_dir", "True",
              "--seed", "1"]
    if w == "sft":
        extra = ["--per_device_train_batch_size", str(a.batch) if a.varlen else "64", "--learning_rate", "1e-4",
                 "--warmup_steps", "0", "--lr_scheduler", "constant", "--max_length", "1024"]
        if a.varlen:
            extra += ["--dataset_name", a.varlen, "--eval_split", "None"]
        return ["sft.py", *common, *extra, *a.extra]
    if w == "reward":
        return ["reward.py", *common, "--per_device_train_batch_size", "64", "--learning_rate", "1e-4",
                "--warmup_steps", "0", *a.extra]
    if w == "dpo":
        return ["dpo.py", *common, "--per_device_train_batch_size", "64", "--beta", "0.1", "--loss_type", "sigmoid",
                "--learning_rate", "1e-4", *a.extra]
    if w in ("grpo", "gmpo", "rloo"):
        extra = ["--per_device_train_batch_size", "64", "--num_generations", "8", "--max_new_tokens", "8",
                 "--learning_rate", "3e-5", "--log_completions_steps", "0"]
        extra += {"grpo": ["--beta", "0.0", "--loss_type", "dapo"], "gmpo": ["--beta", "0.0"],
                  "rloo": ["--beta", "0.05"]}[w]
        return [f"{w}.py", *common, *extra, *a.extra]
    if w == "online_dpo":
        return ["online_dpo.py", *common, "--per_device_train_batch_size", "64", "--max_new_tokens", "8",
                "--learning_rate", "2e-5", "--beta", "0.1", "--log_completions_steps", "0", *a.extra]
    raise ValueError(w)


def child_ours(a) -> dict:
    set_threads(a.threads)
    clock = StepClock(a.warmup)
    argv = our_command(a.workload, a)
    sys.argv = [str(ROOT / "algos" / argv[0]), *argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    out = clock.result()
    metrics = [json.loads(x) for x in (Path(a.out) / "metrics.jsonl").read_text().splitlines() if x]
    if a.workload == "sft":  # trained tokens per step, from the logged num_tokens (tokens per logging window)
        out["tokens_per_step"] = sum(m["num_tokens"] for m in metrics) / metrics[-1]["step"]
        out["loss"] = metrics[-1]["loss"]
    return out


def child_profile(a) -> dict:
    """Our script's step split into its parts: the CPU time spent inside each function below (exclusive of the
    others it calls), per optimizer step after the warm-up; `rest of the loop` is what is left of the step."""
    import accelerate
    import torch

    from common import data, distributed, model as model_utils

    parts = ((data, "batch_prompt_completion", "batch building (padding, tensors)"),
             (data, "pad", "batch building (padding, tensors)"),
             (model_utils, "hidden_before_head", "forward through the model"),
             (model_utils, "sequence_classifier_scores", "forward through the model"),
             (model_utils, "head_logps", "output head + float32 log-softmax (chunked)"),
             (accelerate.Accelerator, "backward", "backward"),
             (accelerate.Accelerator, "clip_grad_norm_", "gradient norm + clipping"),
             (torch.optim.AdamW, "step", "AdamW update"),
             (distributed, "optimizer_step", "zero_grad, scheduler, skip check"))
    set_threads(a.threads)
    totals: dict[str, float] = {}
    inner: list[float] = []  # CPU time of timed callees, one entry per open timed call

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            counted, t0 = len(clock.cpu) >= a.warmup, time.process_time()  # calls of the measured steps
            inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                dt, sub = time.process_time() - t0, inner.pop()
                if counted:
                    totals[label] = totals.get(label, 0.0) + dt - sub
                if inner:
                    inner[-1] += dt
        return wrapper

    for owner, attr, label in parts:
        setattr(owner, attr, timed(getattr(owner, attr), label))
    clock = StepClock(a.warmup)
    argv = our_command(a.workload, a)
    sys.argv = [str(ROOT / "algos" / argv[0]), *argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    out = clock.result()
    n = len(clock.cpu) - a.warmup
    out["parts_s_per_step"] = {k: v / n for k, v in totals.items()}
    out["parts_s_per_step"]["rest of the loop (metrics, masks, accelerate contexts)"] = (
        out["cpu_s_per_step"] - sum(totals.values()) / n)
    return out


# ----------------------------------------------------------------------------- TRL (child process, TRL venv)
def trl_common(a) -> dict:
    import torch

    return dict(output_dir=a.out, gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, max_steps=a.steps, bf16=False, fp16=False, use_cpu=True,
                gradient_checkpointing=bool(a.gradient_checkpointing), logging_steps=a.logging_steps,
                save_strategy="no", eval_strategy="no", report_to=[], seed=1, dataloader_num_workers=0,
                disable_tqdm=True, model_init_kwargs={"dtype": torch.float32})


def child_trl(a) -> dict:
    from transformers import AutoTokenizer, TrainerCallback

    from common import toy

    set_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    w, c = a.workload, trl_common(a)
    gold = toy.gold_reward("add")
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    if w == "sft":
        from trl import SFTConfig, SFTTrainer

        ds = toy.make_dataset("add", "prompt_completion", "train") if not a.varlen else _load_rows(a.varlen)
        mode = {"": {"max_length": 1024}, "padding_free": {"padding_free": True, "max_length": None},
                "packing": {"packing": True, "packing_strategy": "bfd", "max_length": a.pack_length}}[a.trl_mode]
        cfg = SFTConfig(**c, per_device_train_batch_size=a.batch if a.varlen else 64, learning_rate=1e-4, **mode)
        trainer = SFTTrainer(model=a.model, args=cfg, train_dataset=ds, processing_class=tok)
    elif w == "reward":
        from trl import RewardConfig, RewardTrainer

        cfg = RewardConfig(**c, per_device_train_batch_size=64, learning_rate=1e-4, max_length=128)
        trainer = RewardTrainer(model=a.model, args=cfg, train_dataset=toy.make_dataset("add", "preference", "train"),
                                processing_class=tok)
    elif w == "dpo":
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(**c, per_device_train_batch_size=64, learning_rate=1e-4, beta=0.1, loss_type=["sigmoid"],
                        max_length=1024, disable_dropout=True)
        trainer = DPOTrainer(model=a.model, args=cfg, train_dataset=toy.make_dataset("add", "preference", "train"),
                             processing_class=tok)
    elif w in ("grpo", "gmpo", "rloo"):
        gen = dict(per_device_train_batch_size=64, num_generations=8, max_completion_length=8, temperature=1.0,
                   top_p=1.0, learning_rate=3e-5, log_completions=False, disable_dropout=True)
        ds = toy.make_dataset("add", "prompt", "train")
        if w == "rloo":
            from trl import RLOOConfig, RLOOTrainer

            trainer = RLOOTrainer(model=a.model, reward_funcs=[gold], train_dataset=ds, processing_class=tok,
                                  args=RLOOConfig(**c, **gen, beta=0.05))
        elif w == "gmpo":
            from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

            trainer = GMPOTrainer(model=a.model, reward_funcs=[gold], train_dataset=ds, processing_class=tok,
                                  args=GMPOConfig(**c, **gen, beta=0.0))
        else:
            from trl import GRPOConfig, GRPOTrainer

            trainer = GRPOTrainer(model=a.model, reward_funcs=[gold], train_dataset=ds, processing_class=tok,
                                  args=GRPOConfig(**c, **gen, beta=0.0, loss_type="dapo"))
    elif w == "online_dpo":
        from transformers import AutoModelForSequenceClassification
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        rm_path = toy.toy_reward_model_path("add")
        rm = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1)
        cfg = OnlineDPOConfig(**c, per_device_train_batch_size=32, max_new_tokens=8, temperature=1.0,
                              learning_rate=2e-5, beta=0.1, loss_type="sigmoid", disable_dropout=True)
        trainer = OnlineDPOTrainer(model=a.model, reward_funcs=rm, args=cfg,
                                   train_dataset=toy.make_dataset("add", "prompt", "train"), processing_class=tok,
                                   reward_processing_classes=AutoTokenizer.from_pretrained(rm_path))
    else:
        raise ValueError(w)
    trainer.add_callback(Losses())
    clock = StepClock(a.warmup)
    tokens = []
    if w == "sft":  # trained (label) tokens of every optimizer step
        inner = trainer.compute_loss

        def counting(model, inputs, *args, **kw):
            tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return inner(model, inputs, *args, **kw)

        trainer.compute_loss = counting
    trainer.train()
    out = clock.result()
    if w == "sft":
        out["tokens_per_step"] = statistics.mean(tokens[a.warmup:]) if len(tokens) > a.warmup else float("nan")
        out["loss"] = losses[-1] if losses else float("nan")
    return out


def _load_rows(path: str):
    from datasets import load_dataset

    return load_dataset("json", data_files=path, split="train")


# ----------------------------------------------------------------------------- plain PyTorch loops (child process)
def child_plain(a) -> dict:
    """The workload's forwards, backward and AdamW step written as a user would, with nothing else: no metrics, no
    logging, no accelerate. Inputs are built per step from pre-tokenised rows, like the scripts'."""
    import copy

    import torch
    import torch.nn.functional as F

    from common import data, model as model_utils, toy

    set_threads(a.threads)
    torch.manual_seed(1)
    tok = model_utils.load_tokenizer(a.model)
    w = a.workload
    pad = tok.pad_token_id

    def logps_of(model, ids, am, T):  # straightforward: logits of the completion positions, float32 log-softmax
        logits = model(input_ids=ids, attention_mask=am, position_ids=model_utils.position_ids_from_mask(am),
                       logits_to_keep=T + 1, use_cache=False).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, -T:, None]).squeeze(-1)

    if w == "reward":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1)
        model.config.pad_token_id = pad
    else:
        model = model_utils.load_causal_lm(a.model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    clock = StepClock(a.warmup)
    if w == "sft":
        ds = toy.make_dataset("add", "prompt_completion", "train")
        p_ids = data.tokenize(tok, [data.prompt_text(p, tok) for p in ds["prompt"]])
        c_ids = data.tokenize(tok, [data.completion_text(p, c, tok) for p, c in zip(ds["prompt"], ds["completion"])])
        for step in range(a.steps):
            idx = data.batch_indices(len(p_ids), 64, step, 1)
            b = data.batch_prompt_completion([p_ids[i] for i in idx], [c_ids[i] for i in idx], pad)
            m = b["completion_mask"].float()
            lp = logps_of(model, b["input_ids"], b["attention_mask"], m.shape[1])
            loss = -(lp * m).sum() / m.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return clock.result()
    if w in ("reward", "dpo"):
        ds = toy.make_dataset("add", "preference", "train")
        p_ids = data.tokenize(tok, [data.prompt_text(p, tok) for p in ds["prompt"]])
        ch = data.tokenize(tok, [data.completion_text(p, c, tok) for p, c in zip(ds["prompt"], ds["chosen"])])
        rj = data.tokenize(tok, [data.completion_text(p, c, tok) for p, c in zip(ds["prompt"], ds["rejected"])])
        ref = copy.deepcopy(model).eval().requires_grad_(False) if w == "dpo" else None
        for step in range(a.steps):
            idx = data.batch_indices(len(p_ids), 64, step, 1)
            P = [p_ids[i] for i in idx]
            if w == "reward":
                ids, am = data.pad([P[k] + ch[i] for k, i in enumerate(idx)] +
                                   [P[k] + rj[i] for k, i in enumerate(idx)], pad, "right")
                am = am.long()
                out = model(input_ids=ids, attention_mask=am, use_cache=False, output_hidden_states=False).logits[:, 0]
                r = out  # HF pools at the last non-pad token (right padding, pad != eos for the toy tokenizer)
                loss = -F.logsigmoid(r[:64] - r[64:]).mean()
            else:
                b = data.batch_prompt_completion(P + P, [ch[i] for i in idx] + [rj[i] for i in idx], pad)
                m = b["completion_mask"].float()
                T = m.shape[1]
                with torch.no_grad():
                    ref_seq = (logps_of(ref, b["input_ids"], b["attention_mask"], T) * m).sum(1)
                seq = (logps_of(model, b["input_ids"], b["attention_mask"], T) * m).sum(1)
                h = (seq[:64] - ref_seq[:64]) - (seq[64:] - ref_seq[64:])
                loss = -F.logsigmoid(0.1 * h).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return clock.result()
    # online workloads: sample with HF generate, score, (reference forward), policy forward, loss, step
    from transformers import GenerationConfig

    ds = toy.make_dataset("add", "prompt", "train")
    p_ids = data.tokenize(tok, [data.prompt_text(p, tok) for p in ds["prompt"]])
    gold = toy.gold_reward("add")
    G = 2 if w == "online_dpo" else 8
    n_prompts = 64 // G
    gen_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=None, top_p=1.0, max_new_tokens=8,
                               num_return_sequences=G, pad_token_id=pad, eos_token_id=tok.eos_token_id)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if w in ("rloo", "online_dpo") else None
    if w == "online_dpo":
        rm, rm_tok = model_utils.load_reward_model("toy-rm")
        rm.eval().requires_grad_(False)
    for step in range(a.steps):
        idx = data.batch_indices(len(p_ids), n_prompts, step, 1)
        P = [p_ids[i] for i in idx]
        ids, am = data.pad(P, pad, "left")
        model.eval()
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=am, generation_config=gen_cfg)
        model.train()
        comp = seqs[:, ids.shape[1]:]
        cmask, _ = model_utils_mask(comp, tok.eos_token_id)
        texts = tok.batch_decode([c[m.bool()] for c, m in zip(comp, cmask)], skip_special_tokens=True)
        prompts = [ds["prompt"][i] for i in idx for _ in range(G)]
        full = torch.cat([ids.repeat_interleave(G, 0), comp], 1)
        full_am = torch.cat([am.repeat_interleave(G, 0), cmask], 1)
        T = comp.shape[1]
        m = cmask.float()
        if w == "online_dpo":
            with torch.no_grad():
                r_ids, r_am = data.pad(data.tokenize(rm_tok, [p + t for p, t in zip(prompts, texts)]), pad, "right")
                r = rm(input_ids=r_ids, attention_mask=r_am.long()).logits[:, 0].view(-1, 2)
                first_wins = (r[:, 0] >= r[:, 1])
                ref_seq = (logps_of(ref, full, full_am, T) * m).sum(1).view(-1, 2)
            seq = (logps_of(model, full, full_am, T) * m).sum(1).view(-1, 2)
            d = (seq - ref_seq)
            margin = torch.where(first_wins, d[:, 0] - d[:, 1], d[:, 1] - d[:, 0])
            loss = -F.logsigmoid(0.1 * margin).mean()
        else:
            rewards = torch.tensor([x or 0.0 for x in gold(prompts, texts)]).view(-1, G)
            if w == "rloo":
                with torch.no_grad():
                    ref_lp = logps_of(ref, full, full_am, T)
                lp = logps_of(model, full, full_am, T)
                kl = ((lp.detach() - ref_lp) * m).sum(1).view(-1, G)
                rr = rewards - 0.05 * kl
                adv = (rr - (rr.sum(1, keepdim=True) - rr) / (G - 1)).view(-1)
                ratio = torch.exp(lp - lp.detach())
                loss = -((ratio * adv[:, None]) * m).sum() / m.sum()
            else:
                adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
                lp = logps_of(model, full, full_am, T)
                ratio = torch.exp(lp - lp.detach())
                if w == "gmpo":  # geometric mean of the token ratios, one per sequence
                    seq_ratio = torch.exp(((lp - lp.detach()) * m).sum(1) / m.sum(1).clamp(min=1))
                    loss = -(seq_ratio * adv).mean()
                else:
                    loss = -((ratio * adv[:, None]) * m).sum() / m.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return clock.result()


def model_utils_mask(comp, eos_id):
    from common.sampling import mask_after_eos

    return mask_after_eos(comp, eos_id)


# ----------------------------------------------------------------------------- the parent: venv, runs, tables
def trl_python(venv: Path) -> str:
    """The TRL virtualenv's python (made once: the project's requirements + trl, inside that venv only)."""
    py = venv / "bin" / "python"
    check = f"import trl, transformers, torch; assert trl.__version__ == '{TRL_VERSION}'"
    if py.exists() and subprocess.run([str(py), "-c", check], capture_output=True).returncode == 0:
        return str(py)
    print(f"making a virtualenv with trl=={TRL_VERSION} in {venv} (not a project dependency)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements.txt"),
                    f"trl=={TRL_VERSION}"], check=True)
    return str(py)


def run_child(python: str, kind: str, workload: str, a, out: Path, **extra) -> dict:
    res = out / f"{kind}_{workload}.json"
    cmd = [python, str(Path(__file__).resolve()), "--child", kind, "--workload", workload, "--model", a.model,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads),
           "--logging_steps", str(a.logging_steps), "--result", str(res), "--out", str(out / f"run_{kind}_{workload}")]
    for k, v in extra.items():
        cmd += [f"--{k}={' '.join(map(str, v))}" if isinstance(v, list) else f"--{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(res.read_text())


def programs_for(section: str, w: str, py: str, a, scratch: Path) -> dict:
    """name -> zero-argument callable returning a child's result, for one workload of one section."""
    ours = lambda **kw: run_child(sys.executable, "ours", w, a, scratch, **kw)  # noqa: E731
    trl = lambda ckpt, **kw: run_child(py, "trl", w, a, scratch, gradient_checkpointing=ckpt, **kw)  # noqa: E731
    if section == "profile":
        return {"ours": lambda: run_child(sys.executable, "profile", w, a, scratch)}
    if section == "packing":
        vl = dict(varlen=str(a.varlen_file), batch=a.varlen_batch)
        return {
            "sft.py (padded)": lambda: ours(**vl),
            "sft.py --packing": lambda: ours(**vl, extra=["--packing", "True"]),
            "TRL SFTTrainer, defaults": lambda: trl(1, **vl),
            "TRL SFTTrainer, checkpointing off": lambda: trl(0, **vl),
            "TRL SFTTrainer, padding_free (checkpointing off)": lambda: trl(0, **vl, trl_mode="padding_free"),
            # bins of --pack_length tokens: as many per step as hold the same tokens as --varlen_batch sequences
            "TRL SFTTrainer, packing bfd (checkpointing off)": lambda: trl(0, **{**vl, "batch": a.pack_batch},
                                                                           trl_mode="packing"),
        }
    progs = {"ours": lambda: ours(), "TRL, checkpointing off": lambda: trl(0), "TRL defaults": lambda: trl(1)}
    if section == "speed":
        progs["plain PyTorch loop"] = lambda: run_child(sys.executable, "plain", w, a, scratch)
        if w in ("sft", "reward"):  # with TRL's AdamW kernel too (not the scripts' default: other float rounding)
            progs[FUSED] = lambda: ours(extra=["--optim", "adamw_torch_fused"])
    return progs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", nargs="+", default=["speed", "memory", "packing"],
                    choices=["speed", "memory", "packing", "profile"])
    ap.add_argument("--workloads", nargs="+", default=list(SPEED_WORKLOADS), choices=[*SPEED_WORKLOADS, "kto"],
                    help="the workloads to measure (speed: any; memory: dpo, grpo); a run of some keeps the others' "
                    "results")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    ap.add_argument("--logging_steps", type=int, default=10, help="metrics logged every this many steps (all)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements of each program (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every program")
    ap.add_argument("--varlen_batch", type=int, default=32, help="packing section: sequences per optimizer step")
    ap.add_argument("--trl_venv", default=str(ROOT / ".cache" / f"venv-trl-{TRL_VERSION}"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_trl"))
    # child-process arguments
    ap.add_argument("--child", choices=["ours", "trl", "plain", "profile"], help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--gradient_checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--varlen", default="", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--trl_mode", default="", help=argparse.SUPPRESS)
    ap.add_argument("--pack_length", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="", help=argparse.SUPPRESS)  # extra script flags, one string
    a = ap.parse_args()
    a.extra = a.extra.split()
    if a.child:
        res = {"ours": child_ours, "trl": child_trl, "plain": child_plain, "profile": child_profile}[a.child](a)
        Path(a.result).write_text(json.dumps(res) + "\n")
        return

    from common import toy

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # run folders of this invocation only: two invocations (other sections or workloads) never share one
    scratch = ROOT / "runs" / "bench" / "vs_trl" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    py = trl_python(Path(a.trl_venv))
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for section in a.sections:
        if section == "speed":
            a.model = str(toy.toy_policy_path("add"))
            workloads = [w for w in a.workloads if w != "kto"]
        elif section == "memory":
            a.model = str(big_vocab_model())
            workloads = [w for w in ("dpo", "grpo") if w in a.workloads]
        elif section == "profile":
            a.model = str(toy.toy_policy_path("add"))
            workloads = [w for w in ("sft", "reward") if w in a.workloads]
        else:
            a.model = str(toy.toy_policy_path("add"))
            a.varlen_file = scratch / "varlen.jsonl"
            ds = varlen_dataset()
            ds.to_json(str(a.varlen_file))
            mean_len = statistics.mean(len(t) + 2 for t in ds["text"])  # characters + <bos> and <eos>
            a.pack_batch = max(1, round(a.varlen_batch * mean_len / 256))
            workloads = ["sft"]
        load_before = os.getloadavg()
        t_start = time.time()
        runs = {w: {name: [] for name in programs_for(section, w, py, a, scratch)} for w in workloads}
        for r in range(a.repeats):  # interleaved: every program once per round
            for w in workloads:
                for name, fn in programs_for(section, w, py, a, scratch).items():
                    res = fn()
                    runs[w][name].append(res)
                    print(f"[{section}] round {r + 1}/{a.repeats} {w} / {name}: {res['s_per_step'] * 1e3:.1f} ms/step, "
                          f"step peak {res['step_peak_mb']:.0f} MB (+{res['step_extra_mb']:.0f} MB over the "
                          f"between-step resident set)", flush=True)
        meta = {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "threads": a.threads,
                "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "minutes": round((time.time() - t_start) / 60, 1), "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "model": Path(a.model).name}
        # a run of some workloads replaces theirs and keeps the others' (each with the conditions it was measured in);
        # the file is read again first, so another section written meanwhile by another run is kept
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        prev = results.get(section, {})
        metas = prev.get("meta_by_workload") or {w: prev["meta"] for w in prev.get("runs", {})}
        metas.update({w: meta for w in runs})
        merged = {**prev.get("runs", {}), **runs}
        results[section] = {"meta": meta, "meta_by_workload": {w: metas[w] for w in merged}, "runs": merged}
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    if "kto" in a.workloads and (ROOT / "benchmarks" / "kto_speed.py").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kto_speed.py"), "--repeats", str(a.repeats),
                        "--steps", str(max(a.steps, 30)), "--warmup", "10", "--out", str(out / "kto")],
                       check=True, cwd=ROOT)
    write_readme(results, out)
    shutil.rmtree(scratch, ignore_errors=True)  # the children's run folders (saved models); results are in `out`


def _med(xs: list[dict], key: str) -> float:
    vals = [x[key] for x in xs if x.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def write_readme(results: dict, out: Path):
    lines = ["# cleanalign vs TRL 1.16: time per optimizer step, memory, packing", "",
             "Written by `python benchmarks/vs_trl.py` (its docstring says what is matched and how it is timed). "
             "The machine is shared and loaded (load averages below), so the primary measure is the CPU time of "
             "each single-threaded process per optimizer step (`cpu`), which waiting for a core does not inflate; "
             "wall-clock times are shown next to it.", ""]
    if "speed" in results:
        s = results["speed"]
        lines += ["## Speed (toy-sft on toy:add, float32, 1 thread)", "",
                  "CPU ms per optimizer step (median over repeats); ratio > 1 = we are faster.", "",
                  "| workload | ours | TRL ckpt off | TRL defaults | plain loop | TRL ckpt off / ours | "
                  "TRL defaults / ours | ours / plain | wall ms: ours, TRL off, TRL defaults, plain |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for w, progs in s["runs"].items():
            c = {n: _med(progs[n], "cpu_s_per_step") * 1e3 for n in progs}
            wl = {n: _med(progs[n], "s_per_step") * 1e3 for n in progs}
            o, t0, t1, p = (c["ours"], c["TRL, checkpointing off"], c["TRL defaults"], c["plain PyTorch loop"])
            lines.append(f"| {w} | {o:.1f} | {t0:.1f} | {t1:.1f} | {p:.1f} | {t0 / o:.2f}x | {t1 / o:.2f}x | "
                         f"{o / p:.2f}x | {wl['ours']:.0f}, {wl['TRL, checkpointing off']:.0f}, "
                         f"{wl['TRL defaults']:.0f}, {wl['plain PyTorch loop']:.0f} |")
        fused = [(w, progs) for w, progs in s["runs"].items() if progs.get(FUSED)]
        if fused:
            lines += ["", "With TRL's AdamW kernel (`--optim adamw_torch_fused`, one fused kernel per step; not the "
                      "default: it rounds differently, and the toy start policies are built with the default kernel): "
                      + "; ".join(f"{w} {_med(p[FUSED], 'cpu_s_per_step') * 1e3:.1f} ms, "
                                  f"{_med(p['TRL, checkpointing off'], 'cpu_s_per_step') / _med(p[FUSED], 'cpu_s_per_step'):.2f}x "
                                  "TRL ckpt off" for w, p in fused) + "."]
        lines += ["", *_meta_lines(s), ""]
        kto = out / "kto" / "speed.json"
        if kto.exists():
            k = json.loads(kto.read_text())
            lines += ["kto (benchmarks/kto_speed.py, wall-clock s/step from the run's own clock, "
                      f"load {k['meta']['loadavg_before']} -> {k['meta']['loadavg_after']}): " + "; ".join(
                          f"{n} {v['s_per_step'] * 1e3:.1f} ms" for n, v in k["programs"].items()), ""]
    if "memory" in results:
        s = results["memory"]
        lines += [f"## Memory ({s['meta']['model']}: 151,936-token vocabulary, hidden 128, float32)", "",
                  "| workload | program | cpu ms/step | wall ms/step | step peak RSS (MB) | step extra (MB) | "
                  "step extra vs TRL ckpt off | step peak vs TRL ckpt off |", "|---|---|---|---|---|---|---|---|"]
        for w, progs in s["runs"].items():
            base = progs["TRL, checkpointing off"]
            for name, rs in progs.items():
                lines.append(f"| {w} | {name} | {_med(rs, 'cpu_s_per_step') * 1e3:.0f} | "
                             f"{_med(rs, 's_per_step') * 1e3:.0f} | {_med(rs, 'step_peak_mb'):.0f} | "
                             f"{_med(rs, 'step_extra_mb'):.0f} | "
                             f"{_med(rs, 'step_extra_mb') / _med(base, 'step_extra_mb'):.2f}x | "
                             f"{_med(rs, 'step_peak_mb') / _med(base, 'step_peak_mb'):.2f}x |")
        lines += ["", "step peak = the resident-set high-water mark over the measured steps (the whole process: "
                  "interpreter, libraries, weights, optimizer state, generation); step extra = that peak minus the "
                  "resident set between two steps, i.e. what a step allocates on top of what stays. The padded rows "
                  "of the vocabulary have zero weights, so the model samples nearly uniformly over 151,936 tokens "
                  "and completions run to the 8-token limit in every program alike.", "", *_meta_lines(s), ""]
    if "profile" in results:
        s = results["profile"]
        lines += ["## Where a step's CPU time goes (sft.py, reward.py; the speed section's workload)", "",
                  "CPU ms per optimizer step inside each part (exclusive of the other parts it calls), median over "
                  "repeats.", "", "| part | " + " | ".join(s["runs"]) + " |", "|---|" + "---|" * len(s["runs"])]
        names = list(dict.fromkeys(k for progs in s["runs"].values() for r in progs["ours"]
                                   for k in r["parts_s_per_step"]))
        med = {w: {k: statistics.median(r["parts_s_per_step"][k] for r in progs["ours"]) * 1e3
                   for k in names if k in progs["ours"][0]["parts_s_per_step"]} for w, progs in s["runs"].items()}
        total = {w: _med(progs["ours"], "cpu_s_per_step") * 1e3 for w, progs in s["runs"].items()}
        for k in names:
            lines.append(f"| {k} | " + " | ".join(f"{med[w][k]:.1f} ({med[w][k] / total[w]:.0%})" if k in med[w]
                                                  else "-" for w in med) + " |")
        model_share = {w: (med[w].get("forward through the model", 0.0) + med[w].get("backward", 0.0)) / total[w]
                       for w in med}
        lines += ["| whole step | " + " | ".join(f"{total[w]:.1f}" for w in total) + " |", "",
                  "Forward and backward through the model are " + ", ".join(f"{v:.0%} of {w}'s step" for w, v in
                                                                           model_share.items()) +
                  ": the same computation in the script, TRL and the plain loop (same model and rows), so "
                  "a step can only be faster by what lies around it. The largest piece of that is the AdamW update "
                  "(torch's default kernel on CPU: one pass over the weights per operation), which TRL's default "
                  "fused kernel does in one pass (the speed section's `--optim adamw_torch_fused` row).", "",
                  *_meta_lines(s), ""]
    if "packing" in results:
        s = results["packing"]
        progs = s["runs"]["sft"]
        lines += ["## Packing (sft on a variable-length toy mix, 8 to 200 tokens per sequence, every token trained)",
                  "", "| program | cpu ms/step | wall ms/step | trained tokens/step | tokens per CPU second | "
                  "vs TRL defaults | last logged loss |", "|---|---|---|---|---|---|---|"]
        tps = {n: _med(rs, "tokens_per_step") / _med(rs, "cpu_s_per_step") for n, rs in progs.items()}
        base = tps.get("TRL SFTTrainer, defaults", float("nan"))
        for name, rs in progs.items():
            lines.append(f"| {name} | {_med(rs, 'cpu_s_per_step') * 1e3:.0f} | {_med(rs, 's_per_step') * 1e3:.0f} | "
                         f"{_med(rs, 'tokens_per_step'):.0f} | {tps[name]:.0f} | {tps[name] / base:.2f}x | "
                         f"{_med(rs, 'loss'):.3f} |")
        lines += ["", "TRL's padding_free and bfd packing put a whole micro-batch in one row; on CPU (sdpa, no varlen "
                  "kernels) attention then spans the whole row under a block-diagonal mask. sft.py --packing packs "
                  "into rows no longer than the micro-batch's longest sequence.", "", *_meta_lines(s), ""]
    lines += targets(results)
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def targets(results: dict) -> list[str]:
    """The targets this benchmark checks, each met or missed, from the medians above."""
    rows = []
    if "speed" in results:
        r = results["speed"]["runs"]
        for w in r:
            o = _med(r[w]["ours"], "cpu_s_per_step")
            rows.append((f"{w}: clearly ahead of TRL with checkpointing off (>= 1.1x)",
                         f"{_med(r[w]['TRL, checkpointing off'], 'cpu_s_per_step') / o:.2f}x", None))
            if w in ("sft", "reward", "grpo", "dpo"):
                ratio = o / _med(r[w]["plain PyTorch loop"], "cpu_s_per_step")
                rows.append((f"{w}: within 10% of the plain loop", f"{ratio:.2f}x", ratio <= 1.10))
        for row in list(rows):
            if row[2] is None:
                rows[rows.index(row)] = (row[0], row[1], float(row[1][:-1]) >= 1.1)
    if "memory" in results:
        r = results["memory"]["runs"]
        for w in r:
            base = r[w]["TRL, checkpointing off"]
            for key, what in (("step_extra_mb", "step extra"), ("step_peak_mb", "step peak RSS")):
                ratio = _med(r[w]["ours"], key) / _med(base, key)
                rows.append((f"{w} at 151,936 vocabulary: {what} <= 0.5x TRL's", f"{ratio:.2f}x", ratio <= 0.5))
    if "packing" in results:
        p = results["packing"]["runs"]["sft"]
        tps = {n: _med(rs, "tokens_per_step") / _med(rs, "cpu_s_per_step") for n, rs in p.items()}
        ours = tps["sft.py --packing"]
        for name, need in (("TRL SFTTrainer, defaults", 2.0),
                           ("TRL SFTTrainer, padding_free (checkpointing off)", 1.2),
                           ("TRL SFTTrainer, packing bfd (checkpointing off)", 1.2)):
            rows.append((f"sft --packing tokens/s >= {need}x {name}", f"{ours / tps[name]:.2f}x", ours / tps[name] >= need))
    if not rows:
        return []
    return ["## Targets", "", "| target | measured | |", "|---|---|---|"] + [
        f"| {t} | {m} | {'met' if ok else 'missed'} |" for t, m, ok in rows] + [""]


def _meta_lines(s: dict) -> list[str]:
    """One line per measurement run of a section (workloads re-measured later carry their own conditions)."""
    by = s.get("meta_by_workload") or {w: s["meta"] for w in s["runs"]}
    groups: dict[str, list[str]] = {}
    for w, m in by.items():
        groups.setdefault(json.dumps(m, sort_keys=True), []).append(w)
    if len(groups) == 1:
        return [_meta_line(s["meta"] if not by else next(iter(by.values())))]
    return ["\n\n".join(f"{', '.join(ws)}: {_meta_line(json.loads(m))}" for m, ws in groups.items())]


def _meta_line(m: dict) -> str:
    return (f"{m['repeats']} interleaved repeats x {m['steps']} steps ({m['warmup']} warm-up steps left out), "
            f"{m['threads']} thread(s) per program, {m['cores']} cores, load average {m['loadavg_before']} before and "
            f"{m['loadavg_after']} after ({m['minutes']} min), {m['date']} UTC.")


if __name__ == "__main__":
    main()
