"""One run per output folder, complete reloadable checkpoints, exact resume, and nothing unpickled on the way back.

A run folder `output_dir` holds one run: args.json, metrics.jsonl, samples.jsonl, perf.json, the final model
(config.json + model.safetensors + tokenizer files) and `checkpoint-<step>` folders, each holding
  config.json + model.safetensors + tokenizer files   (loads with from_pretrained)
  args.json                                           (the run's arguments, compared on resume)
  trainer_state.json [+ trainer_state.safetensors]    (step, wall time, algorithm state; its tensors in safetensors)
  state/                                              (model, optimizer, scheduler and other registered objects,
                                                       grad scaler, RNG of every rank)
Formats: weights in safetensors, optimizer / scheduler / scaler / RNG state with torch.save and read back with
torch.load(weights_only=True) (plain tensors, numbers, strings, lists, tuples and dicts only), everything else JSON.
A file that would need to unpickle a Python object is refused (CheckpointError), so loading a checkpoint cannot run
code. accelerate's own save_state is not used on one process or under DDP: it pickles every object registered with
register_for_checkpointing (the learning-rate scheduler) and reads it back with weights_only=False. Under FSDP2 the
model and optimizer states are gathered into full state dicts (on the main process's CPU memory) and written in the
same formats, keyed by parameter name. Under DeepSpeed the engine writes and reads the partitioned model and
optimizer states in its own format (state/sharded/, through accelerate's save_state / load_state): DeepSpeed's
loader unpickles those files (torch.load with weights_only=False), so resume only from DeepSpeed checkpoints you
wrote; everything else in the checkpoint uses the formats above. The final model and every checkpoint's
model.safetensors are gathered from the ZeRO-3 / FSDP2 shards into one from_pretrained-loadable model.

Start-up: `prepare_output_dir(args)` decides, before any model loads, whether this run is new, resumes, or would
mix with another run's files (then it refuses). A checkpoint (and the final model) is written under a temporary
name and moved into place only when everything is on disk, so a crash mid-save never leaves a folder that looks
complete. Weights that are not finite are never written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_CKPT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE = "trainer_state.json"  # the last file written into a checkpoint folder before it is renamed into place

# Fields that may differ between a checkpoint's saved args and the run that resumes it (`--resume_from`): where the
# run is written and how it is named, how often it logs, evaluates and saves, how long it trains, and the tracking
# mirror. Anything else (data, model, batch, optimiser, loss and sampling settings, precision) must match. Changing
# max_steps continues the same run to a new horizon; a learning-rate schedule that decays over max_steps then follows
# the new horizon from the resume step on. A script may allow more with prepare_output_dir(args, may_change=...).
RESUME_MAY_CHANGE = (
    "output_dir", "run_name", "exp_name", "resume_from", "overwrite_output_dir",
    "max_steps", "logging_steps", "save_steps", "save_total_limit",
    "eval_steps", "eval_split", "eval_dataset_name", "num_eval_prompts", "log_completions_steps",
    "track", "wandb_project", "wandb_entity",
)

# What a run writes at the top of its folder. Any of these marks the folder as holding a run; --overwrite_output_dir
# deletes these (and only these: other files a user keeps there stay).
_RUN_FILES = ("args.json", "metrics.jsonl", "samples.jsonl", "perf.json", "config.json", "generation_config.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "wandb",
              "adapter_config.json", "merged")  # the last two: a LoRA run's adapter folder and --merge_adapter model
_WEIGHTS = re.compile(r".*\.safetensors(\.index\.json)?$")
_RUN_PATTERNS = (re.compile(r"^checkpoint-\d+$"), re.compile(r"^\.tmp-"), _WEIGHTS)


class RunFolderError(ValueError):
    """The output folder holds another run's files, or the checkpoint to resume does not belong to this run."""


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, written in an unsafe format, or would need to run code to load."""


# ----------------------------------------------------------------------------- start-up: one run per folder
def _dist():
    from accelerate import PartialState

    return PartialState()  # the state the script's Accelerator set up (or a single process)


def run_files(output_dir) -> list[Path]:
    """Files and folders of a run at the top of output_dir (empty for a missing folder)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name in _RUN_FILES or any(r.match(p.name) for r in _RUN_PATTERNS))


def _args_dict(args) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))


