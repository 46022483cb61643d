"""Nash-MD: Nash learning from human feedback by mirror descent against a geometric-mixture opponent.

Paper: "Nash Learning from Human Feedback" (Munos et al., arXiv 2312.00886), Nash-MD (Section 6) and its
policy-gradient form Nash-MD-PG (Section 7). Each step, for every prompt x: sample y ~ π_θ(·|x) and an opponent
y' ~ π^mix(·|x), where π^mix is the geometric mixture of the policy and the reference with coefficient c:
    log π^mix(y_t | x, y_<t) = log softmax( c · z^ref_t + (1 - c) · z^θ_t )        (z = next-token logits)
The preference P = P(y ≻ y' | x) comes from the preference source, and the loss is
    L = mean_prompts[ β · Σ_t m_t sg(ℓ^θ_t - ℓ^ref_t) ℓ^θ_t  -  (P - ½) · S^θ(y|x) ]
with ℓ_t the per-token log-probs of the policy sample y, S^θ = Σ_t m_t ℓ^θ_t and sg = stop-gradient. Both terms
are REINFORCE (score-function) estimators on the policy's own sample: the first is the gradient of β·KL(π_θ‖π_ref),
the second of the preference against the opponent, with ½ a control variate (a fair coin beats nobody).
Gradients flow through the policy sample's log-probs only; the opponent is a fixed sample.

Preferences come from exactly one source:
  --reward_model_name_or_path NAME   a one-output sequence classifier (default: toy-rm, the toy reward model)
  --reward_funcs SPEC                one reward function: add | reverse | path/file.py:fn | module:fn
  --judge SPEC                       a pairwise judge: rm:<model> | fn:<reward spec> | file.py:Name | module:Name
To use a reward function or judge, turn the default reward model off: `--reward_model_name_or_path None`.
"TRL" below is TRL 1.13's experimental NashMDTrainer (later releases removed it).

Implementation details (numbered; the tests name the one they check):
 1. Batch: `--per_device_train_batch_size` counts COMPLETIONS per process per micro-batch, as in grpo.py. Each prompt
    gives one pair (a policy and a mixture completion), so a micro-batch holds half as many prompts and the flag
    must be even. The default 64 is 32 prompts. TRL counts PROMPTS in that flag: its 32 is our 64.
 2. Per-token mixture. The paper's regularised policy is a geometric mixture of SEQUENCE distributions,
    π^mix(y|x) ∝ π_θ(y|x)^(1-c) π_ref(y|x)^c, normalised over all completions; that normaliser is a sum over every
    sequence and the per-token conditionals of such a mixture do not factor into per-token mixtures, so it cannot be
    sampled token by token. We mix PER TOKEN: each next-token distribution is the normalised geometric mixture of
    the two models' next-token distributions given the same prefix, exact for a single token. TRL does the same
    (GeometricMixtureWrapper: log_softmax(c·z_ref + (1-c)·z_θ) on raw logits).
    # DEVIATION(paper Sec. 6, sequence-level mixture): per-token mixture, as above.
 3. Mixture sampler: a small batched loop in this file (`sample_mixture`) runs both models with their own KV caches
    (TRL's wrapper runs generate with the cache off) and applies --temperature/--top_k/--top_p/--min_p to the
    mixture's log-probs, as generate's logits processors do on the wrapper's output. With --use_vllm only the
    policy sample uses vLLM (the mixture needs both models' logits at every token). Pair b is rows 2b (policy) and
    2b+1 (mixture), each cut after the first EOS with the EOS kept in the completion mask.
 4. Preference: with a score r (reward model or function), P = σ(r(y) - r(y')) (Bradley-Terry), as in TRL; a tie
    gives exactly ½. A judge (not in TRL, which scores with one reward model) gives P directly (return_scores=True:
    the probability that its first completion, the policy sample, is preferred).
 5. Unscored completions: a reward source that returns None for a completion leaves it unscored (NaN). A pair with
    an unscored member has no preference, so it leaves the loss entirely, KL term included (weight 0, counted as
    zero in the mean, detail 7), and the score and preference statistics (objective/unscored_rate logs the
    fraction of such pairs). A NaN or inf returned by a source stops the run at that step, before the optimizer
    step, with an error naming the source.
 6. Loss (Nash-MD-PG): L_b = β · Σ_t m_t sg(ℓ^θ_t - ℓ^ref_t) ℓ^θ_t - (P - ½) · S^θ(y), as in TRL. The first term's
    value is not a KL, its gradient is the score-function estimate of ∇ KL(π_θ‖π_ref); ½ is a control variate. Only
    the policy samples' log-probs are computed (policy and reference); the mixture sample enters through P alone.
 7. Aggregation: the per-pair losses are summed over the whole optimizer step (all accumulation micro-batches and
    processes) and divided by the number of prompts in it (an unscored pair counts as zero), so gradient
    accumulation and multi-process runs give the update of one big batch. TRL averages per micro-batch, which is
    the same when nothing is left out.
 8. EOS penalty: `--missing_eos_penalty p` subtracts p from the score of every completion that did not end with EOS
    within max_new_tokens, before P is computed. TRL looks for the EOS id anywhere in prompt + completion, so there
    a prompt that contains the EOS token exempts its completions; here only the completion counts. A judge gives P
    without scores, so it cannot be combined with the penalty.
 9. Log-probs in the loss use temperature 1, as in TRL; sampling uses --temperature.
10. Schedules: `--beta` and `--mixture_coef` take one value or a list, one value per epoch, the last one holding
    afterwards. An epoch is one pass over the prompt dataset: at optimizer step s (0-based) the epoch is
    floor(s * P_step / N_prompts), with P_step the prompts per optimizer step.
11. Metrics use TRL's names with TRL's meanings, all on the policy sample y unless named otherwise: loss/kl = mean
    Σ_t (ℓ^θ_t - ℓ^ref_t) over every policy sample (the k1 value, not the surrogate in the loss; objective/kl is the
    same number), loss/score = mean (P - ½) S^θ(y) over the scored pairs, rewards/probabilities = mean P, rewards/chosen|rejected = mean score of the
    policy|mixture samples (scores only), rewards/margins = mean S^θ(y) - S^ref(y) and rewards/accuracies = the
    fraction where that is > 0 (TRL's names for these log-ratio statistics: they are not preference margins),
    logps/chosen|rejected = mean S^θ(y) | S^ref(y), objective/entropy = mean -S^θ(y), val/ref_contain_eos_token =
    the mixture samples' EOS rate. objective/model_scores|ref_scores|scores_margin are the policy's, the mixture's
    and their difference. Means are over every pair of the logging window on every process; unscored entries are
    left out (NaN-aware).

Data: prompt-only (`prompt`), standard or conversational; other dataset types are reduced to their prompts.

Run:
    python algos/nash_md.py                                         # toy SFT policy + toy reward model, toy:add
    python algos/nash_md.py --reward_model_name_or_path None --reward_funcs add        # gold reward function
    python algos/nash_md.py --reward_model_name_or_path None --judge rm:toy-rm         # pairwise judge
    python algos/nash_md.py --dataset_name toy:add:conversational --mixture_coef 0.5 0.25
    accelerate launch --multi_gpu --num_processes 2 algos/nash_md.py --per_device_train_batch_size 32
    bash benchmarks/online_pref.sh                                  # 3 seeds of online DPO, XPO and Nash-MD
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
import tyro

from common import (checkpoint, data, distributed, evaluation, model as model_utils, rewards as reward_utils, rollout,
                    peft_utils, tracking)
from common.generation import build_generator, mask_after_eos, unwrapped_for_generation
from common.judges import check_probabilities, load_judge


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "nash_md"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (data order, sampling)"""
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
    model_name_or_path: str = "toy-sft"
    """starting policy: 'toy-sft' (the toy SFT policy of the dataset's task), a local folder or a hub name"""
    ref_model_name_or_path: str | None = None
    """frozen reference model (default: a copy of the starting policy)"""
    dataset_name: str = "toy:add"
    """'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name"""
    dataset_split: str = "train"
    """split to train on"""
    eval_split: str | None = "test"
    """split of --eval_dataset_name (toy datasets: their test split) for the held-out evaluation (None to skip)"""
    eval_dataset_name: str | None = None
    """held-out data: a file, a save_to_disk folder or a hub name (split eval_split)"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for evaluation (deterministic; never overlaps training)"""
    logging_steps: int = 5
    """log metrics every this many optimizer steps"""
    log_completions_steps: int = 25
    """log a few sample completions with their scores every this many steps (0 to disable)"""
    save_steps: int = 0
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
    learning_rate: float = 2e-5
    """AdamW learning rate (TRL's default for real models is 5e-7)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up steps, then constant"""
    max_steps: int = 150
    """optimizer steps"""
    per_device_train_batch_size: int = 64
    """completions per micro-batch per process (TRL's grpo meaning): each prompt gives a pair (a policy and a
    mixture completion), so this must be even and a micro-batch holds half as many prompts (TRL's NashMDTrainer
    counts prompts here: its 32 is our 64)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- sampling
    temperature: float = 1.0
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    min_p: float | None = None
    """min-p sampling"""
    max_new_tokens: int = 8
    """completion length cap"""
    max_prompt_length: int = 256
    """prompts longer than this keep their last tokens"""
    use_vllm: bool = False
    """sample the policy with vLLM (common/vllm_backend.py) instead of HF generate"""
    vllm_mode: str = "colocate"
    """'colocate' (engine in this process) or 'server' (a running `trl vllm-serve`-style server)"""
    vllm_server_host: str = "127.0.0.1"
    """vLLM server host (server mode)"""
    vllm_server_port: int = 8000
    """vLLM server port (server mode)"""
    vllm_server_token_file: str | None = None
    """the token file scripts/vllm_server.py wrote (server mode); default: <cache>/vllm-server-<port>.token"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory for the colocated engine"""
    vllm_kv_cache_gb: float = 1.0
    """KV-cache space (GiB) of a CPU vLLM engine"""
    # --- preference source (exactly one)
    reward_model_name_or_path: str | None = "toy-rm"
    """reward model ranking the pair ('toy-rm', a folder or hub name); None to use --reward_funcs or --judge"""
    reward_funcs: list[str] = field(default_factory=list)
    """one reward function instead of a reward model: add | reverse | path/file.py:fn | module:fn"""
    judge: str | None = None
    """a pairwise judge instead of a reward: rm:<model> | fn:<reward spec> | file.py:Name | module:Name"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of completions without EOS (reward model or function only)"""
    # --- Nash-MD
    beta: list[float] = field(default_factory=lambda: [0.1])
    """β, the weight of the KL(π_θ‖π_ref) term; one value, or one per epoch (the last holds after)"""
    mixture_coef: list[float] = field(default_factory=lambda: [0.5])
    """c, the weight of the reference in the opponent's geometric mixture (0: the policy itself, 1: the reference);
    one value, or one per epoch (the last holds after)"""
    eval_steps: int = 25
    """held-out evaluation every this many steps, at step 0 and at the end (0: never): greedy completions scored by
    the run's reward source (eval/reward) and, on the toy tasks, by the gold reward (eval/gold_reward; with a judge
    only that one)"""
    num_eval_prompts: int = 256
    """held-out prompts per evaluation"""
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


