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