def args_differences(saved: dict, args, may_change: tuple[str, ...] = ()) -> list[str]:
    """Fields whose value differs between saved args (args.json) and the current args, ignoring RESUME_MAY_CHANGE.
    A field the saved args predate counts as equal when it has its default value now."""
    now = _args_dict(args)
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING}
    defaults = json.loads(json.dumps(defaults, default=str))
    allowed = set(RESUME_MAY_CHANGE) | set(may_change)
    diff = []
    for k in sorted(set(saved) | set(now)):
        if k in allowed:
            continue
        if k not in saved:
            if k in defaults and now[k] == defaults[k]:
                continue
            diff.append(f"{k} (checkpoint: absent, now: {now[k]!r})")
        elif k not in now:
            diff.append(f"{k} (checkpoint: {saved[k]!r}, now: absent)")
        elif saved[k] != now[k]:
            diff.append(f"{k} (checkpoint: {saved[k]!r}, now: {now[k]!r})")
    return diff


def _check_belongs(path: Path, args, may_change) -> None:
    saved = json.loads((path / "args.json").read_text())
    diff = args_differences(saved, args, may_change)
    if diff:
        new_run = ("another --output_dir, or --overwrite_output_dir True to delete the old run's files"
                   if args.resume_from == "auto" else "another --output_dir and no --resume_from")
        raise RunFolderError(
            f"--resume_from {args.resume_from}: {path} was written by a run with other arguments: {'; '.join(diff)}. "
            f"Resume with the same values (only {', '.join(RESUME_MAY_CHANGE)} may change), or start a new run: "
            f"{new_run}")


def _checkpoint_path(path: Path) -> Path:
    if not (path / COMPLETE).exists():
        if (path / "trainer_state.pt").exists():
            raise CheckpointError(f"{path}: written in an older checkpoint format (trainer_state.pt) whose loading "
                                  f"unpickles Python objects; it is not loaded. Start a new run "
                                  f"(--overwrite_output_dir True) or resume from a checkpoint in the current format")
        raise CheckpointError(f"--resume_from {path}: not a complete checkpoint (no {COMPLETE}); complete ones in "
                              f"{path.parent}: {list_checkpoints(path.parent)}")
    return path


def prepare_output_dir(args, may_change: tuple[str, ...] = ()) -> Path | None:
    """Call on every rank after distributed.make_accelerator (it synchronises the ranks through accelerate's state)
    and the argument and data checks, before any model is loaded; pass what it returns to load_checkpoint once the
    model, optimizer and scheduler are prepared / registered. Returns the checkpoint to resume from (None: a new
    run). Reads args.output_dir, args.resume_from and args.overwrite_output_dir.

    - new run (--resume_from unset) in a folder holding a run's files: RunFolderError, unless
      --overwrite_output_dir True, which deletes those files first (checkpoints, metrics, final model, wandb).
    - --resume_from auto: the newest complete checkpoint in output_dir, if its args.json matches these args (except
      RESUME_MAY_CHANGE and `may_change`; else RunFolderError naming the fields, or with --overwrite_output_dir True
      a new run in place of the old one: "continue my run, or replace whatever is there"). No checkpoint: a new
      run, when the folder is empty, missing, or holds only the start of this same run (its args.json matches;
      those files are replaced); otherwise the same refusal as a new run.
    - --resume_from <checkpoint folder>: that checkpoint, under the same argument check. Its run's later
      checkpoints in output_dir (an abandoned continuation) or another run's files in output_dir make it refuse,
      unless --overwrite_output_dir True deletes them.
    Unfinished `.tmp-*` saves are always removed. Decisions are made on every rank from the same files; only the
    main process deletes."""
    out = Path(args.output_dir)
    overwrite = bool(getattr(args, "overwrite_output_dir", False))
    resume_from = args.resume_from or None
    files = run_files(out)
    flags = ("pass --resume_from auto to continue it (same arguments), --overwrite_output_dir True to delete it and "
             "start again, or another --output_dir")
    doomed: list[Path] = []  # deleted by the main process below
    resume: Path | None = None

    if resume_from == "auto" and overwrite and list_checkpoints(out):
        newest = out / f"checkpoint-{list_checkpoints(out)[-1]}"
        if args_differences(json.loads((newest / "args.json").read_text()), args, may_change):
            resume_from = None  # not this run's checkpoint: --overwrite_output_dir replaces that run
    if resume_from is None or (resume_from == "auto" and not list_checkpoints(out)):
        if files and resume_from == "auto" and (out / "args.json").exists() and not overwrite \
                and not any(_CKPT.match(p.name) for p in files) \
                and not args_differences(json.loads((out / "args.json").read_text()), args, may_change):
            overwrite = True  # the start of this same run, stopped before its first checkpoint: begin it again
        if files and not overwrite:
            names = ", ".join(p.name for p in files[:6]) + (", ..." if len(files) > 6 else "")
            raise RunFolderError(f"--output_dir {out} already holds a run ({names}); a new run would mix with it: "
                                 f"{flags}")
        doomed = files
    else:
        if resume_from == "auto":
            resume = out / f"checkpoint-{list_checkpoints(out)[-1]}"
        else:
            resume = _checkpoint_path(Path(resume_from))
        _check_belongs(resume, args, may_change)
        if resume.parent.resolve() == out.resolve():  # later checkpoints of an abandoned continuation
            step = int(_CKPT.match(resume.name).group(1))
            others = [p for p in files if (m := _CKPT.match(p.name)) and int(m.group(1)) > step]
        else:  # continue elsewhere: output_dir must not hold another run
            others = [p for p in files if not p.name.startswith(".tmp-")]
        if others and not overwrite:
            names = ", ".join(p.name for p in others)
            raise RunFolderError(f"--resume_from {resume}: --output_dir {out} also holds {names}, which would mix with "
                                 f"the resumed run: --overwrite_output_dir True deletes them")
        doomed = others + [p for p in files if p.name.startswith(".tmp-")]

    state = _dist()
    state.wait_for_everyone()  # every rank has decided before anything is deleted
    if state.is_main_process:
        for p in doomed:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        if doomed and resume is None:
            print(f"--overwrite_output_dir: deleted the previous run's files in {out}", flush=True)
    state.wait_for_everyone()
    return resume


