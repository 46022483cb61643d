"""DAR (algos/dar.py): weights and loss against hand computations (tier 1) and the script in each data mode (tier 2)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_metrics, run_script

import dar
from dar import Args, check_degenerate, dar_advantages, dar_loss, dar_weights

DAR_METRICS = ["dar/rewards_mean", "dar/rewards_std", "dar/rewards_p25", "dar/rewards_median", "dar/rewards_p75",
               "dar/advantages_mean", "dar/advantages_std", "dar/weights_mean", "dar/weights_max",
               "dar/weights_clip_fraction", "dar/log_reg_weight_mean", "dar/log_adv_weight_mean", "dar/kl_from_ref",
               "completions/mean_length", "dar/logps_policy", "dar/logps_ref", "dar/logps_behavior", "dar/loss",
               "train/skipped_steps"]


def test_weights_against_a_hand_computation():
    """Note 3: w = min(exp(·), w_clip) by hand, and no overflow for a huge advantage."""
    adv = torch.tensor([1.0, -1.0, 0.0, 3.0])
    s_ref = torch.tensor([-2.0, -3.0, -1.0, -2.0])
    s_beh = torch.tensor([-2.5, -2.0, -1.0, -2.0])
    alpha, beta, wclip = 0.1, 0.3, 50.0
    w, log_reg, log_adv = dar_weights(adv, s_ref, s_beh, alpha, beta, wclip)
    expected = [min(math.exp(0.25 * (r - b) + a / 0.4), wclip) for a, r, b in zip(adv.tolist(), s_ref.tolist(),
                                                                                  s_beh.tolist())]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert w[3].item() == pytest.approx(wclip)  # exp(7.5) is clipped
    assert log_reg.tolist() == pytest.approx([0.125, -0.25, 0.0, 0.0])
    assert log_adv.tolist() == pytest.approx([2.5, -2.5, 0.0, 7.5])
    # no overflow for huge advantages
    w, _, _ = dar_weights(torch.tensor([1e6]), torch.zeros(1), torch.zeros(1), 0.1, 0.1, 50.0)
    assert w.item() == pytest.approx(50.0)


def test_loss_is_weighted_mean_nll_without_gradient_through_weights():
    """Note 1: a weighted mean NLL, no gradient through the weights, micro-batch shares add up."""
    s = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    w = torch.tensor([2.0, 0.5, 1.0], requires_grad=True)
    loss = dar_loss(w, s, 3)
    assert loss.item() == pytest.approx(-(2 * -1.0 + 0.5 * -2.0 + 1.0 * -0.5) / 3)
    loss.backward()
    assert s.grad.tolist() == pytest.approx([-2 / 3, -0.5 / 3, -1 / 3]) and w.grad is None
    # micro-batch shares add up to the step's mean
    parts = dar_loss(w[:1], s[:1], 3) + dar_loss(w[1:], s[1:], 3)
    assert parts.item() == pytest.approx(loss.item())


def test_advantages_are_centred_per_prompt():
    """Notes 2 and 6: per-prompt centring, the per-prompt and batch scales, K = 1 refused."""
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    a = dar_advantages(r, "none")
    assert torch.allclose(a, torch.tensor([[0.5, -0.5], [0.0, 0.0], [-1.0, 1.0]]))
    a = dar_advantages(r, "per_prompt")  # z-score per prompt; ties give 0, not NaN
    assert torch.allclose(a, torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]]))
    with pytest.raises(ValueError, match="K = 1"):
        check_degenerate(1)
    # note 6: the batch scale is the std of the centred advantages [0.5, -0.5, 0, 0, -1, 1] = sqrt(2.5 / 6)
    s = math.sqrt(2.5 / 6)
    assert dar_advantages(r, "batch").flatten().tolist() == pytest.approx([0.5 / s, -0.5 / s, 0, 0, -1 / s, 1 / s])


def test_not_scored_samples_get_no_weight_and_leave_the_mean():
    """Note 5: a NaN reward (no source scored the sample) is out of its prompt's mean and the stds, gets weight 0 and
    is not counted in the loss's mean."""
    nan = float("nan")
    rpf = torch.tensor([[1.0, nan], [nan, nan]])
    r = dar.combine_rewards(rpf, [2.0, 1.0])
    assert r[0].item() == 2.0 and math.isnan(r[1])  # never 0
    rewards = torch.tensor([[1.0, nan, 0.0], [nan, nan, nan]])
    a = dar_advantages(rewards, "none")  # prompt 0's mean over its 2 scored samples = 0.5
    assert a[0, [0, 2]].tolist() == pytest.approx([0.5, -0.5]) and torch.isnan(a[0, 1]) and torch.isnan(a[1]).all()
    assert dar_advantages(rewards, "per_prompt")[0, [0, 2]].tolist() == pytest.approx([1.0, -1.0])
    w, _, _ = dar_weights(a.flatten(), torch.zeros(6), torch.zeros(6), 0.1, 0.1, 50.0)
    assert w[0].item() == pytest.approx(math.exp(2.5)) and w[2].item() == pytest.approx(math.exp(-2.5))
    assert (w[[1, 3, 4, 5]] == 0).all()
    s = torch.tensor([-1.0, -2.0, -3.0, -1.0, -1.0, -1.0])
    num_scored = int((~torch.isnan(a)).sum())
    assert dar_loss(w, s, num_scored).item() == pytest.approx(-(w[0] * -1.0 + w[2] * -3.0).item() / 2)


