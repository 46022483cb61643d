"""Multi-turn rollouts with tools and environments (common/agents.py, grpo.py detail 11): the token layout and masks
of scripted episodes against a hand construction, no gradient on tool/environment tokens through grpo's loss, tools
that hang, raise or flood become error turns, a grpo.py run with --tools logs the episode metrics computed by hand,
and (slow) GRPO raises tool use and accuracy on toy:mul_tool."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_metrics, run_script

import grpo
from common import agents, data, toy, toy_agents
from common.model import load_causal_lm
from common.sampling import Generation, mask_after_eos


# ----------------------------------------------------------------------------- a scripted policy
class ScriptedGenerator:
    """A fake sampler: each context's next turn is `policy(context_text)`; a turn text ending in '|' is cut there
    without EOS (a turn that hit max_new_tokens). Records every context it was given."""

    def __init__(self, tokenizer, policy):
        self.tok, self.policy, self.contexts = tokenizer, policy, []

    def generate(self, model, prompt_ids, n=1, greedy=False):
        tok, rows = self.tok, []
        for p in prompt_ids:
            self.contexts.append(list(p))
            text = self.policy(tok.decode(p))
            for _ in range(n):
                ids = tok(text.rstrip("|"), add_special_tokens=False)["input_ids"]
                rows.append(ids if text.endswith("|") else ids + [tok.eos_token_id])
        ids, mask = data.pad(rows, tok.pad_token_id, "right")
        cmask, term = mask_after_eos(ids, tok.eos_token_id)
        cmask = cmask * mask
        texts = tok.batch_decode([r[m.bool()] for r, m in zip(ids, cmask)], skip_special_tokens=True)
        return Generation(ids, cmask, term & mask.bool().any(1), texts)


def tool_policy(ctx: str) -> str:
    """12*34: a tool call, then the answer; 5*6: a direct answer; 7*8: a turn cut without EOS; 2*2: calls forever."""
    if "12*34=" in ctx:
        return "408" if "</result>" in ctx else "<tool>calc(12*34)</tool>"
    if "5*6=" in ctx:
        return "30"
    if "7*8=" in ctx:
        return "<tool>calc(7*|"
    return "<tool>calc(2*2)</tool>"


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_scripted_tool_rollout_layout_and_masks_equal_a_hand_construction():
    tok = toy.make_tokenizer()
    gen = ScriptedGenerator(tok, tool_policy)
    agent = agents.Agent(tok, {"calc": toy_agents.calc}, max_turns=3)
    prompts = ["12*34=", "5*6=", "7*8=", "2*2="]
    p_ids = [data.tokenize(tok, [data.prompt_text(p, tok)])[0] for p in prompts]
    out = agent.rollout(gen, None, p_ids, [{"prompt": p} for p in prompts], n=2)
    E = tok.eos_token_id
    a1, o1, a2 = enc(tok, "<tool>calc(12*34)</tool>") + [E], enc(tok, "<result>408</result>"), enc(tok, "408") + [E]
    loop_a, loop_o = enc(tok, "<tool>calc(2*2)</tool>") + [E], enc(tok, "<result>4</result>")
    expected = [(a1 + o1 + a2, [1] * len(a1) + [0] * len(o1) + [1] * len(a2)),
                (enc(tok, "30") + [E], [1] * 3),
                (enc(tok, "<tool>calc(7*"), [1] * len("<tool>calc(7*")),
                ((loop_a + loop_o) * 2 + loop_a, ([1] * len(loop_a) + [0] * len(loop_o)) * 2 + [1] * len(loop_a))]
    # (the third call of 2*2 is on the last allowed turn: not run, the episode is truncated)
    for i in range(8):  # row i*G + j = episode j of prompt i
        ids, pol = expected[i // 2]
        n = len(ids)
        assert out.completion_ids[i, :n].tolist() == ids
        assert out.completion_mask[i].tolist() == [1] * n + [0] * (out.completion_mask.shape[1] - n)
        assert out.policy_mask[i, :n].tolist() == pol and out.policy_mask[i, n:].sum() == 0
    assert out.terminated.tolist() == [True, True, True, True, False, False, False, False]  # cut turn; max_turns
    assert out.turns.tolist() == [2, 2, 1, 1, 1, 1, 3, 3]
    assert out.tool_calls.tolist() == [1, 1, 0, 0, 0, 0, 2, 2]
    assert out.texts[0] == "<tool>calc(12*34)</tool><result>408</result>408"
    assert toy.gold_reward("mul_tool")(prompts, [out.texts[i] for i in (0, 2, 4, 6)]) == [1.0, 1.0, 0.0, 0.0]
    # the policy's second turn was sampled after [prompt | a1 | o1], exactly
    assert p_ids[0] + a1 + o1 in gen.contexts
    m = agents.episode_metrics(None, out)
    pol, every = sum(sum(p) for _, p in expected) * 2, sum(len(i) for i, _ in expected) * 2
    assert m["agents/trained_token_fraction"] == pytest.approx(pol / every)
    assert m["tools/call_frequency"] == pytest.approx(6 / 8) and m["tools/failure_frequency"] == 0.0
    assert m["agents/turns_per_episode"] == pytest.approx(14 / 8)
    assert m["agents/truncated_ratio"] == pytest.approx(4 / 8)


def test_conversational_rollout_appends_the_chat_templates_tool_turn():
    tok = toy.make_tokenizer()
    prompt = [{"role": "user", "content": "12*34="}]
    p_ids = [data.tokenize(tok, [data.prompt_text(prompt, tok)])[0]]
    pol = lambda ctx: "408" if "<|tool|>" in ctx else "<tool>calc(12*34)</tool>"  # noqa: E731
    out = agents.Agent(tok, {"calc": toy_agents.calc}).rollout(ScriptedGenerator(tok, pol), None, p_ids,
                                                              [{"prompt": prompt}], n=1)
    E = tok.eos_token_id
    a1, o1 = enc(tok, "<tool>calc(12*34)</tool>") + [E], enc(tok, "<|tool|>408<|end|><|assistant|>")
    assert out.completion_ids[0].tolist() == a1 + o1 + enc(tok, "408") + [E]
    assert out.policy_mask[0].tolist() == [1] * len(a1) + [0] * len(o1) + [1] * 4
    # the sequence is what the chat template renders for the whole conversation
    conv = prompt + [{"role": "assistant", "content": "<tool>calc(12*34)</tool>"}, {"role": "tool", "content": "408"},
                     {"role": "assistant", "content": "408"}]
    assert p_ids[0] + out.completion_ids[0].tolist() == enc(tok, tok.apply_chat_template(conv, tokenize=False))


def test_scripted_environment_rollout_rewards_and_masks():
    tok = toy.make_tokenizer()
    prompt = "guess0412="
    s = toy_agents.secret(prompt)
    wrong = [g for g in range(10) if g != s][:2]

    def policy(ctx):  # two wrong guesses, then the secret
        k = ctx.count("<obs>")
        return str(wrong[k]) if k < 2 else str(s)

    agent = agents.Agent(tok, env_cls=toy_agents.GuessEnv, max_turns=4)
    p_ids = [data.tokenize(tok, [data.prompt_text(prompt, tok)])[0]]
    out = agent.rollout(ScriptedGenerator(tok, policy), None, p_ids, [{"prompt": prompt}], n=1)
    E = tok.eos_token_id
    parts = []
    for g in wrong:
        parts += [(enc(tok, str(g)) + [E], 1), (enc(tok, f"<obs>{'hi' if s > g else 'lo'}</obs>"), 0)]
    parts.append((enc(tok, str(s)) + [E], 1))
    ids = [t for p, _ in parts for t in p]
    assert out.completion_ids[0].tolist() == ids
    assert out.policy_mask[0].tolist() == [f for p, f in parts for _ in p]
    assert out.env_rewards == [pytest.approx(1.0 - 0.2)]  # per-turn -0.1 twice, then 1 at the end
    assert out.terminated.tolist() == [True] and out.turns.tolist() == [3]
    assert toy.gold_reward("guess")([prompt], out.texts) == [1.0]
    # without an ending within max_turns the episode is truncated and keeps the rewards it got
    out2 = agents.Agent(tok, env_cls=toy_agents.GuessEnv, max_turns=2).rollout(
        ScriptedGenerator(tok, policy), None, p_ids, [{"prompt": prompt}], n=1)
    assert out2.terminated.tolist() == [False] and out2.env_rewards == [pytest.approx(-0.2)]


def test_guess_sft_traces_replay_through_the_environment_and_fit_the_toy_model():
    """Every toy:guess SFT trace is a game GuessEnv would play: each observation is the environment's reply to the
    guess before it; binary-search traces (first guess 4) always end on the secret, scans (0, 1, ...) stop after 4
    guesses; 40% binary search; every trace fits the toy model's 64 positions."""
    tok = toy.make_tokenizer()
    pairs = toy_agents.problems("guess", "train")
    binary = 0
    for prompt, trace in pairs:
        env, parts = toy_agents.GuessEnv(), trace.split("<eos>")
        assert env.reset({"prompt": prompt}) is None
        for k, part in enumerate(parts):
            guess = part.split("</obs>")[-1]
            obs, reward, done = env.step(guess)
            if k + 1 < len(parts):
                assert not done and parts[k + 1].startswith(f"<obs>{obs}</obs>") and reward == -0.1
        guesses = [int(p.split("</obs>")[-1]) for p in parts]
        if guesses[0] == 4:
            binary += 1
            assert done and reward == 1.0 and len(guesses) <= 4
        else:
            assert guesses == list(range(len(guesses))) and len(guesses) == min(env.secret, 3) + 1
            assert done == (env.secret <= 3)
        assert len(tok(prompt + trace)["input_ids"]) + 1 <= 64  # <bos> ... <eos>
    assert binary / len(pairs) == pytest.approx(0.4, abs=0.02)


