"""Held-out evaluation on the toy tasks: the gold reward of the policy's completions on test-split prompts."""

from __future__ import annotations

import torch

from common import data, toy
from common.generation import HFGenerator, SamplingConfig


@torch.no_grad()
def heldout_gold_reward(model, tokenizer, dataset_name: str, n_prompts: int = 256, max_new_tokens: int = 16,
                        temperature: float = 0.0, accelerator=None, split: str = "test") -> dict:
    """Mean gold reward (exact match) on `n_prompts` held-out prompts of a toy dataset, greedy by default.
    Returns {} for non-toy datasets (no gold reward is known)."""
    task = data.toy_task(dataset_name)
    if task is None:
        return {}
    ds = data.load_data(dataset_name, split, toy_kind="prompt", n=n_prompts)
    gen = HFGenerator(tokenizer, SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens), accelerator)
    prompt_ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in ds["prompt"]])
    out = gen.generate(model, prompt_ids, n=1, greedy=temperature == 0)
    rewards = toy.gold_reward(task)(ds["prompt"], out.texts)
    return {"eval/gold_reward": sum(rewards) / len(rewards), "eval/terminated": out.terminated.float().mean().item()}
