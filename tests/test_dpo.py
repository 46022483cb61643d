"""dpo.py: every loss type against hand computations and invariants, the sequence log-prob plumbing, start-up errors,
and short runs through the real entry point (accumulation, two processes, exact resume, TR-DPO, precomputed
reference log-probs, reload)."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from conftest import accelerate_launcher, assert_fails_at_startup, read_metrics, run_script
from dpo import (LOSS_TYPES, Args, PairLogps, check_args, combined_loss, discopop_loss, f_divergence_scores,
                 forward_pairs, ld_sequence_logps, mix_reference, pair_batch, pair_loss, running_mean_update,
                 tokenize_pairs, wpo_weights)

TRL_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected"]


# ----------------------------------------------------------------------------- math: hand computations
def sig(x):
    return 1 / (1 + math.exp(-x))


def ls(x):  # log σ(x)
    return math.log(sig(x))


# two pairs: (S^θ_w, S^θ_l, S^ref_w, S^ref_l, |y_w|, |y_l|, NLL_w)
PAIRS = [(-2.0, -5.0, -3.0, -4.0, 2.0, 3.0, 2.0), (-1.0, -1.5, -0.5, -2.5, 4.0, 1.0, 1.0)]
BETA, EPS, TAU, DELTA, TPP = 0.5, 0.1, 0.05, 0.3, 2.5


def _q(pairs=PAIRS) -> PairLogps:
    cols = list(zip(*pairs))
    return PairLogps(*[torch.tensor(c, dtype=torch.float64) for c in cols])


def _hand(loss_type: str, c, r, rc, rr, lw, ll, nll) -> float:
    b, e = BETA, EPS
    dw, dl = c - rc, r - rr
    h, hn = dw - dl, dw / lw - dl / ll
    return {
        "sigmoid": lambda: -ls(b * h),
        "hinge": lambda: max(0.0, 1 - b * h),
        "ipo": lambda: (hn - 1 / (2 * b)) ** 2,
        "exo_pair": lambda: sig(b * h) * (ls(b * h) - math.log(1 - e)) + sig(-b * h) * (ls(-b * h) - math.log(e)),
        "nca_pair": lambda: -ls(b * dw) - 0.5 * ls(-b * dw) - 0.5 * ls(-b * dl),
        "robust": lambda: (-(1 - e) * ls(b * h) + e * ls(-b * h)) / (1 - 2 * e),
        "bco_pair": lambda: -ls(b * dw - DELTA) - ls(-(b * dl - DELTA)),
        "sppo_hard": lambda: (dw - 1 / (2 * b)) ** 2 + (dl + 1 / (2 * b)) ** 2,
        "apo_zero": lambda: 1 - sig(b * dw) + sig(b * dl),
        "apo_down": lambda: sig(b * dw) + 1 - sig(b * (dw - dl)),
        "discopop": lambda: (1 - sig(b * h / TAU)) * -ls(b * h) + sig(b * h / TAU) * math.exp(-b * h),
        "sft": lambda: nll / TPP,
        "sigmoid_norm": lambda: -ls(b * hn),
    }[loss_type]()


def _loss(loss_type, q=None, **kw):
    opts = dict(label_smoothing=EPS, discopop_tau=TAU, bco_delta=DELTA, tokens_per_pair=TPP)
    opts.update(kw)
    return pair_loss(loss_type, q if q is not None else _q(), BETA, **opts)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if not t.startswith("aot")])
def test_each_loss_type_matches_hand_computation(loss_type):
    got = _loss(loss_type).tolist()
    want = [_hand(loss_type, *p) for p in PAIRS]
    assert got == pytest.approx(want, rel=1e-9)


def test_aot_losses_sort_over_the_batch_hand_example():
    # policy margins S^θ_w - S^θ_l = [3, 0.5] -> sorted [0.5, 3]; reference margins [1, 2] -> [1, 2]: d = [-0.5, 1]
    d = [-0.5, 1.0]
    want = [-(1 - EPS) * ls(BETA * x) - EPS * ls(-BETA * x) for x in d]
    assert _loss("aot").tolist() == pytest.approx(want, rel=1e-9)
    # Δ_w = [1, -0.5] -> [-0.5, 1]; Δ_l = [-1, 1] -> [-1, 1]: d = [0.5, 0]
    d = [0.5, 0.0]
    want = [-(1 - EPS) * ls(BETA * x) - EPS * ls(-BETA * x) for x in d]
    assert _loss("aot_unpaired").tolist() == pytest.approx(want, rel=1e-9)
    # sorting pairs the k-th smallest with the k-th smallest: a batch permutation permutes nothing in the result
    swapped = _q(PAIRS[::-1])
    assert _loss("aot", swapped).tolist() == pytest.approx(_loss("aot").tolist())


def test_losses_at_policy_equal_reference():
    """θ = ref gives Δ = 0, h = 0 (ALGORITHMS.md 7, test 1)."""
    q = _q([(-3.0, -7.5, -3.0, -7.5, 2.0, 5.0, 3.0), (-1.2, -4.0, -1.2, -4.0, 1.0, 3.0, 1.2)])
    b, log2, e = 0.1, math.log(2), 1e-3
    expected = {
        "sigmoid": log2, "robust": log2, "sigmoid_norm": log2, "aot": log2, "aot_unpaired": log2,
        "hinge": 1.0, "ipo": 1 / (4 * b * b), "sppo_hard": 2 * (1 / (2 * b)) ** 2,
        "nca_pair": 2 * log2, "bco_pair": 2 * log2, "apo_zero": 1.0, "apo_down": 1.0,
        "discopop": (log2 + 1) / 2,  # the gate is 1/2: half logistic (log 2), half exponential (1)
        "exo_pair": -log2 - 0.5 * math.log(e * (1 - e)),
    }
    for loss_type, v in expected.items():
        ls_ = 0.1 if loss_type == "robust" else (e if loss_type == "exo_pair" else 0.0)
        got = pair_loss(loss_type, q, b, label_smoothing=ls_)
        assert got.tolist() == pytest.approx([v, v], rel=1e-9), loss_type
    # robust is unbiased, not smoothed: at h = 0 it is log 2 for every flip rate ε < 1/2
    assert pair_loss("robust", q, b, label_smoothing=0.3).tolist() == pytest.approx([log2, log2])


def test_discopop_slope_at_the_reference():
    """dL/dh at h = 0 is β((1 - log 2)/(4τ) - 3/4): positive for τ < 0.10 (the margin first moves down from policy =
    reference, see benchmarks/results/dpo), negative above."""
    for beta, tau in ((0.1, 0.05), (0.5, 0.05), (0.1, 0.2)):
        h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        discopop_loss(h, beta, tau).backward()
        assert h.grad.item() == pytest.approx(beta * ((1 - math.log(2)) / (4 * tau) - 0.75), rel=1e-9)


def test_sigmoid_gradient_and_robust_at_zero_flip_rate():
    h = torch.tensor([-3.0, 0.0, 0.7, 4.0], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(4, dtype=torch.float64)
    q = PairLogps(h, zeros, zeros, zeros, zeros + 1, zeros + 1, zeros)  # Δ_w = h, Δ_l = 0
    beta = 0.3
    pair_loss("sigmoid", q, beta).sum().backward()
    assert h.grad.tolist() == pytest.approx([-beta * sig(-beta * x) for x in (-3.0, 0.0, 0.7, 4.0)], rel=1e-9)
    qd = PairLogps(*[t.detach() for t in q])
    assert torch.allclose(pair_loss("robust", qd, beta, label_smoothing=0.0), pair_loss("sigmoid", qd, beta))


def test_weighted_multi_loss_is_weighted_sum_of_single_losses():
    q = _q()
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # MPO
    pw = torch.tensor([0.5, 2.0], dtype=torch.float64)
    total, parts = combined_loss(q, types, weights, BETA, pw, rpo_alpha=0.7, tokens_per_pair=TPP, bco_delta=DELTA)
    want = sum(w * pw * pair_loss(t, q, BETA, bco_delta=DELTA, tokens_per_pair=TPP) for t, w in zip(types, weights))
    want = want + 0.7 * q.chosen_nll / TPP  # RPO: never WPO-weighted
    assert torch.allclose(total, want)
    assert set(parts) == {"sigmoid", "bco_pair", "sft", "rpo"}
    assert torch.allclose(sum(parts.values()), total)


def test_sft_term_is_global_token_mean():
    """Detail 7: per-pair NLL / (mean chosen length of the step): its mean over pairs is Σ NLL / Σ tokens."""
    q = _q()
    tokens = float(q.chosen_len.sum())
    tpp = tokens / 2
    assert pair_loss("sft", q, BETA, tokens_per_pair=tpp).mean().item() == pytest.approx(3.0 / tokens)


def test_f_divergence_scores():
    d = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    assert torch.equal(f_divergence_scores(d, "reverse_kl"), d)
    assert f_divergence_scores(d, "forward_kl").tolist() == pytest.approx([1 - math.exp(-x) for x in d.tolist()])
    assert f_divergence_scores(d, "js_divergence").tolist() == pytest.approx(
        [math.log(2) + ls(x) for x in d.tolist()])
    # α = 0.5: (e^{-Δ/2} - 1) / (-1/2)
    assert f_divergence_scores(d, "alpha_divergence", 0.5).tolist() == pytest.approx(
        [(math.exp(-0.5 * x) - 1) / -0.5 for x in d.tolist()])
    assert torch.allclose(f_divergence_scores(d, "alpha_divergence", 1.0), d)  # the limit is the reverse KL
    # every f-score is 0 at Δ = 0, so policy = reference still gives log 2 for sigmoid
    for kind in ("forward_kl", "js_divergence", "alpha_divergence"):
        assert f_divergence_scores(torch.zeros(1), kind).item() == pytest.approx(0.0, abs=1e-7)
    q = _q()
    got = pair_loss("sigmoid", q, BETA, f_divergence_type="forward_kl")
    want = [-ls(BETA * ((1 - math.exp(-(c - rc))) - (1 - math.exp(-(r - rr))))) for c, r, rc, rr, *_ in PAIRS]
    assert got.tolist() == pytest.approx(want)


def test_ld_sequence_logps_hand_example():
    lp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0],  # chosen: 3 and 1 tokens
                       [-4.0, -1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])  # rejected: 2 and 4 tokens
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    assert ld_sequence_logps(lp, mask, None).tolist() == [-6.0, -0.5, -5.0, -4.0]
    assert ld_sequence_logps(lp, mask, 1.0).tolist() == [-6.0, -0.5, -5.0, -4.0]
    # shared lengths: pair 0 min(3, 2) = 2, pair 1 min(1, 4) = 1; the tail counts at α = 0.5
    assert ld_sequence_logps(lp, mask, 0.5).tolist() == [-3.0 - 1.5, -0.5, -5.0, -1.0 - 1.5]
    assert ld_sequence_logps(lp, mask, 0.0).tolist() == [-3.0, -0.5, -5.0, -1.0]


def test_wpo_weights_hand_example():
    # one-token completions; distribution p = (0.5, 0.25, 0.25): Σ p² = 0.375
    lss = torch.full((2, 1), math.log(0.375))
    lp = torch.tensor([[math.log(0.5)], [math.log(0.25)]])
    w = wpo_weights(lp, lss, torch.ones(2, 1))
    assert w.tolist() == pytest.approx([(0.5 / 0.375) * (0.25 / 0.375)])


def test_running_mean_and_reference_mix():
    mean, count = 0.0, 0
    for v in (1.0, 4.0, -2.0, 5.0):
        mean, count = running_mean_update(mean, count, v)
    assert (mean, count) == (pytest.approx(2.0), 4)
    torch.manual_seed(0)
    ref, pol = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old = [p.detach().clone() for p in ref.parameters()]
    mix_reference(ref, pol, 0.6)
    for p_ref, p_old, p in zip(ref.parameters(), old, pol.parameters()):
        assert torch.allclose(p_ref, 0.6 * p + 0.4 * p_old)


# ----------------------------------------------------------------------------- data and forwards
def test_tokenize_pairs_drops_a_pair_with_an_empty_prompt():
    """Detail 2: with no prompt token nothing predicts the first completion token, so dpo drops the pair (and counts
    it); common/preference.py's default keeps such rows."""
    from datasets import Dataset

    from common import preference, toy

    tok = toy.make_tokenizer()
    tok.bos_token = None  # a tokenizer without a BOS token: an empty prompt tokenises to nothing
    ds = Dataset.from_list([{"prompt": "", "chosen": "5", "rejected": "6"},
                            {"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    rows, dropped = tokenize_pairs(ds, tok, None, None)
    assert dropped == 1 and len(rows) == 1 and tok.decode(rows[0][0]) == "1+1="
    kept, none = preference.tokenize_pairs(ds, tok, None, None)
    assert none == 0 and kept[0][0] == [] and kept[1] == rows[0]


def test_tokenize_pairs_truncation_sides():
    from datasets import Dataset

    from common import toy

    tok = toy.make_tokenizer()
    ds = Dataset.from_list([{"prompt": "12+34=", "chosen": "46", "rejected": "47"}])
    (p, c, r), = tokenize_pairs(ds, tok, None, None)[0]
    assert tok.decode(p) == "<bos>12+34=" and tok.decode(c) == "46<eos>" and tok.decode(r) == "47<eos>"
    # the prompt keeps its last tokens; the completions keep their first tokens
    (p, c, r), = tokenize_pairs(ds, tok, 6, 4)[0]
    assert tok.decode(p) == "+34=" and tok.decode(c) == "46" and tok.decode(r) == "47"
    # a prompt that fills max_length leaves no completion: the pair is dropped
    rows, dropped = tokenize_pairs(ds, tok, 7, None)
    assert rows == [] and dropped == 1
    # implicit prompt: the shared start of chosen and rejected becomes the prompt
    from common import data

    implicit = data.convert(Dataset.from_list([{"chosen": "12+34=46", "rejected": "12+34=47"}]), "preference")
    (p, c, r), = tokenize_pairs(implicit, tok, None, None)[0]
    assert tok.decode(p) == "<bos>12+34=" and tok.decode(c) == "46<eos>"


@pytest.mark.parametrize("layout", ["shared_sdpa", "shared_eager", "two_rows"])
def test_one_forward_per_pair_equals_separate_forwards(layout):
    """Detail 1: the log-probs of chosen and rejected from one forward (shared prompt with a block mask, or two rows
    per pair) equal those of a separate forward of prompt + completion, for prompts of different lengths."""
    from transformers import AutoModelForCausalLM

    from common import model as model_utils, toy

    tok = toy.make_tokenizer()
    torch.manual_seed(0)
    attn = "eager" if layout == "shared_eager" else "sdpa"
    model = AutoModelForCausalLM.from_config(toy.make_config(tok), attn_implementation=attn).eval()
    rows = [([1, 20, 21], [30, 2], [31, 32, 33, 2]), ([1, 22], [34, 35, 36, 37, 2], [38, 2]), ([1, 23, 24, 25], [39, 2],
                                                                                             [40, 41, 2])]
    batch = pair_batch(rows, tok.pad_token_id, "cpu", share_prompt=layout != "two_rows",
                       mask_dtype=torch.float32 if attn == "eager" else torch.bool)
    with torch.no_grad():
        lp, st = forward_pairs(model, batch, want_log_sum_sq=True, want_entropy=True)
        mask = batch["completion_mask"].float()
        seq = ld_sequence_logps(lp, mask, None)
        for i, (p, c, r) in enumerate(rows):
            for j, comp in ((i, c), (i + len(rows), r)):
                ids = torch.tensor([p + comp])
                alone = model_utils.completion_logps(model, ids, torch.ones_like(ids), len(comp))[0]
                assert lp[j, :len(comp)].tolist() == pytest.approx(alone.tolist(), abs=1e-5)
                assert mask[j].sum().item() == len(comp)
                assert seq[j].item() == pytest.approx(alone.sum().item(), abs=1e-5)
                # the token statistics against the full logits of that sequence alone (the positions predicting it)
                logits = model(ids).logits[0, len(p) - 1:-1].float()
                full = torch.log_softmax(logits, -1)
                k = len(comp)
                torch.testing.assert_close(st["mean_logits"][j, :k], logits.mean(-1), atol=1e-5, rtol=1e-5)
                assert torch.equal(st["argmax"][j, :k], logits.argmax(-1))
                torch.testing.assert_close(st["log_sum_sq"][j, :k], torch.log((full.exp() ** 2).sum(-1)),
                                           atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(st["entropy"][j, :k], -(full.exp() * full).sum(-1), atol=1e-5, rtol=1e-5)


def _pair_loss_and_grads(model, ref, batch, loss_types, ld_alpha, weighting, rpo_alpha):
    """The training path of main() on one micro-batch: sequence log-probs, reference, WPO, loss and gradients."""
    model.zero_grad()
    mask = batch["completion_mask"].float()
    lp, st = forward_pairs(model, batch, want_log_sum_sq=weighting)
    seq = ld_sequence_logps(lp, mask, ld_alpha)
    with torch.no_grad():
        ref_seq = ld_sequence_logps(forward_pairs(ref, batch)[0], mask, ld_alpha)
    B, lens = mask.shape[0] // 2, mask.sum(1)
    q = PairLogps(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], lens[:B], lens[B:], -(lp[:B] * mask[:B]).sum(1))
    pw = wpo_weights(lp, st["log_sum_sq"], mask) if weighting else None
    total, parts = combined_loss(q, loss_types, [1.0, 0.5, 2.0], 0.1, pw, rpo_alpha, 3.0, label_smoothing=0.1)
    loss = total.mean()
    loss.backward()
    return lp * mask, seq, ref_seq, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["shared_sdpa", "shared_eager", "two_rows"])
def test_packed_micro_batch_equals_padded(layout):
    """Detail 12: pairs of very different lengths (prompts 1-30 tokens, completions 1-90) packed padding-free give
    each sequence's token log-probs, S^θ and S^ref, the loss and every gradient of the padded micro-batch, for loss
    types that sum, length-normalise (ipo, sigmoid_norm), sort (aot) or take the NLL (sft, rpo), with LD-DPO and WPO;
    and the rows really are packed (fewer than the padded layout's, no row longer)."""
    import random

    from transformers import AutoModelForCausalLM

    from common import toy

    tok = toy.make_tokenizer()
    attn = "eager" if layout == "shared_eager" else "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(toy.make_config(tok), attn_implementation=attn)
    torch.manual_seed(1)
    ref = AutoModelForCausalLM.from_config(toy.make_config(tok), attn_implementation=attn).eval()
    rng = random.Random(0)

    def toks(n):
        return [rng.randrange(5, 40) for _ in range(n)]

    lengths = [(0, 89, 0), (29, 2, 40), (3, 0, 1), (12, 30, 60), (0, 5, 5), (7, 0, 88), (1, 1, 1), (20, 14, 3)]
    rows = [([1] + toks(p), toks(c) + [2], toks(r) + [2]) for p, c, r in lengths]
    share = layout != "two_rows"
    kw = dict(share_prompt=share, mask_dtype=torch.float32 if attn == "eager" else torch.bool)
    padded = pair_batch(rows, tok.pad_token_id, "cpu", **kw)
    packed = pair_batch(rows, tok.pad_token_id, "cpu", packing=True, **kw)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["input_ids"].shape[1] <= padded["input_ids"].shape[1]
    assert torch.equal(packed["completion_mask"], padded["completion_mask"])
    for loss_types, ld_alpha, weighting, rpo in ((["sigmoid", "ipo", "nca_pair"], 0.5, True, 0.5),
                                                 (["aot", "sigmoid_norm", "sft"], None, False, None)):
        a = _pair_loss_and_grads(model, ref, padded, loss_types, ld_alpha, weighting, rpo)
        b = _pair_loss_and_grads(model, ref, packed, loss_types, ld_alpha, weighting, rpo)
        for x, y in zip(a[:4], b[:4]):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
        assert a[4].keys() == b[4].keys()
        for name in a[4]:
            torch.testing.assert_close(b[4][name], a[4][name], atol=1e-5, rtol=1e-4, msg=name)
        assert a[3].item() > 0 and any(g.abs().max() > 1e-3 for g in a[4].values())  # a loss and gradient to match


def test_precomputed_cache_reused_only_on_resume_with_the_same_fingerprint(tmp_path):
    from types import SimpleNamespace

    from common import model as model_utils, toy
    from dpo import load_or_precompute

    tok = toy.make_tokenizer()
    ref = model_utils.load_causal_lm("toy", tok, seed=0).eval()
    acc = SimpleNamespace(num_processes=1, process_index=0, device="cpu", is_main_process=True,
                          wait_for_everyone=lambda: None, print=lambda *a: None)
    args = Args(output_dir=str(tmp_path), precompute_ref_log_probs=True, per_device_eval_batch_size=2)
    rows = [([1, 20, 21], [30, 2], [31, 32, 2]), ([1, 22], [34, 2], [38, 39, 40, 2]), ([1, 23], [33, 2], [35, 2])]
    make_batch = functools.partial(pair_batch, pad_id=tok.pad_token_id, device="cpu")
    first = load_or_precompute(args, ref, rows, rows[:1], make_batch, acc, resuming=False)
    assert (tmp_path / "ref_logps" / "ref_logps.safetensors").exists()
    batch = pair_batch(rows, tok.pad_token_id, "cpu")
    with torch.no_grad():
        live = ld_sequence_logps(forward_pairs(ref, batch)[0], batch["completion_mask"].float(), None)
    assert torch.allclose(torch.cat([first["train_chosen"], first["train_rejected"]]), live, atol=1e-5)
    # resuming with the same data and reference: read back, no reference needed
    again = load_or_precompute(args, None, rows, rows[:1], make_batch, acc, resuming=True)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # other data (or a new run): computed again
    with pytest.raises(TypeError):  # it tried to run the (absent) reference
        load_or_precompute(args, None, rows[:2], rows[:1], make_batch, acc, resuming=True)
    with pytest.raises(TypeError):  # it tried to run the (absent) reference
        load_or_precompute(args, None, rows, rows[:1], make_batch, acc, resuming=False)


@pytest.mark.parametrize("flags,match", [
    ({"loss_type": ["sigmoid", "dpop"]}, "unknown loss type 'dpop'"),
    ({"loss_type": ["aot_pair"]}, "aot_unpaired"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "--loss_weights has 1 values for 2"),
    ({"loss_type": ["ipo"], "label_smoothing": 0.1}, "--label_smoothing"),
    ({"loss_type": ["sigmoid"], "label_smoothing": 0.1}, "robust"),
    ({"loss_type": ["robust"], "label_smoothing": 0.5}, "[0, 0.5)"),
    ({"loss_type": ["exo_pair"]}, "exo_pair needs"),
    ({"loss_type": ["bco_pair"], "f_divergence_type": "js_divergence"}, "bco_pair"),
    ({"f_divergence_type": "kl"}, "--f_divergence_type"),
    ({"loss_type": ["aot"], "use_weighting": True}, "--use_weighting"),
    ({"loss_type": ["sft"], "rpo_alpha": 1.0}, "--rpo_alpha"),
    ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "stale"),
    ({"reference_free": True, "precompute_ref_log_probs": True}, "--reference_free"),
    ({"ld_alpha": 1.5}, "--ld_alpha"),
    ({"max_length": 8, "max_prompt_length": 8}, "--max_prompt_length"),
])
def test_bad_configurations_raise(flags, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_args(Args(**flags))


def test_bad_input_fails_before_any_model_loads(tmp_path):
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps({"prompt": "1+1=", "completion": "2", "label": True}) + "\n" for _ in range(4)))
    # the data check fails before the model is loaded and before anything is written
    assert_fails_at_startup("dpo.py", tmp_path, ["--dataset_name", str(path), "--model_name_or_path", "toy"],
                            "kto.py")


