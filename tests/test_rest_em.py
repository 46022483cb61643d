"""ReST-EM: the filter against a reference loop, the M-step batches and loss by hand, bad flags, iteration 1 with
--threshold -inf against algos/sft.py on the same samples, resume at an iteration boundary against an uninterrupted
run. Test names point at the numbered implementation details of algos/rest_em.py's docstring."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from conftest import assert_params_close, load_params, read_metrics, run_script

import rest_em

NAN = float("nan")


def reference_keep(rewards, terminated, threshold, top, keep_truncated):
    """The filter by plain loops: pass = scored, >= threshold, terminated (unless keep_truncated); then the `top`
    best passing per prompt, ties by first index."""
    out = []
    for r_row, t_row in zip(rewards, terminated):
        passing = [k for k, (r, t) in enumerate(zip(r_row, t_row))
                   if not math.isnan(r) and r >= threshold and (t or keep_truncated)]
        if top is not None:
            passing = sorted(passing, key=lambda k: (-r_row[k], k))[:top]
        out.append([k in passing for k in range(len(r_row))])
    return out


# ----------------------------------------------------------------------------- tier 1
def test_detail_3_filter_keeps_exactly_the_passing_samples():
    r = torch.tensor([[1.0, 0.0, 1.0, NAN], [0.5, 0.7, 0.7, 0.2]])
    t = torch.tensor([[True, True, False, True], [True, True, True, True]])
    assert rest_em.keep_mask(r, t, 1.0).tolist() == [[True, False, False, False], [False] * 4]
    assert rest_em.keep_mask(r, t, 1.0, keep_truncated=True).tolist() == [[True, False, True, False], [False] * 4]
    assert rest_em.keep_mask(r, t, 0.5, top_per_prompt=1).tolist() == [[True, False, False, False],
                                                                       [False, True, False, False]]
    everything = rest_em.keep_mask(r, t, -math.inf, keep_truncated=True)
    assert everything.tolist() == (~torch.isnan(r)).tolist()  # -inf keeps every scored sample, never an unscored one
    rng = random.Random(0)
    for _ in range(300):
        P, K = rng.randint(1, 4), rng.randint(1, 6)
        rw = [[rng.choice([NAN, 0.0, 1.0, 0.5, -1.0]) for _ in range(K)] for _ in range(P)]
        tm = [[rng.random() < 0.8 for _ in range(K)] for _ in range(P)]
        thr, top, kt = rng.choice([-math.inf, 0.0, 0.5, 1.0]), rng.choice([None, 1, 2]), rng.random() < 0.5
        got = rest_em.keep_mask(torch.tensor(rw), torch.tensor(tm), thr, top, kt).tolist()
        assert got == reference_keep(rw, tm, thr, top, kt), (rw, tm, thr, top, kt)


def test_sft_loss_is_the_global_token_mean_nll():
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert rest_em.sft_loss(logps, mask, num_items=6.0).item() == pytest.approx(3.5 / 6)


def test_detail_4_batches_are_sfts_order_and_a_small_kept_set_is_cycled():
    from common import data

    for step in range(5):
        assert rest_em.sft_batch_indices(40, 8, step, 1001) == data.batch_indices(40, 8, step, 1001)
    stream = [i for step in range(3) for i in rest_em.sft_batch_indices(3, 5, step, 7)]  # 15 = 5 epochs of 3 rows
    assert all(sorted(stream[e * 3:(e + 1) * 3]) == [0, 1, 2] for e in range(5))
    assert rest_em.sft_batch_indices(3, 5, 2, 7) == rest_em.sft_batch_indices(3, 5, 2, 7)  # pure function


def test_check_args_refuses_bad_flags():
    bad = [({"threshold": NAN}, "--threshold"), ({"threshold": math.inf}, "--threshold"),
           ({"top_per_prompt": 0}, "--top_per_prompt"), ({"iterations": 0}, "--iterations"),
           ({"sft_steps": 0}, "--sft_steps")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            rest_em.check_args(rest_em.Args(**kwargs))
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        rest_em.check_args(rest_em.Args(prompts_per_iteration=5), num_processes=2)
    rest_em.check_args(rest_em.Args())


@pytest.mark.parametrize("plain_head", [True, False])
def test_m_step_log_probs_without_full_logits_equal_the_full_logit_computation(monkeypatch, plain_head):
    """The M-step's per-token log-probs, token accuracy, loss and gradients (the chunked head, several blocks of
    positions; or a model's own logits when its head is not a plain linear layer) = the full (B, T, V) float32
    log-softmax of the model's logits, to 1e-5."""
    from common import data, model as model_utils

    tok = model_utils.load_tokenizer("toy")
    model = model_utils.load_causal_lm("toy", tok, seed=3)
    V = model.config.vocab_size
    monkeypatch.setitem(model_utils.LOGPS_CHUNK_ELEMENTS, "cpu", 5 * V)  # 5 positions per block
    if not plain_head:
        monkeypatch.setattr(model_utils, "PLAIN_HEAD_MODELS", set())
    assert (model_utils.chunked_head(model) is not None) == plain_head
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, V, (n,), generator=g).tolist() for n in (3, 7, 5)]
    completions = [torch.randint(4, V, (n,), generator=g).tolist() for n in (6, 2, 9)]
    batch = data.batch_prompt_completion(prompts, completions, tok.pad_token_id)
    T = batch["completion_mask"].shape[1]
    mask = batch["completion_mask"].float()

    logps, argmax = rest_em.completion_token_logps(model, batch)
    loss = rest_em.sft_loss(logps, mask, num_items=13.0)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=model_utils.position_ids_from_mask(batch["attention_mask"])).logits[:, -T - 1:-1]
    targets = batch["input_ids"][:, -T:]
    ref_logps = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]  # (B, T)
    ref_loss = -(ref_logps * mask).sum() / 13.0
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    assert logps.shape == (3, T) and torch.allclose(logps, ref_logps, atol=1e-5, rtol=0)
    assert torch.equal(argmax, logits.argmax(-1))
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert sum(b.abs().sum() for b in ref_grads) > 0  # the comparison can fail: the gradients are not all zero


