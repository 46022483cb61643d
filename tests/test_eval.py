"""Evaluation: a saved run reproduces its own held-out score with plain transformers; held-out rewards from reward
sources; train/eval splits of user data never overlap."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import toy
from conftest import read_metrics


def test_a_saved_run_reproduces_its_held_out_score_with_plain_transformers(toy_policy):
    """The start policy's folder, loaded the way a user loads any model (no cleanalign code on the model side):
    greedy `generate` on the same 256 held-out prompts gives exactly the exact match sft.py logged."""
    logged = read_metrics(toy_policy)[-1]["eval/accuracy"]
    tok = AutoTokenizer.from_pretrained(toy_policy)
    model = AutoModelForCausalLM.from_pretrained(toy_policy).eval()
    test = toy.make_dataset("add", "prompt", split="test", n=256).to_list()
    prompts, answers = [r["prompt"] for r in test], [r["answer"] for r in test]
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    correct = sum(t.strip() == a for t, a in zip(texts, answers))
    assert correct / 256 == logged
    assert 0.3 <= logged <= 0.8  # a half-trained policy: the check above compares two non-trivial numbers


class FakeSources:
    """Two reward sources in RewardSources' calling convention: the completion length (scores every sample) and a
    parity check that does not score prompts with an odd first number (NaN)."""

    names = ["length", "even"]
    weights = torch.tensor([0.5, 2.0])

    def __init__(self):
        self.seen = None

    def __call__(self, prompts, completions, completion_ids, columns=None):
        self.seen = (list(prompts), list(completions), list(completion_ids), columns)
        out = torch.full((len(prompts), 2), float("nan"))
        for i, (p, c) in enumerate(zip(prompts, completions)):
            out[i, 0] = len(c)
            if int(p.split("+")[0]) % 2 == 0:
                out[i, 1] = float(c.strip().isdigit() and int(c) % 2 == 0)
        return out


def test_heldout_reward_is_the_weighted_nan_aware_mean_of_greedy_completions(toy_policy):
    from common import data, evaluation

    tok = AutoTokenizer.from_pretrained(toy_policy)
    model = AutoModelForCausalLM.from_pretrained(toy_policy).eval()
    _, ev = data.load_splits(type("A", (), {"dataset_name": "toy:add", "dataset_split": "train",
                                            "eval_split": "test"})(), "prompt", "grpo.py", toy_n=40)
    src = FakeSources()
    out = evaluation.heldout_reward(model, tok, ev, src, dataset_name="toy:add", n_prompts=24, max_new_tokens=8)
    prompts, comps, ids, columns = src.seen
    assert prompts == list(ev["prompt"])[:24] and columns == {"answer": list(ev["answer"])[:24]}
    assert all(i[-1] == tok.eos_token_id for i in ids)  # terminated greedy completions, EOS kept in the ids
    # reference, by hand: per-sample weighted sum over the sources that scored it, then the mean
    length = [float(len(c)) for c in comps]
    even = [float(c.isdigit() and int(c) % 2 == 0) if int(p.split("+")[0]) % 2 == 0 else None
            for p, c in zip(prompts, comps)]
    total = [0.5 * a + (2.0 * b if b is not None else 0.0) for a, b in zip(length, even)]
    scored_even = [b for b in even if b is not None]
    assert 0 < len(scored_even) < 24
    assert out["eval/reward"] == pytest.approx(sum(total) / 24)
    assert out["eval/rewards/length/mean"] == pytest.approx(sum(length) / 24)
    assert out["eval/rewards/even/mean"] == pytest.approx(sum(scored_even) / len(scored_even))
    gold = [float(c.strip() == a) for c, a in zip(comps, columns["answer"])]
    assert out["eval/gold_reward"] == pytest.approx(sum(gold) / 24)
    # the toy gold reward agrees with the existing helper on the same prompts
    assert out["eval/gold_reward"] == evaluation.heldout_gold_reward(model, tok, "toy:add", 24, 8)["eval/gold_reward"]
    assert evaluation.heldout_reward(model, tok, None, src) == {}


def test_sft_eval_loss_is_computed_on_the_held_out_rows(tmp_path):
    """--eval_fraction on a local file: eval/loss and eval/mean_token_accuracy at the last step equal the saved model's
    token-mean NLL and argmax accuracy on exactly the held-out rows, recomputed here with plain transformers."""
    from common import data
    from conftest import run_script

    f = tmp_path / "train.jsonl"
    toy.make_dataset("add", "prompt_completion", n=80).to_json(str(f))
    out = tmp_path / "run"
    run_script("sft.py", "--dataset_name", str(f), "--eval_fraction", "0.25", "--max_steps", "3", "--logging_steps",
               "3", "--eval_steps", "3", "--per_device_train_batch_size", "16", "--save_steps", "0",
               "--output_dir", str(out))
    last = read_metrics(out)[-1]
    assert "eval/accuracy" not in last  # no known answers on a user file
    args = type("A", (), {"dataset_name": str(f), "dataset_split": "train", "eval_fraction": 0.25})()
    train, ev = data.load_splits(args, "prompt_completion|lm", "sft.py")
    assert len(ev) == 20 and len(train) == 60
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    nll, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for row in ev:
            p = tok(row["prompt"])["input_ids"]
            ids = tok(row["prompt"] + row["completion"])["input_ids"] + [tok.eos_token_id]
            logits = model(torch.tensor([ids])).logits[0, :-1]
            lp = torch.log_softmax(logits.float(), -1)
            for t in range(len(p), len(ids)):
                nll -= lp[t - 1, ids[t]].item()
                correct += int(logits[t - 1].argmax().item() == ids[t])
                n += 1
    assert last["eval/loss"] == pytest.approx(nll / n, rel=1e-4)
    assert last["eval/mean_token_accuracy"] == pytest.approx(correct / n)


def test_reward_eval_accuracy_is_on_held_out_pairs_only(tmp_path):
    """On a local file reward.py used to report eval/accuracy on its training rows. With --eval_fraction the logged
    accuracy and margin are the saved model's on the held-out pairs (without an eval set none is logged: the data
    tests check that load_splits then returns None)."""
    from transformers import AutoModelForSequenceClassification

    from common import data, model as mu
    from conftest import run_script

    f = tmp_path / "pairs.jsonl"
    toy.make_dataset("add", "preference", n=64).to_json(str(f))
    common = ["--model_name_or_path", "toy", "--dataset_name", str(f), "--max_steps", "2", "--logging_steps", "2",
              "--eval_steps", "2", "--per_device_train_batch_size", "8", "--save_steps", "0"]
    out = tmp_path / "held"
    run_script("reward.py", *common, "--eval_fraction", "0.25", "--output_dir", str(out))
    last = read_metrics(out)[-1]
    args = type("A", (), {"dataset_name": str(f), "dataset_split": "train", "eval_fraction": 0.25})()
    _, ev = data.load_splits(args, "preference", "reward.py")
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    texts = [r["prompt"] + r["chosen"] + "<eos>" for r in ev] + [r["prompt"] + r["rejected"] + "<eos>" for r in ev]
    ids, mask = data.pad([tok(t)["input_ids"] for t in texts], tok.pad_token_id, "left")
    with torch.no_grad():
        s = mu.sequence_classifier_scores(model, ids, mask)
    rc, rr = s[: len(ev)], s[len(ev):]
    assert last["eval/accuracy"] == pytest.approx((rc > rr).float().mean().item())
    assert last["eval/margin"] == pytest.approx((rc - rr).mean().item(), abs=1e-5)


@pytest.mark.parametrize("case", ["batch", "missing_file", "empty_model"])
def test_bad_runs_stop_before_a_model_loads_and_write_nothing(tmp_path, case, monkeypatch):
    """sft.main, called as the entry point calls it: the error comes before any model is built or file written."""
    import sft

    from common import model as mu

    f = tmp_path / "small.jsonl"
    toy.make_dataset("add", "prompt_completion", n=8).to_json(str(f))
    (tmp_path / "empty_model").mkdir()
    kw, match = {
        "batch": ({"dataset_name": str(f), "per_device_train_batch_size": 16},
                  "8 rows, fewer than one global batch of 16 (--per_device_train_batch_size x "
                  "--gradient_accumulation_steps"),
        "missing_file": ({"dataset_name": "./nope.jsonl"}, "--dataset_name ./nope.jsonl: file not found"),
        "empty_model": ({"model_name_or_path": str(tmp_path / "empty_model")},
                        "the folder has no config.json and tokenizer files"),
    }[case]
    built = []
    monkeypatch.setattr(mu, "load_causal_lm", lambda *a, **k: built.append(1))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        sft.main(sft.Args(output_dir=str(out), **kw))
    assert match in str(e.value) and not built
    assert not out.exists() or not any(out.iterdir())
