"""kto.py: the losses and the reference point against hand computations, the unpaired data plumbing
(common/preference.py), start-up errors, and short runs through the real entry point (a logged step checked by hand,
2 processes x accumulation 2 = 1 process, exact resume, reload)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import accelerate_launcher, read_metrics, run_script
from kto import (Args, balance_warning, check_args, check_batch, check_labels, kto_losses, main,
                 mismatched_completions, packed_batch, padded_batch, reference_point, sequence_logps)


def sig(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- math: hand computations
def test_kto_per_example_is_half_lambda_at_policy_equal_reference():
    """ALGORITHMS.md 7, test 1: r = 0 and z = 0 give λ(1 - σ(0)) = λ/2 for both kinds of example."""
    labels = torch.tensor([True, False, True, False])
    got = kto_losses(torch.zeros(4, dtype=torch.float64), labels, 0.0, 0.1, 1.5, 0.7)
    assert got.tolist() == pytest.approx([0.75, 0.35, 0.75, 0.35])
    # apo_zero_unpaired at r = 0 is λ/2 as well
    got = kto_losses(torch.zeros(4, dtype=torch.float64), labels, 0.0, 0.1, 1.5, 0.7, "apo_zero_unpaired")
    assert got.tolist() == pytest.approx([0.75, 0.35, 0.75, 0.35])


def test_kto_and_apo_zero_unpaired_losses_hand_computation():
    r = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    labels = torch.tensor([True, False, False, True])
    beta, z, wd, wu = 0.5, 0.8, 1.2, 0.9
    want = [wd * (1 - sig(beta * (2.0 - z))), wu * (1 - sig(beta * (z + 1.0))), wu * (1 - sig(beta * (z - 0.5))),
            wd * (1 - sig(beta * (3.0 - z)))]
    assert kto_losses(r, labels, z, beta, wd, wu).tolist() == pytest.approx(want, rel=1e-12)
    # APO-zero ignores z: desirable 1 - σ(βr), undesirable σ(βr)
    want = [wd * (1 - sig(1.0)), wu * sig(-0.5), wu * sig(0.25), wd * (1 - sig(1.5))]
    assert kto_losses(r, labels, z, beta, wd, wu, "apo_zero_unpaired").tolist() == pytest.approx(want, rel=1e-12)
    # z carries no gradient: d L_D / d r = -β λ_D σ'(β(r - z))
    rg = r.clone().requires_grad_(True)
    kto_losses(rg, labels, z, beta, wd, wu).sum().backward()
    s = sig(beta * (2.0 - z))
    assert rg.grad[0].item() == pytest.approx(-beta * wd * s * (1 - s))


def test_kto_with_z_clamped_to_zero_is_exactly_apo_zero_unpaired():
    """Detail 6: once the mismatched-pair estimate is negative, z = 0 and 1 - σ(β(0 - r)) = σ(βr): kto's losses and
    gradients are apo_zero_unpaired's (on toy:add the estimate is negative at almost every step, so the two
    benchmark rows nearly coincide); any z > 0 separates them."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(16, generator=g, dtype=torch.float64) * 5
    labels = torch.rand(16, generator=g) > 0.5
    kto0 = kto_losses(r, labels, reference_point(-7.0, 16), 0.3, 1.1, 0.8)
    apo = kto_losses(r, labels, 0.0, 0.3, 1.1, 0.8, "apo_zero_unpaired")
    assert torch.allclose(kto0, apo, rtol=1e-12, atol=0)
    shifted = kto_losses(r, labels, reference_point(7.0, 16), 0.3, 1.1, 0.8)
    assert (shifted[labels] > apo[labels]).all() and (shifted[~labels] < apo[~labels]).all()


def test_detail2_mismatched_pairs_and_detail3_clamped_reference_point():
    assert mismatched_completions(2) == [1, 0]
    assert mismatched_completions(5) == [4, 0, 1, 2, 3]
    shift = mismatched_completions(4)
    assert all(shift[j] != j for j in range(4)) and sorted(shift) == list(range(4))  # every completion used once
    assert reference_point(3.0, 4) == 0.75
    assert reference_point(-3.0, 4) == 0.0  # clamped at 0
    with pytest.raises(AssertionError):
        mismatched_completions(1)


