"""V-MPO (algos/vmpo.py): the E-step, the duals and the KL estimators against hand computations (tier 1), the script
through its entry point in every data mode and with every KL estimator (tier 2), and learning on the toy task (tier 3,
slow)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import accelerate_launcher, read_metrics, run_script

import vmpo
from vmpo import (Args, Duals, alpha_dual_loss, check_args, check_degenerate, compute_advantages, dual_optimizer,
                  estep_weights, eta_dual_loss, select_top, sequence_kl, vmpo_loss, weights_kl_from_uniform)

SEED_METRICS = ["vmpo/rewards_mean", "vmpo/rewards_std", "vmpo/advantages_mean", "vmpo/advantages_std",
                "vmpo/top_advantages_mean", "vmpo/top_advantages_std", "vmpo/weights_entropy",
                "vmpo/selected_fraction", "vmpo/eta", "vmpo/eta_loss", "vmpo/alpha", "vmpo/kl_mean",
                "vmpo/logps_policy", "vmpo/logps_ref", "vmpo/logps_old", "vmpo/policy_loss", "vmpo/kl_loss",
                "vmpo/ref_anchor_loss", "vmpo/reward_ema_baseline", "vmpo/near_zero_kl_streak", "vmpo/loss",
                "vmpo/weights_kl_uniform"]


# ----------------------------------------------------------------------------- tier 1: math
def test_weights_sum_to_one_on_selected_and_zero_elsewhere():
    """E-step: ψ is a softmax over the ceil(ρN) largest advantages and 0 elsewhere (spec 1.7.4)."""
    torch.manual_seed(0)
    adv = torch.randn(10)
    sel = select_top(adv, 0.5)
    assert sel.sum() == 5 and set(torch.nonzero(sel).flatten().tolist()) == set(adv.topk(5).indices.tolist())
    w = estep_weights(adv, sel, 0.7)
    assert torch.allclose(w.sum(), torch.tensor(1.0)) and (w[~sel] == 0).all() and (w[sel] > 0).all()
    expected = torch.softmax(adv[sel] / 0.7, 0)  # hand formula on the selected set
    assert torch.allclose(w[sel], expected)
    # selected fraction = ceil(ρN)/N, at least one sample
    assert select_top(torch.randn(7), 0.5).sum() == 4
    assert select_top(torch.randn(7), 0.01).sum() == 1
    assert select_top(torch.randn(7), 1.0).all()


def test_eta_dual_gradient_is_eps_minus_kl_from_uniform():
    """η dual: dL_η/dη = ε_η - KL(ψ‖U) (spec 1.7.1)."""
    torch.manual_seed(1)
    adv = torch.randn(12)
    sel = select_top(adv, 0.5)
    for eta_value in (0.3, 1.0, 4.0):
        eta = torch.tensor(eta_value, requires_grad=True)
        eta_dual_loss(eta, adv, sel, 0.1).backward()
        w = estep_weights(adv, sel, eta_value)
        assert eta.grad.item() == pytest.approx(0.1 - weights_kl_from_uniform(w, sel), abs=1e-5)


def test_eta_dual_settles_weights_kl_at_eps_eta():
    """Choice 3: the log-parameterised η with Adam drives KL(ψ‖U) to ε_η."""
    torch.manual_seed(2)
    adv = torch.randn(64)
    sel = select_top(adv, 0.5)
    for eps in (0.05, 0.3):
        duals = Duals(eta_init=1.0, alpha_init=1.0)
        opt = dual_optimizer(duals, eta_lr=0.05, alpha_lr=0.05)
        for _ in range(600):
            opt.zero_grad()
            eta_dual_loss(duals.eta(), adv, sel, eps).backward()
            opt.step()
        kl = weights_kl_from_uniform(estep_weights(adv, sel, duals.eta().item()), sel)
        assert kl == pytest.approx(eps, abs=0.01)


def test_eta_limits_filtered_behaviour_cloning_and_argmax():
    """η -> ∞: filtered behaviour cloning (ρ = 1: SFT); η -> 0: one-hot on the best sample (spec 1.7.2)."""
    torch.manual_seed(3)
    adv, s = torch.randn(8), torch.randn(8)
    sel = select_top(adv, 0.5)
    w_big = estep_weights(adv, sel, 1e6)  # η -> ∞: uniform on the top half = filtered behaviour cloning
    loss, _ = vmpo_loss(w_big, s, torch.zeros(8), 0.0, None, 8)
    assert loss.item() == pytest.approx(-s[sel].mean().item(), abs=1e-5)
    w_small = estep_weights(adv, sel, 1e-6)  # η -> 0: one-hot on the best sample
    assert w_small[adv.argmax()].item() == pytest.approx(1.0) and w_small.sum().item() == pytest.approx(1.0)
    assert weights_kl_from_uniform(w_small, sel) == pytest.approx(math.log(4), abs=1e-4)
    # ρ = 1 and η -> ∞: plain SFT on every sample
    loss, _ = vmpo_loss(estep_weights(adv, select_top(adv, 1.0), 1e6), s, torch.zeros(8), 0.0, None, 8)
    assert loss.item() == pytest.approx(-s.mean().item(), abs=1e-5)


def test_alpha_dual_rises_above_eps_and_falls_below():
    """Choice 3: α grows while KL > ε_α, shrinks below it, and the log-space clamp holds it at its bound."""
    for kl, direction in ((0.5, 1), (0.0, -1)):
        duals = Duals(1.0, 1.0)
        opt = dual_optimizer(duals, 0.05, 0.05)
        for _ in range(10):
            opt.zero_grad()
            alpha_dual_loss(duals.alpha(), kl, eps_alpha=0.1).backward()
            opt.step()
        assert (duals.alpha().item() - 1.0) * direction > 0.3
    duals = Duals(1.0, 1.0)  # the projection keeps α within its bounds
    opt = dual_optimizer(duals, 1.0, 1.0)
    for _ in range(50):
        opt.zero_grad()
        alpha_dual_loss(duals.alpha(), 0.0, 0.1).backward()
        opt.step()
        duals.clamp_(1e-8, 100, 1e-2, 100)
    assert duals.alpha().item() == pytest.approx(1e-2)


def _categorical_sequences(n: int, seed: int = 0):
    """One-token 'sequences' from three categorical policies: samples from each, and their log-probs."""
    g = torch.Generator().manual_seed(seed)
    logits = {"pol": torch.tensor([1.0, 0.0, -1.0, 0.5]), "old": torch.tensor([0.2, 0.3, -0.5, 0.0]),
              "ref": torch.tensor([-0.5, 1.0, 0.0, 0.0])}
    logp = {k: torch.log_softmax(v, 0) for k, v in logits.items()}
    return logits, logp, g


@pytest.mark.parametrize("estimator", ["ref", "old_policy", "old_policy_ref", "behavior"])
def test_kl_estimators_zero_for_identical_models_and_positive_otherwise(estimator):
    """Choice 1: each estimator is 0 for identical models and matches the exact KL on samples of its sampler."""
    logits, logp, g = _categorical_sequences(0)
    same = torch.randn(50)
    val, sur = sequence_kl(estimator, same, same, same, same)
    assert torch.all(val == 0) and torch.all(sur == 0)
    # samples come from π_θ for `ref` and from π_old / the behaviour policy otherwise (choice 1)
    src = "pol" if estimator == "ref" else "old"
    y = torch.multinomial(logp[src].exp(), 200_000, replacement=True, generator=g)
    s_pol, s_ref, s_old = logp["pol"][y], logp["ref"][y], logp["old"][y]
    val, _ = sequence_kl(estimator, s_pol, s_ref, s_old, s_old)
    p, q = (logp["pol"], logp["ref"]) if estimator == "ref" else (logp["old"], logp["pol"])
    exact = (p.exp() * (p - q)).sum().item()
    assert exact > 0.05 and val.mean().item() == pytest.approx(exact, rel=0.05)


def test_kl_loss_gradients_match_exact_kl_gradients():
    """Choice 2: on samples of the policy, the ref surrogate's gradient is ∇KL(π_θ‖π_ref); on samples of π_old the
    old_policy term's gradient is ∇KL(π_old‖π_θ)."""
    logits, logp, g = _categorical_sequences(1)
    theta = logits["pol"].clone().requires_grad_(True)
    for estimator, src in (("ref", "pol"), ("old_policy", "old")):
        exact_kl = (lambda lp: (lp.exp() * (lp - logp["ref"])).sum()) if estimator == "ref" else \
            (lambda lp: (logp["old"].exp() * (logp["old"] - lp)).sum())
        (exact_grad,) = torch.autograd.grad(exact_kl(torch.log_softmax(theta, 0)), theta)
        y = torch.multinomial(logp[src].exp(), 400_000, replacement=True, generator=g)
        s_pol = torch.log_softmax(theta, 0)[y]
        _, sur = sequence_kl(estimator, s_pol, logp["ref"][y], logp["old"][y], None)
        (est_grad,) = torch.autograd.grad(sur.mean(), theta)
        assert torch.allclose(est_grad, exact_grad, atol=0.01), (estimator, est_grad, exact_grad)