# ----------------------------------------------------------------------------- tier 2: runs
SFT = {"learning_rate": "1e-4", "warmup_steps": "2", "sft_steps": "4", "per_device_train_batch_size": "16"}
RUN = ["--iterations", "2", "--prompts_per_iteration", "16", "--num_generations", "4", "--threshold", "-inf",
       "--num_eval_prompts", "16", "--logging_steps", "0", "--max_new_tokens", "6",
       *[x for k, v in SFT.items() for x in (f"--{k}", v)]]
VARYING = ("time", "sft/seconds", "tokens_per_second/generation")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, toy_policy):
    out = tmp_path_factory.mktemp("rest_em") / "full"
    run_script("rest_em.py", "--output_dir", str(out), *RUN)
    return out


def run_sft_on(kept, seed: int, out):
    """algos/sft.py on a kept file, from the base model, with the M-step's batches (seed) and schedule."""
    run_script("sft.py", "--output_dir", str(out), "--model_name_or_path", "toy-sft", "--dataset_name", str(kept),
               "--seed", str(seed), "--lr_scheduler", "constant", "--max_steps", SFT["sft_steps"],
               "--learning_rate", SFT["learning_rate"], "--warmup_steps", SFT["warmup_steps"],
               "--per_device_train_batch_size", SFT["per_device_train_batch_size"],
               "--logging_steps", SFT["sft_steps"], "--eval_steps", "0", "--save_steps", "0")
    (rec,) = read_metrics(out)
    return rec


