"""Complete, reloadable checkpoints and exact resume.

A checkpoint folder `output_dir/checkpoint-<step>` holds:
  config.json + model.safetensors + tokenizer files   (loads with from_pretrained)
  state/                                              (accelerate: model, optimizer, scheduler, RNG of every rank)
  trainer_state.pt                                    (step, wall time, algorithm state such as dual variables)
  args.json
It is written under a temporary name and renamed only when everything is on disk, so a crash mid-save never
leaves a folder that looks complete. `--resume_from auto` picks the newest complete one in output_dir.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def save_model(accelerator, model, tokenizer, out_dir: Path):
    """from_pretrained-loadable weights + tokenizer (collective: call on every rank)."""
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)


def save_checkpoint(accelerator, output_dir, step: int, model, tokenizer, args, extra: dict | None = None,
                    keep_last: int | None = None) -> Path:
    """Collective: every rank must call it."""
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    save_model(accelerator, model, tokenizer, tmp)
    if accelerator.is_main_process:
        torch.save({"step": step, **(extra or {})}, tmp / "trainer_state.pt")
        (tmp / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: the folder appears only when complete
        if keep_last:
            for old in sorted(list_checkpoints(output_dir))[:-keep_last]:
                shutil.rmtree(output_dir / f"checkpoint-{old}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir) -> list[int]:
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _CKPT.match(p.name)) and (p / "trainer_state.pt").exists())


def resolve_resume(resume_from: str | None, output_dir) -> Path | None:
    if not resume_from:
        return None
    if resume_from == "auto":
        steps = list_checkpoints(output_dir)
        return Path(output_dir) / f"checkpoint-{steps[-1]}" if steps else None
    path = Path(resume_from)
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"--resume_from {path}: not a complete checkpoint (no trainer_state.pt); "
                                f"complete ones in {path.parent}: {list_checkpoints(path.parent)}")
    return path


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG (registered with accelerator.prepare); returns trainer_state."""
    accelerator.load_state(str(Path(path) / "state"))
    return torch.load(Path(path) / "trainer_state.pt", weights_only=False)
