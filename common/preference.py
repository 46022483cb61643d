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
    shared_prompt_pair_batch(rows, pad_id, device, share_prompt=True, mask_dtype=torch.bool, packing=False) -> dict
        dpo.py's forward layouts (its details 1 and 12): one row per pair [prompt | chosen | rejected] under a block
        attention mask, TRL's two rows per pair, or pairs / sequences packed padding-free (packed_pair_batch).
    pair_block_mask(seg, unit=None, mask_dtype=torch.bool) -> (R, 1, L, L) mask of shared-prompt rows (also used by
        online_dpo.py for its two samples per prompt).

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

from common import data, packing
from common import model as model_utils

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


def pair_block_mask(seg: torch.Tensor, unit: torch.Tensor | None = None, mask_dtype=torch.bool) -> torch.Tensor:
    """The (R, 1, L, L) attention mask of rows that hold [prompt | first completion | second completion] units,
    from each token's segment `seg` (R, L): 0 prompt, 1 first, 2 second, 3 padding, and (packed rows) the unit it
    belongs to `unit` (R, L; None: one unit per row). A token sees the causal past of its own sequence only: the
    second completion sees the prompt but not the first, nothing sees padding, padding sees itself (no empty rows).
    mask_dtype: bool (True = attend: sdpa) or a float dtype (0 or its minimum, added to the scores: eager)."""
    L = seg.shape[1]
    q, k = seg[:, :, None], seg[:, None, :]
    ar = torch.arange(L)
    mask = (ar[:, None] >= ar[None, :]) & ~((q == 2) & (k == 1)) & (k != 3)  # (R, L, L)
    if unit is not None:
        mask &= unit[:, :, None] == unit[:, None, :]
    mask |= torch.eye(L, dtype=torch.bool) & (q == 3)
    mask = mask[:, None]
    if mask_dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill_(~mask, torch.finfo(mask_dtype).min)
    return mask


