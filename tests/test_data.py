"""Dataset types, conversions, chat templates, tokenisation layout and loading from local files."""

import json

import pytest
import torch
from datasets import Dataset

from common import data, toy
from common.generation import mask_after_eos


@pytest.fixture(scope="module")
def tok():
    return toy.make_tokenizer()


@pytest.mark.parametrize("kind", toy.DATASET_TYPES)
@pytest.mark.parametrize("conversational", [False, True])
def test_every_toy_type_is_detected_and_formatted(kind, conversational):
    ds = toy.make_dataset("add", kind, conversational=conversational, n=8)
    assert len(ds) == 8
    assert data.detect_type(ds.column_names) == kind
    if kind != "stepwise":  # stepwise steps are plain strings in both formats
        assert data.is_conversational(ds[0]) == conversational


def test_toy_splits_are_disjoint_and_deterministic():
    for task in toy.TASKS:
        train = {p for p, _ in toy.problems(task, "train")}
        test = {p for p, _ in toy.problems(task, "test")}
        assert train and test and not (train & test)
    a = toy.make_dataset("reverse", "preference", n=20, seed=3)
    b = toy.make_dataset("reverse", "preference", n=20, seed=3)
    assert a.to_list() == b.to_list()


def test_gold_rewards_and_rejected_answers_are_wrong():
    for task in toy.TASKS:
        ds = toy.make_dataset(task, "preference", n=50)
        fn = toy.gold_reward(task)
        assert fn(ds["prompt"], ds["chosen"]) == [1.0] * 50
        assert fn(ds["prompt"], ds["rejected"]) == [0.0] * 50
    fn = toy.gold_reward("add")
    assert fn(["12+34="], ["46"]) == [1.0]
    assert fn(["12+34="], ["46<eos>"]) == [1.0]
    assert fn(["12+34="], ["47"]) == [0.0]
    assert fn([[{"role": "user", "content": "1+2="}]], [[{"role": "assistant", "content": "3"}]]) == [1.0]
    assert fn(["no task here"], ["3"]) == [None]


def test_stepwise_labels_mark_the_first_error_and_after():
    ds = toy.make_dataset("add", "stepwise", n=200)
    for row in ds:
        ans = toy.solve("add", row["prompt"])
        steps, labels = row["completions"], row["labels"]
        # labels are a prefix of Trues followed by Falses, and True exactly where the prefix matches the answer
        for i in range(len(steps)):
            assert labels[i] == ("".join(steps[: i + 1]) == ans[: i + 1])


