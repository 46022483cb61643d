"""GMPO: the geometric-mean objective against GRPO/PPO/GSPO on hand-built tensors, the log-space clip, runs.
Test names point at the numbered implementation details of algos/gmpo.py's docstring."""

from __future__ import annotations

import math

import pytest
import torch

import json

from conftest import load_params, multiprocess_matches_single, read_metrics, run_script

import gmpo
import grpo


def _logps(seed=0, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)[:B]
    old = (torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
           + 0.3 * torch.randn(B, T, generator=g)).detach()
    return logits, targets, mask, old


def _lp(logits, targets):
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]


def test_defaults_match_the_paper():
    assert gmpo.Args.epsilon == 0.4 and gmpo.Args.epsilon_high is None and gmpo.Args.beta == 0.0


def test_one_token_without_clipping_is_grpo_ratio_term():
    lp = torch.tensor([[-0.5], [-2.0], [-1.0]])
    old = torch.tensor([[-1.0], [-1.5], [-1.0]])
    adv = torch.tensor([1.5, -0.7, 0.3])
    m = torch.ones(3, 1)
    loss, _ = gmpo.gmpo_loss(lp, old, adv, m, 1e9, 1e9)
    ratio = torch.exp(lp - old)
    expected = grpo.aggregate(grpo.clipped_surrogate(ratio, adv, 1e9, 1e9), m, "grpo")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, (-adv * ratio[:, 0]).mean())


@pytest.mark.parametrize("eps", [0.2, 0.4])
def test_one_token_equals_ppo_clip_in_exp_range(eps):
    deltas = torch.linspace(-1.0, 1.0, 21)
    for a in (1.3, -0.8):
        lp = deltas[:, None].clone().requires_grad_(True)
        old = torch.zeros(21, 1)
        adv = torch.full((21,), a)
        per_seq = []
        for i in range(21):  # one sequence at a time: the loss of a one-token sequence
            loss, _ = gmpo.gmpo_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], torch.ones(1, 1), eps, eps)
            per_seq.append(loss)
        got = torch.stack(per_seq)
        rho = torch.exp(deltas)
        ppo = -torch.min(rho * a, rho.clamp(math.exp(-eps), math.exp(eps)) * a)
        torch.testing.assert_close(got, ppo)
        # same gradients too: zero exactly where PPO's clip is active
        g = torch.autograd.grad(got.sum(), lp)[0][:, 0]
        rho_ = rho.clone().requires_grad_(True)
        ppo_ = -torch.min(rho_ * a, rho_.clamp(math.exp(-eps), math.exp(eps)) * a)
        g_ppo = torch.autograd.grad(ppo_.sum(), rho_)[0] * rho  # chain rule through ρ = exp(δ)
        torch.testing.assert_close(g, g_ppo)


def test_detail_3_log_space_clip_is_one_sided_by_sign():
    lp = torch.tensor([[0.6, -0.6, 0.1]])
    old = torch.zeros(1, 3)
    pos = gmpo.clipped_log_ratio(lp, old, torch.tensor([1.0]), 0.4, 0.4)
    neg = gmpo.clipped_log_ratio(lp, old, torch.tensor([-1.0]), 0.4, 0.4)
    torch.testing.assert_close(pos, torch.tensor([[0.4, -0.6, 0.1]]))  # A > 0: only a too-large ratio is cut
    torch.testing.assert_close(neg, torch.tensor([[0.6, -0.4, 0.1]]))  # A < 0: only a too-small ratio is cut
    # the clip acts per token before the mean: w = exp(mean of clipped)
    w = gmpo.geometric_mean_ratio(pos, torch.tensor([[1.0, 1.0, 1.0]]))
    assert w.item() == pytest.approx(math.exp((0.4 - 0.6 + 0.1) / 3))
    # asymmetric range
    hi = gmpo.clipped_log_ratio(torch.tensor([[0.6]]), torch.zeros(1, 1), torch.tensor([1.0]), 0.4, 0.5)
    assert hi.item() == pytest.approx(0.5)


