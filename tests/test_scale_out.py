"""Scale-out on CPU: DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 with 2 processes over gloo, launched exactly as the
README says (`accelerate launch --config_file configs/accelerate/<mode>_cpu.yaml algos/<script>.py ...`), against
one process started from the same saved initial weights.

Checked per mode: the mode the run reports is the one asked for; each process holds the share of parameters and
optimizer state the mode promises (a silent fallback to DDP holds everything and fails); the logged losses and the
final weights equal one process's (float tolerance: the reductions add in another order); the final save reloads
with plain transformers and gives one process's logits; checkpoints resume to the uninterrupted run's weights;
greedy generation and the vLLM weight push under ZeRO-3 and FSDP2 equal one process, also when the ranks stop
generating at different steps; grpo.py (reference model on), dpo.py and ppo.py (policy and value model prepared as
one module) equal one process in every mode; rest_em.py's reset to the base model between iterations equals one
process under ZeRO-2, ZeRO-3 and FSDP2; vmpo.py's old policy is an exact copy of the gathered policy under ZeRO-3
and FSDP2. Bad launches fail at start-up with the fix.

Default suite (one or two 2-process launches per mode, ~30-80 s each on 2 loaded cores): sft under ZeRO-2, ZeRO-3
and FSDP2, FSDP2 resume, ZeRO-3 generation, ppo and vmpo under ZeRO-3 and FSDP2, rest_em under ZeRO-3, the
start-up refusals. `-m slow` adds DDP, ZeRO-2 / ZeRO-3 resume, FSDP2 generation, grpo.py / dpo.py in all four modes,
ppo.py under DDP and ZeRO-2, rest_em.py under ZeRO-2 and FSDP2.

The DeepSpeed tests (marked `deepspeed`) skip when deepspeed is not installed (optional extra:
`pip install deepspeed==0.19.8`); `bash scripts/test.sh` runs them in `.venv-deepspeed`, this environment plus
deepspeed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAKE_SAMPLER, LENGTH_REWARD, ROOT, free_port, load_params, read_metrics

CONFIGS = ROOT / "configs" / "accelerate"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# `bash scripts/test.sh` runs the tests marked `deepspeed` in .venv-deepspeed (this environment + deepspeed)
skip_without_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed here (optional extra: pip install deepspeed==0.19.8); "
                              "bash scripts/test.sh runs these tests in .venv-deepspeed")
needs_deepspeed = [pytest.mark.deepspeed, skip_without_deepspeed]
DESCRIPTION = {"ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}
SHARDED = [pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed), "fsdp2"]
ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def launcher(mode: str) -> list[str]:
    """The README's launch line for `mode` on a CPU-only machine, on a free loopback port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{mode}_cpu.yaml"),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]


def run(prefix: list[str], script, args: list[str], timeout: int = 600, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*prefix, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def sharding(stdout: str) -> list[tuple[int, int, int]]:
    """(parameter elements held, elements in the model, optimizer-state elements held) per process, from the line
    common/distributed.py prints after accelerator.prepare."""
    m = re.search(r"sharding: parameters held per process ([\d, ]+) of (\d+) elements; optimizer state per process "
                  r"([\d, ]+)", stdout)
    assert m, stdout[-3000:]
    held, opt = [int(x) for x in m.group(1).split(",")], [int(x) for x in m.group(3).split(",")]
    return [(h, int(m.group(2)), o) for h, o in zip(held, opt)]


def assert_really_sharded(mode: str, stdout: str):
    """ZeRO-2: optimizer state split in two, parameters whole. ZeRO-3: optimizer state split, and the parameters
    above DeepSpeed's persistence threshold (1e5 elements: the MLP matrices here) partitioned. FSDP2: both split.
    DDP (or a fallback to it): everything whole on both processes."""
    rows = sharding(stdout)
    assert len(rows) == 2, rows
    total = rows[0][1]
    for held, _, opt in rows:
        if mode == "ddp":
            assert held == total and opt == total, rows
            continue
        assert abs(opt - total / 2) <= 0.01 * total, rows  # each process updates half of the model
        if mode == "zero2":
            assert held == total, rows
        elif mode == "zero3":
            assert held < 0.7 * total, rows
        else:
            assert abs(held - total / 2) <= 0.01 * total, rows
    assert sum(r[2] for r in rows) >= total  # the shards cover the model


@pytest.fixture(scope="module")
def init_model(tmp_path_factory) -> Path:
    """The saved initial weights every layout starts from (a fresh init inside DeepSpeed's zero.Init would differ
    from one process's): the toy Llama at hidden size 192 and 2 layers (0.98M parameters), so its MLP matrices
    (110,592 elements) are above ZeRO-3's default persistence threshold and really get partitioned."""
    from transformers import AutoModelForCausalLM

    from common import toy

    out = tmp_path_factory.mktemp("init") / "model"
    tok = toy.make_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(toy.make_config(tok, hidden_size=192, num_layers=2)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sft_flags(init_model, two: bool) -> list[str]:
    """3 steps of global batch 8; 2 processes x 2 micro-batches of 2 (accumulation checked too) vs 1 x 8. A
    checkpoint at step 2."""
    batch = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"] if two else \
        ["--per_device_train_batch_size", "8"]
    return ["--model_name_or_path", str(init_model), "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "0",
            "--warmup_steps", "1", "--save_steps", "2", *batch]


class Runs:
    """Runs shared by the tests of this module (each launched once, on first use)."""

    def __init__(self, root: Path, init_model: Path):
        self.root, self.init_model, self.done = root, init_model, {}

    def sft(self, mode: str | None) -> tuple[Path, str]:
        """sft.py on one process (mode None) or 2 processes under `mode`: (output_dir, stdout)."""
        key = ("sft", mode)
        if key not in self.done:
            out = self.root / f"sft-{mode or 'one'}"
            prefix = launcher(mode) if mode else [sys.executable]
            proc = run(prefix, ROOT / "algos" / "sft.py", [*sft_flags(self.init_model, mode is not None),
                                                            "--output_dir", str(out)])
            self.done[key] = (out, proc.stdout)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, init_model) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), init_model)


def logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_matches_one_process(one: Path, two: Path, keys=("loss",), atol: float = 2e-5):
    """Every logged `keys` value of every step, and every final weight, as one process's."""
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] and m1
    for a, b in zip(m1, m2):
        for k in keys:
            assert (k in a) == (k in b), (a["step"], k)
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    p1, p2 = load_params(one), load_params(two)
    assert p1.keys() == p2.keys()  # the same files: a tied head written once, as one process writes it
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], atol=atol, rtol=0, msg=k)


# ----------------------------------------------------------------------------- sft: losses, weights, saves, resume
@pytest.mark.parametrize("mode", [pytest.param("ddp", marks=pytest.mark.slow), *SHARDED])
def test_sft_two_processes_match_one(runs, mode):
    """The mode really runs (printed mode, per-process shard sizes), first-step and later losses and the final
    weights equal one process's, and the final save (gathered from the shards) reloads with plain transformers
    and gives one process's logits."""
    one, _ = runs.sft(None)
    two, stdout = runs.sft(mode)
    assert f"distributed: {DESCRIPTION[mode]} on 2 processes (gloo, cpu" in stdout, stdout[-2000:]
    assert_really_sharded(mode, stdout)
    assert_matches_one_process(one, two)
    ids = torch.tensor([[1, 20, 30, 11, 40, 29, 50]])
    torch.testing.assert_close(logits(two, ids), logits(one, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["fsdp2", pytest.param("zero2", marks=[*needs_deepspeed, pytest.mark.slow]),
                                  pytest.param("zero3", marks=[*needs_deepspeed, pytest.mark.slow])])
def test_sft_resume_equals_uninterrupted(runs, tmp_path, mode):
    """Resuming the 2-process run from its step-2 checkpoint (model, optimizer and scheduler state, RNG of both
    ranks) ends with the uninterrupted run's weights and step-3 loss. FSDP2 checkpoints hold gathered full state
    dicts in the safe formats (safetensors, weights_only torch.load); DeepSpeed's hold its own partitioned files."""
    full, _ = runs.sft(mode)
    ckpt = full / "checkpoint-2"
    if mode == "fsdp2":
        assert (ckpt / "state" / "model_0.safetensors").exists() and (ckpt / "state" / "optimizer_0.pt").exists()
        assert not (ckpt / "state" / "sharded").exists()
    else:
        assert (ckpt / "state" / "sharded").is_dir()
        assert not list((ckpt / "state" / "sharded").glob("random_states_*.pkl"))  # RNG: our safe rng_<rank>.pt
    out = tmp_path / "resumed"
    proc = run(launcher(mode), ROOT / "algos" / "sft.py", [*sft_flags(runs.init_model, True), "--output_dir", str(out),
                                                         "--resume_from", str(ckpt)])
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    last_full, last_resumed = read_metrics(full)[-1], read_metrics(out)[-1]
    assert last_resumed["step"] == 3 and last_resumed["loss"] == pytest.approx(last_full["loss"], rel=1e-6)
    a, b = load_params(full), load_params(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("mode", [pytest.param("zero3", marks=needs_deepspeed), "fsdp2"])
def test_lora_sft_two_processes_match_one(init_model, tmp_path, mode):
    """LoRA's A matrices are drawn at random after the model loads, and the processes are seeded differently: the
    sharded run starts from the main process's draw (common/distributed.broadcast_from_main), so its losses and its
    saved adapter equal one process's. Without it each process shards its own draw (the losses part at step 2)."""
    flags = ["--model_name_or_path", str(init_model), "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "0",
             "--use_peft", "True", "--learning_rate", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable], ROOT / "algos" / "sft.py", [*flags, "--per_device_train_batch_size", "8",
                                                     "--output_dir", str(one)])
    proc = run(launcher(mode), ROOT / "algos" / "sft.py", [*flags, "--per_device_train_batch_size", "4",
                                                           "--output_dir", str(two)])
    assert f"distributed: {DESCRIPTION[mode]} on 2 processes" in proc.stdout
    for a, b in zip(read_metrics(one), read_metrics(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-6), a["step"]
    from safetensors.torch import load_file

    pa, pb = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert sorted(pa) == sorted(pb)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=1e-5, rtol=0, msg=k)


# ----------------------------------------------------------------------------- generation and weight pushes
GEN_PROBE = '''
import json, sys
sys.path.insert(0, {root!r})
from dataclasses import dataclass
import torch
from common import data, distributed, model as model_utils
from common.generation import HFGenerator, SamplingConfig
from common.vllm_backend import policy_state


@dataclass
class Args:
    seed: int = 1
    gradient_accumulation_steps: int = 1
    per_device_train_batch_size: int = 2
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None


folder, out = sys.argv[1], sys.argv[2]
acc = distributed.make_accelerator(Args())
tok = model_utils.load_tokenizer(folder)
model = model_utils.load_causal_lm(folder)
model, _ = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
prompts = list(data.load_data("toy:add", "test", toy_kind="prompt", n=8)["prompt"])
ids = data.tokenize(tok, [data.prompt_text(p, tok) for p in prompts])
texts = {{}}
for share in range(2):  # with 2 processes, rank r generates share r; one process generates both in turn
    if acc.num_processes > 1 and share != acc.process_index:
        continue
    gen = HFGenerator(tok, SamplingConfig(max_new_tokens=5 + 6 * share), acc)  # the ranks stop at different steps
    texts[share] = gen.generate(model, ids[share * 4:(share + 1) * 4], n=1, greedy=True).texts
state = policy_state(acc, model)  # what a vLLM weight push sends
saved = model_utils.load_causal_lm(folder).state_dict()
full = distributed.full_state_dict(acc, model)  # whole weights, e.g. for an old policy
distributed.load_full_state_dict(acc, model, {{k: v * 0.5 for k, v in full.items()}})
halved = distributed.full_state_dict(acc, model)
result = {{"texts": texts, "keys": sorted(state),
          "max_diff": max((state[k].float() - saved[k].float()).abs().max().item() for k in state),
          "full_diff": max((full[k] - saved[k]).abs().max().item() for k in saved),
          "halved_diff": max((halved[k] - 0.5 * saved[k]).abs().max().item() for k in saved)}}
every = [None] * acc.num_processes
if acc.num_processes > 1:
    torch.distributed.all_gather_object(every, result)
else:
    every = [result]
if acc.is_main_process:
    json.dump(every, open(out, "w"))
'''


@pytest.fixture(scope="module")
def gen_probe(tmp_path_factory, init_model) -> tuple[Path, dict]:
    """The probe script and what it gives on one process."""
    folder = tmp_path_factory.mktemp("probe")
    path = folder / "gen_probe.py"
    path.write_text(GEN_PROBE.format(root=str(ROOT)))
    run([sys.executable], path, [str(init_model), str(folder / "one.json")])
    return path, json.loads((folder / "one.json").read_text())[0]


@pytest.mark.parametrize("mode", [pytest.param("zero3", marks=needs_deepspeed),
                                  pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_generation_and_weight_push_match_one_process(init_model, gen_probe, tmp_path, mode):
    """Greedy HF generation of the prepared (partitioned / sharded) policy gives one process's completions, with
    the two ranks stopping at different steps (synced ranks: no hang); the vLLM weight push (policy_state) and
    distributed.full_state_dict hold every weight whole, equal to the saved ones, on every rank; whole weights
    written with distributed.load_full_state_dict come back whole."""
    probe, ref = gen_probe
    two = tmp_path / "two.json"
    proc = run(launcher(mode), probe, [str(init_model), str(two)])
    assert_really_sharded(mode, proc.stdout)
    ranks = json.loads(two.read_text())
    assert [r["texts"] for r in ranks] == [{"0": ref["texts"]["0"]}, {"1": ref["texts"]["1"]}]
    assert len(ref["texts"]["1"][0]) > len(ref["texts"]["0"][0])  # the shares did stop at different steps
    for r in ranks:
        assert r["keys"] == ref["keys"] and r["max_diff"] == 0.0
        assert r["full_diff"] == 0.0 and r["halved_diff"] == 0.0  # distributed.full_state_dict / load_full_state_dict


# ----------------------------------------------------------------------------- grpo and dpo in every mode (slow)
def write_fake_sampler(tmp_path, script: str) -> Path:
    wrapper = tmp_path / f"fake_{script}"
    wrapper.write_text(FAKE_SAMPLER.format(root=str(ROOT), script=str(ROOT / "algos" / script)))
    return wrapper


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", *SHARDED])
def test_grpo_two_processes_match_one(init_model, tmp_path, mode):
    """grpo.py with the KL to a reference model (frozen, whole on every process), held-out greedy evaluation at
    steps 0 and 2 through the sharded policy, on identical samples (a deterministic fake sampler): every logged
    metric and the final weights equal one process with twice the per-device batch."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    wrapper = write_fake_sampler(tmp_path, "grpo.py")
    flags = ["--model_name_or_path", str(init_model), "--max_steps", "2", "--num_generations", "4",
             "--eval_steps", "2", "--num_eval_prompts", "8", "--log_completions_steps", "0", "--logging_steps", "1",
             "--reward_funcs", f"{tmp_path / 'length_reward.py'}:length", "--beta", "0.1"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable], wrapper, [*flags, "--per_device_train_batch_size", "16", "--output_dir", str(one)])
    proc = run(launcher(mode), wrapper, [*flags, "--per_device_train_batch_size", "8", "--output_dir", str(two)])
    assert f"distributed: {DESCRIPTION[mode]} on 2 processes" in proc.stdout
    assert_really_sharded(mode, proc.stdout)
    assert_matches_one_process(one, two, keys=("loss", "reward", "kl", "grad_norm", "eval/gold_reward",
                                               "completions/mean_length"), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", *SHARDED])
def test_dpo_two_processes_match_one(init_model, tmp_path, mode):
    """dpo.py (reference model whole on every process) on toy preference pairs, with TR-DPO's reference update
    after every step (the policy's parameters gathered to read them): losses, rewards and final weights equal one
    process with twice the per-device batch."""
    flags = ["--model_name_or_path", str(init_model), "--max_steps", "3", "--logging_steps", "1",
             "--eval_steps", "0", "--save_steps", "0", "--sync_ref_model", "True", "--ref_model_sync_steps", "1",
             "--ref_model_mixup_alpha", "0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable], ROOT / "algos" / "dpo.py", [*flags, "--per_device_train_batch_size", "8",
                                                     "--output_dir", str(one)])
    proc = run(launcher(mode), ROOT / "algos" / "dpo.py", [*flags, "--per_device_train_batch_size", "4",
                                                           "--output_dir", str(two)])
    assert_really_sharded(mode, proc.stdout)
    assert_matches_one_process(one, two, keys=("loss", "rewards/accuracies", "rewards/margins"), atol=1e-5)


# ----------------------------------------------------------------------------- ppo, rest_em, vmpo
def ppo_flags(tmp_path, init_model) -> list[str]:
    """2 rollouts of 16 completions, 2 epochs x 2 mini-batches (4 optimizer steps each), a length reward (so the value
    model starts from the policy with a zero head), the KL to the replicated reference, and held-out greedy
    evaluation at steps 0 and 2 through the partitioned / sharded policy."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    return ["--model_name_or_path", str(init_model), "--max_steps", "2", "--num_mini_batches", "2",
            "--num_ppo_epochs", "2", "--eval_steps", "2", "--num_eval_prompts", "8", "--log_completions_steps", "0",
            "--logging_steps", "1", "--reward_funcs", f"{tmp_path / 'length_reward.py'}:length"]


PPO_KEYS = ("loss/policy_avg", "loss/value_avg", "objective/kl", "objective/scores", "policy/approxkl_avg",
            "val/ratio", "grad_norm", "eval/gold_reward", "completions/mean_length")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param("zero3", marks=needs_deepspeed), "fsdp2"])
def test_ppo_resume_equals_uninterrupted(init_model, tmp_path, mode):
    """ppo.py on 2 processes with real sampling, resumed from its rollout-2 checkpoint (policy + value module,
    optimizer, scheduler, adaptive-KL state, both ranks' RNG), ends with the uninterrupted run's rollout-3
    statistics and final policy."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    flags = ["--model_name_or_path", str(init_model), "--max_steps", "3", "--num_mini_batches", "2",
             "--num_ppo_epochs", "2", "--eval_steps", "0", "--log_completions_steps", "0", "--logging_steps", "1",
             "--save_steps", "2", "--per_device_train_batch_size", "4",
             "--reward_funcs", f"{tmp_path / 'length_reward.py'}:length"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(launcher(mode), ROOT / "algos" / "ppo.py", [*flags, "--output_dir", str(full)])
    proc = run(launcher(mode), ROOT / "algos" / "ppo.py", [*flags, "--output_dir", str(resumed), "--resume_from",
                                                           str(full / "checkpoint-2")])
    assert "resumed from" in proc.stdout and "at rollout 2" in proc.stdout
    a, b = read_metrics(full)[-1], read_metrics(resumed)[-1]
    assert a["step"] == b["step"] == 3
    for key in ("loss/policy_avg", "loss/value_avg", "objective/kl", "objective/scores", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    pa, pb = load_params(full), load_params(resumed)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("mode", [pytest.param("ddp", marks=pytest.mark.slow),
                                  pytest.param("zero2", marks=[*needs_deepspeed, pytest.mark.slow]),
                                  pytest.param("zero3", marks=needs_deepspeed), "fsdp2"])
def test_ppo_two_processes_match_one(init_model, tmp_path, mode):
    """ppo.py's policy and value model, prepared as one module, are partitioned / sharded together (per-process
    shard sizes of both), on identical samples (a deterministic fake sampler): every logged loss and statistic of
    both rollouts, the held-out greedy evaluation and the final policy equal one process with twice the per-device
    batch; the final save is the policy alone (one process's files) and reloads with plain transformers to one
    process's logits."""
    wrapper = write_fake_sampler(tmp_path, "ppo.py")
    flags = ppo_flags(tmp_path, init_model)
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable], wrapper, [*flags, "--per_device_train_batch_size", "8", "--output_dir", str(one)])
    proc = run(launcher(mode), wrapper, [*flags, "--per_device_train_batch_size", "4", "--output_dir", str(two)])
    assert f"distributed: {DESCRIPTION[mode]} on 2 processes" in proc.stdout
    policy = load_params(init_model)
    backbone = sum(v.numel() for k, v in policy.items() if k.startswith("model."))
    assert sharding(proc.stdout)[0][1] == sum(v.numel() for v in policy.values()) + backbone + 192  # + value model
    assert_really_sharded(mode, proc.stdout)
    assert_matches_one_process(one, two, keys=PPO_KEYS, atol=1e-5)
    assert read_metrics(one)[-1]["objective/kl"] != 0.0  # rollout 2 samples the updated policy: the KL works
    ids = torch.tensor([[1, 20, 30, 11, 40, 29, 50]])
    torch.testing.assert_close(logits(two, ids), logits(one, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", [pytest.param("zero2", marks=[*needs_deepspeed, pytest.mark.slow]),
                                  pytest.param("zero3", marks=needs_deepspeed),
                                  pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_rest_em_reset_to_the_base_model_matches_one_process(init_model, tmp_path, mode):
    """rest_em.py restarts every M-step from the base model (distributed.load_full_state_dict into the partitioned /
    sharded policy, and under DeepSpeed into the optimizer's float32 master copy, which the next step would
    otherwise write back): on identical samples, both iterations' losses and saved weights equal one process's, so
    the second M-step started from the base weights and not from the first's result."""
    wrapper = write_fake_sampler(tmp_path, "rest_em.py")
    flags = ["--model_name_or_path", str(init_model), "--iterations", "2", "--prompts_per_iteration", "8",
             "--num_generations", "2", "--threshold", "-inf", "--sft_steps", "2", "--warmup_steps", "1",
             "--eval_steps", "0", "--logging_steps", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable], wrapper, [*flags, "--per_device_train_batch_size", "8", "--output_dir", str(one)])
    proc = run(launcher(mode), wrapper, [*flags, "--per_device_train_batch_size", "4", "--output_dir", str(two)])
    assert_really_sharded(mode, proc.stdout)
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["kept"] for r in m1] == [r["kept"] for r in m2] == [16, 16]
    for a, b in zip(m1, m2):
        assert b["sft/loss"] == pytest.approx(a["sft/loss"], rel=1e-5)
    for it in (1, 2):
        p1, p2 = load_params(one / f"checkpoint-{it}"), load_params(two / f"checkpoint-{it}")
        for k in p1:
            torch.testing.assert_close(p2[k], p1[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("mode", [pytest.param("zero3", marks=needs_deepspeed), "fsdp2"])
def test_vmpo_old_policy_copy_is_the_whole_policy(init_model, tmp_path, mode):
    """vmpo.py's old policy (a plain model) is a hard copy of the partitioned / sharded policy every
    --old_policy_sync_steps steps (distributed.full_state_dict): in the checkpoint written at a sync step, the old
    policy's weights are exactly the gathered policy's, and both moved away from the initial weights."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    proc = run(launcher(mode), write_fake_sampler(tmp_path, "vmpo.py"),
               ["--model_name_or_path", str(init_model), "--max_steps", "2", "--old_policy_sync_steps", "2",
                "--save_steps", "2", "--k", "2", "--per_device_train_batch_size", "8", "--eval_steps", "0",
                "--log_completions_steps", "0", "--logging_steps", "1", "--output_dir", str(out),
                "--reward_funcs", f"{tmp_path / 'length_reward.py'}:length"])
    assert_really_sharded(mode, proc.stdout)
    assert read_metrics(out)[-1]["vmpo/old_policy_syncs"] == 1
    ckpt = out / "checkpoint-2"
    old, policy, init = load_file(str(ckpt / "state" / "model_old_policy.safetensors")), load_params(ckpt), \
        load_params(init_model)
    for k in policy:  # a tied embedding is stored once: under the head's name in a state/ file
        tied = "lm_head.weight" if k == "model.embed_tokens.weight" and k not in old else k
        torch.testing.assert_close(old[tied], policy[k], atol=0, rtol=0, msg=k)
    assert any(not torch.equal(policy[k], init[k]) for k in init)


# ----------------------------------------------------------------------------- start-up refusals
BLOCK_DEEPSPEED = ("import runpy, sys; sys.modules['deepspeed'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_deepspeed_config_without_deepspeed_fails_at_startup(tmp_path):
    """A DeepSpeed launch (the variables `accelerate launch --config_file zero2_cpu.yaml` sets) where deepspeed
    cannot be imported stops before any model loads or anything is written, naming the install command."""
    out = tmp_path / "run"
    proc = run([sys.executable, "-c", BLOCK_DEEPSPEED], ROOT / "algos" / "sft.py", ["--output_dir", str(out)],
               check=False, timeout=300, env={"ACCELERATE_USE_DEEPSPEED": "true",
                                              "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    assert proc.returncode != 0
    assert "deepspeed is not installed. Install the optional extra: pip install deepspeed==0.19.8" in proc.stderr
    assert not out.exists()


@pytest.mark.deepspeed
@skip_without_deepspeed
def test_deepspeed_with_accelerate_cpu_mode_fails_at_startup(tmp_path):
    """DeepSpeed asked for together with accelerate's CPU mode (which silently drops DeepSpeed and runs DDP)."""
    out = tmp_path / "run"
    proc = run([sys.executable], ROOT / "algos" / "sft.py", ["--output_dir", str(out)], check=False, timeout=300,
               env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "true"})
    assert proc.returncode != 0 and "silently drops DeepSpeed: launch without --cpu" in proc.stderr
    assert not out.exists()


def test_fsdp_that_cannot_shard_fails_at_startup(tmp_path):
    """An FSDP config on a single CPU process (no process group to shard over) is refused instead of silently
    training unsharded."""
    out = tmp_path / "run"
    proc = run([sys.executable], ROOT / "algos" / "sft.py", ["--output_dir", str(out)], check=False, timeout=300,
               env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert proc.returncode != 0 and "the accelerate config asks for FSDP, but the processes came up as" in proc.stderr
    assert "fsdp2_cpu.yaml" in proc.stderr and not out.exists()
