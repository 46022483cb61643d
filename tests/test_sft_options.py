"""sft.py's options for chat data and its alternative losses: assistant-only loss (detail 2), DFT (detail 3) and
NEFTune (detail 4), each against a hand construction; and one run per option through the entry point."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

import sft as sft_script
from common import data, model as model_utils, toy
from conftest import read_metrics, run_script

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "1+2="},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "4+5="},
    {"role": "assistant", "content": "9"},
    {"role": "user", "content": "and 2+2?"},
    {"role": "assistant", "content": "4"},
]


def _hand_assistant_ids(tok) -> tuple[list[int], set[int]]:
    """The conversation's ids and the positions of exactly the assistant tokens (content + the turn's EOS), built
    by hand from the toy chat format: <bos><|system|>..<|end|><|user|>..<|end|><|assistant|>..<eos>..."""
    ids, trained = [tok.bos_token_id], set()
    for m in CONVERSATION:
        ids.append(tok.convert_tokens_to_ids(f"<|{m['role']}|>"))
        body = data.tokenize(tok, [m["content"]])[0]
        end = tok.eos_token_id if m["role"] == "assistant" else tok.convert_tokens_to_ids("<|end|>")
        start = len(ids)
        ids += body + [end]
        if m["role"] == "assistant":
            trained.update(range(start, len(ids)))
    return ids, trained


def test_detail_2_assistant_only_loss_trains_exactly_the_assistant_tokens_of_three_turns():
    tok = toy.make_tokenizer()
    ids, mask = sft_script.assistant_token_mask(CONVERSATION, tok)
    hand_ids, trained = _hand_assistant_ids(tok)
    assert ids == hand_ids
    assert {i for i, m in enumerate(mask) if m} == trained
    # through tokenize_rows: prefix = first token, the weights line up with the targets
    ds = Dataset.from_list([{"messages": CONVERSATION}])
    (prefix, target, weights), = sft_script.tokenize_rows(ds, tok, True, 256, assistant_only=True)
    assert prefix + target == hand_ids and len(weights) == len(target)
    assert {i + 1 for i, w in enumerate(weights) if w} == trained
    assert sum(weights) == sum(len(data.tokenize(tok, [c])[0]) + 1 for c in ("3", "9", "4"))


def test_detail_2_generation_markers_give_the_same_mask():
    """A template with {% generation %} markers goes through transformers' assistant mask: same tokens."""
    tok = toy.make_tokenizer()
    tok.chat_template = tok.chat_template.replace(
        "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}",
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{% if m['role'] == 'assistant' %}")
    assert "{% generation %}" in tok.chat_template
    ids, mask = sft_script.assistant_token_mask(CONVERSATION, tok)
    hand_ids, trained = _hand_assistant_ids(tok)
    assert ids == hand_ids and {i for i, m in enumerate(mask) if m} == trained


def test_detail_2_assistant_only_loss_refuses_data_without_messages():
    ds = Dataset.from_list([{"prompt": "1+2=", "completion": "3"}])
    with pytest.raises(data.DatasetFormatError, match="messages"):
        sft_script.tokenize_rows(ds, toy.make_tokenizer(), True, 64, assistant_only=True)


def test_detail_3_dft_loss_is_the_probability_weighted_nll_with_nll_gradient_scaled():
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.8, 0.3]])).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = sft_script.dft_loss(logps, mask, num_items=5)
    hand = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 0.1 * math.log(0.1) + 0.8 * math.log(0.8)
             + 0.3 * math.log(0.3)) / 5
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    loss.backward()
    # d/dlogp of -sg(p) logp is -p (the probability is detached), masked tokens get nothing
    expected = -torch.exp(logps.detach()) * mask / 5
    assert torch.allclose(logps.grad, expected, atol=1e-7)


