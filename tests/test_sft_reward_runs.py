"""Tier 2/3: sft.py and reward.py through their real entry points: checkpoints reload and generate, resume is exact,
gradient accumulation and 2 processes give the same update as one big batch, bad input fails before compute."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import accelerate_launcher, read_metrics, run_script

FAST = ["--per_device_train_batch_size", "16", "--logging_steps", "2", "--num_eval_prompts", "16"]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_sft_trains_saves_and_the_checkpoint_reloads_and_generates(tmp_path):
    out = tmp_path / "sft"
    run_script("sft.py", "--output_dir", str(out), "--max_steps", "12", "--save_steps", "6", "--eval_steps", "12", *FAST)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # 12 steps of lr 1e-3 from scratch must lower the NLL
    assert 0.0 <= metrics[-1]["eval/accuracy"] <= 1.0 and "mean_token_accuracy" in metrics[-1]
    args = json.loads((out / "args.json").read_text())
    assert args["max_steps"] == 12
    assert (out / "checkpoint-6" / "trainer_state.json").exists() and (out / "checkpoint-12" / "state").is_dir()
    assert not list(out.glob(".tmp-*"))
    for folder in (out, out / "checkpoint-6"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok(["<bos>12+34="], add_special_tokens=False, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen.shape[1] > ids["input_ids"].shape[1]
    # the final weights differ from the step-6 checkpoint: training continued
    w6, w12 = weights(out / "checkpoint-6"), weights(out)
    assert any(not torch.equal(w6[k], w12[k]) for k in w12)


def test_sft_resume_gives_the_same_final_weights(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--max_steps", "8", "--eval_steps", "0", *FAST]
    run_script("sft.py", "--output_dir", str(full), "--save_steps", "0", *common)
    run_script("sft.py", "--output_dir", str(part), "--save_steps", "4", *common)
    # throw away the end of the interrupted run and continue from step 4
    import shutil

    shutil.rmtree(part / "checkpoint-8")
    (part / "model.safetensors").unlink()
    run_script("sft.py", "--output_dir", str(part), "--save_steps", "4", "--resume_from", "auto", *common)
    a, b = weights(full), weights(part)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    steps = [m["step"] for m in read_metrics(part)]
    assert steps == [2, 4, 6, 8]  # records after the resume point were rewritten, not duplicated


def test_sft_gradient_accumulation_matches_one_big_batch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--max_steps", "3", "--eval_steps", "0", "--save_steps", "0", "--logging_steps", "1"]
    run_script("sft.py", "--output_dir", str(a), "--per_device_train_batch_size", "8",
               "--gradient_accumulation_steps", "1", *common)
    run_script("sft.py", "--output_dir", str(b), "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "4", *common)
    la, lb = [m["loss"] for m in read_metrics(a)], [m["loss"] for m in read_metrics(b)]
    assert la == pytest.approx(lb, rel=1e-5)
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-4)


def test_sft_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max_steps", "3", "--eval_steps", "0", "--save_steps", "0", "--logging_steps", "1"]
    run_script("sft.py", "--output_dir", str(one), "--per_device_train_batch_size", "4",
               "--gradient_accumulation_steps", "2", *common)
    run_script("sft.py", "--output_dir", str(two), "--per_device_train_batch_size", "4", *common,
               launcher=accelerate_launcher(2))
    l1, l2 = [m["loss"] for m in read_metrics(one)], [m["loss"] for m in read_metrics(two)]
    assert l1 == pytest.approx(l2, rel=1e-5)
    w1, w2 = weights(one), weights(two)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=2e-6, rtol=1e-4)


def test_sft_two_processes_resume_continues_exactly(tmp_path):
    """Resume under 2 CPU processes: every rank reloads its state (accelerate's MULTI_CPU device is "cpu:0", which
    safetensors refuses as a device name) and the run ends with the uninterrupted run's weights."""
    import shutil

    out = tmp_path / "two"
    common = ["--max_steps", "4", "--eval_steps", "0", "--save_steps", "2", "--logging_steps", "1",
              "--per_device_train_batch_size", "4", "--output_dir", str(out)]
    run_script("sft.py", *common, launcher=accelerate_launcher(2))
    full, losses = weights(out), [m["loss"] for m in read_metrics(out)]
    shutil.rmtree(out / "checkpoint-4")
    (out / "model.safetensors").unlink()
    run_script("sft.py", *common, "--resume_from", "auto", launcher=accelerate_launcher(2))
    resumed = weights(out)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5)
    assert [m["loss"] for m in read_metrics(out)] == pytest.approx(losses, rel=1e-5)


