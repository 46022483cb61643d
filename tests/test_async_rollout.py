"""Asynchronous generation (common/async_rollout.py, grpo.py detail 12): the staleness schedule and the weight version
each batch is sampled with, weights through the worker process's shared buffer, a hanging worker trips the timeout,
a worker exception surfaces with its traceback, the truncated importance-sampling weights, and grpo runs: async with
max_staleness 0 draws the same samples as the synchronous path, max_staleness 1 trains on batches one step old."""

from __future__ import annotations

import math
import time

import pytest
import torch

from conftest import assert_params_close, load_params, read_metrics, run_script  # noqa: F401

from common.async_rollout import AsyncRollout, ProcessWorker, ThreadWorker, WorkerError, WorkerTimeout
from common.sampling import Generation


def _generation(prompt_ids, n, tag: str) -> Generation:
    N = len(prompt_ids) * n
    return Generation(torch.ones(N, 2, dtype=torch.long), torch.ones(N, 2, dtype=torch.long),
                      torch.ones(N, dtype=torch.bool), [tag] * N, torch.zeros(N, 2))


class VersionedGenerator:
    """A generator whose 'weights' are a version number: each batch says which one sampled it."""

    def __init__(self):
        self.weights = None

    def sync_weights(self, model):
        self.weights = model["version"]

    def generate(self, model, prompt_ids, n=1, greedy=False):
        time.sleep(0.01)  # still sampling while the trainer moves on
        return _generation(prompt_ids, n, str(self.weights))


def drive(ro: AsyncRollout, mu: int, num_batches: int, make_model) -> list[tuple[int, int]]:
    """The trainer's side: fetch each batch, take mu optimizer steps on it; returns (staleness, version the
    sampler really held) per batch."""
    version, seen = 0, []
    ro.start(make_model(0), 0)
    for j in range(num_batches):
        gen, info = ro.get(j, version)
        seen.append((info["staleness"], int(gen.texts[0])))
        assert int(gen.texts[0]) == info["version"] == version - info["staleness"]
        for _ in range(mu):
            version += 1
            ro.weights_updated(make_model(version), version)
    return seen


@pytest.mark.parametrize("mu,k", [(1, 0), (1, 1), (1, 2), (2, 1), (2, 3)])
def test_max_staleness_bounds_the_weight_version_of_every_batch(mu, k):
    ro = AsyncRollout(ThreadWorker(VersionedGenerator(), timeout=10), lambda r: [[r]], 2, mu, k, num_batches=6)
    try:
        seen = drive(ro, mu, 6, lambda v: {"version": v})
    finally:
        ro.close()
    # batch j (trained from version j*mu) is requested as soon as j*mu - v <= k: staleness min(j*mu, k)
    assert [s for s, _ in seen] == [min(j * mu, k) for j in range(6)]
    assert [w for _, w in seen] == [j * mu - min(j * mu, k) for j in range(6)]


# ----------------------------------------------------------------------------- the worker process
class BufferSampler:
    """Worker-side sampler whose weights are one shared tensor holding the version: what it samples says which
    weights it read from the shared buffer. A prompt [-1] raises inside the worker."""

    def __init__(self, spec, buffer):
        self.w = torch.zeros(1)

    def load(self, buffer):
        self.w.copy_(buffer["w"])

    def generate(self, prompt_ids, n):
        if prompt_ids[0] == [-1]:
            raise ValueError("cannot sample prompt -1")
        return _generation(prompt_ids, n, str(int(self.w.item())))


class HangingSampler(BufferSampler):
    def generate(self, prompt_ids, n):
        time.sleep(3600)


def test_worker_process_samples_with_the_pushed_weights_and_surfaces_its_exception():
    spec = {"threads": 1}
    worker = ProcessWorker(spec, {"w": torch.zeros(1)}, timeout=120, factory=BufferSampler)
    ro = AsyncRollout(worker, lambda r: [[-1]] if r == 4 else [[r]], 2, 1, 1, num_batches=5)
    try:
        seen = drive(ro, 1, 4, lambda v: {"w": torch.tensor([float(v)])})
        assert seen == [(0, 0), (1, 0), (1, 1), (1, 2)]  # the weights really went through the shared buffer
        with pytest.raises(WorkerError, match=r"(?s)traceback.*in generate.*ValueError: cannot sample prompt -1"):
            ro.get(4, 4)
    finally:
        ro.close()
    assert worker.proc is None


def test_hanging_worker_trips_the_timeout_naming_the_flag():
    worker = ProcessWorker({"threads": 1}, {"w": torch.zeros(1)}, timeout=3, factory=HangingSampler)
    proc = worker.proc
    ro = AsyncRollout(worker, lambda r: [[r]], 2, 1, 1, num_batches=3)
    try:
        ro.start({"w": torch.zeros(1)}, 0)
        t0 = time.monotonic()
        with pytest.raises(WorkerTimeout, match="--async_timeout 3"):
            ro.get(0, 0)
        assert time.monotonic() - t0 < 30
    finally:
        ro.close()
    assert not proc.is_alive()  # shut down, not left behind


# ----------------------------------------------------------------------------- the off-policy correction
def test_truncated_is_weights_from_the_sampler_logps_by_hand():
    import grpo

    old = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.5, -0.5, -2.0]])  # ratios e^0.5, e^-1.5, e^1.5 (the last above the cap)
    w = grpo.truncated_is_weights(old, sampler, cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-1.5), 3.0]]))
    assert torch.equal(grpo.truncated_is_weights(sampler, sampler, 3.0), torch.ones(1, 3))  # on-policy: 1


