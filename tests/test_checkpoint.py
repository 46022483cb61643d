"""Run folders and checkpoints: one run per output folder, keep_last never loses the newest checkpoint, a crashed
final save never looks complete, non-finite weights are never saved, a non-finite gradient never reaches the
weights, and loading a checkpoint never unpickles (so never runs) anything."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaForCausalLM, PreTrainedModel

import sft as sft_script
from common import checkpoint, distributed, toy
from conftest import read_metrics, run_script


@dataclasses.dataclass
class RunArgs:
    output_dir: str = ""
    resume_from: str | None = None
    overwrite_output_dir: bool = False
    learning_rate: float = 1e-3
    max_steps: int = 4
    logging_steps: int = 1


TOKENIZER = toy.make_tokenizer()


def tiny_run(seed: int = 0):
    """A 2-layer toy Llama with hidden size 16, AdamW and a LambdaLR, prepared like the scripts do."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(toy.make_config(TOKENIZER, hidden_size=16, num_layers=2, num_heads=2, max_positions=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return accelerator, model, optimizer, scheduler


IDS = torch.randint(5, 40, (2, 10), generator=torch.Generator().manual_seed(0))


def backward(accelerator, model):
    accelerator.backward(model(input_ids=IDS, labels=IDS).loss)


def train_step(accelerator, model, optimizer, scheduler):
    backward(accelerator, model)
    return distributed.optimizer_step(accelerator, model, optimizer, scheduler, 1.0)


def snapshot(model, optimizer) -> tuple[dict, dict]:
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in optimizer.state_dict()["state"].items()}
    return params, state


# ----------------------------------------------------------------------------- one run per output folder
SFT = ["--max_steps", "4", "--save_steps", "2", "--eval_steps", "0", "--logging_steps", "2",
       "--per_device_train_batch_size", "8"]


def sft_args(out, **kw) -> sft_script.Args:
    """The Args the SFT flags above give (what `python algos/sft.py ...` parses)."""
    fields = {"max_steps": 4, "save_steps": 2, "eval_steps": 0, "logging_steps": 2, "per_device_train_batch_size": 8}
    return sft_script.Args(output_dir=str(out), **{**fields, **kw})


def test_second_run_into_a_folder_never_mixes_with_the_first(tmp_path):
    out = tmp_path / "run"
    run_script("sft.py", "--output_dir", str(out), *SFT)
    first_metrics = (out / "metrics.jsonl").read_text()
    first_weights = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    assert checkpoint.list_checkpoints(out) == [2, 4]

    # a new run (other learning rate) refuses before it loads a model or writes anything, naming both ways out
    with pytest.raises(checkpoint.RunFolderError, match="--resume_from auto") as err:
        sft_script.main(sft_args(out, learning_rate=2e-3))
    assert "--overwrite_output_dir True" in str(err.value)
    # --resume_from auto does not resume a checkpoint written with other arguments, and names the field
    with pytest.raises(checkpoint.RunFolderError, match="learning_rate") as err:
        sft_script.main(sft_args(out, learning_rate=2e-3, resume_from="auto"))
    assert "max_steps" not in str(err.value).split("written by a run with other arguments:")[1].split(". Resume")[0]
    assert (out / "metrics.jsonl").read_text() == first_metrics
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == first_weights
    # the same arguments (a longer horizon and other logging may change) resume the newest checkpoint
    assert checkpoint.prepare_output_dir(sft_args(out, resume_from="auto", max_steps=6, logging_steps=1)) == \
        out / "checkpoint-4"

    # --overwrite_output_dir True deletes the first run's files: afterwards the folder holds the second run only
    (out / "notes.txt").write_text("mine\n")  # a file no run writes is left alone
    run_script("sft.py", "--output_dir", str(out), *SFT, "--learning_rate", "2e-3", "--save_steps", "3",
               "--overwrite_output_dir", "True")
    assert [r["step"] for r in read_metrics(out)] == [2, 4]
    assert checkpoint.list_checkpoints(out) == [3, 4]  # the first run's checkpoint-2 is gone, checkpoint-4 rewritten
    for args_file in (out / "args.json", out / "checkpoint-3" / "args.json", out / "checkpoint-4" / "args.json"):
        assert json.loads(args_file.read_text())["learning_rate"] == 2e-3
    assert (out / "notes.txt").read_text() == "mine\n"


