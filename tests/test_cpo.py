"""cpo.py: every loss type (CPO sigmoid, hinge, ipo, SimPO) and AlphaPO's reward shape against hand computations and
invariants (SimPO with γ = 0 is length-normalised DPO with a zero reference; AlphaPO at α = 0 is SimPO), the logged
first step against an independent per-sequence computation, and short runs through the real entry point
(accumulation with two processes, exact resume, reload), numbered by the implementation details of the docstring."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import accelerate_launcher, read_metrics, run_script
from cpo import (LOSS_TYPES, Args, alphapo_reward, check_args, cpo_loss, forward_pairs, nll_share, sequence_scores)

TRL_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss"]


def ls(x):  # log σ(x)
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def ar(s, a):  # AlphaPO reward, by hand
    return s if a == 0 else (1 - math.exp(s) ** (-a)) / a


# two pairs of scores s(y_w), s(y_l)
PAIRS = [(-2.0, -5.0), (-3.5, -1.0)]
BETA, GAMMA, EPS = 0.5, 0.3, 0.1


def _t(col):
    return torch.tensor(col, dtype=torch.float32)


def _hand(loss_type, w, l, alpha=0.0, eps=0.0, beta=BETA, gamma=GAMMA):
    z = ar(w, alpha) - ar(l, alpha)
    return {
        "sigmoid": lambda: -(1 - eps) * ls(beta * z) - eps * ls(-beta * z),
        "hinge": lambda: max(0.0, 1 - beta * z),
        "ipo": lambda: (z - 1 / (2 * beta)) ** 2,
        "simpo": lambda: -(1 - eps) * ls(beta * z - gamma) - eps * ls(-(beta * z - gamma)),
    }[loss_type]()


# ----------------------------------------------------------------------------- math
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.5])
def test_each_loss_type_matches_hand_computation(loss_type, alpha):
    w, l = (_t(c) for c in zip(*PAIRS))
    eps = EPS if loss_type in ("sigmoid", "simpo") else 0.0
    losses, rw, rl = cpo_loss(w, l, loss_type, BETA, GAMMA, alpha, eps)
    assert losses.tolist() == pytest.approx([_hand(loss_type, a, b, alpha, eps) for a, b in PAIRS], rel=1e-5)
    # TRL's implicit rewards: β·r(y), the AlphaPO-shaped score when α ≠ 0
    assert rw.tolist() == pytest.approx([BETA * ar(a, alpha) for a, _ in PAIRS], rel=1e-5)
    assert rl.tolist() == pytest.approx([BETA * ar(b, alpha) for _, b in PAIRS], rel=1e-5)


def test_values_at_equal_scores():
    """r_w = r_l: sigmoid log 2, hinge 1, ipo 1/(4β²), simpo -log σ(-γ)."""
    s = _t([-1.0, -4.0])
    for loss_type, want in (("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 1 / (4 * BETA ** 2)),
                            ("simpo", -ls(-GAMMA))):
        assert cpo_loss(s, s, loss_type, BETA, GAMMA)[0].tolist() == pytest.approx([want, want], rel=1e-6), loss_type


def test_simpo_with_zero_gamma_and_equal_lengths_is_length_normalised_dpo_with_zero_reference():
    """ALGORITHMS.md 7, test 4: -log σ(β(S_w/n - S_l/n)) = DPO's -log σ(β h) with h = (S_w - 0) - (S_l - 0), divided
    by the common length n (i.e. DPO at β/n), and = CPO's sigmoid on sums at β/n."""
    n = 4
    torch.manual_seed(0)
    total = -torch.rand(6) * 2 * n  # S(y) of 3 pairs: [chosen (3) | rejected (3)], all n tokens long
    tokens = torch.full((6,), float(n))
    sums, means = sequence_scores(total, tokens, False), sequence_scores(total, tokens, True)
    simpo = cpo_loss(means[:3], means[3:], "simpo", BETA, simpo_gamma=0.0)[0]
    ref_w = ref_l = torch.zeros(3)
    h = (sums[:3] - ref_w) - (sums[3:] - ref_l)
    dpo_normalised = -torch.nn.functional.logsigmoid(BETA * h / n)
    assert torch.allclose(simpo, dpo_normalised, atol=1e-6)
    assert torch.allclose(simpo, cpo_loss(sums[:3], sums[3:], "sigmoid", BETA / n)[0], atol=1e-6)


