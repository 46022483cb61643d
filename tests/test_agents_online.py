"""Tools and environments in gmpo.py, rloo.py and vmpo.py (online): scripted multi-turn rollouts through each
script's loss give no gradient to tool/environment tokens and the loss values a hand construction gives (|y_i| and
the KL sums over the policy's tokens only); short runs through main() with a scripted sampler train on exactly the
hand-built policy-token masks and log the episode metrics computed by hand; (slow) gmpo and rloo raise tool use and
accuracy on toy:mul_tool, and grpo moves from scanning to binary search on toy:guess."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_metrics
from test_agents import ScriptedGenerator, enc, tool_policy

import gmpo
import rloo
import vmpo
from common import agents, data, generation, sampling, toy, toy_agents
from common.model import load_causal_lm

PROMPTS = ["12*34=", "5*6=", "2*2="]  # a tool call then the answer; a direct answer; calls until max_turns


def scripted_rollout(G: int = 2):
    """(tokenizer, prompt ids, the episodes of tool_policy, the hand-built policy mask (N, T))."""
    tok = toy.make_tokenizer()
    p_ids = [data.tokenize(tok, [data.prompt_text(p, tok)])[0] for p in PROMPTS]
    out = agents.Agent(tok, {"calc": toy_agents.calc}, max_turns=3).rollout(
        ScriptedGenerator(tok, tool_policy), None, p_ids, [{"prompt": p} for p in PROMPTS], n=G)
    E = tok.eos_token_id
    a1, o1, a2 = enc(tok, "<tool>calc(12*34)</tool>") + [E], enc(tok, "<result>408</result>"), enc(tok, "408") + [E]
    la, lo = enc(tok, "<tool>calc(2*2)</tool>") + [E], enc(tok, "<result>4</result>")
    layouts = [[1] * len(a1) + [0] * len(o1) + [1] * len(a2), [1] * 3,
               ([1] * len(la) + [0] * len(lo)) * 2 + [1] * len(la)]
    T = out.completion_ids.shape[1]
    hand = torch.tensor([lay + [0] * (T - len(lay)) for lay in layouts for _ in range(G)], dtype=torch.float32)
    return tok, p_ids, out, hand


def grpo_style_batch(script, p_ids, out, tok, G=2):
    """The batch and loss mask gmpo.py / rloo.py build from a multi-turn rollout (detail 10 of each)."""
    batch = script.rollout_batch(p_ids, out, G, tok.pad_token_id, False, "cpu")
    batch["loss_mask"] = batch["loss_mask"] * out.policy_mask
    return batch


def observation_positions(batch, out, T):
    return (batch["completion_mask"][:, :T] == 1) & (out.policy_mask[:, :T] == 0)


# ----------------------------------------------------------------------------- the losses
def test_gmpo_detail_10_geometric_mean_and_kl_run_over_policy_tokens_only():
    torch.manual_seed(0)
    tok, p_ids, out, hand = scripted_rollout()
    model, ref = load_causal_lm("toy", tok, seed=0), load_causal_lm("toy", tok, seed=1)
    batch = grpo_style_batch(gmpo, p_ids, out, tok)
    rows = slice(0, 6)
    with torch.no_grad():
        ref_logps, _ = gmpo.sequence_logps(ref, batch, rows, 1.0)
    logps, T = gmpo.sequence_logps(model, batch, rows, 1.0)
    logps.retain_grad()
    mask = batch["loss_mask"][:, :T]
    assert torch.equal(mask, hand[:, :T])  # the layout: policy tokens only
    obs = observation_positions(batch, out, T)
    assert obs.sum() > 20
    # π_old: 0.1 below π_θ on the policy's tokens (inside the clip), 5 below on tool tokens (far outside it)
    old = (logps - torch.where(obs, torch.full_like(logps, 5.0), torch.full_like(logps, 0.1))).detach()
    adv = torch.tensor([1.0, -0.5, 0.7, -1.0, 0.3, -0.2])
    beta = 0.5
    loss, _ = gmpo.gmpo_loss(logps, old, adv, mask, 0.4, 0.4, beta, ref_logps)
    # by hand: w_i = exp(0.1) for every sequence (the tool tokens are not in the geometric mean), and the KL term is
    # the mean over sequences of the mean k3 over each sequence's policy tokens
    kl_rows = []
    for i in range(6):
        pos = [t for t in range(T) if hand[i, t] == 1]
        d = [ref_logps[i, t].item() - logps[i, t].item() for t in pos]
        kl_rows.append(sum(math.exp(x) - x - 1 for x in d) / len(pos))
    expected = sum(-a * math.exp(0.1) for a in adv.tolist()) / 6 + beta * sum(kl_rows) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.all(logps.grad[obs] == 0)  # neither the surrogate nor the KL reaches tool tokens
    assert torch.all(logps.grad[mask.bool()] != 0)  # every policy token gets a gradient


def test_rloo_detail_10_sequence_logprob_and_kl_penalty_run_over_policy_tokens_only():
    torch.manual_seed(0)
    tok, p_ids, out, hand = scripted_rollout()
    model, ref = load_causal_lm("toy", tok, seed=0), load_causal_lm("toy", tok, seed=1)
    batch = grpo_style_batch(rloo, p_ids, out, tok)
    rows = slice(0, 6)
    with torch.no_grad():
        ref_logps, _ = rloo.sequence_logps(ref, batch, rows, 1.0)
    logps, T = rloo.sequence_logps(model, batch, rows, 1.0)
    logps.retain_grad()
    mask = batch["loss_mask"][:, :T]
    assert torch.equal(mask, hand[:, :T])
    obs = observation_positions(batch, out, T)
    # the KL penalty folded into the reward: β Σ over the policy's tokens of (ℓ_old - ℓ_ref), by hand
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    shaped, kl = rloo.kl_shaped_rewards(r, logps.detach(), ref_logps, mask, 0.05)
    for i in range(6):
        want = sum(logps[i, t].item() - ref_logps[i, t].item() for t in range(T) if hand[i, t] == 1)
        assert kl[i].item() == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert shaped[i].item() == pytest.approx(r[i].item() - 0.05 * want, rel=1e-5, abs=1e-5)
    adv = rloo.leave_one_out_advantages(shaped, 2)
    loss, ratio = rloo.rloo_loss(logps, logps.detach(), adv, mask, 0.2, 0.2)
    assert torch.equal(ratio, torch.ones(6))
    loss.backward()
    # on-policy REINFORCE: ∂L/∂ℓ_t = -A_i / B on the policy's tokens, exactly 0 on tool tokens
    want = (-adv[:, None] / 6).expand_as(mask) * mask
    assert torch.allclose(logps.grad, want, atol=1e-7)
    assert torch.all(logps.grad[obs] == 0) and obs.sum() > 20


def test_vmpo_choice_12_sequence_logprobs_kl_and_anchor_run_over_policy_tokens_only():
    torch.manual_seed(0)
    tok, p_ids, out, hand = scripted_rollout()
    model, ref = load_causal_lm("toy", tok, seed=0), load_causal_lm("toy", tok, seed=1)
    old = load_causal_lm("toy", tok, seed=2)
    # the batch vmpo.py builds from a multi-turn rollout (choice 12): the completion mask keeps the policy's tokens
    c_ids = [r[m.bool()].tolist() for r, m in zip(out.completion_ids, out.completion_mask)]
    batch = data.batch_prompt_completion([p for p in p_ids for _ in range(2)], c_ids, tok.pad_token_id)
    full_mask = batch["completion_mask"].clone()
    batch["completion_mask"] = batch["completion_mask"] * out.policy_mask
    assert torch.equal(batch["completion_mask"].float(), hand)
    with torch.no_grad():
        s_ref, ref_tok = vmpo.sequence_logps(ref, batch, 1.0)
        s_old, _ = vmpo.sequence_logps(old, batch, 1.0)
    s_pol, tok_logps = vmpo.sequence_logps(model, batch, 1.0)
    tok_logps.retain_grad()
    for i in range(6):  # S = the sum over the policy's tokens, by hand
        assert s_pol[i].item() == pytest.approx(sum(tok_logps[i, t].item() for t in range(hand.shape[1])
                                                    if hand[i, t] == 1), rel=1e-5)
    obs = (full_mask == 1) & (out.policy_mask == 0)
    assert obs.sum() > 20
    psi = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2, 0.0])
    kl_val, kl_sur = vmpo.sequence_kl("old_policy_ref", s_pol, s_ref, s_old, None)
    assert torch.allclose(kl_val, (s_old - s_pol).detach())
    _, anchor = vmpo.ref_anchor(s_pol, s_ref, 0.1)
    loss, _ = vmpo.vmpo_loss(psi, s_pol, kl_sur, 0.7, anchor, 6)
    loss.backward()
    # ∂L/∂ℓ_t = -ψ_i - α/N + c_ref (S^θ_i - S^ref_i)/N on the policy's tokens, 0 on tool tokens
    per_seq = -psi - 0.7 / 6 + 0.1 * (s_pol - s_ref).detach() / 6
    want = per_seq[:, None].expand_as(tok_logps) * hand
    assert torch.allclose(tok_logps.grad, want, atol=1e-6)
    assert torch.all(tok_logps.grad[obs] == 0)


# ----------------------------------------------------------------------------- runs through main()
ERR = "error: ZeroDivisionError: division by zero"


def scripted_tool_sampler(self, model, prompt_ids, n=1, greedy=False):
    """Turn 1: two calls (the second fails); turn 2: the product."""
    import re

    tok, rows = self.tokenizer, []
    for p in prompt_ids:
        ctx = tok.decode(p)
        a, b = re.findall(r"(\d+)\*(\d+)=", ctx)[-1]
        text = str(int(a) * int(b)) if "</result>" in ctx else f"<tool>calc({a}*{b})</tool><tool>calc(1/0)</tool>"
        rows += [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * n
    ids, mask = data.pad(rows, tok.pad_token_id, "right")
    return sampling.Generation(ids, mask, mask.bool().any(1), tok.batch_decode([r[:-1] for r in rows]))


def tool_layout(prompt: str) -> tuple[list[int], int, int]:
    """The hand-built policy mask of one scripted tool episode, its policy and tool token counts."""
    a, b = prompt[:-1].split("*")
    t1 = len(f"<tool>calc({a}*{b})</tool><tool>calc(1/0)</tool>") + 1
    o = len(f"<result>{int(a) * int(b)}\n{ERR}</result>")
    t2 = len(str(int(a) * int(b))) + 1
    return [1] * t1 + [0] * o + [1] * t2, t1 + t2, o


def check_tool_run(out_dir, masks: list[torch.Tensor], step_prompts: list[list[str]], G: int = 2):
    """The recorded loss masks are the hand-built policy masks (row i*G + j); the logged episode metrics too."""
    rows = [r for r in read_metrics(out_dir) if "tools/call_frequency" in r]
    assert len(rows) == len(step_prompts) == len(masks)
    for r, mask, prompts in zip(rows, masks, step_prompts):
        pol = obs = 0
        for i, p in enumerate(prompts):
            lay, n_pol, n_obs = tool_layout(p)
            pol, obs = pol + G * n_pol, obs + G * n_obs
            for j in range(G):
                row = mask[i * G + j].tolist()
                assert row[:len(lay)] == lay and not any(row[len(lay):])
        assert r["tools/call_frequency"] == 2.0 and r["tools/failure_frequency"] == 0.5
        assert r["agents/tool_failures_per_episode"] == 1.0 and r["agents/turns_per_episode"] == 2.0
        assert r["agents/truncated_ratio"] == 0.0
        assert r["agents/trained_token_fraction"] == pytest.approx(pol / (pol + obs))
        assert r["completions/mean_length"] == pytest.approx((pol + obs) / (G * len(prompts)))
        assert r["rewards/mul_tool_exact/mean"] == 1.0  # the answer after the tool turn is scored


def batch_prompts(n_prompts: int, steps: int, seed: int = 1, prompts: list[str] | None = None) -> list[list[str]]:
    """The prompts of each step's generation batch (toy:mul_tool's training rows, or `prompts`)."""
    prompts = prompts or toy.make_dataset("mul_tool", "prompt")["prompt"]
    return [[prompts[i] for i in data.batch_indices(len(prompts), n_prompts, s, seed)] for s in range(steps)]


RUN = dict(model_name_or_path="toy", dataset_name="toy:mul_tool", tools=["common.toy_agents:calc"], max_steps=2,
           per_device_train_batch_size=4, logging_steps=1, eval_steps=0, log_completions_steps=0, num_eval_prompts=4)


def test_gmpo_with_tools_trains_on_the_policy_tokens_and_logs_the_episode_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(generation.HFGenerator, "generate", scripted_tool_sampler)
    masks, real = [], gmpo.gmpo_loss
    monkeypatch.setattr(gmpo, "gmpo_loss", lambda *a, **k: masks.append(a[3].clone()) or real(*a, **k))
    gmpo.main(gmpo.Args(output_dir=str(tmp_path / "run"), num_generations=2, beta=0.1, **RUN))
    check_tool_run(tmp_path / "run", masks, batch_prompts(2, 2))
    assert all(r["kl"] >= 0.0 for r in read_metrics(tmp_path / "run") if "kl" in r)


def test_rloo_with_tools_trains_on_the_policy_tokens_and_logs_the_episode_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(generation.HFGenerator, "generate", scripted_tool_sampler)
    masks, real = [], rloo.rloo_loss
    monkeypatch.setattr(rloo, "rloo_loss", lambda *a, **k: masks.append(a[3].clone()) or real(*a, **k))
    rloo.main(rloo.Args(output_dir=str(tmp_path / "run"), num_generations=2, beta=0.1, **RUN))
    check_tool_run(tmp_path / "run", masks, batch_prompts(2, 2))


def test_vmpo_with_tools_trains_on_the_policy_tokens_and_logs_the_episode_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(generation.HFGenerator, "generate", scripted_tool_sampler)
    masks, real = [], vmpo.sequence_logps

    def record(model, batch, temperature):
        if torch.is_grad_enabled():  # the policy's forward of the update (the reference / old ones run without)
            masks.append(batch["completion_mask"].clone())
        return real(model, batch, temperature)

    monkeypatch.setattr(vmpo, "sequence_logps", record)
    prompts = [f"{a}*{b}=" for a, b in ((12, 34), (5, 67), (89, 10), (23, 45), (7, 7), (61, 38))]
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in prompts))  # a small file:
    run = {**RUN, "dataset_name": str(tmp_path / "prompts.jsonl"), "reward_funcs": ["mul_tool"]}  # quick to load
    vmpo.main(vmpo.Args(output_dir=str(tmp_path / "run"), k=2, eps_eta=0.5, **run))
    check_tool_run(tmp_path / "run", masks, batch_prompts(2, 2, prompts=prompts))


def scripted_guesser(self, model, prompt_ids, n=1, greedy=False):
    """A wrong guess (secret + 1 mod 10), then the secret: two turns, environment reward 1 - 0.1."""
    tok, rows = self.tokenizer, []
    for p in prompt_ids:
        ctx = tok.decode(p)
        s = toy_agents.secret(ctx)
        rows += [tok(str(s if "</obs>" in ctx else (s + 1) % 10), add_special_tokens=False)["input_ids"]
                 + [tok.eos_token_id]] * n
    ids, mask = data.pad(rows, tok.pad_token_id, "right")
    return sampling.Generation(ids, mask, mask.bool().any(1), tok.batch_decode([r[:-1] for r in rows]))


@pytest.mark.parametrize("script", ["rloo", "vmpo"])
def test_environment_episodes_are_rewarded_by_the_environment_and_masked(script, tmp_path, monkeypatch):
    monkeypatch.setattr(generation.HFGenerator, "generate", scripted_guesser)
    mod = {"rloo": rloo, "vmpo": vmpo}[script]
    fn = "rloo_loss" if script == "rloo" else "vmpo_loss"
    called, real = [], getattr(mod, fn)
    monkeypatch.setattr(mod, fn, lambda *a, **k: called.append(1) or real(*a, **k))
    kw = dict(model_name_or_path="toy", dataset_name="toy:guess", environment="common.toy_agents:GuessEnv",
              max_steps=2, per_device_train_batch_size=4, logging_steps=1, eval_steps=2, num_eval_prompts=3,
              max_new_tokens=3, max_turns=3, log_completions_steps=0, output_dir=str(tmp_path / "run"))
    mod.main(rloo.Args(num_generations=2, **kw) if script == "rloo" else vmpo.Args(k=2, eps_eta=0.5, **kw))
    m = read_metrics(tmp_path / "run")
    train = [r for r in m if "agents/turns_per_episode" in r]
    assert len(train) == 2 and len(called) == 2
    pol, obs = 2 + 2, len("<obs>hi</obs>")  # 'hi' and 'lo' have the same length
    for r in train:
        assert r["rewards/environment_reward/mean"] == pytest.approx(0.9)  # 1 for the secret, -0.1 for the miss
        assert r["agents/turns_per_episode"] == 2.0 and r["agents/truncated_ratio"] == 0.0
        assert r["agents/trained_token_fraction"] == pytest.approx(pol / (pol + obs))
        assert r["tools/call_frequency"] == 0.0
    evals = [r for r in m if "eval/gold_reward" in r]
    assert evals[-1]["eval/gold_reward"] == 1.0 and evals[-1]["eval/turns_per_episode"] == 2.0


def test_tools_with_offline_vmpo_data_fail_before_the_run_folder(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "{a}*3=", "chosen": "{3 * a}", "rejected": "{3 * a + 1}"}}\n'
                             for a in range(10, 18)))
    with pytest.raises(ValueError, match="need online mode"):
        vmpo.main(vmpo.Args(model_name_or_path="toy", dataset_name=str(pairs), tools=["common.toy_agents:calc"],
                            per_device_train_batch_size=4, output_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_vmpo_with_an_external_agent_program_trains_on_its_episodes(tmp_path):
    import sys

    from test_agents import AGENT_PROGRAM

    (tmp_path / "agent.py").write_text(AGENT_PROGRAM)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(f'{{"prompt": [{{"role": "user", "content": "{a}*{b}="}}]}}\n'
                             for a, b in ((12, 34), (5, 67), (89, 10), (23, 45))))
    vmpo.main(vmpo.Args(model_name_or_path="toy", dataset_name=str(chats), agent_command=f"{sys.executable} "
                        f"{tmp_path / 'agent.py'}", max_steps=1, per_device_train_batch_size=4, k=2, eps_eta=0.5,
                        logging_steps=1, max_new_tokens=4, log_completions_steps=0, output_dir=str(tmp_path / "run")))
    rows = [r for r in read_metrics(tmp_path / "run") if "agents/turns_per_episode" in r]
    assert len(rows) == 1
    for r in rows:  # the program's two requests per episode, its reward 1 for sample 0 of each prompt
        assert r["agents/turns_per_episode"] == 2.0 and r["rewards/environment_reward/mean"] == 0.5
        assert 0.0 < r["agents/trained_token_fraction"] < 1.0  # its tool turns are not trained on
        assert r["vmpo/selected_fraction"] == 0.5  # the top half: exactly the rewarded episodes


# ----------------------------------------------------------------------------- learning (slow)
@pytest.mark.slow
@pytest.mark.parametrize("script", ["gmpo.py", "rloo.py"])
def test_calculator_use_and_accuracy_rise(script, tmp_path):
    from conftest import run_script

    out_dir = tmp_path / "run"
    run_script(script, "--dataset_name", "toy:mul_tool", "--tools", "common.toy_agents:calc", "--max_new_tokens", "32",
               "--max_turns", "2", "--max_steps", "20", "--learning_rate", "1e-4", "--eval_steps", "10",
               "--num_eval_prompts", "64", "--logging_steps", "5", "--output_dir", str(out_dir), timeout=3000,
               env={"OMP_NUM_THREADS": "1"})
    m = read_metrics(out_dir)
    evals = [r for r in m if "eval/gold_reward" in r]
    train = [r for r in m if "tools/call_frequency" in r]
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.1
    assert evals[-1]["eval/tool_calls_per_episode"] > evals[0]["eval/tool_calls_per_episode"]
    assert train[-1]["tools/call_frequency"] > train[0]["tools/call_frequency"]


@pytest.mark.slow
def test_grpo_in_the_guessing_environment_moves_from_scanning_to_binary_search(tmp_path):
    from conftest import run_script

    out_dir = tmp_path / "run"
    run_script("grpo.py", "--dataset_name", "toy:guess", "--environment", "common.toy_agents:GuessEnv",
               "--max_new_tokens", "3", "--max_turns", "5", "--max_steps", "20", "--learning_rate", "1e-4",
               "--eval_steps", "10", "--num_eval_prompts", "64", "--logging_steps", "5", "--output_dir", str(out_dir),
               timeout=3000, env={"OMP_NUM_THREADS": "1"})
    m = read_metrics(out_dir)
    evals = [r for r in m if "eval/gold_reward" in r]
    train = [r for r in m if "agents/turns_per_episode" in r]
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.3  # start: 0.41 (greedy scan)
    assert evals[-1]["eval/turns_per_episode"] < evals[0]["eval/turns_per_episode"] - 0.5  # start: 4.19
    assert train[-1]["rewards/environment_reward/mean"] > train[0]["rewards/environment_reward/mean"]