def resolve_resume(resume_from: str | None, output_dir) -> Path | None:
    """The checkpoint `--resume_from` names (the newest complete one for 'auto'), without the run-folder checks of
    prepare_output_dir: kept for scripts that do not call it yet."""
    if not resume_from:
        return None
    if resume_from == "auto":
        steps = list_checkpoints(output_dir)
        return Path(output_dir) / f"checkpoint-{steps[-1]}" if steps else None
    return _checkpoint_path(Path(resume_from))


def list_checkpoints(output_dir) -> list[int]:
    """Steps of the complete checkpoints in output_dir, ascending."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _CKPT.match(p.name)) and (p / COMPLETE).exists())


# ----------------------------------------------------------------------------- saving
def _first_nonfinite(accelerator, modules) -> str | None:
    """Name of the first non-finite parameter or buffer of this rank's modules; collective (every rank learns
    whether any rank found one)."""
    bad = None
    for prefix, m in modules:
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            t = _local_tensor(t)
            if t.is_floating_point() and t.numel() and not torch.isfinite(t.detach()).all():
                bad = f"{prefix}{name}"
                break
        if bad:
            break
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() > 0 and bad is None:
            bad = "(a parameter on another process)"
    return bad


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds: its ZeRO-3 partition, its FSDP2 (DTensor) shard, or itself."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return t.to_local() if hasattr(t, "to_local") else t


def _without_tied_copies(module, state: dict) -> dict:
    """state without the second name of a parameter shared by two modules (a tied LM head), as save_pretrained
    writes a model on one process; a gathered state dict holds such a parameter twice, as separate tensors. (Ranks
    that receive no gathered state, None or {}, are left as they are.)"""
    if not state:
        return state
    first: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first and name in state and first[id(p)] in state:
            state = {k: v for k, v in state.items() if k != name}
        first.setdefault(id(p), name)
    return state


def _refuse_nonfinite(accelerator, modules, step, where) -> None:
    bad = _first_nonfinite(accelerator, modules)
    if bad is not None:
        at = f" at step {step}" if step is not None else ""
        raise FloatingPointError(f"refusing to save {where}{at}: parameter {bad} holds NaN or inf values. The weights "
                                 f"diverged; lower --learning_rate, keep --max_grad_norm > 0, or use bf16 instead of "
                                 f"fp16, and resume from the last checkpoint")


def _move_in(src: Path, dst: Path) -> None:
    """Move every file of src into dst so that dst never looks like a complete model in between: the old config.json
    (which from_pretrained needs) goes first, the new one comes last; stale weight files are removed."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").unlink(missing_ok=True)
    (dst / "adapter_config.json").unlink(missing_ok=True)
    for p in dst.iterdir():
        if p.is_file() and _WEIGHTS.match(p.name) and not (src / p.name).exists():
            p.unlink()
    for p in sorted(src.iterdir(), key=lambda p: p.name in ("config.json", "adapter_config.json")):
        if (dst / p.name).is_dir():
            shutil.rmtree(dst / p.name)
        os.replace(p, dst / p.name)
    src.rmdir()


