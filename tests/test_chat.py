"""scripts/chat.py through its real entry point: a stdin session and --prompt stream exactly the greedy answers of
the same model (chat template and plain continuation), the commands work, bad folders fail in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

MAX_NEW = 12


def chat(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "chat.py"), *args], input=stdin, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def greedy(toy_policy):
    """Greedy answer of the toy policy to a rendered prompt text, by plain model.generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_policy)
    model = AutoModelForCausalLM.from_pretrained(toy_policy).eval()

    def answer(text: str) -> str:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return tok, answer


def test_stdin_session_streams_the_greedy_answers_with_the_chat_template(tmp_path, toy_policy, greedy):
    tok, answer = greedy
    saved = tmp_path / "chat.jsonl"
    stdin = f"12+34=\n/system be brief\n5+6=\n/save {saved}\n/clear\n7+8=\n/nonsense\n/exit\nnever read\n"
    proc = chat("--model_name_or_path", str(toy_policy), "--temperature", "0", "--max_new_tokens", str(MAX_NEW),
                stdin=stdin)
    assert proc.returncode == 0, proc.stderr

    def render(msgs):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    sys_msg = {"role": "system", "content": "be brief"}
    u1, u2, u3 = ({"role": "user", "content": c} for c in ("12+34=", "5+6=", "7+8="))
    a1 = answer(render([u1]))
    a2 = answer(render([sys_msg, u1, {"role": "assistant", "content": a1}, u2]))
    a3 = answer(render([sys_msg, u3]))  # /clear forgets the turns, not the system prompt
    assert proc.stdout == f"{a1}\n{a2}\n{a3}\n"  # the answers and nothing else on stdout
    assert json.loads(saved.read_text()) == {"messages": [sys_msg, u1, {"role": "assistant", "content": a1}, u2,
                                                          {"role": "assistant", "content": a2}]}
    assert "unknown command /nonsense" in proc.stderr


def test_prompt_flag_answers_once_by_plain_continuation(toy_policy, greedy):
    tok, answer = greedy
    proc = chat("--model_name_or_path", str(toy_policy), "--temperature", "0", "--max_new_tokens", str(MAX_NEW),
                "--plain", "True", "--prompt", "12+34=")
    assert proc.returncode == 0, proc.stderr
    expected = answer(tok.bos_token + "12+34=")  # the training scripts' standard prompt: BOS + text
    assert proc.stdout == expected + "\n" and expected.strip()  # the toy policy answers a sum with digits


def test_bad_folders_fail_in_one_line(tmp_path, toy_policy):
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    shutil.copy(toy_policy / "config.json", no_tok)
    broken = tmp_path / "broken"
    shutil.copytree(toy_policy, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    cases = [(tmp_path / "missing", "no such folder"), (no_tok, "no tokenizer"), (broken, "failed to load")]
    for folder, message in cases:
        proc = chat("--model_name_or_path", str(folder), "--prompt", "1+1=")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and proc.stdout == ""
        assert len(lines) == 1 and lines[0].startswith("chat.py: ") and message in lines[0], proc.stderr
        assert str(folder) in lines[0] and "Traceback" not in proc.stderr
