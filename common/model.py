"""Model and tokenizer loading (toy names or real ones) and memory-lean per-token log-probs.

Model names understood everywhere:
  toy       a freshly initialised toy Llama (common/toy.py), seeded
  toy-small a freshly initialised smaller toy Llama (2 layers, hidden 64; the default GKD student), seeded
  toy-sft   the default RL starting policy: the toy model after algos/sft.py on the dataset's toy task (cached)
  toy-sft-full  the toy model after a longer SFT run (near-perfect): the toy reward model's backbone (cached)
  toy-rm    the default toy reward model: algos/reward.py on the dataset's toy task (cached)
  anything else: a hub name or a local folder, through `from_pretrained`.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOY_CONFIGS = {"toy": {}, "toy-small": {"hidden_size": 64, "num_layers": 2}}  # freshly initialised toy models


def resolve(name: str, dataset_name: str = "toy:add") -> str:
    """Map toy names to local folders (building the cached default models once if needed)."""
    from common import toy
    from common.data import toy_task

    task = toy_task(dataset_name) or "add"
    if name == "toy-sft":
        return str(toy.toy_policy_path(task))
    if name == "toy-sft-full":
        return str(toy.toy_sft_full_path(task))
    if name == "toy-rm":
        return str(toy.toy_reward_model_path(task))
    return name


def check_model_folder(name: str, flag: str = "--model_name_or_path"):
    """A local folder (or a path-like name) must hold a saved model: config.json and tokenizer files. Errors name the
    flag and what is missing, before transformers reports something about tokenizers or hub ids."""
    from pathlib import Path

    from common.data import looks_like_path

    path = Path(name).expanduser()
    if not path.exists():
        if looks_like_path(name) and not name.startswith("toy"):
            raise ValueError(f"{flag} {name}: folder not found (looked for {path.resolve()}); give a folder written by "
                             "save_pretrained (e.g. a run's output_dir) or a hub name")
        return
    if not path.is_dir():
        raise ValueError(f"{flag} {name}: a file, not a model folder; give the folder that holds config.json")
    has_config = (path / "config.json").exists()
    if not has_config and (path / "adapter_config.json").exists():
        raise ValueError(f"{flag} {name}: a LoRA adapter folder, not a full model. Pass its merged/ folder (a run "
                         "with --use_peft --merge_adapter True writes output_dir/merged), or merge it with peft: "
                         "PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out)")
    has_tok = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                 "vocab.json"))
    if not (has_config and has_tok):
        missing = " and ".join(m for m, ok in (("config.json", has_config), ("tokenizer files (tokenizer.json / "
                                               "tokenizer_config.json)", has_tok)) if not ok)
        inside = sorted(p.name for p in path.iterdir())[:8]
        raise ValueError(f"{flag} {name}: the folder has no {missing} (it holds {inside or 'nothing'}). Give a "
                         "folder written by save_pretrained with its tokenizer, e.g. a finished run's output_dir or "
                         "one of its checkpoint-N folders")


def load_tokenizer(name: str, dataset_name: str = "toy:add", flag: str = "--model_name_or_path"):
    from transformers import AutoTokenizer

    from common import toy
    from common.data import check_pad_token

    if name in TOY_CONFIGS:
        return toy.make_tokenizer()
    path = resolve(name, dataset_name)
    check_model_folder(path, flag)
    tok = AutoTokenizer.from_pretrained(path)
    check_pad_token(tok, name)
    return tok


def load_causal_lm(name: str, tokenizer=None, dataset_name: str = "toy:add", dtype: str = "float32", seed: int = 0):
    """A causal LM by name; `toy` builds a seeded random init from the toy config."""
    from transformers import AutoModelForCausalLM

    from common import toy

    if name in TOY_CONFIGS:
        torch.manual_seed(seed)
        config = toy.make_config(tokenizer or toy.make_tokenizer(), **TOY_CONFIGS[name])
        model = AutoModelForCausalLM.from_config(config)
        return model.to(DTYPES[dtype])
    return AutoModelForCausalLM.from_pretrained(resolve(name, dataset_name), dtype=DTYPES[dtype])


def load_reward_model(name: str, dataset_name: str = "toy:add", dtype: str = "float32"):
    """A sequence classifier with one output, and its own tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve(name, dataset_name)
    check_model_folder(path, "reward model")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype])
    tok = AutoTokenizer.from_pretrained(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


# ----------------------------------------------------------------------------- log-probs
def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index] along the last dim without a full-vocabulary float32 copy of the batch:
    one row block at a time, gather the chosen logit and subtract its logsumexp. logits (..., V), index (...)."""
    out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_index = index.reshape(-1)
    flat_out = out.view(-1)
    chunk = 4096
    for s in range(0, flat_logits.shape[0], chunk):
        rows = flat_logits[s:s + chunk].float()
        flat_out[s:s + chunk] = rows.gather(-1, flat_index[s:s + chunk, None]).squeeze(-1) - rows.logsumexp(-1)
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a sequence's log-probs do not depend on how much padding it has."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Causal-LM classes whose logits are exactly lm_head(final hidden state) (no soft-capping or logit scaling after the
# head): for these the head is applied here, chunk by chunk, instead of inside the model's forward.
PLAIN_HEAD_MODELS = {
    "LlamaForCausalLM", "MistralForCausalLM", "MinistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM",
    "OlmoForCausalLM", "Olmo2ForCausalLM", "SmolLM3ForCausalLM", "GemmaForCausalLM", "GPTNeoXForCausalLM",
    "DeepseekV3ForCausalLM",
}
# float32 logits materialised at a time by the chunked head, rows x V <= this: 16 MiB on CPU (small blocks cost little
# there), 256 MiB on accelerators (fewer, larger kernels)
LOGPS_CHUNK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 26}


def _unwrap(model):
    """The transformers model inside DDP / DeepSpeed (.module), torch.compile (._orig_mod) and PEFT wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft PeftModel
            model = model.get_base_model()
        elif hasattr(model, "peft_model"):  # common.peft_utils.AdapterOffModel (the reference = adapters off)
            model = model.peft_model
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def chunked_head(model):
    """The output head (an nn.Linear) when it can be applied outside the model's forward, else None (models that
    post-process their logits, heads wrapped by LoRA, parameters sharded by ZeRO-3 or FSDP)."""
    base = _unwrap(model)
    if type(base).__name__ not in PLAIN_HEAD_MODELS:
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    w = head.weight
    if type(w) not in (torch.Tensor, torch.nn.Parameter) or hasattr(w, "ds_id") or w.numel() != head.in_features * head.out_features:
        return None
    return head


