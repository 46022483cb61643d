"""One accelerate setup for every script, the batch arithmetic that makes multi-process and gradient accumulation
runs see exactly the global batch a single process would, and the distributed mode a run really runs in.

Launch with `accelerate launch --config_file configs/accelerate/<mode>.yaml algos/<script>.py ...`, where mode is
ddp, zero2, zero3 or fsdp2 on GPU machines and ddp_cpu, zero2_cpu, zero3_cpu or fsdp2_cpu on a machine without a
GPU (2 processes over gloo, float32; the CPU files differ from the GPU ones only in process count and precision).
DeepSpeed (ZeRO-2/3) is an optional extra: `pip install deepspeed==0.19.8`.

What `make_accelerator` does beyond `Accelerator(...)`, so that every mode runs the same code paths on GPU and CPU:
  - DeepSpeed: the Accelerator is built for it also without CUDA (accelerate's `cpu=True` would silently drop the
    DeepSpeed config and run DDP), over gloo on CPU. No dataloader goes through `prepare`, so the micro-batch size,
    the accumulation steps and the clipping norm are written into the DeepSpeed config from the script's flags
    (--per_device_train_batch_size, --gradient_accumulation_steps, --max_grad_norm).
  - ZeRO-3: every model loads whole on every process (transformers' zero.Init is switched off: a model built
    inside it is initialised differently, and a frozen model built inside it would be partitioned with nothing to
    gather it); `accelerator.prepare` partitions the trained model. Frozen reference / reward models stay whole on
    every process (replicated).
  - FSDP2: on CPU, where accelerate 1.15 enables FSDP only on accelerators, the run is switched to accelerate's own
    FSDP2 path (fully_shard per decoder layer, DTensor-aware clipping, full state dicts). Only fsdp_version 2 is
    supported. fsdp_cpu_ram_efficient_loading is turned off (it would load frozen models outside `prepare` as empty
    meta tensors on every rank but the first). Frozen models stay whole on every process.
  - A DeepSpeed or FSDP launch whose mode did not take effect, a DeepSpeed config without deepspeed installed, or
    several processes that are not connected (gradients never synchronised) stop the run at start-up with the fix.
  - The main process prints one line with the mode it really runs in, and after `prepare` one line with how many
    parameter and optimizer-state elements each process holds (sharded modes hold about 1/N each).
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

MAX_CONSECUTIVE_SKIPS = 10
_consecutive_skips: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> skipped steps in a row
DEEPSPEED_INSTALL = "pip install deepspeed==0.19.8"
CONFIGS = "configs/accelerate/"


class ScaleOutError(RuntimeError):
    """The launch asked for a distributed mode this run cannot (or did not) set up."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_mode() -> str:
    """The mode `accelerate launch --config_file ...` asked for: 'deepspeed', 'fsdp' or 'data_parallel' (DDP, or one
    process)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "data_parallel"


def _check_deepspeed_installed():
    import importlib.util

    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        found = False
    if found:
        try:
            import deepspeed  # noqa: F401
        except Exception as e:  # noqa: BLE001 - a broken install is as unusable as a missing one
            raise ScaleOutError(f"the accelerate config asks for DeepSpeed, but `import deepspeed` failed ({e}); "
                                f"reinstall the optional extra: {DEEPSPEED_INSTALL}") from None
        return
    raise ScaleOutError(f"the accelerate config asks for DeepSpeed (distributed_type: DEEPSPEED), but deepspeed is "
                        f"not installed. Install the optional extra: {DEEPSPEED_INSTALL} (no CUDA needed; on CPU it "
                        f"runs over gloo), or launch with {CONFIGS}ddp.yaml / ddp_cpu.yaml")


def _enable_fsdp2_without_cuda(accelerator) -> None:
    """accelerate 1.15 turns FSDP on only for accelerator devices; on CPU (gloo) switch the state to its FSDP path,
    whose fully_shard preparation, clipping and state dicts are device-generic."""
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ScaleOutError(f"the accelerate config asks for FSDP, but the processes came up as "
                            f"{state.distributed_type} (several processes joined over gloo are needed on CPU): "
                            f"launch with accelerate launch --config_file {CONFIGS}fsdp2_cpu.yaml")
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def describe(accelerator) -> str:
    """The distributed mode in words, e.g. 'DeepSpeed ZeRO-3 on 2 processes (gloo, cpu)'."""
    dt, n = accelerator.distributed_type, accelerator.num_processes
    if dt == DistributedType.DEEPSPEED:
        mode = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    elif dt == DistributedType.FSDP:
        mode = f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    elif n > 1:
        mode = "DDP"
    else:
        mode = "single process"
    backend = getattr(accelerator.state, "backend", None) or "none"
    return (f"{mode} on {n} process{'es' if n > 1 else ''} ({backend}, {accelerator.device.type}, "
            f"mixed precision {accelerator.mixed_precision})")


def make_accelerator(args) -> Accelerator:
    """Accelerator with manual gradient accumulation bookkeeping (see `micro_batches`), per-rank seeding, the
    mixed-precision flag (`--mixed_precision no|fp16|bf16`; unset leaves the accelerate config's choice) and the
    distributed mode the launch asked for, checked and printed (see the module docstring)."""
    mode = requested_mode()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    kwargs = {}
    if getattr(args, "mixed_precision", None):
        kwargs["mixed_precision"] = args.mixed_precision
    if mode == "deepspeed":
        _check_deepspeed_installed()
        if _flag("ACCELERATE_USE_CPU"):  # accelerate's state would then drop DeepSpeed and run plain DDP
            raise ScaleOutError(f"the launch asks for DeepSpeed and for accelerate's CPU mode (ACCELERATE_USE_CPU), "
                                f"which silently drops DeepSpeed: launch without --cpu, with use_cpu: false (as in "
                                f"{CONFIGS}zero2_cpu.yaml / zero3_cpu.yaml; DeepSpeed finds the CPU by itself)")
        from accelerate.utils import InitProcessGroupKwargs

        # cpu=False even without CUDA: with cpu=True accelerate silently ignores the DeepSpeed config
        handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
        accelerator = _Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=False,
                                   kwargs_handlers=handlers, **kwargs)
    else:
        # cpu=True on a machine without CUDA makes a torchrun-started group use gloo (MULTI_CPU) instead of staying
        # a set of unconnected single processes
        accelerator = _Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=not cuda,
                                   **kwargs)
        if mode == "fsdp" and accelerator.distributed_type != DistributedType.FSDP and not cuda:
            _enable_fsdp2_without_cuda(accelerator)
    _check_mode(accelerator, mode, world)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, args)
    if accelerator.distributed_type == DistributedType.FSDP:
        _configure_fsdp(accelerator)
    accelerator.print(f"distributed: {describe(accelerator)}", flush=True)
    # identical init on every rank (the model is seeded separately), distinct sampling streams per rank
    set_seed(args.seed + accelerator.process_index)
    return accelerator


def _check_mode(accelerator, mode: str, world: int) -> None:
    dt = accelerator.distributed_type
    if mode == "deepspeed" and dt != DistributedType.DEEPSPEED:
        raise ScaleOutError(f"the accelerate config asks for DeepSpeed, but the run came up as {dt} (it would "
                            f"silently train without ZeRO); launch with accelerate launch --config_file "
                            f"{CONFIGS}zero2.yaml (GPU) or zero2_cpu.yaml (CPU), and keep use_cpu: false")
    if mode == "fsdp":
        if dt != DistributedType.FSDP:
            raise ScaleOutError(f"the accelerate config asks for FSDP, but the run came up as {dt} (it would "
                                f"silently train without sharding); launch with accelerate launch --config_file "
                                f"{CONFIGS}fsdp2.yaml (GPU) or fsdp2_cpu.yaml (CPU)")
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ScaleOutError(f"fsdp_version {accelerator.state.fsdp_plugin.fsdp_version}: the scripts support "
                                f"FSDP2 only; set fsdp_version: 2 in the accelerate config (as in "
                                f"{CONFIGS}fsdp2.yaml)")
    if world > 1 and (accelerator.num_processes != world or dt == DistributedType.NO):
        raise ScaleOutError(f"{world} processes were started but they are not one distributed group (the run came up "
                            f"as {dt} with {accelerator.num_processes} process(es)): each would train alone and "
                            f"gradients would never be synchronised. Launch with accelerate launch --config_file "
                            f"{CONFIGS}ddp_cpu.yaml (or ddp.yaml on GPUs)")


def _configure_deepspeed(accelerator, args) -> None:
    """The DeepSpeed settings no dataloader provides, from the script's flags; models load whole (see module doc)."""
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    micro = int(getattr(args, "per_device_train_batch_size", 1))
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = int(args.gradient_accumulation_steps)
    cfg["train_batch_size"] = micro * int(args.gradient_accumulation_steps) * accelerator.num_processes
    cfg["gradient_clipping"] = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    if accelerator.state.deepspeed_plugin.zero_stage == 3:
        from transformers.integrations import unset_hf_deepspeed_config

        # transformers would build every model inside zero.Init: a random init differing from one process's, and
        # frozen models partitioned outside any engine; load them whole and let `prepare` partition the policy
        unset_hf_deepspeed_config()
        accelerator.state.deepspeed_plugin.zero3_init_flag = False


def _configure_fsdp(accelerator) -> None:
    plugin = accelerator.state.fsdp_plugin
    if plugin.cpu_ram_efficient_loading:
        # transformers reads this variable: with it, from_pretrained gives empty (meta) weights on every rank but
        # the first, which only `prepare` would fill; frozen models loaded outside prepare would stay empty
        plugin.cpu_ram_efficient_loading = False
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        accelerator.print("fsdp_cpu_ram_efficient_loading turned off: every process loads the whole model, so frozen "
                          "reference / reward models are real on every rank")


# ----------------------------------------------------------------------------- what each process holds
def parameter_elements(model) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model) of model's parameters: a ZeRO-3 partition, an
    FSDP2 DTensor's local shard, or the whole tensor."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3: partitioned unless persistent (small parameters stay whole)
            total += p.ds_numel
            local += p.ds_numel if getattr(p, "ds_persist", False) else p.ds_tensor.numel()
        elif hasattr(p, "to_local"):  # DTensor (FSDP2)
            total += p.numel()
            local += p.to_local().numel()
        else:
            total += p.numel()
            local += p.numel()
    return local, total