class EchoEnv:
    """First observation 'go'; ends after the second turn with reward 2 (only a final reward)."""

    def reset(self, row):
        self.n = 0
        return "go"

    def step(self, text):
        self.n += 1
        return (None, 2.0, True) if self.n == 2 else ("ok", None, False)


def test_first_observation_opens_the_completion_and_final_reward_only():
    tok = toy.make_tokenizer()
    p_ids = [data.tokenize(tok, [data.prompt_text("hi=", tok)])[0]]
    out = agents.Agent(tok, env_cls=EchoEnv).rollout(ScriptedGenerator(tok, lambda ctx: "a"), None, p_ids,
                                                     [{"prompt": "hi="}], n=1)
    E = tok.eos_token_id
    o0, a, o1 = enc(tok, "<obs>go</obs>"), enc(tok, "a") + [E], enc(tok, "<obs>ok</obs>")
    assert out.completion_ids[0].tolist() == o0 + a + o1 + a
    assert out.policy_mask[0].tolist() == [0] * len(o0) + [1, 1] + [0] * len(o1) + [1, 1]
    assert out.env_rewards == [2.0] and out.turns.tolist() == [2]


def test_detail_11_tool_and_environment_tokens_get_no_gradient_through_grpo_loss():
    torch.manual_seed(0)
    tok = toy.make_tokenizer()
    model, ref = load_causal_lm("toy", tok, seed=0), load_causal_lm("toy", tok, seed=1)
    agent = agents.Agent(tok, {"calc": toy_agents.calc}, max_turns=3)
    prompts = ["12*34=", "5*6=", "2*2="]
    p_ids = [data.tokenize(tok, [data.prompt_text(p, tok)])[0] for p in prompts]
    out = agent.rollout(ScriptedGenerator(tok, tool_policy), None, p_ids, [{"prompt": p} for p in prompts], n=2)
    batch = grpo.rollout_batch(p_ids, out, 2, tok.pad_token_id, False, "cpu")
    batch["loss_mask"] = batch["loss_mask"] * out.policy_mask
    rows = slice(0, 6)
    with torch.no_grad():
        ref_logps, _ = grpo.sequence_logps(ref, batch, rows, 1.0)
    logps, T = grpo.sequence_logps(model, batch, rows, 1.0)
    logps.retain_grad()
    mask = batch["loss_mask"][:, :T]
    adv = torch.tensor([1.0, -0.5, 0.7, -1.0, 0.3, -0.2])
    per_token = grpo.clipped_surrogate(grpo.importance_ratio(logps, logps.detach(), mask, "token"), adv, 0.2, 0.2)
    per_token = per_token + 0.5 * grpo.k3(logps, ref_logps)
    grpo.aggregate(per_token, mask, "dapo", mask.sum().item()).backward()
    obs = (batch["completion_mask"][:, :T] == 1) & (out.policy_mask[:, :T] == 0)
    assert obs.sum() > 20  # there are tool tokens in the batch
    assert torch.all(logps.grad[obs] == 0)  # neither the surrogate nor the KL reaches them
    assert torch.all(logps.grad[mask.bool()] != 0)  # every policy token gets a gradient


