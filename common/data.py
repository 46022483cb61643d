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

Scripts call `load_splits` (training rows + held-out rows, converted to the script's type, every bad-input error
raised before a model loads) and `check_batch_fits` (data smaller than one global batch) at start-up.
Text columns hold strings: a CSV's cells are read as text as written (only label/reward/margin are parsed), and
numbers in a JSON/parquet text column (prompt, completion, chosen, rejected, text, message contents) become strings;
other JSON/parquet columns keep the types the file gives them.

Layout of a tokenised batch: [left-padded prompt | right-padded completion], with an explicit completion mask
(never inferred from pad_token_id, which is often the EOS id). Completions keep their EOS token.
"""

from __future__ import annotations

import functools
import os
import sys
import zlib
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
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# columns that hold text (strings, or lists of {"role", "content"} messages); numbers there are cast to strings
TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected", "text", "messages")
# columns a CSV file holds as numbers (every other CSV cell is read as text, as written: "007" stays "007")
CSV_NUMBER_COLUMNS = {"label": bool, "reward": float, "margin": float}


def load_data(name: str, split: str = "train", toy_kind: str = "prompt", n: int | None = None,
              flag: str = "--dataset_name"):
    """Load a dataset by name (`flag` is the command-line flag that named it, for error messages).

    - `toy:<task>` or `toy:<task>:conversational`: the built-in toy task, made as `toy_kind` (see common/toy.py).
    - a local `.jsonl`/`.json`/`.parquet`/`.csv` file, or a folder written by `Dataset.save_to_disk`. A file is one
      split, 'train' (slices such as 'train[:100]' work); asking it for another split is an error, never a silent
      reuse of the training rows. CSV cells are read as text, except the columns in CSV_NUMBER_COLUMNS.
    - anything else: `datasets.load_dataset(name, split=split)` (a hub name or a local loading script/folder).
    Text columns hold strings or message lists in every row (numbers are cast to strings); an empty dataset, a
    malformed JSON line, a message without 'role', or standard and conversational rows mixed raise a
    DatasetFormatError naming the row and the fix.
    """
    import datasets

    if name.startswith("toy:"):
        from common import toy

        parts = name.split(":")
        task, conv = parts[1], "conversational" in parts[2:]
        return toy.make_dataset(task, toy_kind, split=split, conversational=conv, n=n)
    path = Path(name).expanduser()
    what = f"{flag} {name}"
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetFormatError(f"{what}: unsupported file type '{path.suffix.lower()}'; use .jsonl, .json, "
                                     ".parquet or .csv, or a folder from Dataset.save_to_disk")
        _check_one_split(split, what)
        ds = _load_file(path, builder, split, what)
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DatasetFormatError(f"{what}: no split '{split}'; it has {list(ds)}")
            ds = ds[split]
        else:
            _check_one_split(split, what)
    elif path.exists() and not path.is_dir():
        raise DatasetFormatError(f"{what}: cannot read this path")
    elif not path.exists() and looks_like_path(name):
        raise DatasetFormatError(f"{what}: file not found (looked for {path.resolve()}). Give an existing .jsonl, "
                                 ".json, .parquet or .csv file, a folder from Dataset.save_to_disk, or a hub name")
    else:
        ds = datasets.load_dataset(name, split=split)
    if len(ds) == 0:
        raise DatasetFormatError(f"{what}: the dataset has no rows; give a file with at least one example")
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    ds = text_columns_as_strings(ds)
    check_rows(ds, what)
    return ds


def looks_like_path(name: str) -> bool:
    """A name meant as a local path (not a hub id): starts with '.', '/' or '~', or ends in a data-file suffix."""
    return name.startswith((".", "/", "~", "\\")) or Path(name).suffix.lower() in (*FILE_BUILDERS, ".arrow")


def _check_one_split(split: str, what: str):
    if split.split("[")[0] != "train":
        raise DatasetFormatError(f"{what}: a local file holds one split, 'train', not '{split}'. For held-out rows "
                                 "pass --eval_dataset_name FILE (a separate file) or --eval_fraction F")


def _load_file(path: Path, builder: str, split: str, what: str):
    import datasets

    if builder in ("json", "csv") and not path.read_bytes().strip():
        raise DatasetFormatError(f"{what}: the file is empty; give a file with at least one example")
    kwargs = {}
    if builder == "csv":  # every cell as text (datasets would guess ints); the known number columns are parsed below
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}), "na_filter": False}
    if builder == "json" and path.suffix.lower() == ".jsonl":
        _check_json_lines(path, what)  # a malformed line: name its number (datasets' own error does not)
    try:
        ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split=split, **kwargs)
    except (StopIteration, ValueError) as e:
        if isinstance(e, StopIteration) or "corresponds to no data" in str(e):
            raise DatasetFormatError(f"{what}: the dataset has no rows; give a file with at least one example") from e
        raise
    if builder == "csv":
        ds = _parse_csv_numbers(ds, what)
    return ds


def _check_json_lines(path: Path, what: str):
    import json

    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{what}: line {i} is not valid JSON ({e.msg} at column {e.colno}): "
                                         f"{line.strip()[:120]!r}. Fix or remove that line (one JSON object per line)")
            if not isinstance(row, dict):
                raise DatasetFormatError(f"{what}: line {i} is a JSON {type(row).__name__}, not an object "
                                         "({\"column\": value, ...}); one JSON object per line")


def _parse_csv_numbers(ds, what: str):
    def parse(col, typ, v, i):
        s = v.strip()
        if typ is bool and s.lower() in ("true", "1", "yes", "false", "0", "no"):
            return s.lower() in ("true", "1", "yes")
        try:
            if typ is float:
                return float(s)
        except ValueError:
            pass
        want = "True/False" if typ is bool else "a number"
        raise DatasetFormatError(f"{what}: row {i}, column '{col}' is {v!r}, not {want}")

    for col, typ in CSV_NUMBER_COLUMNS.items():
        if col in ds.column_names:
            vals = [parse(col, typ, v, i) for i, v in enumerate(ds[col])]
            ds = ds.remove_columns(col).add_column(col, vals)
    return ds


def text_columns_as_strings(ds):
    """Cast number/bool values of the text columns (and of message contents) to strings."""
    import datasets

    def fix(feature, in_message=False):
        if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
            return datasets.Value("string")
        if isinstance(feature, dict) and "role" in feature:
            return {k: fix(v) if k == "content" else v for k, v in feature.items()}
        for seq in ("List", "LargeList", "Sequence"):
            if type(feature).__name__ == seq and isinstance(feature.feature, dict):
                return type(feature)(fix(feature.feature))
        return feature

    feats = ds.features.copy()
    changed = False
    for col in TEXT_COLUMNS:
        if col in feats:
            new = fix(feats[col])
            if repr(new) != repr(feats[col]):
                feats[col], changed = new, True
    return ds.cast(feats) if changed else ds


def _value_kind(v) -> str:
    if isinstance(v, str):
        return "standard"
    if isinstance(v, list) and v and all(isinstance(m, dict) for m in v):
        return "conversational"
    return "none" if v is None else type(v).__name__


def check_rows(ds, what: str):
    """Every row of every text column is of one kind, all standard (strings) or all conversational (message
    lists), and every message has 'role' and 'content'; else a DatasetFormatError naming the first offending row."""
    first = None  # (kind, row, column) of the first value seen: every other must match it
    for col in TEXT_COLUMNS:
        if col not in ds.column_names:
            continue
        for i, v in enumerate(ds[col]):
            kind = _value_kind(v)
            if kind not in ("standard", "conversational"):
                raise DatasetFormatError(
                    f"{what}: row {i}, column '{col}' holds "
                    f"{'nothing (null)' if v is None else f'{repr(v)[:80]} (type {type(v).__name__})'}, not a "
                    "string or a list of {'role', 'content'} messages. Fill it in or drop the row; a file holds one "
                    "kind of example per column")
            if kind == "conversational":
                for j, m in enumerate(v):
                    missing = [k for k in ("role", "content") if k not in m]
                    if missing:
                        raise DatasetFormatError(
                            f"{what}: row {i}, column '{col}', message {j} has no "
                            f"{' or '.join(repr(k) for k in missing)} key (its keys: {sorted(m)}); every message is "
                            '{"role": ..., "content": ...}')
            if first is None:
                first = (kind, i, col)
            elif kind != first[0]:
                raise DatasetFormatError(
                    f"{what}: row {i}, column '{col}' is {kind} but row {first[1]}, column '{first[2]}' is {first[0]}; "
                    "standard rows (strings) and conversational rows (lists of messages) cannot be mixed in one "
                    "dataset. Convert them to one format")


def toy_task(dataset_name: str) -> str | None:
    """The toy task named by `toy:<task>[:...]`, else None."""
    return dataset_name.split(":")[1] if dataset_name.startswith("toy:") else None


def load_splits(args, kind: str, script: str, toy_n: int | None = None):
    """(train, eval) datasets of a run, both converted to `kind` (a data.convert type; 'a|b' accepts either type,
    and toy datasets are made as the first). The eval rows, first match wins:
      --eval_dataset_name: a file or save_to_disk folder (all its rows) or a hub name (split --eval_split, default
                           'test'); never the training data itself;
      --eval_fraction F:   that fraction of the training rows, held out by `holdout` (deterministic, disjoint);
      a toy dataset:       the toy task's test split (--eval_split; first `toy_n` rows);
      else None, and one start-up line says there is no evaluation set.
    Reads args.dataset_name, dataset_split and, where the script has them, eval_dataset_name, eval_fraction and
    eval_split. Every error names the flag and happens here, before any model is loaded."""
    name, split = args.dataset_name, getattr(args, "dataset_split", "train")
    eval_name = getattr(args, "eval_dataset_name", None)
    fraction = float(getattr(args, "eval_fraction", 0.0) or 0.0)
    eval_split = getattr(args, "eval_split", "test")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--eval_fraction {fraction}: give a fraction in [0, 1) of the training rows to hold out")
    if eval_name and fraction:
        raise ValueError("pass --eval_dataset_name or --eval_fraction, not both")
    kinds = kind.split("|")
    train = load_data(name, split, toy_kind=kinds[0])
    eval_ds = None
    if eval_name:
        local = not eval_name.startswith("toy:") and Path(eval_name).expanduser().exists()
        e_split = "train" if local else (eval_split or "test")
        if _same_source(name, split, eval_name, e_split):
            raise ValueError(f"--eval_dataset_name {eval_name} is the training data itself ({args.dataset_name}, "
                             f"split {split}); held-out rows must not be trained on: give another file or split, or "
                             "use --eval_fraction F")
        eval_ds = load_data(eval_name, e_split, toy_kind=kinds[0], n=toy_n if eval_name.startswith("toy:") else None,
                            flag="--eval_dataset_name")
    elif fraction:
        train, eval_ds = holdout(train, fraction)
    elif toy_task(name) is not None and eval_split:
        eval_ds = load_data(name, eval_split, toy_kind=kinds[0], n=toy_n)
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"{script}: no evaluation set: pass --eval_dataset_name or --eval_fraction", file=sys.stderr, flush=True)
    train = convert_any(train, kinds, script)
    if eval_ds is not None:
        eval_ds = convert_any(eval_ds, kinds, f"{script} (--eval_dataset_name)" if eval_name else script)
    return train, eval_ds


def _same_source(name: str, split: str, eval_name: str, eval_split: str) -> bool:
    a, b = Path(name).expanduser(), Path(eval_name).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return name == eval_name and split == eval_split


def holdout(ds, fraction: float, key_columns=("prompt", "text", "messages", "chosen")):
    """(train, eval) rows: about `fraction` of the rows held out, chosen by a hash of the prompt (of the text for
    language-modelling rows), so the choice is a pure function of the data (no seed), the two parts never share a
    row, and rows with the same prompt (several pairs per prompt) land on the same side."""
    n = len(ds)
    col = next((c for c in key_columns if c in ds.column_names), None)
    import json

    keys = [json.dumps(v, sort_keys=True, default=str) for v in (ds[col] if col else ds.to_list())]
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    want, held = round(n * fraction), []
    for k in sorted(groups, key=lambda k: (zlib.crc32(k.encode()), k)):
        if len(held) >= want:
            break
        held += groups[k]
    if not held or len(held) >= n:
        raise ValueError(f"--eval_fraction {fraction} of {n} rows ({len(groups)} distinct prompts) leaves "
                         f"{'no evaluation rows' if not held else 'no training rows'}; pick a fraction that leaves "
                         "rows on both sides, or pass --eval_dataset_name")
    held_set = set(held)
    return ds.select([i for i in range(n) if i not in held_set]), ds.select(sorted(held))


def check_batch_fits(n_rows: int, global_batch: int, flag_names: str | list[str] | tuple[str, ...]):
    """Call at start-up: a ValueError (naming the batch flags) when the data is smaller than one global batch,
    instead of failing at the first step, after the model loaded. flag_names: the flags whose product is the
    global batch, e.g. ['--per_device_train_batch_size', '--gradient_accumulation_steps']."""
    if n_rows < global_batch:
        flags = flag_names if isinstance(flag_names, str) else " x ".join(flag_names)
        raise ValueError(f"the training data has {n_rows} rows, fewer than one global batch of {global_batch} "
                         f"({flags} x processes); lower those flags or use more data")


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


def convert_any(ds, kinds: list[str], script: str = "this script"):
    """`convert` to the first of `kinds` the data is already of (so nothing is converted), else to kinds[0]; the
    error names every accepted type's columns."""
    have = detect_type(ds.column_names)
    if have in kinds:
        return convert(ds, have, script)
    if len(kinds) == 1:
        return convert(ds, kinds[0], script)
    order = ["prompt", "completion", "completions", "chosen", "rejected", "label", "labels", "rewards", "reward",
             "text", "messages"]
    expected = "; or ".join(f"{k}: " + " or ".join("{" + ", ".join(sorted(o, key=order.index)) + "}"
                                                   for o in TYPE_COLUMNS[k]) for k in kinds)
    raise DatasetFormatError(f"{script} needs a dataset with columns {expected}; found columns "
                             f"{sorted(ds.column_names)} (detected type: {have or 'unknown'}). Rename the columns or "
                             "pick a dataset of one of those types.")


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
    left = side == "left"
    # one tensor from nested lists per output (a small tensor per row costs ~10 us each, per step)
    ids = [[pad_id] * (L - len(s)) + list(s) if left else list(s) + [pad_id] * (L - len(s)) for s in seqs]
    mask = [[0] * (L - len(s)) + [1] * len(s) if left else [1] * len(s) + [0] * (L - len(s)) for s in seqs]
    shape = (len(seqs), L)
    return torch.tensor(ids, dtype=torch.long).reshape(shape), torch.tensor(mask, dtype=torch.long).reshape(shape)


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
    perm = _epoch_permutation(n, seed, epoch)
    return perm[i * batch_size:(i + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded row order of one epoch (made once per epoch, not once per step)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()
