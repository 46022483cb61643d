"""Multi-turn rollouts with tools and environments (plumbing: nothing here changes a loss).

An episode is the prompt, then turns: the policy samples a turn (up to max_new_tokens, ending with EOS), then either
  tools        the turn's tool calls run (each in a forked child with a time limit and an output-size limit); their
               results are appended as one tool turn and the policy continues, or the episode ends when the turn
               calls no tool (that turn is the answer);
  environment  `env.step(turn_text) -> (observation | None, reward | None, done)`; the observation is appended and
               the policy continues until done, no observation, or max_turns.
A turn that hits max_new_tokens without EOS, or max_turns turns without an ending, truncates the episode.

Token layout of sample i (row i*G + j = sample j of prompt i, as in single-turn generation):
    [prompt | (o_0) | a_1 | o_1 | ... | a_K]         a_k: the policy's sampled ids, kept as sampled (never decoded
                                                      and re-tokenised); o_k: the tool/environment turn's ids
                                                      (o_0: an environment's first observation, if any)
completion_mask = 1 on every a and o token (what the model attends to); policy_mask = 1 on a tokens only. Scripts
train on completion_mask * policy_mask, so tool and environment tokens get no loss and no KL.

Tool-call formats (`parse_tool_calls`):
  tagged (standard prompts, the toy tokenizer):  <tool>calc(37*58)</tool>   arguments: Python literals
                                                 (f(1, "a", k=2)), or the raw text when the tool has one parameter
  json (chat templates that know <tool_call>, e.g. Qwen, Hermes):
                                                 <tool_call>{"name": "calc", "arguments": {"expression": "37*58"}}</tool_call>
Observation turns: standard prompts get `<result>TEXT</result>` (tool) and `<obs>TEXT</obs>` (environment);
conversational prompts get the chat template's own tool / user turn (the text between the policy's EOS and the next
assistant header).

Flags the online scripts share (--tools, --environment, --agent_command, --max_turns, --tool_timeout,
--max_tool_output_chars):
  --tools my_tools.py:calculator pkg.mod:fn     plain functions; name, signature and docstring describe them
  --environment my_env.py:Env                   a class: Env() per episode, reset(row) -> first observation (str or
                                                None), step(text) -> (observation | None, reward | None, done)
  --agent_command "python my_agent.py"          an agent program that talks to the policy through an
                                                OpenAI-compatible endpoint (ExternalAgent, common/agent_server.py)
Metrics (`episode_metrics`, reduced over processes): agents/turns_per_episode, agents/tool_calls_per_episode,
agents/tool_failures_per_episode, agents/truncated_ratio, agents/trained_token_fraction (policy tokens / all
completion tokens), tools/call_frequency (calls per episode) and tools/failure_frequency (failed calls / calls).
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import multiprocessing
import re
from dataclasses import dataclass, field

import torch

from common.data import pad

TAGGED_CALL = re.compile(r"<tool>\s*([A-Za-z_]\w*)\s*\((.*?)\)\s*</tool>", re.S)
JSON_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
ENV_REWARD_SPEC = "common.agents:environment_reward"


# ----------------------------------------------------------------------------- tools
def load_tools(specs: list[str] | None) -> dict:
    """{name: function} from 'path/file.py:fn' / 'module:fn' specs; errors name --tools and the fix."""
    from common.rewards import load_object

    tools = {}
    for spec in specs or []:
        if ":" not in spec:
            raise ValueError(f"--tools {spec!r}: give 'path/to/file.py:function' or 'package.module:function'")
        try:
            fn = load_object(spec, "tool")
        except (FileNotFoundError, ImportError) as e:
            raise ValueError(f"--tools {spec!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"--tools {spec!r}: {spec.rsplit(':', 1)[0]} has no function '{spec.rsplit(':', 1)[1]}'")
        if fn.__name__ in tools:
            raise ValueError(f"--tools: two tools are named '{fn.__name__}'; tool names must be unique")
        tools[fn.__name__] = fn
    return tools


def load_environment(spec: str | None):
    """The environment class named by --environment ('path/file.py:Env' or 'module:Env'), checked for reset/step."""
    if not spec:
        return None
    from common.rewards import load_object

    if ":" not in spec:
        raise ValueError(f"--environment {spec!r}: give 'path/to/file.py:ClassName' or 'package.module:ClassName'")
    try:
        cls = load_object(spec, "environment")
    except (FileNotFoundError, ImportError) as e:
        raise ValueError(f"--environment {spec!r}: {e}") from e
    if cls is None or not all(callable(getattr(cls, m, None)) for m in ("reset", "step")):
        raise ValueError(f"--environment {spec!r}: need a class with reset(row) -> observation and "
                         "step(assistant_text) -> (observation | None, reward | None, done)")
    return cls


def describe_tools(tools: dict) -> str:
    """One line per tool, 'name(signature): first docstring line' (for a system prompt)."""
    return "\n".join(f"{n}{inspect.signature(f)}: {(inspect.getdoc(f) or '').splitlines()[0] if f.__doc__ else ''}"
                     for n, f in tools.items())


def uses_json_calls(tokenizer) -> bool:
    """The chat template's tool-call format is <tool_call>{json}</tool_call> (Qwen, Hermes); else the tagged one."""
    return "<tool_call>" in str(getattr(tokenizer, "chat_template", "") or "")


