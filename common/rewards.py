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
  prm:[min:|prod:|last:]<dir>   a process reward model from algos/prm.py (common/prm_scoring.py; default min)

`RewardSources` is what the scripts use: the sources of a spec list, their weights (checked once), scoring into an
(N, F) tensor with every value checked (a NaN or inf, a non-number or a wrong count stops the run at that step,
naming the source and one sample, before any update), per-source metrics with TRL's names, and a one-time warning
when no reward varies at all.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from pathlib import Path

import torch


class RewardError(ValueError):
    """A reward source returned something that is not a finite number or None (or the wrong number of values)."""


def default_specs(reward_funcs: list[str] | str | None, reward_model_name_or_path: str | None,
                  dataset_name: str) -> list[str]:
    """The reward sources of a run, one rule for every script: the --reward_funcs specs, then the reward model
    (`model:<name>`) if --reward_model_name_or_path is set; when neither is given, the toy task's gold reward on a
    toy dataset, and an error naming both flags on any other dataset."""
    specs = [reward_funcs] if isinstance(reward_funcs, str) else list(reward_funcs or [])
    if reward_model_name_or_path:
        specs.append(f"model:{reward_model_name_or_path}")
    if not specs:
        from common.data import toy_task

        task = toy_task(dataset_name)
        if task is None:
            raise ValueError(f"no reward for dataset '{dataset_name}': pass --reward_funcs (e.g. "
                             "'my_rewards.py:accuracy') and/or --reward_model_name_or_path DIR (only the toy datasets "
                             "have a default reward, their gold reward)")
        specs = [task]
    return specs


def check_weights(specs: list[str], weights: list[float] | None) -> torch.Tensor:
    """(F,) float weights, one per reward source (default all 1); an error naming --reward_weights otherwise."""
    if weights is None:
        return torch.ones(len(specs))
    if len(weights) != len(specs):
        raise ValueError(f"--reward_weights has {len(weights)} values but there are {len(specs)} reward sources "
                         f"({', '.join(specs)}); give one weight per source, in that order")
    if not all(math.isfinite(float(w)) for w in weights):
        raise ValueError(f"--reward_weights must be finite numbers; got {list(weights)}")
    return torch.tensor([float(w) for w in weights])


def load_function(spec: str):
    if spec in ("add", "reverse", "mul_tool", "guess"):  # toy gold rewards (the last two: common/toy_agents.py)
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
        if spec.startswith("prm:"):  # process reward models: common/prm_scoring.py
            from common.prm_scoring import ProcessRewardModel, parse_spec

            name, how = parse_spec(spec)
            out.append(ProcessRewardModel(name, dataset_name, device, aggregation=how))
        elif spec.startswith("model:"):
            from common.prm_scoring import refuse_token_classifier

            refuse_token_classifier(spec[len("model:"):], dataset_name)
            out.append(RewardModel(spec[len("model:"):], dataset_name, device))
        else:
            out.append(load_function(spec))
    return out


def reward_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _short(x, n: int = 200) -> str:
    text = repr(x)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


def _sample(prompts: list, completions: list, i: int) -> str:
    return f"sample {i}: prompt {_short(prompts[i])}, completion {_short(completions[i])}"


def check_values(vals, name: str, prompts: list, completions: list) -> torch.Tensor:
    """One source's output -> (N,) float64 with NaN for None; RewardError for a wrong count, a non-number, NaN or inf
    (naming the source, e.g. "reward function 'accuracy'", and the first offending sample)."""
    n = len(prompts)
    if isinstance(vals, torch.Tensor) or hasattr(vals, "tolist"):  # a tensor or numpy array
        vals = vals.tolist()
    if isinstance(vals, (str, bytes)) or not hasattr(vals, "__len__"):
        raise RewardError(f"{name} returned a {type(vals).__name__}, not a list of {n} values (one float or "
                          "None per sample)")
    if len(vals) != n:
        raise RewardError(f"{name} returned {len(vals)} values for {n} samples (one float or None per sample)")
    out = torch.empty(n, dtype=torch.float64)
    for i, v in enumerate(vals):
        if v is None:
            out[i] = float("nan")
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise RewardError(f"{name} returned a value of type {type(v).__name__} ({_short(v, 60)}) for "
                              f"{_sample(prompts, completions, i)}; a reward must be a float (or None: not scored). "
                              "Convert it, e.g. float(...)")
        if not math.isfinite(float(v)):
            raise RewardError(f"{name} returned {float(v)} for {_sample(prompts, completions, i)}; rewards must "
                              "be finite (return None for a sample the function does not score). Stopped before "
                              "the update")
        out[i] = float(v)
    return out