def test_advantage_baselines_and_norms_compose():
    """Choice 5: baselines and scales compose; the scale only divides, so an EMA baseline survives it."""
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    a = compute_advantages(r, "per_prompt", "per_prompt")
    assert torch.allclose(a, torch.tensor([[1.0, -1.0], [0.0, 0.0], [0.0, 0.0]]))  # tied prompts -> 0, not NaN
    a = compute_advantages(r, "batch", "none")
    assert torch.allclose(a, r - 0.5)
    # the EMA baseline survives normalisation (the scale only divides)
    ema = vmpo.update_ema(vmpo.update_ema(None, 0.2, 0.9), 0.5, 0.9)
    assert ema == pytest.approx(0.9 * 0.2 + 0.1 * 0.5)
    a = compute_advantages(r, "ema", "batch", ema=ema)
    assert torch.allclose(a, (r - ema) / r.std(unbiased=False))
    assert a.mean().item() == pytest.approx((0.5 - ema) / 0.5)


def test_micro_batch_losses_add_up_to_the_full_batch_loss():
    """Choice 4: micro-batch shares of the loss add up to the loss of the whole step."""
    torch.manual_seed(4)
    adv, s, kl = torch.randn(8), torch.randn(8), torch.rand(8)
    w = estep_weights(adv, select_top(adv, 0.5), 0.5)
    full, _ = vmpo_loss(w, s, kl, 0.7, 0.1 * kl, 8)
    parts = sum(vmpo_loss(w[i:i + 2], s[i:i + 2], kl[i:i + 2], 0.7, 0.1 * kl[i:i + 2], 8)[0] for i in range(0, 8, 2))
    assert full.item() == pytest.approx(parts.item(), abs=1e-6)