def test_alphapo_at_zero_alpha_is_simpo_and_continuous():
    w, l = _t([-0.3, -1.2, -2.5]), _t([-0.9, -0.4, -3.0])
    simpo = cpo_loss(w, l, "simpo", 2.0, 1.0)[0]
    assert torch.equal(cpo_loss(w, l, "simpo", 2.0, 1.0, alpha=0.0)[0], simpo)
    assert torch.allclose(cpo_loss(w, l, "simpo", 2.0, 1.0, alpha=1e-5)[0], simpo, rtol=1e-4)  # the α -> 0 limit
    assert torch.equal(alphapo_reward(w, 0.0), w)
    # the shape: r = (1 - p^{-α})/α is increasing in s for every α, concave for α > 0, convex for α < 0
    s = torch.linspace(-5, -0.01, 50)
    for a in (0.5, -0.5):
        r = alphapo_reward(s, a)
        assert (r.diff() > 0).all()
        second = r.diff().diff()
        assert (second < 0).all() if a > 0 else (second > 0).all()


def test_detail3_scores_are_sums_or_means():
    total, tokens = torch.tensor([-6.0, -0.5]), torch.tensor([3.0, 1.0])  # S(y) and |y|
    assert sequence_scores(total, tokens, False).tolist() == [-6.0, -0.5]
    assert sequence_scores(total, tokens, True).tolist() == [-2.0, -0.5]


def test_detail5_nll_is_global_token_mean():
    nll = torch.tensor([3.0, 1.0, 8.0])  # chosen lengths 2, 1, 5: 8 tokens in the step
    assert nll_share(nll, 8 / 3).mean().item() == pytest.approx(12.0 / 8)


def test_gradient_of_sigmoid_loss():
    """∂L/∂s_w = -β σ(-βz)(1 - ε) + ε β σ(βz) (cDPO smoothing)."""
    w = torch.tensor([-1.0, -2.0], requires_grad=True)
    l = torch.tensor([-3.0, -0.5])
    losses, _, _ = cpo_loss(w, l, "sigmoid", 0.7, label_smoothing=0.2)
    losses.sum().backward()
    z = (w.detach() - l)
    want = -0.7 * torch.sigmoid(-0.7 * z) * 0.8 + 0.2 * 0.7 * torch.sigmoid(0.7 * z)
    assert torch.allclose(w.grad, want, atol=1e-6)


ROWS = [([1, 20, 21], [30, 2], [31, 32, 33, 2]), ([1, 22], [34, 35, 36, 37, 2], [38, 2]),
        ([1, 23, 24, 25, 26], [39, 2], [40, 41, 2])]  # (prompt, chosen, rejected) ids of unequal lengths


def _toy(monkeypatch, plain_head: bool):
    """The toy Llama, its head applied 5 positions per block (several blocks per forward), or, plain_head False,
    treated as a model whose logits must come from its own forward (model_utils.chunked_head is None)."""
    from common import model as model_utils, toy

    tok = toy.make_tokenizer()
    model = model_utils.load_causal_lm("toy", tok, seed=0).eval()
    monkeypatch.setitem(model_utils.LOGPS_CHUNK_ELEMENTS, "cpu", 5 * model.config.vocab_size)
    if not plain_head:
        monkeypatch.setattr(model_utils, "PLAIN_HEAD_MODELS", set())
    assert (model_utils.chunked_head(model) is not None) == plain_head
    return model, tok.pad_token_id