def test_preference_to_unpaired_and_to_reward_rows():
    ds = Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                            {"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    un = data.convert(ds, "unpaired")
    assert sorted(un.column_names) == ["completion", "label", "prompt"]
    assert un.to_list() == [{"prompt": "1+1=", "completion": "2", "label": True},
                            {"prompt": "2+2=", "completion": "4", "label": True},
                            {"prompt": "1+1=", "completion": "3", "label": False},
                            {"prompt": "2+2=", "completion": "5", "label": False}]
    pcr = data.convert(ds, "prompt_completion_reward")
    assert pcr[0] == {"prompt": "1+1=", "completions": ["2", "3"], "rewards": [1.0, 0.0]}


def test_implicit_prompt_is_extracted():
    ds = Dataset.from_list([{"chosen": "12+34=46", "rejected": "12+34=47"}])
    out = data.convert(ds, "preference")
    assert out[0] == {"prompt": "12+34=", "chosen": "46", "rejected": "47"}
    conv = Dataset.from_list([{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}])
    out = data.convert(conv, "preference")[0]
    assert out["prompt"] == [{"role": "user", "content": "q"}]
    assert out["chosen"] == [{"role": "assistant", "content": "a"}]


def test_singular_reward_columns_are_normalised():
    ds = Dataset.from_list([{"prompt": "p", "completion": "c", "reward": 0.5}])
    out = data.convert(ds, "prompt_completion_reward")[0]
    assert out["completions"] == ["c"] and out["rewards"] == [0.5]


def test_prompt_only_view_keeps_extra_columns():
    ds = toy.make_dataset("add", "prompt_completion", n=4).add_column("answer", ["1", "2", "3", "4"])
    out = data.convert(ds, "prompt")
    assert sorted(out.column_names) == ["answer", "prompt"]


def test_wrong_columns_raise_an_error_naming_found_and_expected_columns():
    ds = Dataset.from_list([{"question": "1+1=", "response": "2"}])
    with pytest.raises(data.DatasetFormatError) as e:
        data.convert(ds, "preference", script="reward.py")
    msg = str(e.value)
    assert "reward.py" in msg and "['question', 'response']" in msg and "chosen" in msg and "rejected" in msg
    assert "preference" in msg


def test_chat_template_prompt_and_completion_keep_eos(tok):
    prompt = [{"role": "user", "content": "1+2="}]
    p = data.prompt_text(prompt, tok)
    assert p == "<bos><|user|>1+2=<|end|><|assistant|>"
    c = data.completion_text(prompt, [{"role": "assistant", "content": "3"}], tok)
    assert c == "3<eos>"
    assert data.prompt_text("1+2=", tok) == "<bos>1+2="
    assert data.completion_text("1+2=", "3", tok) == "3<eos>"
    ids = data.tokenize(tok, [c])[0]
    assert ids[-1] == tok.eos_token_id and len(ids) == 2


def test_batch_layout_left_pads_prompts_and_right_pads_completions():
    b = data.batch_prompt_completion([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    b = data.batch_prompt_completion([[5, 6, 7]], [[1, 2, 3]], pad_id=0, max_prompt_length=2, max_completion_length=1)
    assert b["input_ids"].tolist() == [[6, 7, 1]]


def test_mask_after_eos_keeps_the_first_eos_even_when_pad_is_eos():
    ids = torch.tensor([[4, 2, 2, 2], [4, 5, 6, 7], [2, 9, 9, 9]])
    mask, term = mask_after_eos(ids, eos_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert term.tolist() == [True, False, True]


def test_batch_indices_cover_an_epoch_without_repeats():
    seen = []
    for step in range(5):
        seen += data.batch_indices(20, 4, step, seed=1)
    assert sorted(seen) == list(range(20))
    assert data.batch_indices(20, 4, 7, 1) == data.batch_indices(20, 4, 7, 1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.batch_indices(3, 4, 0, 1)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "disk"])
def test_load_local_files(tmp_path, fmt):
    ds = toy.make_dataset("add", "prompt_completion", n=6)
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ds))
    elif fmt == "json":
        ds.to_json(str(path), lines=False)
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    loaded = data.load_data(str(path))
    assert data.detect_type(loaded.column_names) == "prompt_completion"
    assert [str(x) for x in loaded["prompt"]] == ds["prompt"]


def test_unsupported_file_type_names_the_file(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("x")
    with pytest.raises(data.DatasetFormatError, match=r"d\.txt.*\.jsonl"):
        data.load_data(str(p))


def test_accelerate_config_files_load():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    kinds = {}
    for f in sorted(folder.glob("*.yaml")):
        cfg = load_config_from_file(str(f))
        kinds[f.stem] = getattr(cfg.distributed_type, "value", cfg.distributed_type)
    # every shipped config in its GPU and its CPU variant, and each variant the same distributed mode
    assert kinds == {"ddp": "MULTI_GPU", "ddp_cpu": "MULTI_GPU", "fsdp2": "FSDP", "fsdp2_cpu": "FSDP",
                     "zero2": "DEEPSPEED", "zero2_cpu": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3_cpu": "DEEPSPEED"}


# ----------------------------------------------------------------------------- train/eval splits
def _args(**kw):
    from types import SimpleNamespace

    base = dict(dataset_name="toy:add", dataset_split="train", eval_split="test", eval_dataset_name=None,
                eval_fraction=0.0)
    return SimpleNamespace(**{**base, **kw})


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_fraction_holds_out_disjoint_rows_deterministically_and_keeps_prompts_together(tmp_path):
    # 60 prompts, 3 preference pairs each: pairs of one prompt must never straddle train and eval
    rows = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + k + 1)} for i in range(60)
            for k in range(3)]
    f = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    train, ev = data.load_splits(_args(dataset_name=f, eval_fraction=0.2), "preference", "reward.py")
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    tr, evr = {key(r) for r in train}, {key(r) for r in ev}
    assert not tr & evr and len(tr | evr) == len(rows) == len(train) + len(ev)
    assert len(ev) == 36  # 20% of 180 rows, whole prompts
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    # a pure function of the data: the same rows in another order give the same eval rows, and a second call too
    f2 = _write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    _, ev2 = data.load_splits(_args(dataset_name=f2, eval_fraction=0.2), "preference", "reward.py")
    assert {key(r) for r in ev2} == evr
    _, ev3 = data.load_splits(_args(dataset_name=f, eval_fraction=0.2), "preference", "reward.py")
    assert ev3.to_list() == ev.to_list()


def test_toy_eval_is_the_test_split_and_a_file_eval_is_that_file(tmp_path, capsys):
    train, ev = data.load_splits(_args(), "prompt", "grpo.py", toy_n=32)
    assert len(ev) == 32 and not set(train["prompt"]) & set(ev["prompt"])
    f = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 4)
    g = _write_jsonl(tmp_path / "eval.jsonl", [{"text": "2+2=4"}, {"text": "3+3=6"}])
    train, ev = data.load_splits(_args(dataset_name=f, eval_dataset_name=g), "prompt_completion|lm", "sft.py")
    assert len(train) == 4 and ev["text"] == ["2+2=4", "3+3=6"]
    train, ev = data.load_splits(_args(dataset_name=f), "prompt_completion|lm", "sft.py")
    assert ev is None and capsys.readouterr().err.count("no evaluation set: pass --eval_dataset_name or "
                                                        "--eval_fraction") == 1