def score(funcs: list, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict | None = None,
          names: list[str] | None = None) -> torch.Tensor:
    """Rewards (N, F): column f holds function f's rewards; None becomes NaN; every value is checked
    (`check_values`). `columns` holds the extra dataset columns, one entry per sample, passed as keyword arguments."""
    columns = columns or {}
    names = names or [reward_name(fn) for fn in funcs]
    out = torch.full((len(prompts), len(funcs)), float("nan"))
    for f, fn in enumerate(funcs):
        vals = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        label = f"{'reward model' if isinstance(fn, RewardModel) else 'reward function'} '{names[f]}'"
        out[:, f] = check_values(vals, label, prompts, completions).float()
    return out


class RewardSources:
    """The reward sources of a run: `.names` (unique, for metrics), `.weights` (F,), `sources(...) -> (N, F)`."""

    def __init__(self, specs: list[str], weights: list[float] | None, dataset_name: str = "toy:add", device="cpu"):
        self.specs = list(specs)
        self.weights = check_weights(self.specs, weights)  # before anything is loaded
        self.funcs = load_reward_sources(self.specs, dataset_name, device)
        names = [reward_name(fn) for fn in self.funcs]
        self.names = [n if names.count(n) == 1 else f"{n}_{names[:i + 1].count(n)}" for i, n in enumerate(names)]
        self._checked = False

    def __len__(self) -> int:
        return len(self.funcs)

    @property
    def checked(self) -> bool:
        """True once check_varies has run."""
        return self._checked

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 columns: dict | None = None) -> torch.Tensor:
        """(N, F) float32 rewards, NaN = not scored; RewardError for NaN/inf/non-numbers/wrong counts."""
        return score(self.funcs, prompts, completions, completion_ids, columns, self.names)

    def metrics(self, rpf_all: torch.Tensor) -> dict:
        """rewards/{name}/mean and /std (Bessel-corrected) over the scored samples of (N, F) rewards (NaN-aware)."""
        assert rpf_all.dim() == 2 and rpf_all.shape[1] == len(self.names)
        out = {}
        for f, name in enumerate(self.names):
            col = rpf_all[:, f][~torch.isnan(rpf_all[:, f])].double()
            out[f"rewards/{name}/mean"] = col.mean().item() if col.numel() else float("nan")
            out[f"rewards/{name}/std"] = col.std().item() if col.numel() > 1 else 0.0
        return out

    def check_varies(self, rewards_all: torch.Tensor | list[torch.Tensor], is_main_process: bool = True) -> str | None:
        """Call once, on the (N, F) rewards of the first logging window (a tensor or a list of them). When no source
        gave two different values (each scored every sample alike, or none), print one loud warning naming the
        sources and return it; otherwise None. Later calls do nothing."""
        if self._checked:
            return None
        self._checked = True
        r = torch.cat(list(rewards_all)) if isinstance(rewards_all, (list, tuple)) else rewards_all
        what = []
        for f, name in enumerate(self.names):
            col = r[:, f][~torch.isnan(r[:, f])]
            if col.numel() and col.max() > col.min():
                return None
            what.append(f"{name} ({self.specs[f]}) scored no sample (None for all)" if not col.numel() else
                        f"{name} ({self.specs[f]}) gave {col[0].item():g} to every scored sample")
        msg = ("\n" + "!" * 100 + f"\nWARNING: no reward varied over the first {r.shape[0]} samples: "
               + "; ".join(what) + ".\nEvery advantage is 0, so the policy will not learn. Check the reward "
               "function on a few completions by hand. A common cause: comparing the completion (a string) with an "
               "answer column of another type (e.g. an int from a CSV), so it never matches.\n" + "!" * 100)
        if is_main_process:
            print(msg, file=sys.stderr, flush=True)
        return msg
