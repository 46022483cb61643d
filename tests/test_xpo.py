"""xpo.py: the loss against online DPO, log 2 at the reference, the exploration term's gradient (autograd vs finite
differences), the pair layout; short runs with a reward model, a reward function and a judge; bad configurations."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import (assert_default_run_raises_sampled_gold_reward, assert_fails_at_startup, read_metrics,
                      run_script)
from online_dpo import dpo_loss as online_dpo_loss
from xpo import first_is_chosen, interleave, pad_columns, xpo_loss

REQUIRED = ["loss/dpo", "loss/xpo", "objective/kl", "objective/entropy", "objective/non_score_reward",
            "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "val/model_contain_eos_token", "val/ref_contain_eos_token", "alpha", "beta"]
SCORED = ["objective/model_scores", "objective/ref_scores", "objective/scores_margin", "objective/rlhf_reward"]


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
    pc, pr, _, _, p_ref_sample = _pairs(seed=1)
    loss, _, _, _ = xpo_loss(pc, pr, pc.clone(), pr.clone(), p_ref_sample, beta=0.1, alpha=0.0)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
    loss, dpo, xpo, _ = xpo_loss(pc, pr, pc.clone(), pr.clone(), p_ref_sample, beta=0.1, alpha=0.3)
    assert torch.allclose(xpo, 0.3 * p_ref_sample) and torch.allclose(loss, math.log(2) + 0.3 * p_ref_sample)
    # the bonus does not depend on whether the reference sample won: swapping chosen and rejected keeps it
    _, _, xpo_swapped, _ = xpo_loss(pr, pc, pr.clone(), pc.clone(), p_ref_sample, beta=0.1, alpha=0.3)
    assert torch.equal(xpo, xpo_swapped)


def test_exploration_gradient_autograd_vs_finite_difference():
    """∂(α S^θ(ỹ))/∂θ = α ∇S^θ(ỹ), checked along a random direction on a small float64 bigram policy (embedding and
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
    a, b = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6, 7], [8, 9, 9]])
    T = 3
    x = interleave(pad_columns(a, T, 0), pad_columns(b, T, 0))
    assert x.tolist() == [[1, 2, 0], [5, 6, 7], [3, 4, 0], [8, 9, 9]]
    model_scores, ref_scores = torch.tensor([0.5, 1.0, 0.2]), torch.tensor([0.5, 0.3, 0.9])
    assert first_is_chosen(model_scores, ref_scores).tolist() == [True, True, False]


# ----------------------------------------------------------------------------- runs
FAST = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--eval_steps", "3",
        "--num_eval_prompts", "16", "--log_completions_steps", "2", "--learning_rate", "1e-3"]


def _check_run(out, scored: bool = True):
    recs = read_metrics(out)
    assert recs[0]["step"] == 0 and "eval/gold_reward" in recs[0]
    train = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in train] == [1, 2, 3]
    for name in REQUIRED + (SCORED if scored else []):
        assert all(r.get(name) is not None and math.isfinite(r[name]) for r in train), name
    assert all(r["loss/xpo"] < 0 for r in train)  # α > 0 times a log-prob
    assert (out / "samples.jsonl").exists() and (out / "model.safetensors").exists()
    return train


def test_run_reward_model(tmp_path, toy_policy, toy_rm):
    from safetensors.torch import load_file

    out = tmp_path / "rm"
    run_script("xpo.py", *FAST, "--output_dir", str(out), "--missing_eos_penalty", "1.0", "--alpha", "1e-3", "1e-4")
    train = _check_run(out)
    assert train[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # first step: policy = reference
    assert all(r["alpha"] == 1e-3 for r in train)  # still epoch 0
    before, after = load_file(toy_policy / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_run_reward_function_conversational(tmp_path, toy_policy):
    out = tmp_path / "fn"
    run_script("xpo.py", *FAST, "--output_dir", str(out), "--reward_model_name_or_path", "None",
               "--reward_funcs", "add", "--dataset_name", "toy:add:conversational")
    train = _check_run(out)
    assert all(0.0 <= r["objective/model_scores"] <= 1.0 for r in train)


def test_run_judge(tmp_path, toy_policy):
    out = tmp_path / "judge"
    run_script("xpo.py", *FAST, "--output_dir", str(out), "--reward_model_name_or_path", "None", "--judge", "fn:add")
    _check_run(out, scored=False)


@pytest.mark.parametrize("extra,match", [
    (["--reward_model_name_or_path", "None"], "exactly one preference source"),
    (["--alpha", "-1"], "--alpha"),
])
def test_bad_config_fails_at_startup(tmp_path, extra, match):
    assert_fails_at_startup("xpo.py", tmp_path, extra, match)


@pytest.mark.slow
def test_learning_raises_gold_reward(tmp_path, toy_policy, toy_rm):
    """The default run (toy reward model, 150 steps) raises the gold reward of its samples."""
    assert_default_run_raises_sampled_gold_reward("xpo.py", tmp_path)
