"""bco.py: the loss, the running reward shift δ and the UDM classifier against hand computations and invariants,
start-up errors, and short runs through the real entry point (a logged step checked by hand with UDM, δ across steps,
2 processes x accumulation 2 = 1 process, exact resume with δ and the classifier, reload)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import accelerate_launcher, read_metrics, run_script
from bco import (Args, bco_losses, check_args, check_labels, density_ratio_weights, fit_density_classifier, main,
                 packed_batch, padded_batch, prompt_embeddings, running_mean_update, sequence_logps)


def sig(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- math: hand computations
def test_bco_loss_is_log2_at_policy_equal_reference_and_delta_zero():
    """ALGORITHMS.md 7, test 1."""
    labels = torch.tensor([True, False, False])
    got = bco_losses(torch.zeros(3, dtype=torch.float64), labels, 0.0)
    assert got.tolist() == pytest.approx([math.log(2)] * 3)


def test_bco_loss_hand_computation_with_shift_and_udm_weights():
    r = torch.tensor([0.4, -0.3, 1.0, -2.0], dtype=torch.float64)
    labels = torch.tensor([True, False, False, True])
    delta = 0.25
    want = [-math.log(sig(0.4 - delta)), -math.log(sig(-(-0.3 - delta))), -math.log(sig(-(1.0 - delta))),
            -math.log(sig(-2.0 - delta))]
    assert bco_losses(r, labels, delta).tolist() == pytest.approx(want, rel=1e-12)
    w = torch.tensor([7.0, 2.0, 0.5, 9.0], dtype=torch.float64)  # only the undesirable examples are weighted
    weighted = [want[0], 2.0 * want[1], 0.5 * want[2], want[3]]
    assert bco_losses(r, labels, delta, w).tolist() == pytest.approx(weighted, rel=1e-12)


def test_detail2_running_mean_is_the_mean_of_every_reward_seen():
    batches = [[1.0, 3.0], [-2.0, 0.5, 0.5, 4.0], [10.0]]
    mean, count, seen = 0.0, 0, []
    for b in batches:
        mean, count = running_mean_update(mean, count, sum(b), len(b))
        seen += b
        assert mean == pytest.approx(sum(seen) / len(seen)) and count == len(seen)


def test_detail3_density_classifier_is_the_penalised_optimum_and_weights_are_clipped():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(60, 3, generator=g) + torch.tensor([1.0, 0.0, 0.0]),
                   torch.randn(20, 3, generator=g) - torch.tensor([1.0, 0.0, 0.0])]).double()
    y = torch.tensor([True] * 60 + [False] * 20)
    w, b = fit_density_classifier(x, y)
    # first-order optimality of Σ c_i ℓ_i + ½‖w‖², c balanced (60 and 20 rows: 80/120 and 80/40)
    c = torch.where(y, 80 / 120, 80 / 40).double()
    resid = c * (torch.sigmoid(x @ w + b) - y.double())
    assert torch.allclose(x.T @ resid + w, torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert abs(resid.sum().item()) < 1e-6
    assert w[0] > 0.5  # the desirable cluster sits at +x
    # the weights are p / (1 - p), clipped to [lo, hi], by hand
    pts = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [-5.0, 0.0, 0.0]], dtype=torch.float64)
    got = density_ratio_weights(pts, w, b, 0.5, 10.0)
    p = torch.sigmoid(pts @ w + b)
    want = (p / (1 - p + 1e-8)).clamp(0.5, 10.0)
    assert torch.allclose(got, want) and got[1] == 10.0 and got[2] == 0.5


def test_detail3_prompt_embedding_alone_equals_the_one_from_the_full_row():
    """The classifier is fitted on prompt-only embeddings and applied to embeddings from the reference forward of
    [prompt | completion] rows: causal attention makes them the same."""
    from accelerate import Accelerator

    from common import model as model_utils, toy

    tok = toy.make_tokenizer()
    model = model_utils.load_causal_lm("toy", tok, seed=0).eval()
    prompts, completions = [[1, 20, 21, 22], [1, 23]], [[30, 2], [31, 32, 33, 2]]
    alone = prompt_embeddings(model, prompts, tok.pad_token_id, 1, Accelerator(cpu=True))
    for make in (padded_batch, packed_batch):  # the packed rows' prompt positions give the same embeddings
        with torch.no_grad():
            _, _, emb = sequence_logps(model, make(prompts, completions, tok.pad_token_id, "cpu"), want_embedding=True)
        assert emb.shape == alone.shape == (2, model.config.hidden_size)
        assert torch.allclose(emb, alone, atol=1e-5), make.__name__


# variable-length examples: prompts of 1 to 9 tokens, completions of 2 to 7
PROMPTS = [[1, 20, 21], [1], [1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 22, 23, 24], [1, 25]]
COMPLETIONS = [[30, 2], [31, 32, 33, 2], [9, 2], [34, 35, 36, 37, 38, 39, 2], [40, 41, 42, 43, 2]]


@pytest.mark.parametrize("plain_head", [True, False])
def test_detail4_both_layouts_give_each_sequences_full_logits_logps_stats_embeddings_and_gradients(plain_head,
                                                                                                  monkeypatch):
    """Detail 4: S, the mean-logit and entropy sums and the prompt embeddings (detail 3) of every example, padded or
    packed, through the chunked head (or the forward's logits for a model outside PLAIN_HEAD_MODELS) equal those of
    each sequence's full logits and hidden states alone to 1e-5, and so do the parameter gradients of a weighted sum
    of S."""
    from common import model as model_utils, toy

    tok = toy.make_tokenizer()
    model = model_utils.load_causal_lm("toy", tok, seed=0).eval()
    if not plain_head:
        monkeypatch.setattr(model_utils, "PLAIN_HEAD_MODELS", set())
    assert (model_utils.chunked_head(model) is not None) == plain_head
    w = torch.tensor([0.7, -1.3, 0.2, 1.1, -0.4])
    want, want_st, want_emb = [], {"mean_logits": [], "entropy": [], "tokens": []}, []
    for p, c in zip(PROMPTS, COMPLETIONS):  # each sequence alone: no padding, no packing
        out = model(input_ids=torch.tensor([p + c]), output_hidden_states=True)
        logits = out.logits[0, len(p) - 1:-1].float()  # (T, V): position t-1 predicts token t
        lp = torch.log_softmax(logits, -1)
        want.append(lp.gather(-1, torch.tensor(c)[:, None]).sum())
        want_st["mean_logits"].append(logits.mean(-1).sum().detach())
        want_st["entropy"].append(-(lp.exp() * lp).sum(-1).sum().detach())
        want_st["tokens"].append(torch.tensor(float(len(c))))
        want_emb.append(out.hidden_states[-1][0, :len(p)].mean(0).detach())
    want = torch.stack(want)
    model.zero_grad()
    (want * w).sum().backward()
    want_grad = {k: p.grad.clone() for k, p in model.named_parameters()}
    for make in (padded_batch, packed_batch):
        batch = make(PROMPTS, COMPLETIONS, tok.pad_token_id, "cpu")
        model.zero_grad()
        seq, st, emb = sequence_logps(model, batch, want_stats=True, want_entropy=True, want_embedding=True)
        assert torch.allclose(seq, want.detach(), atol=1e-5, rtol=0), make.__name__
        for k, v in want_st.items():
            assert torch.allclose(st[k], torch.stack(v), atol=1e-5, rtol=0), (make.__name__, k)
        assert torch.allclose(emb, torch.stack(want_emb), atol=1e-5, rtol=0), make.__name__
        (seq * w).sum().backward()
        for k, p in model.named_parameters():
            assert torch.allclose(p.grad, want_grad[k], atol=1e-5, rtol=1e-5), (make.__name__, k)


def test_detail4_packed_batch_gives_the_unpacked_rewards_udm_weights_and_losses():
    """--packing: a packed micro-batch gives the padded one's implicit rewards, UDM weights (from the reference's
    prompt embeddings) and per-example BCO losses to 1e-5 (a reference unlike the policy, so r is far from 0)."""
    from common import model as model_utils, toy

    tok = toy.make_tokenizer()
    policy = model_utils.load_causal_lm("toy", tok, seed=0).eval()
    ref = model_utils.load_causal_lm("toy", tok, seed=5).eval()
    labels = torch.tensor([True, False, True, False, False])
    clf = (torch.linspace(-0.2, 0.2, policy.config.hidden_size, dtype=torch.float64), torch.tensor(0.1).double())
    got = {}
    with torch.no_grad():
        for make in (padded_batch, packed_batch):
            b = make(PROMPTS, COMPLETIONS, tok.pad_token_id, "cpu")
            s_ref, _, emb = sequence_logps(ref, b, want_embedding=True)
            r = 0.1 * (sequence_logps(policy, b)[0] - s_ref)
            w = density_ratio_weights(emb, *clf, 0.5, 10.0)
            got[make.__name__] = (r, w, bco_losses(r.double(), labels, 0.3, w))
    (r_a, w_a, l_a), (r_b, w_b, l_b) = got["padded_batch"], got["packed_batch"]
    assert r_a.abs().max() > 0.05 and (w_a - 1).abs().max() > 0.05  # away from the trivial values: with teeth
    for a, b in ((r_a, r_b), (w_a, w_b), (l_a, l_b)):
        assert torch.allclose(b.double(), a.double(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- start-up errors
@pytest.mark.parametrize("flags,match", [
    ({"beta": -1.0}, "--beta"),
    ({"min_density_ratio": 2.0, "max_density_ratio": 1.0}, "--min_density_ratio"),
    ({"udm": True, "prompt_sample_size": 0}, "--prompt_sample_size"),
    ({"max_length": 8, "max_prompt_length": 9}, "--max_prompt_length"),
])
def test_bad_configurations_raise(flags, match):
    with pytest.raises(ValueError, match=match):
        check_args(Args(**flags))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_input_fails_before_any_model_loads_and_preference_data_is_converted(tmp_path, capsys):
    """Detail 1: one-kind data is refused with the counts; preference data is converted (said once); both before
    anything is written to output_dir."""
    only = _write(tmp_path / "only.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 2), "label": False}
                                            for i in range(5)])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="0 desirable and 5 undesirable"):
        main(Args(dataset_name=only, model_name_or_path="toy", output_dir=str(out), per_device_train_batch_size=2))
    assert not out.exists()
    with pytest.raises(ValueError, match="3 desirable and 0 undesirable"):
        check_labels([([1], [2], True)] * 3)
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)}
                                              for i in range(3)])
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):  # 6 rows after conversion
        main(Args(dataset_name=pairs, model_name_or_path="toy", output_dir=str(out), per_device_train_batch_size=8))
    assert capsys.readouterr().out.count("preference data converted to unpaired rows") == 1
    assert not out.exists()


# ----------------------------------------------------------------------------- runs through the entry point
# a reference unlike the policy (a fresh toy init), so the rewards and δ are far from 0 from the first step
RUN = ["--logging_steps", "1", "--learning_rate", "1e-3", "--ref_model_name_or_path", "toy", "--max_steps", "3",
       "--udm", "True", "--prompt_sample_size", "48"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, toy_policy):
    """1 process x 8 examples, 3 steps with UDM, a checkpoint per step, a small evaluation at the end."""
    out = tmp_path_factory.mktemp("bco") / "base"
    run_script("bco.py", *RUN, "--output_dir", str(out), "--per_device_train_batch_size", "8", "--save_steps", "1",
               "--save_total_limit", "5", "--eval_steps", "3", "--num_eval_rows", "16", "--num_eval_prompts", "8")
    return out


def test_run_first_step_matches_a_hand_computation_and_delta_is_the_running_mean(base_run):
    """Details 2, 3 and 6: step 1's δ is the mean of its own batch's rewards (updated before use), its loss uses δ
    and the UDM weights of the saved classifier on the reference's prompt embeddings; later δ are the running mean
    of every reward logged so far."""
    from safetensors.torch import load_file

    from common import checkpoint, data, model as model_utils, preference

    recs = [r for r in read_metrics(base_run) if r["step"] > 0]
    first = recs[0]
    tok = model_utils.load_tokenizer("toy-sft")
    policy = model_utils.load_causal_lm("toy-sft", tok).eval()
    ref = model_utils.load_causal_lm("toy", tok, seed=1).eval()  # the run's seed
    ds = data.load_data("toy:add", "train", toy_kind="unpaired")
    rows, _ = preference.tokenize_unpaired(ds.select(data.batch_indices(len(ds), 8, 0, 1)), tok, 1024, None)
    batch = padded_batch([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id, "cpu")
    with torch.no_grad():
        s_pol = sequence_logps(policy, batch)[0]
        s_ref, _, emb = sequence_logps(ref, batch, want_embedding=True)
    r = (0.1 * (s_pol - s_ref)).double()
    labels = torch.tensor([row[2] for row in rows])
    assert 0 < labels.sum() < 8
    delta = r.mean().item()
    assert abs(delta) > 0.1 and first["delta"] == pytest.approx(delta, rel=1e-5)
    ck = base_run / "checkpoint-1"
    saved = checkpoint._decode(json.loads((ck / checkpoint.COMPLETE).read_text())["state"],
                               load_file(str(ck / "trainer_state.safetensors")))
    w = density_ratio_weights(emb, saved["udm_w"], saved["udm_b"].reshape(()), 0.5, 10.0)
    want = bco_losses(r, labels, delta, w)
    assert first["loss"] == pytest.approx(want.mean().item(), rel=1e-5)
    assert first["udm/weight"] == pytest.approx(w[~labels].mean().item(), rel=1e-5)
    assert first["rewards/chosen"] == pytest.approx(r[labels].mean().item(), rel=1e-5)
    # δ of step k = mean of all rewards of steps 1..k (the logged per-side means times their counts)
    total, n = 0.0, 0
    for rec in recs:
        total += rec["rewards/chosen"] * rec["count/chosen"] + rec["rewards/rejected"] * rec["count/rejected"]
        n += 8
        assert rec["delta"] == pytest.approx(total / n, rel=1e-5, abs=1e-7), rec["step"]
    for name in ("loss", "logps/chosen", "logps/rejected", "logits/chosen", "entropy", "grad_norm",
                 "train/skipped_steps"):
        assert all(math.isfinite(rec[name]) for rec in recs), name
    for name in ("loss", "delta", "rewards/margins", "udm/weight", "gold_reward"):
        assert math.isfinite(recs[-1]["eval/" + name]), name
    assert recs[-1]["eval/delta"] == recs[-1]["delta"]  # evaluation does not move δ


def test_two_processes_with_accumulation_match_one_batch(base_run, tmp_path):
    """Details 2, 4, 5: 2 processes x accumulation 2 x 2 examples, packed (--packing; δ from the no-grad pre-pass) =
    1 process x 8, padded (δ from the training forward): the same δ, UDM weights, losses and weights."""
    two = tmp_path / "two"
    proc = run_script("bco.py", *RUN, "--output_dir", str(two), "--per_device_train_batch_size", "2",
                      "--gradient_accumulation_steps", "2", "--eval_steps", "0", "--packing", "True",
                      launcher=accelerate_launcher(2), timeout=900)
    assert "udm: classifier on 48 desirable + 48 undesirable" in proc.stdout
    ref = {r["step"]: r for r in read_metrics(base_run) if r["step"] > 0}
    got = {r["step"]: r for r in read_metrics(two)}
    for step in (1, 2, 3):
        for k in ("loss", "delta", "rewards/chosen", "rewards/rejected", "udm/weight", "logps/chosen", "entropy"):
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4, abs=1e-6), (step, k)
    a, b = _weights(two), _weights(base_run)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def test_resume_restores_delta_and_the_classifier_exactly_and_the_model_reloads(base_run, tmp_path, toy_policy):
    resumed = tmp_path / "resumed"
    proc = run_script("bco.py", *RUN, "--output_dir", str(resumed), "--per_device_train_batch_size", "8",
                      "--eval_steps", "0", "--resume_from", str(base_run / "checkpoint-2"), "--save_steps", "1",
                      "--save_total_limit", "5")
    assert "udm: classifier on" not in proc.stdout  # restored, not refitted
    ra = {r["step"]: r for r in read_metrics(base_run)}
    rb = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(rb) == [3]
    for k in ("loss", "delta", "udm/weight", "rewards/margins", "logps/chosen"):
        assert rb[3][k] == pytest.approx(ra[3][k], rel=1e-9, abs=1e-12), k
    a, b = _weights(base_run), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_run)
    tok = AutoTokenizer.from_pretrained(base_run)
    start = _weights(toy_policy)
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items() if k in start)
    ids = tok("12+34=", return_tensors="pt", add_special_tokens=True).input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


@pytest.mark.slow
def test_learning_raises_heldout_gold_reward(tmp_path, toy_policy):
    """The default run: BCO on toy:add unpaired rows raises the greedy held-out exact match of the toy SFT policy
    and separates the implicit rewards of desirable and undesirable held-out examples."""
    out = tmp_path / "learn"
    run_script("bco.py", "--output_dir", str(out), timeout=3600)
    evals = [r for r in read_metrics(out) if "eval/gold_reward" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 200
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.15, evals
    assert evals[-1]["eval/rewards/margins"] > 0.05