def test_recorded_sampler_logps_are_the_sampling_distribution_and_the_draws_unchanged(toy_policy):
    """The worker's sampler: warpers as explicit processors + LogpRecorder draw exactly what HF generate draws with
    the same settings, and record the log-probs a full forward gives at that temperature."""
    from dataclasses import replace

    from common import data, model as model_utils
    from common.async_rollout import LogpRecorder, sampling_warpers
    from common.generation import HFGenerator
    from common.sampling import SamplingConfig

    tok = model_utils.load_tokenizer(str(toy_policy))
    m = model_utils.load_causal_lm(str(toy_policy), tok).eval()
    prompts = data.tokenize(tok, ["12+7=", "3+45=", "100+1="])
    cfg = SamplingConfig(temperature=0.7, max_new_tokens=6)
    torch.manual_seed(3)
    ref = HFGenerator(tok, cfg).generate(m, prompts, 4)
    torch.manual_seed(3)
    rec = LogpRecorder()
    gen = HFGenerator(tok, replace(cfg, temperature=1.0)).generate(m, prompts, 4,
                                                                  logits_processor=[*sampling_warpers(cfg), rec])
    assert torch.equal(gen.completion_ids, ref.completion_ids)
    lp = rec.logps(gen.completion_ids) * gen.completion_mask
    comps = [c[:int(k)].tolist() for c, k in zip(gen.completion_ids, gen.completion_mask.sum(1))]
    b = data.batch_prompt_completion([p for p in prompts for _ in range(4)], comps, tok.pad_token_id)
    T = b["completion_mask"].shape[1]
    with torch.no_grad():
        full = model_utils.completion_logps(m, b["input_ids"], b["attention_mask"], T, 0.7)
    torch.testing.assert_close(lp[:, :T], full * b["completion_mask"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- grpo runs
RUN = ["--max_steps", "3", "--per_device_train_batch_size", "16", "--num_generations", "4", "--eval_steps", "0",
       "--log_completions_steps", "0", "--logging_steps", "1", "--async_timeout", "300"]


def test_grpo_async_staleness_0_draws_the_samples_of_the_sync_path(tmp_path, toy_policy):
    run = [*RUN, "--max_steps", "2"]
    run_script("grpo.py", *run, "--output_dir", str(tmp_path / "sync"))
    run_script("grpo.py", *run, "--async_generation", "True", "--max_staleness", "0",
               "--output_dir", str(tmp_path / "k0"))
    sync, k0 = read_metrics(tmp_path / "sync"), read_metrics(tmp_path / "k0")
    assert len(sync) == len(k0) == 2
    for a, b in zip(sync, k0):  # the worker starts from the trainer's RNG and weights: the very same samples
        assert a["reward"] == b["reward"] and a["completions/mean_length"] == b["completions/mean_length"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)  # IS weights exp(~0) = 1
        # the worker's log-probs are the trainer's π_old of the same weights
        assert b["async/staleness"] == 0 and b["sampling/sampling_logp_difference/max"] < 1e-4
    assert_params_close(tmp_path / "sync", tmp_path / "k0", atol=1e-5)


@pytest.mark.slow
def test_grpo_async_staleness_1_and_resume(tmp_path, toy_policy):
    """max_staleness 1 trains on batches sampled one step behind. Resume, max_staleness 0: 4 steps in one go ==
    2 steps, stop, resume (weights, optimizer and the worker's RNG restored).
    max_staleness 1: a resumed run continues; its first batch after the resume is sampled by the checkpoint's
    weights (staleness 0), as at a start."""
    for k in ("0", "1"):
        common = [*RUN, "--max_steps", "4", "--save_steps", "2", "--async_generation", "True", "--max_staleness", k]
        run_script("grpo.py", *common, "--output_dir", str(tmp_path / f"full{k}"))
        run_script("grpo.py", *common, "--output_dir", str(tmp_path / f"cut{k}"), "--max_steps", "2")
        run_script("grpo.py", *common, "--output_dir", str(tmp_path / f"cut{k}"), "--resume_from", "auto")
    full, cut = read_metrics(tmp_path / "full0"), read_metrics(tmp_path / "cut0")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert [r["reward"] for r in full] == [r["reward"] for r in cut]
    assert full[3]["loss"] == pytest.approx(cut[3]["loss"], abs=1e-7)
    assert_params_close(tmp_path / "full0", tmp_path / "cut0", atol=1e-7)
    full, cut = read_metrics(tmp_path / "full1"), read_metrics(tmp_path / "cut1")
    assert [r["async/staleness"] for r in full] == [0, 1, 1, 1]
    assert full[0]["reward"] == read_metrics(tmp_path / "full0")[0]["reward"]  # batch 0: the initial weights
    # later batches were sampled one step behind the trainer: the sampler's log-probs differ from π_old
    assert all(r["sampling/sampling_logp_difference/mean"] > 1e-4 for r in full[1:])
    before, after = load_params(toy_policy), load_params(tmp_path / "full1")
    assert any(not torch.equal(before[k_], after[k_]) for k_ in before)
    assert [r["async/staleness"] for r in cut] == [0, 1, 0, 1]
    assert [r["reward"] for r in full[:2]] == [r["reward"] for r in cut[:2]]


@pytest.mark.parametrize("flags,message", [
    ({"max_staleness": -1}, "--max_staleness"),
    ({"async_timeout": 0}, "--async_timeout"),
    ({"use_vllm": True}, "--vllm_mode server"),
    ({"tools": ["common.toy_agents:calc"]}, "--tools"),
])
def test_bad_async_flags_fail_before_anything_loads(flags, message):
    import grpo

    with pytest.raises(ValueError, match=message):
        grpo.check_args(grpo.Args(async_generation=True, **flags))
