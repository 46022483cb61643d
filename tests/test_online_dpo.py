"""online_dpo.py: loss math, pair ranking, EOS penalty, unscored pairs, schedules, judges; short runs through the real
entry point (reward model, reward function, judge, unscored and non-finite rewards, exact resume, 1 vs 2 processes).
Each test names the implementation detail of the module docstring it checks."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import (assert_default_run_raises_sampled_gold_reward, assert_fails_at_startup, assert_params_moved,
                      check_online_run, load_params, multiprocess_matches_single, read_metrics, run_script)
from online_dpo import apply_missing_eos_penalty, dpo_loss, epoch_at, first_is_chosen, pair_weights, scheduled

REQUIRED = ["loss/dpo", "objective/kl", "objective/entropy", "objective/non_score_reward", "rewards/chosen",
            "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
            "val/contain_eos_token", "val/model_contain_eos_token", "beta", "completions/mean_length",
            "completions/clipped_ratio", "train/skipped_steps"]
SCORED = ["objective/scores", "objective/model_scores", "objective/scores_margin", "objective/rlhf_reward",
          "objective/unscored_rate"]


# ----------------------------------------------------------------------------- math
def test_dpo_loss_at_reference_is_log2():
    lp = torch.tensor([-3.0, -7.5, -1.2])
    lr = torch.tensor([-4.0, -2.0, -9.0])
    losses, h = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=0.1)
    assert torch.allclose(h, torch.zeros(3))
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    ipo, _ = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=0.1, loss_type="ipo")
    assert torch.allclose(ipo, torch.full((3,), (1 / (2 * 0.1)) ** 2))


def test_dpo_loss_hand_values_and_gradient():
    """Detail 9: IPO on the un-normalised sums."""
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-5.0])
    rc, rr = torch.tensor([-3.0]), torch.tensor([-4.0])
    beta = 0.5
    losses, h = dpo_loss(pc, pr, rc, rr, beta)
    # h = (-2 + 3) - (-5 + 4) = 2 ; loss = -log σ(1) = log(1 + e^-1)
    assert h.item() == pytest.approx(2.0)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)
    losses.sum().backward()
    # ∂L/∂h = -β σ(-βh) and ∂h/∂policy_chosen = 1
    assert pc.grad.item() == pytest.approx(-beta / (1 + math.exp(beta * 2.0)), rel=1e-6)
    ipo, _ = dpo_loss(pc.detach(), pr, rc, rr, beta, "ipo")
    assert ipo.item() == pytest.approx((2.0 - 1.0) ** 2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc.detach(), pr, rc, rr, beta, "hinge")


def test_eos_penalty_and_chosen_assignment_hand_example():
    """Details 3 and 5: ties go to the first sample; the penalty hits completions without EOS."""
    scores = torch.tensor([1.0, 0.5, 0.2, 0.2, 0.0, 0.9])
    terminated = torch.tensor([False, True, True, True, True, False])
    pen = apply_missing_eos_penalty(scores, terminated, 1.0)
    assert torch.allclose(pen, torch.tensor([0.0, 0.5, 0.2, 0.2, 0.0, -0.1]))
    assert torch.equal(apply_missing_eos_penalty(scores, terminated, None), scores)
    # pair 0: 0.0 vs 0.5 -> second; pair 1: tie -> first; pair 2: 0.0 vs -0.1 -> first
    assert first_is_chosen(pen[0::2], pen[1::2]).tolist() == [False, True, True]
    # without the penalty pair 0 and pair 2 flip
    assert first_is_chosen(scores[0::2], scores[1::2]).tolist() == [True, True, False]
    # ties stay in the loss by default; --drop_ties gives them weight 0
    assert pair_weights(pen[0::2], pen[1::2], False).tolist() == [1.0, 1.0, 1.0]
    assert pair_weights(pen[0::2], pen[1::2], True).tolist() == [1.0, 0.0, 1.0]


def test_unscored_pairs_leave_the_loss_like_dropped_ties():
    """Detail 4: a pair with an unscored (NaN) member gets weight 0, with or without --drop_ties; the penalty keeps
    NaN as NaN (an unscored completion does not become -penalty)."""
    nan = float("nan")
    first, second = torch.tensor([1.0, nan, 0.3, nan, 0.5]), torch.tensor([0.0, 2.0, nan, nan, 0.5])
    assert pair_weights(first, second, False).tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert pair_weights(first, second, True).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    pen = apply_missing_eos_penalty(torch.tensor([nan, 1.0]), torch.tensor([False, False]), 1.0)
    assert math.isnan(pen[0].item()) and pen[1].item() == 0.0


def test_per_epoch_schedule():
    """Detail 8: one β per pass over the prompts, the last one holding."""
    assert scheduled([0.1], 0) == 0.1 and scheduled([0.1], 7) == 0.1
    assert [scheduled([0.3, 0.2, 0.1], e) for e in range(5)] == [0.3, 0.2, 0.1, 0.1, 0.1]
    # 100 prompts, 32 per step: steps 0-3 are epoch 0 (rows 0..127 -> 3.125 passes at step 3's end)
    assert [epoch_at(s, 32, 100) for s in range(8)] == [0, 0, 0, 0, 1, 1, 1, 2]


def test_reward_judge_ranks_and_probabilities():
    """Detail 3: a judge built on a reward ranks like the score rule (ties -> the first completion)."""
    from common.judges import RewardJudge, check_ranks, load_judge

    def length_reward(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    j = RewardJudge(length_reward)
    pairs = [("aaa", "a"), ("a", "aaa"), ("aa", "aa")]
    assert j.judge(["p"] * 3, pairs) == [0, 1, 0]  # tie -> first
    probs = j.judge(["p"] * 3, pairs, return_scores=True)
    assert probs == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)), 0.5])
    assert check_ranks([0, 1, 0], 3).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="ranks"):
        check_ranks([0, 2, 0], 3)
    gold = load_judge("fn:add")
    assert gold.judge(["2+3="], [("5", "6")]) == [0] and gold.judge(["2+3="], [("6", "5")]) == [1]
    with pytest.raises(ValueError, match="judge"):
        load_judge("nonsense")


@pytest.mark.parametrize("layout", ["shared_sdpa", "shared_eager", "two_rows"])
def test_one_forward_per_prompt_equals_separate_forwards(layout):
    """Detail 11: the per-token log-probs of both samples of every prompt from one forward (shared prompt with a block
    mask, or a row per sample) equal a separate forward of each prompt + completion, for prompts and samples of
    different lengths; the gradient of the DPO loss through the shared row equals the one through a row per sample."""
    from transformers import AutoModelForCausalLM

    from common import model as model_utils, toy
    from online_dpo import pair_batch, pair_token_logps

    tok = toy.make_tokenizer()
    torch.manual_seed(0)
    attn = "eager" if layout == "shared_eager" else "sdpa"
    model = AutoModelForCausalLM.from_config(toy.make_config(tok), attn_implementation=attn)
    prompts = [[1, 20, 21], [1, 22], [1, 23, 24, 25, 26]]
    completions = [[30, 2], [31, 32, 33, 2], [34, 35, 36, 37, 2], [38, 2], [39], [40, 41, 2]]  # [39]: no EOS
    kw = dict(share_prompt=layout != "two_rows", mask_dtype=torch.float32 if attn == "eager" else torch.bool)
    batch = pair_batch(prompts, completions, tok.pad_token_id, "cpu", **kw)
    if layout != "two_rows":  # one row per prompt, each as long as its prompt and both samples
        assert batch["input_ids"].shape == (3, max(len(p) + len(completions[2 * b]) + len(completions[2 * b + 1])
                                                  for b, p in enumerate(prompts)))
    with torch.no_grad():
        lp = pair_token_logps(model.eval(), batch)
    mask = batch["completion_mask"]
    for i, comp in enumerate(completions):
        ids = torch.tensor([prompts[i // 2] + comp])
        with torch.no_grad():
            alone = model_utils.completion_logps(model, ids, torch.ones_like(ids), len(comp))[0]
        assert mask[i].sum().item() == len(comp) and batch["targets"][i, :len(comp)].tolist() == comp
        torch.testing.assert_close(lp[i, :len(comp)], alone, atol=1e-5, rtol=1e-5)

    def loss_grads(b):
        model.zero_grad()
        seq = (pair_token_logps(model, b) * b["completion_mask"]).sum(1)
        loss = dpo_loss(seq[0::2], seq[1::2], seq[0::2].detach() - 1.0, seq[1::2].detach(), 0.1)[0].sum()
        loss.backward()
        return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}

    model.train()
    loss, grads = loss_grads(batch)
    ref_loss, ref_grads = loss_grads(pair_batch(prompts, completions, tok.pad_token_id, "cpu", share_prompt=False))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5)


def test_shared_prompt_only_where_the_attention_takes_the_mask():
    """Detail 11: flash attention (no 4D mask) or a sliding window shorter than a sequence falls back to a row per
    sample."""
    from types import SimpleNamespace as NS

    from online_dpo import can_share_prompt

    def m(attn, window=None):
        return NS(config=NS(_attn_implementation=attn, sliding_window=window))

    assert can_share_prompt([m("sdpa"), m("eager")], 300)
    assert not can_share_prompt([m("sdpa"), m("flash_attention_2")], 300)
    assert can_share_prompt([m("sdpa", 512)], 300) and not can_share_prompt([m("sdpa", 256)], 300)


# ----------------------------------------------------------------------------- runs
FAST = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--eval_steps", "3",
        "--num_eval_prompts", "16", "--log_completions_steps", "2", "--learning_rate", "1e-3"]

# the gold reward of toy:add, left unscored (None) for prompts whose first number is even
PARTIAL_REWARD = """
import re

