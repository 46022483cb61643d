"""Peak memory per process and seconds per optimizer step of algos/sft.py under DDP, DeepSpeed ZeRO-2, ZeRO-3 and
FSDP2 with 2 processes (and one process for reference), on the 34M-parameter Llama that benchmarks/vllm_generation.py
builds (hidden 512, 8 layers, untied head), launched exactly as the README says:

    python benchmarks/scale_out.py                  # writes benchmarks/results/scale_out/ (needs the deepspeed extra)
    python benchmarks/scale_out.py --steps 4        # fewer steps on a busy machine
    python benchmarks/scale_out.py --render_only    # rebuild the table from results.json

Each run: sft.py on toy:add, global batch 16 (2 processes x 8, or 1 x 16), float32, --max_steps `--steps`, no
evaluation, only the final save. Seconds per step: the median of the wall-time differences between consecutive
logged steps, after the first two (warm-up). Peak memory: each process's peak resident set size (ru_maxrss, read when
the process ends; it includes the Python / torch / transformers baseline, and on rank 0 the gathered final save).
Elements held: the line common/distributed.py prints after accelerator.prepare. The machine's load average is
recorded before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("CLEANALIGN_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

MODES = ("single", "ddp", "zero2", "zero3", "fsdp2")
LABEL = {"single": "1 process", "ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3",
         "fsdp2": "FSDP2"}
# Each rank runs the script through this wrapper, which writes its peak RSS when the script ends.
MEM_WRAPPER = '''
import json, os, resource, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    with open(os.path.join(os.environ["SCALE_OUT_MEM_DIR"], f"mem_{rank}.json"), "w") as f:
        json.dump({"rank": rank, "peak_rss_mib": peak}, f)
'''


def launch(mode: str, port: int) -> list[str]:
    if mode == "single":
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"{mode}_cpu.yaml"), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port)]


def run_mode(mode: str, model: str, steps: int, work: Path, port: int) -> dict:
    out, mem = work / f"run-{mode}", work / f"mem-{mode}"
    mem.mkdir(parents=True, exist_ok=True)
    for p in mem.glob("mem_*.json"):
        p.unlink()
    wrapper = work / "mem_wrapper.py"
    wrapper.write_text(MEM_WRAPPER)
    per_device = 16 if mode == "single" else 8
    cmd = [*launch(mode, port), str(wrapper), str(ROOT / "algos" / "sft.py"), "--model_name_or_path", model,
           "--max_steps", str(steps), "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0",
           "--warmup_steps", "1", "--per_device_train_batch_size", str(per_device), "--output_dir", str(out),
           "--overwrite_output_dir", "True"]
    load_before = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "SCALE_OUT_MEM_DIR": str(mem), "WANDB_MODE": "offline"})
    wall = time.time() - t0
    (work / f"log-{mode}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    times = [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    gaps = [b - a for a, b in zip(times, times[1:])][1:]  # after the first two steps
    peaks = [json.loads(p.read_text()) for p in sorted(mem.glob("mem_*.json"))]
    held = next((line for line in proc.stdout.splitlines() if line.startswith("sharding:")), "")
    return {"mode": mode, "steps": steps, "seconds_per_step": statistics.median(gaps) if gaps else float("nan"),
            "peak_rss_mib": [round(p["peak_rss_mib"]) for p in sorted(peaks, key=lambda p: p["rank"])],
            "sharding": held.removeprefix("sharding: "), "wall_s": round(wall, 1),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def write_results(out: Path, rows: list[dict], meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["| mode | s / step (median) | peak RSS per process (MiB) | elements held per process (params; optimizer "
             "state) | load avg before / after |", "|---|---|---|---|---|"]
    for r in rows:
        held = r["sharding"].replace("parameters held per process ", "").replace(" elements; optimizer state per "
                                                                                "process ", "; ")
        lines.append(f"| {LABEL[r['mode']]} | {r['seconds_per_step']:.2f} | {' / '.join(map(str, r['peak_rss_mib']))} "
                     f"| {held} | {r['load_before']} / {r['load_after']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_out"))
    p.add_argument("--port", type=int, default=29731)
    p.add_argument("--render_only", action="store_true")
    a = p.parse_args()
    if a.render_only:
        res = json.loads((Path(a.out) / "results.json").read_text())
        return write_results(Path(a.out), res["rows"], res["meta"])
    from vllm_generation import build_model

    cache = Path(os.environ["CLEANALIGN_CACHE"]) / "bench-vllm"
    cache.mkdir(parents=True, exist_ok=True)
    model = build_model("mid", cache / "mid")
    work = Path(os.environ["CLEANALIGN_CACHE"]) / "bench-scale-out"
    work.mkdir(parents=True, exist_ok=True)
    rows = [run_mode(m, model, a.steps, work, a.port + i) for i, m in enumerate(a.modes)]
    import torch

    meta = {"argv": sys.argv[1:], "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "python": platform.python_version(),
            "model": "34M-parameter Llama (benchmarks/vllm_generation.py build_model('mid'))"}
    try:
        import deepspeed

        meta["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    write_results(Path(a.out), rows, meta)


if __name__ == "__main__":
    main()