def write_fake_checkpoint(out, step: int, args) -> None:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps(dataclasses.asdict(args)))
    (d / checkpoint.COMPLETE).write_text("{}")


def test_prepare_output_dir_decisions(tmp_path):
    # auto with nothing to resume, in a missing or empty folder: a new run, nothing created
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert checkpoint.prepare_output_dir(RunArgs(str(out), "auto")) is None
        assert not out.exists() or not list(out.iterdir())
    # auto in a folder holding the start of this same run (stopped before its first checkpoint): begins it again
    out = tmp_path / "started"
    out.mkdir()
    (out / "args.json").write_text(json.dumps(dataclasses.asdict(RunArgs(str(out)))))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert checkpoint.prepare_output_dir(RunArgs(str(out), "auto", max_steps=9)) is None
    assert not (out / "metrics.jsonl").exists()
    # ... but not the start of another run
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(checkpoint.RunFolderError, match="already holds a run"):
        checkpoint.prepare_output_dir(RunArgs(str(out), "auto", learning_rate=0.5))
    # an explicit older checkpoint with later ones of the same run present: refused, overwrite deletes the later ones
    out = tmp_path / "rewind"
    for step in (2, 4, 6):
        write_fake_checkpoint(out, step, RunArgs(str(out)))
    (out / ".tmp-checkpoint-8").mkdir()
    with pytest.raises(checkpoint.RunFolderError, match="checkpoint-6"):
        checkpoint.prepare_output_dir(RunArgs(str(out), str(out / "checkpoint-2")))
    assert checkpoint.prepare_output_dir(RunArgs(str(out), str(out / "checkpoint-2"), overwrite_output_dir=True)) \
        == out / "checkpoint-2"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    # auto with overwrite, another run's checkpoint: a new run in its place
    assert checkpoint.prepare_output_dir(RunArgs(str(out), "auto", learning_rate=0.5, overwrite_output_dir=True)) \
        is None
    assert not list(out.iterdir())
    # a field the checkpoint predates counts as unchanged at its default value only
    saved = {k: v for k, v in dataclasses.asdict(RunArgs()).items() if k != "logging_steps" and k != "learning_rate"}
    assert checkpoint.args_differences(saved, RunArgs()) == []
    assert checkpoint.args_differences(saved, RunArgs(learning_rate=0.5)) == \
        ["learning_rate (checkpoint: absent, now: 0.5)"]


def test_tracker_never_deletes_another_runs_metrics(tmp_path):
    from common.tracking import Tracker

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(checkpoint.RunFolderError, match="--overwrite_output_dir True"):
        Tracker(RunArgs(str(tmp_path)))
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]
    Tracker(RunArgs(str(tmp_path)), resume_step=1)  # on resume: the records past the resume step go
    assert read_metrics(tmp_path) == [{"step": 1}]


# ----------------------------------------------------------------------------- saving
def test_keep_last_never_deletes_the_newest_checkpoint(tmp_path):
    accelerator, model, _, _ = tiny_run()
    args = RunArgs(str(tmp_path))
    for step in (10, 12):
        checkpoint.save_checkpoint(accelerator, tmp_path, step, model, TOKENIZER, args, keep_last=2)
    # a lower-numbered checkpoint written last (a run that went back) is the newest: it stays
    checkpoint.save_checkpoint(accelerator, tmp_path, 2, model, TOKENIZER, args, keep_last=2)
    assert checkpoint.list_checkpoints(tmp_path) == [2, 12]
    checkpoint.save_checkpoint(accelerator, tmp_path, 3, model, TOKENIZER, args, keep_last=1)
    assert checkpoint.list_checkpoints(tmp_path) == [3]