def test_log_clip_counts():
    d = torch.tensor([[-0.5, 0.5, 0.0, -0.9], [-0.5, 0.5, 0.45, 0.9]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    c = gmpo.log_clip_counts(d, torch.tensor([-1.0, 1.0]), m, 0.4, 0.4)
    # row 0 (A<0): -0.5 counts (the -0.9 is padding); row 1 (A>0): 0.5, 0.45 and 0.9 count
    assert (c["low"].item(), c["high"].item(), c["region"].item()) == (1, 3, 4)


def test_wide_clip_equals_unclipped_gspo_any_length():
    logits, targets, mask, old = _logps()
    lp = _lp(logits, targets)
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    loss, _ = gmpo.gmpo_loss(lp, old, adv, mask, 1e9, 1e9)
    gspo = grpo.importance_ratio(lp, old, mask, "sequence")[:, 0]
    torch.testing.assert_close(loss, (-adv * gspo).mean())


def test_detail_6_on_policy_gradient_equals_grpo_seq_mean_token_mean():
    logits, targets, mask, _ = _logps()
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    lp = _lp(logits, targets)
    g_gmpo = torch.autograd.grad(gmpo.gmpo_loss(lp, lp.detach(), adv, mask, 0.4, 0.4)[0], logits)[0]
    lp = _lp(logits, targets)
    ratio = torch.exp(lp - lp.detach())
    g_grpo = torch.autograd.grad(grpo.aggregate(grpo.clipped_surrogate(ratio, adv, 0.2, 0.2), mask, "grpo"), logits)[0]
    torch.testing.assert_close(g_gmpo, g_grpo)


def test_detail_5_kl_term_is_not_multiplied_by_the_ratio():
    logits, targets, mask, old = _logps()
    lp = _lp(logits, targets).detach()
    ref = old - 0.2
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    base, _ = gmpo.gmpo_loss(lp, old, adv, mask, 0.4, 0.4)
    with_kl, kl = gmpo.gmpo_loss(lp, old, adv, mask, 0.4, 0.4, beta=0.1, ref_logps=ref)
    per_seq = (grpo.k3(lp, ref) * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(with_kl - base, 0.1 * per_seq.mean())
    assert (kl >= 0).all()


# ----------------------------------------------------------------------------- tier 2: runs
def test_run_off_policy_with_kl_conversational(tmp_path, toy_policy):
    rf = tmp_path / "digits.py"  # a reward that varies within a group, so the update cannot be zero
    rf.write_text("def digits(completions, **kw):\n"
                  "    return [float(sum(map(ord, c[-1]['content'])) % 5) for c in completions]\n")
    out = tmp_path / "run"
    run_script("gmpo.py", "--reward_funcs", "add", f"{rf}:digits", "--reward_weights", "1.0", "0.1", "--max_steps", "2", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
               "--num_generations", "4", "--num_iterations", "2", "--beta", "0.1", "--logging_steps", "1",
               "--eval_steps", "2", "--num_eval_prompts", "16", "--dataset_name", "toy:add:conversational",
               "--output_dir", str(out))
    recs = read_metrics(out)
    assert recs[0]["step"] == 0 and "eval/gold_reward" in recs[0]
    first, last = recs[1], recs[-1]
    for k in ("reward", "reward_std", "rewards/add_exact/mean", "frac_reward_zero_std", "completions/mean_length",
              "completions/clipped_ratio", "num_tokens"):
        assert k in first and math.isfinite(first[k]), k
    for k in ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
              "log_ratio/min", "log_ratio/max", "learning_rate", "eval/gold_reward"):
        assert k in last and math.isfinite(last[k]), k
    assert first["log_ratio/min"] == first["log_ratio/max"] == 0.0  # first pass over a batch: on-policy
    assert last["kl"] >= 0
    before, after = load_params(toy_policy), load_params(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_reward_weights_fail_early(tmp_path):
    proc = run_script("gmpo.py", "--reward_weights", "1.0", "2.0", "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "--reward_weights has 2 values but there are 1 reward sources" in proc.stderr
    assert "Loading weights" not in proc.stderr


def test_detail_2_unscored_samples_are_left_out(tmp_path, toy_policy):
    """Every other sample unscored (None), the others scored alike within a group: NaN-aware, every group carries
    no signal (frac_reward_zero_std 1, every advantage 0, the update is zero) and the reward is the scored mean."""
    rf = tmp_path / "by_prompt.py"
    rf.write_text("def by_prompt(prompts, completions, **kw):\n"
                  "    return [None if i % 2 else float(len(p)) for i, p in enumerate(prompts)]\n")
    out = tmp_path / "run"
    run_script("gmpo.py", "--reward_funcs", f"{rf}:by_prompt", "--max_steps", "1", "--per_device_train_batch_size",
               "16", "--num_generations", "4", "--logging_steps", "1", "--eval_steps", "0",
               "--log_completions_steps", "1", "--num_completions_to_log", "16", "--output_dir", str(out))
    last = read_metrics(out)[-1]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    scored = [x["by_prompt"] for x in samples if x["by_prompt"] is not None]
    assert last["frac_reward_zero_std"] == 1.0 and all(x["advantage"] == 0.0 for x in samples)
    assert len(scored) == 8 and last["reward"] == pytest.approx(sum(scored) / 8)
    before, after = load_params(toy_policy), load_params(out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # A = 0 everywhere: no update


def test_detail_1_two_processes_with_accumulation_match_one_process(tmp_path, toy_policy):
    """1 process x 16 completions == 2 processes x 4 micro-batches of 2 (processes and accumulation at once)."""
    multiprocess_matches_single(tmp_path, "gmpo.py", ["--num_iterations", "2"], batch_two=2,
                                extra_two=["--gradient_accumulation_steps", "4"])


@pytest.mark.slow
def test_default_run_raises_heldout_gold_reward(tmp_path, toy_policy):
    out = tmp_path / "run"
    run_script("gmpo.py", "--output_dir", str(out), timeout=1800)
    recs = [r for r in read_metrics(out) if r.get("eval/gold_reward") is not None]
    assert recs[-1]["eval/gold_reward"] >= recs[0]["eval/gold_reward"] + 0.05
