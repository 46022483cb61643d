"""PPO: each testable implementation detail of algos/ppo.py's docstring (test names say which: test_dN_...) against
hand computations or slow reference loops, then runs through the entry point (batch invariances, exact resume, the
saved policy and checkpoint contents, start-up errors) and, marked slow, learning on the toy task."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import (assert_params_close, load_params, read_metrics, run_script,
                      run_with_fake_sampler)

import ppo

QUICK = ["--max_steps", "2", "--eval_steps", "0", "--log_completions_steps", "0", "--logging_steps", "1"]
TRL_NAMES = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
             "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/num_eos_tokens", "val/ratio",
             "val/ratio_var")


# ----------------------------------------------------------------------------- tier 1: math
def slow_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one completion at a time, V = 0 after the last token."""
    adv = torch.zeros_like(rewards)
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            running = delta + gamma * lam * running
            adv[i, t] = running
    return adv


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def test_d11_gae_matches_a_slow_reference_loop():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 4]
    mask = prefix_mask(lengths, 5)
    rewards, values = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)  # garbage at padding
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.99, 0.0)):
        adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, slow_gae(rewards, values, lengths, gamma, lam))
        torch.testing.assert_close(ret, (adv + values) * mask)
        assert torch.equal(adv * (1 - mask), torch.zeros_like(adv))


def test_d11_gamma_lambda_one_gives_returns_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 1.5, 9.0], [0.3, 2.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0], [-1.0, 0.2, 9.0, 9.0]])
    mask = prefix_mask([3, 2], 4)
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    to_go = torch.tensor([[1.4, 1.3, 1.5, 0.0], [2.3, 2.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, (to_go - values) * mask)
    torch.testing.assert_close(ret, to_go)  # value targets = Monte-Carlo returns


def test_d12_advantage_whitening_over_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = prefix_mask([3, 1], 4)
    w = ppo.masked_whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mean 2.5, Bessel var 5/3
    torch.testing.assert_close(w[mask.bool()], (valid - 2.5) / math.sqrt(5 / 3 + 1e-8))
    assert torch.equal(w[~mask.bool()], torch.zeros(4))
    assert ppo.masked_mean(w, mask).abs() < 1e-6 and ppo.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        ppo.masked_whiten(x, prefix_mask([1, 0], 4))


def test_d10_reward_whitening_scales_without_shifting_the_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [6.0, 0.0, 0.0]])
    mask = prefix_mask([3, 1], 3)
    w = ppo.masked_whiten(x, mask, shift_mean=False)
    valid = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(w[mask.bool()], (valid - 3.0) / valid.std() + 3.0)
    assert ppo.masked_mean(w, mask).item() == pytest.approx(3.0)


def test_d7_score_on_the_last_real_token_kl_on_every_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 7.0, 7.0]])
    mask = prefix_mask([3, 1], 3)
    rewards, non_score = ppo.per_token_rewards(kl * mask, torch.tensor([2.0, -1.0]), mask, beta=0.5)
    torch.testing.assert_close(non_score, torch.tensor([[-0.05, -0.1, -0.15], [-0.25, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 1.85], [-1.25, 0.0, 0.0]]))


def test_d8_kl_estimators_by_hand():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(ppo.kl_penalty(lp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    torch.testing.assert_close(ppo.kl_penalty(lp, ref, "k3"), torch.tensor([k3]))
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo.kl_penalty(lp, ref, "k2")


def test_d14_equal_log_probs_give_ratio_one_no_clipping_and_minus_advantage():
    lp = torch.tensor([[-1.0, -0.5, -3.0]])
    adv = torch.tensor([[1.5, -2.0, 0.25]])
    loss, ratio, clipped = ppo.clipped_policy_loss(lp, lp.clone(), adv, 0.2)
    assert torch.equal(ratio, torch.ones_like(lp)) and not clipped.any()
    torch.testing.assert_close(loss, -adv)


def test_policy_clip_by_hand():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))  # ρ = 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, ratio, clipped = ppo.clipped_policy_loss(lp, old, adv, 0.2)
    # max(-Aρ, -A clip(ρ)): A>0, ρ>1+ε -> -1.2 (clipped); A<0, ρ>1+ε -> 1.5; A>0, ρ<1-ε -> -0.5; A<0, ρ<1-ε -> 0.8
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]


def test_d16_value_clip_by_hand():
    v_old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    v_new = torch.tensor([[1.5, 1.5, 1.1, 0.0]])
    ret = torch.tensor([[2.0, 0.0, 1.0, 1.0]])
    loss, clipped = ppo.clipped_value_loss(v_new, v_old, ret, 0.2)
    # V_clip = 1.2, 1.2, 1.1, 0.8
    # (V-G)² = .25, 2.25, .01, 1;  (V_clip-G)² = .64, 1.44, .01, .04;  ½ max
    torch.testing.assert_close(loss, torch.tensor([[0.32, 1.125, 0.005, 0.5]]))
    assert clipped.tolist() == [[True, False, False, False]]