def test_interrupted_final_save_never_looks_complete(tmp_path, monkeypatch):
    accelerator, model, _, _ = tiny_run()
    original = PreTrainedModel.save_pretrained

    def crash_midway(self, folder, *args, **kwargs):  # the weights file is half written when the process dies
        original(self, folder, *args, **kwargs)
        weights = os.path.join(folder, "model.safetensors")
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_model(accelerator, model, TOKENIZER, tmp_path)
    assert not (tmp_path / "config.json").exists() and not list(tmp_path.glob("*.safetensors"))
    assert not list(tmp_path.iterdir())  # and no temporary folder left behind
    # a previous complete final model stays complete and unchanged when the next save is interrupted
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", original)
    checkpoint.save_model(accelerator, model, TOKENIZER, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_model(accelerator, model, TOKENIZER, tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").read_bytes() == before


def test_non_finite_weights_are_never_saved(tmp_path):
    accelerator, model, _, _ = tiny_run()
    with torch.no_grad():
        accelerator.unwrap_model(model).model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 7: parameter model\.layers\.1\.mlp\.up_proj\.weight"):
        checkpoint.save_model(accelerator, model, TOKENIZER, tmp_path / "final", step=7)
    with pytest.raises(FloatingPointError, match=r"step 5: parameter model\.layers\.1\.mlp\.up_proj\.weight"):
        checkpoint.save_checkpoint(accelerator, tmp_path, 5, model, TOKENIZER, RunArgs(str(tmp_path)))
    assert not (tmp_path / "final").exists() and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the optimizer step
def test_optimizer_step_skips_a_nan_gradient(tmp_path):
    accelerator, model, optimizer, scheduler = tiny_run()
    norm, stepped = train_step(accelerator, model, optimizer, scheduler)  # optimizer state exists from here on
    assert stepped and math.isfinite(norm)
    params, state = snapshot(model, optimizer)
    epoch, lr = scheduler.last_epoch, scheduler.get_last_lr()

    backward(accelerator, model)
    next(iter(model.parameters())).grad[0, 0] = float("nan")
    norm, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler, 1.0)
    assert math.isnan(norm) and not stepped
    after_params, after_state = snapshot(model, optimizer)
    assert all(torch.equal(params[k], after_params[k]) for k in params)
    for i in state:
        for k, v in state[i].items():
            assert torch.equal(v, after_state[i][k]) if torch.is_tensor(v) else v == after_state[i][k], (i, k)
    assert scheduler.last_epoch == epoch and scheduler.get_last_lr() == lr
    assert all(p.grad is None for p in model.parameters())  # the bad gradient does not leak into the next step

    # without clipping (max_grad_norm 0) the norm is the exact total norm and the gradients are left as they were
    backward(accelerator, model)
    grads = [p.grad.clone() for p in model.parameters()]
    expected = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    seen = []
    optimizer.step = lambda *a, **k: seen.append([p.grad.clone() for p in model.parameters()])
    norm, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler, 0.0)
    assert stepped and norm == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(g, s) for g, s in zip(grads, seen[0]))
    assert scheduler.last_epoch == epoch + 1


def test_consecutive_skipped_steps_stop_the_run():
    accelerator, model, optimizer, scheduler = tiny_run()
    for i in range(3):
        backward(accelerator, model)
        next(iter(model.parameters())).grad[0, 0] = float("inf")
        if i < 2:
            assert not distributed.optimizer_step(accelerator, model, optimizer, scheduler, 1.0,
                                                  max_consecutive_skips=3)[1]
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row"):
        distributed.optimizer_step(accelerator, model, optimizer, scheduler, 1.0, max_consecutive_skips=3)
    # a finite step in between resets the count
    accelerator, model, optimizer, scheduler = tiny_run()
    for bad in (True, True, False, True, True):
        backward(accelerator, model)
        if bad:
            next(iter(model.parameters())).grad[0, 0] = float("nan")
        assert distributed.optimizer_step(accelerator, model, optimizer, scheduler, 1.0,
                                          max_consecutive_skips=3)[1] is not bad