# ----------------------------------------------------------------------------- tools that misbehave
def hang(x: str) -> str:
    """Never returns."""
    time.sleep(60)
    return x


def boom(x: str) -> str:
    """Raises."""
    raise RuntimeError(f"broken on {x}")


def flood(n: int) -> str:
    """Returns n characters."""
    return "x" * n


def add(a: int, b: int = 0) -> int:
    """a + b."""
    return a + b


def test_hanging_tool_times_out_and_becomes_an_error_turn():
    t0 = time.time()
    text, ok = agents.run_tool({"hang": hang}, "hang", "1", timeout=0.5)
    assert not ok and "timed out after 0.5 s" in text and time.time() - t0 < 10


def test_raising_flooding_unknown_and_bad_calls_become_error_turns():
    tools = {"boom": boom, "flood": flood, "add": add}
    assert agents.run_tool(tools, "boom", "'q'") == ("error: RuntimeError: broken on q", False)
    assert agents.run_tool(tools, "flood", "10", max_chars=10) == ("x" * 10, True)
    text, ok = agents.run_tool(tools, "flood", "5000000", max_chars=10)
    assert not ok and "5000000 characters (limit 10)" in text
    assert not agents.run_tool(tools, "nope", "1")[1]
    assert not agents.run_tool(tools, "add", "1 +")[1]  # two parameters and no literal arguments
    assert agents.run_tool(tools, "add", "2, b=3") == ("5", True)
    assert agents.run_tool(tools, "add", {"a": 4, "b": 1}) == ("5", True)  # JSON arguments
    # inside a rollout: the error is the tool turn and is counted
    tok = toy.make_tokenizer()
    agent = agents.Agent(tok, tools, max_turns=2)
    p = data.tokenize(tok, [data.prompt_text("q=", tok)])
    pol = lambda ctx: "7" if "</result>" in ctx else "<tool>boom('q')</tool><tool>add(1, 2)</tool>"  # noqa: E731
    out = agent.rollout(ScriptedGenerator(tok, pol), None, p, [{"prompt": "q="}], n=1)
    assert "<result>error: RuntimeError: broken on q\n3</result>7" in out.texts[0]
    assert out.tool_calls.tolist() == [2] and out.tool_failures.tolist() == [1]
    assert agents.episode_metrics(None, out)["tools/failure_frequency"] == 0.5


