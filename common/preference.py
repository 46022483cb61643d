"""Offline preference data: loading, tokenising and padding preference pairs and unpaired (labelled) completions.

Shared by the offline preference scripts (DPO-style pairs; KTO/BCO-style unpaired rows). Plumbing only: no loss.

Row types (lists of token ids; a completion ends with EOS):
    PairRow     = (prompt_ids, chosen_ids, rejected_ids)
    UnpairedRow = (prompt_ids, completion_ids, label)          label: True = desirable, False = undesirable

API:
    load_pairs(args, script, toy_n=None) -> (train_ds, eval_ds | None)
        data.load_splits as 'preference' (explicit or implicit prompt, standard or conversational); a dataset of
        another type fails with a pointer to the script that takes it.
    load_unpaired(args, script, toy_n=None) -> (train_ds, eval_ds | None, converted: bool)
        data.load_splits as 'unpaired'; preference data is accepted and converted (chosen -> label True, rejected ->
        label False, one row each), and `converted` says so (the caller prints it once). Toy datasets are made
        unpaired (one completion per prompt, right or wrong at random). Labels must be booleans (or 0/1): anything
        else is a DatasetFormatError naming the flag and the row.
    tokenize_pairs(ds, tokenizer, max_length, max_prompt_length) -> (list[PairRow], dropped: int)
    tokenize_unpaired(ds, tokenizer, max_length, max_prompt_length) -> (list[UnpairedRow], dropped: int)
    pair_batch(rows: list[PairRow], pad_id, device) -> dict
        [prompt | chosen] rows (B) then [prompt | rejected] rows (B), for one forward of both: input_ids and
        attention_mask (2B, P+T), completion_mask (2B, T).
    completion_batch(prompts, completions, pad_id, device, max_length=None) -> dict
        [prompt | completion] rows: input_ids, attention_mask (B, P+T), completion_mask (B, T). With max_length, a
        completion is cut (keeping its first tokens) so that its row fits (for pairings made after tokenisation,
        such as a prompt with another row's completion).
    common_prefix(a, b) -> int: length of the common prefix of two id lists.

Tokenisation (both row types): the rendered prompt and prompt+completion are tokenised whole and split where they
first differ, so BPE merges across the boundary do not corrupt the split. Standard rows: the prompt text (after BOS
where the tokenizer adds one) followed by the completion text and EOS. Conversational rows: the chat template with
a generation prompt, and the completion as the template renders it after the prompt.
Truncation: first the prompt is cut to --max_prompt_length keeping its LAST tokens (left side); then each completion
is cut to fit --max_length with its prompt, keeping its FIRST tokens (right side). A row whose prompt alone fills
--max_length is dropped (the count is returned, for the caller to print). None means no limit.
Batch layout: [left-padded prompt | right-padded completion] with an explicit completion mask (padding is never
inferred from pad_token_id, which is often EOS). The completion mask covers the completion's tokens, EOS included.
"""

from __future__ import annotations

import re

import torch

from common import data

PairRow = tuple[list[int], list[int], list[int]]
UnpairedRow = tuple[list[int], list[int], bool]

# where a dataset of another type belongs
OTHER_SCRIPTS = {"unpaired": "kto.py or bco.py (unpaired prompt, completion, label rows)",
                 "preference": "dpo.py (preference pairs)",
                 "prompt": "online_dpo.py (pairs sampled online)", "prompt_completion": "sft.py", "lm": "sft.py",
                 "prompt_completion_reward": "vmpo.py or dar.py (prompt-completion-reward data)"}


def _with_pointer(load, script: str):
    try:
        return load()
    except data.DatasetFormatError as e:
        found = re.search(r"detected type: (\w+)", str(e))
        if found and found.group(1) in OTHER_SCRIPTS:
            raise data.DatasetFormatError(f"{e} This is '{found.group(1)}' data: use "
                                          f"{OTHER_SCRIPTS[found.group(1)]}.") from None
        raise


def load_pairs(args, script: str, toy_n: int | None = None):
    """Training and evaluation preference datasets (eval may be None): data.load_splits as 'preference'."""
    return _with_pointer(lambda: data.load_splits(args, "preference", script, toy_n=toy_n), script)


