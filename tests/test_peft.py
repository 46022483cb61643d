"""LoRA through PEFT (common/peft_utils.py; --use_peft in every training script): only the adapters (and the
modules trained fully) change, the reference model with the adapters off is the base model exactly, merged weights
give the adapter model's logits, saving / reloading / resuming is exact, bad module names fail at start-up listing the
model's modules, each script trains its adapters with the reference for free, and vLLM receives the merged weights.
The vLLM tests are marked `vllm` and skip without vllm (run them with
`.venv-vllm/bin/python -m pytest tests/test_peft.py -k vllm`)."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from common import checkpoint, peft_utils
from common.data import batch_prompt_completion
from common.model import completion_logps, load_causal_lm, load_reward_model, load_tokenizer, \
    sequence_classifier_scores
from conftest import ROOT, read_metrics, run_script

try:
    import vllm  # noqa: F401

    HAS_VLLM, WHY = True, ""
except Exception as e:  # absent, or a broken install
    HAS_VLLM, WHY = False, f"vllm is not importable ({type(e).__name__}: {e}); install the optional vllm extra"


def needs_vllm(test):
    """Marked `vllm` and skipped, saying why, where vllm is not importable."""
    return pytest.mark.vllm(pytest.mark.skipif(not HAS_VLLM, reason=WHY)(test))


def lora_args(**kw):
    base = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                lora_modules_to_save=None, merge_adapter=False, model_name_or_path="toy-sft", dataset_name="toy:add")
    return types.SimpleNamespace(**{**base, **kw})


def wrapped(toy_policy, task="CAUSAL_LM", **kw):
    """toy-sft (CAUSAL_LM) or the toy reward model (SEQ_CLS) with LoRA adapters (r 4, alpha 8)."""
    tok = load_tokenizer("toy-sft")
    if task == "SEQ_CLS":
        model = load_reward_model(str(toy_policy))[0]  # give it the reward model folder
    else:
        model = load_causal_lm("toy-sft", tok)
    return tok, peft_utils.maybe_wrap(model, lora_args(**kw), task=task)


def move_adapters(model, seed: int = 0, scale: float = 0.2):
    """Random A and B (B starts at zero): an adapter that changes the model's function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def a_batch(tok):
    prompts = [tok(tok.bos_token + p, add_special_tokens=False)["input_ids"] for p in ["3+4=", "12+55=", "41+9="]]
    comps = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in ["7", "67", "50"]]
    return batch_prompt_completion(prompts, comps, tok.pad_token_id)


def logps(model, b):
    with torch.no_grad():
        return completion_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"].shape[1])


# ----------------------------------------------------------------------------- what trains
def test_only_adapters_and_saved_modules_change(toy_policy):
    tok, model = wrapped(toy_policy, lora_modules_to_save=["model.norm"], lora_dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = a_batch(tok)
    model.train()
    for _ in range(3):  # B = 0 at the start: A gets its first gradient at step 2
        T = b["completion_mask"].shape[1]
        (-completion_logps(model, b["input_ids"], b["attention_mask"], T) * b["completion_mask"]).sum().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    adapters = [k for k in after if ".lora_A." in k or ".lora_B." in k]
    saved = [k for k in after if ".modules_to_save." in k]
    assert len(adapters) == 2 * 7 * 4 and saved == ["base_model.model.model.norm.modules_to_save.default.weight"]
    for k in after:
        changed = not torch.equal(before[k], after[k])
        assert changed == (k in adapters or k in saved), k  # the frozen base (norm's original too) never moves
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in adapters + saved}
    assert len(opt.state) == len(trainable)  # optimizer state for the adapters only


