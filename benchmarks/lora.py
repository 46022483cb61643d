"""LoRA (--use_peft) vs full fine-tuning: peak memory and seconds per optimizer step for sft, dpo and grpo.

    python benchmarks/lora.py                       # 3 scripts x {full, lora}, writes benchmarks/results/peft/
    python benchmarks/lora.py --steps 4 --scripts sft grpo   # fewer steps / scripts (a smoke check)

Model: benchmarks/vllm_generation.py's locally built 34M-parameter Llama ("mid": hidden 512, 8 layers, untied LM
head, the toy tokenizer), random init, fp32, built once into .cache/. Each (script, mode) runs algos/<script> in a
fresh process (so peak memory is that run's alone) on the toy add task for `--steps` optimizer steps, no evaluation,
no checkpoints. LoRA: r 16, alpha 32, every linear layer but the LM head. dpo and grpo (beta 0.04) need a reference
model: a second copy of the weights in full fine-tuning, the same model with its adapters off under LoRA.
Reported per run: trainable parameters; the bytes of every live tensor right after an optimizer step (weights,
reference, gradients not yet freed, optimizer state; the largest over the run's steps, found through the garbage
collector); peak resident memory of the process (ru_maxrss: also the Python and library baseline, the allocator's
cache and activations; on a GPU also torch.cuda.max_memory_allocated); and the median wall time of an optimizer step
after the first two (from the metrics file's per-step times). The expected saving is printed next to it: Adam moments and gradients of the frozen
weights (3 x 4 bytes per frozen parameter) plus the reference copy (4 bytes per parameter).
"""

from __future__ import annotations

import argparse
import gc
import importlib
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
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("CLEANALIGN_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LORA = ["--use_peft", "True", "--lora_r", "16", "--lora_alpha", "32"]
SCRIPTS = {  # flags of each benchmarked run (besides model, steps, output and LoRA)
    "sft": ["--per_device_train_batch_size", "16", "--learning_rate", "1e-4", "--warmup_steps", "1"],
    "dpo": ["--per_device_train_batch_size", "8", "--learning_rate", "1e-5"],
    "grpo": ["--per_device_train_batch_size", "16", "--num_generations", "4", "--beta", "0.04",
             "--max_new_tokens", "16", "--log_completions_steps", "0"],
}
NEEDS_REFERENCE = {"sft": False, "dpo": True, "grpo": True}


def child(script: str, out: str, flags: list[str]) -> None:
    """Run algos/<script>.main in this process, then write its peak memory next to its metrics."""
    import torch
    import tyro

    module = importlib.import_module(script)
    args = tyro.cli(module.Args, args=flags, use_underscores=True, config=(tyro.conf.FlagConversionOff,))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    live = []

    def after_step(optimizer, *_):  # bytes of every live tensor (weights, reference, optimizer state, ...)
        seen, total = set(), 0
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                st = obj.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        live.append(total / 2**20)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(after_step)
    module.main(args)
    rec = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "tensor_mb_after_step": max(live) if live else float("nan")}
    if torch.cuda.is_available():
        rec["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (Path(out) / "bench.json").write_text(json.dumps(rec))


def step_seconds(out: Path) -> float:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    times = [r["time"] for r in recs if r.get("step", 0) > 0]
    diffs = [b - a for a, b in zip(times, times[1:])][1:]  # the first two steps (warm-up) left out
    return statistics.median(diffs) if diffs else float("nan")


def parameter_counts(model_dir: str) -> tuple[int, int]:
    """(all parameters, LoRA parameters at r 16 on every linear layer but the LM head) of the benchmark model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(p.numel() for p in m.parameters())
    lora = sum(16 * (mod.in_features + mod.out_features) for n, mod in m.named_modules()
               if isinstance(mod, torch.nn.Linear) and not n.endswith("lm_head"))
    return total, lora


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_results(res: Path, rows: list[dict], meta: dict) -> None:
    res.mkdir(parents=True, exist_ok=True)
    (res / "results.json").write_text(json.dumps({"machine": meta, "rows": rows}, indent=1) + "\n")
    gpu = any("cuda_peak_mb" in r for r in rows)
    head = ("| script | mode | trainable params | reference | live tensors after a step (MiB) | saved (MiB) | "
            "expected saving (MiB) | peak RSS (MiB) | saved (MiB) |" + (" GPU peak (MiB) |" if gpu else "")
            + " s / step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    full = {r["script"]: r for r in rows if r["mode"] == "full"}
    for r in rows:
        f = full.get(r["script"])
        lora = f is not None and r["mode"] == "lora"
        saved_t = f"{f['tensor_mb_after_step'] - r['tensor_mb_after_step']:.0f}" if lora else ""
        saved_rss = f"{f['peak_rss_mb'] - r['peak_rss_mb']:.0f}" if lora else ""
        expect = f"{r['expected_saving_mb']:.0f}" if r["mode"] == "lora" else ""
        ref = "none" if not NEEDS_REFERENCE[r["script"]] else ("adapters off" if r["mode"] == "lora" else "copy")
        lines.append(f"| {r['script']} | {r['mode']} | {r['trainable']:,} | {ref} | {r['tensor_mb_after_step']:.0f} | "
                     f"{saved_t} | {expect} | {r['peak_rss_mb']:.0f} | {saved_rss} |"
                     + (f" {r.get('cuda_peak_mb', float('nan')):.0f} |" if gpu else "") + f" {r['s_per_step']:.3f} |")
    (res / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peft"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench_peft"))
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        script, out, *flags = a.child
        return child(script, out, flags)

    from vllm_generation import build_model

    model_dir = build_model("mid", ROOT / ".cache" / "bench-mid-llama")
    total, lora_params = parameter_counts(model_dir)
    meta = machine()
    print(f"model {model_dir}: {total / 1e6:.1f}M parameters; LoRA r 16: {lora_params / 1e6:.2f}M; machine {meta}")
    rows = []
    for script in a.scripts:
        for mode in ("full", "lora"):
            out = Path(a.workdir) / f"{script}-{mode}"
            flags = ["--model_name_or_path", model_dir, "--max_steps", str(a.steps), "--logging_steps", "1",
                     "--eval_steps", "0", "--save_steps", "0", "--output_dir", str(out), "--overwrite_output_dir",
                     "True", *SCRIPTS[script], *(LORA if mode == "lora" else [])]
            t0 = time.time()
            proc = subprocess.run([sys.executable, __file__, "--child", script, str(out), *flags], cwd=ROOT,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{script} {mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            rec = json.loads((out / "bench.json").read_text())
            trainable = lora_params if mode == "lora" else total
            frozen = total - trainable
            expected = (12 * frozen + (4 * total if NEEDS_REFERENCE[script] else 0)) / 2**20
            rows.append({"script": script, "mode": mode, "trainable": trainable, "s_per_step": step_seconds(out),
                         "expected_saving_mb": expected, "wall_s": round(time.time() - t0, 1), **rec})
            print(rows[-1], flush=True)
    meta["load_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    meta.update({"model": "mid (benchmarks/vllm_generation.py)", "parameters": total, "lora_parameters": lora_params,
                 "steps": a.steps, "argv": sys.argv[1:]})
    write_results(Path(a.out), rows, meta)


if __name__ == "__main__":
    main()
