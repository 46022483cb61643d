"""Types and helpers every sampling backend shares (HF generate in common/generation.py, vLLM in
common/vllm_backend.py). A leaf module: it imports no other project module, so both backends import it and neither
imports the other's internals.

Output layout: completion ids right-padded to (N, T), a 0/1 completion mask cut after the first EOS (the EOS kept),
`terminated[i]` = the completion ended with EOS within max_new_tokens. Row i*n + j is sample j of prompt i.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    max_new_tokens: int = 16


@dataclass
class Generation:
    completion_ids: torch.Tensor  # (N, T) long, right-padded
    completion_mask: torch.Tensor  # (N, T) long 0/1, EOS included
    terminated: torch.Tensor  # (N,) bool
    texts: list[str]  # decoded completions, special tokens removed
    sampler_logps: torch.Tensor | None = None  # (N, T) log-probs of the sampled tokens under the sampler, if known


def mask_after_eos(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) ids -> (mask (N, T) 0/1 keeping tokens up to and including the first EOS, terminated (N,) bool)."""
    is_eos = ids == eos_id
    terminated = is_eos.any(1)
    first = torch.where(terminated, is_eos.float().argmax(1), torch.full_like(terminated, ids.shape[1], dtype=torch.long))
    mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] <= first[:, None]).long()
    return mask, terminated


@contextlib.contextmanager
def unwrapped_for_generation(accelerator, model):
    """The bare model for `generate`; under DeepSpeed ZeRO-3 the partitioned parameters are gathered for the call
    (collective: every rank enters it). Under FSDP2 the model stays sharded and each forward gathers one layer unit
    at a time; pass `synced_gpus=synced_ranks(accelerator, m)` to `generate` so ranks keep stepping together."""
    wrapped = isinstance(getattr(model, "module", None), torch.nn.Module) or hasattr(model, "_orig_mod")
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None and wrapped else model  # (unwrap: ~4 ms)
    ds_plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if ds_plugin is not None and ds_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrapped
    else:
        yield unwrapped


def synced_ranks(accelerator, model) -> bool:
    """Whether `generate` must run in lockstep on every rank (HF's `synced_gpus`): the model's forward talks to the
    other ranks (ZeRO-3 partitioned or FSDP2-sharded parameters), so a rank that finished early keeps stepping until
    all have."""
    if accelerator is None or accelerator.num_processes == 1:
        return False
    return any(hasattr(p, "ds_id") or hasattr(p, "to_local") for p in model.parameters())