def _alone(model) -> dict:
    """forward_pairs' per-sequence sums from each completion run alone, unpadded, with its full float32 logits."""
    B = len(ROWS)
    out = {k: [] for k in ("logps", "tokens", "mean_logits", "correct", "entropy")}
    for j in range(2 * B):
        p, c, r = ROWS[j % B]
        comp = c if j < B else r
        ids = torch.tensor([p + comp])
        k = len(comp)
        logits = model(input_ids=ids).logits[0, -k - 1:-1].float()  # (k, V): the positions predicting the completion
        full = torch.log_softmax(logits, -1)
        out["logps"].append(full.gather(-1, ids[0, -k:, None]).sum())
        out["tokens"].append(torch.tensor(float(k)))
        out["mean_logits"].append(logits.mean(-1).sum().detach())
        out["correct"].append((logits.argmax(-1) == ids[0, -k:]).float().sum())
        out["entropy"].append(-(full.exp() * full).sum().detach())
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("plain_head", [True, False], ids=["chunked_head", "model_logits"])
def test_details1_9_forward_sums_equal_each_sequence_alone_with_its_full_logits(monkeypatch, plain_head, packed):
    """One forward of the pairs (two padded rows per pair, or packed, detail 9): each completion's summed log-prob
    S(y), token count, summed mean logit, correct-token count and entropy equal those of the sequence run alone
    with its full float32 logits, to 1e-5; so do the length-normalised scores S̄ (simpo, ipo), the chosen NLL, and
    the gradients of S, S̄ and the NLL."""
    from cpo import pair_layout

    model, pad_id = _toy(monkeypatch, plain_head)
    params = list(model.parameters())
    B = len(ROWS)
    batch = pair_layout(ROWS, pad_id, "cpu", packed)
    # the head runs on real tokens only, in both layouts: one row per completion token
    assert batch["comp"]["targets"].numel() == sum(len(c) + len(r) for _, c, r in ROWS)
    got = forward_pairs(model, batch, want_entropy=True)
    want = _alone(model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=k)
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(2 * B, generator=g), torch.randn(2 * B, generator=g), torch.randn(B, generator=g)

    def objective(f):  # S, S̄ and the chosen NLL (-S of the chosen completions), weighted
        return ((a * sequence_scores(f["logps"], f["tokens"], False)).sum()
                + (b * sequence_scores(f["logps"], f["tokens"], True)).sum() + (c * -f["logps"][:B]).sum())

    torch.testing.assert_close(objective(got), objective(want), atol=1e-5, rtol=1e-5)
    for x, y in zip(torch.autograd.grad(objective(got), params), torch.autograd.grad(objective(want), params)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_detail9_packed_batch_gives_the_padded_batch_loss_and_gradient(monkeypatch, loss_type):
    """The CPO (summed scores) and CPO-SimPO (length-normalised) loss with the NLL term, of a packed micro-batch,
    and its gradient, equal the padded micro-batch's, to 1e-5; the packed rows hold fewer positions."""
    from cpo import pair_layout

    model, pad_id = _toy(monkeypatch, True)
    params = list(model.parameters())
    B = len(ROWS)
    losses, grads, sizes = [], [], []
    for packed in (False, True):
        batch = pair_layout(ROWS, pad_id, "cpu", packed)
        f = forward_pairs(model, batch)
        s = sequence_scores(f["logps"], f["tokens"], loss_type == "simpo")
        losses_, _, _ = cpo_loss(s[:B], s[B:], loss_type, 2.0 if loss_type == "simpo" else 0.1, 1.0)
        loss = (losses_ + nll_share(-f["logps"][:B], f["tokens"][:B].sum().item() / B)).mean()
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, params))
        sizes.append(batch["inputs"]["input_ids"].numel())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert sizes[1] < sizes[0]