def test_degenerate_configurations_fail_with_the_reason():
    """Choice 6: degenerate configurations raise (or warn) with the reason."""
    check_degenerate(Args(), k=2, num_global=64, has_behavior=False)
    with pytest.raises(ValueError, match="every advantage"):
        check_degenerate(Args(k=1, baseline="per_prompt", adv_norm="none"), k=1, num_global=32, has_behavior=False)
    with pytest.raises(ValueError, match="every advantage"):
        check_degenerate(Args(k=1, adv_norm="per_prompt", baseline="per_prompt"), k=1, num_global=32,
                         has_behavior=False)
    check_degenerate(Args(k=1, baseline="batch", adv_norm="batch"), k=1, num_global=32, has_behavior=False)
    with pytest.raises(ValueError, match="log\\(n selected\\)"):
        check_degenerate(Args(eps_eta=math.log(2)), k=2, num_global=4, has_behavior=False)
    with pytest.raises(ValueError, match="behaviour log-probs"):
        check_degenerate(Args(kl_estimator="behavior"), k=2, num_global=64, has_behavior=False)
    check_degenerate(Args(kl_estimator="behavior"), k=2, num_global=64, has_behavior=True)
    with pytest.raises(ValueError, match="adv_norm per_prompt"):
        check_args(Args(baseline="ema", adv_norm="per_prompt"))
    with pytest.raises(ValueError, match="kl_estimator"):
        check_args(Args(kl_estimator="k3"))
    with pytest.warns(UserWarning, match="every step"):
        check_args(Args(old_policy_sync_steps=1))