def test_reference_is_the_base_model_exactly(toy_policy):
    from common.generation import HFGenerator, SamplingConfig

    tok, model = wrapped(toy_policy, lora_dropout=0.5)
    # a frozen base (as the scripts' separate references are): on CPU, weights that do not require grad take another
    # matmul path whose last bit can differ, and the wrapped model's base weights are frozen
    base = load_causal_lm("toy-sft", tok).eval().requires_grad_(False)
    b = a_batch(tok)
    assert torch.equal(logps(model.eval(), b), logps(base, b))  # B = 0: the wrapped model starts as the base
    move_adapters(model)
    model.train()  # dropout on: the reference still runs in eval mode
    ref = peft_utils.reference_model(model)
    on = logps(model.eval(), b)
    assert (on - logps(base, b)).abs().max() > 0.1  # the adapters matter...
    model.train()
    assert torch.equal(logps(ref, b), logps(base, b))  # ...and are off in the reference, bit for bit
    assert model.training and torch.equal(logps(model.eval(), b), on)  # the policy is given back as it was
    cfg = SamplingConfig(max_new_tokens=6)
    prompts = [tok(tok.bos_token + p, add_special_tokens=False)["input_ids"] for p in ["3+4=", "66+33="]]
    assert HFGenerator(tok, cfg).generate(ref, prompts, greedy=True).texts == \
        HFGenerator(tok, cfg).generate(base, prompts, greedy=True).texts
    with pytest.raises(TypeError, match="needs a PeftModel"):
        peft_utils.reference_model(base)


def test_reward_model_reference_and_score_head(toy_rm):
    """SEQ_CLS: the score head is trained fully (modules_to_save); with the adapters off it is the original head."""
    tok, model = wrapped(toy_rm, task="SEQ_CLS")
    base = load_reward_model(str(toy_rm))[0].eval().requires_grad_(False)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == \
        {"base_model.model.score.modules_to_save.default.weight"}
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
    move_adapters(model)
    b = a_batch(tok)
    ids, am = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        want = sequence_classifier_scores(base, ids, am)
        with peft_utils.reference_model(model).adapters_off() as m:
            off = sequence_classifier_scores(m, ids, am)
        on = sequence_classifier_scores(model.eval(), ids, am)
    assert torch.equal(off, want) and (on - want).abs().min() > 1e-3


# ----------------------------------------------------------------------------- merged weights and saving
def test_merged_weights_give_the_adapter_models_logits(toy_policy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok, model = wrapped(toy_policy, lora_modules_to_save=["model.norm"])
    move_adapters(model)
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = a_batch(tok)
    want = logps(model, b)
    merged = peft_utils.merged_state_dict(model)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing merged in place
    fresh = load_causal_lm("toy-sft", tok).eval()
    assert set(merged) == set(fresh.state_dict())  # the base model's own names
    q = "model.layers.0.self_attn.q_proj.weight"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    by_hand = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged[q], by_hand, atol=1e-7, rtol=0)  # W + (alpha / r) B A, alpha / r = 2
    fresh.load_state_dict(merged)
    torch.testing.assert_close(logps(fresh, b), want, atol=2e-5, rtol=0)

    # save_model: an adapter folder (PeftModel.from_pretrained, exact) and with merged=True merged/ (from_pretrained)
    acc = Accelerator(cpu=True)
    checkpoint.save_model(acc, model, tok, tmp_path / "out", merged=True)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files and "merged" in files
    assert "model.safetensors" not in files and "README.md" not in files
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(toy_policy) and cfg["r"] == 4
    reloaded = PeftModel.from_pretrained(load_causal_lm("toy-sft", tok), str(tmp_path / "out")).eval()
    assert torch.equal(logps(reloaded, b), want)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged")).eval()
    torch.testing.assert_close(logps(plain, b), want, atol=2e-5, rtol=0)
    # a later run pointed at the adapter folder is told to use merged/
    with pytest.raises(ValueError, match="LoRA adapter folder.*merged/"):
        load_tokenizer(str(tmp_path / "out"))


