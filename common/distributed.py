"""One accelerate setup for every script, and the batch arithmetic that makes multi-process and gradient
accumulation runs see exactly the global batch a single process would.

Launch with `accelerate launch [--num_processes N] [--config_file configs/accelerate/<ddp|zero2|zero3|fsdp>.yaml]`.
On a machine without a GPU, several processes need `--multi_gpu` (accelerate then starts them with torchrun; without
it, accelerate starts a single process on CPU): `accelerate launch --multi_gpu --num_processes 2 algos/sft.py`.
They communicate over gloo.
"""

from __future__ import annotations

import math
import weakref

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

MAX_CONSECUTIVE_SKIPS = 10
_consecutive_skips: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> skipped steps in a row


def make_accelerator(args) -> Accelerator:
    """Accelerator with manual gradient accumulation bookkeeping (see `micro_batches`), per-rank seeding and the
    mixed-precision flag (`--mixed_precision no|fp16|bf16`; unset leaves the accelerate config's choice)."""
    kwargs = {}
    if getattr(args, "mixed_precision", None):
        kwargs["mixed_precision"] = args.mixed_precision
    # cpu=True on a machine without CUDA makes a torchrun-started group use gloo (MULTI_CPU) instead of staying
    # a set of unconnected single processes
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              cpu=not torch.cuda.is_available(), **kwargs)
    # identical init on every rank (the model is seeded separately), distinct sampling streams per rank
    set_seed(args.seed + accelerator.process_index)
    return accelerator


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