def test_batch_scale_is_the_std_of_the_per_prompt_centred_advantages():
    """Choice 5: with --baseline per_prompt --adv_norm batch the scale is the std of r - mean_k r (as the fork and
    dar.py), not the std of the raw rewards (about sqrt((K-1)/K) of it: 0.71x at K = 2)."""
    import dar

    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    # centred: [0.5, -0.5, 0, 0, 0, 0]; biased std over the 6 samples = sqrt(0.5 / 6) = 0.288675
    a = compute_advantages(r, "per_prompt", "batch")
    s = math.sqrt(0.5 / 6)
    assert a.flatten().tolist() == pytest.approx([0.5 / s, -0.5 / s, 0, 0, 0, 0], rel=1e-5)
    assert torch.allclose(a, dar.dar_advantages(r, "batch"))  # vmpo and dar agree
    # a batch baseline (or an EMA) is a constant shift: its std is the raw rewards' std
    assert torch.allclose(compute_advantages(r, "batch", "batch"), (r - r.mean()) / r.std(unbiased=False))
    # the per-prompt scale is each prompt's own std of its centred advantages
    assert compute_advantages(r, "per_prompt", "per_prompt")[0].tolist() == pytest.approx([1.0, -1.0])


def test_ema_start_is_a_constant_shift_that_changes_no_update():
    """Choice 9: the EMA starts at the first step's mean (the fork at 0). A constant shift of every advantage leaves
    the selection, ψ and the η gradient unchanged (only the logged eta_loss and baseline move)."""
    assert vmpo.update_ema(None, 0.3, 0.98) == 0.3
    assert vmpo.update_ema(0.3, float("nan"), 0.98) == 0.3  # a step with no scored sample leaves it alone
    torch.manual_seed(5)
    r = torch.rand(8, 2)
    grads, losses = [], []
    for ema in (0.3, 0.0):  # ours after step 1, the fork's start
        adv = compute_advantages(r, "ema", "none", ema=ema).flatten()
        sel = select_top(adv, 0.5)
        eta = torch.tensor(0.5, requires_grad=True)
        loss = eta_dual_loss(eta, adv, sel, 0.1)
        loss.backward()
        grads.append((sel, estep_weights(adv, sel, 0.5), eta.grad.item()))
        losses.append(loss.item())
    assert torch.equal(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])
    assert grads[0][2] == pytest.approx(grads[1][2], abs=1e-5)
    assert losses[1] - losses[0] == pytest.approx(0.3, abs=1e-5)  # η·logsumexp((A + c)/η) moves by c itself