# ----------------------------------------------------------------------------- math
# Shapes: B prompts, T completion tokens, V vocabulary; sequence log-probs are sums over completion tokens.
def scheduled(values: list[float], epoch: int) -> float:
    """The value for `epoch` of a per-epoch schedule; the last value holds for all later epochs."""
    assert len(values) > 0 and epoch >= 0
    return float(values[min(epoch, len(values) - 1)])


def epoch_at(step: int, prompts_per_step: int, num_prompts: int) -> int:
    """The epoch (pass over the prompt dataset) that optimizer step `step` (0-based) belongs to."""
    return step * prompts_per_step // num_prompts


def apply_missing_eos_penalty(scores: torch.Tensor, terminated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """scores (N,) minus `penalty` where terminated (N,) is False."""
    assert scores.shape == terminated.shape
    if not penalty:
        return scores
    return scores - penalty * (~terminated.bool()).float()


def preference_probability(policy_scores: torch.Tensor, opponent_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry P(y ≻ y') = σ(r(y) - r(y')), each (B,); ties give exactly ½."""
    assert policy_scores.shape == opponent_scores.shape
    return torch.sigmoid(policy_scores - opponent_scores)


def mixture_logits(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mixture_coef: float) -> torch.Tensor:
    """Per-token geometric mixture: log π^mix = log softmax(c · z_ref + (1 - c) · z_θ), i.e. π^mix ∝ π_ref^c π_θ^(1-c)
    (the softmax normalisers of z_ref and z_θ are constants per position, so raw logits and log-probs mix alike).
    policy_logits, ref_logits (..., V) -> normalised log-probs (..., V) in float32."""
    assert policy_logits.shape == ref_logits.shape and 0.0 <= mixture_coef <= 1.0
    return torch.log_softmax(mixture_coef * ref_logits.float() + (1.0 - mixture_coef) * policy_logits.float(), -1)


def filter_logits(logprobs: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                  min_p: float | None = None) -> torch.Tensor:
    """Top-k, nucleus (top-p) and min-p filtering of (B, V) log-probs: removed entries become -inf."""
    out = logprobs.clone()
    if top_k and top_k < out.shape[-1]:
        kth = out.topk(top_k, -1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if min_p is not None and min_p > 0:
        out = out.masked_fill(out < out.max(-1, keepdim=True).values + torch.log(torch.tensor(min_p)), float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = out.sort(-1, descending=True)
        probs = sorted_lp.softmax(-1)
        remove = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        out = out.scatter(-1, order, sorted_lp.masked_fill(remove, float("-inf")))
    return out


@torch.no_grad()
def sample_mixture(policy, ref, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, mixture_coef: float,
                   max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, min_p: float | None = None, greedy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one completion per row from the per-token geometric mixture of two causal LMs.

    prompt_ids, prompt_mask (B, P) are LEFT-padded. Both models run batched, each with its own KV cache; positions
    ignore the left padding (as in training). Rows that produced EOS emit padding afterwards; the loop stops when
    every row is done. Returns (completion_ids (B, T) right-padded, completion_mask (B, T) 0/1 with the EOS kept,
    terminated (B,) bool)."""
    assert prompt_ids.shape == prompt_mask.shape
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    attn = prompt_mask.long()
    pos = model_utils.position_ids_from_mask(attn)
    out_p = policy(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    out_r = ref(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache_p, cache_r = out_p.past_key_values, out_r.past_key_values
    z_p, z_r = out_p.logits[:, -1], out_r.logits[:, -1]  # (B, V)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        lp = mixture_logits(z_p, z_r, mixture_coef)  # (B, V)
        if greedy or temperature <= 0:
            tok = lp.argmax(-1)
        else:
            lp = filter_logits(torch.log_softmax(lp / temperature, -1), top_k, top_p, min_p)
            tok = torch.multinomial(lp.softmax(-1), 1)[:, 0]
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done = done | (tok == eos_id)
        if done.all():
            break
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], 1)
        out_p = policy(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache_p,
                       use_cache=True)
        out_r = ref(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache_r,
                    use_cache=True)
        cache_p, cache_r = out_p.past_key_values, out_r.past_key_values
        z_p, z_r = out_p.logits[:, -1], out_r.logits[:, -1]
        next_pos = next_pos + 1
    ids = torch.stack(tokens, 1)  # (B, T)
    mask, terminated = mask_after_eos(ids, eos_id)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return ids, mask, terminated


def nash_md_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, probability: torch.Tensor,
                 beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-prompt Nash-MD-PG loss (B,) on the policy sample, and its parts (kl term, score term), each (B,).
    policy_logps (with grad), ref_logps, mask: (B, T); probability P(y ≻ y') (B,), no gradient.
        kl    = Σ_t m_t sg(ℓ^θ_t - ℓ^ref_t) ℓ^θ_t        (a surrogate: its gradient is the score-function
                                                         estimate of ∇ KL(π_θ‖π_ref); its value is not a KL)
        score = (P - ½) Σ_t m_t ℓ^θ_t
        loss  = β · kl - score"""
    assert policy_logps.shape == ref_logps.shape == mask.shape and probability.shape == policy_logps.shape[:1]
    log_ratio = (policy_logps - ref_logps).detach()
    kl = (log_ratio * policy_logps * mask).sum(1)
    score = (probability.detach() - 0.5) * (policy_logps * mask).sum(1)
    return beta * kl - score, kl, score


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows a_0, b_0, a_1, b_1, ... from two (N, ...) tensors: the pair layout of detail 3."""
    return torch.stack([a, b], 1).flatten(0, 1)


# ----------------------------------------------------------------------------- set-up helpers (plumbing)
def check_args(args: Args):
    """Fail before any model is loaded."""
    sources = [n for n, on in (("--reward_model_name_or_path", args.reward_model_name_or_path),
                               ("--reward_funcs", args.reward_funcs), ("--judge", args.judge)) if on]
    if len(sources) != 1:
        raise ValueError(
            f"give exactly one preference source; got {len(sources)} ({', '.join(sources) or 'none'}). The reward "
            "model is on by default: to use a reward function or a judge pass --reward_model_name_or_path None, e.g. "
            "--reward_model_name_or_path None --reward_funcs add")
    if len(args.reward_funcs) > 1:
        raise ValueError(f"--reward_funcs takes one reward function here; got {args.reward_funcs}")
    if args.judge and args.missing_eos_penalty:
        raise ValueError("--missing_eos_penalty changes scores, and a judge returns probabilities: drop the penalty, "
                         "or use a reward model or function instead")
    if not args.beta or any(b <= 0 for b in args.beta):
        raise ValueError(f"--beta must be one or more positive values; got {args.beta}")
    if not args.mixture_coef or any(not 0.0 <= c <= 1.0 for c in args.mixture_coef):
        raise ValueError(f"--mixture_coef must be one or more values in [0, 1]; got {args.mixture_coef}")
    if args.max_steps <= 0 or args.per_device_train_batch_size <= 0 or args.max_new_tokens <= 0:
        raise ValueError("--max_steps, --per_device_train_batch_size and --max_new_tokens must be positive")
    n = args.per_device_train_batch_size
    if n % 2:
        raise ValueError(f"--per_device_train_batch_size {n} is odd: it counts completions and each prompt gives a pair "
                         f"(a policy and a mixture completion), so make it even, e.g. --per_device_train_batch_size "
                         f"{n + 1} ({(n + 1) // 2} prompts per micro-batch)")


def prompt_micro_batches(indices: list[int], prompts_per_micro_batch: int, accumulation: int, accelerator) -> list:
    """This process's micro-batches (prompt rows) of one optimizer step: micro-batch m of rank r holds global rows
    [(m·W + r)·b, (m·W + r + 1)·b), so the union over processes and micro-batches is the global batch."""
    b, W, r = prompts_per_micro_batch, accelerator.num_processes, accelerator.process_index
    return [indices[(m * W + r) * b:(m * W + r + 1) * b] for m in range(accumulation)]


class WindowMeans:
    """Means over a logging window, NaN-aware: `add` sums the non-NaN entries and counts them; `reduce` sums both
    over processes in one call and returns sum / count per name (NaN where nothing was counted)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, values):
        v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
        keep = ~torch.isnan(v)
        self.sums[name] = self.sums.get(name, 0.0) + v[keep].sum().item()
        self.counts[name] = self.counts.get(name, 0.0) + keep.sum().item()

    def reduce(self, accelerator) -> dict:
        names = sorted(self.sums)
        t = torch.tensor([[self.sums[n], self.counts[n]] for n in names], dtype=torch.float64).reshape(-1, 2)
        if accelerator.num_processes > 1:
            t = accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()
        self.sums, self.counts = {}, {}
        return {n: (sm / c if c else float("nan")) for n, (sm, c) in zip(names, t.tolist())}


# ----------------------------------------------------------------------------- main
def main(args: Args):
    # ================================================================ set-up (plumbing: safe to skip)
    check_args(args)
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    accelerator = distributed.make_accelerator(args)
    device, W, A = accelerator.device, accelerator.num_processes, args.gradient_accumulation_steps
    pairs_per_micro_batch = args.per_device_train_batch_size // 2  # detail 1
    prompts_per_step = pairs_per_micro_batch * W * A

    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    train, eval_ds = data.load_splits(args, "prompt", "nash_md.py", toy_n=args.num_eval_prompts)
    columns = {c: train[c] for c in train.column_names if c != "prompt"}  # passed on to reward functions
    all_prompts = train["prompt"]
    prompt_ids_all = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in all_prompts])
    prompt_ids_all = [p[-args.max_prompt_length:] for p in prompt_ids_all]
    data.check_batch_fits(len(train), prompts_per_step, "--per_device_train_batch_size / 2 (prompts per micro-batch) "
                          "x --gradient_accumulation_steps")
    rewards = judge = None
    if args.judge:
        judge, source = load_judge(args.judge, args.dataset_name, device), f"judge '{args.judge}'"
    else:
        specs = reward_utils.default_specs(args.reward_funcs, args.reward_model_name_or_path, args.dataset_name)
        rewards = reward_utils.RewardSources(specs, None, args.dataset_name, device)
        source = f"{specs[0]} ({rewards.names[0]})"
    gold, eval_sources = None, rewards
    if data.toy_task(args.dataset_name):
        task = data.toy_task(args.dataset_name)
        gold = reward_utils.load_function(task)  # train/gold_reward: never used for the preferences
        eval_sources = rewards or reward_utils.RewardSources([task], None, args.dataset_name, device)
    elif judge is not None:
        eval_ds = None  # a judge scores no single completion: nothing to evaluate on non-toy data
    peft_utils.check_args(args)  # LoRA flags and module names, before anything is loaded or written
    resume = checkpoint.prepare_output_dir(args)  # one run per folder, before any model loads

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters, the rest frozen
    if args.use_peft and not args.ref_model_name_or_path:  # the reference = the policy with its adapters off
        ref_model = peft_utils.reference_model(model)
    else:
        ref_model = model_utils.load_causal_lm(args.ref_model_name_or_path or args.model_name_or_path, tokenizer,
                                               args.dataset_name, seed=args.seed)
        ref_model.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    generator = build_generator(args, tokenizer, accelerator, model)

    start_step, elapsed, skipped_steps = 0, 0.0, 0
    if resume is not None:
        state = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed, skipped_steps = state["step"], state["elapsed"], state.get("skipped_steps", 0)
        generator.sync_weights(model)
        accelerator.print(f"resumed from {resume} at step {start_step}")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss/score", "rewards/probabilities", "train/gold_reward", "eval/gold_reward"))
    accelerator.print(f"nash_md: {len(train)} prompts; {W} process(es) x {A} micro-batch(es) x "
                      f"{pairs_per_micro_batch} pairs = {prompts_per_step} pairs per step, {args.max_steps} steps, "
                      f"preferences from {source} -> {args.output_dir}")

    def evaluate() -> dict:  # greedy completions of the held-out prompts, scored by the run's reward source
        out = evaluation.heldout_reward(model, tokenizer, eval_ds, eval_sources, args.dataset_name,
                                        args.num_eval_prompts, args.max_new_tokens, accelerator=accelerator)
        return out if rewards is not None else {k: out[k] for k in ("eval/gold_reward", "eval/terminated") if k in out}

    if start_step == 0 and args.eval_steps and eval_ds is not None:
        tracker.log({**evaluate(), "beta": scheduled(args.beta, 0), "mixture_coef": scheduled(args.mixture_coef, 0)},
                    0, args.max_steps)

    pad_id = tokenizer.pad_token_id
    stats = WindowMeans()
    window = {"rpf": [], "mask": [], "terminated": [], "logps": [], "sampler_logps": []}  # for the common metrics

    # ================================================================ training
    model.train()
    for step in range(start_step, args.max_steps):
        epoch = epoch_at(step, prompts_per_step, len(train))  # detail 10
        beta, coef = scheduled(args.beta, epoch), scheduled(args.mixture_coef, epoch)
        indices = data.batch_indices(len(train), prompts_per_step, step, args.seed)
        sample_rows = None
        for mb in prompt_micro_batches(indices, pairs_per_micro_batch, A, accelerator):
            B = len(mb)
            # 1. a policy sample and a mixture (opponent) sample per prompt: pair b = rows 2b (policy),
            #    2b+1 (mixture) (details 2-3)
            mb_prompt_ids = [prompt_ids_all[i] for i in mb]
            gen = generator.generate(model, mb_prompt_ids, n=1)
            p_ids, p_mask = data.pad(mb_prompt_ids, pad_id, "left")
            with unwrapped_for_generation(accelerator, model) as policy:
                policy.eval()
                mix_ids, mix_mask, mix_terminated = sample_mixture(
                    policy, ref_model, p_ids.to(device), p_mask.to(device), coef, args.max_new_tokens,
                    tokenizer.eos_token_id, pad_id, args.temperature, args.top_k, args.top_p, args.min_p)
                policy.train()
            mix_texts = tokenizer.batch_decode([c[m.bool()] for c, m in zip(mix_ids.cpu(), mix_mask.cpu())],
                                               skip_special_tokens=True)
            policy_ids = rollout.completion_id_lists(gen.completion_ids, gen.completion_mask)
            ids_list = [x for pair in zip(policy_ids, rollout.completion_id_lists(mix_ids, mix_mask)) for x in pair]
            terminated = interleave(gen.terminated.cpu(), mix_terminated.cpu())  # (2B,)
            prompts2, cols2 = rollout.repeat_rows(mb, all_prompts, columns, 2)
            completions = rollout.as_completions(prompts2, [t for pair in zip(gen.texts, mix_texts) for t in pair])
            # 2. P(policy sample ≻ mixture sample) (details 4, 5, 8); NaN = an unscored pair
            scores = None
            if judge is not None:
                probs = judge.judge([all_prompts[i] for i in mb],
                                    [(completions[2 * b], completions[2 * b + 1]) for b in range(B)],
                                    return_scores=True)
                probability = check_probabilities(probs, B, source)
            else:
                rpf = rewards(prompts2, completions, ids_list, cols2)  # (2B, 1); stops the run on NaN / inf
                window["rpf"].append(rpf)
                scores = apply_missing_eos_penalty(rpf[:, 0], terminated, args.missing_eos_penalty)
                probability = preference_probability(scores[0::2], scores[1::2])  # (B,)
            weights = (~probability.isnan()).float()  # (B,) 0: an unscored pair leaves the loss
            # 3. log-probs of the policy samples under the policy (with grad) and the reference; the Nash-MD-PG loss
            #    (details 6-7). The mixture samples only enter through P.
            batch = data.batch_prompt_completion(mb_prompt_ids, policy_ids, pad_id)
            input_ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            mask = batch["completion_mask"].to(device).float()  # (B, T)
            T = mask.shape[1]
            with torch.no_grad():
                ref_lp = model_utils.completion_logps(ref_model, input_ids, attn, T)  # (B, T)
            with accelerator.accumulate(model):
                logps = model_utils.completion_logps(model, input_ids, attn, T)  # (B, T)
                losses, kl_part, score_part = nash_md_loss(logps, ref_lp, mask,
                                                           torch.nan_to_num(probability, 0.5).to(device), beta)
                # mean over the optimizer step's prompts (unscored pairs count as 0): undo accelerate's
                # 1/accumulation and DDP's 1/processes
                loss = (losses * weights.to(device)).sum() / prompts_per_step
                accelerator.backward(loss * A * W)
                if accelerator.sync_gradients:
                    _, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                            args.max_grad_norm)
                    skipped_steps += not stepped
            # 4. statistics of the window (TRL's names and meanings, detail 11); NaN entries are left out
            with torch.no_grad():
                seq, ref_seq = (logps.detach() * mask).sum(1).cpu(), (ref_lp * mask).sum(1).cpu()  # (B,)
                kl = seq - ref_seq  # k1 on the policy samples
                scored = weights.bool()
                stats.add("loss/kl", kl)
                stats.add("loss/score", torch.where(scored, score_part.detach().cpu(), float("nan")))
                stats.add("objective/kl", kl)
                stats.add("objective/entropy", -seq)
                stats.add("rewards/probabilities", probability)
                stats.add("rewards/margins", kl)
                stats.add("rewards/accuracies", (kl > 0).double())
                stats.add("logps/chosen", seq)
                stats.add("logps/rejected", ref_seq)
                stats.add("val/model_contain_eos_token", gen.terminated.double())
                stats.add("val/ref_contain_eos_token", mix_terminated.double())
                if scores is not None:
                    stats.add("rewards/chosen", scores[0::2])
                    stats.add("rewards/rejected", scores[1::2])
                    stats.add("objective/model_scores", scores[0::2])
                    stats.add("objective/ref_scores", scores[1::2])
                    stats.add("objective/scores_margin", scores[0::2] - scores[1::2])
                    stats.add("objective/unscored_rate", (~scored).double())
                if gold is not None:
                    g = torch.tensor([float("nan") if v is None else v for v in gold(prompts2, completions)])
                    stats.add("train/gold_reward", g[0::2])
                    stats.add("train/mixture_gold_reward", g[1::2])
                window["mask"].append(gen.completion_mask.cpu())  # the policy's completions
                window["terminated"].append(gen.terminated.cpu())
                if gen.sampler_logps is not None:  # sampler (vLLM) vs trainer gap on the policy samples
                    window["logps"].append(logps.detach().cpu())
                    window["sampler_logps"].append(gen.sampler_logps.cpu())
            if sample_rows is None:
                sample_rows = [{"prompt": str(prompts2[2 * b]), "policy": gen.texts[b], "mixture": mix_texts[b],
                                "probability": float(probability[b]),
                                **({"score_policy": float(scores[2 * b]), "score_mixture": float(scores[2 * b + 1])}
                                   if scores is not None else {})}
                               for b in range(min(4, B))]
        generator.sync_weights(model)

        # ================================================================ logging, evaluation, checkpoints (plumbing)
        done = step + 1
        if done % args.logging_steps == 0 or done == args.max_steps:
            metrics = stats.reduce(accelerator)
            metrics["objective/non_score_reward"] = -beta * metrics["objective/kl"]
            metrics["objective/model_kl"] = metrics["objective/kl"]  # same name as in online_dpo.py / xpo.py
            if rewards is not None:
                metrics["objective/rlhf_reward"] = (metrics["objective/model_scores"]
                                                    + metrics["objective/non_score_reward"])
                rpf_all = distributed.gather_cat(accelerator, torch.cat(window["rpf"]))
                metrics.update(rewards.metrics(rpf_all))
                rewards.check_varies(rpf_all, accelerator.is_main_process)
            width = max(m.shape[1] for m in window["mask"])
            metrics.update(rollout.completion_metrics(
                accelerator, torch.cat([F.pad(m, (0, width - m.shape[1])) for m in window["mask"]]),
                torch.cat(window["terminated"])))
            if window["sampler_logps"]:
                metrics.update(rollout.sampler_gap_metrics(accelerator, window["logps"], window["sampler_logps"],
                                                           window["mask"]))
            window = {k: [] for k in window}
            metrics.update({"beta": beta, "mixture_coef": coef, "learning_rate": scheduler.get_last_lr()[0],
                            "train/skipped_steps": skipped_steps})
            if args.eval_steps and eval_ds is not None and (done % args.eval_steps == 0 or done == args.max_steps):
                metrics.update(evaluate())
            tracker.log(metrics, done, args.max_steps)
        if args.log_completions_steps and (done % args.log_completions_steps == 0 or done == args.max_steps):
            tracker.log_samples(done, sample_rows or [])
        if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
            checkpoint.save_checkpoint(accelerator, args.output_dir, done, model, tokenizer, args,
                                       {"elapsed": tracker.elapsed(), "skipped_steps": skipped_steps},
                                       args.save_total_limit)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir)
    if args.save_steps:
        checkpoint.save_checkpoint(accelerator, args.output_dir, args.max_steps, model, tokenizer, args,
                                   {"elapsed": tracker.elapsed(), "skipped_steps": skipped_steps},
                                   args.save_total_limit)
    tracker.close()
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