def save_model(accelerator, model, tokenizer, out_dir, step: int | None = None, merged: bool | None = None,
               part: str | None = None):
    """from_pretrained-loadable weights + tokenizer (collective: call on every rank). Written into a temporary folder
    and then moved into out_dir, config.json last, so an interrupted save never looks complete. Refuses weights
    that are not finite (FloatingPointError naming the step and the first such parameter).
    A LoRA model (peft PeftModel, common/peft_utils.py): out_dir is an adapter folder (adapter_config.json last,
    adapter_model.safetensors: `PeftModel.from_pretrained(base, out_dir)`), and with `merged` (default: the run's
    --merge_adapter) also out_dir/merged, the model with the adapters merged (plain `from_pretrained`).
    part: the name of the submodule to save when the prepared `model` holds several models (e.g. a policy and a
    value model prepared as one module); its weights are gathered from the whole prepared module and saved under
    the submodule's own names."""
    from common import peft_utils

    _refuse_nonfinite(accelerator, [("", model)], step, f"the model to {out_dir}")
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards
    unwrapped = accelerator.unwrap_model(model)
    if part is not None:
        unwrapped = getattr(unwrapped, part)
        state = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")} if state else state
    state = _without_tied_copies(unwrapped, state)
    lora = peft_utils.is_peft_model(unwrapped)
    if merged is None:
        merged = lora and getattr(unwrapped, "cleanalign_merge_on_save", False)
    if accelerator.is_main_process:
        out = Path(out_dir)
        tmp = out / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if lora:
                (tmp / "README.md").unlink(missing_ok=True)  # peft's blank model card
                if merged:
                    peft_utils.save_merged(unwrapped, tmp / "merged", state)
                    if tokenizer is not None:
                        tokenizer.save_pretrained(tmp / "merged")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _move_in(tmp, out)
    accelerator.wait_for_everyone()


def _deepspeed(accelerator) -> bool:
    """DeepSpeed: the engine writes the partitioned model and optimizer states in its own format."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _fsdp_owner(accelerator, opt):
    """The prepared model whose (sharded) parameters the optimizer updates."""
    first = next(p for g in opt.param_groups for p in g["params"])
    return next(m for m in accelerator._models if any(p is first for p in m.parameters()))


def _fsdp_full_states(accelerator) -> tuple[list, list]:
    """FSDP2: full model and optimizer state dicts (parameter names as keys) gathered from every rank's shards.
    Collective; the result is held in CPU memory on the main process only (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    models = [{k: v.detach().contiguous().clone() for k, v in get_model_state_dict(m, options=opts).items()}
              for m in accelerator._models]  # clone: tied names must not share storage in a safetensors file
    optims = [get_optimizer_state_dict(_fsdp_owner(accelerator, o), o.optimizer, options=opts)
              for o in accelerator._optimizers]
    return models, optims


def _fsdp_load_full_states(accelerator, state_dir: Path) -> None:
    """Inverse of _fsdp_full_states: every rank reads the full state dicts and keeps its own shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    for i, m in enumerate(accelerator._models):
        set_model_state_dict(m, load_file(str(state_dir / f"model_{i}.safetensors")), options=opts)
    for i, o in enumerate(accelerator._optimizers):
        set_optimizer_state_dict(_fsdp_owner(accelerator, o), o.optimizer,
                                 _load_safe(state_dir / f"optimizer_{i}.pt"), options=opts)


def _rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                             has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode(value, tensors: dict, where: str):
    """JSON form of algorithm state; tensors go to `tensors` (safetensors), tuples and non-string keys are tagged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in value.items()]}
    raise TypeError(f"checkpoint state {where}: a {type(value).__name__} cannot be saved; use numbers, strings, "
                    f"lists, tuples, dicts and tensors")


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__dict__"}:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value["__dict__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def _save_safe(obj, path: Path) -> None:
    """torch.save of a state made of tensors, numbers, strings and containers only (checked by reading it back the
    way load_checkpoint will)."""
    torch.save(obj, path)
    _load_safe(path)