# ----------------------------------------------------------------------------- runs through the entry point
FAST = ["--logging_steps", "1", "--eval_steps", "0", "--learning_rate", "1e-3"]
MPO = ["--loss_type", "sigmoid", "bco_pair", "sft", "--loss_weights", "0.8", "0.2", "1.0", "--bco_running_mean", "True"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _close(a: dict, b: dict, tol=1e-5):
    return all(torch.allclose(a[k], b[k], atol=tol, rtol=0) for k in a)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, toy_policy):
    """1 process x 8 pairs, 3 steps of MPO with the running δ: shared by several tests."""
    out = tmp_path_factory.mktemp("dpo") / "base"
    run_script("dpo.py", *FAST, *MPO, "--max_steps", "3", "--output_dir", str(out), "--eval_steps", "3",
               "--per_device_train_batch_size", "8",
               "--num_eval_pairs", "16", "--num_eval_prompts", "8")
    return out


def test_run_logs_trl_metrics_and_saves_a_reloadable_model(base_run, toy_policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recs = read_metrics(base_run)
    assert recs[0]["step"] == 0 and recs[0]["eval/loss"] is not None
    train = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in train] == [1, 2, 3]
    for name in TRL_METRICS + ["loss/sigmoid", "loss/bco_pair", "loss/sft", "bco/delta", "mean_token_accuracy"]:
        assert all(math.isfinite(r[name]) for r in train), name
    for name in TRL_METRICS + ["gold_reward"]:
        assert math.isfinite(train[-1]["eval/" + name]), name
    first = train[0]
    # step 1: policy = reference, so every implicit reward is exactly 0 (detail 10: deterministic log-probs)
    assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert first["bco/delta"] == 0.0  # δ is updated after the step from that step's rewards (detail 5)
    assert train[1]["bco/delta"] == pytest.approx(0.0, abs=1e-9)  # step 1's rewards were all 0
    assert train[2]["bco/delta"] != 0.0  # ... and step 2's were not
    assert first["loss/sigmoid"] == pytest.approx(0.8 * math.log(2), rel=1e-6)
    assert first["loss/bco_pair"] == pytest.approx(0.2 * 2 * math.log(2), rel=1e-6)
    # the sft term is the chosen tokens' NLL over their count: -logps/chosen / (mean chosen length), and a toy:add
    # answer is 1 to 3 digits + EOS
    assert -first["logps/chosen"] / 4 <= first["loss/sft"] <= -first["logps/chosen"] / 2
    assert first["loss"] == pytest.approx(first["loss/sigmoid"] + first["loss/bco_pair"] + first["loss/sft"])
    model = AutoModelForCausalLM.from_pretrained(base_run)
    tok = AutoTokenizer.from_pretrained(base_run)
    before = _weights(toy_policy)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    ids = tok("12+34=", return_tensors="pt", add_special_tokens=True).input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_run_reference_free_with_options_on_conversational_data(tmp_path, toy_policy):
    """Reference-free (S^ref = 0, detail 9), WPO, LD-DPO, an f-divergence and RPO together on chat-format pairs, in
    TRL's two-rows-per-pair layout: the implicit rewards are β·S^θ, and every option's term is logged."""
    out = tmp_path / "opts"
    run_script("dpo.py", *FAST, "--per_device_train_batch_size", "8", "--max_steps", "2", "--output_dir", str(out),
               "--dataset_name", "toy:add:conversational", "--reference_free", "True", "--use_weighting", "True",
               "--ld_alpha", "0.5", "--f_divergence_type", "js_divergence", "--rpo_alpha", "0.5",
               "--loss_type", "sigmoid_norm", "discopop", "--loss_weights", "1.0", "0.5", "--share_prompt", "False")
    train = [r for r in read_metrics(out) if r["step"] > 0]
    for r in train:
        assert r["rewards/chosen"] == pytest.approx(0.1 * r["logps/chosen"], rel=1e-5)
        assert r["rewards/rejected"] == pytest.approx(0.1 * r["logps/rejected"], rel=1e-5)
        assert 0 < r["wpo/weights"] < float("inf")
        assert r["loss"] == pytest.approx(r["loss/sigmoid_norm"] + r["loss/discopop"] + r["loss/rpo"], rel=1e-6)