def test_not_scored_samples_are_left_out_of_the_e_step():
    """Choice 8: NaN rewards (no source scored the sample) are out of the baseline, the scale, the top-n, ψ and L_η."""
    nan = float("nan")
    # combining sources: weighted sum over the sources that scored the sample, NaN when none did (never 0)
    rpf = torch.tensor([[1.0, nan], [nan, nan], [0.5, 2.0]])
    assert vmpo.combine_rewards(rpf, [2.0, 1.0]).tolist()[::2] == [2.0, 3.0]
    assert math.isnan(vmpo.combine_rewards(rpf, [2.0, 1.0])[1])
    r = torch.tensor([[1.0, nan], [0.0, 1.0], [nan, nan]])
    a = compute_advantages(r, "batch", "none")  # batch mean over the 3 scored rewards = 2/3
    assert a.flatten()[[0, 2, 3]].tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3])
    assert torch.isnan(a.flatten()[[1, 4, 5]]).all()
    a = compute_advantages(r, "per_prompt", "batch")  # prompt 0's single scored sample is its own baseline
    s = math.sqrt(0.5 / 3)  # biased std of the 3 scored centred advantages [0, -0.5, 0.5]
    assert a.flatten()[[0, 2, 3]].tolist() == pytest.approx([0.0, -0.5 / s, 0.5 / s], abs=1e-5)
    adv = compute_advantages(r, "batch", "none").flatten()
    sel = select_top(adv, 1.0)  # even ρ = 1 keeps only the 3 scored samples
    assert sel.tolist() == [True, False, True, True, False, False]
    assert select_top(adv, 0.5).tolist() == [True, False, False, True, False, False]  # ceil(0.5 * 3) = 2
    w = estep_weights(adv, sel, 0.7)
    assert w.sum().item() == pytest.approx(1.0) and (w[~sel] == 0).all()
    eta = torch.tensor(0.7, requires_grad=True)
    scored = adv[~torch.isnan(adv)]
    want = 0.7 * 0.1 + 0.7 * (torch.logsumexp(scored / 0.7, 0) - math.log(3))
    assert eta_dual_loss(eta, adv, sel, 0.1).item() == pytest.approx(want.item(), rel=1e-6)
    # nothing scored: nothing selected, no weight anywhere
    none = torch.full((4,), nan)
    assert not select_top(none, 0.5).any() and (estep_weights(none, select_top(none, 0.5), 1.0) == 0).all()


def test_batch_counts_completions():
    """Choice 10: --per_device_train_batch_size counts completions and must hold whole prompts of K."""
    vmpo.check_batch(Args(per_device_train_batch_size=64, k=2), 2, online=True)
    with pytest.raises(ValueError, match="--per_device_train_batch_size 6 .*--k 4"):
        vmpo.check_batch(Args(per_device_train_batch_size=6, k=4), 4, online=True)
    with pytest.raises(ValueError, match="K = 3, the completions per row"):
        vmpo.check_batch(Args(per_device_train_batch_size=64), 3, online=False)
    assert Args().per_device_train_batch_size // Args().k == 32  # the default: 32 prompts x K = 2


def test_offline_rewards_null_is_not_scored_and_inf_is_refused(tmp_path):
    """Choice 8 offline: a null reward is not scored, an infinite one is refused naming the column and row."""
    from common import toy

    tok = toy.make_tokenizer()
    rows = [{"prompt": "1+2=", "completions": ["3", "4"], "rewards": [1.0, None]}]
    path = tmp_path / "pcr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, k, out, _ = vmpo.load_rows(Args(dataset_name=str(path)), tok)
    assert k == 2 and out[0]["rewards"][0] == 1.0 and math.isnan(out[0]["rewards"][1])
    path.write_text('{"prompt": "1+2=", "completions": ["3", "4"], "rewards": [1.0, Infinity]}\n')
    with pytest.raises(ValueError, match="'rewards' of row 0"):
        vmpo.load_rows(Args(dataset_name=str(path)), tok)
    with pytest.raises(ValueError, match="--eval_fraction"):  # offline rows have no reward source for held-out rows
        vmpo.load_rows(Args(dataset_name="toy:add", data_mode="preference", eval_fraction=0.1), tok)


def test_eos_stays_in_the_completion_mask_when_pad_is_eos(tmp_path):
    """Choice 7: the completion mask comes from token counts (offline) or generation (online), never from pad."""
    from common import toy

    tok = toy.make_tokenizer()
    tok.pad_token = tok.eos_token  # pad == eos
    path = tmp_path / "pcr.jsonl"
    toy.make_dataset("add", "prompt_completion_reward", n=4, k=2).to_json(str(path))
    mode, k, rows, _ = vmpo.load_rows(Args(dataset_name=str(path)), tok)
    assert mode == "prompt_completion_reward" and k == 2
    comp = [c for r in rows for c in r["completion_ids"]]
    batch = vmpo.data.batch_prompt_completion([r["prompt_ids"] for r in rows for _ in range(k)], comp,
                                              tok.pad_token_id)
    for i, c in enumerate(comp):
        assert c[-1] == tok.eos_token_id and batch["completion_mask"][i].sum() == len(c)
    # online: generation's mask keeps the first EOS
    from common.generation import mask_after_eos

    ids = torch.tensor([[5, 6, tok.eos_token_id, tok.eos_token_id]])
    mask, term = mask_after_eos(ids, tok.eos_token_id)
    assert mask.tolist() == [[1, 1, 1, 0]] and term.item()


