"""kto.py's formulas against TRL 1.16's KTOTrainer on one batch: the first step's logged metrics of both.

    python benchmarks/kto_trl_check.py            # -> benchmarks/results/kto/trl_check.md

TRL takes the first rows of the dataset in order (sequential sampling) and shifts completions within that batch for
the mismatched pairs; with one process and one micro-batch kto.py's shift over the global batch is the same. So
this script gives TRL the toy:add unpaired rows, and computes kto.py's quantities (sequence_logps,
mismatched_completions, reference_point, kto_losses, token_statistics) on the same first --batch rows. Policy: the
toy SFT policy; reference: a fresh toy initialisation (so r and z are far from 0); λ_D = 1.3, λ_U = 0.8, β = 0.1.
TRL runs in the scratch virtualenv of benchmarks/kto_speed.py (never a project dependency).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "algos"))
METRICS = ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "logits/chosen", "logits/rejected", "entropy"]
WD, WU, BETA = 1.3, 0.8, 0.1


def trl_first_step(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    from common import toy

    logged = {}

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logged.setdefault("first", dict(logs))

    cfg = KTOConfig(output_dir=str(Path(a.scratch) / "trl"), per_device_train_batch_size=a.batch, max_steps=1,
                    learning_rate=1e-4, beta=BETA, desirable_weight=WD, undesirable_weight=WU, loss_type=a.loss_type,
                    logging_steps=1, bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
                    report_to=[], disable_tqdm=True, model_init_kwargs={"dtype": torch.float32})
    KTOTrainer(model=a.policy, ref_model=AutoModelForCausalLM.from_pretrained(a.ref), args=cfg,
               train_dataset=toy.make_dataset("add", "unpaired", "train"),
               processing_class=AutoTokenizer.from_pretrained(a.policy), callbacks=[Keep()]).train()
    return {k: logged["first"][k] for k in METRICS if k in logged["first"]}


def ours_first_step(a) -> dict:
    import torch

    from common import model as model_utils, preference, toy
    from kto import kto_losses, mismatched_completions, padded_batch, reference_point, sequence_logps

    tok = model_utils.load_tokenizer(a.policy)
    rows, _ = preference.tokenize_unpaired(toy.make_dataset("add", "unpaired", "train").select(range(a.batch)), tok,
                                           1024, None)
    pol, ref = model_utils.load_causal_lm(a.policy, tok).eval(), model_utils.load_causal_lm(a.ref, tok).eval()
    pad, n = tok.pad_token_id, len(rows)
    with torch.no_grad():
        z = 0.0
        if a.loss_type == "kto":
            shift = mismatched_completions(n)
            kl = padded_batch([r[0] for r in rows], [rows[shift[j]][1] for j in range(n)], pad, "cpu", 1024)
            z = reference_point(float((sequence_logps(pol, kl)[0] - sequence_logps(ref, kl)[0]).sum()), n)
        b = padded_batch([r[0] for r in rows], [r[1] for r in rows], pad, "cpu", 1024)
        seq, st = sequence_logps(pol, b, want_stats=True, want_entropy=True)
        r = seq - sequence_logps(ref, b)[0]
    d = torch.tensor([row[2] for row in rows])
    ntok = st["tokens"]  # st: per-example sums over the completion tokens
    loss = kto_losses(r, d, z, BETA, WD, WU, a.loss_type).mean().item()
    out = {"loss": loss, "rewards/chosen": BETA * r[d].mean().item(), "rewards/rejected": BETA * r[~d].mean().item(),
           "logps/chosen": seq[d].mean().item(), "logps/rejected": seq[~d].mean().item(),
           "logits/chosen": (st["mean_logits"][d].sum() / ntok[d].sum()).item(),
           "logits/rejected": (st["mean_logits"][~d].sum() / ntok[~d].sum()).item(),
           "entropy": (st["entropy"].sum() / ntok.sum()).item(), "kl": z}
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--trl_venv", default=str(ROOT / ".cache" / "venv-trl-1.16.0"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kto"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ref", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--loss_type", default="kto", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", default=str(ROOT / "runs" / "bench" / "kto_trl_check"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(trl_first_step(a)))
        return
    from dpo_speed import trl_python

    from common import model as model_utils, toy

    a.policy = str(toy.toy_policy_path("add"))
    a.ref = str(Path(a.scratch) / "ref")
    if not (Path(a.ref) / "config.json").exists():
        tok = model_utils.load_tokenizer(a.policy)
        model_utils.load_causal_lm("toy", tok, seed=3).save_pretrained(a.ref)
        tok.save_pretrained(a.ref)
    py = trl_python(Path(a.trl_venv))
    lines = ["| loss_type | metric | kto.py | TRL 1.16 KTOTrainer | relative difference |", "|---|---|---|---|---|"]
    for loss_type in ("kto", "apo_zero_unpaired"):
        a.loss_type = loss_type
        proc = subprocess.run([py, str(Path(__file__).resolve()), "--child", "--policy", a.policy, "--ref", a.ref,
                               "--batch", str(a.batch), "--loss_type", loss_type, "--scratch", a.scratch],
                              capture_output=True, text=True, check=True, cwd=ROOT)
        theirs = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        ours = ours_first_step(a)
        for k in METRICS:
            if k in theirs:
                rel = abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12)
                lines.append(f"| {loss_type} | {k} | {ours[k]:.7g} | {theirs[k]:.7g} | {rel:.1e} |")
    lines += ["", f"First optimizer step, {a.batch} rows (the dataset's first rows, TRL's sequential order), policy "
              "toy-sft, reference a fresh toy init (seed 3), β 0.1, λ_D 1.3, λ_U 0.8, float32, CPU."]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "trl_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