# ----------------------------------------------------------------------------- start-up errors
def test_unknown_target_module_fails_at_startup_listing_the_models_modules(toy_policy, tmp_path):
    import sft as sft_script

    out = tmp_path / "bad"
    args = sft_script.Args(model_name_or_path="toy-sft", output_dir=str(out), use_peft=True, max_steps=1,
                           lora_target_modules=["q_proj", "qq_proj"])
    with pytest.raises(ValueError, match=r"--lora_target_modules qq_proj: no module .* linear layers: down_proj, "
                                         r"gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj; other"):
        sft_script.main(args)
    assert not out.exists()  # failed before anything was written
    for flags, match in [
        (dict(lora_target_modules=["mlp"]), "matches model.layers.0.mlp, a LlamaMLP; LoRA goes on linear"),
        (dict(lora_modules_to_save=["scores"]), "--lora_modules_to_save scores: no module"),
        (dict(lora_r=0), "--lora_r 0"),
        (dict(lora_dropout=1.0), "--lora_dropout 1.0"),
    ]:
        with pytest.raises(ValueError, match=match):
            peft_utils.check_args(lora_args(**flags))
    # a correct name passes the same check (on the meta device, no weights loaded)
    peft_utils.check_args(lora_args(lora_target_modules=["q_proj", "v_proj"]))
    peft_utils.check_args(lora_args(lora_target_modules=["score"], model_name_or_path=str(toy_policy)), task="SEQ_CLS")


# ----------------------------------------------------------------------------- save, reload, resume (exact)
def test_resume_restores_adapters_and_optimizer_exactly(tmp_path):
    import sft as sft_script

    common = dict(model_name_or_path="toy-sft", use_peft=True, per_device_train_batch_size=8, eval_steps=0,
                  logging_steps=1, save_steps=2, lr_decay_steps=4, warmup_steps=1, learning_rate=1e-2)
    full, part = tmp_path / "full", tmp_path / "part"
    sft_script.main(sft_script.Args(output_dir=str(full), max_steps=4, **common))
    sft_script.main(sft_script.Args(output_dir=str(part), max_steps=2, **common))
    state = load_file(str(part / "checkpoint-2" / "state" / "model_0.safetensors"))
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)  # no copy of the frozen base
    sft_script.main(sft_script.Args(output_dir=str(part), max_steps=4, resume_from="auto", **common))
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # the adapters trained
    la = [r["loss"] for r in read_metrics(full)]
    lb = [r["loss"] for r in read_metrics(part)]
    assert la == lb and len(la) == 4


