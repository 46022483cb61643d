"""GKD: Generalized Knowledge Distillation, and on-policy distillation, of a student LM from a teacher LM.

Paper: "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (Agarwal et al., arXiv
2306.13649). Implements the generalized Jensen-Shannon divergence between the teacher's and the student's next-token
distributions (p_T, p_S over the full vocabulary, at temperature τ = --kd_temperature), per completion token t:
    m_t = β p_T + (1 - β) p_S
    D_β = β KL(p_T || m_t) + (1 - β) KL(p_S || m_t)        0 < β < 1
    D_0 = KL(p_T || p_S)  (forward KL)                       D_1 = KL(p_S || p_T)  (reverse KL)
    L(θ) = Σ_{i,t} mask_{i,t} D_β(i, t) / N_tok              N_tok = completion tokens of the whole optimizer step
The completions y come, per optimizer step, from the student itself with probability λ (on-policy, --lmbda), else
from the teacher (--seq_kd True, sequence-level KD) or from the dataset (supervised KD). λ = 0 with seq_kd off is
token-level supervised KD on the dataset's completions (β = 0: the classic word-level KD loss).

Implementation details (numbered so the tests and the README can point at them):
 1. Batch: per_device_train_batch_size counts sequences (prompt + completion) per micro-batch; the global batch is
    per_device x processes x gradient_accumulation_steps, its rows a pure function of (seed, step).
 2. Source of the completions: one draw u ~ U(0, 1) per optimizer step from an RNG seeded by (seed, step); the
    student samples them if u < λ, else the teacher if --seq_kd, else they are the dataset's. One decision covers
    every micro-batch and process of the step, so accumulation and multi-process runs see the same batch and a
    resumed run makes the same decisions. (TRL 1.16's GKDTrainer draws `random.random() <= lmbda` once per
    micro-batch.)
 3. Sampling: one completion per prompt, at --temperature (TRL's 0.9) with top_k 0, top_p 1, at most
    --max_new_tokens (TRL 128; 8 fits the toy answers), cut after the first EOS (EOS kept and trained on). A step's
    completions are all sampled before its first micro-batch, from the weights at the start of the step.
 4. Divergence: TRL's convention (generalized_jsd_loss): β = 0 and β = 1 are exactly the forward and reverse KL;
    for 0 < β < 1 the interpolated D_β above, which tends to 0 (not to a KL) as β -> 0 or 1, so the loss is
    discontinuous at the two endpoints. Summed over the full vocabulary at --kd_temperature (default 1.0: TRL's GKD
    computes the loss at 1.0 whatever the sampling temperature).
 5. Aggregation: the per-token divergences are summed over the completion tokens of the micro-batch and divided by
    N_tok, the completion tokens of the whole optimizer step over every micro-batch and process (TRL's
    num_items_in_batch: a global token mean), so 4 x 2 accumulation and 2 processes equal one batch of 8.
    DEVIATION (TRL 1.16): TRL's num_items_in_batch is counted by the Trainer on the dataset's labels, before GKD
    replaces them with sampled ones, so its on-policy and seq_kd steps divide by the dataset completions' token
    count (without it, TRL takes a per-micro-batch token mean); here N_tok counts the tokens trained on.
 6. Memory: the teacher (frozen, eval mode, outside accelerator.prepare, so a full copy on every process even under
    ZeRO-3 / FSDP; no gradient) and the student each give their final hidden states at the completion positions
    only; the two output heads, the float32 log-softmaxes and D_β then run a block of positions at a time (about
    2^22 float32 logits per block on CPU, 2^26 on accelerators), and the backward recomputes each block's logits
    (distill_micro_batch), so no (B, T, V) logits tensor exists, of either model: peak memory O(block x V), not
    O(B x T x V). Models whose logits are not a plain linear head (or whose head is sharded or wrapped by LoRA)
    give their logits at the completion positions from their forward instead. memory/peak_mb is logged (CUDA: max
    allocated; CPU: peak resident set).
 7. Vocabulary: student and teacher must share a tokenizer (the same token -> id map; checked at start-up, before any
    model loads, with an error naming both sizes). Their logit widths may differ (embeddings padded to a multiple,
    e.g. Qwen2.5-0.5B's 151936 vs Qwen2.5-7B's 152064): the first min(V_S, V_T) columns are compared, which must
    cover the tokenizer.
 8. Dropout is disabled in the student (TRL disable_dropout=True), so its distribution is the one evaluated.
 9. On-policy samples are treated as data: the gradient flows through the per-token divergence, not through the
    sampling of y (as in the paper's Algorithm 1 and TRL). On-policy distillation (the student samples and is
    pulled towards the teacher token by token by the exact full-vocabulary reverse KL) is
    `--lmbda 1 --beta 1`; `--lmbda 1 --beta 0.5` is on-policy GKD with the JSD.
10. Non-finite safety: a non-finite gradient norm skips the optimizer step (train/skipped_steps); non-finite weights
    are never saved (common/checkpoint.py).
11. Metrics: TRL's `loss` (mean over steps of the step's global token mean), `entropy` (student, at the loss
    temperature), `num_tokens`, `grad_norm`, `learning_rate`, `completions/*` on sampled steps; gkd/forward_kl and
    gkd/reverse_kl (token means whatever β), gkd/on_policy_fraction and gkd/seq_kd_fraction of the window's steps.
    Evaluation: eval/loss, eval/forward_kl, eval/reverse_kl on the held-out rows' dataset completions, and on the toy
    tasks the student's greedy held-out exact match eval/gold_reward next to the teacher's eval/teacher_gold_reward.

Default: teacher `toy-sft-full` (the fully trained 4-layer toy model), student `toy-small` (a freshly initialised
2-layer, hidden-64 toy Llama) on toy:add, with TRL's β = 0.5 and λ = 0.5; `--model_name_or_path toy-sft` starts from
the half-trained 4-layer SFT policy. On this toy a fresh student learns from the forward KL on dataset (or teacher)
completions (`--beta 0 --lmbda 0`: 0.72 ± 0.20 held-out exact match in 1000 steps over 3 seeds, teacher 1.0), and
far more slowly with on-policy steps or the JSD (measured in benchmarks/results/gkd: a fresh student's own samples
are mostly wrong, and on-policy steps help only once they are mostly right; the JSD saturates at log 2 while the
two distributions barely overlap, so its gradient is small). The paper distils students that start from SFT.

Run:
    python algos/gkd.py                                            # GKD (β 0.5, λ 0.5), about 3 minutes on 2 CPU cores
    python algos/gkd.py --lmbda 0 --beta 0                         # supervised KD (forward KL on the dataset)
    python algos/gkd.py --lmbda 0 --seq_kd True --beta 0           # sequence-level KD on teacher samples
    python algos/gkd.py --lmbda 1 --beta 1                         # on-policy distillation (per-token reverse KL)
    accelerate launch --multi_gpu --num_processes 2 algos/gkd.py --per_device_train_batch_size 32   # = 1 x 64
    python algos/gkd.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct --dataset_name my_prompts_completions.jsonl \
        --learning_rate 1e-5 --max_new_tokens 128 --max_length 1024 --per_device_train_batch_size 4
    bash benchmarks/gkd.sh                                         # β x λ sweep, 3 seeds -> benchmarks/results/gkd
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro

from common import checkpoint, data, distributed, model as model_utils, peft_utils, rollout, toy, tracking
from common.evaluation import heldout_gold_reward
from common.generation import build_generator


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "gkd"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (student init, data order, sampling, the on-policy draws)"""
    run_name: str | None = None
    """run name; default '{exp_name}__{dataset}__{seed}__{unix time}'"""
    output_dir: str | None = None
    """where metrics, checkpoints and the final model go; default runs/{run_name}"""
    track: bool = False
    """mirror metrics to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "cleanalign"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team)"""
    model_name_or_path: str = "toy-small"
    """the student: 'toy-small' (fresh 2-layer toy Llama), 'toy', 'toy-sft', a local folder or a hub name"""
    teacher_model_name_or_path: str = "toy-sft-full"
    """the teacher (frozen; same tokenizer as the student): 'toy-sft-full', a local folder or a hub name"""
    dataset_name: str = "toy:add"
    """prompt-completion data: 'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a
    save_to_disk folder or a hub name"""
    dataset_split: str = "train"
    """split to train on"""
    eval_split: str | None = "test"
    """held-out split: of a toy dataset, or of --eval_dataset_name when it is a hub name (None: no toy evaluation)"""
    eval_dataset_name: str | None = None
    """held-out data: a file, a save_to_disk folder or a hub name (split eval_split)"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for evaluation (deterministic; never overlaps training)"""
    logging_steps: int = 10
    """log metrics every this many optimizer steps (averaged over the steps since the last log)"""
    save_steps: int = 100
    """checkpoint every this many optimizer steps (0: only the final model)"""
    save_total_limit: int | None = 2
    """keep at most this many checkpoints"""
    resume_from: str | None = None
    """a checkpoint folder, or 'auto' for the newest complete one in output_dir"""
    overwrite_output_dir: bool = False
    """start a new run in an output_dir that holds another run's files (they are deleted first)"""
    mixed_precision: str | None = None
    """'no', 'fp16' or 'bf16' (default: whatever `accelerate launch` configured)"""
    # --- optimisation
    learning_rate: float = 3e-3
    """AdamW learning rate (the 2-layer toy student trains from scratch; use ~1e-5 for a pretrained student)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 20
    """linear warm-up steps"""
    lr_scheduler: str = "linear"
    """after warm-up: 'linear' decay to 0 at --max_steps, or 'constant'"""
    max_steps: int = 1000
    """optimizer steps"""
    per_device_train_batch_size: int = 64
    """sequences per micro-batch per process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- GKD
    beta: float = 0.5
    """β of the generalized JSD: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), between: the
    interpolated JSD (TRL's convention)"""
    lmbda: float = 0.5
    """λ: the fraction of optimizer steps whose completions the student samples (on-policy)"""
    seq_kd: bool = False
    """on the other steps, train on teacher-sampled completions instead of the dataset's (sequence-level KD)"""
    temperature: float = 0.9
    """sampling temperature of the student and teacher completions"""
    kd_temperature: float = 1.0
    """temperature of both distributions inside the divergence (TRL's GKD uses 1.0)"""
    max_new_tokens: int = 8
    """longest sampled completion"""
    max_length: int = 128
    """longest tokenised prompt + dataset completion kept (prompt tokens are cut from the left first)"""
    disable_dropout: bool = True
    """turn the student's dropout off (TRL's default)"""
    # --- evaluation and logging
    eval_steps: int = 100
    """evaluate every this many steps, at step 0 and at the end (0: never)"""
    num_eval_prompts: int = 256
    """held-out rows: prompts of the greedy exact match (toy tasks) and rows of eval/loss"""
    log_completions_steps: int = 100
    """write sample completions every this many steps (0: never)"""
    num_completions_to_log: int = 8
    """sample completions per log"""
    # --- LoRA (common/peft_utils.py)
    use_peft: bool = False
    """train LoRA adapters (PEFT) instead of every weight; a reference model is then this model with its adapters off"""
    lora_r: int = 16
    """LoRA rank r"""
    lora_alpha: int = 32
    """LoRA alpha: the adapter's update is scaled by alpha / r"""
    lora_dropout: float = 0.0
    """dropout on the input of each LoRA branch (above 0 it also makes training-mode log-probs noisy: importance
    ratios, KL terms and the sampler-trainer gap then carry that noise)"""
    lora_target_modules: list[str] | None = None
    """names (or dotted-name suffixes) of the layers that get adapters, e.g. q_proj v_proj; None: every linear layer
    but the output head (peft's 'all-linear')"""
    lora_modules_to_save: list[str] | None = None
    """modules trained fully and saved with the adapter (a reward or value model's score head always is)"""
    merge_adapter: bool = False
    """also save the final model with the adapters merged in, output_dir/merged (loadable with from_pretrained)"""


