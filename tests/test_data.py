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
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
