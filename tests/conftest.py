"""Shared test plumbing: repo on sys.path, one cache of the built default toy models per session, and a helper
that runs a script through its real entry point."""

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
