"""Batched sampling of completions. HF `generate` is the default backend; the vLLM backend (common/vllm_backend.py)
has the same interface: `generate(prompt_ids, n) -> Generation` and `sync_weights(model)`.

Output layout: completion ids right-padded to (N, T), a 0/1 completion mask cut after the first EOS (the EOS kept),
`terminated[i]` = the completion ended with EOS within max_new_tokens. Row i*n + j is sample j of prompt i.
"""

from __future__ import annotations

import torch

from common.data import pad
from common.sampling import (Generation, SamplingConfig, mask_after_eos, synced_ranks,  # noqa: F401
                             unwrapped_for_generation)
from common.vllm_backend import VLLMGenerator

# Generation, SamplingConfig, mask_after_eos and unwrapped_for_generation live in common/sampling.py (shared with
# common/vllm_backend.py) and are re-exported here: `from common.generation import SamplingConfig` keeps working.


class HFGenerator:
    """Sampling with `model.generate`: all prompts of a batch in one call, `n` samples per prompt."""

    def __init__(self, tokenizer, cfg: SamplingConfig, accelerator=None):
        self.tokenizer, self.cfg, self.accelerator = tokenizer, cfg, accelerator

    def sync_weights(self, model):  # the HF path samples from the live model: nothing to sync
        pass

    @torch.no_grad()
    def generate(self, model, prompt_ids: list[list[int]], n: int = 1, greedy: bool = False,
                 logits_processor: list | None = None) -> Generation:
        """logits_processor: extra HF logits processors, applied before the sampling warpers of `cfg`."""
        from transformers import GenerationConfig, LogitsProcessorList

        tok, cfg = self.tokenizer, self.cfg
        ids, mask = pad(prompt_ids, tok.pad_token_id, "left")
        with unwrapped_for_generation(self.accelerator, model) as m:
            device = next(m.parameters()).device
            was_training = m.training
            m.eval()
            sample = not greedy and cfg.temperature > 0
            gen_cfg = GenerationConfig(
                do_sample=sample,
                temperature=cfg.temperature if cfg.temperature > 0 else 1.0,
                # top_k 0 = off, passed as 0 when sampling: None would make HF fall back to the model's generation
                # config or its global default (top-50)
                top_p=cfg.top_p, top_k=cfg.top_k if sample else None, min_p=cfg.min_p,
                max_new_tokens=cfg.max_new_tokens, num_return_sequences=n,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            )
            out = m.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                             synced_gpus=synced_ranks(self.accelerator, m),
                             logits_processor=LogitsProcessorList(logits_processor) if logits_processor else None)
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
        return VLLMGenerator(args, tokenizer, cfg, accelerator, model)  # raises with the install command without vllm
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
