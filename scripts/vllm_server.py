"""Start a vLLM OpenAI-compatible server on a policy, ready for `--use_vllm --vllm_mode server` training runs.

    python scripts/vllm_server.py --model toy-sft                       # loopback, port 8000
    python scripts/vllm_server.py --model Qwen/Qwen2.5-0.5B-Instruct --port 8001 --gpu_memory_utilization 0.9
    python algos/grpo.py --use_vllm --vllm_mode server --vllm_server_port 8000   # in another shell

What it adds to vLLM's own server (`python -m vllm.entrypoints.openai.api_server`, which this script execs, so the
PID you see is the server's; SIGTERM to it stops the server and its workers):
  - the worker extension `common.vllm_backend.WeightSyncExtension`, which loads pushed weights in place (and works
    on vLLM's CPU backend, where the usual `model.load_weights` path fails);
  - vLLM's development endpoints (VLLM_SERVER_DEV_MODE=1): `/collective_rpc` (the trainer calls the extension
    through it) and `/reset_prefix_cache`. Unguarded, they would let any client change the served weights, so
  - a per-run secret: at start-up a fresh token is written to `--token_file` (default
    `<cache>/vllm-server-<port>.token`, mode 0600: only its owner, and root, can read it). Every request but
    `/health` must carry it (`common.vllm_backend.TokenMiddleware`, else 401), and the weight-loading extension
    checks it again before reading any weights. The trainer reads the same file (`--vllm_server_token_file`, same
    default). The token travels in clear HTTP: keep the server on loopback (the default) or a network you trust;
  - `processed_logprobs`, so returned log-probs are those of the distribution tokens were sampled from;
  - the toy model names (`toy-sft`, ...) resolved to their cached folders, the policy's dtype, and on CPU a bounded
    KV cache (`--kv_cache_gb`), eager mode and no reserved core.
Extra arguments after `--` go to vLLM unchanged (e.g. `-- --max-num-seqs 64`).

Weights travel as a safetensors file in /dev/shm (or CLEANALIGN_VLLM_SHARED_DIR): run the trainer on the same
machine as the server.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def policy_dtype(folder: str) -> str:
    """The dtype recorded in a local model folder's config.json (vLLM's `auto` would run fp32 weights in bf16 on
    CPU); `auto` for hub names."""
    cfg = Path(folder) / "config.json"
    if not cfg.exists():
        return "auto"
    c = json.loads(cfg.read_text())
    return str(c.get("dtype") or c.get("torch_dtype") or "auto")


def check_port_free(host: str, port: int):
    """Fail before the token file is rewritten when another server already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"--port {port}: cannot listen on {host}:{port} ({e}); is a server already running "
                             "there? Pick another --port.") from e


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-sft", help="policy: toy name, local folder or hub name")
    p.add_argument("--dataset_name", default="toy:add", help="which toy task a toy model name refers to")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, help="default: the policy folder's dtype (float32 for the toy models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv_cache_gb", type=float, default=1.0, help="KV-cache space on CPU (GiB)")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="fraction of GPU memory (GPU only)")
    p.add_argument("--max_model_len", type=int, default=None)
    p.add_argument("--token_file", default=None,
                   help="where to write this run's secret token (mode 0600); trainers pass the same path as "
                        "--vllm_server_token_file. Default: <cache>/vllm-server-<port>.token, the trainer's default")
    a = p.parse_args(argv)

    import torch

    from common.model import resolve
    from common.vllm_backend import TOKEN_ENV, default_token_file, write_token_file

    check_port_free(a.host, a.port)
    folder = resolve(a.model, a.dataset_name)
    on_gpu = torch.cuda.is_available()
    env = dict(os.environ)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    token_file = a.token_file or str(default_token_file(a.port))
    env[TOKEN_ENV] = write_token_file(token_file)  # the server's processes hold it; the file is for the trainer
    print(f"token file: {token_file} (trainer: --vllm_server_token_file {token_file})", flush=True)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", a.host,
           "--port", str(a.port), "--dtype", a.dtype or policy_dtype(folder), "--seed", str(a.seed),
           "--worker-extension-cls", "common.vllm_backend.WeightSyncExtension",
           "--logprobs-mode", "processed_logprobs", "--middleware", "common.vllm_backend.TokenMiddleware"]
    if a.max_model_len:
        cmd += ["--max-model-len", str(a.max_model_len)]
    if on_gpu:
        cmd += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    else:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(a.kv_cache_gb))))
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        cmd += ["--kv-cache-memory-bytes", str(int(a.kv_cache_gb * 2**30)), "--enforce-eager"]
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {a.host}: the token travels in clear HTTP, so anyone who can watch the "
              "traffic can replace the served weights", file=sys.stderr)
    print(" ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd + extra, env)


if __name__ == "__main__":
    main()
