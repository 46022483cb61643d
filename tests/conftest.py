"""Shared test plumbing: repo on sys.path, one cache of the built default toy models per session, a helper that
runs a script through its real entry point, the usual checks of a short run, and the multi-process invariance check
(a deterministic fake sampler, so 1 and 2 processes see the same samples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "algos"))
os.environ.setdefault("CLEANALIGN_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_script(script: str, *args: str, launcher: list[str] | None = None, timeout: int = 600, check: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `algos/<script>` as a user would (optionally under `accelerate launch ...`)."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "algos" / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launcher(num_processes: int = 2) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N` (on a CPU-only machine accelerate needs --multi_gpu to
    start several processes; they join a gloo group) on a free loopback port, so parallel runs do not collide."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="session")
def toy_policy() -> Path:
    """The cached default RL starting policy (built once, about a minute)."""
    from common import toy

    return toy.toy_policy_path("add")


@pytest.fixture(scope="session")
def toy_rm() -> Path:
    """The cached default toy reward model (built once)."""
    from common import toy

    return toy.toy_reward_model_path("add")


def assert_fails_at_startup(script: str, tmp_path, extra: list[str], match: str):
    """A bad configuration exits non-zero with `match` in its error, before any metrics are written."""
    proc = run_script(script, "--output_dir", str(tmp_path / "bad"), *extra, check=False, timeout=120)
    assert proc.returncode != 0 and match in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def assert_default_run_raises_sampled_gold_reward(script: str, tmp_path, margin: float = 0.02):
    """The default run: the gold reward of the sampled completions (train/gold_reward) rises above the starting
    policy's (mean of the last 6 logged steps vs the first 3)."""
    out = tmp_path / "learn"
    run_script(script, "--output_dir", str(out), "--eval_steps", "150", timeout=1800)
    gold = [r["train/gold_reward"] for r in read_metrics(out) if "train/gold_reward" in r]
    first, last = sum(gold[:3]) / 3, sum(gold[-6:]) / 6
    assert last > first + margin, (first, last)


# ----------------------------------------------------------------------------- shared run checks
def load_params(folder) -> dict:
    """The tensors of `folder/model.safetensors`."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def assert_params_moved(before_folder, after_folder):
    import torch

    before, after = load_params(before_folder), load_params(after_folder)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"


def assert_params_close(a_folder, b_folder, atol: float):
    import torch

    pa, pb = load_params(a_folder), load_params(b_folder)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=0, msg=k)


def assert_all_finite(folder):
    """Every saved weight is finite."""
    import torch

    for k, v in load_params(folder).items():
        assert torch.isfinite(v).all(), k


def check_online_run(out, required: list[str], steps: int = 3, eval_at_start: bool = True) -> list[dict]:
    """The usual checks of a short online run: a step-0 eval record, one record per step 1..steps, every name in
    `required` finite in every training record, samples and the final model written. Returns the training records."""
    import math

    recs = read_metrics(out)
    if eval_at_start:
        assert recs[0]["step"] == 0 and "eval/gold_reward" in recs[0], recs[0]
    train = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for name in required:
        assert all(r.get(name) is not None and math.isfinite(r[name]) for r in train), name
    assert (Path(out) / "samples.jsonl").exists() and (Path(out) / "model.safetensors").exists()
    return train


# ----------------------------------------------------------------------------- a sampler every layout agrees on
FAKE_SAMPLER = '''
import runpy, sys, zlib
import torch
sys.path.insert(0, {root!r})
from common import generation

_orig = generation.HFGenerator.generate

def fake_generate(self, model, prompt_ids, n=1, greedy=False):
    """Completions that depend only on (prompt, sample index), so every process layout sees the same batch."""
    if greedy:
        return _orig(self, model, prompt_ids, n, greedy)
    tok, rows = self.tokenizer, []
    for p in prompt_ids:
        for j in range(n):
            h = zlib.crc32(repr((p, j)).encode())
            rows.append([tok.convert_tokens_to_ids(str((h >> (3 * k)) % 10)) for k in range(1 + h % 5)]
                        + [tok.eos_token_id])
    ids, mask = generation.pad_completions(rows, tok.pad_token_id)
    texts = tok.batch_decode([r[:-1] for r in rows])
    return generation.Generation(ids, mask, torch.ones(len(rows), dtype=torch.bool), texts)

generation.HFGenerator.generate = fake_generate
script = {script!r}
sys.argv = [script] + sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def run_with_fake_sampler(tmp_path, script, args, num_processes, check: bool = True) -> subprocess.CompletedProcess:
    """Run algos/<script> with HF sampling replaced by FAKE_SAMPLER's deterministic completions, on 1 process or
    under `accelerate launch` with `num_processes`."""
    wrapper = Path(tmp_path) / "fake_sampler.py"
    wrapper.write_text(FAKE_SAMPLER.format(root=str(ROOT), script=str(ROOT / "algos" / script)))
    launcher = accelerate_launcher(num_processes) if num_processes > 1 else [sys.executable]
    proc = subprocess.run(launcher + [str(wrapper), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert f"{num_processes} process(es)" in proc.stdout, proc.stdout[-2000:]  # the layout really ran
    return proc


LENGTH_REWARD = "def length(completions, **kw):\n    return [float(len(str(c))) for c in completions]\n"
MULTIPROCESS_KEYS = ("reward", "reward_std", "loss", "grad_norm", "completions/mean_length")


def multiprocess_matches_single(tmp_path, script, extra, keys=MULTIPROCESS_KEYS, base: list[str] | None = None,
                                batch_one: int = 16, batch_two: int = 8, atol: float = 2e-6,
                                extra_two: list[str] | tuple[str, ...] = ()):
    """2 processes x batch_two == 1 process x batch_one (per_device_train_batch_size) on identical samples: every
    metric in `keys` (present in both or neither) and the final parameters. `base` replaces the default flags (a
    policy-gradient script's: 2 steps, 4 generations, a length reward); '{length_reward}' in base/extra is replaced
    by the 'file.py:length' spec of a reward = completion length. `extra_two`: flags of the 2-process run only
    (e.g. --gradient_accumulation_steps 4 with batch_two 2: accumulation and processes checked at once)."""
    rf = Path(tmp_path) / "length_reward.py"
    rf.write_text(LENGTH_REWARD)
    spec = f"{rf}:length"
    if base is None:
        base = ["--max_steps", "2", "--num_generations", "4", "--eval_steps", "0", "--log_completions_steps", "0",
                "--logging_steps", "1", "--reward_funcs", spec]
    flags = [f.replace("{length_reward}", spec) for f in [*base, *extra]]
    one, two = Path(tmp_path) / "one", Path(tmp_path) / "two"
    run_with_fake_sampler(tmp_path, script, [*flags, "--per_device_train_batch_size", str(batch_one),
                                             "--output_dir", str(one)], 1)
    run_with_fake_sampler(tmp_path, script, [*flags, *extra_two, "--per_device_train_batch_size", str(batch_two),
                                             "--output_dir", str(two)], 2)
    m1, m2 = read_metrics(one), read_metrics(two)
    assert len(m1) == len(m2) and m1
    for a, b in zip(m1, m2):
        for k in keys:
            assert (k in a) == (k in b), k
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert_params_close(one, two, atol)
    return m1, m2
