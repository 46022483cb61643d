"""GMPO: Geometric-Mean Policy Optimization.

Paper: "Geometric-Mean Policy Optimization" (Zhao et al., arXiv 2507.20673), Eq. 4 (the objective) and Sec. 4 (the
clip range). GMPO is GRPO with one change: a completion's importance weight is the geometric mean of its token ratios,
not their arithmetic mean, so one outlier token cannot dominate the update and a much wider clip range is stable.

Sampling, rewards and advantages are GRPO's (see algos/grpo.py): G completions per prompt,
A_i = (r_i - mean_g r) / (std_g r + 1e-4) (--scale_rewards group|batch|none). Then, per completion token,
    δ_t = log π_θ(y_t|.) - log π_old(y_t|.)
    δ̂_t = min(δ_t, clip(δ_t, -ε, ε_high))  if A_i > 0,   max(δ_t, clip(δ_t, -ε, ε_high))  otherwise
and per completion
    w_i = exp( Σ_t m_t δ̂_t / |y_i| )                     (the geometric mean of the clipped token ratios)
    L   = mean_i [ -A_i w_i ]  +  β · mean_i [ (1/|y_i|) Σ_t m_t k3_t ],   k3 = π_ref/π_θ - log(π_ref/π_θ) - 1
For one token, GMPO is PPO-clip with the ratio range (e^-ε, e^ε_high); with ε → ∞ it is unclipped GSPO. Defaults
ε = ε_high = 0.4 in log space, i.e. ratios in (0.67, 1.49) (paper, Sec. 4).

Implementation details (numbered so the tests and the README can point at them):
 1. Groups stay whole on one process, as in grpo.py (detail 1): each process samples
    per_device_train_batch_size * gradient_accumulation_steps / num_generations prompts, G completions each, and
    takes num_iterations optimizer steps over them in gradient_accumulation_steps micro-batches; 2 processes give
    the same update as 1 process with twice the per-device batch.
 2. Rewards and advantages are grpo.py's (details 2-3, the same code here): a sample no source scores is left out
    of its group's statistics and gets A = 0; a group whose scored rewards are all equal gets exactly A = 0; a NaN or
    inf returned by a source stops the run before any update, naming the source and the sample.
 3. The clip is in log space and one-sided by the sign of the advantage, applied per token before the mean.
    DEVIATION(paper Eq. 4): the official code clips with sgn(A) taking A = 0 into the A > 0 branch; here A = 0 takes
    the max branch (as TRL 1.16's GMPO). It does not change the loss: the term is multiplied by A.
 4. Aggregation: a mean over sequences per micro-batch (the token normalisation lives inside the geometric mean).
    Every micro-batch holds the same number of completions, so the mean of the micro-batch means (accelerate's
    accumulation, DDP's average) is the batch mean.
 5. KL: the optional k3 term is a loss term, a token mean per sequence then a mean over sequences, and is not
    multiplied by the ratio (as TRL 1.16's GMPO). The reference model is loaded only if beta > 0.
 6. With num_iterations = 1, π_old = sg(π_θ) and δ is exactly 0; with more, the old log-probs are computed once per
    generation batch, before its first optimizer step.
 7. Sampler mismatch (vLLM, or the async worker of detail 11; both return their log-probs): each completion's policy
    term is multiplied by the truncated geometric-mean importance weight
        c_i = min(exp(Σ_t m_t (log π_old - log π_sampler) / |y_i|), vllm_importance_sampling_cap),
        L = mean_i [ -A_i c_i w_i ] + β KL               (c_i detached; the KL term is not multiplied by c_i)
    so c_i w_i is the geometric mean of π_θ/π_sampler over the completion, the same normalisation GMPO gives its own
    ratio (a per-token weight has nothing to multiply: GMPO's loss has no per-token terms; the product of the token
    ratios, TRL 1.16 GRPO's 'sequence_truncate', is the unbiased weight but its variance grows with the length,
    which is what GMPO's geometric mean is there to avoid). TRL 1.16's GMPO loss applies no sampler correction (its
    parent computes the ratio; the GMPO loss does not use it). The gap is logged under TRL's sampling/* names either
    way, the applied c as sampling/sequence_is_weight/{mean,min} and sampling/sequence_is_clipped_fraction; with
    num_iterations = 1, π_old is the training forward's own (detached) log-probs, at no extra forward.
 8. --mask_truncated_completions leaves completions that did not end with EOS out of the loss; the completion mask
    comes from generation (cut after the first EOS, EOS kept), never from pad_token_id.
 9. Non-finite safety: a non-finite gradient norm skips the optimizer step (train/skipped_steps); when no reward
    varied over the first logging window, one loud warning names the sources.
10. Tools and environments (--tools / --environment / --agent_command, common/agents.py; as grpo.py detail 11):
    each completion is an episode of policy turns and tool/environment turns; the loss mask is the policy's own
    sampled tokens only (kept as sampled, no re-tokenisation), so tool and environment tokens are outside the
    geometric mean (|y_i| counts the policy's tokens) and outside the KL term. Reward functions see the decoded
    transcript; the environment's (or agent program's) summed rewards are the reward source environment_reward.
    Evaluation runs greedy episodes. max_new_tokens is per turn.
11. Asynchronous generation (--async_generation, common/async_rollout.py; as grpo.py detail 12): a worker samples
    the next generation batches while the trainer takes its optimizer steps: an HF-generate process holding its own
    copy of the policy (weights pushed through shared memory after each optimizer step), or with --use_vllm
    --vllm_mode server the server driven from a thread. Batch j (trained from version j·μ, versions counting
    optimizer steps) is requested once the trainer holds a version v with j·μ - v <= max_staleness and is sampled by
    exactly v; its staleness is checked and logged per batch (async/staleness). The worker's log-probs give detail
    7's correction. max_staleness 0 is the synchronous schedule through the worker: it starts from the trainer's RNG
    state and weights, so it draws the very samples of the synchronous path (same losses to ~1e-7). A wait longer
    than --async_timeout stops the run with an error naming the flag; a worker exception is raised with the worker's
    traceback; the worker is stopped on exit and on errors. Resume: the checkpoint keeps each rank's worker RNG
    state and the resumed worker starts from the checkpoint's weights; with max_staleness 0 a resumed run repeats
    the uninterrupted one, with k > 0 the first k batches after a resume are sampled by fresher weights (staleness
    ramps up 0, 1, .., k as at a start).

Run:
    python algos/gmpo.py                                  # toy SFT policy on toy:add, a few minutes on 2 CPU cores
    python algos/gmpo.py --num_iterations 2 --beta 0.04   # off-policy reuse and a KL to the initial policy
    python algos/gmpo.py --dataset_name toy:mul_tool --tools common.toy_agents:calc --max_new_tokens 32 --max_turns 2
    python algos/gmpo.py --dataset_name toy:guess --environment common.toy_agents:GuessEnv --max_new_tokens 3 --max_turns 5
    python algos/gmpo.py --async_generation True --max_staleness 1   # sample the next batch during the step (detail 11)
    accelerate launch --multi_gpu --num_processes 2 algos/gmpo.py --per_device_train_batch_size 32   # same update as 1 process x 64
    bash benchmarks/pg.sh                                 # 3 seeds of GRPO, GMPO, RLOO -> benchmarks/results/pg
    python benchmarks/async_grpo.py --script gmpo         # sync vs async steps/s and gold reward
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
    exp_name: str = "gmpo"
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
    """longest completion (per policy turn with --tools / --environment)"""
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
    """when the sampler returns its log-probs: multiply each completion's policy term by min(geometric mean of
    π_old/π_sampler, cap) (truncated importance sampling, detail 7); None: only log the mismatch"""
    # --- asynchronous generation (common/async_rollout.py, detail 11)
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
    # --- GMPO
    scale_rewards: str = "group"
    """advantage scale: 'group' (group std), 'batch' (std of the whole generation batch) or 'none' (Dr. GRPO)"""
    epsilon: float = 0.4
    """lower clip in log space: δ >= -epsilon, i.e. token ratio >= exp(-epsilon) (paper: 0.4)"""
    epsilon_high: float | None = None
    """upper clip in log space: δ <= epsilon_high, i.e. ratio <= exp(epsilon_high); default: epsilon"""
    beta: float = 0.0
    """weight of the k3 KL to the reference model (the initial policy); the reference is loaded only if beta > 0"""
    num_iterations: int = 1
    """μ: optimizer steps per generation batch (off-policy reuse with stored old log-probs)"""
    mask_truncated_completions: bool = False
    """leave completions that did not end with EOS out of the loss"""
    # --- tools and environments: multi-turn episodes (common/agents.py, detail 10)
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


def clipped_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                      epsilon_high: float) -> torch.Tensor:
    """δ̂ (B, T): the token log-ratio δ = ℓ - ℓ_old clipped to (-ε, ε_high) one-sided by the sign of A:
    min(δ, clip(δ)) for A > 0 (only a ratio that grew too much is cut), max(δ, clip(δ)) otherwise."""
    assert logps.shape == old_logps.shape and advantages.shape == (logps.shape[0],)
    delta = logps - old_logps
    clipped = delta.clamp(-epsilon, epsilon_high)
    return torch.where(advantages[:, None] > 0, torch.min(delta, clipped), torch.max(delta, clipped))


def geometric_mean_ratio(clipped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w (B,) = exp(Σ_t m δ̂ / |y|): the geometric mean of the clipped token ratios over the valid tokens."""
    assert clipped.shape == mask.shape
    return torch.exp((clipped * mask).sum(1) / mask.sum(1).clamp(min=1))