def parse_tool_calls(text: str, json_format: bool = False) -> list[tuple[str, str | dict]]:
    """[(name, raw argument text or JSON arguments dict)] of the calls in one assistant turn, in order."""
    if json_format:
        calls = []
        for m in JSON_CALL.finditer(text):
            try:
                obj = json.loads(m.group(1))
                calls.append((str(obj.get("name", "")), obj.get("arguments", {}) or {}))
            except (json.JSONDecodeError, AttributeError):
                calls.append(("", m.group(1)))  # malformed: becomes an error turn
        return calls
    return [(m.group(1), m.group(2).strip()) for m in TAGGED_CALL.finditer(text)]


def _call_args(fn, raw):
    """(args, kwargs) for fn from a JSON dict or tagged argument text."""
    if isinstance(raw, dict):
        return [], raw
    try:
        call = ast.parse(f"f({raw})", mode="eval").body
        return ([ast.literal_eval(a) for a in call.args],
                {k.arg: ast.literal_eval(k.value) for k in call.keywords})
    except (SyntaxError, ValueError):
        if len(inspect.signature(fn).parameters) == 1:
            return [raw], {}
        raise ValueError(f"cannot parse the arguments {raw!r}; write Python literals, e.g. f(1, 'a', k=2)")


def _child(conn, fn, args, kwargs, limit):
    try:
        out = str(fn(*args, **kwargs))
        conn.send(("ok", out[:limit + 1], len(out)))
    except BaseException as e:  # noqa: BLE001 - every failure of a user tool becomes an error turn
        conn.send(("error", f"{type(e).__name__}: {e}"[:500], 0))
    finally:
        conn.close()


def run_tool(tools: dict, name: str, raw, timeout: float = 5.0, max_chars: int = 1000) -> tuple[str, bool]:
    """(result text, ok). The call runs in a forked child process killed after `timeout` seconds; an unknown tool,
    bad arguments, an exception, a timeout or an output over `max_chars` characters gives ('error: ...', False)."""
    fn = tools.get(name)
    if fn is None:
        return f"error: unknown tool '{name}' (tools: {', '.join(tools) or 'none'})", False
    try:
        args, kwargs = _call_args(fn, raw)
    except ValueError as e:
        return f"error: {e}", False
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs, max_chars), daemon=True)
    proc.start()
    send.close()
    try:
        ready = recv.poll(timeout)
        msg = recv.recv() if ready else None
    except EOFError:  # the child died without answering (e.g. os._exit, a crash)
        msg = ("error", "the tool process exited without a result", 0)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
    if msg is None:
        return f"error: {name} timed out after {timeout:g} s", False
    status, out, n = msg
    if status != "ok":
        return f"error: {out}", False
    if n > max_chars:
        return f"error: {name} returned {n} characters (limit {max_chars})", False
    return out, True