# ----------------------------------------------------------------------------- loading: exact and safe
def test_checkpoint_round_trip_is_exact(tmp_path):
    accelerator, model, optimizer, scheduler = tiny_run()
    train_step(accelerator, model, optimizer, scheduler)
    dual = torch.nn.Parameter(torch.tensor([0.5]))
    dual_opt = torch.optim.Adam([dual], lr=0.1)
    dual.grad = torch.tensor([1.0])
    dual_opt.step()
    extra = {"elapsed": 1.5, "ema": None, "nan": float("nan"), "pair": (1, "a"), "counts": {3: [1, 2]},
             "tensor": torch.arange(4.0), "dual_opt": dual_opt.state_dict()}
    path = checkpoint.save_checkpoint(accelerator, tmp_path, 1, model, TOKENIZER, RunArgs(str(tmp_path)), extra)
    expected = [random.random(), np.random.rand(), torch.rand(2)]
    train_step(accelerator, model, optimizer, scheduler)
    params, state = snapshot(model, optimizer)
    lr = scheduler.get_last_lr()

    accelerator, model, optimizer, scheduler = tiny_run(seed=1)  # other weights: all must come from the checkpoint
    dual2 = torch.nn.Parameter(torch.tensor([0.0]))
    dual_opt2 = torch.optim.Adam([dual2], lr=0.1)
    got = checkpoint.load_checkpoint(accelerator, path)
    assert [random.random(), np.random.rand()] == expected[:2] and torch.equal(torch.rand(2), expected[2])
    assert got["step"] == 1 and got["elapsed"] == 1.5 and got["ema"] is None and math.isnan(got["nan"])
    assert got["pair"] == (1, "a") and got["counts"] == {3: [1, 2]} and torch.equal(got["tensor"], torch.arange(4.0))
    dual_opt2.load_state_dict(got["dual_opt"])  # int keys and tuples survive: the state maps onto the parameter
    assert torch.equal(dual_opt2.state_dict()["state"][0]["exp_avg"], dual_opt.state_dict()["state"][0]["exp_avg"])
    train_step(accelerator, model, optimizer, scheduler)
    after_params, after_state = snapshot(model, optimizer)
    assert all(torch.equal(params[k], after_params[k]) for k in params)  # bit-exact continuation
    assert all(torch.equal(state[i]["exp_avg_sq"], after_state[i]["exp_avg_sq"]) for i in state)
    assert scheduler.get_last_lr() == lr


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loading_a_checkpoint_never_unpickles_objects(tmp_path):
    accelerator, model, optimizer, scheduler = tiny_run()
    train_step(accelerator, model, optimizer, scheduler)
    good = checkpoint.save_checkpoint(accelerator, tmp_path / "run", 1, model, TOKENIZER, RunArgs(str(tmp_path)))
    marker = tmp_path / "payload-ran"
    files = sorted(p.relative_to(good) for p in good.rglob("*.pt"))
    assert len(files) == 3  # optimizer, scheduler (registered object) and this rank's RNG
    for rel in files:
        bad = tmp_path / f"bad-{rel.stem}"
        shutil.copytree(good, bad)
        torch.save({"state": Payload(marker)}, bad / rel)
        with pytest.raises(checkpoint.CheckpointError, match="pickled Python objects"):
            checkpoint.load_checkpoint(tiny_run()[0], bad)
        assert not marker.exists(), rel
    # a checkpoint in the earlier layout (accelerate's save_state + a pickled trainer_state.pt) is refused unread
    legacy = tmp_path / "legacy" / "checkpoint-1"
    accelerator.save_state(str(legacy / "state"))
    torch.save({"step": 1, "elapsed": Payload(marker)}, legacy / "trainer_state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="older checkpoint format"):
        checkpoint.load_checkpoint(accelerator, legacy)
    assert not marker.exists()