def test_balance_warning_follows_the_papers_range():
    assert balance_warning(100, 100, 1.0, 1.0) is None
    assert balance_warning(120, 100, 1.0, 1.0) is None  # 1.2 in [1, 4/3]
    assert balance_warning(4510, 4484, 1.0, 1.0) is None  # 1.006: in range
    msg = balance_warning(100, 300, 1.0, 1.0)  # 1/3: too few desirable examples
    assert msg is not None and "--desirable_weight in [3, 4]" in msg and "--undesirable_weight in [0.25, 0.333]" in msg
    assert balance_warning(100, 300, 3.5, 1.0) is None and balance_warning(100, 300, 1.0, 0.3) is None
    assert balance_warning(200, 100, 1.0, 1.0) is not None  # 2 > 4/3


# ----------------------------------------------------------------------------- data (common/preference.py)
def test_unpaired_tokenisation_truncation_sides_and_bad_labels():
    from datasets import Dataset

    from common import data, preference, toy

    tok = toy.make_tokenizer()
    ds = Dataset.from_list([{"prompt": "12+34=", "completion": "46", "label": True},
                            {"prompt": "1+2=", "completion": "4", "label": False}])
    rows, dropped = preference.tokenize_unpaired(ds, tok, None, None)
    assert [(tok.decode(p), tok.decode(c), y) for p, c, y in rows] == [("<bos>12+34=", "46<eos>", True),
                                                                        ("<bos>1+2=", "4<eos>", False)]
    # the prompt keeps its last tokens, the completion its first ones; a prompt filling max_length is dropped
    rows, dropped = preference.tokenize_unpaired(ds, tok, 6, 4)
    assert [(tok.decode(p), tok.decode(c)) for p, c, _ in rows] == [("+34=", "46"), ("1+2=", "4<eos>")]
    rows, dropped = preference.tokenize_unpaired(ds, tok, 7, None)
    assert len(rows) == 1 and dropped == 1
    # a preference pair becomes two unpaired rows, chosen desirable
    pairs = Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    assert data.unpair_preference(pairs).to_list() == [{"prompt": "1+1=", "completion": "2", "label": True},
                                                       {"prompt": "1+1=", "completion": "3", "label": False}]
    with pytest.raises(data.DatasetFormatError, match="row 1: label 2"):
        preference.tokenize_unpaired(Dataset.from_list([{"prompt": "a", "completion": "b", "label": 1},
                                                        {"prompt": "a", "completion": "b", "label": 2}]),
                                     tok, None, None)