@pytest.mark.parametrize("flags,match", [
    ({"loss_type": "alphapo"}, "--loss_type simpo --cpo_alpha 0 --alpha"),
    ({"loss_type": "orpo"}, "orpo.py"),
    ({"loss_type": "sigmoid", "simpo_gamma": 1.0}, "--simpo_gamma"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "--label_smoothing"),
    ({"loss_type": "simpo", "label_smoothing": 0.5}, "[0, 0.5)"),
    ({"beta": 0.0}, "--beta"),
    ({"cpo_alpha": -1.0}, "--cpo_alpha"),
    ({"max_length": 8, "max_prompt_length": 8}, "--max_prompt_length"),
])
def test_bad_configurations_raise(flags, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_args(Args(**flags))


def test_unpaired_data_fails_before_any_model_loads_naming_kto(tmp_path, monkeypatch):
    """The data check comes before any model loads and before anything is written to output_dir (in-process: the
    same main() the entry point calls)."""
    from common import data, model as model_utils
    from cpo import main

    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps({"prompt": "1+1=", "completion": "2", "label": True}) + "\n" for _ in range(4)))
    monkeypatch.setattr(model_utils, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(data.DatasetFormatError, match="kto.py or bco.py"):
        main(Args(dataset_name=str(path), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- runs through the entry point
# CPO-SimPO with AlphaPO's shaping and label smoothing: every term of the loss is on
FAST = ["--logging_steps", "1", "--learning_rate", "1e-3", "--max_steps", "3", "--loss_type", "simpo",
        "--beta", "2.0", "--simpo_gamma", "0.5", "--cpo_alpha", "0.5", "--alpha", "0.25", "--label_smoothing", "0.1"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, toy_policy):
    """1 process x 8 pairs, 3 steps, a checkpoint after every step, evaluation at steps 0 and 3."""
    out = tmp_path_factory.mktemp("cpo") / "base"
    run_script("cpo.py", *FAST, "--output_dir", str(out), "--eval_steps", "3", "--per_device_train_batch_size", "8",
               "--save_steps", "1", "--save_total_limit", "3", "--num_eval_pairs", "16", "--num_eval_prompts", "8")
    return out


def test_detail7_run_logs_trl_metrics_with_their_meanings_and_reloads(base_run, toy_policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recs = read_metrics(base_run)
    assert recs[0]["step"] == 0 and math.isfinite(recs[0]["eval/loss"])
    train = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        for name in TRL_METRICS + ["mean_token_accuracy", "entropy", "grad_norm"]:
            assert math.isfinite(r[name]), name
        assert r["train/skipped_steps"] == 0
        # rewards are β·r(y) of the AlphaPO-shaped mean log-prob: each pair's r is concave in s, so the mean reward is
        # below β·r(mean s) (Jensen), and both are negative
        assert r["rewards/chosen"] <= 2.0 * ar(r["logps/chosen"], 0.25) + 1e-6 and r["rewards/chosen"] < 0
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
        assert r["logps/chosen"] > -5  # a mean token log-prob for simpo (detail 3), not a sum
    for name in TRL_METRICS + ["gold_reward"]:
        assert math.isfinite(train[-1]["eval/" + name]), name
    model = AutoModelForCausalLM.from_pretrained(base_run)
    tok = AutoTokenizer.from_pretrained(base_run)
    before = _weights(toy_policy)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    ids = tok("12+34=", return_tensors="pt", add_special_tokens=True).input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_details3_5_first_step_equals_independent_computation(base_run, toy_policy):
    """The logged step-1 loss and metrics equal a per-sequence recomputation of the first batch with the starting
    policy (each sequence run alone, no padding), with the hand formulas of the loss."""
    from common import data, model as model_utils, preference

    tok = model_utils.load_tokenizer("toy-sft", "toy:add")
    ds = data.load_data("toy:add", "train", toy_kind="preference")
    first = data.batch_indices(len(ds), 8, 0, 1)  # the toy pairs all fit: no row is dropped, indices agree
    train = dict(zip(first, preference.tokenize_pairs(ds.select(first), tok, 1024, None)[0]))
    model = model_utils.load_causal_lm("toy-sft", tok, "toy:add").eval()
    losses, nll, tokens, means_w, rewards_w = [], 0.0, 0, [], []
    with torch.no_grad():
        for i in first:
            p, c, r = train[i]
            lps = []
            for comp in (c, r):
                ids = torch.tensor([p + comp])
                lps.append(model_utils.completion_logps(model, ids, torch.ones_like(ids), len(comp))[0].double())
            mw, ml = lps[0].mean().item(), lps[1].mean().item()
            losses.append(_hand("simpo", mw, ml, 0.25, 0.1, beta=2.0, gamma=0.5))
            nll, tokens = nll - lps[0].sum().item(), tokens + len(c)
            means_w.append(mw)
            rewards_w.append(2.0 * ar(mw, 0.25))
    step1 = next(r for r in read_metrics(base_run) if r["step"] == 1)
    assert step1["nll_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert step1["loss"] == pytest.approx(sum(losses) / 8 + 0.5 * nll / tokens, rel=1e-5)
    assert step1["logps/chosen"] == pytest.approx(sum(means_w) / 8, rel=1e-5)
    assert step1["rewards/chosen"] == pytest.approx(sum(rewards_w) / 8, rel=1e-5)


def test_details5_9_two_processes_with_accumulation_and_packing_match_one_padded_batch(base_run, tmp_path):
    """1 process x 8 pairs, padded = 2 processes x 2 accumulation micro-batches x 2 pairs, packed (detail 9): same
    metrics, same weights."""
    out = tmp_path / "ddp"
    run_script("cpo.py", *FAST, "--output_dir", str(out), "--eval_steps", "0", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "2", "--packing", "True", launcher=accelerate_launcher(2),
               timeout=900)
    ref = {r["step"]: r for r in read_metrics(base_run) if r["step"] > 0}
    got = {r["step"]: r for r in read_metrics(out)}
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        for k in TRL_METRICS + ["grad_norm", "mean_token_accuracy"]:
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4, abs=1e-6), (step, k)
    a, b = _weights(out), _weights(base_run)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def test_detail8_resume_is_exact(base_run, tmp_path):
    out = tmp_path / "resumed"
    run_script("cpo.py", *FAST, "--output_dir", str(out), "--eval_steps", "3", "--per_device_train_batch_size", "8",
               "--save_steps", "1", "--save_total_limit", "3", "--num_eval_pairs", "16", "--num_eval_prompts", "8",
               "--resume_from", str(base_run / "checkpoint-2"))
    ra = {r["step"]: r for r in read_metrics(base_run)}
    rb = {r["step"]: r for r in read_metrics(out)}
    assert sorted(rb) == [3]
    for k in TRL_METRICS + ["grad_norm", "eval/loss", "eval/gold_reward"]:
        assert rb[3][k] == pytest.approx(ra[3][k], rel=1e-6, abs=1e-9), k
    a, b = _weights(base_run), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--loss_type", "simpo", "--cpo_alpha", "0", "--beta", "2.0",
                                        "--simpo_gamma", "1.0"]], ids=["cpo", "simpo"])
def test_learning_raises_heldout_reward_accuracy_and_gold_reward(tmp_path, toy_policy, flags):
    """The default CPO run and SimPO (the paper's β and γ): the held-out reward accuracy and the greedy held-out
    exact match of the toy SFT policy rise."""
    out = tmp_path / "learn"
    run_script("cpo.py", "--output_dir", str(out), *flags, timeout=3600)
    evals = [r for r in read_metrics(out) if "eval/gold_reward" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 200
    assert evals[-1]["eval/rewards/accuracies"] > max(0.8, evals[0]["eval/rewards/accuracies"])
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.1, evals
