"""The built-in toy world: a char-level tokenizer, a tiny Llama-type decoder and tasks with checkable answers.

Everything here is generated locally and deterministically, so every script runs with no model or dataset hub.

Tasks (each has a gold reward that parses the prompt, so no extra column is needed to score a completion):
  add      "37+58="      -> "95"      two numbers in [0, 99]
  reverse  "reverse:abc=" -> "cba"    3 to 6 lowercase letters

Dataset types made by `make_dataset` (standard strings, or conversational lists of {"role", "content"}):
  lm                        text / messages
  prompt                    prompt (+ answer)
  prompt_completion         prompt, completion
  preference                prompt, chosen, rejected       (rejected is a plausible wrong answer)
  unpaired                  prompt, completion, label
  prompt_completion_reward  prompt, completions[K], rewards[K]
  stepwise                  prompt, completions[steps], labels[steps]
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TASKS = ("add", "reverse")
AGENT_TASKS = ("mul_tool", "guess")  # common/toy_agents.py
DATASET_TYPES = ("lm", "prompt", "prompt_completion", "preference", "unpaired", "prompt_completion_reward", "stepwise")


# ----------------------------------------------------------------------------- tokenizer and model
def make_tokenizer():
    """Character-level fast tokenizer over printable ASCII and newline, with special tokens and a chat template.
    Like Llama's, `tok(text)` starts with <bos> (a post-processor adds it), so a saved folder loaded with
    `AutoTokenizer.from_pretrained` gives the ids training used; the chat template writes its own <bos>."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    # BPE with no merges splits text into single characters: one token per character.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    bos_id = vocab["<bos>"]
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", bos_id)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        padding_side="left",  # saved with the folder: batched `generate` on prompts needs left padding
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_config(tokenizer, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, max_positions: int = 64):
    """A Llama-type config (its folder round-trips through AutoTokenizer and vLLM). Default: about 0.8M parameters."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# ----------------------------------------------------------------------------- tasks
def _in_test_split(key: str) -> bool:
    return zlib.crc32(key.encode()) % 10 == 0  # 10% of the problem space is held out, fixed forever


def _add_problems(split: str):
    pairs = [(a, b) for a in range(100) for b in range(100)]
    pairs = [p for p in pairs if _in_test_split(f"{p[0]}+{p[1]}") == (split == "test")]
    random.Random(0).shuffle(pairs)
    return [(f"{a}+{b}=", str(a + b)) for a, b in pairs]


def _reverse_problems(split: str, n: int = 6000):
    rng, out, seen = random.Random(1), [], set()
    while len(out) < n:
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        if s in seen or _in_test_split(s) != (split == "test"):
            continue
        seen.add(s)
        out.append((f"reverse:{s}=", s[::-1]))
    return out


def problems(task: str, split: str):
    """All (prompt, answer) pairs of a task's split, in a fixed order. Train and test never overlap."""
    if task in AGENT_TASKS:  # tool-use and multi-turn tasks: common/toy_agents.py
        from common import toy_agents

        return toy_agents.problems(task, split)
    if task == "add":
        return _add_problems(split)
    if task == "reverse":
        return _reverse_problems(split, n=6000 if split == "train" else 600)
    raise ValueError(f"unknown toy task '{task}'; choose one of {TASKS}")


def solve(task: str, prompt: str) -> str | None:
    """The correct answer for a prompt (standard text, or the rendered chat text that contains it)."""
    if task in AGENT_TASKS:
        from common import toy_agents

        return toy_agents.solve(task, prompt)
    if task == "add":
        m = re.findall(r"(\d+)\+(\d+)=", prompt)
        return str(int(m[-1][0]) + int(m[-1][1])) if m else None
    if task == "reverse":
        m = re.findall(r"reverse:([a-z]+)=", prompt)
        return m[-1][::-1] if m else None
    raise ValueError(f"unknown toy task '{task}'")


