"""orpo.py: the log-odds and the ORPO loss against hand computations and invariants, the forward's SFT mask, the
logged first step against an independent per-sequence computation, and short runs through the real entry point
(accumulation with two processes, exact resume, reload), numbered by the implementation details of the docstring."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import accelerate_launcher, read_metrics, run_script
from orpo import (Args, check_args, forward_pairs, log1mexp, log_odds, odds_ratio_terms, orpo_loss, sft_token_mask)

TRL_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"]


def ls(x):  # log σ(x)
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def lo(x):  # log-odds of p = e^x, in float64
    return x - math.log(-math.expm1(x))


# ----------------------------------------------------------------------------- math
def test_detail3_log1mexp_matches_float64_on_both_branches():
    xs = [-1e-7, -1e-6, -1e-4, -0.01, -0.5, -0.6931, -0.6932, -1.0, -5.0, -20.0, -80.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float32)).tolist()
    want = [math.log(-math.expm1(x)) for x in xs]
    assert got == pytest.approx(want, rel=2e-6, abs=1e-30)


def test_detail3_log_odds_stable_near_zero():
    """S̄ close to 0 (a near-certain completion): float32 log-odds agree with float64; the naive formula does not."""
    xs = torch.tensor([-1e-6, -1e-5, -1e-3], dtype=torch.float32)
    want = [lo(x) for x in xs.double().tolist()]  # about 13.8, 11.5, 6.9
    assert log_odds(xs).tolist() == pytest.approx(want, rel=1e-5)
    naive = (xs - torch.log(1 - torch.exp(xs))).tolist()
    assert abs(naive[0] - want[0]) > 1e-3  # cancellation in 1 - e^x: why log1mexp
    # S̄ = 0 exactly (float32 rounds a near-certain token to log-prob 0): finite value and finite, zero gradient
    x = torch.tensor([0.0, -1e-9, -0.3], requires_grad=True)
    y = log_odds(x)
    assert torch.isfinite(y).all() and y[0].item() == pytest.approx(lo(-1e-7), rel=1e-5)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0] == 0 and x.grad[1] == 0
    assert x.grad[2].item() == pytest.approx(1 / (1 - math.exp(-0.3)), rel=1e-5)  # d lo / dx = 1 / (1 - e^x)
    # very unlikely completions: log-odds ≈ S̄
    assert log_odds(torch.tensor([-60.0])).item() == pytest.approx(-60.0, abs=1e-6)
    # the loss at S̄_w = S̄_l = 0 is finite, and so is its gradient
    w, r = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    parts = orpo_loss(w, r, torch.ones(2), 1.0, 0.1)
    parts["loss"].sum().backward()
    assert torch.isfinite(parts["loss"]).all() and torch.isfinite(w.grad).all() and torch.isfinite(r.grad).all()


# two pairs: (S̄_w, S̄_l, summed chosen NLL)
PAIRS = [(-0.2, -1.5, 3.0), (-2.0, -0.05, 7.5)]


def test_orpo_loss_matches_hand_computation():
    w, r, nll = (torch.tensor(c, dtype=torch.float32) for c in zip(*PAIRS))
    beta, tpp = 0.25, 2.5
    parts = orpo_loss(w, r, nll, tpp, beta)
    ratio = [lo(a) - lo(b) for a, b, _ in PAIRS]
    assert parts["log_odds_chosen"].tolist() == pytest.approx(ratio, rel=1e-5)
    assert parts["log_odds_ratio"].tolist() == pytest.approx([ls(z) for z in ratio], rel=1e-5)
    assert parts["sft"].tolist() == pytest.approx([n / tpp for *_, n in PAIRS])
    want = [n / tpp - beta * ls(z) for (_, _, n), z in zip(PAIRS, ratio)]
    assert parts["loss"].tolist() == pytest.approx(want, rel=1e-5)
    # the paper's L_OR = -log σ(log(odds_w / odds_l)) with odds = p / (1 - p), p = e^{S̄}
    a, b, _ = PAIRS[0]
    odds = lambda x: math.exp(x) / (1 - math.exp(x))  # noqa: E731
    assert -parts["log_odds_ratio"][0].item() == pytest.approx(-math.log(1 / (1 + odds(b) / odds(a))), rel=1e-5)
    # λ = 0 is plain SFT
    assert torch.equal(orpo_loss(w, r, nll, tpp, 0.0)["loss"], parts["sft"])


def test_log_odds_ratio_antisymmetric_under_swapping_chosen_and_rejected():
    torch.manual_seed(0)
    w, r = -torch.rand(16) * 3, -torch.rand(16) * 3
    z, log_sig = odds_ratio_terms(w, r)
    z_swapped, log_sig_swapped = odds_ratio_terms(r, w)
    assert torch.allclose(z_swapped, -z, atol=1e-6)
    assert torch.allclose(log_sig - log_sig_swapped, z, atol=1e-5)  # log σ(z) - log σ(-z) = z
    assert torch.equal(odds_ratio_terms(w, w)[0], torch.zeros(16))  # equal completions: ratio 0, loss log 2


def test_odds_ratio_gradient_matches_formula():
    """∂(-log σ(z))/∂S̄_w = -σ(-z) / (1 - e^{S̄_w}) and ∂/∂S̄_l = +σ(-z) / (1 - e^{S̄_l}) (Eq. 8-10 of the paper)."""
    w = torch.tensor([-0.4, -2.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.1, -0.3], dtype=torch.float64, requires_grad=True)
    z, log_sig = odds_ratio_terms(w, r)
    (-log_sig).sum().backward()
    sig_neg = torch.sigmoid(-z.detach().double())
    assert torch.allclose(w.grad, -sig_neg / (1 - torch.exp(w.detach())), rtol=1e-5)
    assert torch.allclose(r.grad, sig_neg / (1 - torch.exp(r.detach())), rtol=1e-5)


def test_detail4_sft_mask_covers_prompt_after_its_first_token():
    # 4 prompt columns then 3 completion columns; the targets are input_ids[:, 1:] (6 columns)
    # row 0: one left pad, a prompt of 3, a completion of 2, one right pad; row 1: a prompt of 4, a completion of 1
    am = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    cm = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = sft_token_mask(am, cm, True)
    assert got.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert sft_token_mask(am, cm, False).tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0]]


ROWS = [([1, 20, 21], [30, 2], [31, 32, 33, 2]), ([1, 22, 23, 24, 25], [34, 35, 36, 37, 2], [38, 2]),
        ([1, 26], [39, 40, 2], [41, 2])]  # (prompt, chosen, rejected) ids of unequal lengths


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


def _alone(model, prompt_loss: bool) -> dict:
    """forward_pairs' per-sequence sums from each sequence run alone, unpadded, with its full (L, V) float32 logits."""
    B = len(ROWS)
    out = {k: [] for k in ("logps", "tokens", "nll", "nll_tokens", "mean_logits", "correct", "entropy")}
    for j in range(2 * B):
        p, c, r = ROWS[j % B]
        comp = c if j < B else r
        ids = torch.tensor([p + comp])
        logits = model(input_ids=ids).logits[0, :-1].float()  # (L-1, V): position t-1 predicts token t
        full = torch.log_softmax(logits, -1)
        token_lp = full.gather(-1, ids[0, 1:, None]).squeeze(-1)
        k = len(comp)
        out["logps"].append(token_lp[-k:].sum())
        out["tokens"].append(torch.tensor(float(k)))
        out["mean_logits"].append(logits[-k:].mean(-1).sum().detach())
        out["correct"].append((logits[-k:].argmax(-1) == ids[0, -k:]).float().sum())
        out["entropy"].append(-(full[-k:].exp() * full[-k:]).sum().detach())
        if j < B:  # detail 4: the chosen sequence's prompt after its first token, then its completion
            out["nll"].append(-(token_lp.sum() if prompt_loss else token_lp[-k:].sum()))
            out["nll_tokens"].append(torch.tensor(float(len(p) - 1 + k if prompt_loss else k)))
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("plain_head", [True, False], ids=["chunked_head", "model_logits"])
def test_details1_4_9_forward_sums_equal_each_sequence_alone_with_its_full_logits(monkeypatch, plain_head, packed):
    """One forward of the pairs (two padded rows per pair, or packed, detail 9): each sequence's summed completion
    log-prob S(y), its token count, the chosen SFT NLL and token count (with and without prompt loss), the summed mean
    logit, correct-token count and entropy equal those of the sequence run alone with its full float32 logits, to
    1e-5, and so do the gradients of S and the NLL."""
    from orpo import pair_layout

    model, pad_id = _toy(monkeypatch, plain_head)
    params = [q for q in model.parameters() if q.requires_grad]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2 * len(ROWS), generator=g), torch.randn(len(ROWS), generator=g)
    for prompt_loss in (True, False):
        batch = pair_layout(ROWS, pad_id, "cpu", prompt_loss, packed)
        # the head runs on real tokens only, in both layouts: one row per completion token and per SFT prompt token
        assert batch["comp"]["targets"].numel() == sum(len(c) + len(r) for _, c, r in ROWS)
        if prompt_loss:
            assert batch["sft"]["targets"].numel() == sum(len(p) - 1 for p, _, _ in ROWS)
        got = forward_pairs(model, batch, want_entropy=True)
        want = _alone(model, prompt_loss)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=f"{k}, prompt_loss {prompt_loss}")
        g_got = torch.autograd.grad((a * got["logps"]).sum() + (b * got["nll"]).sum(), params)
        g_want = torch.autograd.grad((a * want["logps"]).sum() + (b * want["nll"]).sum(), params)
        for x, y in zip(g_got, g_want):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_detail9_packed_batch_gives_the_padded_batch_loss_and_gradient(monkeypatch):
    """The ORPO loss of a packed micro-batch and its gradient equal the padded micro-batch's, to 1e-5; the packed
    rows hold fewer positions than the padded ones."""
    from orpo import pair_layout

    model, pad_id = _toy(monkeypatch, True)
    params = list(model.parameters())
    for prompt_loss in (True, False):
        losses, grads, sizes = [], [], []
        for packed in (False, True):
            batch = pair_layout(ROWS, pad_id, "cpu", prompt_loss, packed)
            f = forward_pairs(model, batch)
            mean = f["logps"] / f["tokens"]
            B = len(ROWS)
            loss = orpo_loss(mean[:B], mean[B:], f["nll"], f["nll_tokens"].sum().item() / B, 0.25)["loss"].mean()
            losses.append(loss)
            grads.append(torch.autograd.grad(loss, params))
            sizes.append(batch["inputs"]["input_ids"].numel())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for x, y in zip(*grads):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        assert sizes[1] < sizes[0]