def test_eval_flags_are_checked(tmp_path):
    f = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}=", "completion": "x"} for i in range(10)])
    with pytest.raises(ValueError, match="is the training data itself"):
        data.load_splits(_args(dataset_name=f, eval_dataset_name=str(tmp_path / "." / "train.jsonl")), "prompt", "x")
    with pytest.raises(ValueError, match="not both"):
        data.load_splits(_args(dataset_name=f, eval_dataset_name=f, eval_fraction=0.1), "prompt", "x")
    with pytest.raises(ValueError, match=r"--eval_fraction 1.5"):
        data.load_splits(_args(dataset_name=f, eval_fraction=1.5), "prompt", "x")
    with pytest.raises(ValueError, match="leaves no evaluation rows"):
        data.load_splits(_args(dataset_name=f, eval_fraction=0.01), "prompt", "x")


def test_a_local_file_has_no_other_split_than_its_rows(tmp_path):
    """Asking a single file for a 'test' split used to return the training rows, labelled held-out."""
    f = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    with pytest.raises(data.DatasetFormatError, match="one split, 'train', not 'test'.*--eval_fraction"):
        data.load_data(f, "test")
    assert len(data.load_data(f, "train[:2]")) == 2


# ----------------------------------------------------------------------------- CSV numbers, bad files
def test_csv_cells_are_text_except_number_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion,answer,label,margin\n1+1=,2,2,True,0.5\n2+2=,4,007,false,1\n3+3=,,NA,0,2\n")
    ds = data.load_data(str(p))
    assert ds["completion"] == ["2", "4", ""] and ds["answer"] == ["2", "007", "NA"]
    assert ds["label"] == [True, False, False] and ds["margin"] == [0.5, 1.0, 2.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,completion,label\na,b,maybe\n")
    with pytest.raises(data.DatasetFormatError, match=r"row 0, column 'label' is 'maybe', not True/False"):
        data.load_data(str(bad))


def test_numbers_in_json_text_columns_become_strings(tmp_path):
    f = _write_jsonl(tmp_path / "n.jsonl", [{"prompt": 12, "completion": 3}, {"prompt": 7, "completion": 40}])
    ds = data.load_data(f)
    assert ds["prompt"] == ["12", "7"] and ds["completion"] == ["3", "40"]
    mixed = _write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "completion": 2.5},
                                                {"prompt": "b", "completion": True}])
    with pytest.raises(data.DatasetFormatError, match=r"row 0, column 'completion' holds 2.5 \(type float\)"):
        data.load_data(mixed)


@pytest.mark.parametrize("case,match", [
    ("empty", "the file is empty"),
    ("header_only", "has no rows"),
    ("missing", r"file not found \(looked for .*nope\.jsonl\)"),
    ("no_role", r"row 1, column 'messages', message 0 has no 'role' key \(its keys: \['content', 'speaker'\]\)"),
    ("mixed", r"row 2, column 'prompt' is conversational but row 0, column 'prompt' is standard"),
    ("mixed_lm", r"row 1, column 'text' holds nothing \(null\)"),
    ("bad_line", r"line 3 is not valid JSON"),
])
def test_bad_files_name_the_problem(tmp_path, case, match):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    files = {
        "empty": ("d.jsonl", ""),
        "header_only": ("d.csv", "prompt,completion\n"),
        "missing": ("./nope.jsonl", None),
        "no_role": ("d.jsonl", json.dumps({"messages": msgs}) + "\n"
                    + json.dumps({"messages": [{"speaker": "user", "content": "q"}]}) + "\n"),
        "mixed": ("d.jsonl", "".join(json.dumps(r) + "\n" for r in [
            {"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"},
            {"prompt": msgs[:1], "completion": msgs[1:]}])),
        "mixed_lm": ("d.jsonl", json.dumps({"text": "1+1=2"}) + "\n" + json.dumps({"messages": msgs}) + "\n"),
        "bad_line": ("d.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n{"prompt": "d"}\n'),
    }
    name, text = files[case]
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(data.DatasetFormatError, match=match) as e:
        data.load_data(str(path) if case != "missing" else "./nope.jsonl")
    assert "--dataset_name" in str(e.value)


def test_check_batch_fits_names_the_batch_flags():
    data.check_batch_fits(16, 16, ["--per_device_train_batch_size", "--gradient_accumulation_steps"])
    with pytest.raises(ValueError, match=r"8 rows, fewer than one global batch of 16 \(--per_device_train_batch_size "
                                         r"x --gradient_accumulation_steps"):
        data.check_batch_fits(8, 16, ["--per_device_train_batch_size", "--gradient_accumulation_steps"])


def test_an_empty_model_folder_is_named(tmp_path):
    from common import model as mu

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--model_name_or_path .*empty: the folder has no config.json and "
                                         r"tokenizer files .*it holds nothing"):
        mu.load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="folder not found"):
        mu.load_tokenizer("./no_such_model")
