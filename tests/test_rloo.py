"""RLOO: leave-one-out baseline identities, the KL-shaped reward, the sequence-level clip, runs.
Test names point at the numbered implementation details of algos/rloo.py's docstring."""

from __future__ import annotations

import math

import pytest
import torch

import json

from conftest import load_params, multiprocess_matches_single, read_metrics, run_script

import rloo


def test_baseline_identity_and_zero_sum():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, generator=g)
    for k in (2, 3, 4, 6):
        a = rloo.leave_one_out_advantages(r, k)
        grouped = r.view(-1, k)
        by_hand = torch.stack([grouped[:, i] - (grouped.sum(1) - grouped[:, i]) / (k - 1) for i in range(k)], 1)
        torch.testing.assert_close(a.view(-1, k), by_hand)
        identity = k / (k - 1) * (grouped - grouped.mean(1, keepdim=True))
        torch.testing.assert_close(a.view(-1, k), identity)
        assert a.view(-1, k).sum(1).abs().max() < 1e-5


def test_two_samples_give_the_difference():
    a = rloo.leave_one_out_advantages(torch.tensor([1.0, 0.25, 3.0, 3.0]), 2)
    torch.testing.assert_close(a, torch.tensor([0.75, -0.75, 0.0, 0.0]))


def test_detail_2_unscored_samples_are_left_out_of_the_baselines():
    r = torch.tensor([1.0, float("nan"), 0.0, 0.5, float("nan"), float("nan"), 2.0, 1.0])
    a = rloo.leave_one_out_advantages(r, 4)
    torch.testing.assert_close(a[:4], torch.tensor([1.0 - 0.25, 0.0, 0.0 - 0.75, 0.5 - 0.5]))
    torch.testing.assert_close(a[4:], torch.tensor([0.0, 0.0, 1.0, -1.0]))
    assert not torch.isnan(rloo.leave_one_out_advantages(torch.full((4,), float("nan")), 4)).any()


def test_detail_4_normalized_advantages():
    a = rloo.leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0]), 2, normalize=True)
    assert a.mean().abs() < 1e-6 and a.std().item() == pytest.approx(1.0, abs=1e-3)


def test_detail_4_normalization_leaves_unscored_samples_out():
    """The z-score is over the samples that have a baseline: they get mean 0 and std 1, the others keep A = 0."""
    r = torch.tensor([1.0, float("nan"), 0.0, 4.0, 5.0, float("nan"), float("nan"), float("nan")])
    a = rloo.leave_one_out_advantages(r, 4, normalize=True)
    has = torch.tensor([True, False, True, True, False, False, False, False])  # group 2: one scored sample
    raw = rloo.leave_one_out_advantages(r, 4)[has]
    torch.testing.assert_close(a[has], (raw - raw.mean()) / (raw.std() + 1e-4))
    assert a[has].std().item() == pytest.approx(1.0, abs=1e-3) and torch.equal(a[~has], torch.zeros(5))


def test_detail_3_kl_shaped_reward_is_a_k1_sequence_sum():
    old = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-0.5, -1.0, -0.5]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    shaped, kl = rloo.kl_shaped_rewards(torch.tensor([1.0, 0.0]), old, ref, m, 0.1)
    torch.testing.assert_close(kl, torch.tensor([0.5 - 1.0, 0.5]))
    torch.testing.assert_close(shaped, torch.tensor([1.0 + 0.05, -0.05]))
    same, zero = rloo.kl_shaped_rewards(torch.tensor([1.0, 0.0]), None, None, m, 0.0)
    assert torch.equal(same, torch.tensor([1.0, 0.0])) and torch.equal(zero, torch.zeros(2))