def test_tools_from_a_file_are_described_by_signature_and_docstring(tmp_path):
    f = tmp_path / "my_tools.py"
    f.write_text('def calculator(expression: str) -> str:\n    """Evaluate an arithmetic expression."""\n'
                 '    return str(eval(expression, {}))\n')
    tools = agents.load_tools([f"{f}:calculator", "common.toy_agents:calc"])
    assert list(tools) == ["calculator", "calc"]
    assert agents.describe_tools(tools).splitlines()[0] == \
        "calculator(expression: str) -> str: Evaluate an arithmetic expression."
    assert agents.run_tool(tools, "calculator", "6*7") == ("42", True)


def test_tool_call_formats():
    assert agents.parse_tool_calls("x <tool>calc(1+2)</tool> y <tool> f ( 'a', k=1 ) </tool>") == [
        ("calc", "1+2"), ("f", "'a', k=1")]
    assert agents.parse_tool_calls('<tool_call>\n{"name": "calc", "arguments": {"expression": "2*3"}}\n</tool_call>',
                                   json_format=True) == [("calc", {"expression": "2*3"})]
    assert agents.parse_tool_calls("the answer is 5") == []
    assert toy_agents.calc("37*58") == "2146" and toy_agents.calc("(7 - 2) * 3") == "15"
    with pytest.raises(ValueError):
        toy_agents.calc("__import__('os')")