def test_completion_batch_layout_and_sequence_logps_match_single_rows():
    """Detail 4: [left-padded prompt | right-padded completion] with an explicit mask; S of a row in a padded batch
    equals S of the row alone; a mismatched row longer than max_length keeps its completion's first tokens."""
    from common import model as model_utils, preference, toy

    tok = toy.make_tokenizer()
    pad = tok.pad_token_id
    b = preference.completion_batch([[1, 20, 21], [1]], [[30, 2], [31, 32, 33, 2]], pad, "cpu")
    assert b["input_ids"].tolist() == [[1, 20, 21, 30, 2, pad, pad], [pad, pad, 1, 31, 32, 33, 2]]
    assert b["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    cut = preference.completion_batch([[1, 20, 21]], [[30, 31, 32, 2]], pad, "cpu", max_length=5)
    assert cut["input_ids"].tolist() == [[1, 20, 21, 30, 31]]
    model = model_utils.load_causal_lm("toy", tok, seed=0).eval()
    with torch.no_grad():
        seq, _ = sequence_logps(model, padded_batch([[1, 20, 21], [1]], [[30, 2], [31, 32, 33, 2]], pad, "cpu", None))
        for i, (p, c) in enumerate([([1, 20, 21], [30, 2]), ([1], [31, 32, 33, 2])]):
            ids = torch.tensor([p + c])
            alone = model_utils.completion_logps(model, ids, torch.ones_like(ids), len(c)).sum()
            assert seq[i].item() == pytest.approx(alone.item(), abs=1e-5)


# variable-length examples: prompts of 1 to 9 tokens, completions of 1 to 7 (the last one cut by max_length 12)
PROMPTS = [[1, 20, 21], [1], [1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 22, 23, 24], [1, 25]]
COMPLETIONS = [[30, 2], [31, 32, 33, 2], [9, 2], [34, 35, 36, 37, 38, 39, 2],
               [40, 41, 42, 43, 44, 45, 46, 47, 48, 3, 4, 2]]


def _full_logits_reference(model, prompts, completions, max_length):
    """Per example, from the logits of that sequence alone (no padding, no packing): S, Σ over its completion tokens
    of the mean logit and of the entropy, and its token count."""
    seqs, stats = [], {"mean_logits": [], "entropy": [], "tokens": []}
    for p, c in zip(prompts, completions):
        c = c[:max(1, max_length - len(p))]
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()  # (T, V): position t-1 predicts token t
        lp = torch.log_softmax(logits, -1)
        seqs.append(lp.gather(-1, torch.tensor(c)[:, None]).sum())
        stats["mean_logits"].append(logits.mean(-1).sum().detach())
        stats["entropy"].append(-(lp.exp() * lp).sum(-1).sum().detach())
        stats["tokens"].append(torch.tensor(float(len(c))))
    return torch.stack(seqs), {k: torch.stack(v) for k, v in stats.items()}


@pytest.mark.parametrize("plain_head", [True, False])
def test_detail4_both_layouts_give_each_sequences_full_logits_logps_stats_and_gradients(plain_head, monkeypatch):
    """Detail 4: S, the mean-logit and entropy sums of every example, padded or packed, through the chunked head (or
    the forward's logits for a model outside PLAIN_HEAD_MODELS) equal those of each sequence's full logits alone to
    1e-5, and so do the parameter gradients of a weighted sum of S; a packed batch has no pad inside a sequence."""
    from common import model as model_utils, toy

    tok = toy.make_tokenizer()
    model = model_utils.load_causal_lm("toy", tok, seed=0).eval()
    if not plain_head:
        monkeypatch.setattr(model_utils, "PLAIN_HEAD_MODELS", set())
    assert (model_utils.chunked_head(model) is not None) == plain_head
    w = torch.tensor([0.7, -1.3, 0.2, 1.1, -0.4])
    want, want_st = _full_logits_reference(model, PROMPTS, COMPLETIONS, 12)
    model.zero_grad()
    (want * w).sum().backward()
    want_grad = {k: p.grad.clone() for k, p in model.named_parameters()}
    for make in (padded_batch, packed_batch):
        batch = make(PROMPTS, COMPLETIONS, tok.pad_token_id, "cpu", 12)
        model.zero_grad()
        seq, st = sequence_logps(model, batch, want_stats=True, want_entropy=True)
        assert torch.allclose(seq, want.detach(), atol=1e-5, rtol=0), make.__name__
        for k in ("mean_logits", "entropy", "tokens"):
            assert torch.allclose(st[k], want_st[k], atol=1e-5, rtol=0), (make.__name__, k)
        (seq * w).sum().backward()
        for k, p in model.named_parameters():
            assert torch.allclose(p.grad, want_grad[k], atol=1e-5, rtol=1e-5), (make.__name__, k)
    packed = packed_batch(PROMPTS, COMPLETIONS, tok.pad_token_id, "cpu", 12)
    assert packed["input_ids"].shape[1] == 12 and packed["input_ids"].shape[0] < len(PROMPTS)  # rows of the longest
    assert packed["targets"].numel() == int(want_st["tokens"].sum())  # only completion tokens reach the head


def test_detail4_packed_batch_gives_the_unpacked_z_and_losses():
    """--packing: the mismatched pairs (detail 3) and the examples, packed, give the padded batch's z, log-ratios
    and per-example KTO losses to 1e-5 (a reference unlike the policy, so r and z are far from 0)."""
    from common import model as model_utils, toy

    tok = toy.make_tokenizer()
    policy = model_utils.load_causal_lm("toy", tok, seed=0).eval()
    ref = model_utils.load_causal_lm("toy", tok, seed=5).eval()
    labels = torch.tensor([True, False, True, False, False])
    shift = mismatched_completions(len(PROMPTS))
    got = {}
    with torch.no_grad():
        for make in (padded_batch, packed_batch):
            kl = make(PROMPTS, [COMPLETIONS[j] for j in shift], tok.pad_token_id, "cpu", 12)
            raw = float((sequence_logps(policy, kl)[0] - sequence_logps(ref, kl)[0]).sum())
            b = make(PROMPTS, COMPLETIONS, tok.pad_token_id, "cpu", 12)
            r = sequence_logps(policy, b)[0] - sequence_logps(ref, b)[0]
            z = reference_point(raw + 60.0, len(PROMPTS))  # shifted up so the clamp at 0 does not hide z
            got[make.__name__] = (raw, r, kto_losses(r, labels, z, 0.5, 1.2, 0.9))
    (raw_a, r_a, l_a), (raw_b, r_b, l_b) = got["padded_batch"], got["packed_batch"]
    assert abs(raw_a) > 1.0 and r_a.abs().max() > 0.5  # far from 0: the check has teeth
    assert raw_b == pytest.approx(raw_a, abs=1e-5)
    assert torch.allclose(r_b, r_a, atol=1e-5, rtol=0) and torch.allclose(l_b, l_a, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- start-up errors
@pytest.mark.parametrize("flags,match", [
    ({"loss_type": "kto_pair"}, "--loss_type"),
    ({"beta": 0.0}, "--beta"),
    ({"desirable_weight": -1.0}, "--desirable_weight"),
    ({"max_length": 8, "max_prompt_length": 8}, "--max_prompt_length"),
])
def test_bad_configurations_raise(flags, match):
    with pytest.raises(ValueError, match=match):
        check_args(Args(**flags))


def test_detail2_a_global_batch_of_one_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="--per_device_train_batch_size 2"):
        check_batch(Args(per_device_train_batch_size=1), world=1)
    check_batch(Args(per_device_train_batch_size=1, gradient_accumulation_steps=2), world=1)  # two rows: fine
    check_batch(Args(per_device_train_batch_size=1, loss_type="apo_zero_unpaired"), world=1)  # no z needed


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_input_fails_before_any_model_loads_and_preference_data_is_converted(tmp_path, capsys):
    """Detail 1: one-kind data is refused with the counts; preference data is converted (said once); both before a
    model loads and before anything is written to output_dir."""
    only = _write(tmp_path / "only.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1), "label": True}
                                            for i in range(6)])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="6 desirable and 0 undesirable"):
        main(Args(dataset_name=only, model_name_or_path="toy", output_dir=str(out), per_device_train_batch_size=2))
    assert not out.exists()
    with pytest.raises(ValueError, match="6 desirable and 0 undesirable"):
        check_labels([([1], [2], True)] * 6, 1.0, 1.0)
    pairs = _write(tmp_path / "pairs.jsonl", [{"chosen": f"{i}+1={i + 1}", "rejected": f"{i}+1={i + 2}"}
                                              for i in range(3)])
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):  # 6 rows after conversion
        main(Args(dataset_name=pairs, model_name_or_path="toy", output_dir=str(out), per_device_train_batch_size=8))
    assert capsys.readouterr().out.count("preference data converted to unpaired rows") == 1
    assert not out.exists()
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "completion": "2", "label": "yes"}])
    from common import data

    with pytest.raises(data.DatasetFormatError, match="--dataset_name .*bad.jsonl, row 0: label 'yes'"):
        main(Args(dataset_name=bad, model_name_or_path="toy", output_dir=str(out)))
    assert not out.exists()


