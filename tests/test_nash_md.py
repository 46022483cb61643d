"""nash_md.py: the per-token geometric mixture against a hand computation, the batched KV-cached mixture sampler
against HF generate (c = 0 and c = 1) and against its own distribution (c = ½), the loss and its gradient, preference
probabilities with the EOS penalty, unscored pairs; short runs with a reward model, a partly unscored reward function
and a judge; bad configs. Each test names the implementation detail of the module docstring it checks."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import (assert_default_run_raises_sampled_gold_reward, assert_fails_at_startup, assert_params_moved,
                      check_online_run, read_metrics, run_script)
from nash_md import (apply_missing_eos_penalty, filter_logits, mixture_logits, nash_md_loss, preference_probability,
                     sample_mixture)

REQUIRED = ["loss/kl", "loss/score", "objective/kl", "objective/entropy", "objective/non_score_reward",
            "rewards/probabilities", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
            "val/model_contain_eos_token", "val/ref_contain_eos_token", "beta", "mixture_coef", "objective/model_kl",
            "completions/mean_length", "train/skipped_steps"]
SCORED = ["rewards/chosen", "rewards/rejected", "objective/model_scores", "objective/ref_scores",
          "objective/scores_margin", "objective/rlhf_reward", "objective/unscored_rate"]


# ----------------------------------------------------------------------------- math
def test_mixture_logits_hand_computation():
    """Detail 2: the per-token geometric mixture π^mix ∝ π_θ^(1-c) π_ref^c."""
    z_p, z_r = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 1.0, 0.0]])
    c = 0.25
    p, r = z_p.softmax(-1)[0].tolist(), z_r.softmax(-1)[0].tolist()
    unnorm = [pi ** (1 - c) * ri ** c for pi, ri in zip(p, r)]  # π^mix ∝ π_θ^(1-c) π_ref^c
    expected = torch.tensor([[math.log(u / sum(unnorm)) for u in unnorm]])
    assert torch.allclose(mixture_logits(z_p, z_r, c), expected, atol=1e-6)
    # by hand for the first entry: logits 0.25*3 + 0.75*1 = 1.5, 0.25*1 + 0.75*2 = 1.75, 0 + 0.75*3 = 2.25
    lse = math.log(math.exp(1.5) + math.exp(1.75) + math.exp(2.25))
    assert mixture_logits(z_p, z_r, c)[0, 0].item() == pytest.approx(1.5 - lse, abs=1e-6)
    assert torch.allclose(mixture_logits(z_p, z_r, 0.0), z_p.log_softmax(-1))
    assert torch.allclose(mixture_logits(z_p, z_r, 1.0), z_r.log_softmax(-1))


def test_filter_logits():
    """Detail 3: top-k, top-p and min-p on the mixture's log-probs."""
    lp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isinf(filter_logits(lp, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(lp, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(lp, top_p=0.85)).tolist() == [[False, False, False, True]]  # 0.8 < 0.85
    assert torch.isinf(filter_logits(lp, top_p=0.97)).tolist() == [[False, False, False, False]]
    assert torch.isinf(filter_logits(lp, min_p=0.4)).tolist() == [[False, False, True, True]]
    assert torch.equal(filter_logits(lp), lp)


def _two_toy_models():
    from transformers import AutoModelForCausalLM

    from common import toy

    tok = toy.make_tokenizer()
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(toy.make_config(tok, hidden_size=32, num_layers=2, num_heads=2))
        with torch.no_grad():  # large random weights: peaked, prefix-dependent next-token distributions
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        models.append(model.eval())
    return tok, models


def test_sampler_matches_hf_generate_at_the_ends():
    """Detail 3: greedy decoding from the mixture with c = 0 is the policy's greedy output and with c = 1 the reference's,
    token for token, with left-padded prompts of different lengths (checks the KV caches and positions)."""
    from common.data import pad, tokenize
    from common.generation import HFGenerator, SamplingConfig

    tok, (policy, ref) = _two_toy_models()
    prompts = ["<bos>1+2=", "<bos>37+58=", "<bos>reverse:abc="]
    prompt_ids = tokenize(tok, prompts)
    ids, mask = pad(prompt_ids, tok.pad_token_id, "left")
    gen = HFGenerator(tok, SamplingConfig(max_new_tokens=6))
    for c, model in ((0.0, policy), (1.0, ref)):
        hf = gen.generate(model, prompt_ids, greedy=True)
        out, out_mask, term = sample_mixture(policy, ref, ids, mask, c, 6, tok.eos_token_id, tok.pad_token_id,
                                             greedy=True)
        T = hf.completion_ids.shape[1]
        assert out.shape[1] == T
        assert torch.equal(out, hf.completion_ids) and torch.equal(out_mask, hf.completion_mask)
        assert torch.equal(term, hf.terminated)
    a, _, _ = sample_mixture(policy, ref, ids, mask, 0.0, 6, tok.eos_token_id, tok.pad_token_id, greedy=True)
    b, _, _ = sample_mixture(policy, ref, ids, mask, 1.0, 6, tok.eos_token_id, tok.pad_token_id, greedy=True)
    assert not torch.equal(a, b)  # the two models differ, so the check above is not vacuous


def test_sampler_follows_the_mixture_distribution():
    """Details 2-3: one-token samples at c = ½ (temperature 1) have the frequencies of exp(mixture_logits) on a 2-token prefix."""
    from common.data import tokenize

    tok, (policy, ref) = _two_toy_models()
    prompt = tokenize(tok, ["<bos>9"])[0]
    N = 20000
    ids = torch.tensor([prompt] * N)
    torch.manual_seed(0)
    out, _, _ = sample_mixture(policy, ref, ids, torch.ones_like(ids), 0.5, 1, tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        expected = mixture_logits(policy(ids[:1]).logits[0, -1], ref(ids[:1]).logits[0, -1], 0.5).exp()
    freq = torch.bincount(out[:, 0], minlength=expected.shape[0]).float() / N
    assert 0.5 * (freq - expected).abs().sum().item() < 0.03  # total variation
    assert expected.max().item() < 0.5  # a spread-out distribution, so the check has power


def test_nash_md_loss_hand_values_and_gradient():
    """Detail 6: the loss value and its gradient m_t (β sg(ℓ_t - ℓ^ref_t) - (P - ½))."""
    lp = torch.tensor([[-1.0, -2.0, -7.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    P, beta = torch.tensor([0.8]), 0.1
    loss, kl, score = nash_md_loss(lp, ref, mask, P, beta)
    # kl = 0.5*(-1) + (-1)*(-2) = 1.5 ; score = 0.3 * (-3) = -0.9 ; loss = 0.15 + 0.9
    assert kl.item() == pytest.approx(1.5) and score.item() == pytest.approx(-0.9)
    assert loss.item() == pytest.approx(1.05)
    loss.sum().backward()
    # ∂loss/∂ℓ_t = m_t (β sg(ℓ_t - ℓ^ref_t) - (P - ½))
    assert torch.allclose(lp.grad, torch.tensor([[0.1 * 0.5 - 0.3, 0.1 * -1.0 - 0.3, 0.0]]))


def test_nash_md_gradient_zero_at_reference_with_indifferent_preference():
    """Detail 6: at θ = ref with P = ½ the gradient is 0."""
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]], requires_grad=True)
    loss, _, _ = nash_md_loss(lp, lp.detach().clone(), torch.ones(2, 2), torch.tensor([0.5, 0.5]), 0.1)
    loss.sum().backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp))


def test_preference_probability_with_eos_penalty_hand_example():
    """Details 4 and 8: P = σ(r(y) - r(y')) after the EOS penalty; a tie gives ½."""
    scores = torch.tensor([1.0, 1.0, 0.7, 0.2])  # rows 2b: policy, 2b+1: mixture
    terminated = torch.tensor([False, True, True, True])
    pen = apply_missing_eos_penalty(scores, terminated, 0.5)
    P = preference_probability(pen[0::2], pen[1::2])
    assert P.tolist() == pytest.approx([1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.5))])
    assert preference_probability(scores[0::2], scores[1::2])[0].item() == 0.5  # a tie is a coin flip


