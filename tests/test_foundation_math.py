"""Tier 1: SFT and reward losses against hand computations; log-prob gathering against a slow loop; padding
invariance; tokenizer round trip; reward-function loading."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import reward as reward_script
import sft as sft_script
from common import data, model as mu, rewards, toy


@pytest.fixture(scope="module")
def tok():
    return toy.make_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tok):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(toy.make_config(tok, hidden_size=32, num_layers=2)).eval()


def test_sft_loss_is_the_masked_token_mean_nll():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # hand: (1 + 2 + 0.5) / 3 label tokens
    assert sft_script.sft_loss(logps, mask, num_items=3).item() == pytest.approx(3.5 / 3)
    # global token mean: two micro-batches normalised by the total count add up to the full-batch loss
    full = sft_script.sft_loss(logps, mask, 3)
    halves = sft_script.sft_loss(logps[:1], mask[:1], 3) + sft_script.sft_loss(logps[1:], mask[1:], 3)
    assert halves.item() == pytest.approx(full.item())


def test_sft_loss_of_a_uniform_model_is_log_vocab():
    V = 50
    logits = torch.zeros(2, 4, V)
    targets = torch.randint(0, V, (2, 4))
    logps = mu.selective_log_softmax(logits, targets)
    assert sft_script.sft_loss(logps, torch.ones(2, 4), 8).item() == pytest.approx(math.log(V), rel=1e-6)


def test_reward_detail_4_bradley_terry_loss_hand_values_with_margin_and_centring():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    hand = (-math.log(1 / (1 + math.exp(-1.0))) + math.log(2)) / 2
    assert reward_script.bradley_terry_loss(rc, rr).item() == pytest.approx(hand)
    margin = torch.tensor([1.0, -1.0])
    hand_m = (math.log(2) - math.log(1 / (1 + math.exp(-1.0)))) / 2  # diffs 0 and +1
    assert reward_script.bradley_terry_loss(rc, rr, margin).item() == pytest.approx(hand_m)
    # centring: + c * mean((rc + rr)^2) = 0.01 * (9 + 0) / 2
    assert reward_script.bradley_terry_loss(rc, rr, None, 0.01).item() == pytest.approx(hand + 0.045)


def test_reward_detail_4_bradley_terry_properties():
    s = torch.tensor([0.3, -1.2, 4.0])
    assert reward_script.bradley_terry_loss(s, s).item() == pytest.approx(math.log(2))
    rc, rr = torch.randn(5), torch.randn(5)
    base = reward_script.bradley_terry_loss(rc, rr).item()
    assert reward_script.bradley_terry_loss(rc + 3, rr + 3).item() == pytest.approx(base, abs=1e-6)
    # centring vanishes when r_w = -r_l
    assert reward_script.bradley_terry_loss(rc, -rc, None, 0.5).item() == pytest.approx(
        reward_script.bradley_terry_loss(rc, -rc).item())


def test_selective_log_softmax_matches_a_slow_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17, dtype=torch.bfloat16)
    index = torch.randint(0, 17, (3, 5))
    fast = mu.selective_log_softmax(logits, index)
    slow = torch.empty(3, 5)
    for i in range(3):
        for t in range(5):
            row = logits[i, t].float()
            slow[i, t] = row[index[i, t]] - torch.log(torch.exp(row).sum())
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_completion_logps_match_a_full_forward_and_ignore_padding(tiny_model, tok):
    prompts = data.tokenize(tok, ["<bos>12+34=", "<bos>1+2="])
    comps = data.tokenize(tok, ["46<eos>", "3<eos>"])
    b = data.batch_prompt_completion(prompts, comps, tok.pad_token_id)
    T = b["completion_mask"].shape[1]
    lp = mu.completion_logps(tiny_model, b["input_ids"], b["attention_mask"], T)
    # reference: each sequence alone, no padding, full logits
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids = torch.tensor([p + c])
        logits = tiny_model(input_ids=ids).logits[0].float()
        ref = torch.log_softmax(logits[:-1], -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]][-len(c):]
        torch.testing.assert_close(lp[i, : len(c)], ref, atol=1e-5, rtol=1e-5)
    # more left padding on the prompt side changes nothing
    b2 = data.batch_prompt_completion([[tok.pad_token_id] * 0 + prompts[0], prompts[1]], comps, tok.pad_token_id)
    extra = torch.full((2, 4), tok.pad_token_id)
    ids = torch.cat([extra, b2["input_ids"]], 1)
    am = torch.cat([torch.zeros_like(extra), b2["attention_mask"]], 1)
    lp2 = mu.completion_logps(tiny_model, ids, am, T)
    m = b["completion_mask"].bool()
    torch.testing.assert_close(lp2[m], lp[m], atol=1e-5, rtol=1e-5)


def test_temperature_divides_logits(tiny_model, tok):
    ids = torch.tensor([data.tokenize(tok, ["<bos>1+2=3<eos>"])[0]])
    am = torch.ones_like(ids)
    lp_t = mu.completion_logps(tiny_model, ids, am, 2, temperature=0.5)
    logits = tiny_model(input_ids=ids).logits[0, -3:-1].float() / 0.5
    ref = torch.log_softmax(logits, -1)[torch.arange(2), ids[0, -2:]]
    torch.testing.assert_close(lp_t[0], ref, atol=1e-5, rtol=1e-5)


def test_tokenizer_round_trips_through_a_llama_folder(tmp_path, tok, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "reverse:abc= 12+34=46\n"
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert len(again) == len(tok) == tiny_model.config.vocab_size
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (tok.pad_token_id, tok.eos_token_id,
                                                                            tok.bos_token_id)
    msgs = [{"role": "user", "content": "1+2="}]
    assert data.prompt_text(msgs, again) == data.prompt_text(msgs, tok)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.model_type == "llama"


def test_missing_pad_token_is_a_clear_error(tok):
    class NoPad:
        pad_token_id = None

    with pytest.raises(ValueError, match="no pad token.*pad_token"):
        data.check_pad_token(NoPad(), "some/model")


def test_reward_functions_load_from_file_and_module(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def short(prompts, completions, **kw):\n"
                 "    return [None if c == 'skip' else -len(c) for c in completions]\n")
    fns = rewards.load_reward_sources([f"{f}:short", "add", "common.toy:_text"])
    assert rewards.reward_name(fns[0]) == "short" and rewards.reward_name(fns[1]) == "add_exact"
    out = rewards.score(fns[:2], ["1+1=", "1+1=", "1+1="], ["2", "skip", "22"], [[1], [2], [3]])
    assert out[0].tolist() == [-1.0, 1.0]
    assert math.isnan(out[1, 0].item()) and out[1, 1].item() == 0.0
    assert out[2].tolist() == [-2.0, 0.0]
    with pytest.raises(FileNotFoundError, match="nope.py"):
        rewards.load_function("nope.py:f")
    with pytest.raises(ValueError, match="no function 'missing'"):
        rewards.load_function(f"{f}:missing")
    with pytest.raises(ValueError, match="file.py:fn"):
        rewards.load_function("unknown_name")


def test_extra_columns_reach_reward_functions():
    seen = {}

    def fn(prompts, completions, completion_ids, answer, **kw):
        seen["answer"] = answer
        return [float(c == a) for c, a in zip(completions, answer)]

    out = rewards.score([fn], ["p", "q"], ["1", "2"], [[1], [2]], {"answer": ["1", "3"]})
    assert out[:, 0].tolist() == [1.0, 0.0] and seen["answer"] == ["1", "3"]


def test_reward_detail_1_sequence_classifier_score_ignores_padding_side(tok):
    from transformers import AutoModelForSequenceClassification

    cfg = toy.make_config(tok, hidden_size=32, num_layers=2)
    cfg.num_labels = 1
    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_config(cfg).eval()
    seqs = data.tokenize(tok, ["<bos>12+34=46<eos>", "<bos>1+2=3<eos>"])
    left = data.pad(seqs, tok.pad_token_id, "left")
    right = data.pad(seqs, tok.pad_token_id, "right")
    s_left = mu.sequence_classifier_scores(m, *left)
    s_right = mu.sequence_classifier_scores(m, *right)
    alone = torch.stack([mu.sequence_classifier_scores(m, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                         for s in seqs])
    torch.testing.assert_close(s_left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_right, alone, atol=1e-5, rtol=1e-5)


def test_a_saved_toy_tokenizer_gives_the_ids_training_used(tmp_path, tok):
    """`AutoTokenizer.from_pretrained(folder)(text)` (special tokens on, as a user calls it) == the ids training built
    (BOS string + text, tokenised without special tokens): standard prompts, prompt+completion rows, lm rows."""
    from datasets import Dataset

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.padding_side == "left"
    for prompt in ("12+34=", "reverse:abc=", "a b\n"):
        trained = data.tokenize(tok, [data.prompt_text(prompt, tok)])[0]
        assert trained[0] == tok.bos_token_id and trained.count(tok.bos_token_id) == 1
        assert again(prompt)["input_ids"] == trained
    pc = Dataset.from_list([{"prompt": "12+34=", "completion": "46"}])
    (prefix, target, _), = sft_script.tokenize_rows(pc, tok, completion_only=True, max_length=64)
    assert prefix + target == again("12+34=46")["input_ids"] + [tok.eos_token_id]
    lm = Dataset.from_list([{"text": "1+2=3"}])
    (prefix, target, _), = sft_script.tokenize_rows(lm, tok, completion_only=True, max_length=64)
    assert prefix + target == again("1+2=3")["input_ids"] + [tok.eos_token_id]


def test_the_chat_template_path_has_one_bos(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "1+2="}]
    ids = data.tokenize(tok, [data.prompt_text(msgs, tok)])[0]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert again.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] == ids
    full = data.tokenize(tok, [data.lm_text({"messages": msgs + [{"role": "assistant", "content": "3"}]}, tok)])[0]
    assert full.count(tok.bos_token_id) == 1 and full[-1] == tok.eos_token_id


def test_a_tokenizer_that_adds_no_bos_gets_none_from_the_text_helpers():
    """GPT-2/Qwen-style tokenizers (a BOS token, but `tok(text)` does not add it): training ids == `tok(text)`."""
    from tokenizers import processors

    plain = toy.make_tokenizer()
    plain._tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # a no-op post-processor, as GPT-2's
    assert plain.bos_token == "<bos>" and plain("1+2=")["input_ids"][0] != plain.bos_token_id
    assert not data.adds_bos(plain) and data.adds_bos(toy.make_tokenizer())
    assert data.prompt_text("1+2=", plain) == "1+2="
    assert data.lm_text({"text": "1+2=3"}, plain) == "1+2=3<eos>"
    assert data.tokenize(plain, [data.prompt_text("1+2=", plain)])[0] == plain("1+2=")["input_ids"]


def test_the_cached_start_policy_tokenizer_reproduces_training_ids(toy_policy, tok):
    again = AutoTokenizer.from_pretrained(toy_policy)
    for prompt in ("37+58=", "0+0="):
        assert again(prompt)["input_ids"] == data.tokenize(tok, [data.prompt_text(prompt, tok)])[0]
