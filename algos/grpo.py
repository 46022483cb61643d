"""GRPO: Group Relative Policy Optimization, with the variants users expect (Dr. GRPO, DAPO, GSPO, INTELLECT-2's
two-sided clip).

Paper: "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (Shao et al., arXiv
2402.03300), Eq. 3 (objective) and Sec. 4.1.2 (outcome supervision: group-normalised advantages). Variants:
"Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO, arXiv 2503.20783), "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale" (arXiv 2503.14476, clip-higher and the token-level loss), "Group Sequence
Policy Optimization" (GSPO, arXiv 2507.18071, Eq. 5-7), INTELLECT-2 (arXiv 2505.07291, the `delta` clip).

For each prompt x, G completions y_1..y_G are sampled from π_old; rewards r_i = Σ_f w_f r_f(x, y_i) and
    A_i = (r_i - mean_g r) / (s + 1e-4)   s = group std (group) | std of the whole generation batch (batch) | 1 (none)
Per completion token t (ρ_t = π_θ(y_t|.) / π_old(y_t|.), or GSPO's ρ_i = exp(mean_t log ρ_t) for every token):
    L_{i,t} = -min(ρ A_i, clip(ρ, 1-ε, 1+ε_high) A_i) + β k3_t,    k3_t = π_ref/π_θ - log(π_ref/π_θ) - 1
(with --delta the unclipped ρ is capped at δ). The KL is a loss term (k3), not a reward penalty. Aggregation:
    grpo     (1/B) Σ_i (1/|y_i|) Σ_t L_{i,t}         per micro-batch, then averaged over micro-batches (2402.03300)
    bnpo     Σ_{i,t} L / Σ_{i,t} m                    token mean of the micro-batch, averaged over micro-batches
    dr_grpo  Σ_{i,t} L / (B · max_new_tokens)         constant normaliser (2503.20783)
    dapo     Σ_{i,t} L / N_tok                        N_tok = completion tokens of the whole optimizer step, over all
                                                      micro-batches and processes (2503.14476, Eq. 12); the default

Implementation details (numbered so the tests and the README can point at them):
 1. Groups stay whole on one process. Each process samples per_device_train_batch_size * gradient_accumulation_steps
    / num_generations prompts, G completions each (row i*G + j = sample j of prompt i: its generation batch), and
    takes μ = num_iterations optimizer steps over it, each in gradient_accumulation_steps micro-batches of
    per_device_train_batch_size completions. The global batch is the generation batch times the processes; 2
    processes give the same update as 1 process with twice the per-device batch (tests check both invariances).
 2. Rewards: the weighted sum over the sources that scored the sample (a source returning None for a sample is left
    out of that sample's sum). A sample no source scores is NaN: it is left out of its group's mean and std and gets
    A = 0 (as TRL 1.16). A NaN or inf *returned* by a source stops the run at that step, before any update, naming
    the source and the sample (common/rewards.py).
 3. Advantages: Bessel-corrected group std (scale_rewards group), the std of every scored reward of the generation
    batch on all processes (batch; the only statistic that needs the gathered batch), or none (Dr. GRPO). A group
    whose scored rewards are all equal gets exactly A = 0 (not a float residue of r - mean).
 4. Ratio: with μ = 1, π_old = sg(π_θ), so ρ is exactly 1 and nothing is recomputed. With μ > 1 the old log-probs
    are computed once per generation batch, before its first optimizer step, and reused for all μ steps.
 5. KL: k3 as a per-token loss term to the frozen initial policy, added after the clipped surrogate and not
    multiplied by ρ (TRL 1.16 multiplies it by the differentiable ρ by default, use_bias_correction_kl=True, which
    changes the KL gradient even on-policy; here it is plain k3 as in DeepSeekMath Eq. 3, TRL's
    use_bias_correction_kl=False). The reference model is loaded only if beta > 0.
 6. Aggregation: accelerate divides each micro-batch loss by the accumulation steps and DDP averages over
    processes, which is right for the per-micro-batch means (grpo, bnpo, dr_grpo). dapo's normaliser already counts
    the tokens of the whole optimizer step (all micro-batches, all processes), so its loss is multiplied back by
    accumulation steps x processes: the update equals that of one big batch.
 7. Sampler mismatch (vLLM or the async worker of detail 12, which return their log-probs): each token's loss
    before the KL term is multiplied by the truncated ratio min(π_old/π_sampler, vllm_importance_sampling_cap)
    (TRL's 'token_truncate' mode; TRL 1.16 defaults to 'sequence_mask'); the gap is logged under TRL's sampling/*
    names either way. With μ = 1, π_old is the training forward's own (detached) log-probs.
 8. --mask_truncated_completions leaves completions that did not end with EOS out of the loss (and of dapo's token
    count); they still count in the reward statistics.
 9. The completion mask comes from generation (cut after the first EOS, EOS kept), never from pad_token_id, so the
    EOS token is trained on even when pad == eos.
10. Non-finite safety: a non-finite gradient norm skips the optimizer step (logged as train/skipped_steps); no
    non-finite weights are ever saved (common/checkpoint.py). When no reward varied over the first logging window,
    one loud warning names the sources.
11. Tools and environments (--tools / --environment, common/agents.py): each completion is an episode of policy
    turns and tool/environment turns; the loss mask (and so the KL term and dapo's token count) is the policy's
    own sampled tokens only, which are kept as sampled (no re-tokenisation). Reward functions see the decoded
    transcript; an environment's (or --agent_command's) summed per-turn and final rewards are the reward source
    environment_reward. Evaluation runs greedy episodes. max_new_tokens is per turn; completions/* lengths count
    every completion token (tool turns too), and dr_grpo's constant stays max_new_tokens.
12. Asynchronous generation (--async_generation, common/async_rollout.py): a worker samples the next generation
    batches while the trainer takes its optimizer steps: an HF-generate process holding its own copy of the policy
    (weights pushed through shared memory after each optimizer step), or with --use_vllm --vllm_mode server the
    server driven from a thread. Batch j (trained from version j·μ, versions counting optimizer steps) is requested
    once the trainer holds a version v with j·μ - v <= max_staleness and is sampled by exactly v; its staleness is
    checked and logged per batch (async/staleness). The worker returns its log-probs of the sampled tokens and the
    loss is corrected with detail 7's truncated importance weights min(π_old/π_sampler, cap); with μ = 1, π_old is
    sg(π_θ) of the training forward, so the correction costs no extra forward (this holds for vLLM too).
    max_staleness 0 is the synchronous schedule through the worker: it starts from the trainer's RNG state and
    weights, so it draws the very samples of the synchronous path (same losses to ~1e-7, from IS weights exp(~0)).
    A wait longer than --async_timeout (a weight push or a batch) stops the run with an error naming the flag; a
    worker exception is raised with the worker's traceback; the worker is stopped on exit and on errors.
    Resume: the checkpoint keeps each rank's worker RNG state; the resumed worker starts from the checkpoint's
    weights. With max_staleness 0 a resumed run repeats the uninterrupted one exactly; with max_staleness k > 0 the
    first k batches after a resume are sampled by fresher weights than in the uninterrupted run (staleness ramps
    up 0, 1, .., k as at a start), so the runs differ from there on (the same prompts, RNG streams and schedule).

Run:
    python algos/grpo.py                                           # toy SFT policy on toy:add, a few minutes on 2 CPU cores
    python algos/grpo.py --loss_type grpo --scale_rewards none     # (Dr. GRPO: --loss_type dr_grpo --scale_rewards none)
    python algos/grpo.py --importance_sampling_level sequence --loss_type grpo --num_iterations 4 \
        --epsilon 3e-4 --epsilon_high 4e-4                         # GSPO recipe
    python algos/grpo.py --reward_funcs my_rewards.py:fn add --reward_weights 0.5 1.0
    python algos/grpo.py --dataset_name my_prompts.jsonl --reward_funcs my_rewards.py:fn --eval_fraction 0.05
    python algos/grpo.py --dataset_name toy:mul_tool --tools common.toy_agents:calc --max_new_tokens 32
    python algos/grpo.py --dataset_name toy:guess --environment common.toy_agents:GuessEnv --max_new_tokens 4
    accelerate launch --multi_gpu --num_processes 2 algos/grpo.py --per_device_train_batch_size 32   # same update as 1 process x 64
    python algos/grpo.py --async_generation True --max_staleness 1 # sample the next batch during the step (detail 12)
    bash benchmarks/pg.sh                                          # 3 seeds of GRPO, GMPO, RLOO -> benchmarks/results/pg
    python benchmarks/async_grpo.py                                # sync vs async steps/s and gold reward
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro

from common import checkpoint, data, distributed, evaluation, model as model_utils, rollout, tracking
from common import agents, async_rollout, peft_utils, rewards as reward_utils
from common.generation import build_generator


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "grpo"
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
    """'toy-sft' (the toy SFT policy), a local folder or a hub name"""
    dataset_name: str = "toy:add"
    """prompt-only data: 'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk
    folder or a hub name (extra columns are passed to the reward functions)"""
    dataset_split: str = "train"
    """split to train on"""
    logging_steps: int = 5
    """log metrics every this many optimizer steps (averaged over the steps since the last log)"""
    save_steps: int = 0
    """checkpoint every this many optimizer steps (0: only the final model); rounded to generation boundaries"""
    save_total_limit: int | None = 2
    """keep at most this many checkpoints"""
    resume_from: str | None = None
    """a checkpoint folder, or 'auto' for the newest complete one in output_dir"""
    overwrite_output_dir: bool = False
    """start a new run in an output_dir that holds another run's files (they are deleted first)"""
    eval_dataset_name: str | None = None
    """held-out prompts: a file, a save_to_disk folder or a hub name (split eval_split); toy datasets use the toy
    task's test split"""
    eval_split: str = "test"
    """split of eval_dataset_name (hub datasets) or of the toy task used for evaluation"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for evaluation (deterministic; never overlaps training)"""
    mixed_precision: str | None = None
    """'no', 'fp16' or 'bf16' (default: whatever `accelerate launch` configured)"""
    # --- optimisation
    learning_rate: float = 3e-5
    """AdamW learning rate (the toy policy is tiny; use ~1e-6 for a pretrained LM, as in the paper)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up steps, then constant"""
    max_steps: int = 150
    """optimizer steps (each generation batch gives num_iterations of them)"""
    per_device_train_batch_size: int = 64
    """completions per micro-batch per process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- sampling (common/generation.py)
    num_generations: int = 8
    """G, completions per prompt (a group)"""
    temperature: float = 1.0
    """sampling temperature; the trained log-probs use the same temperature"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    min_p: float | None = None
    """min-p sampling"""
    max_new_tokens: int = 8
    """longest completion (also L_max of dr_grpo)"""
    max_prompt_length: int | None = 256
    """prompts longer than this keep their last tokens"""
    use_vllm: bool = False
    """sample with vLLM (common/vllm_backend.py) instead of HF generate"""
    vllm_mode: str = "colocate"
    """'colocate' (in-process) or 'server'"""
    vllm_server_host: str = "127.0.0.1"
    """vLLM server host (server mode)"""
    vllm_server_port: int = 8000
    """vLLM server port (server mode)"""
    vllm_server_token_file: str | None = None
    """the token file scripts/vllm_server.py wrote (server mode); default: <cache>/vllm-server-<port>.token"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory vLLM may take (colocate)"""
    vllm_kv_cache_gb: float = 1.0
    """CPU KV-cache space for vLLM on CPU"""
    vllm_importance_sampling_cap: float | None = 3.0
    """when the sampler returns its log-probs: multiply each token's loss by min(π_old/π_sampler, cap) (truncated
    importance sampling); None: only log the mismatch"""
    # --- asynchronous generation (common/async_rollout.py, detail 12)
    async_generation: bool = False
    """sample the next generation batches in a worker (an HF-generate process; with --use_vllm, the vLLM server)
    while the trainer takes its optimizer steps; the sampler's log-probs give the truncated importance-sampling
    correction of vllm_importance_sampling_cap"""
    max_staleness: int = 1
    """with --async_generation: a batch is sampled by weights at most this many optimizer steps older than the ones
    its first optimizer step starts from (0: the synchronous schedule, through the worker)"""
    async_timeout: float = 600.0
    """seconds the trainer waits for the generation worker (a weight push or a batch) before it stops with an error"""
    async_worker_threads: int = 0
    """torch threads of the generation worker process (0: as many as the trainer uses)"""
    # --- rewards
    reward_funcs: list[str] | None = None
    """reward functions: 'add'/'reverse' (toy gold rewards), 'path/file.py:fn', 'module:fn', 'model:<name or dir>';
    default: the toy task's gold reward"""
    reward_model_name_or_path: str | None = None
    """a reward model added to reward_funcs (e.g. 'toy-rm'); same as 'model:<name>' there"""
    reward_weights: list[float] | None = None
    """one weight per reward source (reward_funcs, then the reward model); default all 1"""
    # --- GRPO
    scale_rewards: str = "group"
    """advantage scale: 'group' (group std), 'batch' (std of the whole generation batch) or 'none' (Dr. GRPO)"""
    loss_type: str = "dapo"
    """aggregation: 'grpo' | 'bnpo' | 'dr_grpo' | 'dapo' (see the module docstring)"""
    importance_sampling_level: str = "token"
    """'token' (per-token ratio) or 'sequence' (GSPO: exp of the mean token log-ratio)"""
    epsilon: float = 0.2
    """lower clip: ρ >= 1 - epsilon"""
    epsilon_high: float | None = None
    """upper clip: ρ <= 1 + epsilon_high (DAPO's clip-higher uses 0.28); default: epsilon"""
    delta: float | None = None
    """two-sided clipping (INTELLECT-2): the unclipped ratio is capped at delta (> 1 + epsilon_high)"""
    beta: float = 0.0
    """weight of the k3 KL to the reference model (the initial policy); the reference is loaded only if beta > 0"""
    num_iterations: int = 1
    """μ: optimizer steps per generation batch (off-policy reuse with stored old log-probs)"""
    mask_truncated_completions: bool = False
    """leave completions that did not end with EOS out of the loss"""
    # --- tools and environments: multi-turn episodes (common/agents.py, detail 11)
    tools: list[str] | None = None
    """tool functions 'path/file.py:fn' or 'module:fn' (name, signature and docstring describe them); the policy
    calls them as <tool>fn(args)</tool> (or the chat template's <tool_call> JSON) and continues after the result"""
    environment: str | None = None
    """an environment class 'path/file.py:Env': reset(row) -> first observation, step(text) -> (observation | None,
    reward | None, done); its summed reward is a reward source (environment_reward)"""
    agent_command: str | None = None
    """an agent program run once per generation batch; it plays the episodes through an OpenAI-compatible endpoint
    served from the policy and reports each episode's reward (common/agents.py ExternalAgent; conversational
    prompts)"""
    agent_timeout: float = 600.0
    """seconds the agent program may take per generation batch"""
    max_turns: int = 4
    """most policy turns per episode (max_new_tokens is per turn); an episode still going is truncated"""
    tool_timeout: float = 5.0
    """seconds a tool call may run (in a child process) before it becomes an error turn"""
    max_tool_output_chars: int = 1000
    """a tool result longer than this becomes an error turn"""
    # --- evaluation and logging
    eval_steps: int = 25
    """held-out reward (eval/reward; eval/gold_reward on the toy tasks) every this many steps, at step 0 and at the
    end; 0: never"""
    num_eval_prompts: int = 256
    """held-out prompts per evaluation (greedy decoding)"""
    log_completions_steps: int = 25
    """write sample completions with their rewards every this many steps (0: never)"""
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


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# ----------------------------------------------------------------------------- the math
# Shapes: N completions in a generation batch (N = prompts * G), G completions per prompt, B completions per
# micro-batch, T completion tokens. Masks are 0/1 floats over completion tokens (EOS included).
def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, F) rewards with NaN where a function returned None, (F,) weights -> (N,) weighted sum over the functions
    that scored the sample; NaN when none did."""
    assert rewards_per_func.dim() == 2 and weights.shape == (rewards_per_func.shape[1],)
    scored = ~torch.isnan(rewards_per_func)
    total = torch.where(scored, rewards_per_func * weights, torch.zeros_like(rewards_per_func)).sum(1)
    return torch.where(scored.any(1), total, torch.full_like(total, float("nan")))


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards, rows g*G..(g+1)*G-1 one group -> (N,) advantages (r - group mean) / (std + eps).
    std: Bessel-corrected group std ('group'), std of all rewards in the batch ('batch'), or no scaling ('none').
    NaN rewards (unscored) are left out of the statistics and get A = 0; a group whose scored rewards are all equal
    gets exactly A = 0."""
    assert rewards.dim() == 1 and rewards.numel() % group_size == 0
    r = rewards.view(-1, group_size)  # (N/G, G)
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    count = valid.sum(1, keepdim=True)
    mean = r0.sum(1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(valid, r - mean, torch.zeros_like(r))
    big, small = torch.finfo(r.dtype).max, torch.finfo(r.dtype).min
    all_equal = (torch.where(valid, r, torch.full_like(r, small)).amax(1, keepdim=True)
                 == torch.where(valid, r, torch.full_like(r, big)).amin(1, keepdim=True))
    centered = torch.where(all_equal, torch.zeros_like(centered), centered)
    if scale_rewards == "group":
        std = ((centered ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        adv = centered / (std + eps)
    elif scale_rewards == "batch":
        flat = rewards[~torch.isnan(rewards)]
        std = flat.std() if flat.numel() > 1 else torch.zeros(())
        adv = centered / (std + eps)
    elif scale_rewards == "none":
        adv = centered
    else:
        raise ValueError(f"--scale_rewards {scale_rewards!r}: use 'group', 'batch' or 'none'")
    return adv.reshape(-1)


def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """ρ: token level exp(ℓ - ℓ_old) (B, T); sequence level (GSPO) exp(masked mean_t (ℓ - ℓ_old)) broadcast to (B, T)."""
    assert logps.shape == old_logps.shape == mask.shape
    log_ratio = logps - old_logps
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        seq = (log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        return torch.exp(seq)[:, None].expand_as(logps)
    raise ValueError(f"--importance_sampling_level {level!r}: use 'token' or 'sequence'")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float,
                      delta: float | None = None) -> torch.Tensor:
    """Per-token -min(ρ A, clip(ρ, 1-ε, 1+ε_high) A), ρ capped at delta in the unclipped term when given. (B, T)."""
    assert ratio.dim() == 2 and advantages.shape == (ratio.shape[0],)
    adv = advantages[:, None]
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    return -torch.min(unclipped * adv, clipped * adv)


def truncated_is_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token min(π_old / π_sampler, cap) (B, T) from the two log-probs of the sampled tokens (detail 7)."""
    assert old_logps.shape == sampler_logps.shape
    return torch.exp(old_logps - sampler_logps).clamp(max=cap)


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref): exp(ℓ_ref - ℓ) - (ℓ_ref - ℓ) - 1 >= 0. (B, T)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, num_items: float | None = None,
              max_completion_length: int | None = None) -> torch.Tensor:
    """Scalar loss of a micro-batch from (B, T) per-token losses and the 0/1 mask (see the module docstring).
    num_items: completion tokens of the whole optimizer step (dapo); max_completion_length: L_max (dr_grpo)."""
    assert per_token_loss.shape == mask.shape
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (mask.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return masked.sum() / max(num_items, 1)
    raise ValueError(f"--loss_type {loss_type!r}: use one of {LOSS_TYPES}")


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float,
                   epsilon_high: float) -> dict[str, torch.Tensor]:
    """Token counts (sums over the mask) where the clip takes effect: ρ < 1-ε with A < 0 (low), ρ > 1+ε_high with
    A > 0 (high), either (region). Divide by the mask sum for fractions."""
    adv = advantages[:, None]
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return {"low": (low * mask).sum(), "high": (high * mask).sum(), "region": ((low | high) * mask).sum()}


# ----------------------------------------------------------------------------- set-up helpers
def check_args(args: Args) -> int:
    """Reject bad flag combinations before anything is loaded; returns the prompts per process and generation."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type {args.loss_type!r}: use one of {LOSS_TYPES}")
    if args.scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"--scale_rewards {args.scale_rewards!r}: use 'group', 'batch' or 'none'")
    if args.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"--importance_sampling_level {args.importance_sampling_level!r}: use 'token' or 'sequence'")
    if args.delta is not None and args.delta <= 1 + (args.epsilon_high if args.epsilon_high is not None else args.epsilon):
        raise ValueError("--delta must be > 1 + epsilon_high (it caps the unclipped ratio above the clip range)")
    if args.async_generation:
        if args.max_staleness < 0:
            raise ValueError(f"--max_staleness must be >= 0 (optimizer steps), got {args.max_staleness}")
        if args.async_timeout <= 0:
            raise ValueError(f"--async_timeout must be > 0 seconds, got {args.async_timeout}")
        if args.tools or args.environment or args.agent_command:
            raise ValueError("--async_generation samples single-turn completions: drop it with --tools, "
                             "--environment or --agent_command")
        if args.use_vllm and args.vllm_mode != "server":
            raise ValueError("--async_generation with --use_vllm needs --vllm_mode server (a colocated engine shares "
                             "the trainer's process); or drop --use_vllm to sample in an HF-generate worker process")
    return check_batch(args)


