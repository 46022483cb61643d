"""Reward sources: built-in toy rewards by name, user functions, and reward models.

A reward function follows the TRL convention:
    fn(prompts: list, completions: list, completion_ids: list[list[int]], **columns) -> list[float | None]
`prompts`/`completions` are strings (standard) or message lists (conversational); extra dataset columns arrive as
keyword arguments (one list entry per sample). Returning None for a sample means "does not apply": it becomes NaN.

Spec strings (`--reward_funcs`):
  add | reverse                 the toy tasks' exact-match gold rewards (common/toy.py)
  path/to/file.py:fn            a function in a Python file
  package.module:fn             a function in an importable module
  model:<name or dir>           a one-output sequence classifier (e.g. model:toy-rm)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

import torch


def load_function(spec: str):
    if spec in ("add", "reverse"):
        from common import toy

        return toy.gold_reward(spec)
    if ":" not in spec:
        raise ValueError(f"reward '{spec}': use a built-in name (add, reverse), 'path/to/file.py:fn', 'module:fn' "
                         "or 'model:<name or dir>'")
    fn = load_object(spec, "reward")
    if not callable(fn):
        raise ValueError(f"reward '{spec}': {spec.rsplit(':', 1)[0]} has no function '{spec.rsplit(':', 1)[1]}'")
    return fn


def load_object(spec: str, what: str = "reward"):
    """The attribute named by 'path/to/file.py:name' or 'package.module:name' (None if the module lacks it)."""
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"{what} '{spec}': file {path} not found")
        mod_spec = importlib.util.spec_from_file_location(f"user_{what}_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name, None)


class RewardModel:
    """A sequence classifier as a reward function: scores the prompt+completion text rendered with the reward
    model's own tokenizer (and chat template for conversational rows), read at the last real token."""

    def __init__(self, name: str, dataset_name: str = "toy:add", device="cpu", batch_size: int = 64):
        from common.model import load_reward_model

        self.model, self.tokenizer = load_reward_model(name, dataset_name)
        self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.__name__ = Path(str(name)).name

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        from common.data import completion_text, pad, prompt_text, tokenize
        from common.model import sequence_classifier_scores

        tok = self.tokenizer
        texts = [prompt_text(p, tok) + completion_text(p, c, tok) for p, c in zip(prompts, completions)]
        scores = []
        for s in range(0, len(texts), self.batch_size):
            ids, mask = pad(tokenize(tok, texts[s:s + self.batch_size]), tok.pad_token_id, "left")
            scores.append(sequence_classifier_scores(self.model, ids.to(self.device), mask.to(self.device)).cpu())
        return torch.cat(scores).tolist()


def load_reward_sources(specs: list[str], dataset_name: str = "toy:add", device="cpu") -> list:
    out = []
    for spec in specs:
        if spec.startswith("model:"):
            out.append(RewardModel(spec[len("model:"):], dataset_name, device))
        else:
            out.append(load_function(spec))
    return out


def reward_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def score(funcs: list, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict | None = None
          ) -> torch.Tensor:
    """Rewards (N, F): column f holds function f's rewards; None becomes NaN. `columns` holds the extra dataset
    columns, one entry per sample, passed as keyword arguments."""
    columns = columns or {}
    out = torch.full((len(prompts), len(funcs)), float("nan"))
    for f, fn in enumerate(funcs):
        vals = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(vals) != len(prompts):
            raise ValueError(f"reward function {reward_name(fn)} returned {len(vals)} values for {len(prompts)} samples")
        out[:, f] = torch.tensor([float("nan") if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
                                  for v in vals])
    return out