# ----------------------------------------------------------------------------- every script, a short LoRA run
ONLINE = dict(per_device_train_batch_size=8, log_completions_steps=0)
# script -> (its flags for a 2-step run, metrics that must be exactly 0 at step 1: the reference is the policy with
# its adapters off, and B = 0 makes the starting policy equal to it)
RUNS = {
    "sft.py": (dict(model_name_or_path="toy-sft", per_device_train_batch_size=8, merge_adapter=True), []),
    "reward.py": (dict(per_device_train_batch_size=8, merge_adapter=True), []),
    "grpo.py": (dict(beta=0.04, num_generations=4, **ONLINE), ["kl"]),
    "gmpo.py": (dict(beta=0.04, num_generations=4, **ONLINE), ["kl"]),
    "rloo.py": (dict(num_generations=4, **ONLINE), ["kl"]),
    "online_dpo.py": (dict(**ONLINE), ["objective/kl", "rewards/margins"]),
    "xpo.py": (dict(**ONLINE), ["objective/kl", "rewards/margins"]),
    "nash_md.py": (dict(**ONLINE), ["objective/kl", "loss/kl"]),
    "orpo.py": (dict(per_device_train_batch_size=8), []),
    "cpo.py": (dict(per_device_train_batch_size=8), []),
    "prm.py": (dict(per_device_train_batch_size=8, merge_adapter=True), []),
    "vmpo.py": (dict(per_device_train_batch_size=8, num_eval_prompts=8), ["kl_ref", "vmpo/kl_mean"]),
    "dar.py": (dict(per_device_train_batch_size=8, num_eval_prompts=8), ["dar/kl_from_ref"]),
    "gkd.py": (dict(per_device_train_batch_size=8), []),
    "ppo.py": (dict(per_device_train_batch_size=8, num_eval_prompts=8), ["objective/kl"]),
    "dpo.py": (dict(per_device_train_batch_size=8), ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    "kto.py": (dict(per_device_train_batch_size=8), ["rewards/chosen", "rewards/rejected", "kl"]),
    "bco.py": (dict(per_device_train_batch_size=8), ["rewards/chosen", "rewards/rejected"]),
    "rest_em.py": (dict(iterations=2, sft_steps=2, prompts_per_iteration=8, num_generations=2,
                        per_device_train_batch_size=8), []),
}


def lora_run(script: str, out, **flags):
    import importlib

    module = importlib.import_module(script.removesuffix(".py"))
    kw, _ = RUNS[script]
    fields = {f.name for f in dataclasses.fields(module.Args)}
    common = {k: v for k, v in dict(max_steps=2, logging_steps=1, eval_steps=0, save_steps=0).items() if k in fields}
    args = module.Args(output_dir=str(out), use_peft=True, **{**common, **kw, **flags})
    module.main(args)
    return args


@pytest.mark.parametrize("script", list(RUNS))
def test_script_trains_its_adapters_with_the_reference_for_free(script, tmp_path, toy_policy, toy_rm):
    """Each script with --use_peft: the final folder is an adapter (no full copy of the weights), the adapters
    moved (B starts at zero), where the method has a reference the step-1 KL to it is exactly 0 (policy and
    reference are the same base weights), and with --merge_adapter the merged model differs from the starting one
    only in the adapted layers (and a reward model's score head, trained fully)."""
    from common.model import resolve

    out = tmp_path / "run"
    args = lora_run(script, out)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k), "the adapters did not move"
    recs = [r for r in read_metrics(out) if r["step"] > 0]
    assert [r["step"] for r in recs] == [1, 2]
    for name in RUNS[script][1]:
        assert recs[0][name] == 0.0, (name, recs[0][name])
    if args.merge_adapter:
        merged = load_file(str(out / "merged" / "model.safetensors"))
        start = load_file(str(resolve(args.model_name_or_path)) + "/model.safetensors")
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for k, v in merged.items():
            if k.startswith("score."):  # a reward model's head: trained fully, saved whole with the adapter
                assert torch.equal(v, adapter[f"base_model.model.{k}"])
            elif any(t in k for t in targets):
                assert not torch.equal(v, start[k]), k
            else:
                assert torch.equal(v, start[k]), k  # embeddings, norms: frozen


