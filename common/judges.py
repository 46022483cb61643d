"""Pairwise judges: given a prompt and two completions, say which one is preferred.

Interface (any object with this method works, so an external judge, e.g. an API-backed LLM judge, plugs in):
    judge(prompts: list, completion_pairs: list[tuple], return_scores: bool = False) -> list[int] | list[float]
With return_scores=False it returns, per prompt, the index (0 or 1) of the preferred completion. With
return_scores=True it returns the probability that the FIRST completion is preferred.

Spec strings (`--judge`):
  rm:<name or dir>           rank with a one-output sequence classifier (e.g. rm:toy-rm)
  fn:<reward spec>           rank with a reward function (a spec of common/rewards.py: add, file.py:fn, module:fn)
  path/to/file.py:Name       an object (or a class, instantiated without arguments) defined in a Python file
  package.module:Name        the same from an importable module
A judge built on scores prefers the first completion on ties and gives P(first) = sigmoid(s_0 - s_1) (Bradley-Terry).
Its scores are checked like every reward (common/rewards.py): a NaN, inf or non-number stops the run, naming the
source and a sample; `check_ranks` / `check_probabilities` do the same for any judge's output.
"""

from __future__ import annotations

import math

import torch


class RewardJudge:
    """A pairwise judge that scores both completions with a reward function or reward model and compares."""

    def __init__(self, reward_fn):
        self.reward_fn = reward_fn
        self.__name__ = f"judge[{getattr(reward_fn, '__name__', type(reward_fn).__name__)}]"

    def scores(self, prompts: list, completion_pairs: list) -> torch.Tensor:
        """(N, 2) scores of the two completions of each pair."""
        from common.rewards import score

        firsts = [p[0] for p in completion_pairs]
        seconds = [p[1] for p in completion_pairs]
        s = score([self.reward_fn], list(prompts) * 2, firsts + seconds, [[] for _ in range(2 * len(firsts))])[:, 0]
        if torch.isnan(s).any():
            raise ValueError(f"{self.__name__}: the reward returned None for some completions; a judge needs a score "
                             "for every completion")
        return torch.stack([s[: len(firsts)], s[len(firsts):]], 1)

    def judge(self, prompts: list, completion_pairs: list, return_scores: bool = False) -> list:
        s = self.scores(prompts, completion_pairs)
        if return_scores:
            return torch.sigmoid(s[:, 0] - s[:, 1]).tolist()
        return (s[:, 0] < s[:, 1]).long().tolist()  # ties -> 0 (the first completion)


def _load_object(spec: str):
    from common.rewards import load_object

    target, name = spec.rsplit(":", 1)
    obj = load_object(spec, "judge")
    if obj is None:
        raise ValueError(f"--judge {spec}: {target} has no attribute '{name}'")
    return obj() if isinstance(obj, type) else obj


def load_judge(spec: str, dataset_name: str = "toy:add", device="cpu"):
    """A pairwise judge from a spec string (see the module docstring)."""
    from common.rewards import RewardModel, load_function

    if spec.startswith("rm:"):
        return RewardJudge(RewardModel(spec[3:], dataset_name, device))
    if spec.startswith("fn:"):
        return RewardJudge(load_function(spec[3:]))
    if ":" not in spec:
        raise ValueError(f"--judge {spec}: use 'rm:<reward model>', 'fn:<reward function spec>', 'file.py:Name' or "
                         "'module:Name'")
    judge = _load_object(spec)
    if not callable(getattr(judge, "judge", None)):
        raise ValueError(f"--judge {spec}: the object has no judge(prompts, completion_pairs, return_scores) method")
    return judge


def check_ranks(ranks: list, n: int, name: str = "judge") -> torch.Tensor:
    """Validate a judge's output: n entries, each 0 or 1. Returns a (n,) bool tensor 'first completion preferred'."""
    if len(ranks) != n or any(r not in (0, 1) for r in ranks):
        raise ValueError(f"{name} must return {n} ranks, each 0 or 1; got {len(ranks)} values: {list(ranks)[:8]}...")
    return torch.tensor([r == 0 for r in ranks])


def check_probabilities(probs: list, n: int, name: str = "judge") -> torch.Tensor:
    """Validate a judge's probabilities P(first preferred): n finite numbers in [0, 1]. Returns (n,) float."""
    if len(probs) != n or any(not (isinstance(p, (int, float)) and math.isfinite(p) and 0 <= p <= 1) for p in probs):
        bad = next((p for p in probs if not (isinstance(p, (int, float)) and math.isfinite(p) and 0 <= p <= 1)),
                   None) if len(probs) == n else None
        raise ValueError(f"{name} must return {n} finite probabilities in [0, 1]; got {len(probs)} values"
                         + (f", among them {bad!r} ({type(bad).__name__})" if bad is not None else "")
                         + f": {list(probs)[:8]}...")
    return torch.tensor([float(p) for p in probs])