# ----------------------------------------------------------------------------- tier 2: runs
FAST = ["--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "16", "--num_eval_prompts", "16",
        "--log_completions_steps", "1"]  # 16 completions = 8 prompts x K = 2 (choice 10)


def _params_moved(out_dir, start_dir) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(f"{out_dir}/model.safetensors"), load_file(f"{start_dir}/model.safetensors")
    return any(not torch.equal(a[k], b[k]) for k in a)


def _check_metrics(out_dir, steps=3, toy=True):
    recs = read_metrics(out_dir)
    if toy:  # held-out gold reward at the start and at the end
        assert recs[0]["step"] == 0 and "eval/gold_reward" in recs[0] and "eval/gold_reward" in recs[-1]
    train = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for r in train:
        for m in SEED_METRICS:
            assert m in r and r[m] is not None and math.isfinite(r[m]), m
        assert r["vmpo/selected_fraction"] == pytest.approx(0.5)
        assert r["train/skipped_steps"] == 0 and math.isfinite(r["grad_norm"])  # choice 11: no step was skipped
    return train


@pytest.mark.parametrize("estimator", ["old_policy_ref", "ref"])
def test_online_run(tmp_path, toy_policy, estimator):
    """Choice 1 through the entry point: the first step samples from π_old = π_θ, so the KL is 0."""
    out = tmp_path / "run"
    run_script("vmpo.py", *FAST, "--kl_estimator", estimator, "--output_dir", str(out))
    train = _check_metrics(out)
    assert _params_moved(out, toy_policy)
    assert (out / "samples.jsonl").exists()
    if estimator == "ref":
        assert train[0]["vmpo/ref_anchor_loss"] == 0.0 and train[0]["vmpo/kl_mean"] == pytest.approx(0.0, abs=1e-5)
    else:
        assert train[0]["vmpo/kl_mean"] == pytest.approx(0.0, abs=1e-5)  # old policy = policy at step 1