def wrong_answer(task: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: one digit/letter changed, an off-by-one, or a near miss."""
    while True:
        if task == "add":
            v = int(answer)
            cand = str(max(0, v + rng.choice([-10, -2, -1, 1, 2, 10])))
        else:
            s = list(answer)
            kind = rng.random()
            if kind < 0.4 and len(s) > 1:
                i = rng.randrange(len(s) - 1)
                s[i], s[i + 1] = s[i + 1], s[i]
            elif kind < 0.7:
                s[rng.randrange(len(s))] = rng.choice("abcdefghijklmnopqrstuvwxyz")
            else:
                s = s[::-1]  # the unreversed string
            cand = "".join(s)
        if cand != answer:
            return cand


def _text(content):
    """Content of a completion: a string, or the assistant message of a conversational completion."""
    if isinstance(content, list):
        return content[-1]["content"] if content else ""
    return content


def _prompt_text(prompt):
    if isinstance(prompt, list):
        return "\n".join(m["content"] for m in prompt)
    return prompt


def gold_reward(task: str):
    """The task's exact-match reward with the TRL calling convention: f(prompts, completions, **kwargs) -> list."""
    if task in AGENT_TASKS:  # the final answer after the tool / environment turns
        from common import toy_agents

        return toy_agents.gold_reward(task)

    def reward(prompts, completions, **kwargs):
        out = []
        for p, c in zip(prompts, completions):
            ans = solve(task, _prompt_text(p))
            text = _text(c).replace("<eos>", "").strip()
            out.append(None if ans is None else float(text == ans))
        return out

    reward.__name__ = f"{task}_exact"
    return reward


# ----------------------------------------------------------------------------- datasets
def make_dataset(task: str = "add", kind: str = "prompt", split: str = "train", conversational: bool = False,
                 n: int | None = None, k: int = 4, seed: int = 0):
    """Build a toy `datasets.Dataset` of one of DATASET_TYPES, deterministically from (task, split, seed)."""
    from datasets import Dataset

    if kind not in DATASET_TYPES:
        raise ValueError(f"unknown toy dataset type '{kind}'; choose one of {DATASET_TYPES}")
    probs = problems(task, split)
    if n is not None:
        probs = probs[:n]
    rng = random.Random(seed * 1000 + (0 if split == "train" else 1))

    def P(x):  # prompt in the requested format
        return [{"role": "user", "content": x}] if conversational else x

    def C(x):  # completion in the requested format
        return [{"role": "assistant", "content": x}] if conversational else x

    rows = []
    for prompt, ans in probs:
        if kind == "lm":
            rows.append({"messages": [*P(prompt), *C(ans)]} if conversational else {"text": prompt + ans})
        elif kind == "prompt":
            rows.append({"prompt": P(prompt), "answer": ans})
        elif kind == "prompt_completion":
            rows.append({"prompt": P(prompt), "completion": C(ans)})
        elif kind == "preference":
            rows.append({"prompt": P(prompt), "chosen": C(ans), "rejected": C(wrong_answer(task, ans, rng))})
        elif kind == "unpaired":
            good = rng.random() < 0.5
            rows.append({"prompt": P(prompt), "completion": C(ans if good else wrong_answer(task, ans, rng)),
                         "label": good})
        elif kind == "prompt_completion_reward":
            comps = [ans] + [wrong_answer(task, ans, rng) for _ in range(k - 1)]
            rng.shuffle(comps)
            rows.append({"prompt": P(prompt), "completions": [C(c) for c in comps],
                         "rewards": [float(c == ans) for c in comps]})
        elif kind == "stepwise":
            # one step per answer character; an error injected at step j makes labels False from j on
            wrong = wrong_answer(task, ans, rng) if rng.random() < 0.5 else ans
            steps, labels, ok = [], [], True
            for i, ch in enumerate(wrong):
                ok = ok and i < len(ans) and ans[i] == ch
                steps.append(ch)
                labels.append(ok)
            rows.append({"prompt": P(prompt), "completions": steps, "labels": labels})
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------- cached default models
# Bump when the recipe of a cached default model changes, so stale caches are never reused.
CACHE_VERSION = "v4"


def cache_dir() -> Path:
    return Path(os.environ.get("CLEANALIGN_CACHE", REPO_ROOT / ".cache"))


def _build_once(name: str, cmd: list[str], what: str) -> Path:
    """Run a script once to build a default model into the cache, guarded by a file lock across processes."""
    import fcntl

    name = f"{name}-{CACHE_VERSION}"
    out = cache_dir() / name
    done = out / ".built"  # written only after the build finished, so a crash never leaves a "complete" cache
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks wait here while one builds
        if not done.exists():
            print(f"[cleanalign] building the {what} once into {out} (one-time, about two minutes on 2 CPU cores)",
                  flush=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK",
                                                                              "WORLD_SIZE", "MASTER_"))}
            env["OMP_NUM_THREADS"] = "1"  # the same floating-point path on every machine: the same model
            subprocess.run([sys.executable, *cmd, "--output_dir", str(out), "--save_steps", "0",
                            "--run_name", name, "--overwrite_output_dir", "True"],  # replaces a crashed build's files
                           check=True, cwd=REPO_ROOT, env=env)
            done.write_text("ok\n")
    return out


START_POLICY_STEPS = 475  # of sft.py's 1000-step default run: about 0.47 held-out exact match on toy:add


def toy_policy_path(task: str = "add") -> Path:
    """The default starting policy of the RL scripts: algos/sft.py's default run on `task` stopped after a fixed
    START_POLICY_STEPS of its 1000 steps (same learning-rate schedule), half-trained so RL has room to improve. A
    fixed step count (not "stop at an accuracy") keeps the policy the same on every machine up to float rounding."""
    return _build_once(f"toy-sft-{task}", ["algos/sft.py", "--dataset_name", f"toy:{task}", "--max_steps",
                                           str(START_POLICY_STEPS), "--lr_decay_steps", "1000", "--eval_steps", "25",
                                           "--logging_steps", "25"], f"toy SFT policy ({task})")


def toy_sft_full_path(task: str = "add") -> Path:
    """algos/sft.py's full default run (near-perfect on the task): the backbone the toy reward model starts from."""
    return _build_once(f"toy-sft-full-{task}", ["algos/sft.py", "--dataset_name", f"toy:{task}"],
                       f"fully trained toy SFT model ({task})")


def toy_reward_model_path(task: str = "add") -> Path:
    """The default toy reward model: algos/reward.py's default run on the task's preference pairs."""
    return _build_once(f"toy-rm-{task}", ["algos/reward.py", "--dataset_name", f"toy:{task}"], f"toy reward model ({task})")
