"""Asynchronous generation: a generation worker samples the next generation batches while the trainer takes its
optimizer steps on the current one, with a bounded policy lag. Plumbing only: the loss (and the off-policy
correction with the sampler's log-probs) stays in the algorithm file.

    worker = ProcessWorker.for_policy(model, tokenizer, cfg, accelerator, timeout)   # HF generate, own process
    # or ThreadWorker(vllm_generator, accelerator, timeout)                          # a vLLM server, driven async
    ro = AsyncRollout(worker, prompts_for, n=G, steps_per_batch=mu, max_staleness=1, num_batches=R)
    ro.start(model, version=0)
    for each generation batch j:
        gen, info = ro.get(j, version)        # gen.sampler_logps filled; info["staleness"] <= max_staleness
        ... optimizer step ... version += 1
        ro.weights_updated(model, version)    # pushes the weights and requests the batches now allowed
    ro.close()                                # also on exceptions (the worker is stopped, never left behind)

Versions count optimizer steps. Batch j is trained from version j * steps_per_batch on; it may be requested (and so
sampled) as soon as the trainer holds a version v with j * steps_per_batch - v <= max_staleness, and the worker
samples it with exactly the latest weights pushed before the request (requests and pushes are applied in order).
Its staleness = j * steps_per_batch - (version it was sampled with), checked at `get`. max_staleness 0 is the
synchronous schedule (each batch is sampled by the weights it is trained from), run through the worker.

Two workers:
  ProcessWorker  a spawned process holding its own copy of the policy (built from the policy's config, then loaded
                 with the trainer's weights) that samples with HF generate on the trainer's device. Weights travel
                 through one shared-memory buffer: the trainer copies its weights in (waiting until the worker has
                 read the previous ones), the worker copies them into its model before the next request. It starts
                 from the trainer's RNG state (CPU's, or the device's on a GPU), so with max_staleness 0 it draws
                 the very samples the synchronous path draws. The sampler's log-probs are recorded during sampling:
                 those of the distribution each token was drawn from (after temperature, renormalised over the
                 top-k / top-p / min-p set, as vLLM's), at no extra forward.
  ThreadWorker   any generator with the `generate` / `sync_weights` interface (the vLLM server mode of
                 common/vllm_backend.py) called from a background thread. A push waits for the requests in flight
                 (a server must not change weights mid-batch), then calls `sync_weights` on every rank.

Every wait (a weight push waiting for the worker, a batch fetch) gives up after `timeout` seconds with an error that
names --async_timeout; an exception in the worker is raised in the trainer with the worker's traceback; a worker
process that dies is reported with its exit code; `close` stops the worker (the process is terminated if it does
not stop within seconds) and runs at exit too.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import traceback
from typing import Callable

import numpy as np
import torch

from common.sampling import Generation, SamplingConfig

TIMEOUT_FLAG = "--async_timeout"


class WorkerError(RuntimeError):
    """An exception raised inside the generation worker (the message holds the worker's traceback)."""


class WorkerTimeout(TimeoutError):
    """The trainer waited longer than --async_timeout for the generation worker."""


def _timeout_error(what: str, timeout: float) -> WorkerTimeout:
    return WorkerTimeout(
        f"the generation worker did not {what} within {TIMEOUT_FLAG} {timeout:g} s (it may hang, or a batch takes "
        f"longer than that to sample: raise {TIMEOUT_FLAG}, or drop --async_generation to sample in the trainer)")


# ----------------------------------------------------------------------------- Generation <-> picklable arrays
def _pack(gen: Generation) -> dict:
    """Plain numpy arrays (pickled by value: nothing depends on the sender staying alive)."""
    return {"completion_ids": gen.completion_ids.numpy(), "completion_mask": gen.completion_mask.numpy(),
            "terminated": gen.terminated.numpy(), "texts": list(gen.texts),
            "sampler_logps": None if gen.sampler_logps is None else gen.sampler_logps.float().numpy()}


def _unpack(d: dict) -> Generation:
    lp = d["sampler_logps"]
    return Generation(torch.from_numpy(d["completion_ids"]), torch.from_numpy(d["completion_mask"]),
                      torch.from_numpy(d["terminated"]), d["texts"], None if lp is None else torch.from_numpy(lp))


# ----------------------------------------------------------------------------- the sampler inside the worker process
class LogpRecorder:
    """The last HF logits processor of a sampling call: keeps the log-softmax of the final (processed) scores of one
    step and, at the next step, the log-prob of the token drawn from them; one (N, V) tensor held at a time."""

    def __init__(self):
        self.prev, self.steps = None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), -1)
        return scores

    def logps(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) log-probs of the sampled completion tokens (the last step's from its kept scores)."""
        steps = list(self.steps)
        if self.prev is not None and len(steps) < completion_ids.shape[1]:
            last = completion_ids[:, len(steps)].to(self.prev.device)
            steps.append(self.prev.gather(1, last[:, None]).squeeze(1))
        return torch.stack(steps, 1).cpu()


def sampling_warpers(cfg: SamplingConfig) -> list:
    """HF's sampling warpers for `cfg`, in the order HF generate applies them (temperature, top-k, top-p, min-p)."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = []
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        out.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        out.append(TopKLogitsWarper(top_k=cfg.top_k))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=cfg.top_p))
    if cfg.min_p:
        out.append(MinPLogitsWarper(min_p=cfg.min_p))
    return out


class HFSampler:
    """The worker's own copy of the policy and HF generate (runs in the worker process). The sampling warpers run as
    explicit logits processors followed by a LogpRecorder, so the kept log-probs are those of the distribution
    each token was drawn from (after temperature, renormalised over the top-k / top-p / min-p set), at no extra
    forward; the draws are the ones HF generate makes with the same settings."""

    def __init__(self, spec: dict, buffer: dict[str, torch.Tensor]):
        from dataclasses import replace

        from transformers import AutoModelForCausalLM

        from common.generation import HFGenerator

        self.device = torch.device(spec["device"])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        model = AutoModelForCausalLM.from_config(spec["config"], dtype=spec["dtype"],
                                                 attn_implementation=spec["attn_implementation"])
        if spec.get("generation_config") is not None:
            model.generation_config = spec["generation_config"]
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.params = self.model.state_dict()
        missing = sorted(set(buffer) - set(self.params))
        if missing:
            raise KeyError(f"the worker's model has no weights named {missing[:5]} (the policy and its config differ)")
        cfg = spec["cfg"]
        self.warpers = sampling_warpers(cfg)
        plain = replace(cfg, temperature=1.0 if cfg.temperature > 0 else cfg.temperature, top_p=1.0, top_k=0,
                        min_p=None)  # the warpers above do this work, before the recorder
        self.generator = HFGenerator(spec["tokenizer"], plain)

    @torch.no_grad()
    def load(self, buffer: dict[str, torch.Tensor]):
        for k, v in buffer.items():
            self.params[k].copy_(v)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int) -> Generation:
        recorder = LogpRecorder()
        gen = self.generator.generate(self.model, prompt_ids, n, logits_processor=[*self.warpers, recorder])
        gen.sampler_logps = recorder.logps(gen.completion_ids) * gen.completion_mask
        return gen


def get_rng(device: str) -> torch.Tensor:
    """The state of the generator that sampling on `device` draws from (CUDA's own generator on a GPU)."""
    return torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else torch.get_rng_state()


def set_rng(device: str, state: torch.Tensor):
    if torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _worker_main(spec, factory, buffer, requests, results, buffer_free):
    """The worker process: apply weight pushes and generation requests in order; report errors with the traceback."""
    import multiprocessing

    try:
        torch.set_num_threads(spec["threads"])
        sampler = factory(spec, buffer)
        device = spec.get("device", "cpu")
        if spec.get("rng_state") is not None:
            set_rng(device, torch.from_numpy(spec["rng_state"]))
        parent, version = multiprocessing.parent_process(), None
        results.put(("ready", None))
        while True:
            try:
                msg = requests.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return  # the trainer is gone: never linger
                continue
            if msg[0] == "stop":
                return
            if msg[0] == "weights":
                sampler.load(buffer)
                version = msg[1]
                buffer_free.set()
            elif msg[0] == "generate":
                _, round_, prompt_ids, n = msg
                t0, c0 = time.perf_counter(), time.process_time()
                gen = sampler.generate(prompt_ids, n)
                info = {"version": version, "seconds": time.perf_counter() - t0,  # rng: where the next batch starts
                        "cpu_seconds": time.process_time() - c0, "rng_state": get_rng(device).numpy()}
                results.put(("batch", round_, _pack(gen), info))
    except BaseException:
        results.put(("error", traceback.format_exc()))


# ----------------------------------------------------------------------------- workers (trainer side)
class _Worker:
    """What both workers share: `pending` (round -> (Generation, info)) filled by `_poll(wait)`, and `timeout`."""

    def fetch(self, round_: int) -> tuple[Generation, dict]:
        """The batch of round `round_`, waiting at most `timeout` seconds (WorkerTimeout)."""
        deadline = time.monotonic() + self.timeout
        while round_ not in self.pending:
            if time.monotonic() > deadline:
                raise _timeout_error(f"return generation batch {round_}", self.timeout)
            self._poll(min(0.5, max(deadline - time.monotonic(), 0.01)))
        return self.pending.pop(round_)


class ProcessWorker(_Worker):
    """A spawned generation process; see the module docstring."""

    def __init__(self, spec: dict, buffer: dict[str, torch.Tensor], timeout: float,
                 factory: Callable = HFSampler, accelerator=None, state_fn: Callable | None = None):
        import torch.multiprocessing as mp

        self.timeout, self.accelerator, self.state_fn = timeout, accelerator, state_fn
        ctx = mp.get_context("spawn")
        self.buffer = {k: v.detach().to("cpu", copy=True).share_memory_() for k, v in buffer.items()}
        self.requests, self.results, self.buffer_free = ctx.Queue(), ctx.Queue(), ctx.Event()
        self.buffer_free.set()
        self.pending: dict[int, tuple] = {}
        self.proc = ctx.Process(target=_worker_main, daemon=True, name="cleanalign-generation-worker",
                                args=(spec, factory, self.buffer, self.requests, self.results, self.buffer_free))
        self.proc.start()
        self.ready = False
        atexit.register(self.close)

    @classmethod
    def for_policy(cls, model, tokenizer, cfg: SamplingConfig, accelerator, timeout: float, threads: int = 0,
                   rng_state: torch.Tensor | None = None) -> "ProcessWorker":
        """A worker holding a copy of `model` (a PeftModel's copy is the base model with the adapters merged)."""
        from common.peft_utils import is_peft_model
        from common.sampling import unwrapped_for_generation
        from common.vllm_backend import policy_state

        with unwrapped_for_generation(accelerator, model) as m:
            base = m.get_base_model() if is_peft_model(m) else m
            param = next(base.parameters())
            spec = {"config": base.config, "generation_config": getattr(base, "generation_config", None),
                    "attn_implementation": getattr(base.config, "_attn_implementation", None) or "sdpa",
                    "dtype": param.dtype, "device": str(param.device), "tokenizer": tokenizer, "cfg": cfg,
                    "threads": threads or torch.get_num_threads(),
                    "rng_state": (get_rng(str(param.device)) if rng_state is None else rng_state).numpy()}
        state = policy_state(accelerator, model)
        return cls(spec, state, timeout, accelerator=accelerator,
                   state_fn=lambda mdl: policy_state(accelerator, mdl))

    # -- waiting, with the timeout, the worker's errors and its liveness checked
    def _poll(self, wait: float) -> None:
        try:
            msg = self.results.get(timeout=wait)
        except queue.Empty:
            if not self.proc.is_alive():
                try:  # its last words may have arrived just now
                    msg = self.results.get(timeout=1.0)
                except queue.Empty:
                    raise WorkerError(f"the generation worker (pid {self.proc.pid}) exited with code "
                                      f"{self.proc.exitcode} without reporting an error") from None
            else:
                return
        if msg[0] == "error":
            raise WorkerError(f"the generation worker failed; its traceback:\n{msg[1]}")
        if msg[0] == "ready":
            self.ready = True
        elif msg[0] == "batch":
            self.pending[msg[1]] = (_unpack(msg[2]), msg[3])

    def push(self, model, version: int):
        """Copy the policy's weights into the shared buffer (once the worker has read the previous ones)."""
        deadline = time.monotonic() + self.timeout
        while not self.buffer_free.is_set():
            if time.monotonic() > deadline:
                raise _timeout_error("take the previous weights", self.timeout)
            self._poll(0.05)
        self.buffer_free.clear()
        state = self.state_fn(model) if self.state_fn is not None else model
        with torch.no_grad():
            for k, v in self.buffer.items():
                v.copy_(state[k])
        self.requests.put(("weights", version))

    def request(self, round_: int, prompt_ids: list[list[int]], n: int):
        self.requests.put(("generate", round_, [list(p) for p in prompt_ids], n))

    def close(self):
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        self.proc = None
        if proc.is_alive():
            try:
                self.requests.put(("stop",))
            except Exception:
                pass
            proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        for q in (self.requests, self.results):
            q.cancel_join_thread()
            q.close()


class ThreadWorker(_Worker):
    """A generator (`generate(model, prompt_ids, n)` / `sync_weights(model)`, e.g. the vLLM server client) called from
    a background thread; see the module docstring."""

    def __init__(self, generator, accelerator=None, timeout: float = 600.0):
        self.generator, self.accelerator, self.timeout = generator, accelerator, timeout
        self.version, self.in_flight = None, 0
        self.requests: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.pending: dict[int, tuple] = {}
        self.thread = threading.Thread(target=self._loop, daemon=True, name="cleanalign-generation-thread")
        self.thread.start()

    def _loop(self):
        while True:
            msg = self.requests.get()
            if msg is None:
                return
            round_, prompt_ids, n, version = msg
            try:
                t0 = time.perf_counter()
                gen = self.generator.generate(None, prompt_ids, n)
                self.results.put(("batch", round_, gen, {"version": version, "seconds": time.perf_counter() - t0}))
            except BaseException:
                self.results.put(("error", traceback.format_exc()))
                return

    def _poll(self, wait: float):
        try:
            msg = self.results.get(timeout=wait)
        except queue.Empty:
            return
        if msg[0] == "error":
            raise WorkerError(f"the generation thread failed; its traceback:\n{msg[1]}")
        self.in_flight -= 1
        self.pending[msg[1]] = (msg[2], msg[3])

    def push(self, model, version: int):
        deadline = time.monotonic() + self.timeout
        while self.in_flight:  # the served weights must not change under a batch being sampled
            if time.monotonic() > deadline:
                raise _timeout_error("finish the batches in flight before a weight push", self.timeout)
            self._poll(0.05)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()  # no rank still sampling from the server
        self.generator.sync_weights(model)
        self.version = version

    def request(self, round_: int, prompt_ids: list[list[int]], n: int):
        self.in_flight += 1
        self.requests.put((round_, [list(p) for p in prompt_ids], n, self.version))

    def close(self):
        if self.thread is not None:
            self.requests.put(None)  # a thread stuck in a request is a daemon: it does not hold up the exit
            self.thread = None


# ----------------------------------------------------------------------------- the schedule
class AsyncRollout:
    """Which batch is requested when, and the staleness check; see the module docstring."""

    def __init__(self, worker, prompts_for: Callable[[int], list[list[int]]], n: int, steps_per_batch: int,
                 max_staleness: int, num_batches: int):
        if max_staleness < 0:
            raise ValueError(f"--max_staleness must be >= 0, got {max_staleness}")
        self.worker, self.prompts_for, self.n = worker, prompts_for, n
        self.mu, self.k, self.num_batches = steps_per_batch, max_staleness, num_batches
        self.next_round, self.pushed = None, None
        self.last_info: dict = {}

    def _request_allowed(self, model, version: int):
        while self.next_round < self.num_batches and self.next_round * self.mu - version <= self.k:
            if self.pushed != version:
                self.worker.push(model, version)
                self.pushed = version
            self.worker.request(self.next_round, self.prompts_for(self.next_round), self.n)
            self.next_round += 1

    def start(self, model, version: int):
        """Push the current weights (`version` optimizer steps) and request the first batches."""
        self.next_round = -(-version // self.mu)  # the first batch not trained yet
        self._request_allowed(model, version)

    def get(self, round_: int, version: int) -> tuple[Generation, dict]:
        """Generation batch `round_` (waits at most the timeout), with info: staleness, version, seconds (of
        sampling, in the worker) and wait (seconds the trainer waited)."""
        t0 = time.perf_counter()
        gen, info = self.worker.fetch(round_)
        info = {**info, "wait": time.perf_counter() - t0, "staleness": version - info["version"]}
        if not 0 <= info["staleness"] <= self.k:
            raise RuntimeError(f"generation batch {round_} was sampled with weights {info['version']} for training "
                               f"from version {version}: staleness {info['staleness']} outside [0, {self.k}] "
                               f"(--max_staleness)")
        self.last_info = info
        return gen, info

    def weights_updated(self, model, version: int):
        """After an optimizer step: push the weights if a batch may now be requested, and request it."""
        self._request_allowed(model, version)

    def close(self):
        self.worker.close()


def worker_rng_state(info: dict) -> torch.Tensor | None:
    """The worker's RNG state after the batch `info` came with (where the next batch's sampling starts)."""
    rng = info.get("rng_state")
    return None if rng is None else torch.from_numpy(np.asarray(rng)).clone()