def test_detail_4_neftune_noise_has_the_papers_scale_and_only_in_training():
    emb = torch.zeros(4, 10, 32)
    noisy = sft_script.neftune_noise(emb, alpha=5.0, generator=torch.Generator().manual_seed(0))
    bound = 5.0 / math.sqrt(10 * 32)
    assert noisy.abs().max() <= bound and noisy.abs().max() > 0.95 * bound
    assert noisy.mean().abs() < 0.05 * bound  # symmetric around the embedding
    assert noisy.var().item() == pytest.approx(bound ** 2 / 3, rel=0.1)  # Uniform(-b, b) variance
    from transformers import AutoModelForCausalLM

    tok = toy.make_tokenizer()
    model = AutoModelForCausalLM.from_config(toy.make_config(tok, hidden_size=32, num_layers=1, num_heads=2))
    ids = torch.tensor([[tok.bos_token_id] + data.tokenize(tok, ["12+34="])[0]])
    model.eval()
    clean = model(ids).logits
    handle = sft_script.add_neftune_hook(model, 5.0)
    assert torch.equal(model(ids).logits, clean)  # eval mode: untouched
    model.train()
    assert not torch.allclose(model(ids).logits, clean)  # training: noisy embeddings
    handle.remove()
    assert torch.equal(model(ids).logits, clean)


def _conversations(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 10, (i * 7) % 10
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)},
                                  {"role": "user", "content": "again"}, {"role": "assistant", "content": str(a + b)}]})
    return rows


def test_assistant_only_dft_neftune_runs_through_the_entry_point(tmp_path):
    """One short run with all three options: the step's label tokens are exactly its rows' assistant tokens."""
    import json

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _conversations(32)))
    out = tmp_path / "run"
    run_script("sft.py", "--dataset_name", str(path), "--output_dir", str(out), "--max_steps", "2",
               "--per_device_train_batch_size", "16", "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0",
               "--assistant_only_loss", "True", "--loss_type", "dft", "--neftune_noise_alpha", "5")
    metrics = read_metrics(out)
    # exactly the assistant tokens of the step's rows: two replies of len(str(a+b)) characters + their EOS each
    rows = _conversations(32)
    per_row = [2 * (len(r["messages"][1]["content"]) + 1) for r in rows]
    step_tokens = {m["step"]: m["num_tokens"] for m in metrics if "num_tokens" in m}
    assert step_tokens == {s: sum(per_row[i] for i in data.batch_indices(32, 16, s - 1, 1)) for s in (1, 2)}
    # the logged loss is the DFT loss: finite, positive and below the uniform model's NLL (log V)
    assert all(0 < m["loss"] < math.log(len(toy.make_tokenizer())) for m in metrics if "loss" in m)


def test_unknown_sft_loss_type_fails_at_startup(tmp_path):
    proc = run_script("sft.py", "--output_dir", str(tmp_path / "bad"), "--loss_type", "focal", check=False)
    assert proc.returncode != 0 and "--loss_type" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_optim_fused_selects_torchs_fused_adamw_and_the_default_keeps_torchs_default(tmp_path, monkeypatch):
    """--optim adamw_torch_fused builds AdamW with the fused kernel, the default passes no kernel choice (torch's
    default, with which the toy start policies are built); both make the same update up to float rounding."""
    from safetensors.torch import load_file

    made = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.defaults["fused"])

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    rows = tmp_path / "rows.jsonl"  # a small file: the two runs skip the toy task's 9,000 rows
    rows.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(32)))
    common = dict(max_steps=2, per_device_train_batch_size=16, logging_steps=1, eval_steps=0, save_steps=0,
                  dataset_name=str(rows), eval_split=None)
    sft_script.main(sft_script.Args(output_dir=str(tmp_path / "fused"), optim="adamw_torch_fused", **common))
    sft_script.main(sft_script.Args(output_dir=str(tmp_path / "default"), **common))
    assert made == [True, None]
    fused, default = (load_file(tmp_path / d / "model.safetensors") for d in ("fused", "default"))
    init = model_utils.load_causal_lm("toy", seed=1).state_dict()  # the runs' start (seed 1)
    moved = min((default[k] - init[k]).abs().max().item() for k in default)
    gap = max((fused[k] - default[k]).abs().max().item() for k in default)
    assert moved > 1e-5 and gap < moved / 100  # every tensor moved; the two kernels agree far closer than that


def test_unknown_optim_fails_at_startup_in_sft_and_reward(tmp_path):
    import reward as reward_script

    for script, args in ((sft_script, sft_script.Args), (reward_script, reward_script.Args)):
        out = tmp_path / script.__name__
        with pytest.raises(ValueError, match="--optim 'sgd'"):
            script.main(args(output_dir=str(out), optim="sgd"))
        assert not out.exists()
