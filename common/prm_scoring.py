"""Process reward models (PRMs) as reward sources: a two-class token classifier trained by algos/prm.py reads each
step of a completion at the step separator, and the completion's reward aggregates the steps' probabilities of being
correct.

Specs (`--reward_funcs`, routed here by common/rewards.py):
  prm:<name or dir>        minimum over the steps (the default)
  prm:min:<name or dir>    the same, explicitly
  prm:prod:<name or dir>   product over the steps
  prm:last:<name or dir>   the last step's probability
A `model:` spec is for one-output sequence classifiers (outcome reward models); a PRM folder given there is refused
with a message pointing here (common/rewards.py does not load token classifiers as sequence classifiers).

Steps: the completion text is split at the PRM's step separator (`step_separator` in its config.json, written by
prm.py; "\\n" if absent). Empty pieces after the last separator are dropped (a completion ending with the separator
has no empty last step); an empty completion is one empty step. The layout is the one prm.py trains on: the rendered
prompt (common/data.prompt_text), then each step tokenised on its own followed by the separator's tokens; the
probability is read at the last separator token of each step, where training put the labels (tested against
prm.py's labels). "correct" is the class named so in config.label2id (prm.py writes it), else class 1.

Aggregation: min, as Math-Shepherd (Wang et al., arXiv 2312.08935) scores a solution by its worst step; prod, the
probability that every step is correct if the steps were independent, as "Let's Verify Step by Step" (Lightman et
al., arXiv 2305.20050); last, the final step's probability. No truncation: a completion longer than the PRM's
context is the caller's to cut.
"""

from __future__ import annotations

from pathlib import Path

import torch

AGGREGATIONS = ("min", "prod", "last")


def parse_spec(spec: str) -> tuple[str, str]:
    """'prm:[min:|prod:|last:]<name or dir>' -> (name, aggregation)."""
    rest = spec[len("prm:"):] if spec.startswith("prm:") else spec
    head, _, tail = rest.partition(":")
    if head in AGGREGATIONS and tail:
        return tail, head
    if not rest:
        raise ValueError(f"reward '{spec}': give a PRM folder or name, e.g. 'prm:runs/my_prm' or "
                         "'prm:prod:runs/my_prm'")
    return rest, "min"


def split_steps(text: str, separator: str) -> list[str]:
    """The steps of a completion: pieces between separators, empty trailing pieces dropped, at least one step."""
    pieces = text.split(separator)
    while len(pieces) > 1 and pieces[-1] == "":
        pieces.pop()
    return pieces


def step_layout(tokenizer, prompt, steps: list[str], separator: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + (step + separator) for every step, and the position of each step's last separator
    token (where prm.py puts that step's label)."""
    from common import data

    sep_ids = data.tokenize(tokenizer, [separator])[0]
    ids = data.tokenize(tokenizer, [data.prompt_text(prompt, tokenizer)])[0]
    positions = []
    for step_ids in data.tokenize(tokenizer, steps) if steps else []:
        ids = ids + step_ids + sep_ids
        positions.append(len(ids) - 1)
    return ids, positions


def aggregate(probs: torch.Tensor, how: str = "min") -> float:
    """One score from the (S,) step probabilities."""
    if how == "min":
        return probs.min().item()
    if how == "prod":
        return probs.prod().item()
    if how == "last":
        return probs[-1].item()
    raise ValueError(f"PRM aggregation '{how}': choose one of {AGGREGATIONS}")


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: the assistant message's content
        return completion[-1]["content"] if completion else ""
    return completion


class ProcessRewardModel:
    """A PRM as a reward function (TRL convention): fn(prompts, completions, **columns) -> list[float]."""

    def __init__(self, name: str, dataset_name: str = "toy:add", device="cpu", aggregation: str = "min",
                 batch_size: int = 64):
        from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

        from common.model import check_model_folder, resolve

        if aggregation not in AGGREGATIONS:
            raise ValueError(f"PRM aggregation '{aggregation}': choose one of {AGGREGATIONS}")
        path = resolve(name, dataset_name)
        check_model_folder(path, f"reward 'prm:{name}'")
        config = AutoConfig.from_pretrained(path)
        archs = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForTokenClassification") for a in archs) or config.num_labels != 2:
            raise ValueError(f"reward 'prm:{name}': {path} holds {archs or 'a model'} with {config.num_labels} "
                             "labels, not a two-class token classifier; train a process reward model with "
                             "algos/prm.py (a one-output sequence classifier is a 'model:' reward)")
        self.model = AutoModelForTokenClassification.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.separator = getattr(config, "step_separator", None) or "\n"
        self.correct = {str(k).lower(): int(v) for k, v in (config.label2id or {}).items()}.get("correct", 1)
        self.aggregation, self.device, self.batch_size = aggregation, device, batch_size
        self.__name__ = Path(str(name)).name

    @torch.no_grad()
    def step_probabilities(self, prompts: list, completions: list) -> list[torch.Tensor]:
        """P(correct) of every step, one (S_i,) tensor per completion."""
        from common.data import pad
        from common.model import position_ids_from_mask

        layouts = [step_layout(self.tokenizer, p, split_steps(_text(c), self.separator), self.separator)
                   for p, c in zip(prompts, completions)]
        out = []
        for s in range(0, len(layouts), self.batch_size):
            chunk = layouts[s:s + self.batch_size]
            ids, mask = pad([ids for ids, _ in chunk], self.tokenizer.pad_token_id, "right")
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            probs = torch.softmax(logits.float(), -1)[..., self.correct].cpu()  # (b, L)
            out += [probs[i, positions] for i, (_, positions) in enumerate(chunk)]
        return out

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [aggregate(p, self.aggregation) for p in self.step_probabilities(prompts, completions)]


def refuse_token_classifier(name: str, dataset_name: str = "toy:add"):
    """A 'model:' spec naming a local PRM folder: an error pointing to the 'prm:' spec (instead of transformers'
    size-mismatch error when it loads a two-class token head as a one-output sequence head)."""
    import json

    from common.model import resolve

    config = Path(resolve(name, dataset_name)) / "config.json"
    if config.is_file():
        archs = json.loads(config.read_text()).get("architectures") or []
        if any(a.endswith("ForTokenClassification") for a in archs):
            raise ValueError(f"reward 'model:{name}' is a token classifier ({archs[0]}), a process reward model: "
                             f"pass it as 'prm:{name}' (minimum over its steps; 'prm:prod:{name}' for the product)")