def shared_prompt_pair_batch(rows: list[PairRow], pad_id: int, device, share_prompt: bool = True,
                             mask_dtype=torch.bool, packing: bool = False) -> dict:
    """A micro-batch of pairs for one forward of both completions (dpo.py's forward_pairs, its detail 1). completion_mask, targets: (2B, T), chosen rows then
    rejected rows.
    share_prompt: one row per pair, [prompt | chosen | rejected | right padding], with position ids restarting after
      the prompt for the rejected tokens and a (B, 1, L, L) attention mask in which every token sees the causal past
      of its own sequence only (rejected tokens never see chosen ones; padding sees itself). mask_dtype: bool (True =
      attend, sdpa attention) or a float dtype (0 or its minimum, added to the scores: eager attention).
    else: two rows per pair, [left-padded prompt | right-padded completion] (TRL's layout).
    packing: see packed_pair_batch."""
    if packing:
        return packed_pair_batch(rows, pad_id, device, share_prompt, mask_dtype)
    chosen, rejected = [r[1] for r in rows], [r[2] for r in rows]
    if not share_prompt:
        b = data.batch_prompt_completion([r[0] for r in rows] * 2, chosen + rejected, pad_id)
        T = b["completion_mask"].shape[1]
        out = {**b, "position_ids": model_utils.position_ids_from_mask(b["attention_mask"]), "logits_to_keep": T + 1,
               "pred": None, "targets": b["input_ids"][:, -T:]}
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}
    B = len(rows)
    L = max(len(p) + len(c) + len(r) for p, c, r in rows)
    T = max(max(len(c) for c in chosen), max(len(r) for r in rejected))
    first = min(len(p) for p, _, _ in rows) - 1  # the earliest predicting position: logits from there on
    assert first >= 0, "every prompt has at least one token (tokenize_pairs(drop_empty_prompt=True) drops the others)"
    ids, pos, seg, targets, cmask, pred = [], [], [], [[], []], [[], []], [[], []]  # lists first: one tensor each
    for p, c, r in rows:
        P, Tc, Tr = len(p), len(c), len(r)
        pad = L - P - Tc - Tr
        ids.append(p + c + r + [pad_id] * pad)
        pos.append(list(range(P + Tc)) + list(range(P, P + Tr)) + [0] * pad)
        seg.append([0] * P + [1] * Tc + [2] * Tr + [3] * pad)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
        # the position (in the packed row) whose logits predict each token; the first rejected token's is the prompt's
        for side, (comp, at) in enumerate(((c, list(range(P - 1, P + Tc - 1))),
                                           (r, [P - 1] + list(range(P + Tc, P + Tc + Tr - 1))))):
            targets[side].append(comp + [pad_id] * (T - len(comp)))
            cmask[side].append([1] * len(comp) + [0] * (T - len(comp)))
            pred[side].append(at + [first] * (T - len(comp)))
    ids, pos, seg = torch.tensor(ids), torch.tensor(pos), torch.tensor(seg)
    targets, cmask, pred = (torch.tensor(x[0] + x[1]) for x in (targets, cmask, pred))  # (2B, T) each
    mask = pair_block_mask(seg, mask_dtype=mask_dtype)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "logits_to_keep": L - first,
           "pred": pred - first, "targets": targets, "completion_mask": cmask}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def packed_pair_batch(rows: list[PairRow], pad_id: int, device, share_prompt: bool = True,
                      mask_dtype=torch.bool) -> dict:
    """A padding-free micro-batch (dpo.py's detail 12): completion_mask and targets (2B, T) as shared_prompt_pair_batch's,
    plus `gather` (K, 2) = (row, column) of the position that predicts each of the K completion tokens and `scatter`
    (K, 2) = (sequence in [chosen | rejected], token) where its log-prob goes back.
    share_prompt: pairs [prompt | chosen | rejected] packed whole into rows as long as the longest pair (best-fit
      decreasing), positions restarting at each pair (and after the prompt for the rejected tokens), and a
      (R, 1, L, L) attention mask in which each token sees the causal past of its own sequence only (pair_batch's
      block mask, per pair; padding sees itself).
    else: the 2B sequences prompt + completion packed into rows as long as the longest (common/packing.py): position
      ids restart at every sequence and no attention mask is passed, so transformers keeps attention within each
      sequence (any attention implementation, flash attention's varlen kernels included)."""
    B = len(rows)
    comps = [r[1] for r in rows] + [r[2] for r in rows]  # chosen then rejected, (2B,)
    T = max(len(c) for c in comps)
    targets = torch.tensor([c + [pad_id] * (T - len(c)) for c in comps])
    cmask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in comps])
    scatter = [(i, t) for i, c in enumerate(comps) for t in range(len(c))]
    if not share_prompt:
        seqs = [r[0] + r[1] for r in rows] + [r[0] + r[2] for r in rows]
        prompt_lens = [len(r[0]) for r in rows] * 2
        b = packing.pack_rows(seqs, [[0] * n + [1] * (len(s) - n) for s, n in zip(seqs, prompt_lens)],
                              max(len(s) for s in seqs), pad_id)
        out = {"input_ids": b["input_ids"], "position_ids": b["position_ids"], "gather": b["pred"]}
    else:
        units = [len(p) + len(c) + len(r) for p, c, r in rows]
        bins = packing.best_fit_decreasing(units, max(units))
        L = max(sum(units[i] for i in b) for b in bins)
        ids, pos, unit, part = [], [], [], []  # per row, lists first: one tensor each
        gather = [None] * (2 * B)  # per sequence, the predicting columns (row, col) of its tokens
        for r, b in enumerate(bins):
            ids.append([]), pos.append([]), unit.append([]), part.append([])
            for i in sorted(b):
                p, c, rej = rows[i]
                P, Tc, Tr, at = len(p), len(c), len(rej), len(ids[r])
                ids[r] += p + c + rej
                pos[r] += list(range(P + Tc)) + list(range(P, P + Tr))
                unit[r] += [i] * (P + Tc + Tr)
                part[r] += [0] * P + [1] * Tc + [2] * Tr
                gather[i] = [(r, at + P - 1 + t) for t in range(Tc)]
                gather[B + i] = [(r, at + P - 1)] + [(r, at + P + Tc + t - 1) for t in range(1, Tr)]
            pad = L - len(ids[r])
            ids[r] += [pad_id] * pad
            pos[r] += [0] * pad
            unit[r] += [-1] * pad
            part[r] += [3] * pad
        mask = pair_block_mask(torch.tensor(part), torch.tensor(unit), mask_dtype)
        out = {"input_ids": torch.tensor(ids), "attention_mask": mask, "position_ids": torch.tensor(pos),
               "gather": torch.tensor([g for gs in gather for g in gs])}
    out.update({"logits_to_keep": out["input_ids"].shape[1], "pred": None, "scatter": torch.tensor(scatter),
                "targets": targets, "completion_mask": cmask})
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}