def check_batch(args) -> int:
    """The prompts per process and generation batch; errors naming the flags when the batch cannot hold whole groups."""
    if args.num_generations < 2:
        raise ValueError("--num_generations must be >= 2 (the advantage compares completions of the same prompt)")
    if args.num_iterations < 1 or args.max_steps <= 0:
        raise ValueError("--num_iterations and --max_steps must be positive")
    gen_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if gen_batch % args.num_generations:
        good = args.num_generations * max(1, round(gen_batch / args.num_generations))
        fits = good % args.gradient_accumulation_steps == 0
        raise ValueError(
            f"the per-process batch per_device_train_batch_size * gradient_accumulation_steps = "
            f"{args.per_device_train_batch_size} * {args.gradient_accumulation_steps} = {gen_batch} completions is not "
            f"divisible by --num_generations {args.num_generations} (groups are kept whole on one process); e.g. set "
            f"--per_device_train_batch_size {good // args.gradient_accumulation_steps if fits else good} "
            f"{'' if fits else '--gradient_accumulation_steps 1 '}or change --num_generations")
    return gen_batch // args.num_generations


def load_prompts(args, tokenizer, script: str):
    """Prompt-only training rows (other columns kept for the reward functions), their tokenised rendered prompts,
    and the held-out rows (None without an evaluation set)."""
    ds, eval_ds = data.load_splits(args, "prompt", script, toy_n=args.num_eval_prompts)
    ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in ds["prompt"]])
    if args.max_prompt_length:
        ids = [s[-args.max_prompt_length:] for s in ids]
    return ds, ids, eval_ds