def optimizer_elements(model, optimizer) -> int:
    """Parameter elements whose optimizer state (AdamW moments, fp32 master copy) this process holds and updates."""
    ds_opt = getattr(model, "optimizer", None)  # a DeepSpeed engine's ZeRO optimizer
    groups = (getattr(ds_opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
              or getattr(ds_opt, "fp32_partitioned_groups_flat", None))  # ZeRO-3
    if groups:
        return sum(int(g.numel()) for g in groups)
    local = 0
    for group in getattr(optimizer, "param_groups", []):
        for p in group["params"]:
            local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local


def _zero3_partitioned(module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def whole_parameters(accelerator, model):
    """Collective (every rank enters it): the unwrapped prepared model with every parameter whole on every process
    while inside (ZeRO-3: gathered; FSDP2: every unit unsharded; other modes: as it is), to read them, e.g. to mix
    them into a plain model. Changes made to them inside are not kept under ZeRO-3 / FSDP2."""
    unwrapped = accelerator.unwrap_model(model)
    if _zero3_partitioned(unwrapped):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())):
            yield unwrapped
    elif any(hasattr(p, "to_local") for p in unwrapped.parameters()):
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in unwrapped.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.unshard()
        try:
            yield unwrapped
        finally:
            for m in units:
                m.reshard()
    else:
        yield unwrapped


