"""PRM: labels on the separator tokens only, the soft-target step loss by hand, held-out step accuracy against a
hand count, the scorer reading exactly the labelled positions, the prm: reward source on a full completion, batch
invariances, exact resume, bad data. Test names point at the numbered implementation details of algos/prm.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import tyro

from conftest import accelerate_launcher, assert_params_close, load_params, read_metrics, run_script

import prm
from common import data, prm_scoring, toy

IGNORE = prm.IGNORE


def toy_ids(text: str) -> list[int]:
    return data.tokenize(toy.make_tokenizer(), [text])[0]


# ----------------------------------------------------------------------------- tier 1: layout, loss, scoring
def test_detail_1_labels_land_on_the_separator_tokens_only():
    tok = toy.make_tokenizer()
    p, steps, sep = toy_ids("<bos>12+34="), [toy_ids("4"), toy_ids("7")], toy_ids("\n")
    ids, labels = prm.tokenize_row(p, steps, sep, [1.0, 0.0], last_step_only=False, max_length=64)
    assert tok.decode(ids) == "<bos>12+34=4\n7\n"
    labelled = [i for i, y in enumerate(labels) if y != IGNORE]
    assert [tok.decode([ids[i]]) for i in labelled] == ["\n", "\n"] and [labels[i] for i in labelled] == [1.0, 0.0]
    assert labelled == [len(p) + 1, len(p) + 3]
    # a two-token separator: the label sits on its last token
    ids2, labels2 = prm.tokenize_row(p, steps, toy_ids(" ;"), [0.0, 1.0], False, 64)
    assert tok.decode(ids2) == "<bos>12+34=4 ;7 ;"
    assert [(tok.decode([ids2[i]]), y) for i, y in enumerate(labels2) if y != IGNORE] == [(";", 0.0), (";", 1.0)]
    # detail 3: only the last step carries a label
    _, last = prm.tokenize_row(p, steps, sep, [1.0, 0.0], last_step_only=True, max_length=64)
    assert [y for y in last if y != IGNORE] == [0.0] and last[-1] == 0.0


def test_detail_4_truncation_cuts_the_prompt_from_the_left_first_then_the_last_steps():
    p, steps, sep = toy_ids("<bos>12+34="), [toy_ids("4"), toy_ids("7")], toy_ids("\n")  # 7 + 4 tokens
    ids, labels = prm.tokenize_row(p, steps, sep, [1.0, 0.0], False, max_length=6)
    assert len(ids) == 6 and ids[-4:] == toy_ids("4\n7\n") and [y for y in labels if y != IGNORE] == [1.0, 0.0]
    ids, labels = prm.tokenize_row(p, steps, sep, [1.0, 0.0], False, max_length=3)  # prompt down to one token
    assert ids == p[-1:] + toy_ids("4\n") and [y for y in labels if y != IGNORE] == [1.0]


def test_detail_2_soft_target_step_loss_by_hand():
    logits = torch.tensor([[[0.0, 1.0], [2.0, -1.0], [5.0, 5.0]]])  # (B=1, L=3, 2)
    labels = torch.tensor([[1.0, 0.3, IGNORE]])
    p1 = 1 / (1 + math.exp(-1.0))  # P(correct) at position 0
    q1 = 1 / (1 + math.exp(3.0))  # P(correct) at position 1
    expected = -(math.log(p1) + 0.3 * math.log(q1) + 0.7 * math.log(1 - q1))
    assert prm.step_loss(logits, labels, 4.0).item() == pytest.approx(expected / 4.0, rel=1e-6)
    # hard labels: the usual cross-entropy over the labelled positions
    hard = torch.tensor([[1.0, 0.0, IGNORE]])
    ce = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([1, 0]), reduction="sum")
    assert prm.step_loss(logits, hard, 1.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert prm.step_correct(logits, labels).tolist() == [1.0, 1.0]  # label 0.3 counts as incorrect


def test_heldout_step_accuracy_against_a_hand_count():
    """evaluate() on rows of a toy-small token classifier: each accuracy equals a per-step count by hand."""
    from transformers import AutoModelForTokenClassification

    tok = toy.make_tokenizer()
    config = toy.make_config(tok, hidden_size=32, num_layers=1)
    config.num_labels = 2
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config).eval()
    ds = toy.make_dataset("add", "stepwise", split="test", n=24)
    rows = prm.tokenize_rows(ds, tok, "\n", False, 64)
    got = prm.evaluate(model, rows, tok.pad_token_id, "cpu", batch_size=5)
    right = wrong = right_pos = n_pos = right_neg = rows_ok = 0
    with torch.no_grad():
        for ids, labels in rows:  # one row at a time, no padding
            pred = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
            steps = [(pred[i], y) for i, y in enumerate(labels) if y != IGNORE]
            for pr, y in steps:
                ok = pr == (1 if y > 0.5 else 0)
                right, wrong = right + ok, wrong + (not ok)
                n_pos, right_pos, right_neg = n_pos + (y > 0.5), right_pos + (ok and y > 0.5), right_neg + (ok and y <= 0.5)
            rows_ok += all(pr == 1 for pr, _ in steps) == all(y > 0.5 for _, y in steps)
    n = right + wrong
    assert got["eval/accuracy"] == pytest.approx(right / n)
    assert got["eval/accuracy_correct_steps"] == pytest.approx(right_pos / n_pos)
    assert got["eval/accuracy_incorrect_steps"] == pytest.approx(right_neg / (n - n_pos))
    assert got["eval/outcome_accuracy"] == pytest.approx(rows_ok / len(rows))


@pytest.mark.parametrize("prompt", ["12+34=", [{"role": "user", "content": "12+34="}]])
def test_the_scorer_reads_exactly_the_positions_training_labels(prompt):
    tok = toy.make_tokenizer()
    steps = ["4", "6", "x"]
    ids, positions = prm_scoring.step_layout(tok, prompt, steps, "\n")
    p_ids = data.tokenize(tok, [data.prompt_text(prompt, tok)])[0]
    t_ids, labels = prm.tokenize_row(p_ids, data.tokenize(tok, steps), toy_ids("\n"), [1, 1, 0], False, 10_000)
    assert ids == t_ids and positions == [i for i, y in enumerate(labels) if y != IGNORE]


def test_split_steps_aggregate_and_spec_parsing():
    assert prm_scoring.split_steps("1\n2\n", "\n") == ["1", "2"]
    assert prm_scoring.split_steps("1\n\n2", "\n") == ["1", "", "2"]
    assert prm_scoring.split_steps("", "\n") == [""] and prm_scoring.split_steps("\n\n", "\n") == [""]
    probs = torch.tensor([0.9, 0.5, 0.8])
    assert prm_scoring.aggregate(probs, "min") == pytest.approx(0.5)
    assert prm_scoring.aggregate(probs, "prod") == pytest.approx(0.36)
    assert prm_scoring.aggregate(probs, "last") == pytest.approx(0.8)
    assert prm_scoring.parse_spec("prm:runs/x") == ("runs/x", "min")
    assert prm_scoring.parse_spec("prm:prod:runs/x") == ("runs/x", "prod")
    assert prm_scoring.parse_spec("prm:last:/abs/x") == ("/abs/x", "last")


@pytest.mark.parametrize("row, match", [
    ({"prompt": "1+1=", "completions": ["2"], "labels": [1.5]}, "label 0 is 1.5"),
    ({"prompt": "1+1=", "completions": ["2", "3"], "labels": [True]}, "2 steps but 'labels'"),
    ({"prompt": "1+1=", "completions": [], "labels": []}, "non-empty list of steps"),
])
def test_detail_2_bad_stepwise_rows_are_named(row, match):
    from datasets import Dataset

    with pytest.raises(data.DatasetFormatError, match=match):
        prm.check_stepwise(Dataset.from_list([row, row]), "--dataset_name x.jsonl")


# ----------------------------------------------------------------------------- tier 2: runs
RUN = ["--max_steps", "3", "--logging_steps", "1", "--eval_steps", "3", "--num_eval_rows", "32", "--save_steps", "2",
       "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """3 steps from toy-sft-full as 1 micro-batch of 8 ('a'), 4 accumulated micro-batches of 2 ('b'), 2 processes of 4
    ('two'), and 'a' resumed from its step-2 checkpoint into another folder ('resumed')."""
    d = tmp_path_factory.mktemp("prm_runs")
    run_script("prm.py", *RUN, "--per_device_train_batch_size", "8", "--output_dir", str(d / "a"))
    run_script("prm.py", *RUN, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
               "--output_dir", str(d / "b"))
    run_script("prm.py", *RUN, "--per_device_train_batch_size", "4", "--output_dir", str(d / "two"),
               launcher=accelerate_launcher(2))
    # in-process (no interpreter start), parsed from the same flags as the command line
    prm.main(tyro.cli(prm.Args, args=[*RUN, "--per_device_train_batch_size", "8", "--output_dir", str(d / "resumed"),
                                      "--resume_from", str(d / "a" / "checkpoint-2")],
                      use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
    return d


KEYS = ("loss", "accuracy", "grad_norm", "num_tokens", "eval/loss", "eval/accuracy", "eval/outcome_accuracy")


def test_run_logs_metrics_and_saves_a_token_classifier_with_its_separator(shared_runs):
    from transformers import AutoConfig

    recs = read_metrics(shared_runs / "a")
    assert [r["step"] for r in recs] == [1, 2, 3]
    for k in ("loss", "accuracy", "grad_norm", "num_tokens", "learning_rate", "train/skipped_steps"):
        assert all(r.get(k) is not None and math.isfinite(r[k]) for r in recs), k
    for k in ("eval/loss", "eval/accuracy", "eval/accuracy_correct_steps", "eval/accuracy_incorrect_steps",
              "eval/outcome_accuracy"):
        assert 0 <= recs[-1][k] and (k == "eval/loss" or recs[-1][k] <= 1), k
    config = AutoConfig.from_pretrained(shared_runs / "a")
    assert config.architectures == ["LlamaForTokenClassification"] and config.num_labels == 2
    assert config.step_separator == "\n" and config.label2id == {"incorrect": 0, "correct": 1}
    assert json.loads((shared_runs / "a" / "args.json").read_text())["train_on_last_step_only"] is False


@pytest.mark.parametrize("other", ["b", "two"])
def test_detail_5_accumulation_4x2_and_two_processes_equal_one_batch_of_8(shared_runs, other):
    ma, mo = read_metrics(shared_runs / "a"), read_metrics(shared_runs / other)
    assert len(ma) == len(mo)
    for ra, ro in zip(ma, mo):
        for k in KEYS:
            assert (k in ra) == (k in ro), k
            if k in ra:
                assert ra[k] == pytest.approx(ro[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    assert_params_close(shared_runs / "a", shared_runs / other, atol=2e-6)


def test_resume_continues_exactly(shared_runs):
    a, resumed = load_params(shared_runs / "a"), load_params(shared_runs / "resumed")
    for k in a:
        assert torch.equal(a[k], resumed[k]), k
    last_r, last_a = read_metrics(shared_runs / "resumed")[-1], read_metrics(shared_runs / "a")[-1]
    assert last_r["step"] == 3 and all(last_r[k] == last_a[k] for k in KEYS)


def test_prm_reward_source_scores_a_full_completion(shared_runs):
    """prm:<dir> through RewardSources: the minimum (prm:prod: the product) over the steps of P(correct) read at each
    step's separator, against the model run by hand; a 'model:' spec naming the PRM is refused with the fix."""
    from transformers import AutoModelForTokenClassification

    from common import rewards

    folder = str(shared_runs / "a")
    sources = rewards.RewardSources([f"prm:{folder}", f"prm:prod:{folder}"], None)
    prompts, completions = ["12+34=", "5+5="], ["4\n6\n", "1\n1"]
    got = sources(prompts, completions, [[0], [0]])
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    for i, (text, steps) in enumerate([("<bos>12+34=4\n6\n", 2), ("<bos>5+5=1\n1\n", 2)]):
        ids = toy_ids(text)
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([ids])).logits[0], -1)[:, 1]
        sep_positions = [j for j, t in enumerate(ids) if t == toy_ids("\n")[0]]
        assert len(sep_positions) == steps
        step_p = p[sep_positions]
        assert got[i, 0].item() == pytest.approx(step_p.min().item(), rel=1e-5)
        assert got[i, 1].item() == pytest.approx(step_p.prod().item(), rel=1e-5)
    conversational = sources([[{"role": "user", "content": "12+34="}]], [[{"role": "assistant", "content": "4\n6"}]],
                             [[0]])
    assert conversational.shape == (1, 2) and 0 < conversational[0, 0] <= 1
    with pytest.raises(ValueError, match=f"pass it as 'prm:{folder}'"):
        rewards.RewardSources([f"model:{folder}"], None)


@pytest.mark.slow
def test_default_run_learns_the_steps_beyond_the_step_position_baseline(tmp_path):
    """The default run (2000 steps): held-out step accuracy well above the 0.71 of always answering 'correct' (the
    share of correct steps in the held-out rows), both classes recognised, and the min-aggregated outcome decision
    better than chance."""
    out = tmp_path / "learn"
    run_script("prm.py", "--output_dir", str(out), "--save_steps", "0", timeout=3600)
    ds = toy.make_dataset("add", "stepwise", split="test", n=512)
    share_correct = sum(y for labels in ds["labels"] for y in labels) / sum(len(labels) for labels in ds["labels"])
    last = [r for r in read_metrics(out) if "eval/accuracy" in r][-1]
    assert last["eval/accuracy"] > max(0.8, share_correct + 0.05)
    assert last["eval/accuracy_incorrect_steps"] > 0.4 and last["eval/accuracy_correct_steps"] > 0.8
    assert last["eval/outcome_accuracy"] > 0.6