def test_unscored_pair_has_no_preference():
    """Detail 5: an unscored member makes P NaN (the pair leaves the loss, weight 0), never ½ or 0."""
    nan = float("nan")
    P = preference_probability(torch.tensor([nan, 1.0, 0.3]), torch.tensor([0.0, nan, 0.3]))
    assert math.isnan(P[0].item()) and math.isnan(P[1].item()) and P[2].item() == 0.5


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
    assert all(0.0 <= r["rewards/probabilities"] <= 1.0 for r in train)
    assert "eval/gold_reward" in train[-1]
    for r in train:  # detail 11: TRL's meanings
        assert r["loss/kl"] == pytest.approx(r["objective/kl"]) and r["rewards/margins"] == pytest.approx(r["loss/kl"])
        assert r["logps/chosen"] - r["logps/rejected"] == pytest.approx(r["objective/kl"], abs=1e-5)
        assert r["objective/entropy"] == pytest.approx(-r["logps/chosen"])
        if scored:
            assert r["rewards/chosen"] == pytest.approx(r["objective/model_scores"])
            assert r["rewards/rejected"] == pytest.approx(r["objective/ref_scores"])
    return train


def test_run_reward_model(tmp_path, toy_policy, toy_rm):
    """Details 10 and 11: the per-epoch mixture coefficient; zero KL at the first step."""
    out = tmp_path / "rm"
    run_script("nash_md.py", *FAST, "--output_dir", str(out), "--missing_eos_penalty", "1.0",
               "--mixture_coef", "0.3", "0.6")
    train = _check_run(out)
    assert train[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # first step: policy = reference
    assert all(r["mixture_coef"] == 0.3 for r in train)
    step0 = read_metrics(out)[0]  # held-out: the run's reward source and the toy gold reward
    assert "eval/reward" in step0 and "eval/gold_reward" in step0 and "eval/reward" in train[-1]
    assert_params_moved(toy_policy, out)


def test_run_partly_unscored_reward_conversational(tmp_path, toy_policy):
    """Detail 5: a reward function that returns None for part of the completions; metrics stay finite (NaN-aware)
    and the fraction of unscored pairs is logged."""
    rf = tmp_path / "partial.py"
    rf.write_text(PARTIAL_REWARD)
    out = tmp_path / "fn"
    run_script("nash_md.py", *FAST, "--output_dir", str(out), "--reward_model_name_or_path", "None",
               "--reward_funcs", f"{rf}:odd_only", "--dataset_name", "toy:add:conversational", "--top_k", "20")
    train = _check_run(out)
    rates = [r["objective/unscored_rate"] for r in train]
    assert any(x > 0 for x in rates) and sum(rates) / len(rates) < 1, rates
    assert all(0.0 <= r["objective/model_scores"] <= 1.0 for r in train)


def test_run_judge(tmp_path, toy_policy):
    """Detail 4: a judge gives P directly (no score metrics)."""
    out = tmp_path / "judge"
    run_script("nash_md.py", *FAST, "--output_dir", str(out), "--reward_model_name_or_path", "None",
               "--judge", "fn:add")
    train = _check_run(out, scored=False)
    assert all("rewards/chosen" not in r for r in train)


def test_odd_batch_fails_at_startup(tmp_path):
    """Detail 1: the batch counts completions, two per prompt."""
    assert_fails_at_startup("nash_md.py", tmp_path, ["--per_device_train_batch_size", "3"],
                            "--per_device_train_batch_size 3 is odd")


@pytest.mark.parametrize("fields,match", [
    ({"reward_model_name_or_path": None}, "exactly one preference source"),
    ({"mixture_coef": [0.5, 1.5]}, "--mixture_coef"),
    ({"reward_model_name_or_path": None, "judge": "fn:add", "missing_eos_penalty": 1.0}, "missing_eos_penalty"),
])
def test_bad_config_checks(fields, match):
    from nash_md import Args, check_args

    with pytest.raises(ValueError, match=match):
        check_args(Args(**fields))


@pytest.mark.slow
def test_learning_raises_gold_reward(tmp_path, toy_policy, toy_rm):
    """The default run (toy reward model, 150 steps) raises the gold reward of its samples."""
    assert_default_run_raises_sampled_gold_reward("nash_md.py", tmp_path)
