"""online_dpo.py detail 12, asynchronous generation: with max_staleness 0 the worker draws the synchronous path's
samples (same scores, losses and weights), with max_staleness 1 each step trains on pairs sampled one step behind
(staleness logged per step and never above the bound), resume restores the worker's RNG, bad flags fail before
anything loads."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_params_close, load_params, read_metrics, run_script

RUN = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_steps", "0", "--log_completions_steps", "0",
       "--logging_steps", "1", "--learning_rate", "1e-3", "--async_timeout", "300"]
SAME = ("objective/scores", "train/gold_reward", "completions/mean_length", "val/contain_eos_token")


def test_async_staleness_0_equals_sync_and_staleness_1_lags_one_step(tmp_path, toy_policy, toy_rm):
    run_script("online_dpo.py", *RUN, "--output_dir", str(tmp_path / "sync"))
    for k in ("0", "1"):
        run_script("online_dpo.py", *RUN, "--async_generation", "True", "--max_staleness", k,
                   "--output_dir", str(tmp_path / f"k{k}"))
    sync, k0, k1 = (read_metrics(tmp_path / n) for n in ("sync", "k0", "k1"))
    assert len(sync) == len(k0) == len(k1) == 2
    for a, b in zip(sync, k0):  # the worker starts from the trainer's RNG and weights: the very same samples
        assert all(a[m] == b[m] for m in SAME), a["step"]
        assert a["loss/dpo"] == pytest.approx(b["loss/dpo"], abs=1e-6)
        assert a["logps/chosen"] == pytest.approx(b["logps/chosen"], abs=1e-5)
        # the worker's log-probs are the trainer's own of the same weights; staleness 0
        assert b["async/staleness"] == 0 and b["sampling/sampling_logp_difference/max"] < 1e-4
    assert_params_close(tmp_path / "sync", tmp_path / "k0", atol=1e-6)
    # max_staleness 1: step 1's pairs come from the initial weights (as in sync), step 2's from them too (one behind)
    assert [r["async/staleness"] for r in k1] == [0, 1]
    assert all(k1[0][m] == sync[0][m] for m in SAME) and k1[0]["loss/dpo"] == pytest.approx(sync[0]["loss/dpo"])
    assert k1[1]["sampling/sampling_logp_difference/mean"] > 1e-3  # sampled by other weights than it trains
    assert "sampling/sampling_logp_difference/mean" not in sync[0]  # the sync HF path has no sampler log-probs
    before, after = load_params(toy_policy), load_params(tmp_path / "k1")
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow
def test_async_resume_restores_the_worker_rng(tmp_path, toy_policy, toy_rm):
    """max_staleness 0: 4 steps in one go == 2 steps, stop, resume (weights, optimizer and the worker's RNG state
    from the checkpoint). max_staleness 1: the resumed run's first step is sampled by the checkpoint's weights
    (staleness 0, as at a start), then one step behind again."""
    for k in ("0", "1"):
        common = [*RUN, "--max_steps", "4", "--save_steps", "2", "--async_generation", "True", "--max_staleness", k]
        run_script("online_dpo.py", *common, "--output_dir", str(tmp_path / f"full{k}"))
        run_script("online_dpo.py", *common, "--output_dir", str(tmp_path / f"cut{k}"), "--max_steps", "2")
        run_script("online_dpo.py", *common, "--output_dir", str(tmp_path / f"cut{k}"), "--resume_from", "auto")
    full, cut = read_metrics(tmp_path / "full0"), read_metrics(tmp_path / "cut0")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(full, cut):
        assert all(a[m] == b[m] for m in SAME) and a["loss/dpo"] == pytest.approx(b["loss/dpo"], abs=1e-7)
    assert_params_close(tmp_path / "full0", tmp_path / "cut0", atol=1e-7)
    full, cut = read_metrics(tmp_path / "full1"), read_metrics(tmp_path / "cut1")
    assert [r["async/staleness"] for r in full] == [0, 1, 1, 1]
    assert [r["async/staleness"] for r in cut] == [0, 1, 0, 1]
    assert all(a[m] == b[m] for a, b in zip(full[:2], cut[:2]) for m in SAME)


@pytest.mark.parametrize("flags,message", [
    ({"max_staleness": -1}, "--max_staleness"),
    ({"async_timeout": 0}, "--async_timeout"),
    ({"async_worker_threads": -2}, "--async_worker_threads"),
    ({"use_vllm": True}, "--vllm_mode server"),
])
def test_bad_async_flags_fail_before_anything_loads(flags, message):
    from online_dpo import Args, check_args

    with pytest.raises(ValueError, match=message):
        check_args(Args(async_generation=True, **flags))


def test_split_rows_cuts_a_step_into_its_micro_batches():
    """The worker samples a step's micro-batches in one call; each micro-batch gets its rows, full width."""
    from common.sampling import Generation
    from online_dpo import split_rows

    ids = torch.arange(12).view(6, 2)
    gen = Generation(ids, torch.ones(6, 2, dtype=torch.long), torch.tensor([True, False] * 3), list("abcdef"),
                     -ids.float())
    a, b = split_rows(gen, [4, 2])
    assert torch.equal(a.completion_ids, ids[:4]) and torch.equal(b.completion_ids, ids[4:])
    assert a.texts == list("abcd") and b.texts == list("ef") and b.terminated.tolist() == [True, False]
    assert torch.equal(b.sampler_logps, -ids[4:].float())
    with pytest.raises(AssertionError):
        split_rows(gen, [4, 4])