SOURCES = ("student", "teacher", "dataset")


# ----------------------------------------------------------------------------- the math
# Shapes: B sequences per micro-batch, T completion tokens, V vocabulary, N valid (masked-in) completion tokens.
def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = Σ_v p_v (log p_v - log q_v) per row. logp, logq: (N, V) log-probabilities -> (N,)."""
    assert logp.shape == logq.shape and logp.dim() == 2
    return (logp.exp() * (logp - logq)).sum(-1)


def generalized_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token divergence (N,) between the student's and the teacher's log-probabilities (N, V) (detail 4):
    β = 0: KL(p_T || p_S); β = 1: KL(p_S || p_T); else β KL(p_T || m) + (1 - β) KL(p_S || m) with
    m = β p_T + (1 - β) p_S."""
    assert student_logps.shape == teacher_logps.shape and student_logps.dim() == 2
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta {beta}: must be in [0, 1]")
    if beta == 0.0:
        return kl_rows(teacher_logps, student_logps)
    if beta == 1.0:
        return kl_rows(student_logps, teacher_logps)
    log_m = torch.logaddexp(teacher_logps + math.log(beta), student_logps + math.log1p(-beta))  # (N, V)
    return beta * kl_rows(teacher_logps, log_m) + (1.0 - beta) * kl_rows(student_logps, log_m)


def gkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float,
             temperature: float = 1.0, num_items: float | None = None):
    """Σ over the masked tokens of D_β, divided by num_items (default: this micro-batch's token count) (detail 5),
    from full logits: student_logits, teacher_logits: (B, T, V); mask: (B, T) 0/1 (training computes the same sum
    block by block from hidden states: distill_micro_batch). Returns (loss, per-token D_β (N,), student log-probs
    (N, V), teacher log-probs (N, V))."""
    assert student_logits.shape == teacher_logits.shape and student_logits.shape[:2] == mask.shape
    keep = mask.bool()
    s_logps = torch.log_softmax(student_logits[keep].float() / temperature, -1)  # (N, V)
    t_logps = torch.log_softmax(teacher_logits[keep].float() / temperature, -1)  # (N, V)
    per_token = generalized_jsd(s_logps, t_logps, beta)  # (N,)
    denom = num_items if num_items is not None else max(int(keep.sum()), 1)
    return per_token.sum() / denom, per_token, s_logps, t_logps


def batch_source(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
    """Who writes the completions of optimizer step `step` (detail 2): 'student' with probability λ, else 'teacher'
    (seq_kd) or 'dataset'. A pure function of (seed, step)."""
    u = random.Random(seed * 1_000_003 + step).random()
    if u < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"


def token_divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """D_β (n,) of n positions' raw logits (n, V) (gradient through the student's), and their no-gradient statistics
    (n, 3): forward KL(p_T || p_S), reverse KL(p_S || p_T), the student's entropy, all at the loss temperature."""
    s_logps = torch.log_softmax(student_logits.float() / temperature, -1)  # (n, V)
    t_logps = torch.log_softmax(teacher_logits.float() / temperature, -1)  # (n, V)
    per_token = generalized_jsd(s_logps, t_logps, beta)  # (n,)
    with torch.no_grad():
        s_, t_ = s_logps.detach(), t_logps.detach()
        stats = torch.stack([kl_rows(t_, s_), kl_rows(s_, t_), -(s_.exp() * s_).sum(-1)], -1)  # (n, 3)
    return per_token, stats


STATS = ("forward_kl", "reverse_kl", "entropy")  # the columns of token_divergences' statistics


class _ChunkedDivergence(torch.autograd.Function):
    """D_β of N positions from the student's final hidden states h (N, H) through its output head (weight, bias), a
    block of `rows` positions at a time (detail 6): the teacher's logits of a block come from `teacher_rows(s, e)`
    (n, ≥ V) without gradient. The forward keeps no logits; the backward recomputes each block's student and
    teacher logits and takes the gradient of D_β with respect to the block's logits by autograd."""

    @staticmethod
    def forward(ctx, h, weight, bias, teacher_rows, beta, temperature, vocab, rows):
        w, b = weight[:vocab].to(h.dtype), bias[:vocab].to(h.dtype) if bias is not None else None
        N = h.shape[0]
        per_token = torch.empty(N, dtype=torch.float32, device=h.device)
        stats = torch.empty((N, len(STATS)), dtype=torch.float32, device=h.device)
        for s in range(0, N, rows):
            z = torch.nn.functional.linear(h[s:s + rows], w, b)  # (n, V)
            per_token[s:s + rows], stats[s:s + rows] = token_divergences(z, teacher_rows(s, s + rows)[:, :vocab],
                                                                         beta, temperature)
        ctx.save_for_backward(h, weight, bias)
        ctx.teacher_rows, ctx.beta, ctx.temperature, ctx.vocab, ctx.rows = teacher_rows, beta, temperature, vocab, rows
        ctx.mark_non_differentiable(stats)
        return per_token, stats

    @staticmethod
    def backward(ctx, grad_per_token, _grad_stats):
        h, weight, bias = ctx.saved_tensors
        V, rows = ctx.vocab, ctx.rows
        w, b = weight[:V].to(h.dtype), bias[:V].to(h.dtype) if bias is not None else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b and bias is not None else None
        for s in range(0, h.shape[0], rows):
            hs = h[s:s + rows]
            with torch.no_grad():
                z = torch.nn.functional.linear(hs, w, b)
                t = ctx.teacher_rows(s, s + rows)[:, :V]
            with torch.enable_grad():
                z.requires_grad_(True)
                per_token, _ = token_divergences(z, t, ctx.beta, ctx.temperature)
                (dz,) = torch.autograd.grad(per_token, z, grad_per_token[s:s + rows])  # (n, V), in the model's dtype
            if need_h:
                grad_h[s:s + rows] = dz @ w
            if need_w:  # accumulated in place: no second (V, H) tensor per block
                grad_w[:V].addmm_(dz.t().float(), hs.float())
            if grad_b is not None:
                grad_b[:V] += dz.float().sum(0)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def distill_micro_batch(model, teacher, batch: dict, beta: float, temperature: float, num_items: float,
                        vocab: int, chunk_elements: int | None = None):
    """gkd_loss of one micro-batch ([left-padded prompt | right-padded completion], completion_mask (B, T)) without
    (B, T, V) logits (detail 6): the student's final hidden states at the N completion positions once (with
    gradient), the teacher's without; then the output heads, the float32 log-softmaxes and D_β a block of positions
    at a time (about chunk_elements float32 logits per block; default common/model.py's LOGPS_CHUNK_ELEMENTS), the
    student's block recomputed in the backward. The first `vocab` logit columns (detail 7). A model whose logits are
    not a plain linear head gives its logits at the completion positions from its forward. Returns (loss, per-token
    D_β (N,), a dict of no-gradient per-token statistics (N,) named as STATS)."""
    T = batch["completion_mask"].shape[1]
    keep = batch["completion_mask"].bool()  # (B, T)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": model_utils.position_ids_from_mask(batch["attention_mask"])}
    budget = chunk_elements or model_utils.LOGPS_CHUNK_ELEMENTS["cpu" if keep.device.type == "cpu" else "other"]
    rows = max(1, budget // vocab)

    def valid_positions(m, head):  # (N, H) final hidden states, or (N, V) logits, predicting the completion tokens
        if head is not None:
            return model_utils.hidden_before_head(m, head, T + 1, **inputs)[:, :-1][keep]
        return m(**inputs, logits_to_keep=T + 1, use_cache=False).logits[:, :-1][keep]

    t_head = model_utils.chunked_head(teacher)
    with torch.no_grad():
        t_out = valid_positions(teacher, t_head)  # (N, H_T) or (N, V_T)
    if t_head is not None:
        t_w = t_head.weight[:vocab].to(t_out.dtype)
        t_b = t_head.bias[:vocab].to(t_out.dtype) if t_head.bias is not None else None

        def teacher_rows(s, e):
            with torch.no_grad():
                return torch.nn.functional.linear(t_out[s:e], t_w, t_b)
    else:
        def teacher_rows(s, e):
            return t_out[s:e]

    head = model_utils.chunked_head(model)
    out = valid_positions(model, head)  # (N, H) or (N, V)
    if head is not None:
        per_token, stats = _ChunkedDivergence.apply(out, head.weight, head.bias, teacher_rows, beta, temperature,
                                                    vocab, rows)
    else:  # the logits already exist: D_β over them block by block, by autograd
        parts = [token_divergences(out[s:s + rows, :vocab], teacher_rows(s, s + rows)[:, :vocab], beta, temperature)
                 for s in range(0, out.shape[0], rows)]
        per_token = torch.cat([p for p, _ in parts]) if parts else out.new_zeros(0, dtype=torch.float32)
        stats = torch.cat([q for _, q in parts]) if parts else out.new_zeros((0, len(STATS)), dtype=torch.float32)
    return per_token.sum() / num_items, per_token, dict(zip(STATS, stats.unbind(-1)))


# ----------------------------------------------------------------------------- plumbing (safe to skip)
def vocabulary_mismatch(student_tok, teacher_tok) -> str | None:
    """Why the teacher cannot score the student's token ids (another token -> id map), or None."""
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    if a == b:
        return None
    diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
    return (f"the student's tokenizer has {len(a)} tokens and the teacher's {len(b)}"
            + (" (same size, other ids)" if len(a) == len(b) else "") + f"; e.g. {diff}")


def logits_width(name: str, dataset_name: str) -> int:
    """The output vocabulary width of a model, from its config (no weights loaded)."""
    if name in model_utils.TOY_CONFIGS:
        return len(toy.make_tokenizer())
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_utils.resolve(name, dataset_name))
    return cfg.get_text_config().vocab_size


def tokenize_rows(ds, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per row, prompt cut from the left first, then the completion."""
    p_ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in ds["prompt"]])
    c_ids = data.tokenize(tokenizer, [data.completion_text(p, c, tokenizer)
                                      for p, c in zip(ds["prompt"], ds["completion"])])
    out = []
    for p, c in zip(p_ids, c_ids):
        over = len(p) + len(c) - max_length
        if over > 0:
            cut = min(over, max(len(p) - 1, 0))
            p, c = p[cut:], c[: len(c) - (over - cut)]
        out.append((p, c))
    return out


def disable_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_args(args: Args):
    if not 0.0 <= args.beta <= 1.0:
        raise ValueError(f"--beta {args.beta}: must be in [0, 1] (0 forward KL, 1 reverse KL)")
    if not 0.0 <= args.lmbda <= 1.0:
        raise ValueError(f"--lmbda {args.lmbda}: a fraction of steps, in [0, 1]")
    if args.temperature <= 0 or args.kd_temperature <= 0:
        raise ValueError("--temperature and --kd_temperature must be positive")
    if (args.lmbda > 0 or args.seq_kd) and args.max_new_tokens <= 0:
        raise ValueError("--max_new_tokens must be positive when completions are sampled (--lmbda > 0 or --seq_kd)")
    if args.max_steps <= 0 or args.per_device_train_batch_size <= 0 or args.gradient_accumulation_steps <= 0:
        raise ValueError("--max_steps, --per_device_train_batch_size and --gradient_accumulation_steps must be "
                         "positive")
    if args.lr_scheduler not in ("constant", "linear"):
        raise ValueError(f"--lr_scheduler {args.lr_scheduler!r}: choose 'constant' or 'linear'")


# ----------------------------------------------------------------------------- main
def main(args: Args):
    # ---- plumbing (safe to skip): checks, tokenizers, data, run folder, models
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    check_args(args)
    accelerator = distributed.make_accelerator(args)
    W, device = accelerator.num_processes, accelerator.device
    A, B = args.gradient_accumulation_steps, args.per_device_train_batch_size
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    teacher_tok = model_utils.load_tokenizer(args.teacher_model_name_or_path, args.dataset_name,
                                             flag="--teacher_model_name_or_path")
    why = vocabulary_mismatch(tokenizer, teacher_tok)  # detail 7
    if why:
        raise ValueError(f"--model_name_or_path {args.model_name_or_path} and --teacher_model_name_or_path "
                         f"{args.teacher_model_name_or_path} have different vocabularies: {why}. GKD compares the two "
                         "next-token distributions token by token: give a student and a teacher with the same "
                         "tokenizer")
    vocab = min(logits_width(args.model_name_or_path, args.dataset_name),
                logits_width(args.teacher_model_name_or_path, args.dataset_name))
    if vocab < len(tokenizer):
        raise ValueError(f"the student's or the teacher's output layer has {vocab} columns, fewer than the "
                         f"{len(tokenizer)} tokens of the shared tokenizer")
    train_ds, eval_ds = data.load_splits(args, "prompt_completion", "gkd.py", toy_n=args.num_eval_prompts)
    train = tokenize_rows(train_ds, tokenizer, args.max_length)
    eval_rows = [] if eval_ds is None else tokenize_rows(eval_ds, tokenizer, args.max_length)[:args.num_eval_prompts]
    global_bs = distributed.global_batch_size(args, accelerator)
    data.check_batch_fits(len(train), global_bs, ["--per_device_train_batch_size", "--gradient_accumulation_steps"])
    peft_utils.check_args(args)  # LoRA flags and module names (of the student), before anything is loaded or written
    resume = checkpoint.prepare_output_dir(args)  # one run per folder: refuses to mix with another run's files

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters on the student, the rest frozen
    if args.disable_dropout:
        disable_dropout(model)  # detail 8
    teacher = model_utils.load_causal_lm(args.teacher_model_name_or_path, tokenizer, args.dataset_name).to(device)
    teacher.eval().requires_grad_(False)  # detail 6: frozen, outside accelerator.prepare
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    def lr_lambda(step):  # linear warm-up, then constant or linear decay to 0
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.lr_scheduler == "constant":
            return 1.0
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand once per optimizer step
    generator = build_generator(args, tokenizer, accelerator)  # HF generate: top_k 0, top_p 1 (detail 3)

    state = {"step": 0, "elapsed": 0.0, "num_tokens": 0.0, "skipped_steps": 0}
    if resume is not None:
        state.update(checkpoint.load_checkpoint(accelerator, resume))
        accelerator.print(f"resumed from {resume} at step {state['step']}")
    start_step, num_tokens, skipped = state["step"], state["num_tokens"], state["skipped_steps"]
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, state["elapsed"],
                               show=("loss", "gkd/reverse_kl", "eval/gold_reward", "eval/teacher_gold_reward"))
    accelerator.print(f"gkd: {len(train)} rows; {W} process(es) x {A} micro-batch(es) x {B} sequences per step, "
                      f"β {args.beta}, λ {args.lmbda}, seq_kd {args.seq_kd}, {args.max_steps} steps -> "
                      f"{args.output_dir}")

    pad_id = tokenizer.pad_token_id
    task = data.toy_task(args.dataset_name)
    gold_fn = toy.gold_reward(task) if task else None  # samples show their exact match on toy tasks
    prompts = train_ds["prompt"]
    teacher_gold = None

    @torch.no_grad()
    def evaluate() -> dict:
        """Divergences on the held-out rows' dataset completions (token means over all rows; every process evaluates
        all of them) and, on toy tasks, the student's and the teacher's greedy held-out exact match."""
        nonlocal teacher_gold
        out = {}
        student = accelerator.unwrap_model(model)
        if eval_rows:
            student.eval()
            sums = defaultdict(float)
            for s in range(0, len(eval_rows), B):
                chunk = eval_rows[s:s + B]
                batch = data.batch_prompt_completion([r[0] for r in chunk], [r[1] for r in chunk], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                _, per_token, stats = distill_micro_batch(student, teacher, batch, args.beta, args.kd_temperature,
                                                          1.0, vocab)
                sums["div"] += per_token.sum().item()
                sums["fkl"] += stats["forward_kl"].sum().item()
                sums["rkl"] += stats["reverse_kl"].sum().item()
                sums["tokens"] += per_token.numel()
            student.train()
            n = max(sums["tokens"], 1.0)
            out.update({"eval/loss": sums["div"] / n, "eval/forward_kl": sums["fkl"] / n,
                        "eval/reverse_kl": sums["rkl"] / n})
        if task and args.eval_split:
            gold = heldout_gold_reward(student, tokenizer, args.dataset_name, args.num_eval_prompts,
                                       args.max_new_tokens, accelerator=accelerator, split=args.eval_split)
            if teacher_gold is None:  # the teacher never changes: once per run
                teacher_gold = heldout_gold_reward(teacher, tokenizer, args.dataset_name, args.num_eval_prompts,
                                                   args.max_new_tokens, accelerator=accelerator,
                                                   split=args.eval_split)["eval/gold_reward"]
            out.update({**gold, "eval/teacher_gold_reward": teacher_gold})
        return out

    def save(step: int):
        checkpoint.save_checkpoint(accelerator, args.output_dir, step, model, tokenizer, args,
                                   {"elapsed": tracker.elapsed(), "num_tokens": num_tokens, "skipped_steps": skipped},
                                   args.save_total_limit)

    if start_step == 0 and args.eval_steps:
        tracker.log(evaluate(), 0, args.max_steps)

    window = defaultdict(list)
    model.train()
    for step in range(start_step, args.max_steps):
        # ---------------------------------------------------------------- the step's completions (details 1-3)
        indices = data.batch_indices(len(train), global_bs, step, args.seed)
        local = [i for mb in distributed.micro_batches(indices, args, accelerator) for i in mb]  # A * B rows
        p_ids = [train[i][0] for i in local]
        source = batch_source(args.seed, step, args.lmbda, args.seq_kd)
        if source == "dataset":
            c_ids = [train[i][1] for i in local]
        else:
            out = generator.generate(model if source == "student" else teacher, p_ids, n=1)
            c_ids = rollout.completion_id_lists(out.completion_ids, out.completion_mask)
            for k_, v in rollout.completion_metrics(accelerator, out.completion_mask, out.terminated).items():
                window[k_].append(v)
        num_items = distributed.gather_sum(accelerator, sum(len(c) for c in c_ids))  # detail 5: the whole step
        num_tokens += num_items + distributed.gather_sum(accelerator, sum(len(p) for p in p_ids))

        # ---------------------------------------------------------------- one optimizer step, micro-batch by micro
        sums, sample_div = defaultdict(float), None
        for m in range(A):
            rows = slice(m * B, (m + 1) * B)
            batch = data.batch_prompt_completion(p_ids[rows], c_ids[rows], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss, per_token, stats = distill_micro_batch(model, teacher, batch, args.beta,
                                                             args.kd_temperature, num_items, vocab)
                # accelerate divides by the accumulation steps and DDP averages over processes; undo both so the
                # gradient is that of the global token mean (detail 5)
                accelerator.backward(loss * A * W)
                if accelerator.sync_gradients:
                    sums["grad_norm"], stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                                            args.max_grad_norm)
                    skipped += not stepped
            with torch.no_grad():
                sums["div"] += per_token.sum().item()
                sums["fkl"] += stats["forward_kl"].sum().item()
                sums["rkl"] += stats["reverse_kl"].sum().item()
                sums["entropy"] += stats["entropy"].sum().item()
                if m == 0:  # per-row divergence of the first micro-batch, for the sample log
                    row_of = batch["completion_mask"].bool().nonzero()[:, 0]
                    sample_div = torch.zeros(len(p_ids[rows])).index_add_(0, row_of.cpu(), per_token.detach().cpu())

        # ---- plumbing (safe to skip): step metrics over every process, logging, checkpoints
        tot = {k_: distributed.gather_sum(accelerator, v) for k_, v in sums.items() if k_ != "grad_norm"}
        window["loss"].append(tot["div"] / num_items)
        window["gkd/forward_kl"].append(tot["fkl"] / num_items)
        window["gkd/reverse_kl"].append(tot["rkl"] / num_items)
        window["entropy"].append(tot["entropy"] / num_items)
        window["grad_norm"].append(sums["grad_norm"])
        window["gkd/on_policy_fraction"].append(float(source == "student"))
        window["gkd/seq_kd_fraction"].append(float(source == "teacher"))
        done = step + 1
        if args.log_completions_steps and (done % args.log_completions_steps == 0 or done == 1):
            rows = []
            for j in range(min(args.num_completions_to_log, B)):
                prompt, text = prompts[local[j]], tokenizer.decode(c_ids[j], skip_special_tokens=True)
                row = {"prompt": prompt, "completion": text, "source": source, "divergence": sample_div[j].item()}
                if gold_fn is not None:
                    row["gold_reward"] = gold_fn([prompt], rollout.as_completions([prompt], [text]))[0]
                rows.append(row)
            tracker.log_samples(done, rows)
        if done % args.logging_steps == 0 or done == args.max_steps:
            metrics = {k_: sum(v) / len(v) for k_, v in window.items() if v}
            metrics.update({"num_tokens": num_tokens, "learning_rate": scheduler.get_last_lr()[0],
                            "train/skipped_steps": skipped, "memory/peak_mb": peak_memory_mb(device)})
            window = defaultdict(list)
            if args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps):
                metrics.update(evaluate())
            tracker.log(metrics, done, args.max_steps)
        if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
            save(done)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir, args.max_steps)
    if args.save_steps:
        save(args.max_steps)
    tracker.close()
    accelerator.print(f"saved the final student to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