def test_accumulation_and_two_processes_match_one_batch(base_run, tmp_path):
    """1 x 8 = 4 x 2 (accumulation) = 2 processes x 4: same losses, same running δ, same weights."""
    acc, ddp = tmp_path / "acc", tmp_path / "ddp"
    run_script("dpo.py", *FAST, *MPO, "--max_steps", "3", "--output_dir", str(acc),
               "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4")
    run_script("dpo.py", *FAST, *MPO, "--max_steps", "3", "--output_dir", str(ddp),
               "--per_device_train_batch_size", "4", launcher=accelerate_launcher(2), timeout=900)
    ref = {r["step"]: r for r in read_metrics(base_run) if r["step"] > 0}
    for out in (acc, ddp):
        got = {r["step"]: r for r in read_metrics(out)}
        for step in (1, 2, 3):
            for k in ("loss", "loss/sft", "rewards/margins", "logps/chosen", "bco/delta", "logits/chosen"):
                assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4, abs=1e-6), (out.name, step, k)
        assert _close(_weights(out), _weights(base_run), 1e-5), out.name


def test_packing_run_matches_padded_run(base_run, tmp_path):
    """Detail 12 through the entry point: --packing (whole pairs packed, the shared prompt) gives the padded run's
    logged losses and metrics (training and eval) and its weights (MPO with the running δ). The sequence-packed
    layout (--share_prompt False) goes through the same make_batch and forward_pairs, checked per micro-batch above."""
    keys = ["loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "mean_token_accuracy", "bco/delta",
            "eval/loss", "eval/rewards/margins", "eval/logps/rejected"]
    want = {r["step"]: r for r in read_metrics(base_run) if r["step"] > 0}
    assert want[3]["rewards/margins"] != 0.0  # the policy moved: the runs compared trained
    out = tmp_path / "packed"
    run_script("dpo.py", *FAST, *MPO, "--max_steps", "3", "--output_dir", str(out), "--eval_steps", "3",
               "--per_device_train_batch_size", "8", "--num_eval_pairs", "16", "--num_eval_prompts", "8",
               "--packing", "True")
    got = {r["step"]: r for r in read_metrics(out) if r["step"] > 0}
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        for k in (k for k in keys if k in want[step]):  # eval/ keys at step 3 only
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-5, abs=1e-6), (step, k)
    assert "eval/loss" in got[3]
    assert _close(_weights(out), _weights(base_run), 1e-5)