def test_d4_truncation_after_the_first_stop_token():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    out, mask, term = ppo.truncate_after_stop(ids, eos, pad)
    assert out.tolist() == [[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert term.tolist() == [True, False, True]
    out, mask, term = ppo.truncate_after_stop(ids, 6, pad)  # another stop token
    assert mask[0].tolist() == [1, 1, 0, 0, 0] and term.tolist() == [True, False, False]


def test_d6_missing_eos_penalty():
    s = torch.tensor([1.0, 0.5, -2.0])
    term = torch.tensor([True, False, False])
    torch.testing.assert_close(ppo.apply_missing_eos_penalty(s, term, 1.0), torch.tensor([1.0, -0.5, -3.0]))
    assert torch.equal(ppo.apply_missing_eos_penalty(s, term, None), s)


def test_d9_adaptive_kl_controller_update():
    # proportional error clipped to ±0.2, scaled by n / horizon
    assert ppo.adaptive_kl_update(0.1, 1.1, 1.0, 1000, 100) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert ppo.adaptive_kl_update(0.1, 5.0, 1.0, 1000, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert ppo.adaptive_kl_update(0.1, 0.0, 1.0, 1000, 100) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert ppo.adaptive_kl_update(0.1, 2.0, 2.0, 1000, 100) == 0.1


def test_d13_micro_batches_cover_each_mini_batch_once():
    B, W, GA, nmb = 2, 3, 2, 2
    perm = torch.randperm(B * W * GA * nmb, generator=torch.Generator().manual_seed(0))
    for j in range(nmb):
        got = torch.cat([ppo.micro_rows(perm, j, m, r, B, W, GA) for m in range(GA) for r in range(W)])
        assert sorted(got.tolist()) == sorted(perm[j * B * W * GA:(j + 1) * B * W * GA].tolist())
    assert torch.equal(ppo.epoch_permutation(10, 1, 3, 2), ppo.epoch_permutation(10, 1, 3, 2))
    assert not torch.equal(ppo.epoch_permutation(10, 1, 3, 2), ppo.epoch_permutation(10, 1, 3, 1))


def test_d5_tokenizer_mismatch_is_found(toy_policy):
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(toy_policy), AutoTokenizer.from_pretrained(toy_policy)
    assert ppo.tokenizer_mismatch(a, b) is None
    b.add_tokens(["<extra>"])
    assert "vocabularies differ" in ppo.tokenizer_mismatch(a, b)


def test_d1_fresh_value_head_starts_at_zero(toy_policy):
    vm = ppo.load_value_model("toy-sft", "toy:add", fresh_head=True)
    ids = torch.tensor([[1, 20, 21, 22, 23]])
    v = ppo.token_values(vm, vm.score, ids, torch.ones_like(ids), 3)
    assert v.shape == (1, 3) and torch.equal(v, torch.zeros(1, 3))


@pytest.mark.parametrize("flags,message", [
    ({"kl_estimator": "k2"}, "--kl_estimator"),
    ({"per_device_train_batch_size": 6, "num_generations": 4}, "--num_generations"),
    ({"num_mini_batches": 0}, "--num_mini_batches"),
    ({"reward_funcs": ["add"], "reward_model_name_or_path": "toy-rm"}, "--reward_funcs model:"),
    ({"kl_target": 1.0, "beta": 0.0}, "--beta > 0"),
])
def test_bad_flags_are_rejected(flags, message):
    with pytest.raises(ValueError, match=message):
        ppo.check_args(ppo.Args(**flags))


# ----------------------------------------------------------------------------- tier 2: runs
def test_d3_d14_first_minibatch_ratio_is_exactly_one_and_beta_zero_gives_rlhf_reward_equal_score(tmp_path,
                                                                                                   toy_policy):
    """One epoch, one mini-batch of 2 micro-batches, temperature 0.7: every trained log-prob is the rollout's own,
    bitwise (so the update uses the rollout's temperature too). With β = 0 and the policy = the reference (first
    rollout) the non-score reward is 0 and rlhf_reward = score. The run also logs every TRL metric, evaluates, and
    writes a policy that reloads and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    run_script("ppo.py", "--max_steps", "1", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
               "--num_ppo_epochs", "1", "--beta", "0", "--temperature", "0.7", "--eval_steps", "1",
               "--num_eval_prompts", "8", "--logging_steps", "1", "--output_dir", str(out))
    recs = read_metrics(out)
    assert recs[0]["step"] == 0 and "eval/gold_reward" in recs[0]
    r = recs[-1]
    for k in TRL_NAMES + ("eval/gold_reward", "eval/reward", "rewards/toy-rm/mean", "completions/mean_length",
                          "episode", "train/skipped_steps", "grad_norm"):
        assert r.get(k) is not None and math.isfinite(r[k]), k
    assert r["val/ratio"] == 1.0 and r["val/ratio_var"] == 0.0
    assert r["policy/clipfrac_avg"] == 0.0 and r["policy/approxkl_avg"] == 0.0 and r["val/clipfrac_avg"] == 0.0
    assert abs(r["loss/policy_avg"]) < 1e-6  # -mean of whitened advantages over the whole rollout
    assert r["objective/non_score_reward"] == 0.0 and r["objective/rlhf_reward"] == r["objective/scores"]
    assert abs(r["objective/kl"]) < 1e-5  # sampled from the reference itself
    assert r["episode"] == 8 and r["val/num_eos_tokens"] == pytest.approx(8 * (1 - r["completions/clipped_ratio"]))
    assert r["train/skipped_steps"] == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("12+34=", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]
    assert any(not torch.equal(v, load_params(toy_policy)[k]) for k, v in load_params(out).items())


SHARED = [*QUICK, "--num_mini_batches", "2", "--num_ppo_epochs", "2", "--kl_target", "0.1", "--kl_horizon", "100",
          "--save_steps", "2"]


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory, toy_policy, toy_rm):
    """The runs several tests compare (each costs a process start): 3 rollouts of 8 completions in 2 mini-batches
    with an adaptive β, as 1 micro-batch of 8 ('a') and as 4 accumulated micro-batches of 2 ('b'); and 'a' cut
    after 2 rollouts, then resumed from its checkpoint for the third ('cut')."""
    d = tmp_path_factory.mktemp("ppo_runs")
    one = [*SHARED, "--per_device_train_batch_size", "8"]
    run_script("ppo.py", *one, "--max_steps", "3", "--output_dir", str(d / "a"))
    run_script("ppo.py", *SHARED, "--max_steps", "3", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "4", "--output_dir", str(d / "b"))
    run_script("ppo.py", *one, "--max_steps", "2", "--output_dir", str(d / "cut"))
    run_script("ppo.py", *one, "--max_steps", "3", "--output_dir", str(d / "cut"),
               "--resume_from", str(d / "cut" / "checkpoint-2"))
    return d


def test_gradient_accumulation_4x2_equals_1x8(shared_runs):
    ma, mb = read_metrics(shared_runs / "a"), read_metrics(shared_runs / "b")
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb):
        assert ra["objective/scores"] == pytest.approx(rb["objective/scores"], abs=1e-5)  # the same samples
        for k in ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "val/ratio", "objective/kl",
                  "objective/kl_coef", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
    assert_params_close(shared_runs / "a", shared_runs / "b", atol=2e-6)


def test_resume_is_exact_and_checkpoints_hold_both_models(shared_runs, toy_rm):
    """3 rollouts in one go == 2, stop, resume from checkpoint-2 for 1 more: data order, sampling RNG, both models,
    the optimizer (one parameter group per model) and the adaptive β restored. The checkpoint holds the value model
    (trained away from the reward model it started from) beside the policy, the optimizer state of both groups and
    β; its top-level model is the policy alone."""
    from safetensors.torch import load_file

    full, cut = read_metrics(shared_runs / "a"), read_metrics(shared_runs / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3]
    assert full[1]["objective/kl_coef"] != full[0]["objective/kl_coef"]  # β adapted, so restoring it matters
    for k in ("objective/scores", "objective/kl_coef", "loss/policy_avg", "loss/value_avg", "objective/kl"):
        assert full[2][k] == pytest.approx(cut[2][k], rel=1e-6, abs=1e-7), k
    assert_params_close(shared_runs / "a", shared_runs / "cut", atol=1e-7)
    ckpt = shared_runs / "a" / "checkpoint-2"
    both = load_file(str(ckpt / "state" / "model_0.safetensors"))
    value = {k[len("value."):]: v for k, v in both.items() if k.startswith("value.")}
    rm = load_params(toy_rm)
    assert value.keys() == rm.keys() and any(not torch.equal(value[k], rm[k]) for k in rm)
    policy = {k[len("policy."):]: v for k, v in both.items() if k.startswith("policy.")}
    top = load_params(ckpt)  # the from_pretrained-loadable model: the policy
    for k, v in top.items():  # a tied embedding is stored once, under either name
        other = policy.get(k, policy.get("lm_head.weight") if k == "model.embed_tokens.weight" else None)
        assert other is not None and torch.equal(v, other), k
    assert not (ckpt / "state" / "model_1.safetensors").exists()
    opt = torch.load(ckpt / "state" / "optimizer_0.pt", weights_only=True)
    assert len(opt["param_groups"]) == 2  # policy, value model
    assert set(opt["state"]) == {i for g in opt["param_groups"] for i in g["params"]}  # both groups stepped
    saved = json.loads((ckpt / "trainer_state.json").read_text())["state"]
    assert saved["kl_coef"] == pytest.approx(full[2]["objective/kl_coef"])  # the β the third rollout used


def test_two_processes_match_one_process(tmp_path, toy_policy):
    """2 processes x 4 == 1 process x 8 on identical samples (a deterministic fake sampler), with the reward model,
    two shuffled mini-batches and an adaptive β: the rollout statistics, the losses and the final policy."""
    common = [*QUICK, "--num_mini_batches", "2", "--num_ppo_epochs", "2", "--kl_target", "0.1", "--kl_horizon", "100"]
    run_with_fake_sampler(tmp_path, "ppo.py", [*common, "--per_device_train_batch_size", "8", "--output_dir",
                                               str(tmp_path / "one")], 1)
    run_with_fake_sampler(tmp_path, "ppo.py", [*common, "--per_device_train_batch_size", "4", "--output_dir",
                                               str(tmp_path / "two")], 2)
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        for k in (*TRL_NAMES, "objective/kl_coef", "grad_norm", "completions/mean_length"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert_params_close(tmp_path / "one", tmp_path / "two", atol=2e-6)


def test_d5_reward_model_with_another_tokenizer_fails_at_startup(tmp_path, toy_rm):
    from transformers import AutoTokenizer

    bad = tmp_path / "rm_other_tokenizer"
    shutil.copytree(toy_rm, bad)
    tok = AutoTokenizer.from_pretrained(bad)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(bad)
    proc = run_script("ppo.py", "--reward_model_name_or_path", str(bad), "--output_dir", str(tmp_path / "o"),
                      check=False)
    assert proc.returncode != 0 and "tokenizer differs" in proc.stderr and "--reward_funcs model:" in proc.stderr
    assert "Loading weights" not in proc.stderr and not (tmp_path / "o").exists()


def test_d18_non_finite_reward_model_score_stops_before_any_update(tmp_path, toy_rm):
    from transformers import AutoModelForSequenceClassification

    bad = tmp_path / "rm_nan"
    shutil.copytree(toy_rm, bad)
    rm = AutoModelForSequenceClassification.from_pretrained(bad, num_labels=1)
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    rm.save_pretrained(bad)
    out = tmp_path / "o"
    proc = run_script("ppo.py", "--reward_model_name_or_path", str(bad), "--value_model_name_or_path", str(toy_rm),
                      *QUICK, "--per_device_train_batch_size", "4", "--output_dir", str(out), check=False)
    assert proc.returncode != 0 and "returned nan" in proc.stderr and "before the update" in proc.stderr
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()


try:
    import vllm  # noqa: F401

    HAS_VLLM, WHY = True, ""
except Exception as e:  # absent, or a broken install
    HAS_VLLM, WHY = False, f"vllm is not importable ({type(e).__name__}: {e}); install the optional vllm extra"


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason=WHY)
def test_vllm_sampling_matches_the_trained_policy(tmp_path):
    """--use_vllm (colocated engine): the sampler's log-probs agree with the trainer's old log-probs, rollout after
    rollout (the engine gets the weights after every update)."""
    out = tmp_path / "run"
    run_script("ppo.py", "--use_vllm", "True", "--vllm_mode", "colocate", "--vllm_kv_cache_gb", "0.0625", *QUICK,
               "--per_device_train_batch_size", "8", "--output_dir", str(out),
               env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    recs = read_metrics(out)
    assert len(recs) == 2 and all(r["sampling/sampling_logp_difference/max"] < 1e-3 for r in recs), recs


# ----------------------------------------------------------------------------- tier 3: learning
@pytest.mark.slow
def test_default_run_raises_heldout_gold_reward_with_the_reward_model(tmp_path, toy_policy):
    out = tmp_path / "run"
    run_script("ppo.py", "--output_dir", str(out), timeout=2400)
    recs = [r for r in read_metrics(out) if r.get("eval/gold_reward") is not None]
    assert recs[-1]["eval/gold_reward"] >= recs[0]["eval/gold_reward"] + 0.1, (recs[0], recs[-1])


@pytest.mark.slow
def test_gold_reward_run_raises_heldout_gold_reward(tmp_path, toy_policy):
    out = tmp_path / "run"
    run_script("ppo.py", "--reward_funcs", "add", "--output_dir", str(out), timeout=2400)
    recs = [r for r in read_metrics(out) if r.get("eval/gold_reward") is not None]
    assert recs[-1]["eval/gold_reward"] >= recs[0]["eval/gold_reward"] + 0.05, (recs[0], recs[-1])
