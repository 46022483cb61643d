"""GRPO: the math against hand-computed values, batch invariances, runs through the entry point, bad input.
Test names point at the numbered implementation details of algos/grpo.py's docstring."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from conftest import (FAKE_SAMPLER, assert_params_close, load_params, multiprocess_matches_single,  # noqa: F401
                      read_metrics, run_script, run_with_fake_sampler)

import grpo


# ----------------------------------------------------------------------------- tier 1: math
def test_detail_2_combine_rewards_leaves_unscored_out():
    rpf = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [0.5, 2.0]])
    r = grpo.combine_rewards(rpf, torch.tensor([2.0, 0.5]))
    assert r[0] == 2.0 and math.isnan(r[1]) and r[2] == pytest.approx(2.0)


def test_detail_3_advantages_each_scale_mode_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4; the second all equal
    group_std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    batch_std = math.sqrt(5.5 / 7)  # std of all 8 rewards (mean 1.25, squared deviations sum to 5.5)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])
    expected = {"group": 0.5 / (group_std + 1e-4), "batch": 0.5 / (batch_std + 1e-4), "none": 0.5}
    for mode, value in expected.items():
        a = grpo.group_advantages(r, 4, mode)
        torch.testing.assert_close(a[:4], value * sign)
        assert torch.equal(a[4:], torch.zeros(4)), mode  # all-equal group: exactly zero
        assert a.view(2, 4).sum(1).abs().max() < 1e-6


def test_detail_3_all_equal_group_and_unscored_sample_get_exactly_zero():
    r = torch.tensor([0.7] * 8 + [float("nan"), 1.0, 0.0, float("nan")])
    for mode in ("group", "batch", "none"):
        a = grpo.group_advantages(r, 4, mode)
        assert not torch.isnan(a).any()
        assert torch.equal(a[:8], torch.zeros(8))  # 0.7 * 8 does not sum exactly: still zero
        assert a[8] == 0 and a[11] == 0 and a[9] > 0 > a[10]


def test_detail_6_loss_type_normalisations_unequal_lengths():
    L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # lengths 3 and 1
    assert grpo.aggregate(L, m, "grpo").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert grpo.aggregate(L, m, "bnpo").item() == pytest.approx(10 / 4)
    assert grpo.aggregate(L, m, "dr_grpo", max_completion_length=5).item() == pytest.approx(10 / (2 * 5))
    assert grpo.aggregate(L, m, "dapo", num_items=8).item() == pytest.approx(10 / 8)
    # dr_grpo with B * L_max equal to the token count matches bnpo (spec test)
    m_full = torch.ones(2, 3)
    assert grpo.aggregate(L, m_full, "dr_grpo", max_completion_length=3) == grpo.aggregate(L, m_full, "bnpo")
    with pytest.raises(ValueError, match="loss_type"):
        grpo.aggregate(L, m, "sum")


def test_detail_4_gspo_sequence_ratio():
    logps = torch.tensor([[-1.0, -2.0, -7.0]])
    old = torch.tensor([[-1.5, -1.0, -3.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: it must not count
    seq = grpo.importance_ratio(logps, old, m, "sequence")
    torch.testing.assert_close(seq, torch.full((1, 3), math.exp((0.5 - 1.0) / 2)))
    tok = grpo.importance_ratio(logps, old, m, "token")
    torch.testing.assert_close(tok[0, :2], torch.tensor([math.exp(0.5), math.exp(-1.0)]))


def test_detail_5_k3_values():
    lp, ref = torch.tensor([[-1.0, -0.5]]), torch.tensor([[-2.0, -0.5]])
    torch.testing.assert_close(grpo.k3(lp, ref), torch.tensor([[math.exp(-1) + 1 - 1, 0.0]]))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, generator=g), torch.randn(100, generator=g)
    assert (grpo.k3(a, b) >= 0).all()


def test_clipped_surrogate_and_delta():
    ratio = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 5.0]])
    adv = torch.tensor([1.0, -1.0])
    out = grpo.clipped_surrogate(ratio, adv, 0.2, 0.2)
    torch.testing.assert_close(out, torch.tensor([[-1.2, -0.5, -1.1], [1.5, 0.8, 5.0]]))
    capped = grpo.clipped_surrogate(ratio, adv, 0.2, 0.2, delta=2.0)  # A < 0, ρ = 5: the cap bounds the loss
    assert capped[1, 2].item() == pytest.approx(2.0)
    high = grpo.clipped_surrogate(torch.tensor([[1.25]]), torch.tensor([1.0]), 0.2, 0.28)  # clip-higher
    assert high.item() == pytest.approx(-1.25)


def test_clip_counted_only_where_it_takes_effect():
    ratio = torch.tensor([[0.7, 1.3, 1.0, 0.5], [0.7, 1.3, 1.25, 9.0]])
    adv = torch.tensor([-1.0, 1.0])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    c = grpo.clip_fractions(ratio, adv, m, 0.2, 0.28)
    # row 0 (A<0): only 0.7 < 0.8 counts (1.3 with A<0 is not clipped; 0.5 is padding)
    # row 1 (A>0): 1.3 and 9.0 > 1.28 count; 0.7 with A>0 is not clipped; 1.25 is inside
    assert (c["low"].item(), c["high"].item(), c["region"].item()) == (1, 2, 3)


def _toy_logps(seed=0, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)[:B]
    return logits, targets, mask


def test_detail_4_on_policy_gradient_is_reinforce_and_gspo_matches():
    logits, targets, mask = _toy_logps()
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])

    def grad(level):
        logits.grad = None
        lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        ratio = grpo.importance_ratio(lp, lp.detach(), mask, level)
        grpo.aggregate(grpo.clipped_surrogate(ratio, adv, 0.2, 0.2), mask, "grpo").backward()
        return logits.grad.clone()

    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    ref = -(adv * (lp * mask).sum(1) / mask.sum(1)).mean()
    expected = torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(grad("token"), expected)
    torch.testing.assert_close(grad("sequence"), expected)


def test_detail_6_dapo_scaling_gives_the_global_batch_gradient():
    """The script's dapo scaling (loss over the global token count, times accumulation steps x processes, then
    accelerate's /accumulation and DDP's mean over processes) equals the gradient of one big batch; the per
    micro-batch 'bnpo' mean does not (lengths differ), so the check can fail."""
    logits, targets, mask = _toy_logps()
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])

    def per_token(rows):
        lp = torch.log_softmax(logits[rows], -1).gather(-1, targets[rows][..., None])[..., 0]
        return grpo.clipped_surrogate(torch.exp(lp - lp.detach()), adv[rows], 0.2, 0.2), mask[rows]

    L, m = per_token(slice(0, 4))
    full = torch.autograd.grad(grpo.aggregate(L, m, "dapo", num_items=mask.sum().item()), logits)[0]
    for loss_type, should_match in (("dapo", True), ("bnpo", False)):
        total = torch.zeros_like(logits)
        world, accum = 2, 2  # micro-batch (process p, step a) holds row 2p + a
        for p in range(world):
            for a in range(accum):
                L, m = per_token(slice(2 * p + a, 2 * p + a + 1))
                loss = grpo.aggregate(L, m, loss_type, num_items=mask.sum().item())
                scale = accum * world if loss_type == "dapo" else 1.0
                total += torch.autograd.grad(loss * scale / accum, logits)[0] / world
        assert torch.allclose(total, full, atol=1e-7) == should_match, loss_type


# ----------------------------------------------------------------------------- tier 2: runs
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "16", "--num_generations", "4", "--logging_steps", "1",
        "--eval_steps", "2", "--num_eval_prompts", "16", "--log_completions_steps", "1"]
ONE_STEP = ["--max_steps", "1", "--per_device_train_batch_size", "16", "--num_generations", "4", "--logging_steps",
            "1", "--eval_steps", "0", "--log_completions_steps", "1", "--num_completions_to_log", "16"]
REQUIRED = ["reward", "reward_std", "rewards/add_exact/mean", "rewards/add_exact/std", "frac_reward_zero_std",
            "completions/mean_length", "completions/min_length", "completions/max_length", "completions/clipped_ratio",
            "completions/mean_terminated_length", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
            "clip_ratio/region_mean", "num_tokens", "loss", "learning_rate", "grad_norm",
            "tokens_per_second/generation", "tokens_per_second/training", "train/skipped_steps"]


def _samples(out) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _reward_file(tmp_path, body: str, name: str = "my_rewards.py"):
    f = tmp_path / name
    f.write_text(textwrap.dedent(body))
    return f


def test_default_run_logs_metrics_and_moves_params(tmp_path, toy_policy):
    out = tmp_path / "run"
    run_script("grpo.py", *FAST, "--beta", "0.05", "--output_dir", str(out))
    recs = read_metrics(out)
    assert recs[0]["step"] == 0 and 0 <= recs[0]["eval/gold_reward"] <= 1
    assert recs[0]["eval/reward"] == recs[0]["eval/gold_reward"]  # the default reward is the gold reward
    last = recs[-1]
    for k in REQUIRED + ["kl", "eval/gold_reward", "eval/reward"]:
        assert k in last and last[k] is not None and math.isfinite(last[k]), k
    assert last["step"] == 2 and last["kl"] >= 0 and 0 <= last["reward"] <= 1 and last["train/skipped_steps"] == 0
    before, after = load_params(toy_policy), load_params(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert {"prompt", "completion", "add_exact", "advantage"} <= set(_samples(out)[0])


def test_user_reward_file_by_path_conversational_and_none(tmp_path, toy_policy):
    rf = _reward_file(tmp_path, """
        def short(prompts, completions, **kwargs):
            # conversational completions arrive as message lists; None for every other sample
            return [None if i % 2 else -float(len(c[-1]["content"])) for i, c in enumerate(completions)]
    """)
    out = tmp_path / "run"
    run_script("grpo.py", *FAST, "--dataset_name", "toy:add:conversational", "--reward_funcs", f"{rf}:short", "add",
               "--reward_weights", "0.1", "1.0", "--loss_type", "grpo", "--scale_rewards", "none",
               "--mask_truncated_completions", "True", "--output_dir", str(out))
    last = read_metrics(out)[-1]
    assert last["rewards/short/mean"] <= 0 and math.isfinite(last["reward"]) and math.isfinite(last["loss"])


def test_detail_2_unscored_samples_left_out_on_user_data_with_eval_fraction(tmp_path, toy_policy):
    """User prompts from a file, 25% held out: the held-out reward comes from the same source (eval/reward; no gold
    reward off the toy tasks). The reward scores every other sample (None otherwise) with a value that is the same
    within a group: every group's scored rewards are equal, so frac_reward_zero_std is 1 (NaN-aware: unscored
    samples are left out, not counted as 0) and every advantage is exactly 0."""
    from common import toy

    prompts = tmp_path / "prompts.jsonl"
    rows = toy.make_dataset("add", "prompt", n=64).to_list()
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    rf = _reward_file(tmp_path, """
        def by_prompt(prompts, completions, **kwargs):
            return [None if i % 2 else float(len(p)) for i, p in enumerate(prompts)]
    """)
    out = tmp_path / "run"
    run_script("grpo.py", *ONE_STEP, "--dataset_name", str(prompts), "--reward_funcs", f"{rf}:by_prompt",
               "--eval_fraction", "0.25", "--eval_steps", "1", "--output_dir", str(out))
    recs = read_metrics(out)
    assert recs[0]["step"] == 0 and recs[-1]["step"] == 1
    for r in (recs[0], recs[-1]):
        assert math.isfinite(r["eval/reward"]) and "eval/gold_reward" not in r
    last = recs[-1]
    assert last["frac_reward_zero_std"] == 1.0
    samples = _samples(out)
    assert len(samples) == 16 and all(s["advantage"] == 0.0 for s in samples)
    scored = [s["by_prompt"] for s in samples if s["by_prompt"] is not None]
    assert len(scored) == 8 and last["reward"] == pytest.approx(sum(scored) / 8)


@pytest.mark.parametrize("body,match", [
    ("    return [float('inf') if i == 3 else 1.0 for i in range(len(completions))]",
     r"reward function 'bad' returned inf for sample 3: prompt '.*', completion '.*'"),
    ("    return ['1' for _ in completions]", r"reward function 'bad' returned a value of type str"),
], ids=["inf", "string"])
def test_detail_2_bad_reward_stops_before_any_update(tmp_path, toy_policy, body, match):
    """A reward function returning inf (or a string) stops the run at the first scoring, naming the function and
    one sample, before any update: no model, no checkpoint, no training record was written."""
    import re

    rf = _reward_file(tmp_path, "def bad(prompts, completions, **kwargs):\n" + body + "\n")
    out = tmp_path / "run"
    proc = run_script("grpo.py", *ONE_STEP, "--reward_funcs", f"{rf}:bad", "--save_steps", "1", "--output_dir",
                      str(out), check=False)
    assert proc.returncode != 0 and re.search(match, proc.stderr), proc.stderr[-3000:]
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    assert not (out / "metrics.jsonl").exists() or all(r["step"] == 0 for r in read_metrics(out))


def test_detail_10_constant_reward_warns_naming_the_source(tmp_path, toy_policy):
    rf = _reward_file(tmp_path, """
        def exact(prompts, completions, answer=None, **kwargs):
            return [0.0 for _ in completions]  # e.g. a string compared with an int column: never equal
    """)
    proc = run_script("grpo.py", *ONE_STEP, "--reward_funcs", f"{rf}:exact", "--log_completions_steps", "0",
                      "--output_dir", str(tmp_path / "run"))
    assert proc.stderr.count("WARNING: no reward varied") == 1
    assert "exact" in proc.stderr.split("WARNING: no reward varied")[1][:300]


def test_reward_model_combined_with_a_function(tmp_path, toy_rm):
    out = tmp_path / "run"
    run_script("grpo.py", *FAST, "--max_steps", "1", "--reward_funcs", "add", "--reward_model_name_or_path", "toy-rm",
               "--reward_weights", "1.0", "0.5", "--output_dir", str(out))
    last = read_metrics(out)[-1]
    assert math.isfinite(last["rewards/toy-rm/mean"]) and last["rewards/toy-rm/std"] > 0
    expected = last["rewards/add_exact/mean"] + 0.5 * last["rewards/toy-rm/mean"]
    assert last["reward"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--dataset_name", "{bad}", "--reward_funcs", "add"], "columns"),
    (["--reward_funcs", "add", "add", "--reward_weights", "1.0"], "--reward_weights has 1 values but there are 2"),
    (["--per_device_train_batch_size", "10", "--num_generations", "4"], "num_generations"),
    (["--loss_type", "ppo"], "loss_type"),
    (["--dataset_name", "{small}", "--reward_funcs", "add"], "fewer than one global batch"),
    (["--dataset_name", "{small}"], "--reward_funcs"),  # no default reward off the toy tasks
    (["--output_dir", "{used}"], "--overwrite_output_dir"),
])
def test_bad_inputs_fail_early(tmp_path, flags, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1+1=2"}\n' * 8)
    small = tmp_path / "small.jsonl"  # 3 prompts; one generation batch needs 16 / 4 = 4
    small.write_text('{"prompt": "1+1="}\n' * 3)
    used = tmp_path / "used"  # another run's folder
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    (used / "args.json").write_text('{"exp_name": "other"}')
    flags = [f.replace("{bad}", str(bad)).replace("{small}", str(small)).replace("{used}", str(used)) for f in flags]
    proc = run_script("grpo.py", "--output_dir", str(tmp_path / "o"), "--per_device_train_batch_size", "16",
                      "--num_generations", "4", *flags, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr  # failed before any model was loaded
    assert (used / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the other run's files are untouched


def test_detail_6_gradient_accumulation_4x2_equals_1x8_for_dapo(tmp_path, toy_policy):
    common = ["--max_steps", "2", "--num_generations", "4", "--loss_type", "dapo", "--eval_steps", "0",
              "--log_completions_steps", "0", "--logging_steps", "1", "--max_grad_norm", "0"]
    run_script("grpo.py", *common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "a"))
    run_script("grpo.py", *common, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
               "--output_dir", str(tmp_path / "b"))
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb):
        assert ra["reward"] == rb["reward"]  # the same samples
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
    assert_params_close(tmp_path / "a", tmp_path / "b", atol=2e-6)


def test_resume_continues_exactly(tmp_path, toy_policy):
    """4 steps in one go == 2 steps, stop, resume from checkpoint-2 for 2 more (data order, sampling RNG, optimizer
    state and the old-log-prob schedule of num_iterations all restored)."""
    common = ["--max_steps", "4", "--per_device_train_batch_size", "16", "--num_generations", "4", "--eval_steps", "0",
              "--log_completions_steps", "0", "--logging_steps", "1", "--num_iterations", "2", "--save_steps", "2"]
    run_script("grpo.py", *common, "--output_dir", str(tmp_path / "full"))
    run_script("grpo.py", *common, "--output_dir", str(tmp_path / "cut"), "--max_steps", "2")
    run_script("grpo.py", *common, "--output_dir", str(tmp_path / "cut"), "--resume_from",
               str(tmp_path / "cut" / "checkpoint-2"))
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert full[2]["reward"] == cut[2]["reward"] and full[3]["loss"] == pytest.approx(cut[3]["loss"], abs=1e-7)
    assert_params_close(tmp_path / "full", tmp_path / "cut", atol=1e-7)


def test_detail_1_two_processes_match_one_process(tmp_path, toy_policy):
    multiprocess_matches_single(tmp_path, "grpo.py", ["--loss_type", "dapo", "--scale_rewards", "batch",
                                                      "--num_iterations", "2"])


# ----------------------------------------------------------------------------- tier 3: learning
@pytest.mark.slow
def test_default_run_raises_heldout_gold_reward(tmp_path, toy_policy):
    out = tmp_path / "run"
    run_script("grpo.py", "--output_dir", str(out), timeout=1800)
    recs = [r for r in read_metrics(out) if r.get("eval/gold_reward") is not None]
    start, final = recs[0]["eval/gold_reward"], recs[-1]["eval/gold_reward"]
    assert final >= start + 0.05, (start, final)


def test_top_k_0_samples_from_the_whole_vocabulary_and_top_k_n_from_the_n_most_likely():
    """--top_k 0 is off (HF generate would otherwise fall back to its default top-50): a fresh toy model (nearly
    uniform over its 104 tokens) then draws more than 50 distinct tokens at the first position; --top_k 3 draws
    only the 3 most likely ones there."""
    from common import generation, model as model_utils

    tok = model_utils.load_tokenizer("toy")
    model = model_utils.load_causal_lm("toy", tok, seed=0)
    prompt = tok("<bos>12+34=", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        top3 = set(model(input_ids=torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist())
    first = {}
    for k in (0, 3):
        gen = generation.HFGenerator(tok, generation.SamplingConfig(temperature=1.0, top_k=k, max_new_tokens=1))
        torch.manual_seed(0)
        first[k] = set(gen.generate(model, [prompt], n=400).completion_ids[:, 0].tolist())
    assert len(tok) > 50 and len(first[0]) > 50
    assert first[3] <= top3