def test_sft_conversational_and_full_sequence_loss(tmp_path):
    out = tmp_path / "conv"
    run_script("sft.py", "--output_dir", str(out), "--dataset_name", "toy:reverse:conversational", "--max_steps", "2",
               "--eval_steps", "2", "--save_steps", "0", "--completion_only_loss", "False", *FAST)
    m = read_metrics(out)[-1]
    # the full-sequence loss counts the chat markup tokens too: many more label tokens than the bare answers
    assert m["num_tokens"] > 16 * 2 * 10


def test_sft_on_a_local_jsonl_file(tmp_path):
    from common import toy

    path = tmp_path / "train.jsonl"
    toy.make_dataset("add", "lm", n=64).to_json(str(path))
    out = tmp_path / "lm"
    run_script("sft.py", "--output_dir", str(out), "--dataset_name", str(path), "--eval_split", "None",
               "--max_steps", "2", "--save_steps", "0", *FAST)
    assert read_metrics(out)[-1]["num_tokens"] > 0


def test_sft_rejects_a_wrong_dataset_before_building_a_model(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "1+1=", "answer": "2"}\n')
    proc = run_script("sft.py", "--output_dir", str(tmp_path / "x"), "--dataset_name", str(path), check=False)
    assert proc.returncode != 0
    assert "['answer', 'question']" in proc.stderr and "prompt, completion" in proc.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_reward_model_trains_and_reloads_as_a_sequence_classifier(tmp_path):
    out = tmp_path / "rm"
    run_script("reward.py", "--model_name_or_path", "toy", "--output_dir", str(out), "--max_steps", "4",
               "--save_steps", "0", "--eval_steps", "4", "--num_eval_pairs", "32", "--logging_steps", "2",
               "--per_device_train_batch_size", "16", "--center_rewards_coefficient", "0.01")
    m = read_metrics(out)[-1]
    for key in ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward", "eval/accuracy", "num_tokens"):
        assert key in m
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1
    from common import data, model as mu

    ids, mask = data.pad(data.tokenize(tok, ["<bos>1+1=2<eos>", "<bos>1+1=3<eos>"]), tok.pad_token_id, "left")
    scores = mu.sequence_classifier_scores(model, ids, mask)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_reward_rejects_prompt_only_data(tmp_path):
    from datasets import Dataset

    path = tmp_path / "prompts.jsonl"
    Dataset.from_list([{"prompt": "1+1="}] * 4).to_json(str(path))
    proc = run_script("reward.py", "--model_name_or_path", "toy", "--output_dir", str(tmp_path / "x"),
                      "--dataset_name", str(path), check=False)
    assert proc.returncode != 0 and "chosen, prompt, rejected" in proc.stderr and "['prompt']" in proc.stderr


@pytest.mark.slow
def test_sft_default_run_learns_the_toy_task(tmp_path):
    """Held-out greedy exact match: untrained ~0, after the default run well above."""
    out = tmp_path / "sft"
    run_script("sft.py", "--output_dir", str(out), "--save_steps", "0", "--eval_steps", "100", timeout=1800)
    acc = [m["eval/accuracy"] for m in read_metrics(out) if "eval/accuracy" in m]
    assert acc[0] < 0.1 and acc[-1] >= 0.6


def test_the_rl_start_policy_leaves_room_for_rl(toy_policy):
    """The cached start policy is the default run stopped at a fixed step (its schedule still that of 1000 steps):
    half-trained, with held-out exact match well above the untrained model's and well below 1."""
    from common import toy

    args = json.loads((toy_policy / "args.json").read_text())
    assert (args["max_steps"], args["lr_decay_steps"]) == (toy.START_POLICY_STEPS, 1000)
    last = read_metrics(toy_policy)[-1]
    assert last["step"] == toy.START_POLICY_STEPS and 0.3 <= last["eval/accuracy"] <= 0.8
    assert last["learning_rate"] == pytest.approx(1e-3 * (1000 - 475) / (1000 - 20), rel=1e-6)


def test_the_toy_reward_model_ranks_held_out_pairs(toy_rm):
    """reward.py's default run reaches >= 0.9 pairwise accuracy on held-out preference pairs."""
    assert read_metrics(toy_rm)[-1]["eval/accuracy"] >= 0.9