from common import toy

_gold = toy.gold_reward("add")

def _first_number(prompt):
    text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    return int(re.search(r"\\d+", text).group())

def odd_only(prompts, completions, **kw):
    scores = _gold(prompts, completions)
    return [s if _first_number(p) % 2 else None for p, s in zip(prompts, scores)]

def nothing(prompts, completions, **kw):
    return [None] * len(completions)

def not_finite(prompts, completions, **kw):
    return [float("inf")] + [0.0] * (len(completions) - 1)

def answer_match(prompts, completions, answer, **kw):
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]
"""


def _reward_file(tmp_path) -> str:
    f = tmp_path / "rewards_for_test.py"
    f.write_text(PARTIAL_REWARD)
    return str(f)


def test_run_reward_model_moves_params(tmp_path, toy_policy, toy_rm):
    out = tmp_path / "rm"
    run_script("online_dpo.py", *FAST, "--output_dir", str(out), "--missing_eos_penalty", "1.0",
               "--beta", "0.1", "0.05")
    train = check_online_run(out, REQUIRED + SCORED)
    # the first step's policy equals the reference: zero KL on its samples, log 2 loss
    assert train[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert train[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(0.0 <= r["rewards/accuracies"] <= 1.0 for r in train)
    assert all(r["beta"] == 0.1 for r in train)  # still epoch 0
    assert all(r["objective/unscored_rate"] == 0.0 for r in train)  # a reward model scores everything
    assert "rewards/toy-rm/mean" in train[0] and "eval/gold_reward" in train[-1]
    # held-out: scored by the run's reward source (eval/reward) and by the toy gold reward
    step0 = read_metrics(out)[0]
    assert "eval/reward" in step0 and "eval/rewards/toy-rm/mean" in step0 and "eval/reward" in train[-1]
    assert_params_moved(toy_policy, out)


def test_run_user_data_held_out_fraction(tmp_path, toy_policy):
    """A user file with --eval_fraction: eval/reward from the same reward source (which reads the file's answer
    column), no gold reward outside the toy tasks."""
    import json

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 30) for b in range(10)]
    data_file = tmp_path / "sums.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "user"
    run_script("online_dpo.py", "--max_steps", "2", "--per_device_train_batch_size", "8", "--logging_steps", "1",
               "--eval_steps", "2", "--num_eval_prompts", "16", "--log_completions_steps", "0",
               "--dataset_name", str(data_file), "--eval_fraction", "0.25", "--reward_model_name_or_path", "None",
               "--reward_funcs", f"{_reward_file(tmp_path)}:answer_match", "--output_dir", str(out))
    recs = read_metrics(out)
    evals = [r for r in recs if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(0.0 <= r["eval/reward"] <= 1.0 and "eval/rewards/answer_match/mean" in r for r in evals)
    assert all("eval/gold_reward" not in r and "train/gold_reward" not in r for r in recs)


def test_run_partly_unscored_reward_conversational(tmp_path, toy_policy):
    """Detail 4: a reward function that returns None for part of the completions; the metrics stay finite
    (NaN-aware means) and the fraction of unscored pairs is logged."""
    out = tmp_path / "fn"
    run_script("online_dpo.py", *FAST, "--output_dir", str(out), "--reward_model_name_or_path", "None",
               "--reward_funcs", f"{_reward_file(tmp_path)}:odd_only", "--dataset_name", "toy:add:conversational",
               "--loss_type", "ipo", "--drop_ties", "True")
    train = check_online_run(out, REQUIRED + SCORED)
    rates = [r["objective/unscored_rate"] for r in train]
    assert any(x > 0 for x in rates) and sum(rates) / len(rates) < 1, rates  # about half the prompts: even
    assert all(0.0 <= r["objective/scores"] <= 1.0 for r in train)  # exact-match scores of the scored ones
    assert all(0.0 <= r["objective/tie_rate"] <= 1.0 for r in train)


def test_run_all_unscored_never_updates(tmp_path, toy_policy):
    """Details 4 and 6: when no completion is scored every pair leaves the loss, so the weights stay exactly the
    starting policy's; the constant-reward warning names the source."""
    out = tmp_path / "none"
    proc = run_script("online_dpo.py", "--max_steps", "2", "--per_device_train_batch_size", "8", "--logging_steps",
                      "1", "--eval_steps", "0", "--log_completions_steps", "1", "--learning_rate", "1e-2",
                      "--reward_model_name_or_path", "None", "--reward_funcs", f"{_reward_file(tmp_path)}:nothing",
                      "--output_dir", str(out))
    train = check_online_run(out, ["objective/kl", "objective/unscored_rate"], steps=2, eval_at_start=False)
    assert all(r["objective/unscored_rate"] == 1.0 for r in train)
    assert all(r["objective/scores"] is None and r["loss/dpo"] is None for r in train)  # nothing to average
    assert "no reward varied" in proc.stderr and "nothing" in proc.stderr
    before, after = load_params(toy_policy), load_params(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_run_non_finite_reward_stops_before_any_update(tmp_path, toy_policy):
    """Detail 4: a reward function returning inf stops the run at step 1, naming the source, before any update:
    no step is logged and no model is written."""
    out = tmp_path / "inf"
    proc = run_script("online_dpo.py", *FAST, "--eval_steps", "0", "--output_dir", str(out),
                      "--reward_model_name_or_path", "None", "--reward_funcs", f"{_reward_file(tmp_path)}:not_finite",
                      check=False)
    assert proc.returncode != 0
    assert "reward function 'not_finite'" in proc.stderr and "inf" in proc.stderr, proc.stderr[-2000:]
    assert "rpf = rewards(prompts2" in proc.stderr  # it stopped at the scoring of the first training step
    assert not (out / "metrics.jsonl").exists() or not read_metrics(out)
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_run_judge(tmp_path, toy_policy, toy_rm):
    """Detail 3: a pairwise judge ranks the pairs (no score metrics)."""
    out = tmp_path / "judge"
    run_script("online_dpo.py", *FAST, "--output_dir", str(out), "--reward_model_name_or_path", "None",
               "--judge", "rm:toy-rm")
    train = check_online_run(out, REQUIRED)
    assert all("objective/scores" not in r for r in train)


@pytest.mark.parametrize("extra,match", [
    (["--reward_model_name_or_path", "None"], "exactly one preference source"),
    (["--per_device_train_batch_size", "7"], "--per_device_train_batch_size 7 is odd"),  # detail 1
])
def test_bad_config_fails_at_startup(tmp_path, extra, match):
    assert_fails_at_startup("online_dpo.py", tmp_path, extra, match)


@pytest.mark.parametrize("fields,match", [
    ({"reward_funcs": ["add"]}, "exactly one preference source"),
    ({"loss_type": "hinge"}, "loss_type"),
    ({"reward_model_name_or_path": None, "judge": "fn:add", "missing_eos_penalty": 1.0}, "missing_eos_penalty"),
    ({"reward_model_name_or_path": None, "judge": "fn:add", "drop_ties": True}, "--drop_ties"),  # detail 5
    ({"beta": [0.1, -0.1]}, "--beta"),
])
def test_bad_config_checks(fields, match):
    """The start-up checks that run before anything loads (the subprocess test above shows they stop the run)."""
    from online_dpo import Args, check_args

    with pytest.raises(ValueError, match=match):
        check_args(Args(**fields))


@pytest.mark.slow
def test_learning_raises_gold_reward(tmp_path, toy_policy, toy_rm):
    """The default run (toy reward model, 150 steps) raises the gold reward of its samples."""
    assert_default_run_raises_sampled_gold_reward("online_dpo.py", tmp_path)


def test_resume_continues_exactly(tmp_path, toy_policy):
    """A run resumed from its step-2 checkpoint logs exactly the steps 3-4 of the uninterrupted run."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--max_steps", "4", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--eval_steps", "4",
              "--num_eval_prompts", "16", "--log_completions_steps", "0", "--learning_rate", "1e-3",
              "--reward_model_name_or_path", "None", "--reward_funcs", "add", "--save_steps", "2"]
    run_script("online_dpo.py", *common, "--output_dir", str(a))
    assert (a / "checkpoint-2" / "trainer_state.json").exists()
    run_script("online_dpo.py", *common, "--output_dir", str(b), "--resume_from", str(a / "checkpoint-2"))
    ra = {r["step"]: r for r in read_metrics(a)}
    rb = {r["step"]: r for r in read_metrics(b)}
    assert sorted(rb) == [3, 4]
    for step in (3, 4):
        for k in ("loss/dpo", "objective/kl", "logps/chosen", "train/gold_reward"):
            assert rb[step][k] == pytest.approx(ra[step][k], rel=1e-5, abs=1e-6), (step, k)


def test_two_processes_match_one(tmp_path, toy_policy):
    """Details 1 and 6: 2 processes x 2 accumulation micro-batches x 4 completions (2 pairs each) give the update of
    1 process x 16 completions (8 pairs), on identical samples (metrics and final weights). The shared-prompt rows
    (detail 11) are as long as their micro-batch's longest pair, so the two runs' gradients differ by float rounding
    (~1e-10 on entries near zero); Adam's step moves such an entry by about lr·Δg/ε (ε = 1e-8), hence weights to
    5e-5 at lr 1e-3 (a pair counted wrongly moves many weights by ~lr)."""
    base = ["--max_steps", "2", "--eval_steps", "0", "--log_completions_steps", "0", "--logging_steps", "1",
            "--reward_model_name_or_path", "None", "--reward_funcs", "{length_reward}", "--learning_rate", "1e-3"]
    m1, _ = multiprocess_matches_single(tmp_path, "online_dpo.py", [], base=base, batch_one=16, batch_two=4,
                                        extra_two=["--gradient_accumulation_steps", "2"],
                                        keys=("loss/dpo", "objective/kl", "logps/chosen", "rewards/margins",
                                              "objective/scores", "completions/mean_length"), atol=5e-5)
    assert m1[-1]["loss/dpo"] != pytest.approx(math.log(2))  # the policy moved between the two steps
