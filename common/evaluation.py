"""Held-out evaluation: greedy completions on eval prompts, scored by the run's reward sources (and, on the toy
tasks, by the gold reward); the toy exact match of the SFT script.

Every process evaluates the same prompts with the same weights (greedy), so the numbers agree across processes
without a reduction, and a sharded (ZeRO-3) model generates on every rank as it must.
"""

from __future__ import annotations

import torch

from common import data, toy
from common.generation import HFGenerator, SamplingConfig


def _generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float, accelerator,
              batch_size: int):
    """Completion texts, id lists and terminated flags for `prompts`, `batch_size` prompts per generate call."""
    gen = HFGenerator(tokenizer, SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens), accelerator)
    texts, ids, terminated = [], [], []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        out = gen.generate(model, data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in chunk]), n=1,
                           greedy=temperature == 0)
        texts += out.texts
        ids += [row[m.bool()].tolist() for row, m in zip(out.completion_ids.cpu(), out.completion_mask.cpu())]
        terminated += out.terminated.tolist()
    return texts, ids, terminated


@torch.no_grad()
def heldout_gold_reward(model, tokenizer, dataset_name: str, n_prompts: int = 256, max_new_tokens: int = 16,
                        temperature: float = 0.0, accelerator=None, split: str = "test", batch_size: int = 256) -> dict:
    """Mean gold reward (exact match) on `n_prompts` held-out prompts of a toy dataset, greedy by default.
    Returns {} for non-toy datasets (no gold reward is known)."""
    task = data.toy_task(dataset_name)
    if task is None:
        return {}
    ds = data.load_data(dataset_name, split, toy_kind="prompt", n=n_prompts)
    prompts = list(ds["prompt"])
    texts, _, terminated = _generate(model, tokenizer, prompts, max_new_tokens, temperature, accelerator, batch_size)
    rewards = toy.gold_reward(task)(prompts, texts)
    return {"eval/gold_reward": sum(rewards) / len(rewards), "eval/terminated": sum(terminated) / len(terminated)}


@torch.no_grad()
def heldout_reward(model, tokenizer, eval_prompts_ds, reward_sources, dataset_name: str | None = None,
                   n_prompts: int | None = 256, max_new_tokens: int = 16, temperature: float = 0.0, accelerator=None,
                   batch_size: int = 256) -> dict:
    """The policy's held-out reward: one greedy completion (by default) per eval prompt (the first `n_prompts` rows
    of a 'prompt' dataset; other columns go to the reward sources, as in training), scored by `reward_sources`
    (a callable (prompts, completions, completion_ids, columns) -> (N, F) with NaN = not scored, with `.names` and
    `.weights`, e.g. rewards.RewardSources).

    Returns eval/reward (mean over the scored samples of the weighted sum over the sources that scored each one),
    eval/rewards/{name}/mean per source (NaN-aware), eval/terminated, and on toy datasets eval/gold_reward (the exact
    match of the same completions). {} when there is no eval set."""
    if eval_prompts_ds is None or len(eval_prompts_ds) == 0:
        return {}
    ds = eval_prompts_ds if n_prompts is None else eval_prompts_ds.select(range(min(n_prompts, len(eval_prompts_ds))))
    prompts = list(ds["prompt"])
    columns = {c: list(ds[c]) for c in ds.column_names if c != "prompt"}
    texts, ids, terminated = _generate(model, tokenizer, prompts, max_new_tokens, temperature, accelerator, batch_size)
    completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
    rpf = reward_sources(prompts, completions, ids, columns).float().cpu()  # (N, F), NaN = not scored
    weights = torch.as_tensor(reward_sources.weights, dtype=torch.float32).cpu()
    assert rpf.shape == (len(prompts), len(reward_sources.names)) and weights.shape == (rpf.shape[1],)
    scored = ~torch.isnan(rpf)
    total = torch.where(scored, rpf * weights, torch.zeros_like(rpf)).sum(1)  # (N,)
    any_scored = scored.any(1)
    out = {"eval/reward": total[any_scored].mean().item() if any_scored.any() else float("nan"),
           "eval/terminated": sum(terminated) / len(terminated)}
    for f, name in enumerate(reward_sources.names):
        col = rpf[scored[:, f], f]
        out[f"eval/rewards/{name}/mean"] = col.mean().item() if col.numel() else float("nan")
    task = data.toy_task(dataset_name) if dataset_name else None
    if task is not None:
        gold = [g for g in toy.gold_reward(task)(prompts, completions) if g is not None]
        out["eval/gold_reward"] = sum(gold) / len(gold) if gold else float("nan")
    return out