def _load_safe(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: holds pickled Python objects, which could run code when loaded; refused "
                              f"(checkpoint files may contain tensors, numbers, strings and containers only). "
                              f"Details: {str(e).splitlines()[0]}") from None


def _custom_objects(accelerator) -> list:
    return list(accelerator._custom_objects)


def save_module(module, path) -> None:
    """A module's weights as safetensors; of a LoRA model (PeftModel) only the adapter weights and modules_to_save
    copies (the frozen base comes back from --model_name_or_path on resume)."""
    from safetensors.torch import save_file, save_model

    from common import peft_utils

    if peft_utils.is_peft_model(module):
        save_file({k: v.detach().contiguous() for k, v in peft_utils.adapter_state(module).items()}, str(path))
    else:
        save_model(module, str(path))


def load_module(module, path, device) -> None:
    """Inverse of save_module (strict: every tensor must fit)."""
    from safetensors.torch import load_file, load_model

    from common import peft_utils

    device = torch.device(device)
    device = "cpu" if device.type == "cpu" else str(device)  # safetensors refuses "cpu:0" (accelerate's MULTI_CPU device)
    if peft_utils.is_peft_model(module):
        peft_utils.load_adapter_state(module, load_file(str(path), device=device), str(path))
    else:
        load_model(module, str(path), device=device)