def test_online_run_with_a_reward_model(tmp_path, toy_rm):
    """A reward model as the reward source, in training and in the held-out evaluation."""
    out = tmp_path / "run"
    run_script("vmpo.py", *FAST, "--max_steps", "2", "--reward_model_name_or_path", str(toy_rm), "--output_dir",
               str(out))
    train = _check_metrics(out, steps=2)
    first = read_metrics(out)[0]  # the held-out evaluation scores with the reward model, and the gold reward
    per_source = [v for key, v in first.items() if key.startswith("eval/rewards/")]
    assert per_source == [first["eval/reward"]] and first["eval/reward"] != first["eval/gold_reward"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert any(s["reward"] not in (0.0, 1.0) for s in samples)  # continuous scores, not the gold exact match
    assert train[0]["vmpo/rewards_std"] > 0


PARTLY_SCORED = """
calls = 0


def partly(prompts, completions, answer, **kwargs):
    # every other sample not scored (None), the others exact match; call 1 is the held-out evaluation at step 0,
    # call 2 step 1, call 3 step 2: there sample 0 gets an infinite reward
    global calls
    calls += 1
    out = [None if i % 2 else float(c.strip() == a) for i, (c, a) in enumerate(zip(completions, answer))]
    if calls == 3:
        out[0] = float("inf")
    return out
"""


def test_not_scored_samples_in_a_run_and_an_inf_reward_stops_it(tmp_path):
    """Choice 8 through the entry point, on a prompt file with --eval_fraction: the held-out evaluation scores with the
    run's reward source (eval/reward, no gold reward off the toy datasets); step 1 has half its samples unscored (left
    out of the E-step); the inf returned at step 2 stops the run there (choice 11), before that step's update: no
    checkpoint-2, no final model."""
    from common import toy

    (tmp_path / "partly.py").write_text(PARTLY_SCORED)
    toy.make_dataset("add", "prompt", n=200).to_json(str(tmp_path / "prompts.jsonl"))
    out = tmp_path / "run"
    proc = run_script("vmpo.py", *FAST, "--reward_funcs", f"{tmp_path}/partly.py:partly", "--save_steps", "1",
                      "--dataset_name", str(tmp_path / "prompts.jsonl"), "--eval_fraction", "0.25",
                      "--num_eval_prompts", "8", "--output_dir", str(out), check=False)
    assert proc.returncode != 0 and "reward function 'partly' returned inf" in proc.stderr, proc.stderr[-2000:]
    recs = read_metrics(out)
    assert recs[0]["step"] == 0 and 0 <= recs[0]["eval/reward"] <= 1 and "eval/gold_reward" not in recs[0]
    assert "eval/rewards/partly/mean" in recs[0]
    train = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in train] == [1]
    assert train[0]["vmpo/scored_fraction"] == 0.5  # 8 of the 16 samples
    assert train[0]["vmpo/selected_fraction"] == pytest.approx(4 / 16)  # ceil(0.5 * 8 scored) of 16
    assert math.isfinite(train[0]["vmpo/loss"]) and math.isfinite(train[0]["vmpo/rewards_mean"])
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    assert not (out / "model.safetensors").exists()


def test_old_policy_sync_at_the_configured_step(tmp_path):
    """Choice 1: the old policy is a hard copy of θ every old_policy_sync_steps steps."""
    out = tmp_path / "run"
    run_script("vmpo.py", *FAST, "--max_steps", "5", "--kl_estimator", "old_policy", "--old_policy_sync_steps", "2",
               "--learning_rate", "1e-3", "--output_dir", str(out))
    train = _check_metrics(out, steps=5)
    assert [r["vmpo/old_policy_syncs"] for r in train] == [0, 1, 1, 2, 2]
    kl = [r["vmpo/kl_mean"] for r in train]
    # the step right after a sync measures the policy against an identical snapshot: exactly 0; the others do not
    assert all(abs(kl[i]) < 1e-5 for i in (0, 2, 4)), kl
    assert all(abs(kl[i]) > 1e-4 for i in (1, 3)), kl