def sequence_logps(model, batch: dict, rows: slice, temperature: float, return_entropy: bool = False):
    """Per-token log-probs (B, T) of the completions in `rows`, trimmed to the micro-batch's own padding."""
    cmask = batch["completion_mask"][rows]
    T = max(int(cmask.sum(1).max()), 1)
    amask = batch["attention_mask"][rows]
    P = batch["prompt_len"]
    keep = P - int(amask[:, :P].sum(1).max())  # leading columns that are padding in every row
    ids = batch["input_ids"][rows, keep:P + T]
    am = amask[:, keep:P + T]
    out = model_utils.completion_logps(model, ids, am, T, temperature, return_entropy)
    return out, T


def rollout_batch(p_ids: list[list[int]], out, G: int, pad_id: int, mask_truncated: bool, device) -> dict:
    """[left-padded prompt | right-padded completion] of every sample (row i*G + j), its completion mask and the
    loss mask (completion mask, without truncated completions when mask_truncated)."""
    completion_ids = rollout.completion_id_lists(out.completion_ids, out.completion_mask)
    b = data.batch_prompt_completion([p for p in p_ids for _ in range(G)], completion_ids, pad_id)
    cmask = b["completion_mask"].float()
    loss_mask = cmask * out.terminated.cpu()[:, None].float() if mask_truncated else cmask
    return {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device),
            "completion_mask": b["completion_mask"].to(device), "loss_mask": loss_mask.to(device),
            "prompt_len": b["input_ids"].shape[1] - cmask.shape[1], "completion_ids": completion_ids}


