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