def test_resume_continues_exactly(tmp_path):
    """Duals, their optimizer, the EMA baseline, counters and the old-policy weights are in the checkpoint."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*FAST, "--max_steps", "4", "--save_steps", "2", "--baseline", "ema", "--old_policy_sync_steps", "3",
            "--learning_rate", "1e-3"]
    run_script("vmpo.py", *args, "--output_dir", str(full))
    # one run per folder: the same command again refuses to mix with the finished run (before loading a model)
    again = run_script("vmpo.py", *args, "--output_dir", str(full), check=False)
    assert again.returncode != 0 and "already holds a run" in again.stderr and "--overwrite_output_dir" in again.stderr
    import shutil

    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    run_script("vmpo.py", *args, "--output_dir", str(resumed), "--resume_from", "auto")
    a = {r["step"]: r for r in read_metrics(full)}
    b = {r["step"]: r for r in read_metrics(resumed)}
    for step in (3, 4):
        for m in ("vmpo/eta", "vmpo/alpha", "vmpo/kl_mean", "vmpo/reward_ema_baseline", "vmpo/loss",
                  "vmpo/old_policy_syncs"):
            assert b[step][m] == pytest.approx(a[step][m], rel=1e-5, abs=1e-6), (step, m)


def test_preference_offline_run(tmp_path, toy_policy):
    """Offline preference pairs become K = 2 completions with rewards [1, 0]."""
    out = tmp_path / "run"
    run_script("vmpo.py", *FAST, "--data_mode", "preference", "--output_dir", str(out))
    train = _check_metrics(out)
    assert train[0]["vmpo/rewards_mean"] == pytest.approx(0.5)  # pairs with rewards [1, 0]
    assert _params_moved(out, toy_policy)


def test_reward_offline_run_with_behavior_logps(tmp_path, toy_policy):
    """Choice 10 offline (K = 4 from the data) and the `behavior` estimator on logged behaviour log-probs."""
    from common import toy

    ds = toy.make_dataset("add", "prompt_completion_reward", n=64, k=4)
    ds = ds.map(lambda ex: {"behavior_logps": [-3.0 - 0.5 * i for i in range(4)]})
    path = tmp_path / "pcr.jsonl"
    ds.to_json(str(path))
    out = tmp_path / "run"
    proc = run_script("vmpo.py", *FAST, "--dataset_name", str(path), "--kl_estimator", "behavior", "--output_dir",
                      str(out), "--per_device_train_batch_size", "32")  # 8 rows x K = 4
    assert "K = 4" in proc.stdout
    train = _check_metrics(out, toy=False)
    assert train[0]["vmpo/rewards_mean"] == pytest.approx(0.25)  # one right answer in four
    assert train[0]["vmpo/logps_old"] == pytest.approx(-3.75)  # the behaviour log-probs of the data
    assert train[0]["vmpo/kl_mean"] == pytest.approx(train[0]["vmpo/logps_old"] - train[0]["vmpo/logps_policy"],
                                                     abs=1e-4)
    assert _params_moved(out, toy_policy)


def test_degenerate_config_fails_at_startup(tmp_path):
    """Choice 6 through the entry point: the run fails before writing metrics."""
    proc = run_script("vmpo.py", "--k", "1", "--baseline", "per_prompt", "--output_dir", str(tmp_path / "run"),
                      check=False)
    assert proc.returncode != 0 and "every advantage 0" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# two real CPU processes: accelerate's torchrun launcher (--multi_gpu) joins a gloo group only with ACCELERATE_USE_CPU
# set; without it each process runs alone (world size 1), which the sample count below would catch


def test_two_processes_cpu(tmp_path):
    """Choice 4: with 2 processes the E-step runs over the gathered global batch."""
    out = tmp_path / "run"
    proc = run_script("vmpo.py", "--k", "2", *FAST, "--per_device_train_batch_size", "8", "--output_dir", str(out),
                      launcher=accelerate_launcher(2), env={"ACCELERATE_USE_CPU": "true"})
    train = _check_metrics(out)
    assert json.loads((out / "args.json").read_text())["k"] == 2
    # the E-step ran over the global batch: 2 processes x 4 prompts x K=2 = 16 samples, 8 selected
    assert "16 samples per step (8 selected)" in proc.stdout
    assert all(0 < r["vmpo/weights_entropy"] <= math.log(8) + 1e-6 for r in train)
    assert train[0]["vmpo/kl_mean"] == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------- tier 3: learning
@pytest.mark.slow
def test_learns_on_the_toy_task(tmp_path):
    out = tmp_path / "run"
    run_script("vmpo.py", "--output_dir", str(out), "--num_eval_prompts", "512", timeout=1800)
    recs = read_metrics(out)
    evals = [r["eval/gold_reward"] for r in recs if "eval/gold_reward" in r]
    train = [r for r in recs if r["step"] > 0]
    assert evals[-1] >= evals[0] + 0.05, evals  # held-out, greedy
    assert sum(r["vmpo/rewards_mean"] for r in train[-3:]) / 3 > train[0]["vmpo/rewards_mean"] + 0.05  # sampled
    kl = [r["vmpo/kl_mean"] for r in train]
    eps = json.loads((out / "args.json").read_text())["eps_alpha"]
    assert max(kl) < 4 * eps and 0.2 * eps < sum(kl) / len(kl) < 2 * eps, kl
