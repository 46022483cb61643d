"""The fast paths: chunked log-probs (no full-vocabulary float32 logits), against the straightforward computation."""

from __future__ import annotations

import pytest
import torch

from common import model as model_utils, toy


def _toy_model(seed: int = 0, **config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(toy.make_config(toy.make_tokenizer(), **config))


def _batch(B: int = 4, L: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 100, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[0, :3] = 0  # left padding of different widths
    am[1, :1] = 0
    return ids, am


def straightforward(model, ids, am, T, temperature=1.0):
    """Full logits from the forward, float32 log-softmax over the vocabulary, gather: the reference computation."""
    logits = model(input_ids=ids, attention_mask=am, position_ids=model_utils.position_ids_from_mask(am),
                   use_cache=False).logits[:, -T - 1:-1].float() / temperature
    lp = torch.log_softmax(logits, -1)
    return lp.gather(-1, ids[:, -T:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1), lp.argmax(-1)


def _grads(model, out, weights):
    model.zero_grad()
    (out * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_elements", [None, 104 * 3])  # one block / blocks of 3 rows (boundaries inside rows)
def test_completion_logps_matches_full_logits(temperature, chunk_elements):
    model = _toy_model()
    assert model_utils.chunked_head(model) is model.lm_head  # the toy Llama takes the chunked path
    ids, am = _batch()
    T = 5
    w = torch.randn(ids.shape[0], T, generator=torch.Generator().manual_seed(3))  # an arbitrary loss of the log-probs
    ref_lp, ref_ent, ref_arg = straightforward(model, ids, am, T, temperature)
    g_ref = _grads(model, ref_lp, w)
    lp, ent, arg = model_utils.completion_logps(model, ids, am, T, temperature, return_entropy=True,
                                                return_argmax=True, chunk_elements=chunk_elements)
    g = _grads(model, lp, w)
    assert lp.shape == ent.shape == arg.shape == (ids.shape[0], T)
    assert _close(lp, ref_lp) and _close(ent, ref_ent) and torch.equal(arg, ref_arg)
    assert g.keys() == g_ref.keys()
    for n in g_ref:  # the tied embedding / head weight gets both its input and its output gradient
        assert _close(g[n], g_ref[n]), n
    assert not ent.requires_grad and not arg.requires_grad


def test_return_shapes_and_no_grad_reference():
    model = _toy_model()
    ids, am = _batch()
    lp = model_utils.completion_logps(model, ids, am, 4)
    assert torch.is_tensor(lp) and lp.shape == (4, 4) and lp.requires_grad
    lp2, ent = model_utils.completion_logps(model, ids, am, 4, return_entropy=True)
    assert torch.allclose(lp, lp2) and ent.shape == (4, 4) and (ent > 0).all()
    with torch.no_grad():
        lp3 = model_utils.completion_logps(model, ids, am, 4)
    assert not lp3.requires_grad and torch.allclose(lp3, lp)


def test_head_with_bias_matches_and_gets_gradients():
    """A head with a bias (Phi's): values and the gradients of hidden states, weight and bias."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    h = torch.randn(3, 7, 16, requires_grad=True)
    y = torch.randint(0, 50, (3, 7))
    w = torch.randn(3, 7)
    ref = torch.log_softmax(head(h).float() / 0.9, -1).gather(-1, y[..., None]).squeeze(-1)
    ga = torch.autograd.grad((ref * w).sum(), [h, head.weight, head.bias])
    lp = model_utils.head_logps(h, head, y, 0.9, chunk_elements=50 * 4)
    gb = torch.autograd.grad((lp * w).sum(), [h, head.weight, head.bias])
    assert _close(lp, ref)
    assert all(_close(a, b) for a, b in zip(ga, gb))


def test_no_full_vocabulary_tensor_is_saved_for_backward():
    """With a large vocabulary nothing of size B x T x V is kept for the backward (the straightforward path keeps
    the float32 logits), and no block of logits larger than the chunk is made."""
    V = 20000
    model = _toy_model(hidden_size=32, num_layers=1, num_heads=2)
    model.resize_token_embeddings(V, mean_resizing=False)
    ids, am = _batch(B=8, L=20)
    T = 16
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = model_utils.completion_logps(model, ids, am, T, chunk_elements=V * 8)
    full = 8 * T * V
    assert max(saved) <= V * 32 < full / 3  # the head weight (V x H) at most: hidden states, per-row normalisers
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ref, _, _ = straightforward(model, ids, am, T)
    assert max(saved) >= full  # the reference computation keeps (at least) the whole logits tensor
    assert _close(lp, ref)


def test_fallback_path_for_models_that_post_process_logits(monkeypatch):
    """A model class outside PLAIN_HEAD_MODELS gets its logits from its own forward: same numbers."""
    model = _toy_model()
    ids, am = _batch()
    fast, fast_ent = model_utils.completion_logps(model, ids, am, 5, 0.8, return_entropy=True)
    monkeypatch.setattr(model_utils, "PLAIN_HEAD_MODELS", set())
    assert model_utils.chunked_head(model) is None
    slow, slow_ent = model_utils.completion_logps(model, ids, am, 5, 0.8, return_entropy=True)
    assert _close(fast, slow) and _close(fast_ent, slow_ent)


def test_peft_models_and_the_adapter_off_reference_take_the_chunked_path():
    pytest.importorskip("peft")
    from types import SimpleNamespace

    from common import peft_utils

    model = _toy_model()
    args = SimpleNamespace(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                           lora_modules_to_save=None, merge_adapter=False)
    peft_model = peft_utils.maybe_wrap(model, args)
    with torch.no_grad():  # move the adapters off zero so the policy differs from its reference
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ref_model = peft_utils.reference_model(peft_model)
    assert model_utils.chunked_head(peft_model) is model.lm_head
    assert model_utils.chunked_head(ref_model) is model.lm_head
    ids, am = _batch()
    w = torch.randn(4, 5)
    lp = model_utils.completion_logps(peft_model, ids, am, 5)
    g = torch.autograd.grad((lp * w).sum(), [p for p in peft_model.parameters() if p.requires_grad])
    ref_lp, _, _ = straightforward(peft_model, ids, am, 5)
    g_ref = torch.autograd.grad((ref_lp * w).sum(), [p for p in peft_model.parameters() if p.requires_grad])
    assert _close(lp, ref_lp) and all(_close(a, b) for a, b in zip(g, g_ref))
    with torch.no_grad():
        off = model_utils.completion_logps(ref_model, ids, am, 5)
        with peft_model.disable_adapter():
            off_ref, _, _ = straightforward(peft_model, ids, am, 5)
    assert _close(off, off_ref) and not _close(off, lp.detach(), 1e-3)


def test_bfloat16_model_close_to_full_logits():
    model = _toy_model().to(torch.bfloat16)
    ids, am = _batch()
    lp = model_utils.completion_logps(model, ids, am, 5)
    ref, _, _ = straightforward(model, ids, am, 5)
    assert lp.dtype == torch.float32
    assert (lp - ref).abs().max().item() < 2e-2  # both use bf16 logits; ours never rounds the division by τ


def test_head_statistics_match_the_full_distribution():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    h = torch.randn(5, 16) * 3
    y = torch.randint(0, 300, (5,))
    tau = 0.8
    raw = head(h).float()
    lp = torch.log_softmax(raw / tau, -1)
    p = lp.exp()
    want = {"entropy": -(p * lp).sum(-1), "argmax": raw.argmax(-1), "mean_logits": raw.mean(-1),
            "log_sum_sq": (p ** 2).sum(-1).log()}
    logps, got = model_utils.head_logps(h, head, y, tau, tuple(want), chunk_elements=300 * 2)
    assert _close(logps, lp.gather(-1, y[:, None]).squeeze(-1))
    from_logits = model_utils.logits_stats(raw, tuple(want), tau, chunk=3)
    for name, ref in want.items():
        assert torch.equal(got[name], ref) if name == "argmax" else _close(got[name], ref), name
        assert torch.equal(from_logits[name], ref) if name == "argmax" else _close(from_logits[name], ref), name
    with pytest.raises(ValueError, match="unknown statistics"):
        model_utils.head_logps(h, head, y, stats=("perplexity",))


def test_logps_at_gathers_the_predicting_positions(monkeypatch):
    """logps_at with the previous column as the predicting position = completion_logps; the fallback agrees."""
    model = _toy_model()
    ids, am = _batch()
    T, L = 5, ids.shape[1]
    inputs = {"input_ids": ids, "attention_mask": am, "position_ids": model_utils.position_ids_from_mask(am)}
    rows = torch.arange(4)[:, None].expand(4, T)
    cols = torch.arange(T)[None].expand(4, T)  # keep = T + 1: column j predicts token L - T + j
    lp, st = model_utils.logps_at(model, inputs, T + 1, rows, cols, ids[:, -T:], stats=("mean_logits",))
    ref = model_utils.completion_logps(model, ids, am, T)
    assert _close(lp, ref) and st["mean_logits"].shape == (4, T)
    monkeypatch.setattr(model_utils, "PLAIN_HEAD_MODELS", set())
    lp2, st2 = model_utils.logps_at(model, inputs, T + 1, rows, cols, ids[:, -T:], stats=("mean_logits",))
    assert _close(lp2, ref) and _close(st2["mean_logits"], st["mean_logits"])
    assert L > T + 1


# ----------------------------------------------------------------------------- packing
def test_best_fit_decreasing():
    from common.packing import best_fit_decreasing

    lengths = [7, 5, 5, 4, 3, 3, 2, 1]  # 30 tokens into rows of 10: 3 rows exactly full
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins) and len(bins) == 3
    assert bins[0][0] == 0  # the longest goes first
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([11], 10)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_each_sequences_logps(attn):
    """Sequences packed into rows (positions restart, attention within a sequence): each trained token's log-prob
    and the gradient of a weighted sum equal those of the padded batch, one row per sequence."""
    from common import data
    from common.packing import pack_rows, packed_token_logps

    model = _toy_model()
    model.config._attn_implementation = attn
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(8, 100, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (9,), generator=g)]
    weights = [[0] + [int(j % 3 != 1) for j in range(1, len(s))] for s in seqs]  # some tokens not trained
    b = pack_rows(seqs, weights, 40, pad_id=0)
    assert b["input_ids"].shape[0] < len(seqs) and b["input_ids"].shape[1] <= 40
    lp, ent = packed_token_logps(model, b, return_entropy=True)
    g_packed = _grads(model, lp, b["weights"])
    # reference: the padded batch (prefix = first token, targets = the rest), per-token log-probs
    batch = data.batch_prompt_completion([s[:1] for s in seqs], [s[1:] for s in seqs], 0)
    T = batch["completion_mask"].shape[1]
    ref, ref_ent = model_utils.completion_logps(model, batch["input_ids"], batch["attention_mask"], T,
                                                return_entropy=True)
    w = torch.zeros(len(seqs), T)
    for i, ws in enumerate(weights):
        w[i, :len(ws) - 1] = torch.tensor(ws[1:], dtype=torch.float)
    keep = w > 0
    assert _close(lp, ref[keep]) and _close(ent, ref_ent[keep])
    g_ref = _grads(model, ref, w)
    for n in g_ref:
        assert _close(g_packed[n], g_ref[n]), n
    assert torch.equal(b["seq"], torch.nonzero(keep)[:, 0])  # in the order of the input sequences


def test_sft_packing_trains_exactly_like_padding(tmp_path):
    """sft.py --packing True through its entry point: the same logged losses, accuracies and token counts as the
    padded run, and the same final weights up to float rounding (language-modelling rows of varied length)."""
    import json

    from conftest import run_script
    from safetensors.torch import load_file

    rows = tmp_path / "lm.jsonl"
    texts = [f"{a}+{b}={a + b};" * (1 + (a * 7 + b) % 5) for a in range(12) for b in range(8)]  # 6 to 45 tokens
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = {}
    for mode in ("padded", "packed"):
        d = tmp_path / mode
        run_script("sft.py", "--dataset_name", str(rows), "--max_steps", "4", "--logging_steps", "2",
                   "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2", "--max_length", "64",
                   "--eval_steps", "0", "--save_steps", "0", "--output_dir", str(d), "--packing",
                   str(mode == "packed"), env={"OMP_NUM_THREADS": "1"})
        out[mode] = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()],
                     load_file(str(d / "model.safetensors")))
    for a, b in zip(out["padded"][0], out["packed"][0]):
        assert a["num_tokens"] == b["num_tokens"]
        for k in ("loss", "mean_token_accuracy", "entropy"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), k
    wa, wb = out["padded"][1], out["packed"][1]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_packed_sequence_scores_match_the_padded_batch():
    """A reward model's scores (and their gradients) with the sequences packed = with left padding."""
    from transformers import AutoModelForSequenceClassification

    from common import data
    from common.packing import packed_sequence_scores

    torch.manual_seed(0)
    config = toy.make_config(toy.make_tokenizer())
    config.num_labels, config.pad_token_id = 1, 0
    model = AutoModelForSequenceClassification.from_config(config)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(8, 100, (int(n),), generator=g).tolist() for n in torch.randint(2, 25, (10,), generator=g)]
    ids, mask = data.pad(seqs, 0, "left")
    ref = model_utils.sequence_classifier_scores(model, ids, mask)
    g_ref = _grads(model, ref, torch.arange(10.0))
    got = packed_sequence_scores(model, seqs, 0, "cpu")
    g_got = _grads(model, got, torch.arange(10.0))
    assert _close(got, ref)
    for n in g_ref:
        assert _close(g_got[n], g_ref[n]), n


def test_reward_packing_trains_exactly_like_padding(tmp_path):
    """reward.py --packing True through its entry point: the same logged metrics and final weights as left padding."""
    import json

    from conftest import run_script
    from safetensors.torch import load_file

    out = {}
    for mode in ("padded", "packed"):
        d = tmp_path / mode
        run_script("reward.py", "--model_name_or_path", "toy", "--max_steps", "4", "--logging_steps", "2",
                   "--per_device_train_batch_size", "16", "--eval_steps", "0", "--save_steps", "0",
                   "--output_dir", str(d), "--packing", str(mode == "packed"), env={"OMP_NUM_THREADS": "1"})
        out[mode] = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()],
                     load_file(str(d / "model.safetensors")))
    for a, b in zip(out["padded"][0], out["packed"][0]):
        for k in ("loss", "accuracy", "margin", "min_reward", "max_reward", "num_tokens"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), k
    wa, wb = out["padded"][1], out["packed"][1]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
