"""Toy tasks for tool use and multi-turn environments (registered in common/toy.py as `toy:mul_tool`, `toy:guess`).

  mul_tool  "37*58="  -> "2146"   two-digit multiplication: the tiny model cannot do it alone, but can with `calc`:
            SFT trace (what sft.py trains the start policy on; the tool turn is part of it there):
                <tool>calc(37*58)</tool><eos><result>2146</result>2146
            for half the prompts, and the bare answer "2146" for the other half (chosen by a hash the model cannot
            compute), so the start policy calls the tool about half the time and answers the rest on its own
            run with:  python algos/grpo.py --dataset_name toy:mul_tool --tools common.toy_agents:calc
  guess     "guess0412=" -> guess a secret digit 0-9 (a hash of the game id, so the prompt does not reveal it) with
            higher/lower feedback from `GuessEnv`; SFT traces: binary search (at most 4 guesses)
                4<eos><obs>hi</obs>7<eos><obs>lo</obs>5<eos><obs>hi</obs>6
            for 40% of the prompts, and for the other 60% (chosen by a hash the model cannot compute) a scan upwards
            from 0 that stops after 4 guesses (the SFT sequences stay within the toy model's 64 positions), so it
            finds only the secrets 0-3
                0<eos><obs>hi</obs>1<eos><obs>hi</obs>2
            so the start policy knows the format but mostly scans (greedy, it opens with 0): more turns, a lower
            environment reward, and misses; RL has room to move it to binary search
            run with:  python algos/grpo.py --dataset_name toy:guess --environment common.toy_agents:GuessEnv
Both gold rewards read the final answer: the text after the last </result> or </obs> (the whole text if none), so a
direct answer without a tool call counts too.
"""

from __future__ import annotations

import ast
import operator
import random
import re
import zlib

TASKS = ("mul_tool", "guess")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calc(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with + - * / // % and parentheses, e.g. calc(37*58) -> 2146.

    Args:
        expression: the expression to evaluate
    """
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"calc only does integer arithmetic, not {ast.dump(node)[:60]}")

    value = ev(ast.parse(str(expression).strip(), mode="eval").body)
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _in_test_split(key: str) -> bool:
    return zlib.crc32(key.encode()) % 10 == 0


def secret(prompt: str) -> int | None:
    m = re.findall(r"guess(\d{4})=", prompt)
    return zlib.crc32(f"secret{m[-1]}".encode()) % 10 if m else None


def _scan_trace(s: int, most: int = 4) -> str:
    guesses = list(range(min(s, most - 1) + 1))
    return "".join(f"{g}<eos><obs>hi</obs>" for g in guesses[:-1]) + str(guesses[-1])


def _binary_search_trace(s: int) -> str:
    lo, hi, parts = 0, 9, []
    while True:
        g = (lo + hi) // 2
        if g == s:
            return "".join(parts) + str(g)
        parts.append(f"{g}<eos><obs>{'hi' if s > g else 'lo'}</obs>")
        lo, hi = (g + 1, hi) if s > g else (lo, g - 1)


def problems(task: str, split: str):
    """(prompt, SFT completion) pairs of a split, fixed order; train and test never overlap."""
    test = split == "test"
    if task == "mul_tool":
        pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if _in_test_split(f"{a}*{b}") == test]
        random.Random(0).shuffle(pairs)
        # half the traces (a hash of the prompt, which the model cannot compute) answer directly, so the start
        # policy calls the tool about half the time and RL has room to raise tool use and accuracy
        return [(f"{a}*{b}=", f"<tool>calc({a}*{b})</tool><eos><result>{a * b}</result>{a * b}"
                 if zlib.crc32(f"direct{a}*{b}".encode()) % 2 == 0 else str(a * b)) for a, b in pairs]
    if task == "guess":
        ids = [i for i in range(10000) if _in_test_split(f"guess{i:04d}") == test]
        random.Random(0).shuffle(ids)
        return [(f"guess{i:04d}=", (_binary_search_trace if zlib.crc32(f"search{i:04d}".encode()) % 5 < 2
                                    else _scan_trace)(secret(f"guess{i:04d}="))) for i in ids]
    raise ValueError(f"unknown toy agent task '{task}'; choose one of {TASKS}")


def solve(task: str, prompt: str) -> str | None:
    if task == "mul_tool":
        m = re.findall(r"(\d+)\*(\d+)=", prompt)
        return str(int(m[-1][0]) * int(m[-1][1])) if m else None
    if task == "guess":
        s = secret(prompt)
        return None if s is None else str(s)
    raise ValueError(f"unknown toy agent task '{task}'")


def final_answer(text: str) -> str:
    """The text after the last tool result or observation, without EOS, stripped."""
    text = text.replace("<eos>", "")
    cut = max(text.rfind("</result>") + len("</result>") if "</result>" in text else 0,
              text.rfind("</obs>") + len("</obs>") if "</obs>" in text else 0)
    return text[cut:].strip()


def gold_reward(task: str):
    """Exact match of the final answer (TRL calling convention)."""
    from common.toy import _prompt_text, _text

    def reward(prompts, completions, **kwargs):
        out = []
        for p, c in zip(prompts, completions):
            ans = solve(task, _prompt_text(p))
            out.append(None if ans is None else float(final_answer(_text(c)) == ans))
        return out

    reward.__name__ = f"{task}_exact"
    return reward


class GuessEnv:
    """Guess the secret digit of a `toy:guess` prompt: each turn's text is a guess; the reply is 'hi' (the secret
    is higher), 'lo' or, for a turn that is not a digit, '?'. Rewards: 1 for the correct guess (episode done),
    -0.1 for every other turn (a per-turn reward), so fewer guesses score more."""

    def reset(self, row: dict):
        from common.toy import _prompt_text

        self.secret = secret(_prompt_text(row["prompt"]))
        if self.secret is None:
            raise ValueError(f"GuessEnv needs toy:guess prompts ('guess0412='), got {row['prompt']!r}")
        return None  # the prompt is the first observation

    def step(self, text: str):
        t = text.replace("<eos>", "").strip()
        if not t.isdigit():
            return "?", -0.1, False
        if int(t) == self.secret:
            return None, 1.0, True
        return ("hi" if self.secret > int(t) else "lo"), -0.1, False
