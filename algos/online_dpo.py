"""Online DPO: DPO on pairs sampled from the current policy and ranked on the fly.

Paper: "Direct Language Model Alignment from Online AI Feedback" (Guo et al., arXiv 2402.04792), Algorithm 1.
Each step, for every prompt x: sample two completions y_1, y_2 ~ π_θ(·|x), rank them with the preference source
(reward model, reward function or pairwise judge) into (y⁺, y⁻), and minimise the DPO loss on that pair:
    Δ(y) = S^θ(y|x) - S^ref(y|x)           S = Σ_t m_t log π(y_t | x, y_<t)   (sums over completion tokens)
    h    = Δ(y⁺) - Δ(y⁻)
    sigmoid:  L = mean_pairs[ -log σ(β h) ]        (DPO, arXiv 2305.18290, Eq. 7)
    ipo:      L = mean_pairs[ (h - 1/(2β))² ]      (IPO, arXiv 2310.12036, Eq. 17, on un-normalised sums)

Preferences come from exactly one source:
  --reward_model_name_or_path NAME   a one-output sequence classifier (default: toy-rm, the toy reward model)
  --reward_funcs SPEC                one reward function: add | reverse | path/file.py:fn | module:fn
  --judge SPEC                       a pairwise judge: rm:<model> | fn:<reward spec> | file.py:Name | module:Name
To use a reward function or judge, turn the default reward model off: `--reward_model_name_or_path None`.

Implementation details (numbered; the tests name the one they check):
 1. Batch: `--per_device_train_batch_size` counts COMPLETIONS per process per micro-batch, as in grpo.py. Each prompt
    gives one pair (2 completions), so a micro-batch holds half as many prompts and the flag must be even. The
    default 64 is 32 prompts. TRL's OnlineDPOTrainer (1.16) counts PROMPTS in that flag: its 32 is our 64.
 2. Sampling: both completions of a prompt come from one generate call on the current policy (rows 2i, 2i+1 belong
    to prompt i), cut after the first EOS with the EOS kept in the completion mask (never inferred from
    pad_token_id, which is often the EOS id).
 3. Ranking: y_1 is chosen iff r(y_1) >= r(y_2), so ties go to the first sample, as in TRL 1.16. The two samples are
    exchangeable, so this adds variance, not bias; with a binary reward most pairs tie, and `--drop_ties` leaves
    tied pairs out of the loss. A judge returns the index of the preferred completion (0 or 1) instead.
 4. Unscored completions: a reward source that returns None for a completion leaves it unscored (NaN). A pair with
    an unscored member cannot be ranked, so it leaves the loss exactly as a dropped tie does (detail 6), and the
    score and implicit-reward statistics (objective/unscored_rate logs the fraction of such pairs). TRL 1.16 sums
    the reward functions with nansum instead, so there an unscored completion scores 0 and is ranked. A NaN or inf
    returned by a source stops the run at that step, before the optimizer step, with an error naming the source.
 5. EOS penalty: `--missing_eos_penalty p` subtracts p from the score of every completion that did not end with EOS
    within max_new_tokens, as in TRL. A judge gives ranks, not scores, so it combines with neither the penalty nor
    `--drop_ties`.
 6. Aggregation: the per-pair losses are summed over the whole optimizer step (all accumulation micro-batches and
    processes) and divided by the number of pairs in it. A pair left out (a dropped tie, an unscored pair) counts as
    zero and the divisor stays fixed, so gradient accumulation and multi-process runs give the update of one big
    batch. TRL averages per micro-batch, which is the same when nothing is left out.
 7. Log-probs use temperature 1 for both the policy and the frozen reference (the policy's own distribution, as in
    DPO and TRL 1.16, whose forward pass does not divide by the sampling temperature); sampling uses --temperature.
 8. Schedules: `--beta` takes one value or a list, one value per epoch, the last one holding afterwards. An epoch is
    one pass over the prompt dataset: at optimizer step s (0-based) the epoch is floor(s * P_step / N_prompts),
    with P_step the prompts per optimizer step.
 9. IPO is applied to the un-normalised sequence sums h, as in TRL's online trainer.
10. Metrics use TRL's names: objective/kl = mean over all samples of Σ_t (ℓ^θ_t - ℓ^ref_t) (k1), objective/entropy =
    mean -S^θ, objective/non_score_reward = -β·kl, objective/scores (mean score), objective/scores_margin (chosen
    minus rejected score), objective/rlhf_reward = scores + non_score_reward, rewards/chosen|rejected = β Δ of the
    chosen|rejected sample, rewards/margins = β h, rewards/accuracies = fraction with h > 0, logps/chosen|rejected =
    S^θ, val/contain_eos_token. objective/model_kl and objective/model_scores repeat kl and scores under the names
    xpo.py and nash_md.py use for their policy samples, so the three scripts plot together. kl and entropy sum over
    completion tokens only (TRL 1.16 sums them over the padding positions after EOS too). Means are over every
    sample of the logging window on every process; unscored entries are left out (NaN-aware). The window's sums
    and counts stay on the device until the logging step (one transfer per window, no per-step host sync).
11. One forward per micro-batch for both completions of every prompt, with the prompt computed once: each prompt is
    one row [prompt | first sample | second sample | padding]; the second sample's positions restart after the
    prompt and a block attention mask lets each token see only the causal past of its own sequence, so every
    log-prob equals that of a separate forward of prompt + completion (to float rounding) at the cost of one prompt
    instead of two (prefix sharing, as dpo.py's detail 1). The policy (with grad) and the reference (without) each
    run this one forward; the hidden states that predict completion tokens go through the output head and the
    float32 log-softmax a block at a time (common/model.py's logps_at), never as (2B, T, V) logits. It needs an
    attention that takes a custom 4D mask (sdpa, eager) and no sliding window shorter than a sequence; otherwise,
    or with --share_prompt False, each sample is its own row [left-padded prompt | right-padded completion] (TRL's
    layout).
12. Asynchronous generation (--async_generation, common/async_rollout.py, as grpo.py's detail 12): a worker samples
    the pairs of the next optimizer steps while the trainer ranks and trains on the current ones: an HF-generate
    process holding its own copy of the policy (weights pushed through shared memory after each optimizer step), or
    with --use_vllm --vllm_mode server the server driven from a thread. Step s's pairs are requested once the
    trainer holds a version v (optimizer steps taken) with s - v <= max_staleness, are sampled by exactly v, and
    their staleness s - v is checked and logged per step (async/staleness; async/wait_seconds is the trainer's wait,
    async/sampling_seconds the worker's). The worker samples all of a step's micro-batches (of this process) in one
    call: with --gradient_accumulation_steps > 1 these are other draws of the same distribution than the
    synchronous path's one call per micro-batch. Ranking (reward model, function or judge) stays in the trainer.
    No off-policy correction is applied, because none is needed: the DPO loss of a pair is the Bradley-Terry
    likelihood of its ranking given the policy's and the reference's log-probs of the two completions, the gradient
    never flows through the sampling, and the loss has the same minimiser π_ref·exp(r/β)/Z under any sampling
    distribution that covers the pairs (offline DPO trains on pairs from another policy altogether). A pair sampled
    k steps ago is a valid preference pair; staleness only makes the pairs less on-policy (which pairs weight the
    gradient), and a sequence-level importance weight π_θ(y1)π_θ(y2)/π_old(y1)π_old(y2) would add variance to undo
    that. The sampler-trainer gap (sampling/sampling_logp_difference, from the worker's log-probs) is logged as a
    diagnostic only. max_staleness 0 is the synchronous schedule through the worker: it starts from the trainer's
    RNG state and weights, so (with one micro-batch per step) it draws the synchronous path's very samples and
    gives its losses. A wait longer than --async_timeout stops the run with an error naming the flag; a worker
    exception is raised with the worker's traceback; the worker is stopped on exit and on errors. Resume: the
    checkpoint keeps each rank's worker RNG state; with max_staleness 0 a resumed run repeats the uninterrupted
    one; with k > 0 the first k steps after a resume are sampled by fresher weights than in the uninterrupted run
    (staleness ramps up 0, 1, .., k as at a start).

Data: prompt-only (`prompt`), standard or conversational; other dataset types are reduced to their prompts.

Run:
    python algos/online_dpo.py                                      # toy SFT policy + toy reward model, toy:add
    python algos/online_dpo.py --reward_model_name_or_path None --reward_funcs add     # gold reward function
    python algos/online_dpo.py --reward_model_name_or_path None --judge rm:toy-rm      # pairwise judge
    python algos/online_dpo.py --dataset_name toy:add:conversational --beta 0.1 0.05   # chat prompts, per-epoch β
    accelerate launch --multi_gpu --num_processes 2 algos/online_dpo.py --per_device_train_batch_size 32
    python algos/online_dpo.py --async_generation True --max_staleness 1   # sample the next pairs during the step
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

from common import (async_rollout, checkpoint, data, distributed, evaluation, model as model_utils,
                    preference, rewards as reward_utils, rollout, peft_utils, tracking)
from common.generation import build_generator
from common.sampling import Generation
from common.judges import check_ranks, load_judge


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "online_dpo"
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
    """completions per micro-batch per process (TRL's grpo meaning): each prompt gives a pair, so this must be even
    and a micro-batch holds half as many prompts (TRL's OnlineDPOTrainer counts prompts here: its 32 is our 64)"""
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
    # --- asynchronous generation (common/async_rollout.py, detail 12)
    async_generation: bool = False
    """sample the next steps' pairs in a worker (an HF-generate process; with --use_vllm, the vLLM server) while the
    trainer takes its optimizer step"""
    max_staleness: int = 1
    """with --async_generation: a step's pairs are sampled by weights at most this many optimizer steps older than the
    ones it trains (0: the synchronous schedule, through the worker)"""
    async_timeout: float = 600.0
    """seconds the trainer waits for the generation worker (a weight push or a batch) before it stops with an error"""
    async_worker_threads: int = 0
    """torch threads of the generation worker process (0: as many as the trainer uses)"""
    # --- preference source (exactly one)
    reward_model_name_or_path: str | None = "toy-rm"
    """reward model ranking the pair ('toy-rm', a folder or hub name); None to use --reward_funcs or --judge"""
    reward_funcs: list[str] = field(default_factory=list)
    """one reward function instead of a reward model: add | reverse | path/file.py:fn | module:fn"""
    judge: str | None = None
    """a pairwise judge instead of a reward: rm:<model> | fn:<reward spec> | file.py:Name | module:Name"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of completions without EOS (reward model or function only)"""
    drop_ties: bool = False
    """leave pairs with equal scores out of the loss (they count as zero in the mean over pairs, as unscored pairs
    do); by default a tie keeps the first sample as chosen. Useful with binary rewards, where most pairs tie"""
    # --- online DPO
    beta: list[float] = field(default_factory=lambda: [0.1])
    """β, the strength of the implicit KL to the reference; one value, or one per epoch (the last holds after)"""
    loss_type: str = "sigmoid"
    """'sigmoid' (DPO) or 'ipo'"""
    share_prompt: bool = True
    """one forward row per prompt for both samples, the prompt computed once (detail 11); False: a row per sample"""
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


LOSS_TYPES = ("sigmoid", "ipo")


# ----------------------------------------------------------------------------- math
# Shapes: B prompts (= pairs), T completion tokens; sequence log-probs are sums over completion tokens.
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


def first_is_chosen(scores_first: torch.Tensor, scores_second: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the first completion of each pair is chosen iff its score is >= the second's (ties -> first)."""
    assert scores_first.shape == scores_second.shape
    return scores_first >= scores_second


def pair_weights(scores_first: torch.Tensor, scores_second: torch.Tensor, drop_ties: bool) -> torch.Tensor:
    """(B,) float weight of each pair in the loss: 1; 0 for a pair with an unscored (NaN) member (detail 4) and, when
    drop_ties, for a tie (detail 3)."""
    assert scores_first.shape == scores_second.shape
    keep = ~(scores_first.isnan() | scores_second.isnan())
    if drop_ties:
        keep = keep & (scores_first != scores_second)
    return keep.float()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (B,) and the log-ratio margin h (B,) from sequence log-prob sums, each (B,).
    sigmoid: -log σ(β h);  ipo: (h - 1/(2β))²."""
    assert policy_chosen.shape == policy_rejected.shape == ref_chosen.shape == ref_rejected.shape
    assert policy_chosen.dim() == 1
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type '{loss_type}'; choose one of {LOSS_TYPES}")
    return losses, h


def pair_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device, share_prompt: bool = True,
               mask_dtype: torch.dtype = torch.bool) -> dict:
    """Forward inputs for B prompts with two samples each (completions[2b], completions[2b + 1] belong to prompts[b]),
    detail 11. targets, completion_mask, rows, cols: (2B, T) in the completions' order; token t of completion i is
    predicted by the model's output at (rows[i, t], cols[i, t]) of its last `keep` positions.
    share_prompt: one row per prompt [prompt | first | second | right padding], the second sample's positions
      restarting after the prompt, and a (B, 1, L, L) attention mask in which each token sees the causal past of its
      own sequence only (the second sample never sees the first; padding sees itself). mask_dtype: bool (True =
      attend: sdpa) or a float dtype (0 or its minimum added to the scores: eager).
    else: a row per sample [left-padded prompt | right-padded completion], 0/1 attention mask (2B, P+T)."""
    B = len(prompts)
    assert len(completions) == 2 * B and all(len(c) > 0 for c in completions)
    T = max(len(c) for c in completions)
    targets = torch.tensor([c + [pad_id] * (T - len(c)) for c in completions])  # (2B, T)
    cmask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions])  # (2B, T)
    if not share_prompt or min(len(p) for p in prompts) == 0:  # an empty prompt predicts nothing: no shared row
        b = data.batch_prompt_completion([p for p in prompts for _ in range(2)], completions, pad_id)
        am = b["attention_mask"]
        out = {"input_ids": b["input_ids"], "attention_mask": am,
               "position_ids": model_utils.position_ids_from_mask(am), "keep": T + 1,
               "rows": torch.arange(2 * B)[:, None].expand(2 * B, T),
               "cols": torch.arange(T)[None, :].expand(2 * B, T)}  # kept column t predicts completion token t
    else:
        L = max(len(p) + len(completions[2 * b]) + len(completions[2 * b + 1]) for b, p in enumerate(prompts))
        first = min(len(p) for p in prompts) - 1  # the earliest predicting position: the model's outputs from there on
        ids, pos, seg, cols = [], [], [], []  # lists first, one tensor each
        for b, p in enumerate(prompts):
            y1, y2 = completions[2 * b], completions[2 * b + 1]
            P, T1, T2 = len(p), len(y1), len(y2)
            n = L - P - T1 - T2
            ids.append(p + y1 + y2 + [pad_id] * n)
            pos.append(list(range(P + T1)) + list(range(P, P + T2)) + [0] * n)
            seg.append([0] * P + [1] * T1 + [2] * T2 + [3] * n)  # 0 prompt, 1 first, 2 second, 3 padding
            # the row position whose output predicts each token: the second sample's first token is the prompt's last
            for at in (list(range(P - 1, P + T1 - 1)), [P - 1] + list(range(P + T1, P + T1 + T2 - 1))):
                cols.append([a - first for a in at] + [0] * (T - len(at)))
        ids, pos, seg = torch.tensor(ids), torch.tensor(pos), torch.tensor(seg)  # (B, L)
        mask = preference.pair_block_mask(seg, mask_dtype=mask_dtype)  # (B, 1, L, L): each sequence's own past
        out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "keep": L - first,
               "rows": torch.arange(B).repeat_interleave(2)[:, None].expand(2 * B, T), "cols": torch.tensor(cols)}
    out.update(targets=targets, completion_mask=cmask)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def pair_token_logps(model, batch: dict) -> torch.Tensor:
    """Per-token log-probs (2B, T) of pair_batch's completions under `model` at temperature 1 (detail 7), from one
    forward, through the chunked output head."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return model_utils.logps_at(model, inputs, batch["keep"], batch["rows"], batch["cols"], batch["targets"])


def can_share_prompt(models: list, longest: int) -> bool:
    """Whether every model takes pair_batch's shared-prompt mask: an attention that takes a custom 4D mask (sdpa,
    eager) and no sliding window shorter than `longest` (the mask replaces the window)."""
    for m in models:
        cfg = model_utils._unwrap(m).config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
        if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager") or (window and longest > window):
            return False
    return True


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
    if args.judge and args.drop_ties:
        raise ValueError("--drop_ties needs scores to compare, and a judge returns ranks: drop the flag, or rank with a "
                         "reward model or function instead")
    if args.judge and args.missing_eos_penalty:
        raise ValueError("--missing_eos_penalty changes scores, and a judge returns ranks: drop the penalty, or rank "
                         "with a reward model or function instead")
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type {args.loss_type!r}: choose one of {LOSS_TYPES}")
    if not args.beta or any(b <= 0 for b in args.beta):
        raise ValueError(f"--beta must be one or more positive values; got {args.beta}")
    if args.max_steps <= 0 or args.per_device_train_batch_size <= 0 or args.max_new_tokens <= 0:
        raise ValueError("--max_steps, --per_device_train_batch_size and --max_new_tokens must be positive")
    if args.async_generation:
        if args.max_staleness < 0:
            raise ValueError(f"--max_staleness must be >= 0 (optimizer steps), got {args.max_staleness}")
        if args.async_timeout <= 0:
            raise ValueError(f"--async_timeout must be > 0 seconds, got {args.async_timeout}")
        if args.async_worker_threads < 0:
            raise ValueError(f"--async_worker_threads must be >= 0 (0: the trainer's), got {args.async_worker_threads}")
        if args.use_vllm and args.vllm_mode != "server":
            raise ValueError("--async_generation with --use_vllm needs --vllm_mode server (a colocated engine shares "
                             "the trainer's process); or drop --use_vllm to sample in an HF-generate worker process")
    n = args.per_device_train_batch_size
    if n % 2:
        raise ValueError(f"--per_device_train_batch_size {n} is odd: it counts completions and each prompt gives a pair "
                         f"of 2, so make it even, e.g. --per_device_train_batch_size {n + 1} ({(n + 1) // 2} prompts "
                         "per micro-batch)")


def prompt_micro_batches(indices: list[int], prompts_per_micro_batch: int, accumulation: int, accelerator) -> list:
    """This process's micro-batches (prompt rows) of one optimizer step: micro-batch m of rank r holds global rows
    [(m·W + r)·b, (m·W + r + 1)·b), so the union over processes and micro-batches is the global batch."""
    b, W, r = prompts_per_micro_batch, accelerator.num_processes, accelerator.process_index
    return [indices[(m * W + r) * b:(m * W + r + 1) * b] for m in range(accumulation)]


def split_rows(gen: Generation, sizes: list[int]) -> list[Generation]:
    """`gen` cut into consecutive blocks of `sizes` rows (one per micro-batch), each keeping the full width."""
    assert sum(sizes) == len(gen.texts)
    out, s = [], 0
    for n in sizes:
        rows = slice(s, s + n)
        out.append(Generation(gen.completion_ids[rows], gen.completion_mask[rows], gen.terminated[rows],
                              gen.texts[rows], None if gen.sampler_logps is None else gen.sampler_logps[rows]))
        s += n
    return out


class WindowMeans:
    """Means over a logging window, NaN-aware: `add` sums the non-NaN entries and counts them, on the values' own
    device (no host sync per step); `reduce` moves the sums once, sums them over processes in one call and returns
    sum / count per name (NaN where nothing was counted)."""

    def __init__(self):
        self.acc: dict[str, torch.Tensor] = {}  # name -> (2,) float64 [sum, count]

    def add(self, name: str, values):
        v = torch.as_tensor(values).detach().reshape(-1).double()
        keep = ~torch.isnan(v)
        s = torch.stack([torch.where(keep, v, torch.zeros_like(v)).sum(), keep.sum().double()])
        self.acc[name] = self.acc[name] + s.to(self.acc[name].device) if name in self.acc else s

    def reduce(self, accelerator) -> dict:
        names = sorted(self.acc)
        t = torch.stack([self.acc[n].to(accelerator.device) for n in names]) if names else \
            torch.zeros((0, 2), dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            t = accelerator.reduce(t, reduction="sum")
        self.acc = {}
        return {n: (sm / c if c else float("nan")) for n, (sm, c) in zip(names, t.cpu().tolist())}


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
    train, eval_ds = data.load_splits(args, "prompt", "online_dpo.py", toy_n=args.num_eval_prompts)
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
    resume = checkpoint.prepare_output_dir(args, may_change=("async_timeout", "async_worker_threads"))  # before models

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters, the rest frozen
    if args.use_peft and not args.ref_model_name_or_path:  # the reference = the policy with its adapters off
        ref_model = peft_utils.reference_model(model)
    else:
        ref_model = model_utils.load_causal_lm(args.ref_model_name_or_path or args.model_name_or_path, tokenizer,
                                               args.dataset_name, seed=args.seed)
        ref_model.to(device).eval().requires_grad_(False)
    # the fused kernel (TRL's default optimizer too); not under DeepSpeed / FSDP, which manage their own parameters
    fused = accelerator.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU") and device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    # detail 11: one shared-prompt row per prompt when both models take the block mask
    longest = max(len(p) for p in prompt_ids_all) + args.max_new_tokens
    share = args.share_prompt and can_share_prompt([model, ref_model], longest)
    if args.share_prompt and not share:
        accelerator.print("the attention implementation (or a sliding window) cannot take the shared-prompt mask: each "
                          "sample gets its own row with a copy of the prompt, as with --share_prompt False")
    sdpa = all(getattr(model_utils._unwrap(m).config, "_attn_implementation", None) == "sdpa"
               for m in (model, ref_model))
    mask_dtype = torch.bool if sdpa else next(model.parameters()).dtype
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    generator = build_generator(args, tokenizer, accelerator, model)

    start_step, elapsed, skipped_steps, state = 0, 0.0, 0, {}
    if resume is not None:
        state = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed, skipped_steps = state["step"], state["elapsed"], state.get("skipped_steps", 0)
        generator.sync_weights(model)
        accelerator.print(f"resumed from {resume} at step {start_step}")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss/dpo", "objective/scores", "train/gold_reward", "eval/gold_reward"))
    accelerator.print(f"online_dpo: {len(train)} prompts; {W} process(es) x {A} micro-batch(es) x "
                      f"{pairs_per_micro_batch} pairs = {prompts_per_step} pairs per step, {args.max_steps} steps, "
                      f"preferences from {source} -> {args.output_dir}")

    def evaluate() -> dict:  # greedy completions of the held-out prompts, scored by the run's reward source
        out = evaluation.heldout_reward(model, tokenizer, eval_ds, eval_sources, args.dataset_name,
                                        args.num_eval_prompts, args.max_new_tokens, accelerator=accelerator)
        return out if rewards is not None else {k: out[k] for k in ("eval/gold_reward", "eval/terminated") if k in out}

    def save(step: int):
        extra = {"elapsed": tracker.elapsed(), "skipped_steps": skipped_steps}
        if worker_rng is not None:  # every rank's worker RNG, where its next batch's sampling starts (detail 12)
            extra["async_rng"] = accelerator.gather(worker_rng[None].to(device)).cpu()
        checkpoint.save_checkpoint(accelerator, args.output_dir, step, model, tokenizer, args, extra,
                                   args.save_total_limit)

    def step_micro_batches(step: int) -> list[list[int]]:  # this process's prompt rows of optimizer step `step`
        indices = data.batch_indices(len(train), prompts_per_step, step, args.seed)
        return prompt_micro_batches(indices, pairs_per_micro_batch, A, accelerator)

    async_ro, worker_rng = None, None
    if args.async_generation:  # detail 12: the worker samples ahead, from weights at most max_staleness steps old
        saved = state.get("async_rng")
        if args.use_vllm:
            worker = async_rollout.ThreadWorker(generator, accelerator, args.async_timeout)
        else:
            worker = async_rollout.ProcessWorker.for_policy(
                model, tokenizer, generator.cfg, accelerator, args.async_timeout, args.async_worker_threads,
                rng_state=saved[accelerator.process_index] if saved is not None and len(saved) == W else None)
        async_ro = async_rollout.AsyncRollout(
            worker, lambda s: [prompt_ids_all[i] for mb in step_micro_batches(s) for i in mb], 2, 1,
            args.max_staleness, args.max_steps)

    pad_id = tokenizer.pad_token_id
    stats = WindowMeans()
    window = {"rpf": [], "mask": [], "terminated": [], "logps": [], "sampler_logps": []}  # for the common metrics
    try:  # the worker is stopped on errors too
        if async_ro is not None:
            async_ro.start(model, start_step)  # the first pairs are sampled during the step-0 evaluation
        if start_step == 0 and args.eval_steps and eval_ds is not None:
            tracker.log({**evaluate(), "beta": scheduled(args.beta, 0)}, 0, args.max_steps)

        # ============================================================ training
        model.train()
        for step in range(start_step, args.max_steps):
            beta = scheduled(args.beta, epoch_at(step, prompts_per_step, len(train)))  # detail 8
            micro_batches = step_micro_batches(step)
            sampled = None
            if async_ro is not None:  # detail 12: this step's pairs, sampled ahead by the worker
                out, info = async_ro.get(step, step)
                worker_rng = async_rollout.worker_rng_state(info)
                stats.add("async/staleness", float(info["staleness"]))
                stats.add("async/wait_seconds", info["wait"])  # the trainer waited for the worker
                stats.add("async/sampling_seconds", info["seconds"])  # the worker sampled the step's pairs
                sampled = split_rows(out, [2 * len(mb) for mb in micro_batches])
            sample_rows = None
            for m, mb in enumerate(micro_batches):
                B = len(mb)
                # 1. two samples per prompt from the current policy: rows 2i and 2i+1 belong to prompt i (detail 2)
                gen = sampled[m] if sampled is not None else \
                    generator.generate(model, [prompt_ids_all[i] for i in mb], n=2)
                prompts2, cols2 = rollout.repeat_rows(mb, all_prompts, columns, 2)
                completions = rollout.as_completions(prompts2, gen.texts)
                ids_list = rollout.completion_id_lists(gen.completion_ids, gen.completion_mask)
                terminated = gen.terminated.cpu()
                # 2. rank each pair (details 3-5); scores (2B,) NaN = unscored, None with a judge
                scores = None
                if judge is not None:
                    ranks = judge.judge([all_prompts[i] for i in mb],
                                        [(completions[2 * b], completions[2 * b + 1]) for b in range(B)])
                    first_wins, weights = check_ranks(ranks, B, source), torch.ones(B)
                else:
                    rpf = rewards(prompts2, completions, ids_list, cols2)  # (2B, 1); stops the run on NaN / inf
                    window["rpf"].append(rpf)
                    scores = apply_missing_eos_penalty(rpf[:, 0], terminated, args.missing_eos_penalty)
                    first_wins = first_is_chosen(scores[0::2], scores[1::2])  # (B,)
                    weights = pair_weights(scores[0::2], scores[1::2], args.drop_ties)  # (B,) 0: out of the loss
                # 3. log-probs of both samples under the policy (with grad) and the reference, one forward each (detail
                # 11); the DPO loss (details 6-7)
                batch = pair_batch([prompt_ids_all[i] for i in mb], ids_list, pad_id, device, share, mask_dtype)
                mask = batch["completion_mask"].float()  # (2B, T)
                with torch.no_grad():
                    ref_seq = (pair_token_logps(ref_model, batch) * mask).sum(1)  # (2B,)
                chosen_cpu = 2 * torch.arange(B) + (~first_wins).long()  # (B,) row of each pair's chosen sample
                chosen_idx, rejected_idx = chosen_cpu.to(device), (chosen_cpu ^ 1).to(device)
                with accelerator.accumulate(model):
                    logps = pair_token_logps(model, batch)  # (2B, T)
                    seq = (logps * mask).sum(1)  # (2B,)
                    losses, h = dpo_loss(seq[chosen_idx], seq[rejected_idx], ref_seq[chosen_idx], ref_seq[rejected_idx],
                                         beta, args.loss_type)
                    # mean over the optimizer step's pairs (left-out pairs count as 0): undo accelerate's 1/accumulation
                    # and DDP's 1/processes
                    loss = (losses * weights.to(device)).sum() / prompts_per_step
                    accelerator.backward(loss * A * W)
                    if accelerator.sync_gradients:
                        _, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                                args.max_grad_norm)
                        skipped_steps += not stepped
                # 4. statistics of the window (on the device: no host sync); NaN entries (unscored pairs) are left out
                with torch.no_grad():
                    seq, kl = seq.detach(), seq.detach() - ref_seq  # (2B,)
                    ranked = (torch.ones(B, dtype=torch.bool) if scores is None else
                              ~(scores[0::2].isnan() | scores[1::2].isnan())).to(device)  # (B,) pairs with a preference
                    per_pair = lambda v: torch.where(ranked, v, torch.full_like(v, float("nan")))  # noqa: E731
                    hh = h.detach()
                    stats.add("loss/dpo", per_pair(losses.detach()))
                    stats.add("objective/kl", kl)
                    stats.add("objective/entropy", -seq)
                    stats.add("rewards/chosen", per_pair(beta * kl[chosen_idx]))
                    stats.add("rewards/rejected", per_pair(beta * kl[rejected_idx]))
                    stats.add("rewards/margins", per_pair(beta * hh))
                    stats.add("rewards/accuracies", per_pair((hh > 0).double()))
                    stats.add("logps/chosen", per_pair(seq[chosen_idx]))
                    stats.add("logps/rejected", per_pair(seq[rejected_idx]))
                    stats.add("val/contain_eos_token", terminated.double())
                    if scores is not None:
                        stats.add("objective/scores", scores)
                        stats.add("objective/scores_margin", scores[chosen_cpu] - scores[chosen_cpu ^ 1])
                        stats.add("objective/tie_rate", per_pair((scores[0::2] == scores[1::2]).double()))
                        stats.add("objective/unscored_rate", (~ranked).double())
                    if gold is not None:
                        stats.add("train/gold_reward", [float("nan") if v is None else v
                                                        for v in gold(prompts2, completions)])
                    window["mask"].append(gen.completion_mask.cpu())
                    window["terminated"].append(terminated)
                    if gen.sampler_logps is not None:  # sampler (vLLM) vs trainer log-prob gap
                        window["logps"].append(logps.detach().cpu())
                        window["sampler_logps"].append(gen.sampler_logps.cpu())
                if sample_rows is None:
                    c = chosen_cpu.tolist()
                    sample_rows = [{"prompt": str(prompts2[2 * b]), "chosen": gen.texts[c[b]],
                                    "rejected": gen.texts[c[b] ^ 1],
                                    **({"score_chosen": float(scores[c[b]]), "score_rejected": float(scores[c[b] ^ 1])}
                                       if scores is not None else {})}
                                   for b in range(min(4, B))]
            if async_ro is not None:
                async_ro.weights_updated(model, step + 1)  # push, and request the steps now allowed (detail 12)
            else:
                generator.sync_weights(model)

            # ============================================================ logging, evaluation, checkpoints (plumbing)
            done = step + 1
            if done % args.logging_steps == 0 or done == args.max_steps:
                metrics = stats.reduce(accelerator)
                metrics["objective/non_score_reward"] = -beta * metrics["objective/kl"]
                metrics["objective/model_kl"] = metrics["objective/kl"]  # same name as in xpo.py / nash_md.py
                if rewards is not None:
                    metrics["objective/model_scores"] = metrics["objective/scores"]
                    metrics["objective/rlhf_reward"] = (metrics["objective/scores"]
                                                        + metrics["objective/non_score_reward"])
                    rpf_all = distributed.gather_cat(accelerator, torch.cat(window["rpf"]))
                    metrics.update(rewards.metrics(rpf_all))
                    rewards.check_varies(rpf_all, accelerator.is_main_process)
                metrics["val/model_contain_eos_token"] = metrics["val/contain_eos_token"]
                width = max(m.shape[1] for m in window["mask"])
                metrics.update(rollout.completion_metrics(
                    accelerator, torch.cat([F.pad(m, (0, width - m.shape[1])) for m in window["mask"]]),
                    torch.cat(window["terminated"])))
                if window["sampler_logps"]:
                    metrics.update(rollout.sampler_gap_metrics(accelerator, window["logps"], window["sampler_logps"],
                                                               window["mask"]))
                window = {k: [] for k in window}
                metrics.update({"beta": beta, "learning_rate": scheduler.get_last_lr()[0],
                                "train/skipped_steps": skipped_steps})
                if args.eval_steps and eval_ds is not None and (done % args.eval_steps == 0 or done == args.max_steps):
                    metrics.update(evaluate())
                tracker.log(metrics, done, args.max_steps)
            if args.log_completions_steps and (done % args.log_completions_steps == 0 or done == args.max_steps):
                tracker.log_samples(done, sample_rows or [])
            if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
                save(done)
    finally:
        if async_ro is not None:
            async_ro.close()

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir)
    if args.save_steps:
        save(args.max_steps)
    tracker.close()
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