def load_unpaired(args, script: str, toy_n: int | None = None):
    """Training and evaluation unpaired datasets, and whether preference data was converted to get them."""
    train, eval_ds = _with_pointer(lambda: data.load_splits(args, "unpaired|preference", script, toy_n=toy_n), script)
    converted = "chosen" in train.column_names
    train = data.unpair_preference(train) if converted else train
    if eval_ds is not None and "chosen" in eval_ds.column_names:
        eval_ds = data.unpair_preference(eval_ds)
    for ds, what in ((train, f"--dataset_name {args.dataset_name}"),
                     (eval_ds, f"--eval_dataset_name {getattr(args, 'eval_dataset_name', None)}")):
        if ds is not None:
            for i, v in enumerate(ds["label"]):
                _label(v, i, what)
    return train, eval_ds, converted


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_completions(ds, tokenizer, columns: list[str]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Prompt ids per row, and for each completion column the ids of prompt+completion per row."""
    prompts = [data.prompt_text(p, tokenizer) for p in ds["prompt"]]
    p_ids = data.tokenize(tokenizer, prompts)
    full = [data.tokenize(tokenizer, [t + data.completion_text(p, c, tokenizer)
                                      for t, p, c in zip(prompts, ds["prompt"], ds[col])]) for col in columns]
    return p_ids, full


def _truncate(prompt: list[int], completions: list[list[int]], max_length: int | None,
              max_prompt_length: int | None):
    """(prompt, completions) after truncation, or None when the prompt alone fills max_length."""
    if max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    if max_length:
        room = max_length - len(prompt)
        if room <= 0:
            return None
        completions = [c[:room] for c in completions]
    return prompt, completions


def tokenize_pairs(ds, tokenizer, max_length: int | None, max_prompt_length: int | None,
                   drop_empty_prompt: bool = False, chunk: int = 512) -> tuple[list[PairRow], int]:
    """(prompt ids, chosen ids, rejected ids) per pair, and the number of pairs dropped (a prompt that fills
    max_length; with drop_empty_prompt also an empty prompt, from which nothing predicts the first completion token).
    The prompt ends where prompt+chosen or prompt+rejected first departs from the prompt alone. Tokenised `chunk` rows
    at a time: the tokenizer's per-text encodings of a whole dataset would briefly cost more than the ids."""
    rows, dropped = [], 0
    for s in range(0, len(ds), chunk):
        p_ids, (c_full, r_full) = _tokenize_completions(ds[s:s + chunk], tokenizer, ["chosen", "rejected"])
        for p, c, r in zip(p_ids, c_full, r_full):
            k = min(common_prefix(p, c), common_prefix(p, r))
            cut = None if drop_empty_prompt and k == 0 else _truncate(p[:k], [c[k:], r[k:]], max_length,
                                                                         max_prompt_length)
            if cut is None:
                dropped += 1
                continue
            rows.append((cut[0], cut[1][0], cut[1][1]))
    return rows, dropped


def _label(v, i: int, what: str = "the dataset") -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    raise data.DatasetFormatError(f"{what}, row {i}: label {v!r} is not a boolean; the 'label' column must hold True "
                                  "(desirable) or False (undesirable), or 1/0")


def tokenize_unpaired(ds, tokenizer, max_length: int | None,
                      max_prompt_length: int | None) -> tuple[list[UnpairedRow], int]:
    """(prompt ids, completion ids, label) per row, and the number of rows dropped."""
    labels = [_label(v, i) for i, v in enumerate(ds["label"])]
    p_ids, (full,) = _tokenize_completions(ds, tokenizer, ["completion"])
    rows, dropped = [], 0
    for p, f, y in zip(p_ids, full, labels):
        k = common_prefix(p, f)
        cut = _truncate(p[:k], [f[k:]], max_length, max_prompt_length)
        if cut is None:
            dropped += 1
            continue
        rows.append((cut[0], cut[1][0], y))
    return rows, dropped


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device,
                     max_length: int | None = None) -> dict:
    """[left-padded prompt | right-padded completion] rows: input_ids, attention_mask (B, P+T), completion_mask
    (B, T), on `device`. With max_length, each completion keeps the first max_length - len(prompt) tokens (at least
    one)."""
    assert len(prompts) == len(completions)
    if max_length:
        completions = [c[:max(1, max_length - len(p))] for p, c in zip(prompts, completions)]
    return {k: v.to(device) for k, v in data.batch_prompt_completion(prompts, completions, pad_id).items()}


def pair_batch(rows: list[PairRow], pad_id: int, device) -> dict:
    """[prompt | chosen] rows then [prompt | rejected] rows (2B, P+T), completion mask (2B, T)."""
    prompts = [r[0] for r in rows] * 2
    completions = [r[1] for r in rows] + [r[2] for r in rows]
    return completion_batch(prompts, completions, pad_id, device)