# ----------------------------------------------------------------------------- runs through the entry point
# a reference unlike the policy (a fresh toy init), so z and the rewards are far from 0 from the first step
RUN = ["--logging_steps", "1", "--learning_rate", "1e-3", "--ref_model_name_or_path", "toy", "--max_steps", "3",
       "--desirable_weight", "1.2", "--undesirable_weight", "0.9"]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, toy_policy):
    """1 process x 8 examples, 3 steps, a checkpoint per step, a small evaluation at the end."""
    out = tmp_path_factory.mktemp("kto") / "base"
    run_script("kto.py", *RUN, "--output_dir", str(out), "--per_device_train_batch_size", "8", "--save_steps", "1",
               "--save_total_limit", "5", "--eval_steps", "3", "--num_eval_rows", "16", "--num_eval_prompts", "8")
    return out


def test_run_first_step_matches_a_hand_computation_of_z_and_the_loss(base_run):
    """Details 2, 3 and 6: the logged kl of step 1 is max(0, mean over the batch of S^θ(y_{j-1}|x_j) -
    S^ref(y_{j-1}|x_j)), computed here with the two models, and the logged loss and rewards follow from it."""
    from common import data, model as model_utils, preference

    first = [r for r in read_metrics(base_run) if r["step"] == 1][0]
    tok = model_utils.load_tokenizer("toy-sft")
    policy = model_utils.load_causal_lm("toy-sft", tok).eval()
    ref = model_utils.load_causal_lm("toy", tok, seed=1).eval()  # the run's seed
    ds = data.load_data("toy:add", "train", toy_kind="unpaired")
    rows, _ = preference.tokenize_unpaired(ds.select(data.batch_indices(len(ds), 8, 0, 1)), tok, 1024, None)
    pad = tok.pad_token_id
    with torch.no_grad():
        kl_batch = padded_batch([r[0] for r in rows], [rows[j - 1][1] for j in range(8)], pad, "cpu", 1024)
        raw = (sequence_logps(policy, kl_batch)[0] - sequence_logps(ref, kl_batch)[0]).mean().item()
        batch = padded_batch([r[0] for r in rows], [r[1] for r in rows], pad, "cpu", 1024)
        r = sequence_logps(policy, batch)[0] - sequence_logps(ref, batch)[0]
    assert raw > 0.5  # not clamped here: the check has teeth
    assert first["kl"] == pytest.approx(raw, rel=1e-5)
    assert first["kl_estimate"] == pytest.approx(raw, rel=1e-5)  # the estimate before the clamp, logged beside z
    labels = torch.tensor([row[2] for row in rows])
    assert 0 < labels.sum() < 8
    want = [(1.2 if y else 0.9) * (1 - sig(0.1 * ((ri - raw) if y else (raw - ri)))) for ri, y in
            zip(r.tolist(), labels.tolist())]
    assert first["loss"] == pytest.approx(sum(want) / 8, rel=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.1 * r[labels].mean().item(), rel=1e-5)
    assert first["rewards/margins"] == pytest.approx(first["rewards/chosen"] - first["rewards/rejected"])
    assert first["count/chosen"] + first["count/rejected"] == 8
    train = [rec for rec in read_metrics(base_run) if rec["step"] > 0]
    for name in ("loss", "kl", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
                 "grad_norm", "num_tokens", "train/skipped_steps"):
        assert all(math.isfinite(rec[name]) for rec in train), name
    last = train[-1]
    for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "gold_reward"):
        assert math.isfinite(last["eval/" + name]), name