def test_observation_turn_of_a_chat_template_follows_the_policy_eos():
    tok = toy.make_tokenizer()
    assert agents.observation_text(tok, "408", "tool", True) == "<|tool|>408<|end|><|assistant|>"
    assert agents.observation_text(tok, "hi", "env", True) == "<|user|>hi<|end|><|assistant|>"
    assert agents.observation_text(tok, "408", "tool", False) == "<result>408</result>"


# ----------------------------------------------------------------------------- grpo.py through the entry point
SCRIPTED = '''
import runpy, sys, re
sys.path.insert(0, {root!r})
from common import data, generation, sampling

def scripted(self, model, prompt_ids, n=1, greedy=False):
    """Turn 1: two calls (one fails); turn 2: the product."""
    tok, rows = self.tokenizer, []
    for p in prompt_ids:
        ctx = tok.decode(p)
        a, b = re.findall(r"(\\d+)\\*(\\d+)=", ctx)[-1]
        text = str(int(a) * int(b)) if "</result>" in ctx else f"<tool>calc({{a}}*{{b}})</tool><tool>calc(1/0)</tool>"
        rows += [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * n
    ids, mask = data.pad(rows, tok.pad_token_id, "right")
    texts = tok.batch_decode([r[:-1] for r in rows])
    return sampling.Generation(ids, mask, mask.bool().any(1), texts)

generation.HFGenerator.generate = scripted
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
'''


def test_grpo_with_tools_logs_the_episode_metrics_computed_by_hand(tmp_path):
    wrapper = tmp_path / "scripted.py"
    wrapper.write_text(SCRIPTED.format(root=str(ROOT), script=str(ROOT / "algos" / "grpo.py")))
    out_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(wrapper), "--model_name_or_path", "toy", "--dataset_name",
                           "toy:mul_tool", "--tools", "common.toy_agents:calc", "--max_steps", "2",
                           "--per_device_train_batch_size", "4", "--num_generations", "2", "--logging_steps", "1",
                           "--eval_steps", "0", "--beta", "0.1", "--output_dir", str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [r for r in read_metrics(out_dir) if "tools/call_frequency" in r]
    assert len(rows) == 2
    ds = toy.make_dataset("mul_tool", "prompt")
    err = "error: ZeroDivisionError: division by zero"
    for step, r in enumerate(rows):
        pol = obs = 0
        for i in data.batch_indices(len(ds), 2, step, 1):  # the two prompts of this generation batch (seed 1)
            a, b = ds[i]["prompt"][:-1].split("*")
            pol += 2 * (len(f"<tool>calc({a}*{b})</tool><tool>calc(1/0)</tool>") + 1 + len(str(int(a) * int(b))) + 1)
            obs += 2 * len(f"<result>{int(a) * int(b)}\n{err}</result>")
        assert r["tools/call_frequency"] == 2.0 and r["tools/failure_frequency"] == 0.5
        assert r["agents/tool_failures_per_episode"] == 1.0 and r["agents/turns_per_episode"] == 2.0
        assert r["agents/truncated_ratio"] == 0.0
        assert r["agents/trained_token_fraction"] == pytest.approx(pol / (pol + obs))
        assert r["completions/mean_length"] == pytest.approx((pol + obs) / 4)
        assert r["rewards/mul_tool_exact/mean"] == 1.0  # the answer after the tool turn is scored
        assert r["kl"] >= 0.0