# ----------------------------------------------------------------------------- vLLM receives the merged weights
def sync_matches_the_lora_policy(gen, tok, model):
    """The engine is stale after the adapters move, and after sync_weights scores completions as the LoRA policy
    does; the policy itself is not changed by the sync (no in-place merge)."""
    from test_vllm import TOL, hf_logps, max_gap, prompt_ids

    prompts = prompt_ids(tok)
    fixed = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in ["7", "67", "87", "50", "99"]]
    model.eval()
    assert max_gap(gen.score(prompts, fixed), hf_logps(model, prompts, fixed)) < TOL  # B = 0: the base model
    for seed in range(2):
        move_adapters(model, seed)
        want = hf_logps(model, prompts, fixed)
        assert max_gap(gen.score(prompts, fixed), want) > 1e-2, "the engine matched before the sync"
        before = {k: v.clone() for k, v in model.state_dict().items()}
        gen.sync_weights(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert max_gap(gen.score(prompts, fixed), want) < TOL
        out = gen.generate(model, prompts, n=2)  # sampling uses the merged weights too
        comps = [c[m.bool()].tolist() for c, m in zip(out.completion_ids, out.completion_mask)]
        sampled = [out.sampler_logps[i, :len(c)].tolist() for i, c in enumerate(comps)]
        assert max_gap(sampled, hf_logps(model, [p for p in prompts for _ in range(2)], comps)) < TOL


@needs_vllm
def test_vllm_colocate_receives_merged_lora_weights(toy_policy):
    from common.generation import build_generator
    from test_vllm import make_args

    tok, model = wrapped(toy_policy)
    gen = build_generator(make_args(), tok, None, model)
    try:
        sync_matches_the_lora_policy(gen, tok, model)
    finally:
        gen.close()


@pytest.fixture
def lora_server(toy_policy, tmp_path):
    """scripts/vllm_server.py serving toy-sft (the base model) on a free loopback port: (port, token file)."""
    import subprocess
    import sys
    import time

    from common.vllm_backend import ServerClient
    from test_vllm import free_port, stop_server

    port, token_file = free_port(), tmp_path / "server.token"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "vllm_server.py"), "--model", "toy-sft",
                             "--port", str(port), "--kv_cache_gb", "0.0625", "--token_file", str(token_file)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {(tmp_path / 'server.log').read_text()}")
            try:
                ServerClient("127.0.0.1", port).wait_healthy(1)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
        yield port, token_file
    finally:
        stop_server(proc)
        log.close()


@needs_vllm
def test_vllm_server_receives_merged_lora_weights(toy_policy, lora_server):
    from common.generation import build_generator
    from test_vllm import make_args

    port, token_file = lora_server
    tok, model = wrapped(toy_policy)
    gen = build_generator(make_args(vllm_mode="server", vllm_server_port=port, vllm_server_token_file=str(token_file)),
                          tok, None, model)
    sync_matches_the_lora_policy(gen, tok, model)


@needs_vllm
def test_grpo_lora_with_colocated_vllm_samples_from_the_trained_policy(tmp_path):
    from test_vllm import E2E, check_run

    run_script("grpo.py", "--use_peft", "True", "--use_vllm", "True", "--vllm_mode", "colocate", "--beta", "0.04",
               "--num_generations", "4", "--per_device_train_batch_size", "8", "--logging_steps", "1",
               "--output_dir", str(tmp_path), *E2E)
    check_run(tmp_path)
    gaps = [r["sampling/sampling_logp_difference/max"] for r in read_metrics(tmp_path) if r["step"] > 0]
    assert len(gaps) == 2 and max(gaps) < 1e-4, gaps  # after an update too: the engine holds W + s·B·A


# ----------------------------------------------------------------------------- processes
@pytest.mark.slow  # two launches, one of 2 processes: about a minute on a loaded 2-core machine
def test_two_processes_match_one_with_lora(tmp_path):
    """2 processes x 8 completions = 1 process x 16 (DDP over the adapters only, the frozen base outside the
    reducer), on the same samples (conftest's deterministic sampler): the metrics and the trained adapters."""
    from conftest import LENGTH_REWARD, run_with_fake_sampler

    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    flags = ["--use_peft", "True", "--beta", "0.04", "--max_steps", "2", "--num_generations", "4", "--eval_steps",
             "0", "--log_completions_steps", "0", "--logging_steps", "1", "--reward_funcs",
             f"{tmp_path / 'length_reward.py'}:length"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_with_fake_sampler(tmp_path, "grpo.py", [*flags, "--per_device_train_batch_size", "16", "--output_dir",
                                                str(one)], 1)
    run_with_fake_sampler(tmp_path, "grpo.py", [*flags, "--per_device_train_batch_size", "8", "--output_dir",
                                                str(two)], 2)
    m1, m2 = read_metrics(one), read_metrics(two)
    assert len(m1) == len(m2) == 2 and m1[0]["kl"] == 0.0 and m1[1]["kl"] > 0
    for a, b in zip(m1, m2):
        for k in ("reward", "loss", "kl", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=0, msg=k)