@pytest.mark.parametrize("flags,match", [
    ({"beta": -0.1}, "--beta"),
    ({"lr_scheduler": "cosine"}, "--lr_scheduler"),
    ({"max_length": 8, "max_prompt_length": 8}, "--max_prompt_length"),
    ({"eval_fraction": 1.0}, "--eval_fraction"),
    ({"per_device_train_batch_size": 0}, "must be positive"),
])
def test_bad_configurations_raise(flags, match):
    with pytest.raises(ValueError, match=match):
        check_args(Args(**flags))


def test_unpaired_data_fails_before_any_model_loads_naming_kto(tmp_path, monkeypatch):
    """The data check comes before any model loads and before anything is written to output_dir (in-process: the
    same main() the entry point calls)."""
    from common import data, model as model_utils
    from orpo import main

    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps({"prompt": "1+1=", "completion": "2", "label": True}) + "\n" for _ in range(4)))
    monkeypatch.setattr(model_utils, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(data.DatasetFormatError, match="kto.py or bco.py"):
        main(Args(dataset_name=str(path), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- runs through the entry point
FAST = ["--logging_steps", "1", "--learning_rate", "1e-3", "--max_steps", "3"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, toy_policy):
    """1 process x 8 pairs, 3 steps, a checkpoint after every step, evaluation at steps 0 and 3."""
    out = tmp_path_factory.mktemp("orpo") / "base"
    run_script("orpo.py", *FAST, "--output_dir", str(out), "--eval_steps", "3", "--per_device_train_batch_size", "8",
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
        # one step per record: the loss is exactly the SFT token mean minus λ times the mean log σ (details 4, 5)
        assert r["loss"] == pytest.approx(r["nll_loss"] - 0.1 * r["log_odds_ratio"], rel=1e-5)
        assert r["rewards/chosen"] == pytest.approx(0.1 * r["logps/chosen"], rel=1e-5)  # λ S̄, a mean log-prob
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
        assert r["log_odds_ratio"] < 0 and r["rewards/chosen"] < 0
    for name in TRL_METRICS + ["gold_reward"]:
        assert math.isfinite(train[-1]["eval/" + name]), name
    model = AutoModelForCausalLM.from_pretrained(base_run)
    tok = AutoTokenizer.from_pretrained(base_run)
    before = _weights(toy_policy)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    ids = tok("12+34=", return_tensors="pt", add_special_tokens=True).input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_details1_4_first_step_equals_independent_computation(base_run, toy_policy):
    """The logged step-1 loss, NLL and log-odds equal a per-sequence recomputation of the first batch with the
    starting policy: each chosen sequence run alone, NLL over its prompt (after the first token) and completion."""
    from common import data, model as model_utils, preference

    tok = model_utils.load_tokenizer("toy-sft", "toy:add")
    ds = data.load_data("toy:add", "train", toy_kind="preference")
    first = data.batch_indices(len(ds), 8, 0, 1)  # the toy pairs all fit: no row is dropped, indices agree
    train = dict(zip(first, preference.tokenize_pairs(ds.select(first), tok, 1024, None)[0]))
    model = model_utils.load_causal_lm("toy-sft", tok, "toy:add").eval()
    nll, tokens, ratios = 0.0, 0, []
    with torch.no_grad():
        for i in first:
            p, c, r = train[i]
            means = []
            for comp in (c, r):
                ids = torch.tensor([p + comp])
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])
                means.append(lp[-len(comp):].mean().item())
                if comp is c:
                    nll, tokens = nll - lp.sum().item(), tokens + len(p) - 1 + len(c)
            ratios.append(lo(means[0]) - lo(means[1]))
    step1 = next(r for r in read_metrics(base_run) if r["step"] == 1)
    assert step1["nll_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert step1["log_odds_chosen"] == pytest.approx(sum(ratios) / 8, rel=1e-4)
    assert step1["log_odds_ratio"] == pytest.approx(sum(ls(z) for z in ratios) / 8, rel=1e-4)


def test_details5_9_two_processes_with_accumulation_and_packing_match_one_padded_batch(base_run, tmp_path):
    """1 process x 8 pairs, padded = 2 processes x 2 accumulation micro-batches x 2 pairs, packed (detail 9): same
    metrics, same weights."""
    out = tmp_path / "ddp"
    run_script("orpo.py", *FAST, "--output_dir", str(out), "--eval_steps", "0", "--per_device_train_batch_size", "2",
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
    run_script("orpo.py", *FAST, "--output_dir", str(out), "--eval_steps", "3", "--per_device_train_batch_size", "8",
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
def test_learning_raises_heldout_gold_reward(tmp_path, toy_policy):
    """The default run: ORPO on toy:add pairs raises the greedy held-out exact match of the toy SFT policy and the
    held-out reward accuracy."""
    out = tmp_path / "learn"
    run_script("orpo.py", "--output_dir", str(out), timeout=3600)
    evals = [r for r in read_metrics(out) if "eval/gold_reward" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 200
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.1, evals
    assert evals[-1]["eval/rewards/accuracies"] > 0.8
