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


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                     temperature: float = 1.0, return_entropy: bool = False):
    """Per-token log-probs (B, T) of the last `completion_len` tokens of `input_ids` (B, P+T).

    Only the logits that predict completion tokens are computed (`logits_to_keep`), divided by `temperature`.
    With return_entropy, also the exact per-token entropy (B, T) of the (tempered) next-token distribution.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), logits_to_keep=completion_len + 1,
                use_cache=False)
    logits = out.logits[:, :-1, :]  # (B, T, V): position t-1 predicts token t
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, -completion_len:]
    logps = selective_log_softmax(logits, targets)
    if not return_entropy:
        return logps
    with torch.no_grad():
        lp = torch.log_softmax(logits.float(), -1)
        entropy = -(lp.exp() * lp).sum(-1)
    return logps, entropy


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
