"""Dataset loading, type detection, conversion between types, chat templates, tokenisation and padding.

Types (by columns; "standard" rows hold strings, "conversational" rows hold lists of {"role", "content"}):
  lm                        text | messages
  prompt                    prompt
  prompt_completion         prompt, completion
  preference                prompt, chosen, rejected   (or implicit prompt: chosen, rejected)
  unpaired                  prompt, completion, label
  prompt_completion_reward  prompt, completions, rewards   (optional behavior_logps; also completion/reward)
  stepwise                  prompt, completions, labels
Extra columns are kept: reward functions receive them as keyword arguments.

Layout of a tokenised batch: [left-padded prompt | right-padded completion], with an explicit completion mask
(never inferred from pad_token_id, which is often the EOS id). Completions keep their EOS token.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TYPE_COLUMNS = {  # checked in this order: the first whose columns are all present wins
    "prompt_completion_reward": ({"prompt", "completions", "rewards"}, {"prompt", "completion", "reward"},
                                 {"prompt", "completion", "rewards"}, {"prompt", "completions", "reward"}),
    "stepwise": ({"prompt", "completions", "labels"},),
    "unpaired": ({"prompt", "completion", "label"},),
    "preference": ({"prompt", "chosen", "rejected"}, {"chosen", "rejected"}),
    "prompt_completion": ({"prompt", "completion"},),
    "lm": ({"text"}, {"messages"}),
    "prompt": ({"prompt"},),
}


class DatasetFormatError(ValueError):
    pass


# ----------------------------------------------------------------------------- loading
def load_data(name: str, split: str = "train", toy_kind: str = "prompt", n: int | None = None):
    """Load a dataset by name.

    - `toy:<task>` or `toy:<task>:conversational`: the built-in toy task, made as `toy_kind` (see common/toy.py).
    - a local `.jsonl`/`.json`/`.parquet`/`.csv` file, or a folder written by `Dataset.save_to_disk`.
    - anything else: `datasets.load_dataset(name, split=split)` (a hub name or a local loading script/folder).
    """
    import datasets

    if name.startswith("toy:"):
        from common import toy

        parts = name.split(":")
        task, conv = parts[1], "conversational" in parts[2:]
        return toy.make_dataset(task, toy_kind, split=split, conversational=conv, n=n)
    path = Path(name)
    suffix = path.suffix.lower()
    if path.is_file():
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
        if builder is None:
            raise DatasetFormatError(f"--dataset_name {name}: unsupported file type '{suffix}'; "
                                     "use .jsonl, .json, .parquet or .csv, or a folder from Dataset.save_to_disk")
        ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DatasetFormatError(f"--dataset_name {name}: no split '{split}'; it has {list(ds)}")
            ds = ds[split]
    elif path.exists() and not path.is_dir():
        raise DatasetFormatError(f"--dataset_name {name}: cannot read this path")
    else:
        ds = datasets.load_dataset(name, split=split)
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    return ds


def toy_task(dataset_name: str) -> str | None:
    """The toy task named by `toy:<task>[:...]`, else None."""
    return dataset_name.split(":")[1] if dataset_name.startswith("toy:") else None


# ----------------------------------------------------------------------------- types and conversion
def detect_type(columns) -> str | None:
    cols = set(columns)
    for kind, options in TYPE_COLUMNS.items():
        if any(opt <= cols for opt in options):
            return kind
    return None


def is_conversational(example: dict) -> bool:
    for key in ("prompt", "chosen", "rejected", "completion", "completions", "messages"):
        if key in example:
            v = example[key]
            return isinstance(v, list) and len(v) > 0 and isinstance(v[0], dict) and "role" in v[0]
    return False


def _extract_prompt(example):
    """Implicit prompt -> explicit: the longest common prefix of chosen and rejected becomes the prompt."""
    chosen, rejected = example["chosen"], example["rejected"]
    if isinstance(chosen, list):  # conversational: common leading turns
        i = 0
        while i < min(len(chosen), len(rejected)) - 1 and chosen[i] == rejected[i]:
            i += 1
        return {"prompt": chosen[:i], "chosen": chosen[i:], "rejected": rejected[i:]}
    i = len(os.path.commonprefix([chosen, rejected]))
    # never split inside a word of the shared answer: back off to the last whitespace or '=' boundary
    while i > 0 and chosen[i - 1] not in " \n=:":
        i -= 1
    return {"prompt": chosen[:i], "chosen": chosen[i:], "rejected": rejected[i:]}


def convert(ds, want: str, script: str = "this script"):
    """Convert `ds` to the dataset type `want` where that is well defined, or raise a DatasetFormatError that names
    the columns found, the columns expected and the type."""
    have = detect_type(ds.column_names)
    accepted = {
        "prompt": {"prompt", "prompt_completion", "preference", "unpaired", "prompt_completion_reward", "stepwise"},
        "prompt_completion": {"prompt_completion"},
        "lm": {"lm"},
        "preference": {"preference"},
        "unpaired": {"unpaired", "preference"},
        "prompt_completion_reward": {"prompt_completion_reward", "preference"},
        "stepwise": {"stepwise"},
    }[want]
    if have not in accepted:
        expected = " or ".join("{" + ", ".join(sorted(o)) + "}" for o in TYPE_COLUMNS[want])
        raise DatasetFormatError(
            f"{script} needs a '{want}' dataset with columns {expected}; found columns {sorted(ds.column_names)} "
            f"(detected type: {have or 'unknown'}). Rename the columns or pick a dataset of that type "
            f"(accepted types: {sorted(accepted)})."
        )
    if have in ("preference",) and "prompt" not in ds.column_names:
        ds = ds.map(_extract_prompt)
    if want == "prompt" and have != "prompt":
        drop = [c for c in ("completion", "chosen", "rejected", "completions", "rewards", "reward", "labels", "label",
                            "behavior_logps") if c in ds.column_names]
        ds = ds.remove_columns(drop)
    elif want == "unpaired" and have == "preference":
        ds = unpair_preference(ds)
    elif want == "prompt_completion_reward":
        if have == "preference":
            ds = ds.map(lambda ex: {"completions": [ex["chosen"], ex["rejected"]], "rewards": [1.0, 0.0]},
                        remove_columns=["chosen", "rejected"])
        else:  # normalise singular column names to the list form
            if "completion" in ds.column_names:
                ds = ds.map(lambda ex: {"completions": ex["completion"] if _is_list_of_completions(ex["completion"])
                                        else [ex["completion"]]}, remove_columns=["completion"])
            if "reward" in ds.column_names:
                ds = ds.map(lambda ex: {"rewards": ex["reward"] if isinstance(ex["reward"], list) else [ex["reward"]]},
                            remove_columns=["reward"])
    return ds


def _is_list_of_completions(c) -> bool:
    return isinstance(c, list) and len(c) > 0 and (isinstance(c[0], str) or isinstance(c[0], list))


def unpair_preference(ds):
    """{prompt, chosen, rejected} -> {prompt, completion, label}: one row per side, label True for chosen."""
    def split_batch(batch):
        n = len(batch["chosen"])
        out = {k: v + v for k, v in batch.items() if k not in ("chosen", "rejected")}
        out["completion"] = batch["chosen"] + batch["rejected"]
        out["label"] = [True] * n + [False] * n
        return out

    return ds.map(split_batch, batched=True, remove_columns=ds.column_names)


# ----------------------------------------------------------------------------- chat templates -> text
def prompt_text(prompt, tokenizer) -> str:
    """Render a prompt for generation. Conversational: the chat template with a generation prompt (or continuing a
    final assistant turn). Standard: the text, after BOS when `tokenizer(text)` itself starts with BOS (Llama-style
    tokenizers, the toy one), so the ids here (tokenised without special tokens) equal `tokenizer(text)`'s."""
    if isinstance(prompt, list):
        if tokenizer.chat_template is None:
            raise DatasetFormatError("conversational prompts need a tokenizer with a chat template; "
                                     "set tokenizer.chat_template or use standard (string) prompts")
        last = prompt[-1]["role"] if prompt else "user"
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last != "assistant",
                                             continue_final_message=last == "assistant")
    bos = tokenizer.bos_token if adds_bos(tokenizer) else ""
    return prompt if (not bos or prompt.startswith(bos)) else bos + prompt


