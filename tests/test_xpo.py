"""xpo.py: the loss against online DPO, log 2 at the reference, the exploration term's gradient (autograd vs finite
differences), the pair layout, unscored pairs; short runs with a reward model, a partly unscored reward function and a
judge; bad configurations. Each test names the implementation detail of the module docstring it checks."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import (assert_default_run_raises_sampled_gold_reward, assert_fails_at_startup, assert_params_moved,
                      check_online_run, read_metrics, run_script)
from online_dpo import dpo_loss as online_dpo_loss
from xpo import first_is_chosen, interleave, pair_weights, xpo_loss

REQUIRED = ["loss/dpo", "loss/xpo", "objective/kl", "objective/entropy", "objective/non_score_reward",
            "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "val/model_contain_eos_token", "val/ref_contain_eos_token", "alpha", "beta",
            "objective/model_kl", "policy_chosen_rate", "completions/mean_length", "train/skipped_steps"]
SCORED = ["objective/model_scores", "objective/ref_scores", "objective/scores_margin", "objective/rlhf_reward",
          "objective/unscored_rate"]


# ----------------------------------------------------------------------------- math
def _pairs(B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(5)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_alpha_zero_equals_online_dpo(loss_type):
    pc, pr, rc, rr, p_ref_sample = _pairs()
    loss, dpo, xpo, h = xpo_loss(pc, pr, rc, rr, p_ref_sample, beta=0.2, alpha=0.0, loss_type=loss_type)
    expected, h_dpo = online_dpo_loss(pc, pr, rc, rr, 0.2, loss_type)
    assert torch.allclose(loss, expected) and torch.allclose(dpo, expected) and torch.allclose(h, h_dpo)
    assert torch.equal(xpo, torch.zeros_like(xpo))


def test_at_reference_alpha_zero_is_log2_and_bonus_is_alpha_times_logp():
    """Detail 6: the bonus is α S^θ(ỹ) whether ỹ won or lost."""
    pc, pr, _, _, p_ref_sample = _pairs(seed=1)
    loss, _, _, _ = xpo_loss(pc, pr, pc.clone(), pr.clone(), p_ref_sample, beta=0.1, alpha=0.0)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
    loss, dpo, xpo, _ = xpo_loss(pc, pr, pc.clone(), pr.clone(), p_ref_sample, beta=0.1, alpha=0.3)
    assert torch.allclose(xpo, 0.3 * p_ref_sample) and torch.allclose(loss, math.log(2) + 0.3 * p_ref_sample)
    # the bonus does not depend on whether the reference sample won: swapping chosen and rejected keeps it
    _, _, xpo_swapped, _ = xpo_loss(pr, pc, pr.clone(), pc.clone(), p_ref_sample, beta=0.1, alpha=0.3)
    assert torch.equal(xpo, xpo_swapped)


def test_exploration_gradient_autograd_vs_finite_difference():
    """Detail 6: ∂(α S^θ(ỹ))/∂θ = α ∇S^θ(ỹ), checked along a random direction on a small float64 bigram policy (embedding and
    output matrices), and the full loss's gradient equals the DPO part's plus that term."""
    torch.manual_seed(0)
    V, d, B, P, T = 20, 6, 3, 2, 5
    emb = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    out = torch.randn(d, V, dtype=torch.float64, requires_grad=True)
    params = [emb, out]
    ids = torch.randint(0, V, (2 * B, P + T))  # rows 2b: policy sample, 2b+1: reference sample
    mask = torch.ones(2 * B, T, dtype=torch.float64)
    mask[1, 3:] = 0  # a shorter reference sample
    alpha, beta = 0.7, 0.1

    def seqs():  # S^θ(y|x) = Σ_t m_t log softmax(emb[y_{t-1}] @ out)[y_t]
        logits = emb[ids[:, P - 1:-1]] @ out  # (2B, T, V)
        logps = torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None])[..., 0]
        return (logps * mask).sum(1)  # (2B,)

    with torch.no_grad():
        ref_seq = seqs() + 0.1 * torch.randn(2 * B, dtype=torch.float64)
    chosen, rejected, ref_sample = torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5]), torch.tensor([1, 3, 5])

    def losses():
        s = seqs()
        return xpo_loss(s[chosen], s[rejected], ref_seq[chosen], ref_seq[rejected], s[ref_sample], beta, alpha)

    _, dpo, xpo, _ = losses()
    g_xpo = torch.autograd.grad(xpo.sum(), params, retain_graph=True)
    g_dpo = torch.autograd.grad(dpo.sum(), params, retain_graph=True)
    g_all = torch.autograd.grad((dpo + xpo).sum(), params)
    for a, b, c in zip(g_all, g_dpo, g_xpo):
        assert torch.allclose(a, b + c, atol=1e-12)
    # finite difference of α Σ_b S^θ(ỹ_b) along a random direction v
    v = [torch.randn_like(p) for p in params]
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
        plus = alpha * seqs()[ref_sample].sum()
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
        minus = alpha * seqs()[ref_sample].sum()
        for p, d in zip(params, v):
            p.add_(eps * d)
    fd = (plus - minus) / (2 * eps)
    directional = sum((g * d).sum() for g, d in zip(g_xpo, v))
    assert directional.item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)
    assert abs(fd.item()) > 1e-3  # the check is not vacuous


def test_pair_layout_and_ties_go_to_policy():
    """Details 2 and 3: pair b is rows 2b (policy), 2b+1 (reference); a tie keeps the policy sample as chosen."""
    a, b = torch.tensor([True, False]), torch.tensor([False, False])
    assert interleave(a, b).tolist() == [True, False, False, False]
    assert interleave(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6], [7, 8]])).tolist() == \
        [[1, 2], [5, 6], [3, 4], [7, 8]]
    model_scores, ref_scores = torch.tensor([0.5, 1.0, 0.2]), torch.tensor([0.5, 0.3, 0.9])
    assert first_is_chosen(model_scores, ref_scores).tolist() == [True, True, False]


def test_unscored_pairs_leave_the_loss():
    """Details 4 and 7: a pair with an unscored member gets weight 0 (both terms out of the loss), ties only with
    --drop_ties."""
    nan = float("nan")
    model_scores, ref_scores = torch.tensor([0.5, nan, 1.0, 0.2]), torch.tensor([0.5, 0.3, nan, 0.9])
    assert pair_weights(model_scores, ref_scores, False).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert pair_weights(model_scores, ref_scores, True).tolist() == [0.0, 0.0, 0.0, 1.0]


# ----------------------------------------------------------------------------- runs
FAST = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--eval_steps", "3",
        "--num_eval_prompts", "16", "--log_completions_steps", "2", "--learning_rate", "1e-3"]

# the gold reward of toy:add, left unscored (None) for prompts whose first number is even
PARTIAL_REWARD = """
import re