def test_resume_is_exact_with_tr_dpo_reference_and_running_delta(tmp_path, toy_policy):
    """Detail 4: after each sync θ_ref = α θ + (1 - α) θ_ref_prev; the moved reference and δ come back on
    resume."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*FAST, *MPO, "--per_device_train_batch_size", "8", "--max_steps", "4", "--save_steps", "1",
              "--save_total_limit", "5",
              "--sync_ref_model", "True", "--ref_model_sync_steps", "1", "--ref_model_mixup_alpha", "0.6"]
    run_script("dpo.py", *common, "--output_dir", str(a))
    run_script("dpo.py", *common, "--output_dir", str(b), "--resume_from", str(a / "checkpoint-2"))
    ra = {r["step"]: r for r in read_metrics(a)}
    rb = {r["step"]: r for r in read_metrics(b)}
    assert sorted(s for s in rb if s > 0) == [3, 4]
    for step in (3, 4):
        for k in ("loss", "rewards/margins", "logps/chosen", "bco/delta", "ref_model_syncs"):
            assert rb[step][k] == pytest.approx(ra[step][k], rel=1e-6, abs=1e-9), (step, k)
    assert _close(_weights(a), _weights(b), 0.0)
    # TR-DPO by hand: the reference saved at step 4 mixes the step-4 policy into the step-3 reference
    from safetensors.torch import load_file

    s3 = load_file(str(a / "checkpoint-3" / "state" / "model_ref.safetensors"))
    s4 = load_file(str(a / "checkpoint-4" / "state" / "model_ref.safetensors"))
    pol4 = _weights(a / "checkpoint-4")
    shared = set(s4) & set(pol4)  # tied embeddings: the two files may name the shared matrix differently
    assert len(shared) >= len(pol4) - 1
    for k in shared:
        assert torch.allclose(s4[k], 0.6 * pol4[k] + 0.4 * s3[k], atol=1e-6), k
    # and the reference did move away from the starting policy (it is used: step 2's margin is measured against it)
    start = _weights(toy_policy)
    assert any(not torch.allclose(s4[k], start[k]) for k in shared)


def test_precomputed_reference_matches_a_live_reference(tmp_path, toy_policy):
    """Detail 3: a run with --precompute_ref_log_probs (reference: a fresh toy init, unlike the policy) logs the
    first-step loss that the policy and a live reference give on the same batch, computed here."""
    from safetensors.torch import load_file

    from common import data, model as model_utils

    out = tmp_path / "pre"
    run_script("dpo.py", *FAST, "--per_device_train_batch_size", "8", "--max_steps", "1", "--ref_model_name_or_path",
               "toy", "--loss_type", "sigmoid", "ipo", "--precompute_ref_log_probs", "True", "--output_dir", str(out),
               "--num_eval_pairs", "16")
    logged = [r for r in read_metrics(out) if r["step"] == 1][0]
    cache = load_file(str(out / "ref_logps" / "ref_logps.safetensors"))
    ds = data.load_data("toy:add", "train", toy_kind="preference")
    assert cache["train_chosen"].shape == (len(ds),) and cache["eval_chosen"].shape == (16,)
    tok = model_utils.load_tokenizer("toy-sft")
    policy = model_utils.load_causal_lm("toy-sft", tok).eval()
    ref = model_utils.load_causal_lm("toy", tok, seed=1).eval()  # the run's seed
    idx = data.batch_indices(len(ds), 8, 0, 1)  # the run's first batch
    rows, _ = tokenize_pairs(ds.select(idx), tok, 1024, None)
    batch = pair_batch(rows, tok.pad_token_id, "cpu")  # the run's layout (shared prompt)
    two = pair_batch(rows, tok.pad_token_id, "cpu", share_prompt=False)  # the live reference: plain prompt + completion
    mask = batch["completion_mask"].float()
    with torch.no_grad():
        seq = ld_sequence_logps(forward_pairs(policy, batch)[0], mask, None)
        T = two["completion_mask"].shape[1]
        live = (model_utils.completion_logps(ref, two["input_ids"], two["attention_mask"], T)
                * two["completion_mask"]).sum(1)
    assert torch.allclose(torch.cat([cache["train_chosen"][idx], cache["train_rejected"][idx]]), live, atol=1e-4)
    lens = mask.sum(1)
    q = PairLogps(seq[:8], seq[8:], live[:8], live[8:], lens[:8], lens[8:], torch.zeros(8))
    total, _ = combined_loss(q, ["sigmoid", "ipo"], [1.0, 1.0], 0.1)
    assert abs(total.mean().item() - (math.log(2) + 1 / (4 * 0.1 ** 2))) > 1.0  # far from the policy = reference value
    assert logged["loss"] == pytest.approx(total.mean().item(), rel=1e-5)
    margins = 0.1 * ((q.chosen - q.ref_chosen) - (q.rejected - q.ref_rejected))
    assert logged["rewards/margins"] == pytest.approx(margins.mean().item(), rel=1e-4)


@pytest.mark.slow
def test_learning_raises_heldout_gold_reward(tmp_path, toy_policy):
    """The default run: DPO on toy:add pairs raises the greedy held-out exact match of the toy SFT policy and the
    held-out reward accuracy."""
    out = tmp_path / "learn"
    run_script("dpo.py", "--output_dir", str(out), timeout=3600)
    evals = [r for r in read_metrics(out) if "eval/gold_reward" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 200
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.15, evals
    assert evals[-1]["eval/rewards/accuracies"] > 0.8