def sequence_is_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                        cap: float) -> torch.Tensor:
    """c (B,) = min(exp(Σ_t m (ℓ_old - ℓ_sampler) / |y|), cap): the truncated geometric mean of the token ratios
    π_old/π_sampler of each completion (detail 7); 1 for a completion without valid tokens."""
    assert old_logps.shape == sampler_logps.shape == mask.shape
    return torch.exp(((old_logps - sampler_logps) * mask).sum(1) / mask.sum(1).clamp(min=1)).clamp(max=cap)


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref): exp(ℓ_ref - ℓ) - (ℓ_ref - ℓ) - 1 >= 0. (B, T)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def gmpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float, epsilon_high: float, beta: float = 0.0, ref_logps: torch.Tensor | None = None,
              is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_i[-A_i c_i w_i] + β mean_i[token-mean k3] over a micro-batch; returns (loss, per-token k3 or None).
    logps, old_logps, ref_logps, mask: (B, T); advantages: (B,); is_weights: c (B,) of detail 7 (None: 1)."""
    assert logps.shape == mask.shape
    w = geometric_mean_ratio(clipped_log_ratio(logps, old_logps, advantages, epsilon, epsilon_high), mask)  # (B,)
    if is_weights is not None:  # detail 7: truncated importance weight to the sampler, not differentiated
        assert is_weights.shape == advantages.shape
        w = w * is_weights.detach()
    loss = (-advantages * w).mean()
    kl = None
    if beta > 0:
        kl = k3(logps, ref_logps)
        loss = loss + beta * ((kl * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()  # not multiplied by w
    return loss, kl


def log_clip_counts(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float,
                    epsilon_high: float) -> dict[str, torch.Tensor]:
    """Token counts where the log-space clip takes effect: δ < -ε with A < 0 (low), δ > ε_high with A > 0 (high),
    either (region). Divide by the mask sum for fractions."""
    adv = advantages[:, None]
    low = (log_ratio < -epsilon) & (adv < 0)
    high = (log_ratio > epsilon_high) & (adv > 0)
    return {"low": (low * mask).sum(), "high": (high * mask).sum(), "region": ((low | high) * mask).sum()}


# ----------------------------------------------------------------------------- set-up helpers
def check_args(args: Args) -> int:
    """Reject bad flag combinations before anything is loaded; returns the prompts per process and generation."""
    if args.epsilon <= 0 or (args.epsilon_high is not None and args.epsilon_high <= 0):
        raise ValueError("--epsilon and --epsilon_high are log-space clip widths and must be positive")
    if args.scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"--scale_rewards {args.scale_rewards!r}: use 'group', 'batch' or 'none'")
    if args.vllm_importance_sampling_cap is not None and args.vllm_importance_sampling_cap <= 0:
        raise ValueError(f"--vllm_importance_sampling_cap must be > 0 (or None), got "
                         f"{args.vllm_importance_sampling_cap}")
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
    ds, prompt_ids, eval_ds = load_prompts(args, tokenizer, "gmpo.py")
    agent = agents.Agent.from_args(args, tokenizer)  # None without --tools / --environment (detail 10)
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
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
    accelerator.print(f"gmpo: {len(ds)} prompts; {W} process(es) x {prompts_per_process} prompts x {G} completions per "
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
        if worker_rng is not None:  # every rank's worker RNG, where its next batch's sampling starts (detail 11)
            extra["async_rng"] = accelerator.gather(worker_rng[None].to(device)).cpu()
        checkpoint.save_checkpoint(accelerator, args.output_dir, step, model, tokenizer, args, extra,
                                   args.save_total_limit)

    def round_rows(gen_round: int) -> list[int]:  # this process's prompts of generation batch gen_round
        indices = data.batch_indices(len(ds), prompts_per_process * W, gen_round, args.seed)
        return indices[rank * prompts_per_process:(rank + 1) * prompts_per_process]

    async_ro, worker_rng = None, None
    if args.async_generation:  # detail 11: the worker samples ahead, from weights at most max_staleness steps old
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
                if async_ro is not None:  # sampled ahead by the worker, with its log-probs (detail 11)
                    out, info = async_ro.get(gen_round, step)
                    worker_rng = async_rollout.worker_rng_state(info)
                    window["async/staleness"].append(float(info["staleness"]))
                    window["async/wait_seconds"].append(info["wait"])  # the trainer waited for the worker
                    window["async/sampling_seconds"].append(info["seconds"])  # the worker sampled the batch
                elif agent is None:
                    out = generator.generate(model, p_ids, n=G)  # (N, T), row i*G + j = sample j of prompt i
                else:  # multi-turn episodes, same row layout (detail 10)
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
                        if mu > 1:  # detail 6 (with μ = 1, π_old = sg(π_θ) of the training forward)
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
            sums, trainer_lp, is_ws = defaultdict(float), [None] * A_steps, []
            for m in range(A_steps):
                rows = slice(m * B, (m + 1) * B)
                with accelerator.accumulate(model):
                    (logps, entropy), T = sequence_logps(model, batch, rows, args.temperature, return_entropy=True)
                    mask = batch["loss_mask"][rows, :T]
                    old = old_logps[m] if old_logps[m] is not None else logps.detach()  # μ = 1: δ exactly 0
                    adv = advantages[rows]
                    is_w = None
                    if sampler_lp[m] is not None:  # detail 7: truncated importance sampling to the sampler
                        trainer_lp[m] = old
                        if args.vllm_importance_sampling_cap is not None:
                            is_w = sequence_is_weights(old, sampler_lp[m][:, :T], mask,
                                                       args.vllm_importance_sampling_cap)
                            is_ws.append(is_w)
                    # detail 4: a sequence mean per micro-batch (accelerate's 1/accumulation, DDP's mean: the batch's)
                    loss, kl = gmpo_loss(logps, old, adv, mask, eps_low, eps_high, args.beta, ref_logps[m], is_w)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        sums["grad_norm"], stepped = distributed.optimizer_step(accelerator, model, optimizer,
                                                                                scheduler, args.max_grad_norm)
                        skipped += not stepped
                with torch.no_grad():
                    log_ratio = logps - old
                    valid = mask.bool()
                    sums["loss"] += loss.item()
                    sums["tokens"] += mask.sum().item()
                    sums["entropy"] += (entropy * mask).sum().item()
                    for k_, v in log_clip_counts(log_ratio, adv, mask, eps_low, eps_high).items():
                        sums[f"clip_{k_}"] += v.item()
                    if valid.any():
                        sums["log_ratio_min"] = min(sums.get("log_ratio_min", 0.0), log_ratio[valid].min().item())
                        sums["log_ratio_max"] = max(sums.get("log_ratio_max", 0.0), log_ratio[valid].max().item())
                    if kl is not None:
                        sums["kl"] += (kl * mask).sum().item()
            if async_ro is not None:
                async_ro.weights_updated(model, step + 1)  # push, and request the batches now allowed (detail 11)
            else:
                generator.sync_weights(model)
            if sampler_lp[0] is not None and mu == 1:
                window_add(window, rollout.sampler_gap_metrics(
                    accelerator, trainer_lp, sampler_lp,
                    [batch["completion_mask"][m * B:(m + 1) * B] for m in range(A_steps)]))

            # ---- plumbing (safe to skip): step metrics over every process, logging, checkpoints
            train_time = time.time() - t0
            if is_ws:  # detail 7: the weights applied, over the completions of every process
                w_all = distributed.gather_cat(accelerator, torch.cat(is_ws))
                window["sampling/sequence_is_weight/mean"].append(w_all.mean().item())
                window["sampling/sequence_is_weight/min"].append(w_all.min().item())
                window["sampling/sequence_is_clipped_fraction"].append(
                    (w_all >= args.vllm_importance_sampling_cap).float().mean().item())
            tot = {k_: distributed.gather_sum(accelerator, v) for k_, v in sums.items()
                   if k_ not in ("grad_norm", "log_ratio_min", "log_ratio_max")}
            ntok = max(tot["tokens"], 1)
            window["loss"].append(tot["loss"] / (A_steps * W))
            window["entropy"].append(tot["entropy"] / ntok)
            for k_ in ("low", "high", "region"):
                window[f"clip_ratio/{k_}_mean"].append(tot[f"clip_{k_}"] / ntok)
            if ref_model is not None:
                window["kl"].append(tot["kl"] / ntok)
            window["grad_norm"].append(sums["grad_norm"])
            if "log_ratio_min" in sums:  # this process's extremes of δ (0 on-policy)
                window["log_ratio/min"].append(sums["log_ratio_min"])
                window["log_ratio/max"].append(sums["log_ratio_max"])
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