def test_detail_5_sequence_ratio_is_a_sum_and_clip():
    lp = torch.tensor([[-1.0, -1.0, -3.0]])
    old = torch.tensor([[-1.2, -1.1, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert rloo.sequence_ratio(lp, old, m).item() == pytest.approx(math.exp(0.3))  # not exp(mean) = exp(0.15)
    loss, ratio = rloo.rloo_loss(lp, old, torch.tensor([2.0]), m, 0.2, 0.2)
    assert loss.item() == pytest.approx(-1.2 * 2.0)  # ρ = 1.35 > 1.2 with A > 0: clipped
    loss, _ = rloo.rloo_loss(lp, old, torch.tensor([-2.0]), m, 0.2, 0.2)
    assert loss.item() == pytest.approx(math.exp(0.3) * 2.0)  # A < 0: the unclipped term is the min


def test_detail_5_on_policy_gradient_is_reinforce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, generator=g, requires_grad=True)
    targets = torch.randint(0, 6, (3, 4), generator=g)
    m = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 0.5])
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    loss, ratio = rloo.rloo_loss(lp, lp.detach(), adv, m, 0.2, 0.2)
    assert torch.equal(ratio, torch.ones(3))
    got = torch.autograd.grad(loss, logits)[0]
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    expected = torch.autograd.grad(-(adv * (lp * m).sum(1)).mean(), logits)[0]
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- tier 2: runs
def test_run_with_kl_and_reuse(tmp_path, toy_policy):
    rf = tmp_path / "chars.py"  # a reward that varies within a group, so the update cannot be zero
    rf.write_text("def chars(completions, **kw):\n    return [float(sum(map(ord, c)) % 5) for c in completions]\n")
    out = tmp_path / "run"
    run_script("rloo.py", "--reward_funcs", "add", f"{rf}:chars", "--max_steps", "2", "--per_device_train_batch_size", "16", "--num_generations", "4",
               "--num_iterations", "2", "--logging_steps", "2", "--eval_steps", "2", "--num_eval_prompts", "16",
               "--learning_rate", "1e-3", "--output_dir", str(out))
    recs = read_metrics(out)
    last = recs[-1]
    for k in ("reward", "reward_std", "rewards/add_exact/mean", "frac_reward_zero_std", "kl", "reward_with_kl",
              "completions/mean_length", "loss", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
              "clip_ratio/region_mean", "num_tokens", "learning_rate", "eval/gold_reward"):
        assert k in last and last[k] is not None and math.isfinite(last[k]), k
    assert abs(last["kl"]) < 1e-6  # the first batch is sampled from the reference itself
    before, after = load_params(toy_policy), load_params(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_batch_fails_early(tmp_path):
    proc = run_script("rloo.py", "--per_device_train_batch_size", "6", "--num_generations", "4", "--output_dir",
                      str(tmp_path / "o"), check=False)
    assert proc.returncode != 0 and "num_generations" in proc.stderr and "Loading weights" not in proc.stderr


def test_detail_4_unscored_samples_left_out_of_the_normalization_in_a_run(tmp_path, toy_policy):
    """A run where every other sample is unscored: the logged advantages of the scored samples have mean 0 and
    std 1, the unscored ones are exactly 0."""
    rf = tmp_path / "half.py"
    rf.write_text("def half(completions, **kw):\n"
                  "    return [None if i % 2 else float(sum(map(ord, c)) % 7) for i, c in enumerate(completions)]\n")
    out = tmp_path / "run"
    run_script("rloo.py", "--reward_funcs", f"{rf}:half", "--max_steps", "1", "--per_device_train_batch_size", "16",
               "--num_generations", "4", "--beta", "0", "--normalize_advantages", "True", "--logging_steps", "1",
               "--eval_steps", "0", "--log_completions_steps", "1", "--num_completions_to_log", "16",
               "--output_dir", str(out))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    assert all(x["advantage"] == 0.0 for x in samples if x["half"] is None)
    adv = torch.tensor([x["advantage"] for x in samples if x["half"] is not None])
    assert adv.abs().sum() > 0 and adv.mean().abs() < 1e-5 and adv.std().item() == pytest.approx(1.0, abs=1e-3)


def test_detail_1_two_processes_with_accumulation_match_one_process(tmp_path, toy_policy):
    """1 process x 16 completions == 2 processes x 4 micro-batches of 2 (processes and accumulation at once)."""
    multiprocess_matches_single(tmp_path, "rloo.py", ["--normalize_advantages", "True"], batch_two=2,
                                extra_two=["--gradient_accumulation_steps", "4"])


@pytest.mark.slow
def test_default_run_raises_heldout_gold_reward(tmp_path, toy_policy):
    out = tmp_path / "run"
    run_script("rloo.py", "--output_dir", str(out), timeout=1800)
    recs = [r for r in read_metrics(out) if r.get("eval/gold_reward") is not None]
    assert recs[-1]["eval/gold_reward"] >= recs[0]["eval/gold_reward"] + 0.05