def test_bad_tool_and_environment_specs_fail_before_the_run_folder(tmp_path):
    from types import SimpleNamespace

    tok = toy.make_tokenizer()
    for tools, env, want in ((["nope.py:fn"], None, "--tools 'nope.py:fn'"),
                             (["common.toy_agents:nothing"], None, "has no function 'nothing'"),
                             (["calc"], None, "'path/to/file.py:function'"),
                             (None, "common.toy_agents:calc", "need a class with reset"),
                             (["common.toy_agents:calc"], "common.toy_agents:GuessEnv", "not both")):
        args = SimpleNamespace(tools=tools, environment=env, max_turns=2, tool_timeout=1.0, max_tool_output_chars=10)
        with pytest.raises(ValueError, match=want):
            agents.Agent.from_args(args, tok)
    proc = run_script("grpo.py", "--model_name_or_path", "toy", "--dataset_name", "toy:mul_tool", "--tools",
                      "nope.py:fn", "--output_dir", str(tmp_path / "x"), check=False, timeout=300)
    assert proc.returncode != 0 and "--tools 'nope.py:fn'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- tier 3: learning
@pytest.mark.slow
def test_grpo_with_the_calculator_raises_tool_use_and_accuracy(tmp_path):
    out_dir = tmp_path / "run"
    run_script("grpo.py", "--dataset_name", "toy:mul_tool", "--tools", "common.toy_agents:calc", "--max_new_tokens",
               "32", "--max_turns", "2", "--max_steps", "60", "--learning_rate", "1e-4", "--eval_steps", "30",
               "--num_eval_prompts", "128", "--logging_steps", "10", "--output_dir", str(out_dir), timeout=3000,
               env={"OMP_NUM_THREADS": "1"})
    m = read_metrics(out_dir)
    evals = [r for r in m if "eval/gold_reward" in r]
    train = [r for r in m if "tools/call_frequency" in r]
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.1
    assert evals[-1]["eval/tool_calls_per_episode"] >= evals[0]["eval/tool_calls_per_episode"]
    assert train[-1]["rewards/mul_tool_exact/mean"] > train[0]["rewards/mul_tool_exact/mean"]


# ----------------------------------------------------------------------------- the OpenAI-compatible endpoint
AGENT_PROCESS = r'''
import json, sys, urllib.request, urllib.error
url = sys.argv[1]

def post(path, body, episode=None):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json",
                                 **({"X-Episode-Id": episode} if episode else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())

msgs = [{"role": "user", "content": "12*34="}]
_, r1 = post("/chat/completions", {"messages": msgs, "max_tokens": 6, "temperature": 0}, "e1")
msgs += [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]}, {"role": "tool", "content": "408"}]
_, r2 = post("/chat/completions", {"messages": msgs, "max_tokens": 6, "temperature": 0, "episode_id": "e1"})
bad, _ = post("/chat/completions", {"messages": [{"role": "user", "content": "other"}] + msgs[1:]}, "e1")
post("/episodes/e1/reward", {"reward": 1.0})
_, r3 = post("/chat/completions", {"messages": [{"role": "user", "content": "5*6="}], "max_tokens": 4}, "e2")
post("/episodes/e2/reward", {"reward": 0.0})
print(json.dumps({"r1": r1["choices"][0]["message"]["content"], "r2": r2["choices"][0]["message"]["content"],
                  "bad": bad}))
'''