@contextlib.contextmanager
def submodule_for_generation(accelerator, model, name: str):
    """Collective (every rank enters it). The submodule `name` of a prepared module that holds several models (e.g.
    a policy and a value model prepared as one module, since DeepSpeed runs one engine), ready to be called outside
    the prepared module's own forward: for `generate`, held-out evaluation or a weight push.
      - ZeRO-3: the submodule as it is (partitioned); the generation helpers gather its parameters for the call.
      - FSDP2: the parameters of every unit whole while inside, kept whole across forwards, so the submodule's
        forward talks to no other rank (ranks may stop generating at different steps). The prepared module is
        made the FSDP root first (FSDP takes the first module that runs a forward as its root).
      - other modes: the submodule."""
    unwrapped = accelerator.unwrap_model(model)
    if not any(hasattr(p, "to_local") for p in unwrapped.parameters()):
        yield getattr(unwrapped, name)
        return
    from torch.distributed.fsdp import FSDPModule

    unwrapped._get_fsdp_state()._lazy_init()  # no-op once the prepared module has run a forward
    units = [m for m in unwrapped.modules() if isinstance(m, FSDPModule)]
    kept = [[g.post_forward_mesh_info for g in m._get_fsdp_state()._fsdp_param_groups] for m in units]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield getattr(unwrapped, name)
    finally:
        for m, infos in zip(units, kept):
            for g, info in zip(m._get_fsdp_state()._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info
            m.reshard()


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """Collective: the prepared model's whole weights on every process, under the plain model's names, as copies.
    For copying the policy into a plain model (an old policy, a reset) in every mode."""
    unwrapped = accelerator.unwrap_model(model)
    if _zero3_partitioned(unwrapped):
        with whole_parameters(accelerator, model) as m:
            return {k: v.detach().clone() for k, v in m.state_dict().items()}
    # FSDP2's state_dict() holds DTensors even while unsharded: make each whole (collective, same order everywhere)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in unwrapped.state_dict().items()}


def load_full_state_dict(accelerator, model, state: dict[str, torch.Tensor]) -> None:
    """Collective: write whole weights (the same on every rank) into the prepared model; each process keeps its own
    partition / shard. The inverse of full_state_dict. Under DeepSpeed (ZeRO-1/2/3) the optimizer's float32 master
    copy of each trained parameter is set too: the engine's next step starts from the master copy and writes it
    back into the model, so setting the model's weights alone would be undone by that step."""
    unwrapped = accelerator.unwrap_model(model)
    if _zero3_partitioned(unwrapped):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=0):
            unwrapped.load_state_dict(state)  # rank 0's values are partitioned out to every rank on exit
    elif any(hasattr(p, "to_local") for p in unwrapped.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(unwrapped, state, options=StateDictOptions(full_state_dict=True))
    else:
        unwrapped.load_state_dict(state)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_set_full_fp32_param

        for name, p in unwrapped.named_parameters():  # each rank copies its own part of the whole value (local)
            if p.requires_grad and name in state:
                safe_set_full_fp32_param(p, state[name].to(device=accelerator.device, dtype=torch.float32))


def broadcast_from_main(accelerator, module: torch.nn.Module) -> None:
    """Collective: every parameter and buffer of `module` set to the main process's values, in place (DDP does this
    when it wraps a model; FSDP2 and DeepSpeed keep each process's own values and shard them). The ranks are seeded
    differently (make_accelerator), so anything initialised at random after loading (LoRA's A matrices, a new score
    head) would otherwise differ between processes and the sharded model would be a mix of them. Parameters that
    ZeRO-3 already partitioned at load time are left alone."""
    if accelerator.num_processes == 1 or accelerator.distributed_type not in (DistributedType.FSDP,
                                                                              DistributedType.DEEPSPEED):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if hasattr(t, "ds_id") or hasattr(t, "to_local"):
                continue
            moved = t.data.to(accelerator.device)
            torch.distributed.broadcast(moved, src=0)
            if moved is not t.data:
                t.data.copy_(moved)


class _Accelerator(Accelerator):
    """accelerate's Accelerator. Before preparing, the models' weights are made the main process's on every process
    (broadcast_from_main); after preparing a model and its optimizer it prints (main process) how many elements each
    process holds, so a sharded mode that silently did not shard shows it."""

    def prepare(self, *args, **kwargs):
        for a in args:
            if isinstance(a, torch.nn.Module):
                broadcast_from_main(self, a)
        out = super().prepare(*args, **kwargs)
        result = out if isinstance(out, (tuple, list)) else (out,)
        models = [o for o in result if isinstance(o, torch.nn.Module)]
        opts = [o for o in result if isinstance(o, torch.optim.Optimizer)]
        if models:
            self.report_sharding(models[0], opts[0] if opts else None)
        return out

    def report_sharding(self, model, optimizer=None) -> list[tuple[int, int, int]]:
        """Collective. (parameter elements held, parameter elements in the model, optimizer-state elements held) of
        every process; the main process prints them as one 'sharding:' line."""
        local, total = parameter_elements(model)
        opt = optimizer_elements(model, optimizer) if optimizer is not None else 0
        t = torch.tensor([[local, total, opt]], dtype=torch.float64, device=self.device)
        rows = [tuple(int(x) for x in r) for r in (self.gather(t) if self.num_processes > 1 else t).tolist()]
        self.print("sharding: parameters held per process " + ", ".join(str(r[0]) for r in rows)
                   + f" of {rows[0][1]} elements; optimizer state per process "
                   + ", ".join(str(r[2]) for r in rows), flush=True)
        return rows


def global_batch_size(args, accelerator) -> int:
    return args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps


def micro_batches(global_indices: list[int], args, accelerator) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step. Micro-batch m of rank r holds global rows
    [(m * world + r) * b, (m * world + r + 1) * b), so the union over ranks and micro-steps is the global batch."""
    b, world, r = args.per_device_train_batch_size, accelerator.num_processes, accelerator.process_index
    return [global_indices[(m * world + r) * b:(m * world + r + 1) * b] for m in range(args.gradient_accumulation_steps)]


def gather_sum(accelerator, value: torch.Tensor | float) -> float:
    t = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).reshape(1)
    return accelerator.reduce(t, reduction="sum").item() if accelerator.num_processes > 1 else t.item()


def gather_cat(accelerator, t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over ranks along dim 0 (the same shape on every rank)."""
    if accelerator.num_processes == 1:
        return t
    return accelerator.gather(t.to(accelerator.device)).cpu()


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float,
                   max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS) -> tuple[float, bool]:
    """One optimizer step that never lets a non-finite gradient reach the weights. Call where
    `accelerator.sync_gradients` is true, instead of clip + optimizer.step + scheduler.step + zero_grad.

    Computes the total gradient norm over all processes (and clips to max_grad_norm when it is > 0). If the norm
    is NaN or inf, the step is skipped: the gradients are dropped, the optimizer's parameters and state stay as they
    were and the scheduler does not advance (under fp16 the grad scaler still sees the overflow and lowers its
    scale). Returns (grad norm, True) or (nan, False). The decision is the same on every rank (the norm is that of
    the synchronised gradients). Scripts count the skipped steps and log the cumulative count as
    `train/skipped_steps`. After `max_consecutive_skips` skipped steps in a row (default 10) it raises
    FloatingPointError: the run has diverged and skipping no longer helps.
    Under DeepSpeed the engine clips inside its own step and reports the norm only afterwards: the step is taken
    and (norm, True) returned."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        return (float(norm) if norm is not None else math.nan), True
    # max_norm inf: the norm without clipping (the scale factor is clamped to exactly 1)
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    norm = float(norm)
    if math.isfinite(norm):
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        _consecutive_skips[optimizer] = 0
        return norm, True
    if accelerator.scaler is not None:
        optimizer.step()  # the scaler found the overflow when unscaling: it skips the update and lowers its scale
    optimizer.zero_grad()
    skips = _consecutive_skips.get(optimizer, 0) + 1
    _consecutive_skips[optimizer] = skips
    if skips >= max_consecutive_skips:
        raise FloatingPointError(f"the gradient norm was not finite (NaN or inf) for {skips} optimizer steps in a "
                                 f"row; every one was skipped, but the run has diverged: lower --learning_rate, keep "
                                 f"--max_grad_norm > 0, use bf16 instead of fp16, or check the loss for NaN inputs")
    return math.nan, False
