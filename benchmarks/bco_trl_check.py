"""bco.py's formulas against TRL 1.13's BCOTrainer (its last release) on one batch: the first step's logged metrics.

    python benchmarks/bco_trl_check.py            # -> benchmarks/results/bco/trl_check.md

TRL's BCOTrainer takes the first rows of the dataset in order on its first step; this script computes bco.py's
quantities (sequence_logps, running_mean_update, bco_losses) on the same first --batch rows of the toy:add unpaired
rows. Policy: the toy SFT policy; reference: a fresh toy initialisation (seed 3, so r and δ are far from 0); β 0.1;
no UDM (TRL's needs an external embedding model and scikit-learn). TRL's logits/chosen|rejected (the sum of every
logit of the sequences over the example count) are not compared: bco.py logs the mean logit (detail 6).
TRL runs in a scratch virtualenv of its own (--trl_venv, made with --system-site-packages, trl==1.13.0 installed
with --no-deps): never a project dependency.
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
TRL_VERSION = "1.13.0"
METRICS = ["loss", "delta", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def trl_first_step(a) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.bco import BCOConfig, BCOTrainer

    from common import toy

    logged = {}

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logged.setdefault("first", dict(logs))

    cfg = BCOConfig(output_dir=str(Path(a.scratch) / "trl"), per_device_train_batch_size=a.batch, max_steps=1,
                    learning_rate=1e-4, beta=0.1, logging_steps=1, bf16=False, use_cpu=True,
                    gradient_checkpointing=False, save_strategy="no", report_to=[], disable_tqdm=True, max_length=1024)
    BCOTrainer(model=AutoModelForCausalLM.from_pretrained(a.policy), ref_model=AutoModelForCausalLM.from_pretrained(a.ref),
               args=cfg, train_dataset=toy.make_dataset("add", "unpaired", "train"),
               processing_class=AutoTokenizer.from_pretrained(a.policy), callbacks=[Keep()]).train()
    return {k: logged["first"][k] for k in METRICS if k in logged["first"]}


def ours_first_step(a) -> dict:
    import torch

    from bco import bco_losses, padded_batch, running_mean_update, sequence_logps
    from common import model as model_utils, preference, toy

    tok = model_utils.load_tokenizer(a.policy)
    rows, _ = preference.tokenize_unpaired(toy.make_dataset("add", "unpaired", "train").select(range(a.batch)), tok,
                                           1024, None)
    pol, ref = model_utils.load_causal_lm(a.policy, tok).eval(), model_utils.load_causal_lm(a.ref, tok).eval()
    b = padded_batch([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id, "cpu")
    with torch.no_grad():
        seq = sequence_logps(pol, b)[0]
        r = 0.1 * (seq - sequence_logps(ref, b)[0])
    d = torch.tensor([row[2] for row in rows])
    delta, _ = running_mean_update(0.0, 0, float(r.sum()), len(rows))  # updated before use (detail 2)
    out = {"loss": bco_losses(r, d, delta).mean().item(), "delta": delta, "rewards/chosen": r[d].mean().item(),
           "rewards/rejected": r[~d].mean().item(), "logps/chosen": seq[d].mean().item(),
           "logps/rejected": seq[~d].mean().item()}
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


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
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--trl_venv", default=str(ROOT / ".cache" / f"venv-trl-{TRL_VERSION}"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bco"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ref", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", default=str(ROOT / "runs" / "bench" / "bco_trl_check"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(trl_first_step(a)))
        return
    from common import model as model_utils, toy

    a.policy = str(toy.toy_policy_path("add"))
    a.ref = str(Path(a.scratch) / "ref")
    if not (Path(a.ref) / "config.json").exists():
        tok = model_utils.load_tokenizer(a.policy)
        model_utils.load_causal_lm("toy", tok, seed=3).save_pretrained(a.ref)
        tok.save_pretrained(a.ref)
    py = trl_python(Path(a.trl_venv))
    proc = subprocess.run([py, str(Path(__file__).resolve()), "--child", "--policy", a.policy, "--ref", a.ref,
                           "--batch", str(a.batch), "--scratch", a.scratch], capture_output=True, text=True,
                          check=True, cwd=ROOT, env={**__import__("os").environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    theirs = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    ours = ours_first_step(a)
    lines = ["| metric | bco.py | TRL 1.13 BCOTrainer | relative difference |", "|---|---|---|---|"]
    for k in METRICS:
        rel = abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12)
        lines.append(f"| {k} | {ours[k]:.7g} | {theirs[k]:.7g} | {rel:.1e} |")
    lines += ["", f"First optimizer step, {a.batch} rows (the dataset's first rows, as TRL's first batch), policy "
              "toy-sft, reference a fresh toy init (seed 3), β 0.1, no UDM, float32, CPU."]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "trl_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
