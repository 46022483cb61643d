"""Does torch.compile of the policy forward pay for sft.py's step? CPU time per step and compile time, eager vs compiled.

    python benchmarks/sft_compile.py                  # 60 steps per mode -> benchmarks/results/vs_trl/torch_compile.json

Each mode runs in a process of its own, one thread, on the toy SFT policy (toy-sft) and toy:add rows, 64 sequences
per step, the step sft.py takes (completion log-probs through the chunked output head, token-mean NLL, backward,
clipping at 1.0, fused AdamW at lr 1e-4). `compiled` wraps the decoder backbone (the model up to its final hidden
states; the head stays outside, chunked) in torch.compile(dynamic=True). Compile time = the wall time of the first
--warmup steps minus that of as many eager steps; per-step cost = the median CPU time of the steps after --warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CLEANALIGN_CACHE", str(ROOT / ".cache"))


def child(mode: str, steps: int, warmup: int) -> dict:
    import torch

    from common import data, model as model_utils, toy

    torch.set_num_threads(1)
    tok = model_utils.load_tokenizer("toy-sft")
    model = model_utils.load_causal_lm("toy-sft")
    model.train()
    if mode == "compiled":
        model.model.compile(dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ds = toy.make_dataset("add", "prompt_completion", "train")
    p_ids = data.tokenize(tok, [data.prompt_text(p, tok) for p in ds["prompt"]])
    c_ids = data.tokenize(tok, [data.completion_text(p, c, tok) for p, c in zip(ds["prompt"], ds["completion"])])
    wall, cpu = [], []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = data.batch_indices(len(p_ids), 64, step, 1)
        b = data.batch_prompt_completion([p_ids[i] for i in idx], [c_ids[i] for i in idx], tok.pad_token_id)
        m = b["completion_mask"].float()
        lp = model_utils.completion_logps(model, b["input_ids"], b["attention_mask"], m.shape[1])
        loss = -(lp * m).sum() / m.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    after = sorted(cpu[warmup:])
    return {"mode": mode, "warmup_wall_s": sum(wall[:warmup]), "cpu_s_per_step": after[len(after) // 2],
            "wall_s_per_step": sorted(wall[warmup:])[len(after) // 2], "final_loss": loss.item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_trl" / "torch_compile.json"))
    ap.add_argument("--child", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.warmup)))
        return
    load_before = os.getloadavg()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = {}
    for mode in ("eager", "compiled"):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps), "--warmup",
                               str(a.warmup)], env=env, capture_output=True, text=True, check=True)
        res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    e, c = res["eager"], res["compiled"]
    per_step_saving = e["cpu_s_per_step"] - c["cpu_s_per_step"]
    compile_s = c["warmup_wall_s"] - e["warmup_wall_s"]
    out = {"programs": res, "compile_s": compile_s, "cpu_per_step_compiled_over_eager": c["cpu_s_per_step"] /
           e["cpu_s_per_step"], "break_even_steps": compile_s / per_step_saving if per_step_saving > 0 else None,
           "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