def save_checkpoint(accelerator, output_dir, step: int, model, tokenizer, args, extra: dict | None = None,
                    keep_last: int | None = None, models: dict | None = None,
                    optimizers: dict | None = None, part: str | None = None) -> Path:
    """Collective: every rank must call it. Saves everything registered with accelerator.prepare (models,
    optimizers, schedulers) or register_for_checkpointing, the grad scaler, every rank's RNG, `extra` (numbers,
    strings, lists, tuples, dicts, tensors: the algorithm's state), and named further `models` (nn.Module, e.g. an
    old policy) and `optimizers` (e.g. of dual variables) that load_checkpoint restores when given the same names.
    keep_last: afterwards keep this many checkpoints, always including the one just written. Refuses non-finite
    weights (FloatingPointError). part: as in save_model, the submodule whose weights form the checkpoint's
    from_pretrained-loadable model (the whole prepared module is still saved in state/)."""
    output_dir = Path(output_dir)
    models, optimizers = models or {}, optimizers or {}
    _refuse_nonfinite(accelerator, [("", model), *[(f"{k}.", m) for k, m in models.items()]], step, "a checkpoint")
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    state_dir = tmp / "state"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        state_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _deepspeed(accelerator):  # DeepSpeed's own format for the partitioned model and optimizer states
        registered, accelerator._custom_objects = accelerator._custom_objects, []
        try:
            accelerator.save_state(str(state_dir / "sharded"))
        finally:
            accelerator._custom_objects = registered
        # this rank's RNG state is saved below in the safe format: drop accelerate's pickled copy
        (state_dir / "sharded" / f"random_states_{accelerator.process_index}.pkl").unlink(missing_ok=True)
    fsdp_models, fsdp_optims = _fsdp_full_states(accelerator) if _fsdp(accelerator) else ([], [])
    _save_safe(_rng_state(), state_dir / f"rng_{accelerator.process_index}.pt")
    save_model(accelerator, model, tokenizer, tmp, step, merged=False, part=part)
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        if _fsdp(accelerator):  # the gathered full states, in the same formats as one process
            for i, sd in enumerate(fsdp_models):
                save_file(sd, str(state_dir / f"model_{i}.safetensors"))
            for i, sd in enumerate(fsdp_optims):
                _save_safe(sd, state_dir / f"optimizer_{i}.pt")
            for i, sched in enumerate(accelerator._schedulers):
                _save_safe(sched.state_dict(), state_dir / f"scheduler_{i}.pt")
        elif not _deepspeed(accelerator):
            for i, m in enumerate(accelerator._models):
                save_module(accelerator.unwrap_model(m), str(state_dir / f"model_{i}.safetensors"))
            for i, opt in enumerate(accelerator._optimizers):
                _save_safe(opt.state_dict(), state_dir / f"optimizer_{i}.pt")
            for i, sched in enumerate(accelerator._schedulers):
                _save_safe(sched.state_dict(), state_dir / f"scheduler_{i}.pt")
        for i, obj in enumerate(_custom_objects(accelerator)):
            _save_safe(obj.state_dict(), state_dir / f"custom_{i}.pt")
        if accelerator.scaler is not None:
            _save_safe(accelerator.scaler.state_dict(), state_dir / "scaler.pt")
        for name, m in models.items():
            save_module(accelerator.unwrap_model(m), str(state_dir / f"model_{name}.safetensors"))
        for name, opt in optimizers.items():
            _save_safe(opt.state_dict(), state_dir / f"optimizer_{name}.pt")
        tensors: dict = {}
        encoded = _encode({"step": step, **(extra or {})}, tensors, "extra")
        if tensors:
            save_file(tensors, str(tmp / "trainer_state.safetensors"))
        (tmp / "args.json").write_text(json.dumps(_args_dict(args), indent=2) + "\n")
        (tmp / COMPLETE).write_text(json.dumps({"format": 1, "world_size": accelerator.num_processes,
                                                "state": encoded}, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: the folder appears only when complete
        if keep_last and keep_last > 0:
            older = [s for s in list_checkpoints(output_dir) if s != step]
            for old in older[:max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(output_dir / f"checkpoint-{old}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------- loading
def load_checkpoint(accelerator, path, models: dict | None = None, optimizers: dict | None = None) -> dict:
    """Restore everything save_checkpoint saved into the objects registered with accelerator.prepare /
    register_for_checkpointing (and the named `models` / `optimizers`); returns the algorithm state: {"step", **extra}.
    Nothing is unpickled: JSON, safetensors and torch.load(weights_only=True) only (CheckpointError otherwise)."""
    from safetensors.torch import load_file

    path = _checkpoint_path(Path(path))
    meta = json.loads((path / COMPLETE).read_text())
    state_dir = path / "state"
    rng_file = state_dir / f"rng_{accelerator.process_index}.pt"
    if meta.get("world_size") != accelerator.num_processes or not rng_file.exists():
        raise CheckpointError(f"{path} was written by {meta.get('world_size')} process(es); resume it with the same "
                              f"number of processes (now {accelerator.num_processes}) so every rank gets its RNG state")
    if _deepspeed(accelerator):  # DeepSpeed's loader unpickles its own files (module docstring)
        registered, accelerator._custom_objects = accelerator._custom_objects, []
        try:
            accelerator.load_state(str(state_dir / "sharded"))
        finally:
            accelerator._custom_objects = registered
    elif _fsdp(accelerator):
        _fsdp_load_full_states(accelerator, state_dir)
        for i, sched in enumerate(accelerator._schedulers):
            sched.load_state_dict(_load_safe(state_dir / f"scheduler_{i}.pt"))
    else:
        for i, m in enumerate(accelerator._models):
            load_module(accelerator.unwrap_model(m), str(state_dir / f"model_{i}.safetensors"),
                        device=str(accelerator.device))
        for i, opt in enumerate(accelerator._optimizers):
            opt.load_state_dict(_load_safe(state_dir / f"optimizer_{i}.pt"))
        for i, sched in enumerate(accelerator._schedulers):
            sched.load_state_dict(_load_safe(state_dir / f"scheduler_{i}.pt"))
    custom = _custom_objects(accelerator)
    found = len(list(state_dir.glob("custom_*.pt")))
    if found != len(custom):
        raise CheckpointError(f"{path}: holds {found} registered object(s) (register_for_checkpointing) but this run "
                              f"registered {len(custom)}")
    for i, obj in enumerate(custom):
        obj.load_state_dict(_load_safe(state_dir / f"custom_{i}.pt"))
    if accelerator.scaler is not None and (state_dir / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(_load_safe(state_dir / "scaler.pt"))
    for name, m in (models or {}).items():
        load_module(accelerator.unwrap_model(m), str(state_dir / f"model_{name}.safetensors"),
                    device=str(next(m.parameters()).device))
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(_load_safe(state_dir / f"optimizer_{name}.pt"))
    _set_rng_state(_load_safe(rng_file))
    tensors_file = path / "trainer_state.safetensors"
    tensors = load_file(str(tensors_file)) if tensors_file.exists() else {}
    return _decode(meta["state"], tensors)
