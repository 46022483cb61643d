"""Batched sampling of completions. HF `generate` is the default backend; the vLLM backend (common/vllm_backend.py)
has the same interface: `generate(prompt_ids, n) -> Generation` and `sync_weights(model)`.

Output layout: completion ids right-padded to (N, T), a 0/1 completion mask cut after the first EOS (the EOS kept),
`terminated[i]` = the completion ended with EOS within max_new_tokens. Row i*n + j is sample j of prompt i.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from common.data import pad


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
    """The bare model for `generate`; under DeepSpeed ZeRO-3 the sharded parameters are gathered for the call."""
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    ds_plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if ds_plugin is not None and ds_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrapped
    else:
        yield unwrapped


class HFGenerator:
    """Sampling with `model.generate`: all prompts of a batch in one call, `n` samples per prompt."""

    def __init__(self, tokenizer, cfg: SamplingConfig, accelerator=None):
        self.tokenizer, self.cfg, self.accelerator = tokenizer, cfg, accelerator

    def sync_weights(self, model):  # the HF path samples from the live model: nothing to sync
        pass

    @torch.no_grad()
    def generate(self, model, prompt_ids: list[list[int]], n: int = 1, greedy: bool = False) -> Generation:
        from transformers import GenerationConfig

        tok, cfg = self.tokenizer, self.cfg
        ids, mask = pad(prompt_ids, tok.pad_token_id, "left")
        with unwrapped_for_generation(self.accelerator, model) as m:
            device = next(m.parameters()).device
            was_training = m.training
            m.eval()
            gen_cfg = GenerationConfig(
                do_sample=not greedy and cfg.temperature > 0,
                temperature=cfg.temperature if cfg.temperature > 0 else 1.0,
                top_p=cfg.top_p, top_k=cfg.top_k or None, min_p=cfg.min_p,  # top_k 0 = off
                max_new_tokens=cfg.max_new_tokens, num_return_sequences=n,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            )
            out = m.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
            if was_training:
                m.train()
        completion = out[:, ids.shape[1]:]
        cmask, terminated = mask_after_eos(completion, tok.eos_token_id)
        completion = torch.where(cmask.bool(), completion, torch.full_like(completion, tok.pad_token_id))
        texts = tok.batch_decode([c[m.bool()] for c, m in zip(completion, cmask)], skip_special_tokens=True)
        return Generation(completion, cmask, terminated, texts)


def build_generator(args, tokenizer, accelerator=None, model=None):
    """The sampling backend chosen by `args.use_vllm` (HF generate unless set)."""
    cfg = SamplingConfig(temperature=args.temperature, top_p=getattr(args, "top_p", 1.0), top_k=getattr(args, "top_k", 0),
                         min_p=getattr(args, "min_p", None), max_new_tokens=args.max_new_tokens)
    if getattr(args, "use_vllm", False):
        from common.vllm_backend import VLLMGenerator  # optional extra; raises with the install command if absent

        return VLLMGenerator(args, tokenizer, cfg, accelerator, model)
    return HFGenerator(tokenizer, cfg, accelerator)


def pad_completions(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad(seqs, pad_id, "right")


# the sampler-trainer gap helpers live in common/rollout.py; the one-process form stays importable from here
from common.rollout import sampler_gap  # noqa: E402,F401


def sampler_gap_metrics(diffs: list[torch.Tensor]) -> dict:
    """This process's sampler-trainer gap from `sampler_gap` outputs; use common.rollout.sampler_gap_metrics (or
    sampler_gap_metrics_from_diffs) for the gap over every process."""
    from common.rollout import sampler_gap_metrics_from_diffs

    return sampler_gap_metrics_from_diffs(None, diffs)