def test_iteration_1_with_threshold_minus_inf_is_sft_on_all_its_samples(full_run, tmp_path, toy_policy):
    recs = {r["step"]: r for r in read_metrics(full_run)}
    assert sorted(recs) == [0, 1, 2]
    it1 = recs[1]
    # every sample that ended with EOS is kept (detail 3); the kept file holds exactly them
    assert it1["samples"] == 64 and it1["kept"] == round(64 * (1 - it1["completions/clipped_ratio"]))
    kept = full_run / "data" / "iteration-1.kept.jsonl"
    assert len(kept.read_text().splitlines()) == it1["kept"] >= 16
    samples = [json.loads(line) for line in (full_run / "data" / "iteration-1.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all(len(s["completions"]) == 4 for s in samples)
    # algos/sft.py on those samples from the same base model, batches of seed 1000 * 1 + 1: same loss, same weights
    rec = run_sft_on(kept, 1001, tmp_path / "sft1")
    assert rec["loss"] == pytest.approx(it1["sft/loss"], rel=1e-5)
    assert_params_close(tmp_path / "sft1", full_run / "checkpoint-1", atol=1e-6)
    before, after = load_params(toy_policy), load_params(full_run / "checkpoint-1")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the comparison can fail: weights moved


def test_m_step_starts_from_the_base_model_every_iteration(full_run, tmp_path):
    """Iteration 2 samples from π_1 but fine-tunes π_0 (ReST-EM): sft.py from toy-sft on its kept set gives π_2."""
    rec = run_sft_on(full_run / "data" / "iteration-2.kept.jsonl", 1002, tmp_path / "sft2")
    assert rec["loss"] == pytest.approx(read_metrics(full_run)[2]["sft/loss"], rel=1e-5)
    assert_params_close(tmp_path / "sft2", full_run / "checkpoint-2", atol=1e-6)
    assert_params_close(full_run, full_run / "checkpoint-2", atol=0.0)  # the final model is π_2


def test_detail_6_resume_at_an_iteration_boundary_equals_the_uninterrupted_run(full_run, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(full_run, part)
    shutil.rmtree(part / "checkpoint-2")  # the run stopped after iteration 1's checkpoint
    for f in ("model.safetensors", "config.json"):
        (part / f).unlink()
    run_script("rest_em.py", "--output_dir", str(part), "--resume_from", "auto", *RUN)
    assert_params_close(part, full_run, atol=0.0)
    a, b = read_metrics(full_run), read_metrics(part)
    assert [r["step"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in VARYING} == {k: v for k, v in rb.items() if k not in VARYING}
    assert (part / "data" / "iteration-2.kept.jsonl").read_text() == \
        (full_run / "data" / "iteration-2.kept.jsonl").read_text()


@pytest.mark.slow
def test_detail_5_two_processes_with_accumulation_give_the_one_process_update(tmp_path):
    """Identical samples (a deterministic fake sampler): 2 processes x 4 sequences x 2 accumulation steps = 1 process x
    16 sequences, in the M-step loss and the weights of every iteration."""
    from conftest import run_with_fake_sampler

    flags = ["--iterations", "2", "--prompts_per_iteration", "8", "--num_generations", "4", "--threshold", "-inf",
             "--sft_steps", "3", "--warmup_steps", "1", "--eval_steps", "0", "--logging_steps", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_with_fake_sampler(tmp_path, "rest_em.py", [*flags, "--per_device_train_batch_size", "16",
                                                   "--output_dir", str(one)], 1)
    run_with_fake_sampler(tmp_path, "rest_em.py", [*flags, "--per_device_train_batch_size", "4",
                                                   "--gradient_accumulation_steps", "2", "--output_dir", str(two)], 2)
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["kept"] for r in m1] == [r["kept"] for r in m2] == [32, 32]
    for a, b in zip(m1, m2):
        assert a["sft/loss"] == pytest.approx(b["sft/loss"], rel=1e-5)
    for it in (1, 2):
        assert_params_close(one / f"checkpoint-{it}", two / f"checkpoint-{it}", atol=2e-6)