def test_two_processes_with_accumulation_match_one_batch(base_run, tmp_path):
    """Details 2, 3, 4, 5: 2 processes x accumulation 2 x 2 examples, packed (--packing) = 1 process x 8, padded:
    the same mismatched pairs, the same z, losses and weights."""
    two = tmp_path / "two"
    run_script("kto.py", *RUN, "--output_dir", str(two), "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "2", "--eval_steps", "0", "--packing", "True",
               launcher=accelerate_launcher(2), timeout=900)
    ref = {r["step"]: r for r in read_metrics(base_run) if r["step"] > 0}
    got = {r["step"]: r for r in read_metrics(two)}
    for step in (1, 2, 3):
        for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logits/rejected", "entropy"):
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4, abs=1e-6), (step, k)
    a, b = _weights(two), _weights(base_run)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def test_resume_is_exact_and_the_final_model_reloads(base_run, tmp_path, toy_policy):
    resumed = tmp_path / "resumed"
    run_script("kto.py", *RUN, "--output_dir", str(resumed), "--per_device_train_batch_size", "8",
               "--eval_steps", "0", "--resume_from", str(base_run / "checkpoint-2"), "--save_steps", "1",
               "--save_total_limit", "5")
    ra = {r["step"]: r for r in read_metrics(base_run)}
    rb = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(rb) == [3]
    for k in ("loss", "kl", "rewards/margins", "logps/chosen", "num_tokens"):
        assert rb[3][k] == pytest.approx(ra[3][k], rel=1e-6, abs=1e-9), k
    a, b = _weights(base_run), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_run)
    tok = AutoTokenizer.from_pretrained(base_run)
    start = _weights(toy_policy)
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items() if k in start)
    ids = tok("12+34=", return_tensors="pt", add_special_tokens=True).input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


@pytest.mark.slow
def test_learning_raises_heldout_gold_reward(tmp_path, toy_policy):
    """The default run: KTO on toy:add unpaired rows raises the greedy held-out exact match of the toy SFT policy
    and separates the implicit rewards of desirable and undesirable held-out examples."""
    out = tmp_path / "learn"
    run_script("kto.py", "--output_dir", str(out), timeout=3600)
    evals = [r for r in read_metrics(out) if "eval/gold_reward" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 200
    assert evals[-1]["eval/gold_reward"] > evals[0]["eval/gold_reward"] + 0.15, evals
    assert evals[-1]["eval/rewards/margins"] > 0.05