# ----------------------------------------------------------------------------- observation turns
def observation_text(tokenizer, text: str, role: str, conversational: bool) -> str:
    """The text appended after the policy's turn (which ended with EOS): a tagged turn for standard prompts, the
    chat template's turn for conversational ones (ending with the next assistant header)."""
    if not conversational:
        return f"<result>{text}</result>" if role == "tool" else f"<obs>{text}</obs>"
    msg_role = "tool" if role == "tool" else "user"
    base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "ASSISTANT_TURN"}]
    full = tokenizer.apply_chat_template(base + [{"role": msg_role, "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    cut = full.find("ASSISTANT_TURN") + len("ASSISTANT_TURN")
    eos = tokenizer.eos_token or ""
    if eos and full.find(eos, cut) >= 0 and full[cut:].lstrip().startswith(eos):
        cut = full.find(eos, cut) + len(eos)  # the policy already sampled the EOS
    return full[cut:]


# ----------------------------------------------------------------------------- rollouts
@dataclass
class Episode:
    prompt_ids: list[int]
    row: dict
    conversational: bool
    env: object = None
    ids: list[int] = field(default_factory=list)  # completion ids: policy turns and observation turns
    policy: list[int] = field(default_factory=list)  # 1 where the policy sampled the token
    turn_texts: list[str] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    rewards: list[float] = field(default_factory=list)
    done: bool = False
    truncated: bool = False

    def add(self, ids: list[int], by_policy: bool):
        self.ids += ids
        self.policy += [int(by_policy)] * len(ids)


@dataclass
class MultiTurnGeneration:
    """Same fields as common.sampling.Generation (so the scripts' batch builders take it), plus the masks and the
    per-episode counts. terminated = the episode ended (answer, or the environment said done), not truncated."""
    completion_ids: torch.Tensor  # (N, T) right-padded
    completion_mask: torch.Tensor  # (N, T) 0/1 every completion token (policy and observation)
    terminated: torch.Tensor  # (N,) bool
    texts: list[str]  # decoded transcripts (special tokens removed): what reward functions receive
    policy_mask: torch.Tensor  # (N, T) 0/1 tokens the policy sampled
    env_rewards: list[float | None]  # sum of the environment's rewards (None: it gave none)
    turns: torch.Tensor  # (N,) policy turns
    tool_calls: torch.Tensor  # (N,)
    tool_failures: torch.Tensor  # (N,)
    sampler_logps: torch.Tensor | None = None  # not kept across turns: the trainer recomputes π_old


class Agent:
    """The tools or the environment of a run and the multi-turn sampling loop around a generator."""

    def __init__(self, tokenizer, tools: dict | None = None, env_cls=None, max_turns: int = 4,
                 tool_timeout: float = 5.0, max_tool_output_chars: int = 1000):
        if tools and env_cls is not None:
            raise ValueError("pass --tools or --environment, not both (an environment can call tools itself)")
        if max_turns < 1:
            raise ValueError("--max_turns must be >= 1")
        self.tokenizer, self.tools, self.env_cls = tokenizer, tools or {}, env_cls
        self.max_turns, self.tool_timeout, self.max_chars = max_turns, tool_timeout, max_tool_output_chars
        self.json_calls = uses_json_calls(tokenizer)

    @classmethod
    def from_args(cls, args, tokenizer):
        """None unless --tools or --environment is set."""
        tools, env_cls = load_tools(getattr(args, "tools", None)), load_environment(getattr(args, "environment", None))
        command = getattr(args, "agent_command", None)
        if command:
            if tools or env_cls is not None:
                raise ValueError("--agent_command runs the whole episode: pass it without --tools / --environment")
            return ExternalAgent(tokenizer, command, args.max_new_tokens, args.temperature, args.agent_timeout)
        if not tools and env_cls is None:
            return None
        return cls(tokenizer, tools, env_cls, args.max_turns, args.tool_timeout, args.max_tool_output_chars)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _observe(self, ep: Episode, text: str, role: str):
        ep.add(self._encode(observation_text(self.tokenizer, text, role, ep.conversational)), False)

    def _after_turn(self, ep: Episode, text: str, ended: bool, last: bool):
        """Update one episode after its policy turn `text` (ended: the turn finished with EOS; last: it was turn
        max_turns, so no observation follows: the environment still scores it, a tool call is not run)."""
        if not ended:
            ep.done, ep.truncated = True, True
            return
        if ep.env is not None:
            obs, reward, done = ep.env.step(text)
            if reward is not None:
                if not math.isfinite(float(reward)):
                    raise ValueError(f"--environment: step() returned reward {reward} for the turn {text!r}; "
                                     "rewards must be finite (None: no reward)")
                ep.rewards.append(float(reward))
            if done or obs is None:
                ep.done = True
            elif last:
                ep.done, ep.truncated = True, True
            else:
                self._observe(ep, str(obs), "env")
            return
        calls = parse_tool_calls(text, self.json_calls)
        if not calls:
            ep.done = True  # no tool call: this turn is the answer
            return
        if last:
            ep.done, ep.truncated = True, True
            return
        results = []
        for name, raw in calls:
            out, ok = run_tool(self.tools, name, raw, self.tool_timeout, self.max_chars)
            ep.tool_calls += 1
            ep.tool_failures += not ok
            results.append(out)
        self._observe(ep, "\n".join(results), "tool")

    def rollout(self, generator, model, prompt_ids: list[list[int]], rows: list[dict], n: int,
                greedy: bool = False) -> MultiTurnGeneration:
        """n episodes per prompt (row i*n + j = episode j of prompt i); rows[i] is prompt i's dataset row (passed
        to env.reset)."""
        eps = []
        for p, row in zip(prompt_ids, rows):
            for _ in range(n):
                ep = Episode(list(p), row, isinstance(row.get("prompt"), list))
                if self.env_cls is not None:
                    ep.env = self.env_cls()
                    first = ep.env.reset(row)
                    if first:  # the first observation opens the completion (not trained on)
                        self._observe(ep, str(first), "env")
                eps.append(ep)
        for _ in range(self.max_turns):
            active = [ep for ep in eps if not ep.done]
            if not active:
                break
            contexts = [ep.prompt_ids + ep.ids for ep in active]
            out = (generator.generate(model, contexts, n=1, greedy=True) if greedy
                   else generator.generate(model, contexts, n=1))
            for k, ep in enumerate(active):
                ids = out.completion_ids[k][out.completion_mask[k].bool()].tolist()
                ep.add(ids, True)
                ep.turns += 1
                ep.turn_texts.append(out.texts[k])
                self._after_turn(ep, out.texts[k], bool(out.terminated[k]), ep.turns == self.max_turns)
        for ep in eps:
            if not ep.done:  # max_turns reached with the episode still going
                ep.done, ep.truncated = True, True
        return self._collate(eps)

    def _collate(self, eps: list[Episode]) -> MultiTurnGeneration:
        pad_id = self.tokenizer.pad_token_id
        ids, cmask = pad([ep.ids for ep in eps], pad_id, "right")
        pmask, _ = pad([ep.policy for ep in eps], 0, "right")
        texts = self.tokenizer.batch_decode([ep.ids for ep in eps], skip_special_tokens=True)
        return MultiTurnGeneration(
            ids, cmask, torch.tensor([not ep.truncated for ep in eps]), texts, pmask * cmask,
            [sum(ep.rewards) if ep.rewards else None for ep in eps],
            torch.tensor([ep.turns for ep in eps]), torch.tensor([ep.tool_calls for ep in eps]),
            torch.tensor([ep.tool_failures for ep in eps]))


class ExternalAgent:
    """Episodes run by an agent program through the OpenAI-compatible endpoint of common/agent_server.py.

    Per generation batch the server serves the live policy and `command` runs once with two environment variables:
    CLEANALIGN_AGENT_URL (the endpoint, e.g. http://127.0.0.1:PORT/v1) and CLEANALIGN_AGENT_TASKS (a JSON file:
    [{"episode_id", "messages", "row"}], one task per episode, n per prompt). For each task the agent calls
    POST {url}/chat/completions with {"episode_id", "messages": the task's messages plus anything it appends, ...}
    as often as it likes, then POST {url}/episodes/{episode_id}/reward {"reward": r}. The reward is the episode's
    env_reward (a reward source, as for --environment); an episode the agent never ran is empty and truncated.
    Prompts must be conversational (message lists): the trajectory starts with the trainer's own prompt ids."""

    def __init__(self, tokenizer, command: str, max_new_tokens: int, temperature: float, timeout: float = 600.0):
        import shlex

        self.tokenizer, self.argv, self.timeout = tokenizer, shlex.split(command), timeout
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.server, self.rounds = None, 0

    def rollout(self, generator, model, prompt_ids: list[list[int]], rows: list[dict], n: int,
                greedy: bool = False) -> MultiTurnGeneration:
        import os
        import subprocess
        import tempfile

        from common.agent_server import PolicyServer
        from common.data import prompt_text

        bare = model.module if hasattr(model, "module") else model
        if self.server is None:
            self.server = PolicyServer(bare, self.tokenizer, self.max_new_tokens, self.temperature).start()
        self.server.model, self.server.temperature = bare, 0.0 if greedy else self.temperature
        self.rounds += 1
        tasks, ids = [], []
        for i, (p, row) in enumerate(zip(prompt_ids, rows)):
            if not isinstance(row.get("prompt"), list):
                raise ValueError("--agent_command needs conversational prompts (lists of {role, content} messages)")
            for j in range(n):
                eid = f"r{self.rounds}-{i}-{j}"
                self.server.open_episode(eid, p, prompt_text(row["prompt"], self.tokenizer))
                tasks.append({"episode_id": eid, "messages": row["prompt"],
                              "row": {k: v for k, v in row.items() if k != "prompt"}, "greedy": greedy})
                ids.append(eid)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(tasks, f, default=str)
        try:
            proc = subprocess.run(self.argv, env={**os.environ, "CLEANALIGN_AGENT_URL": self.server.url,
                                                  "CLEANALIGN_AGENT_TASKS": f.name},
                                  capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc = None
        finally:
            os.unlink(f.name)
        if proc is not None and proc.returncode != 0:
            print(f"--agent_command exited with {proc.returncode}: {proc.stderr[-1000:]}", flush=True)
        traj = self.server.trajectories(clear=True)
        seqs, pols, rewards, turns, term = [], [], [], [], []
        for eid in ids:
            t = traj.get(eid, {"completion_ids": [], "policy_mask": [], "reward": None, "requests": []})
            seqs.append(t["completion_ids"])
            pols.append(t["policy_mask"])
            rewards.append(t["reward"])
            turns.append(len(t["requests"]))
            term.append(bool(t["requests"]) and t["requests"][-1]["finish_reason"] == "stop")
        pad_id = self.tokenizer.pad_token_id
        c_ids, cmask = pad(seqs, pad_id, "right")
        pmask, _ = pad(pols, 0, "right")
        zeros = torch.zeros(len(ids), dtype=torch.long)
        return MultiTurnGeneration(c_ids, cmask, torch.tensor(term, dtype=torch.bool),
                                   self.tokenizer.batch_decode(seqs, skip_special_tokens=True), pmask * cmask,
                                   rewards, torch.tensor(turns), zeros, zeros.clone())


def environment_reward(prompts, completions, env_reward=None, **kwargs) -> list:
    """The environment's reward of each episode as a reward source (the scripts pass it in the env_reward column);
    None (not scored) where the environment gave no reward or no rollout ran."""
    return list(env_reward) if env_reward is not None else [None] * len(prompts)


def reward_specs(reward_funcs, reward_model_name_or_path, dataset_name: str, environment: str | None) -> list[str]:
    """The run's reward sources: with --environment, the given ones plus the environment's reward (which is then
    the default); otherwise common.rewards.default_specs."""
    from common.rewards import default_specs

    if not environment:
        return default_specs(reward_funcs, reward_model_name_or_path, dataset_name)
    specs = ([reward_funcs] if isinstance(reward_funcs, str) else list(reward_funcs or []))
    if reward_model_name_or_path:
        specs.append(f"model:{reward_model_name_or_path}")
    return specs + [ENV_REWARD_SPEC]


def episode_metrics(accelerator, out: MultiTurnGeneration) -> dict:
    """Episode statistics of every process (sums reduced once, then divided)."""
    from common.distributed import gather_sum

    policy, every = out.policy_mask.sum().item(), out.completion_mask.sum().item()
    s = [float(v) if accelerator is None else gather_sum(accelerator, float(v)) for v in (
        out.turns.numel(), out.turns.sum().item(), out.tool_calls.sum().item(), out.tool_failures.sum().item(),
        (~out.terminated).sum().item(), policy, every)]
    n = max(s[0], 1)
    return {"agents/turns_per_episode": s[1] / n, "agents/tool_calls_per_episode": s[2] / n,
            "agents/tool_failures_per_episode": s[3] / n, "agents/truncated_ratio": s[4] / n,
            "agents/trained_token_fraction": s[5] / max(s[6], 1), "tools/call_frequency": s[2] / n,
            "tools/failure_frequency": s[3] / s[2] if s[2] else 0.0}


@torch.no_grad()
def heldout_reward(agent: Agent, generator, model, eval_ds, reward_sources, dataset_name: str | None,
                   prompt_ids: list[list[int]], n_prompts: int | None = 256) -> dict:
    """common.evaluation.heldout_reward for multi-turn episodes: one greedy episode per held-out prompt (the first
    n_prompts rows; prompt_ids = their tokenised prompts), scored like training (environment reward included).
    eval/reward, eval/rewards/{name}/mean, eval/terminated, eval/tool_calls_per_episode, eval/turns_per_episode,
    and eval/gold_reward on toy datasets. {} without an eval set."""
    from common import data, toy

    if eval_ds is None or len(eval_ds) == 0:
        return {}
    n = len(eval_ds) if n_prompts is None else min(n_prompts, len(eval_ds))
    rows = [eval_ds[i] for i in range(n)]
    prompts = [r["prompt"] for r in rows]
    out = agent.rollout(generator, model, prompt_ids[:n], rows, 1, greedy=True)
    completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, out.texts)]
    columns = {c: [r[c] for r in rows] for c in eval_ds.column_names if c != "prompt"}
    columns["env_reward"] = out.env_rewards
    ids = [row[m.bool()].tolist() for row, m in zip(out.completion_ids, out.completion_mask)]
    rpf = reward_sources(prompts, completions, ids, columns).float().cpu()
    weights = torch.as_tensor(reward_sources.weights, dtype=torch.float32).cpu()
    scored = ~torch.isnan(rpf)
    total = torch.where(scored, rpf * weights, torch.zeros_like(rpf)).sum(1)
    res = {"eval/reward": total[scored.any(1)].mean().item() if scored.any() else float("nan"),
           "eval/terminated": out.terminated.float().mean().item(),
           "eval/tool_calls_per_episode": out.tool_calls.float().mean().item(),
           "eval/turns_per_episode": out.turns.float().mean().item()}
    for f, name in enumerate(reward_sources.names):
        col = rpf[scored[:, f], f]
        res[f"eval/rewards/{name}/mean"] = col.mean().item() if col.numel() else float("nan")
    task = data.toy_task(dataset_name) if dataset_name else None
    if task is not None:
        gold = [g for g in toy.gold_reward(task)(prompts, completions) if g is not None]
        res["eval/gold_reward"] = sum(gold) / len(gold) if gold else float("nan")
    return res
