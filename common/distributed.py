"""One accelerate setup for every script, and the batch arithmetic that makes multi-process and gradient
accumulation runs see exactly the global batch a single process would.

Launch with `accelerate launch [--num_processes N] [--config_file configs/accelerate/<ddp|zero2|zero3|fsdp>.yaml]`.
On a machine without a GPU, several processes need `--multi_gpu` (accelerate then starts them with torchrun; without
it, accelerate starts a single process on CPU): `accelerate launch --multi_gpu --num_processes 2 algos/sft.py`.
They communicate over gloo.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed


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