from common import toy

_gold = toy.gold_reward("add")

def odd_only(prompts, completions, **kw):
    text = lambda p: p[-1]["content"] if isinstance(p, list) else p
    scores = _gold(prompts, completions)
    return [s if int(re.search(r"\\d+", text(p)).group()) % 2 else None for p, s in zip(prompts, scores)]
"""


def _check_run(out, scored: bool = True):
    train = check_online_run(out, REQUIRED + (SCORED if scored else []))
    assert all(r["loss/xpo"] < 0 for r in train)  # α > 0 times a log-prob
    assert "eval/gold_reward" in train[-1]
    return train


def test_run_reward_model(tmp_path, toy_policy, toy_rm):
    """Details 6 and 9: log 2 at the first step; the per-epoch α schedule."""
    out = tmp_path / "rm"
    run_script("xpo.py", *FAST, "--output_dir", str(out), "--missing_eos_penalty", "1.0", "--alpha", "1e-3", "1e-4")
    train = _check_run(out)
    assert train[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # first step: policy = reference
    assert train[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(r["alpha"] == 1e-3 for r in train)  # still epoch 0
    step0 = read_metrics(out)[0]  # held-out: the run's reward source and the toy gold reward
    assert "eval/reward" in step0 and "eval/gold_reward" in step0 and "eval/reward" in train[-1]
    assert_params_moved(toy_policy, out)


def test_run_partly_unscored_reward_conversational(tmp_path, toy_policy):
    """Detail 4: a reward function that returns None for part of the completions; metrics stay finite (NaN-aware)
    and the fraction of unscored pairs is logged."""
    rf = tmp_path / "partial.py"
    rf.write_text(PARTIAL_REWARD)
    out = tmp_path / "fn"
    run_script("xpo.py", *FAST, "--output_dir", str(out), "--reward_model_name_or_path", "None",
               "--reward_funcs", f"{rf}:odd_only", "--dataset_name", "toy:add:conversational")
    train = _check_run(out)
    rates = [r["objective/unscored_rate"] for r in train]
    assert any(x > 0 for x in rates) and sum(rates) / len(rates) < 1, rates
    assert all(0.0 <= r["objective/model_scores"] <= 1.0 for r in train)


def test_run_judge(tmp_path, toy_policy):
    """Detail 3: a pairwise judge ranks (policy, reference) pairs."""
    out = tmp_path / "judge"
    run_script("xpo.py", *FAST, "--output_dir", str(out), "--reward_model_name_or_path", "None", "--judge", "fn:add")
    _check_run(out, scored=False)


def test_odd_batch_fails_at_startup(tmp_path):
    """Detail 1: the batch counts completions, two per prompt."""
    assert_fails_at_startup("xpo.py", tmp_path, ["--per_device_train_batch_size", "5"],
                            "--per_device_train_batch_size 5 is odd")


@pytest.mark.parametrize("fields,match", [
    ({"reward_model_name_or_path": None}, "exactly one preference source"),
    ({"alpha": [-1.0]}, "--alpha"),
    ({"reward_model_name_or_path": None, "judge": "fn:add", "drop_ties": True}, "--drop_ties"),  # detail 5
])
def test_bad_config_checks(fields, match):
    from xpo import Args, check_args

    with pytest.raises(ValueError, match=match):
        check_args(Args(**fields))


@pytest.mark.slow
def test_learning_raises_gold_reward(tmp_path, toy_policy, toy_rm):
    """The default run (toy reward model, 150 steps) raises the gold reward of its samples."""
    assert_default_run_raises_sampled_gold_reward("xpo.py", tmp_path)