def window_add(window: dict, metrics: dict):
    """Append each metric of one generation batch or step to the logging window."""
    for k_, v in metrics.items():
        window[k_].append(v)


# ----------------------------------------------------------------------------- main
def main(args: Args):
    # ---- plumbing (safe to skip): checks, data and reward sources, run folder, models
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    prompts_per_process = check_args(args)
    eps_low, eps_high = args.epsilon, args.epsilon if args.epsilon_high is None else args.epsilon_high
    G, A_steps, mu = args.num_generations, args.gradient_accumulation_steps, args.num_iterations
    B = args.per_device_train_batch_size
    accelerator = distributed.make_accelerator(args)
    W, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    specs = agents.reward_specs(args.reward_funcs, args.reward_model_name_or_path, args.dataset_name,
                                args.environment or args.agent_command)
    reward_utils.check_weights(specs, args.reward_weights)
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    ds, prompt_ids, eval_ds = load_prompts(args, tokenizer, "grpo.py")
    agent = agents.Agent.from_args(args, tokenizer)  # None without --tools / --environment (detail 11)
    eval_prompt_ids = None if agent is None or eval_ds is None else data.tokenize(tokenizer, [
        data.prompt_text(p, tokenizer) for p in eval_ds["prompt"][:args.num_eval_prompts]])
    data.check_batch_fits(len(ds), prompts_per_process * W, "--per_device_train_batch_size x "
                          "--gradient_accumulation_steps / --num_generations (prompts per generation batch)")
    extra_columns = {c: ds[c] for c in ds.column_names if c != "prompt"}  # passed on to the reward functions
    sources = reward_utils.RewardSources(specs, args.reward_weights, args.dataset_name, device)
    peft_utils.check_args(args)  # LoRA flags and module names, before anything is loaded or written
    resume = checkpoint.prepare_output_dir(args, may_change=("async_timeout", "async_worker_threads"))

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters, the rest frozen
    ref_model = None
    if args.beta > 0 and args.use_peft:  # the reference = the policy with its adapters off (no second copy)
        ref_model = peft_utils.reference_model(model)
    elif args.beta > 0:  # frozen reference = the initial policy, outside accelerator.prepare
        ref_model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name).to(device).eval()
        ref_model.requires_grad_(False)
    # foreach: the same update, bit for bit, as the per-tensor loop (the default on CPU), but no two (V, H)
    # temporaries per embedding-sized weight in the step (the default on GPUs already)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(args.warmup_steps, 1)))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand once per optimizer step
    generator = build_generator(args, tokenizer, accelerator, model)

    state = {"step": 0, "elapsed": 0.0, "num_tokens": 0.0, "skipped_steps": 0}
    if resume is not None:
        state.update(checkpoint.load_checkpoint(accelerator, resume))
        accelerator.print(f"resumed from {resume} at step {state['step']}")
        generator.sync_weights(model)
    start_step, num_tokens, skipped = state["step"], state["num_tokens"], state["skipped_steps"]
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, state["elapsed"],
                               show=("reward", "loss", "eval/reward", "eval/gold_reward"))
    accelerator.print(f"grpo: {len(ds)} prompts; {W} process(es) x {prompts_per_process} prompts x {G} completions per "
                      f"generation, {mu} optimizer step(s) each, {args.max_steps} steps -> {args.output_dir}")

    def evaluate() -> dict:  # greedy completions of the held-out prompts, scored by the same sources
        if agent is not None:
            return agents.heldout_reward(agent, generator, model, eval_ds, sources, args.dataset_name,
                                         eval_prompt_ids, args.num_eval_prompts)
        return evaluation.heldout_reward(accelerator.unwrap_model(model), tokenizer, eval_ds, sources,
                                         args.dataset_name, args.num_eval_prompts, args.max_new_tokens,
                                         accelerator=accelerator)

    def save(step: int):
        extra = {"elapsed": tracker.elapsed(), "num_tokens": num_tokens, "skipped_steps": skipped}
        if worker_rng is not None:  # every rank's worker RNG, where its next batch's sampling starts (detail 12)
            extra["async_rng"] = accelerator.gather(worker_rng[None].to(device)).cpu()
        checkpoint.save_checkpoint(accelerator, args.output_dir, step, model, tokenizer, args, extra,
                                   args.save_total_limit)

    def round_rows(gen_round: int) -> list[int]:  # this process's prompts of generation batch gen_round
        indices = data.batch_indices(len(ds), prompts_per_process * W, gen_round, args.seed)
        return indices[rank * prompts_per_process:(rank + 1) * prompts_per_process]

    async_ro, worker_rng = None, None
    if args.async_generation:  # detail 12: the worker samples ahead, from weights at most max_staleness steps old
        saved = state.get("async_rng")
        if args.use_vllm:
            worker = async_rollout.ThreadWorker(generator, accelerator, args.async_timeout)
        else:
            worker = async_rollout.ProcessWorker.for_policy(
                model, tokenizer, generator.cfg, accelerator, args.async_timeout, args.async_worker_threads,
                rng_state=saved[rank] if saved is not None and len(saved) == W else None)
        async_ro = async_rollout.AsyncRollout(worker, lambda r: [prompt_ids[i] for i in round_rows(r)], G, mu,
                                              args.max_staleness, -(-args.max_steps // mu))

    window, first_rewards = defaultdict(list), []  # per-step metrics since the last log; rewards until the first log
    batch = None
    try:
        if async_ro is not None:
            async_ro.start(model, start_step)  # the first batches are sampled during the step-0 evaluation
        if start_step == 0 and args.eval_steps and eval_ds is not None:
            tracker.log(evaluate(), 0, args.max_steps)
        model.train()
        for step in range(start_step, args.max_steps):
            if batch is None or step % mu == 0:
                # ---------------------------------------------------------------- generate (every μ steps)
                t0 = time.time()
                gen_round = step // mu
                local = round_rows(gen_round)
                p_ids = [prompt_ids[i] for i in local]
                if async_ro is not None:  # sampled ahead by the worker, with its log-probs (detail 12)
                    out, info = async_ro.get(gen_round, step)
                    worker_rng = async_rollout.worker_rng_state(info)
                    window["async/staleness"].append(float(info["staleness"]))
                    window["async/wait_seconds"].append(info["wait"])  # the trainer waited for the worker
                    window["async/sampling_seconds"].append(info["seconds"])  # the worker sampled the batch
                elif agent is None:
                    out = generator.generate(model, p_ids, n=G)  # (N, T), row i*G + j = sample j of prompt i
                else:  # multi-turn episodes, same row layout (detail 11)
                    out = agent.rollout(generator, model, p_ids, [ds[i] for i in local], G)
                gen_time = info["seconds"] if async_ro is not None else time.time() - t0
                batch = rollout_batch(p_ids, out, G, tokenizer.pad_token_id, args.mask_truncated_completions, device)
                if agent is not None:  # tool and environment tokens: no loss, no KL
                    batch["loss_mask"] = batch["loss_mask"] * out.policy_mask.to(device)

                # ---------------------------------------------------------------- score (detail 2)
                prompts, columns = rollout.repeat_rows(local, ds["prompt"], extra_columns, G)
                if agent is not None:
                    columns["env_reward"] = out.env_rewards
                rpf = sources(prompts, rollout.as_completions(prompts, out.texts), batch["completion_ids"], columns)
                rpf_all = distributed.gather_cat(accelerator, rpf)  # (N_all, F): 'batch' scaling and metrics need all

                # ---------------------------------------------------------------- advantages, old/ref log-probs
                r_all = combine_rewards(rpf_all, sources.weights)
                adv_all = group_advantages(r_all, G, args.scale_rewards)
                N = rpf.shape[0]
                advantages = adv_all[rank * N:(rank + 1) * N].to(device)
                old_logps, ref_logps = [None] * A_steps, [None] * A_steps
                sampler_lp = [None if out.sampler_logps is None else out.sampler_logps[m * B:(m + 1) * B].to(device)
                              for m in range(A_steps)]  # detail 7: the sampler's log-probs, when it gave them
                with torch.no_grad():
                    for m in range(A_steps):
                        rows = slice(m * B, (m + 1) * B)
                        if mu > 1:  # detail 4 (with μ = 1, π_old = sg(π_θ) of the training forward)
                            old_logps[m], _ = sequence_logps(model, batch, rows, args.temperature)
                        if ref_model is not None:
                            ref_logps[m], _ = sequence_logps(ref_model, batch, rows, args.temperature)

                # ---- plumbing (safe to skip): rollout metrics over every process, sample completions
                if out.sampler_logps is not None and mu > 1:  # (μ = 1: after the step, from the training forward)
                    window_add(window, rollout.sampler_gap_metrics(
                        accelerator, old_logps, sampler_lp,
                        [batch["completion_mask"][m * B:(m + 1) * B] for m in range(A_steps)]))
                window_add(window, sources.metrics(rpf_all))
                window_add(window, rollout.completion_metrics(accelerator, batch["completion_mask"], out.terminated))
                if agent is not None:
                    window_add(window, agents.episode_metrics(accelerator, out))
                scored = r_all[~torch.isnan(r_all)]
                window["reward"].append(scored.mean().item() if scored.numel() else float("nan"))
                window["reward_std"].append(scored.std().item() if scored.numel() > 1 else 0.0)
                window["frac_reward_zero_std"].append(rollout.frac_zero_std(r_all, G))
                gen_tokens = distributed.gather_sum(accelerator, batch["completion_mask"].sum().item())
                window["tokens_per_second/generation"].append(gen_tokens / max(gen_time, 1e-9))
                num_tokens += gen_tokens + distributed.gather_sum(accelerator, sum(len(p) for p in p_ids) * G)
                if not sources.checked:
                    first_rewards.append(rpf_all)
                if args.log_completions_steps and gen_round % max(1, args.log_completions_steps // mu) == 0:
                    tracker.log_samples(step, [{"prompt": prompts[i], "completion": out.texts[i],
                                                **{n: rpf[i, f].item() for f, n in enumerate(sources.names)},
                                                "advantage": advantages[i].item()}
                                               for i in range(min(args.num_completions_to_log, N))])

            # ---------------------------------------------------------------- one optimizer step over the batch
            t0 = time.time()
            num_items = distributed.gather_sum(accelerator, batch["loss_mask"].sum().item())  # dapo: the whole step
            sums, trainer_lp = defaultdict(float), [None] * A_steps
            for m in range(A_steps):
                rows = slice(m * B, (m + 1) * B)
                with accelerator.accumulate(model):
                    (logps, entropy), T = sequence_logps(model, batch, rows, args.temperature, return_entropy=True)
                    mask = batch["loss_mask"][rows, :T]
                    old = old_logps[m] if old_logps[m] is not None else logps.detach()  # μ = 1: ratio exactly 1
                    ratio = importance_ratio(logps, old, mask, args.importance_sampling_level)
                    adv = advantages[rows]
                    per_token = clipped_surrogate(ratio, adv, eps_low, eps_high, args.delta)
                    if sampler_lp[m] is not None:  # detail 7: truncated importance sampling to the sampler
                        trainer_lp[m] = old
                        if args.vllm_importance_sampling_cap is not None:
                            per_token = per_token * truncated_is_weights(old, sampler_lp[m][:, :T],
                                                                         args.vllm_importance_sampling_cap)
                    if ref_model is not None:
                        kl = k3(logps, ref_logps[m])
                        per_token = per_token + args.beta * kl  # detail 5: not multiplied by ρ
                    loss = aggregate(per_token, mask, args.loss_type, num_items, args.max_new_tokens)
                    scaled = loss * (A_steps * W if args.loss_type == "dapo" else 1.0)  # detail 6
                    accelerator.backward(scaled)
                    if accelerator.sync_gradients:
                        sums["grad_norm"], stepped = distributed.optimizer_step(accelerator, model, optimizer,
                                                                                scheduler, args.max_grad_norm)
                        skipped += not stepped
                with torch.no_grad():
                    sums["loss"] += scaled.item()
                    sums["tokens"] += mask.sum().item()
                    sums["entropy"] += (entropy * mask).sum().item()
                    for k_, v in clip_fractions(ratio, adv, mask, eps_low, eps_high).items():
                        sums[f"clip_{k_}"] += v.item()
                    if ref_model is not None:
                        sums["kl"] += (kl * mask).sum().item()
            if async_ro is not None:
                async_ro.weights_updated(model, step + 1)  # push, and request the batches now allowed (detail 12)
            else:
                generator.sync_weights(model)
            if sampler_lp[0] is not None and mu == 1:
                window_add(window, rollout.sampler_gap_metrics(
                    accelerator, trainer_lp, sampler_lp,
                    [batch["completion_mask"][m * B:(m + 1) * B] for m in range(A_steps)]))

            # ---- plumbing (safe to skip): step metrics over every process, logging, checkpoints
            train_time = time.time() - t0
            tot = {k_: distributed.gather_sum(accelerator, v) for k_, v in sums.items() if k_ != "grad_norm"}
            ntok = max(tot["tokens"], 1)
            window["loss"].append(tot["loss"] / (A_steps * W))
            window["entropy"].append(tot["entropy"] / ntok)
            for k_ in ("low", "high", "region"):
                window[f"clip_ratio/{k_}_mean"].append(tot[f"clip_{k_}"] / ntok)
            if ref_model is not None:
                window["kl"].append(tot["kl"] / ntok)
            window["grad_norm"].append(sums["grad_norm"])
            window["tokens_per_second/training"].append(tot["tokens"] / max(train_time, 1e-9))
            done = step + 1
            if done % args.logging_steps == 0 or done == args.max_steps:
                if first_rewards:
                    sources.check_varies(first_rewards, accelerator.is_main_process)
                    first_rewards = []
                metrics = {k_: sum(v) / len(v) for k_, v in window.items() if v}
                metrics.update({"num_tokens": num_tokens, "learning_rate": scheduler.get_last_lr()[0],
                                "train/skipped_steps": skipped})
                window = defaultdict(list)
                if args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps):
                    metrics.update(evaluate())
                tracker.log(metrics, done, args.max_steps)
            if args.save_steps and done % args.save_steps == 0 and done % mu == 0 and done < args.max_steps:
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