def completion_text(prompt, completion, tokenizer) -> str:
    """The completion's text as it follows the rendered prompt, ending with EOS."""
    if isinstance(completion, list):
        p = prompt_text(prompt, tokenizer)
        full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
        if not full.startswith(p):
            raise DatasetFormatError("the chat template renders prompt+completion with a different prefix than the "
                                     "prompt alone; this template cannot split prompt and completion")
        text = full[len(p):]
    else:
        text = completion
    eos = tokenizer.eos_token
    return text if text.endswith(eos) else text + eos


def lm_text(example, tokenizer) -> str:
    if "messages" in example:
        return tokenizer.apply_chat_template(example["messages"], tokenize=False)
    bos = tokenizer.bos_token if adds_bos(tokenizer) else ""
    return bos + example["text"] + tokenizer.eos_token


def adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` puts BOS first (Llama, the toy tokenizer) or not (GPT-2, Qwen). Standard texts get
    the BOS string only in the first case, so training sees what the saved tokenizer gives a user. Cached on the
    tokenizer."""
    cached = getattr(tokenizer, "_cleanalign_adds_bos", None)
    if cached is None:
        ids = tokenizer("a")["input_ids"]
        cached = tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id
        try:
            tokenizer._cleanalign_adds_bos = cached
        except AttributeError:  # a tokenizer that refuses new attributes: detect again next time
            pass
    return cached


# ----------------------------------------------------------------------------- tokenisation and padding
def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a (B, L) LongTensor and a (B, L) 0/1 mask."""
    L = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        if side == "left":
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def check_pad_token(tokenizer, name: str):
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"the tokenizer of '{name}' has no pad token. Give it one and save it, e.g. "
            f"tok.pad_token = tok.eos_token; tok.save_pretrained(DIR), then pass --model_name_or_path DIR. "
            "(Masks here never come from pad_token_id, so pad == eos is safe.)"
        )


def batch_prompt_completion(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                            max_prompt_length: int | None = None, max_completion_length: int | None = None) -> dict:
    """[left-padded prompt | right-padded completion] -> input_ids, attention_mask (B, P+T), completion_mask (B, T).
    Prompts longer than max_prompt_length keep their last tokens; completions are cut to max_completion_length."""
    if max_prompt_length:
        prompt_ids = [p[-max_prompt_length:] for p in prompt_ids]
    if max_completion_length:
        completion_ids = [c[:max_completion_length] for c in completion_ids]
    p_ids, p_mask = pad(prompt_ids, pad_id, "left")
    c_ids, c_mask = pad(completion_ids, pad_id, "right")
    return {
        "input_ids": torch.cat([p_ids, c_ids], 1),
        "attention_mask": torch.cat([p_mask, c_mask], 1),
        "completion_mask": c_mask,
    }


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Row indices of the global batch used at optimizer step `step`: epochs of a seeded permutation, so the data
    order is a pure function of (seed, step) and a resumed run sees exactly the batches it would have seen."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"the dataset has {n} rows, fewer than one global batch of {batch_size}; "
                         "lower the batch size or use more data")
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[i * batch_size:(i + 1) * batch_size].tolist()