def test_chat_endpoint_records_episodes_as_sampled_tokens_with_masks(tmp_path):
    from common.agent_server import PolicyServer

    tok = toy.make_tokenizer()
    model = load_causal_lm("toy", tok, seed=0)
    server = PolicyServer(model, tok, max_new_tokens=8).start()
    try:
        assert server.host == "127.0.0.1"  # loopback by default
        proc = subprocess.run([sys.executable, "-c", AGENT_PROCESS, server.url], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
        traj = server.trajectories()
    finally:
        server.stop()
    assert res["bad"] == 409 and set(traj) == {"e1", "e2"}
    e1 = traj["e1"]
    assert e1["reward"] == 1.0 and traj["e2"]["reward"] == 0.0 and len(e1["requests"]) == 2  # the 409 left no trace
    render = lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)  # noqa: E731
    user = [{"role": "user", "content": "12*34="}]
    assert e1["prompt_ids"] == enc(tok, render(user))
    ids, pol = e1["completion_ids"], e1["policy_mask"]
    k = pol.index(0)
    s1 = ids[:k]
    k2 = k + pol[k:].index(1)
    obs, s2 = ids[k:k2], ids[k2:]
    assert all(pol[k2:]) and not any(pol[k:k2])
    # the sampled ids are the policy's own greedy continuation, not a re-tokenisation of the returned text
    def greedy(ctx, n):
        out = model.generate(input_ids=torch.tensor([ctx]), attention_mask=torch.ones(1, len(ctx), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, len(ctx):].tolist()
        return out[:out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out
    assert s1 == greedy(e1["prompt_ids"], 6) and tok.decode(s1, skip_special_tokens=True) == res["r1"]
    full = render(user + [{"role": "assistant", "content": res["r1"]}, {"role": "tool", "content": "408"}])
    delta = full[len(render(user) + res["r1"]):]
    if s1[-1] == tok.eos_token_id:
        delta = delta[len(tok.eos_token):]
    assert obs == enc(tok, delta) and delta.endswith("<|tool|>408<|end|><|assistant|>")
    assert s2 == greedy(e1["prompt_ids"] + s1 + obs, 6) and tok.decode(s2, skip_special_tokens=True) == res["r2"]


AGENT_PROGRAM = r'''
import json, os, urllib.request
url, tasks = os.environ["CLEANALIGN_AGENT_URL"], json.load(open(os.environ["CLEANALIGN_AGENT_TASKS"]))

def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())

for t in tasks:  # two turns: the policy's reply, a tool turn, the policy's second reply; reward 1 for sample 0
    msgs = list(t["messages"])
    r = post("/chat/completions", {"episode_id": t["episode_id"], "messages": msgs, "max_tokens": 4})
    msgs += [{"role": "assistant", "content": r["choices"][0]["message"]["content"]}, {"role": "tool", "content": "7"}]
    post("/chat/completions", {"episode_id": t["episode_id"], "messages": msgs, "max_tokens": 4})
    post(f"/episodes/{t['episode_id']}/reward", {"reward": float(t["episode_id"].endswith("-0"))})
'''


def test_grpo_with_an_external_agent_program_trains_on_its_episodes(tmp_path):
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT_PROGRAM)
    out_dir = tmp_path / "run"
    run_script("grpo.py", "--model_name_or_path", "toy", "--dataset_name", "toy:mul_tool:conversational",
               "--agent_command", f"{sys.executable} {agent}", "--max_steps", "2", "--per_device_train_batch_size",
               "4", "--num_generations", "2", "--logging_steps", "1", "--eval_steps", "0", "--max_new_tokens", "4",
               "--output_dir", str(out_dir), timeout=600, env={"OMP_NUM_THREADS": "1"})
    rows = [r for r in read_metrics(out_dir) if "agents/turns_per_episode" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["agents/turns_per_episode"] == 2.0 and r["rewards/environment_reward/mean"] == 0.5
        assert 0.0 < r["agents/trained_token_fraction"] < 1.0  # the tool turns are not trained on
        assert r["frac_reward_zero_std"] == 0.0  # each group has rewards 1 and 0: real advantages