HEAD_STATS = ("entropy", "argmax", "mean_logits", "log_sum_sq")  # what head_logps can return besides the log-probs


class _ChunkedHeadLogps(torch.autograd.Function):
    """log softmax(head(h) / τ)[target] for (N, H) hidden states, one block of rows at a time: the forward keeps only
    the log-normaliser per row, the backward recomputes each block's logits. Never more than one block of float32
    logits exists, and no (N, V) tensor is saved for the backward. Statistics of each row's distribution come along
    as an (N, S) float32 tensor without gradient (see head_logps)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, rows, stats):
        N = h.shape[0]
        w = weight.to(h.dtype)
        b = bias.to(h.dtype) if bias is not None else None
        logps = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        out = torch.empty((N, len(stats)), dtype=torch.float32, device=h.device)
        for s in range(0, N, rows):
            raw = torch.nn.functional.linear(h[s:s + rows], w, b).float()
            z = raw / temperature if temperature != 1.0 else raw
            l_ = z.logsumexp(-1)
            lse[s:s + rows] = l_
            logps[s:s + rows] = z.gather(-1, targets[s:s + rows, None]).squeeze(-1) - l_
            for k, name in enumerate(stats):
                if name == "entropy":  # H = lse - Σ p z
                    out[s:s + rows, k] = l_ - (torch.softmax(z, -1) * z).sum(-1)
                elif name == "argmax":
                    out[s:s + rows, k] = z.argmax(-1).float()  # exact for vocabularies below 2^24
                elif name == "mean_logits":  # of the head's raw logits (before the temperature)
                    out[s:s + rows, k] = raw.mean(-1)
                elif name == "log_sum_sq":  # log Σ_v p_v²
                    out[s:s + rows, k] = (2 * z).logsumexp(-1) - 2 * l_
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(out)
        return logps, out

    @staticmethod
    def backward(ctx, grad_logps, _grad_stats):
        h, weight, bias, targets, lse = ctx.saved_tensors
        tau, rows = ctx.temperature, ctx.rows
        w = weight.to(h.dtype)
        b = bias.to(h.dtype) if bias is not None else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b and bias is not None else None
        for s in range(0, h.shape[0], rows):
            hs = h[s:s + rows]
            z = torch.nn.functional.linear(hs, w, b).float()
            if tau != 1.0:
                z = z / tau
            g = grad_logps[s:s + rows].float()
            dz = torch.exp(z - lse[s:s + rows, None]).mul_(-g[:, None])  # d/dz of g * (z[y] - lse) = g (1[y] - p)
            dz.scatter_add_(-1, targets[s:s + rows, None], g[:, None])
            if tau != 1.0:
                dz = dz / tau
            dz = dz.to(h.dtype)  # the gradient reaches the head in the model's dtype, as through the model's own head
            if need_h:
                grad_h[s:s + rows] = dz @ w
            if need_w:  # accumulated in place: no second (V, H) tensor per block
                if hs.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), hs)
                else:
                    grad_w += (dz.t() @ hs).float()
            if grad_b is not None:
                grad_b += dz.float().sum(0)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def head_logps(h: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
               stats: tuple[str, ...] = (), chunk_elements: int | None = None):
    """Per-row log-probs of `targets` (...,) under softmax(head(h) / τ) for hidden states h (..., H), through the
    chunked head (float32 from the head's output on). With `stats` (names from HEAD_STATS), also a dict of no-grad
    per-row statistics: entropy (exact, of the tempered distribution), argmax (long), mean_logits (mean over the
    vocabulary of the raw logits), log_sum_sq (log Σ_v p_v²). Shapes follow targets."""
    bad = [s for s in stats if s not in HEAD_STATS]
    if bad:
        raise ValueError(f"head_logps: unknown statistics {bad}; choose from {HEAD_STATS}")
    shape = targets.shape
    budget = chunk_elements or LOGPS_CHUNK_ELEMENTS["cpu" if h.device.type == "cpu" else "other"]
    rows = max(1, budget // head.out_features)
    logps, out = _ChunkedHeadLogps.apply(h.reshape(-1, h.shape[-1]), head.weight, head.bias, targets.reshape(-1),
                                         float(temperature), rows, tuple(stats))
    if not stats:
        return logps.view(shape)
    named = {name: out[:, k].view(shape) for k, name in enumerate(stats)}
    if "argmax" in named:
        named["argmax"] = named["argmax"].long()
    return logps.view(shape), named


def hidden_before_head(model, head: torch.nn.Module, keep: int, **inputs) -> torch.Tensor:
    """The model's final hidden states at its last `keep` positions (B, keep, H), as fed to the output head, from
    the model's own forward (so DDP / DeepSpeed wrappers see a normal forward), with the head itself skipped: a hook
    hands the head zero positions, so no logits are computed inside the forward."""
    captured = []

    def take(module, args):
        captured.append(args[0])
        return (args[0][:, :0],)

    handle = head.register_forward_pre_hook(take)
    try:
        model(**inputs, logits_to_keep=keep, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                     temperature: float = 1.0, return_entropy: bool = False, return_argmax: bool = False,
                     position_ids: torch.Tensor | None = None, chunk_elements: int | None = None):
    """Per-token log-probs (B, T) of the last `completion_len` tokens of `input_ids` (B, P+T), of the next-token
    distribution softmax(logits / temperature).

    Memory: the model runs up to its final hidden states; the output head and the float32 log-softmax are then applied
    a block of positions at a time (forward and backward), so no (B, T, V) logits tensor is ever made
    (`chunked_head` says for which models; the others get their logits from their forward, `logits_to_keep` = T + 1).
    With return_entropy, also the exact per-token entropy (B, T); with return_argmax, the most likely token (B, T)
    (both without gradient). Returns logps, or the tuple (logps, [entropy], [argmax]) in that order.
    position_ids default to positions that ignore left padding."""
    T = completion_len
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    targets = input_ids[:, -T:]
    head = chunked_head(model)
    want_stats = return_entropy or return_argmax
    if head is not None:
        h = hidden_before_head(model, head, T + 1, input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids)[:, :-1]  # (B, T, H): position t-1 predicts token t
        stats = ("entropy",) * return_entropy + ("argmax",) * return_argmax
        out = head_logps(h, head, targets, temperature, stats, chunk_elements)
        logps, named = out if stats else (out, {})
        entropy, argmax = named.get("entropy"), named.get("argmax")
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=T + 1, use_cache=False).logits[:, :-1, :]  # (B, T, V)
        if temperature != 1.0:
            logits = logits / temperature
        logps = selective_log_softmax(logits, targets)
        entropy = argmax = None
        if want_stats:
            named = logits_stats(logits)
            entropy, argmax = named["entropy"], named["argmax"]
    if not want_stats:
        return logps
    return (logps,) + ((entropy,) if return_entropy else ()) + ((argmax,) if return_argmax else ())


def logps_at(model, inputs: dict, keep: int, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor,
             temperature: float = 1.0, stats: tuple[str, ...] = ()):
    """Log-probs of `targets` (...,) predicted at positions (rows, cols) (...,) of the model's last `keep` positions
    (column 0 = position L - keep), for layouts where the predicting position is not simply the previous column
    (prompts shared by two completions, packed rows). Through the chunked head when the model allows it, else from
    the forward's logits. `inputs`: the forward's keyword arguments (input_ids, attention_mask, position_ids). With
    `stats`, also the dict of head_logps' statistics."""
    head = chunked_head(model)
    if head is not None:
        h = hidden_before_head(model, head, keep, **inputs)  # (B, keep, H)
        return head_logps(h[rows, cols], head, targets, temperature, stats)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[rows, cols]  # (..., V)
    z = logits / temperature if temperature != 1.0 else logits
    logps = selective_log_softmax(z, targets)
    return (logps, logits_stats(logits, stats, temperature)) if stats else logps


@torch.no_grad()
def logits_stats(logits: torch.Tensor, stats: tuple[str, ...] = ("entropy", "argmax"), temperature: float = 1.0,
                 chunk: int = 4096) -> dict:
    """head_logps' statistics (HEAD_STATS) of softmax(logits / τ) along the last dim, a block of rows at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = {name: torch.empty(flat.shape[0], dtype=torch.long if name == "argmax" else torch.float32,
                             device=logits.device) for name in stats}
    for s in range(0, flat.shape[0], chunk):
        raw = flat[s:s + chunk].float()
        z = raw / temperature if temperature != 1.0 else raw
        lse = z.logsumexp(-1)
        for name in stats:
            if name == "entropy":
                out[name][s:s + chunk] = lse - (torch.softmax(z, -1) * z).sum(-1)
            elif name == "argmax":
                out[name][s:s + chunk] = z.argmax(-1)
            elif name == "mean_logits":
                out[name][s:s + chunk] = raw.mean(-1)
            elif name == "log_sum_sq":
                out[name][s:s + chunk] = (2 * z).logsumexp(-1) - 2 * lse
    return {k: v.view(logits.shape[:-1]) for k, v in out.items()}


def sequence_classifier_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               score_head=None) -> torch.Tensor:
    """Scalar score (B,) of a one-output `*ForSequenceClassification` model, read at the last real token of each row.

    The position comes from the attention mask, not from pad_token_id (which HF's own pooling uses and which breaks
    when pad == eos), so either padding side works. The model is called through its own forward (so a DDP/DeepSpeed
    wrapper syncs gradients); pass the unwrapped model's head as `score_head` when `model` is wrapped."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1]  # (B, L, H), after the final norm
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)  # (B,)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    head = score_head if score_head is not None else model.score
    return head(h)[:, 0].float()