def test_batch_counts_completions():
    """Note 7: --per_device_train_batch_size counts completions and must hold whole prompts of K."""
    dar.check_batch(Args(per_device_train_batch_size=64, k=2), 2, online=True)
    with pytest.raises(ValueError, match="--per_device_train_batch_size 6 .*--k 4"):
        dar.check_batch(Args(per_device_train_batch_size=6, k=4), 4, online=True)
    with pytest.raises(ValueError, match="K = 3, the completions per row"):
        dar.check_batch(Args(per_device_train_batch_size=64), 3, online=False)
    assert Args().per_device_train_batch_size // Args().k == 32  # the default: 32 prompts x K = 2


FAST = ["--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "16", "--num_eval_prompts", "16"]
# 16 completions = 8 prompts x K = 2 (note 7)


def _moved(out_dir, start_dir):
    from safetensors.torch import load_file

    a, b = load_file(f"{out_dir}/model.safetensors"), load_file(f"{start_dir}/model.safetensors")
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["online", "preference"])
def test_runs(tmp_path, toy_policy, mode):
    """Notes 4 and 7 through the entry point, online and on preference pairs."""
    out = tmp_path / "run"
    run_script("dar.py", *FAST, "--data_mode", mode, "--output_dir", str(out))
    recs = read_metrics(out)
    assert "eval/gold_reward" in recs[0] and "eval/gold_reward" in recs[-1]
    train = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        for m in DAR_METRICS:
            assert r.get(m) is not None and math.isfinite(r[m]), m
        assert 0 < r["dar/weights_max"] <= 50.0
    if mode == "preference":
        assert train[0]["dar/rewards_mean"] == pytest.approx(0.5)
    else:  # online: the behaviour policy is the current policy, so the first step has S_beh = S_ref
        assert train[0]["dar/log_reg_weight_mean"] == pytest.approx(0.0, abs=1e-5)
        # held-out evaluation scored by the run's reward source (the gold reward here, so both agree)
        assert recs[0]["eval/reward"] == pytest.approx(recs[0]["eval/gold_reward"])
    assert _moved(out, toy_policy)


def test_reward_offline_run_with_behavior_logps(tmp_path):
    """Note 7 offline (K = 4 from the data): the regularisation part uses the logged behaviour log-probs."""
    from common import toy

    ds = toy.make_dataset("add", "prompt_completion_reward", n=64, k=4)
    ds = ds.map(lambda ex: {"behavior_logps": [-3.0] * 4})
    path = tmp_path / "pcr.jsonl"
    ds.to_json(str(path))
    out = tmp_path / "run"
    proc = run_script("dar.py", *FAST, "--dataset_name", str(path), "--output_dir", str(out),
                      "--per_device_train_batch_size", "32")  # 8 rows x K = 4
    assert "K = 4" in proc.stdout
    train = [r for r in read_metrics(out) if r["step"] > 0]
    assert train[0]["dar/rewards_mean"] == pytest.approx(0.25)
    assert train[0]["dar/logps_behavior"] == pytest.approx(-3.0)
    assert train[0]["dar/log_reg_weight_mean"] == pytest.approx(0.5 * (train[0]["dar/logps_ref"] + 3.0), abs=1e-4)


def test_k1_fails_at_startup(tmp_path):
    """Note 2 through the entry point."""
    proc = run_script("dar.py", "--k", "1", "--output_dir", str(tmp_path / "run"), check=False)
    assert proc.returncode != 0 and "K = 1" in proc.stderr
