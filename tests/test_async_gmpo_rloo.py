"""Asynchronous generation in gmpo.py (detail 11) and rloo.py (detail 11): the sampler correction of each (detail 7:
GMPO's truncated geometric-mean weight, RLOO's truncated sequence weight) by hand; max_staleness 0 draws the samples
of the synchronous path; max_staleness 1 keeps every batch within one step of the trainer, and a resumed run
continues from the worker's saved RNG; bad flag combinations fail before anything loads."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_params_close, load_params, read_metrics, run_script  # noqa: F401

RUN = ["--max_steps", "2", "--per_device_train_batch_size", "16", "--num_generations", "4", "--eval_steps", "0",
       "--log_completions_steps", "0", "--logging_steps", "1", "--async_timeout", "300"]


# ----------------------------------------------------------------------------- the corrected losses, by hand
def test_gmpo_truncated_geometric_mean_weight_and_corrected_loss_by_hand():
    import gmpo

    old = torch.tensor([[-1.0, -2.0, -9.0], [-0.1, -0.2, -0.3]])
    sampler = torch.tensor([[-1.5, -1.0, 0.0], [-2.5, -2.6, -2.7]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # row 0: mean of (0.5, -1.0) = -0.25 (the padded token left out); row 1: mean 2.4, e^2.4 > cap 3
    c = gmpo.sequence_is_weights(old, sampler, mask, cap=3.0)
    torch.testing.assert_close(c, torch.tensor([math.exp(-0.25), 3.0]))
    assert torch.equal(gmpo.sequence_is_weights(old, old, mask, 3.0), torch.ones(2))  # on-policy: 1

    logps = (old + torch.tensor([[0.1, -0.3, 0.0], [0.5, 0.0, 0.1]])).requires_grad_()
    adv = torch.tensor([1.0, -2.0])
    # row 0 (A > 0): δ = (0.1, -0.3) inside the clip, w = e^-0.1; row 1 (A < 0): max(δ, clip(δ)) keeps 0.5,
    # w = e^((0.5 + 0 + 0.1) / 3) = e^0.2
    loss, _ = gmpo.gmpo_loss(logps, old, adv, mask, 0.4, 0.4, is_weights=c)
    want = (-1.0 * math.exp(-0.25) * math.exp(-0.1) + 2.0 * 3.0 * math.exp(0.2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # d/dℓ_t of -A c w / B = -A c w / (|y| B) on the tokens inside the clip; c is a constant
    g0 = -1.0 * math.exp(-0.25) * math.exp(-0.1) / 2 / 2
    g1 = 2.0 * 3.0 * math.exp(0.2) / 3 / 2
    torch.testing.assert_close(logps.grad, torch.tensor([[g0, g0, 0.0], [g1, g1, g1]]))
    plain, _ = gmpo.gmpo_loss(logps, old, adv, mask, 0.4, 0.4)
    corrected_ones, _ = gmpo.gmpo_loss(logps, old, adv, mask, 0.4, 0.4, is_weights=torch.ones(2))
    assert corrected_ones.item() == plain.item()


def test_rloo_truncated_sequence_weight_and_corrected_loss_by_hand():
    import rloo

    old = torch.tensor([[-1.0, -2.0, -9.0], [-0.1, -0.2, -0.3]])
    sampler = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -0.6, -0.7]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # the product of the token ratios: row 0 e^(0.5 - 1.0); row 1 e^1.2 = 3.32 > cap 3
    c = rloo.sequence_is_weights(old, sampler, mask, cap=3.0)
    torch.testing.assert_close(c, torch.tensor([math.exp(-0.5), 3.0]))

    logps = (old + torch.tensor([[0.1, -0.3, 0.0], [0.1, 0.1, 0.1]])).requires_grad_()
    adv = torch.tensor([1.0, -2.0])
    # ρ_0 = e^-0.2 (inside [0.8, 1.2]); ρ_1 = e^0.3 = 1.35 with A < 0: min(ρA, 1.2 A) = ρA (the unclipped term)
    loss, ratio = rloo.rloo_loss(logps, old, adv, mask, 0.2, 0.2, is_weights=c)
    torch.testing.assert_close(ratio, torch.tensor([math.exp(-0.2), math.exp(0.3)]))
    want = -(math.exp(-0.5) * math.exp(-0.2) * 1.0 + 3.0 * math.exp(0.3) * -2.0) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    g0, g1 = -math.exp(-0.5) * math.exp(-0.2) / 2, 3.0 * 2.0 * math.exp(0.3) / 2  # -c ρ A / B on every valid token
    torch.testing.assert_close(logps.grad, torch.tensor([[g0, g0, 0.0], [g1, g1, g1]]))


# ----------------------------------------------------------------------------- runs
@pytest.mark.parametrize("script", ["gmpo.py", "rloo.py"])
def test_async_staleness_0_draws_the_samples_of_the_sync_path(tmp_path, toy_policy, script):
    run_script(script, *RUN, "--output_dir", str(tmp_path / "sync"))
    run_script(script, *RUN, "--async_generation", "True", "--max_staleness", "0", "--output_dir", str(tmp_path / "k0"))
    sync, k0 = read_metrics(tmp_path / "sync"), read_metrics(tmp_path / "k0")
    assert len(sync) == len(k0) == 2
    for a, b in zip(sync, k0):  # the worker starts from the trainer's RNG and weights: the very same samples
        assert a["reward"] == b["reward"] and a["completions/mean_length"] == b["completions/mean_length"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)  # importance weights exp(~0) = 1
        assert b["async/staleness"] == 0 and b["sampling/sampling_logp_difference/max"] < 1e-4
        assert b["sampling/sequence_is_weight/mean"] == pytest.approx(1.0, abs=1e-4)  # the applied weights
        assert "async/staleness" not in a
    assert_params_close(tmp_path / "sync", tmp_path / "k0", atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["gmpo.py", "rloo.py"])
def test_async_staleness_1_bound_and_resume(tmp_path, toy_policy, script):
    """max_staleness 1: every batch after the first is sampled one step behind, and the sampler correction is live.
    Resume with max_staleness 0 repeats the uninterrupted run (weights, optimizer and the worker's RNG restored);
    with max_staleness 1 the first batch after the resume is sampled by the checkpoint's weights (staleness 0)."""
    for k in ("0", "1"):
        common = [*RUN, "--max_steps", "4", "--save_steps", "2", "--async_generation", "True", "--max_staleness", k]
        run_script(script, *common, "--output_dir", str(tmp_path / f"full{k}"))
        run_script(script, *common, "--output_dir", str(tmp_path / f"cut{k}"), "--max_steps", "2")
        run_script(script, *common, "--output_dir", str(tmp_path / f"cut{k}"), "--resume_from", "auto")
    full, cut = read_metrics(tmp_path / "full0"), read_metrics(tmp_path / "cut0")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert [r["reward"] for r in full] == [r["reward"] for r in cut]
    assert full[3]["loss"] == pytest.approx(cut[3]["loss"], abs=1e-7)
    assert_params_close(tmp_path / "full0", tmp_path / "cut0", atol=1e-7)
    full, cut = read_metrics(tmp_path / "full1"), read_metrics(tmp_path / "cut1")
    assert [r["async/staleness"] for r in full] == [0, 1, 1, 1]
    assert full[0]["reward"] == read_metrics(tmp_path / "full0")[0]["reward"]  # batch 0: the initial weights
    for r in full[1:]:  # sampled one step behind: the sampler's log-probs differ from π_old, the weights are not 1
        assert r["sampling/sampling_logp_difference/mean"] > 1e-4
        assert r["sampling/importance_sampling_ratio/mean"] != pytest.approx(1.0, abs=1e-6)
        assert r["sampling/sequence_is_weight/mean"] != pytest.approx(1.0, abs=1e-6)
    before, after = load_params(toy_policy), load_params(tmp_path / "full1")
    assert any(not torch.equal(before[k_], after[k_]) for k_ in before)
    assert [r["async/staleness"] for r in cut] == [0, 1, 0, 1]
    assert [r["reward"] for r in full[:2]] == [r["reward"] for r in cut[:2]]


@pytest.mark.parametrize("script", ["gmpo", "rloo"])
@pytest.mark.parametrize("flags,message", [
    ({"max_staleness": -1}, "--max_staleness"),
    ({"async_timeout": 0}, "--async_timeout"),
    ({"use_vllm": True}, "--vllm_mode server"),
    ({"tools": ["common.toy_agents:calc"]}, "--tools"),
    ({"vllm_importance_sampling_cap": 0.0}, "--vllm_importance_sampling_cap"),
])
def test_bad_async_flags_fail_before_anything_loads(tmp_path, script, flags, message):
    import importlib

    mod = importlib.import_module(script)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        mod.main(mod.Args(async_generation=True, output_dir=str(out), model_name_or_path=str(tmp_path / "missing"),
                          **flags))
    assert not out.exists()  # nothing written, and the (missing) model was never opened
