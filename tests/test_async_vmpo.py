"""Asynchronous generation in algos/vmpo.py (choices 13 and 14): the sequence-level truncated importance weights and
the corrected E-step and η dual by hand, the corrected E-step's target on samples of another sampler, bad flag
combinations failing before anything loads, and runs: max_staleness 0 draws the samples of the synchronous path,
max_staleness 1 keeps every step's staleness within the bound (the sampler lags only across an old-policy sync) and
resumes with the worker's RNG."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_params_close, read_metrics, run_script

from vmpo import Args, check_args, estep_weights, eta_dual_loss, select_top, sequence_log_is_weights


# ----------------------------------------------------------------------------- choice 14 by hand
def test_sequence_is_weights_sum_the_masked_token_log_ratios_and_truncate_at_the_cap():
    old = torch.tensor([[-1.0, -2.0], [-1.0, -9.0], [-0.2, -0.1]])
    sampler = torch.tensor([[-1.5, -2.0], [-0.5, 0.0], [-2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # row 1: one token, the second is padding
    log_w = sequence_log_is_weights(old, sampler, mask, cap=3.0)
    # log ratios 0.5, -0.5 (the padded token left out), 2.7 -> capped at log 3
    torch.testing.assert_close(log_w, torch.tensor([0.5, -0.5, math.log(3.0)]))
    assert torch.equal(sequence_log_is_weights(old, old, mask, 3.0), torch.zeros(3))  # on-policy: w = 1


def test_corrected_estep_weights_and_eta_dual_by_hand():
    adv = torch.tensor([1.0, 0.0, 2.0, -1.0])
    sel = select_top(adv, 0.75)  # the top 3: samples 0, 1, 2
    log_w = torch.tensor([0.5, -0.5, math.log(3.0), 0.7])
    eta, eps = 0.5, 0.1
    psi = estep_weights(adv, sel, eta, log_w)
    raw = [math.exp(0.5 + 2.0), math.exp(-0.5 + 0.0), 3.0 * math.exp(4.0)]  # w_i exp(A_i/η) on D
    torch.testing.assert_close(psi, torch.tensor([x / sum(raw) for x in raw] + [0.0]))
    # L_η = η ε + η [log Σ_D w e^{A/η} - log Σ_D w]; its gradient ε - KL(ψ ‖ q_D), q_D = w / Σ_D w
    w = [math.exp(0.5), math.exp(-0.5), 3.0]
    e = torch.tensor(eta, requires_grad=True)
    loss = eta_dual_loss(e, adv, sel, eps, log_w)
    assert loss.item() == pytest.approx(eta * eps + eta * (math.log(sum(raw)) - math.log(sum(w))), rel=1e-6)
    loss.backward()
    q = [x / sum(w) for x in w]
    kl = sum(p * math.log(p / qi) for p, qi in zip(psi[:3].tolist(), q))
    assert e.grad.item() == pytest.approx(eps - kl, abs=1e-5)
    # equal weights: exactly the uncorrected E-step, and the uncorrected L_η
    zeros = torch.zeros(4)
    assert torch.equal(estep_weights(adv, sel, eta, zeros), estep_weights(adv, sel, eta))
    torch.testing.assert_close(eta_dual_loss(torch.tensor(eta), adv, sel, eps, zeros),
                               eta_dual_loss(torch.tensor(eta), adv, sel, eps))


def test_corrected_estep_on_another_samplers_draws_has_the_old_policys_target():
    """A bandit of 3 completions: drawn from μ, ψ summed per completion approaches the V-MPO target q ∝ π_old e^{A/η}
    (every sample selected); uncorrected, it approaches μ e^{A/η} instead."""
    g = torch.Generator().manual_seed(0)
    pi_old, mu, a = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.0, 1.0, 2.0])
    eta, n = 1.0, 200_000
    y = torch.multinomial(mu, n, replacement=True, generator=g)
    log_w = (pi_old.log() - mu.log())[y]  # the largest ratio, 3, stays under the cap
    sel = torch.ones(n, dtype=torch.bool)
    per_completion = lambda psi: torch.zeros(3, dtype=psi.dtype).index_add_(0, y, psi)  # noqa: E731
    target = pi_old * (a / eta).exp() / (pi_old * (a / eta).exp()).sum()
    torch.testing.assert_close(per_completion(estep_weights(a[y], sel, eta, log_w)), target, atol=0.01, rtol=0)
    uncorrected = per_completion(estep_weights(a[y], sel, eta))
    assert (uncorrected - target).abs().max() > 0.2


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags,message", [
    ({"max_staleness": -1}, "--max_staleness"),
    ({"async_timeout": 0}, "--async_timeout"),
    ({"use_vllm": True}, "--vllm_mode server"),
    ({"tools": ["common.toy_agents:calc"]}, "--tools"),
    ({"environment": "common.toy_agents:GuessEnv"}, "--environment"),
    ({"data_mode": "preference"}, "--data_mode preference"),
    ({"data_mode": "prompt_completion_reward"}, "--async_generation"),
])
def test_bad_async_flags_fail_before_anything_loads(flags, message):
    with pytest.raises(ValueError, match=message):
        check_args(Args(async_generation=True, **flags))
    if "data_mode" in flags or "max_staleness" in flags or "async_timeout" in flags:
        check_args(Args(**flags))  # without --async_generation these are fine


def test_async_with_offline_data_detected_from_the_columns_fails_before_the_run_folder(tmp_path):
    """--data_mode auto finds completion columns only once the data is read: the run still stops before any model
    loads or anything is written, naming the flag."""
    from common import toy

    toy.make_dataset("add", "prompt_completion_reward", n=16, k=2).to_json(str(tmp_path / "pcr.jsonl"))
    out = tmp_path / "run"
    proc = run_script("vmpo.py", "--dataset_name", str(tmp_path / "pcr.jsonl"), "--async_generation", "True",
                      "--output_dir", str(out), check=False, timeout=300)
    assert proc.returncode != 0 and "--async_generation samples completions online" in proc.stderr, proc.stderr[-2000:]
    assert "--data_mode prompt_completion_reward" in proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- runs
RUN = ["--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "16", "--num_eval_prompts", "8",
       "--eval_steps", "0", "--log_completions_steps", "0", "--async_timeout", "300"]


def test_async_staleness_0_draws_the_samples_of_the_sync_path(tmp_path, toy_policy):
    run_script("vmpo.py", *RUN, "--output_dir", str(tmp_path / "sync"))
    run_script("vmpo.py", *RUN, "--async_generation", "True", "--max_staleness", "0",
               "--output_dir", str(tmp_path / "k0"))
    sync = [r for r in read_metrics(tmp_path / "sync") if r["step"] > 0]
    k0 = [r for r in read_metrics(tmp_path / "k0") if r["step"] > 0]
    assert len(sync) == len(k0) == 2
    for a, b in zip(sync, k0):  # the worker starts from the trainer's RNG and sampler weights: the very same samples
        assert a["vmpo/rewards_mean"] == b["vmpo/rewards_mean"]
        assert a["completions/mean_length"] == b["completions/mean_length"]
        for m in ("vmpo/loss", "vmpo/policy_loss", "vmpo/kl_mean", "vmpo/eta_loss"):  # weights w = exp(~0)
            assert a[m] == pytest.approx(b[m], abs=5e-6), m
        # the worker's log-probs are the trainer's π_old of the same weights; no step lagged
        assert b["async/staleness"] == 0 and b["sampling/sampling_logp_difference/max"] < 1e-4
        assert b["vmpo/is_weight_min"] == pytest.approx(1.0, abs=1e-4) and b["vmpo/is_clipped_fraction"] == 0
        assert b["async/sampling_seconds"] > 0 and "async/staleness" not in a
    assert_params_close(tmp_path / "sync", tmp_path / "k0", atol=1e-5)


@pytest.mark.slow
def test_async_staleness_1_lags_only_across_an_old_policy_sync_and_resumes(tmp_path, toy_policy):
    """max_staleness 1, kl old_policy, old-policy sync every 2 steps: step s (0-based) is sampled by the sampler
    after s - 1 optimizer steps (s >= 1), the synchronous schedule's after s. The sampler is the snapshot, which
    changes only at the syncs after steps 2 and 4 (done), so only step s = 2 (logged 3) has a sampler that is not
    π_old: importance weights != 1 there, exactly 1 (up to float) on the others. Resume after step 2 (checkpoint
    holds the worker RNG): the same steps before the cut, staleness ramping up again after it; with max_staleness
    0 the resumed run repeats the uninterrupted one."""
    base = [*RUN, "--max_steps", "4", "--save_steps", "2", "--async_generation", "True", "--kl_estimator",
            "old_policy", "--old_policy_sync_steps", "2", "--learning_rate", "1e-3"]
    for k in ("0", "1"):
        common = [*base, "--max_staleness", k]
        run_script("vmpo.py", *common, "--output_dir", str(tmp_path / f"full{k}"))
        run_script("vmpo.py", *common, "--output_dir", str(tmp_path / f"cut{k}"), "--max_steps", "2")
        run_script("vmpo.py", *common, "--output_dir", str(tmp_path / f"cut{k}"), "--resume_from", "auto")
    train = lambda name: [r for r in read_metrics(tmp_path / name) if r["step"] > 0]  # noqa: E731
    full0, cut0, full1, cut1 = train("full0"), train("cut0"), train("full1"), train("cut1")
    assert [r["step"] for r in cut0] == [1, 2, 3, 4]
    assert [r["vmpo/rewards_mean"] for r in full0] == [r["vmpo/rewards_mean"] for r in cut0]
    assert full0[3]["vmpo/loss"] == pytest.approx(cut0[3]["vmpo/loss"], abs=1e-6)
    assert_params_close(tmp_path / "full0", tmp_path / "cut0", atol=1e-6)

    assert [r["async/staleness"] for r in full1] == [0, 1, 1, 1]  # the bound, per step
    assert [r["vmpo/old_policy_syncs"] for r in full1] == [0, 1, 1, 2]
    for i in (0, 1, 3):  # the sampler the worker held is the snapshot the synchronous schedule samples from
        assert full1[i]["vmpo/is_weight_min"] == pytest.approx(1.0, abs=1e-4), i
        assert full1[i]["sampling/sampling_logp_difference/max"] < 1e-4, i
    lagged = full1[2]  # sampled by the snapshot before the sync after step 2
    assert lagged["sampling/sampling_logp_difference/mean"] > 1e-3
    assert abs(lagged["vmpo/is_weight_mean"] - 1.0) > 1e-3
    assert full1[0]["vmpo/rewards_mean"] == full0[0]["vmpo/rewards_mean"]  # step 1: the initial weights either way
    assert [r["async/staleness"] for r in cut1] == [0, 1, 0, 1]  # the resumed worker starts from the checkpoint
    assert [r["vmpo/rewards_mean"] for r in full1[:2]] == [r["vmpo/rewards_mean"] for r in cut1[:2]]
    assert all(math.isfinite(r["vmpo/loss"]) for r in full1 + cut1)

