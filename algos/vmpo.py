"""V-MPO for language models: an E-step over the best samples and a KL-constrained weighted maximum likelihood M-step.

Paper: "V-MPO: On-Policy Maximum a Posteriori Policy Optimization for Discrete and Continuous Control" (Song et al.,
arXiv 1909.12238), adapted to sequences as a bandit (state = prompt, action = the whole completion). Per optimizer step,
over the N = B·K samples of the whole step (all processes, all accumulation micro-batches):

  advantages   A = (r - baseline) / scale           baseline: per-prompt mean, batch mean or EMA; scale: a std or 1
  E-step       D = the n = ceil(ρ N) (scored) samples with the largest A             (the paper's "top half": ρ = 0.5)
               ψ_i = exp(A_i/η) / Σ_{j∈D} exp(A_j/η) on D, 0 elsewhere, stop-gradient         (paper: ψ)
  η dual       L_η = η ε_η + η [logsumexp_{j∈D}(A_j/η) - log n]                              (paper: L_η)
               dL_η/dη = ε_η - KL(ψ ‖ uniform on D): at the optimum the weights sit ε_η away from uniform
  M-step       L_π = - Σ_i ψ_i S^θ_i                  S = sequence log-prob (sum over completion tokens, EOS kept)
  trust region L_KL = α · KL,  KL = mean_i kl_i                                                  (paper: L_α)
               α dual  L_α = α (ε_α - sg[KL]): α grows while KL > ε_α and shrinks below it
  total        L = L_π + α·KL [+ c_ref · mean_i (S^θ_i - S^ref_i)]  (the last term only with old_policy_ref)

KL estimators (`--kl_estimator`; sequence sums, so ε_α is in nats per sequence):
  old_policy      kl_i = S^old_i - S^θ_i on samples from a frozen snapshot π_old (hard copy of θ every
                  `--old_policy_sync_steps` steps): k1 estimate of KL(π_old ‖ π_θ), the paper's direction
  old_policy_ref  the same, plus the reference anchor above (default; `--ref_anchor_coef`)
  ref             kl_i = S^θ_i - S^ref_i on samples from π_θ: k1 estimate of KL(π_θ ‖ π_ref)
  behavior        kl_i = S^beh_i - S^θ_i with `behavior_logps` from an offline dataset: KL(π_beh ‖ π_θ)

Implementation choices (numbered so the tests and the README can point at them; "the fork" is the TRL fork that first
shipped V-MPO and DAR, nenuadrian/trl, `VMPOTrainer`):
 1. Samples come from π_old for the old_policy* estimators (S^old - S^θ is then an unbiased estimate of KL(π_old‖π_θ)
    with exactly that KL's gradient), from π_θ otherwise (as the fork).
 2. DEVIATION(paper L_α's policy term; the fork adds α·mean(S^θ - S^ref) and its anchor as they are): a KL estimated
    on the policy's own samples (`ref`, and the anchor of `old_policy_ref`, on samples of π_old ≈ π_θ) enters the loss
    in score-function form sg(kl_i)·S^θ_i, whose gradient is that of KL(π_θ‖π_ref); the plain k1 term S^θ - S^ref has
    zero expected gradient on the policy's own samples, so as a penalty it only adds noise.
 3. Duals are log-parameterised, η = exp(u_η), α = exp(u_α), with their own Adam (no weight decay, outside the model
    optimizer), clamped to [min, max] in log space: positive without a projection that sticks at the bound, and an
    Adam step is a relative change whatever the scale of A or the KL. One dual step per optimizer step from the
    gathered batch, so every process holds the same duals (the fork: projected SGD on η and α, once per micro-batch on
    each device's batch). ψ and the α in the loss use the values from before this step's dual update (as the paper
    and the fork).
 4. The top-n selection runs over the whole optimizer-step batch gathered across processes (the paper's learner
    batch; the fork: per device and micro-batch), so 2 processes give the update of 1 with the same global batch.
 5. The scale only divides (no re-centring), so an EMA baseline survives it (the fork's per_prompt and batch
    normalisations re-centre, which removes it). The `batch` scale is the std of the advantages after the baseline:
    with `--baseline per_prompt`, that of the per-prompt-centred advantages, as the fork and dar.py divide by (not the
    raw rewards' std); `per_prompt` divides by each prompt's std.
 6. Degenerate configurations fail at start-up (the fork runs them): K = 1 with a per-prompt baseline or scale (all
    A = 0); ε_η ≥ log n (η driven to its floor, ψ one-hot); `behavior` without behaviour log-probs. There the fork uses
    sg(S^θ): the KL *value* is exactly 0 (α decays to its floor), but the loss still holds α·mean(sg(S^θ) - S^θ), an
    α-weighted likelihood gradient on every sample. Old-policy sync every step (KL ≡ 0) warns, and so does a streak
    of near-zero KL values (as the fork).
 7. The completion mask comes from generation (cut after the first EOS, EOS kept) or from token counts, never from
    pad_token_id, so EOS is trained on even when pad == eos (the fork masks `ids != pad`).
 8. A sample no reward source scores (all returned None; offline: a null reward) is "not scored": NaN reward, out of
    every baseline and scale (NaN-aware), never selected (the top n = ceil(ρ N_scored) come from the scored samples,
    so `vmpo/selected_fraction` drops below ρ), ψ = 0, not in L_η; it still counts in the KL and the anchor, which
    need no reward. A step with nothing scored takes no η step and has no policy-loss term.
 9. The EMA baseline starts at the first step's mean reward, the fork's at 0: a shift of every advantage of a step by
    one constant, which changes neither the selection, ψ nor the η gradient (no effect on training), but the logged
    `vmpo/eta_loss` and `vmpo/reward_ema_baseline` differ from the fork's in the first steps.
10. `--per_device_train_batch_size` counts completions (TRL's meaning, as grpo.py): a micro-batch holds
    per_device_train_batch_size / K prompts (it must divide); the fork's counts prompts. Offline, K is the number of
    completions per row of the data.
11. Non-finite safety: a NaN or inf from a reward source stops the run at that step, before its update (naming the
    source and a sample); a non-finite gradient norm skips the optimizer step and the dual step with it, counted in
    `train/skipped_steps`; non-finite weights are never saved.
12. Tools and environments (online mode; --tools / --environment / --agent_command, common/agents.py, as grpo.py
    detail 11): each completion is an episode of policy turns and tool/environment turns, sampled from the sampler
    of choice 1. The sequence log-probs S (of the policy, π_old and the reference: the M-step, the KL and the
    anchor) sum over the policy's own sampled tokens only (kept as sampled, no re-tokenisation), so tool and
    environment tokens get no gradient. Reward functions see the decoded transcript; the environment's (or agent
    program's) summed rewards are the reward source environment_reward. Evaluation runs greedy episodes.
    max_new_tokens is per turn.
13. Asynchronous generation (online mode, --async_generation, common/async_rollout.py, as grpo.py detail 12): a
    worker samples the next steps' completions while the trainer takes its optimizer step: an HF-generate process
    holding its own copy of the sampler of choice 1 (π_old for the old_policy* estimators, π_θ for ref; weights
    pushed through shared memory after each optimizer step), or with --use_vllm --vllm_mode server the server driven
    from a thread. A step's completions (all its micro-batches, sampled in one call) are requested once the trainer
    holds a version v (versions count optimizer steps) with step - v <= max_staleness, and sampled by the sampler of
    exactly v; the staleness is checked and logged per step (async/staleness, async/wait_seconds,
    async/sampling_seconds). With the old_policy* estimators the sampler is the snapshot, so a lag changes what
    samples only across an old-policy sync. max_staleness 0 is the synchronous schedule through the worker: it starts
    from the trainer's RNG state and weights, so with one micro-batch per step it draws the very samples of the
    synchronous path (same losses to ~1e-6, from importance weights exp(~0)); with several, the one sampling call
    draws other (equally distributed) samples than the synchronous path's one call per micro-batch. A wait longer
    than --async_timeout stops the run with an error naming the flag; a worker exception is raised with the worker's
    traceback; the worker is stopped on exit and on errors. Resume: the checkpoint keeps each rank's worker RNG state
    and the resumed worker starts from the checkpoint's sampler weights; with max_staleness 0 a resumed run repeats
    the uninterrupted one, with k > 0 the first k steps after a resume are sampled by fresher weights (staleness ramps
    up 0, 1, .., k as at a start). Offline data and --tools / --environment / --agent_command fail at start-up.
14. DEVIATION(paper: no importance weighting, its samples come from π_old): a sampler that is not the synchronous
    schedule's π_old (the async worker's stale weights, or vLLM's numerics; both return the log-probs of the tokens
    they drew) is corrected at the level V-MPO works at, the whole completion. The E-step target is q(y) ∝ π_old(y)
    exp(A/η) on the top set; from samples of μ its self-normalised estimate is ψ_i ∝ w_i exp(A_i/η), w_i = π_old(y_i)
    / μ(y_i) = exp(Σ_t ℓ^old_t - ℓ^μ_t), truncated at --vllm_importance_sampling_cap: ψ = softmax_D(A/η + log w),
    still summing to 1 on D. The η dual estimates the same expectation, L_η = η ε_η + η [logsumexp_D(A/η + log w) -
    logsumexp_D(log w)] (dL/dη = ε_η - KL(ψ‖q_D), q_D ∝ w on D; with w ≡ 1 the uncorrected L_η). The KL and the
    anchor are expectations under π_old too: each sample's kl_i and anchor term carries w_i (so does the KL the α
    dual sees). π_old here is the snapshot (old_policy*: its log-probs are already computed, no extra cost) or, for
    ref, π_θ before the update (one more forward without gradient). Not corrected: the top-n selection (by advantage
    among the drawn samples) and the advantage statistics. Sequence-level, not token-level as grpo.py detail 7: ψ
    weighs whole completions, and a per-token weight inside a sequence log-prob has no E-step meaning; the cap bounds
    the variance of the product over tokens. The trust region alone does not make this unnecessary: the α dual
    bounds KL(π_old‖π_θ), not the gap between the sampler and π_old. The sampler-trainer gap is logged under TRL's
    sampling/* names, the sequence weights as vmpo/is_weight_mean, vmpo/is_weight_min, vmpo/is_clipped_fraction.

Defaults are the toy benchmark's (why these values: benchmarks/results/vmpo/README.md): toy-sft policy on toy:add,
64 completions (32 prompts x K = 2) per step, lr 3e-5, ε_η = 1.0, ε_α = 0.05, batch baseline and scale. The fork's
defaults are ε_η = ε_α = 0.1 and an EMA baseline with per-prompt z-scoring; its docs use lr 5e-7 on a pretrained LM.

Data (`--data_mode`): prompt-only -> online sampling and rewards from `--reward_funcs` / a reward model; preference
-> offline pairs with rewards [1, 0]; prompt-completion-reward (`completions[K]`, `rewards[K]`, optional
`behavior_logps[K]` = sequence log-probs under the sampler) -> offline, K inferred from the data.

Run:
    python algos/vmpo.py                                     # online on toy:add, gold reward
    accelerate launch algos/vmpo.py --k 2
    accelerate launch --multi_gpu --num_processes 2 algos/vmpo.py --k 4 --kl_estimator ref
    python algos/vmpo.py --data_mode preference              # offline, toy preference pairs
    python algos/vmpo.py --data_mode prompt_completion_reward --kl_estimator old_policy
    python algos/vmpo.py --reward_model_name_or_path toy-rm  # learned reward model instead of the gold reward
    python algos/vmpo.py --async_generation True --max_staleness 1   # sample the next step during this one (13)
    bash benchmarks/vmpo.sh                                  # curves over 3 seeds
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro

from common import checkpoint, data, distributed, evaluation, model as model_utils, rewards as reward_utils, rollout, tracking
from common import agents, async_rollout, peft_utils
from common.generation import build_generator
from common.sampling import Generation

KL_ESTIMATORS = ("ref", "behavior", "old_policy", "old_policy_ref")
BASELINES = ("per_prompt", "batch", "ema")
ADV_NORMS = ("per_prompt", "batch", "none")
DATA_MODES = ("auto", "online", "preference", "prompt_completion_reward")


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "vmpo"
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
    """starting policy (also the reference): 'toy-sft' (the toy SFT policy), a local folder or a hub name"""
    dataset_name: str = "toy:add"
    """'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name"""
    dataset_split: str = "train"
    """split to train on"""
    logging_steps: int = 5
    """log metrics every this many optimizer steps"""
    save_steps: int = 0
    """checkpoint every this many optimizer steps (0: only the final model)"""
    save_total_limit: int | None = 2
    """keep at most this many checkpoints"""
    resume_from: str | None = None
    """a checkpoint folder, or 'auto' for the newest complete one in output_dir"""
    overwrite_output_dir: bool = False
    """start a new run in an output_dir that holds another run's files (they are deleted first)"""
    eval_dataset_name: str | None = None
    """held-out prompts (online mode): a file, a save_to_disk folder or a hub name (split eval_split); toy datasets
    use the toy task's test split"""
    eval_split: str = "test"
    """split of eval_dataset_name (hub datasets) or of the toy task used for evaluation"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for evaluation (deterministic; never overlaps training)"""
    mixed_precision: str | None = None
    """'no', 'fp16' or 'bf16' (default: whatever `accelerate launch` configured)"""
    # --- optimisation
    learning_rate: float = 3e-5
    """Adam learning rate of the policy (use ~5e-7 for a pretrained LM)"""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to the dual variables)"""
    warmup_steps: int = 0
    """linear warm-up steps, then a constant learning rate"""
    max_steps: int = 150
    """optimizer steps"""
    per_device_train_batch_size: int = 64
    """completions per micro-batch per process (TRL's meaning): per_device_train_batch_size / K prompts (choice 10)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- data and rewards
    data_mode: str = "auto"
    """'auto' (toy: online; files: by columns), 'online' (prompts), 'preference' (offline pairs, rewards [1, 0]) or
    'prompt_completion_reward' (offline completions[K] + rewards[K], optional behavior_logps[K])"""
    reward_funcs: list[str] | None = None
    """online reward sources: 'add', 'reverse', 'file.py:fn', 'module:fn', 'model:<name or dir>'; default: the toy
    task's gold reward (none when --reward_model_name_or_path is given)"""
    reward_model_name_or_path: str | None = None
    """a one-output sequence classifier used as a reward (e.g. 'toy-rm'); added to --reward_funcs"""
    reward_weights: list[float] | None = None
    """one weight per reward source (default all 1); the reward is the weighted sum over the sources that scored the
    sample, 'not scored' (choice 8) when none did"""
    # --- sampling (same names in every online script)
    k: int = 2
    """K, completions sampled per prompt (TRL's num_generations, the fork's vmpo_k); offline it is inferred from the
    data"""
    temperature: float = 1.0
    """sampling temperature (log-probs are computed at the same temperature)"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    min_p: float | None = None
    """min-p sampling"""
    max_new_tokens: int = 8
    """longest completion (per policy turn with --tools / --environment)"""
    max_prompt_length: int = 128
    """prompts keep their last this many tokens"""
    use_vllm: bool = False
    """sample with vLLM (common/vllm_backend.py)"""
    vllm_mode: str = "colocate"
    """'colocate' or 'server'"""
    vllm_server_host: str = "127.0.0.1"
    """vLLM server host (server mode)"""
    vllm_server_port: int = 8000
    """vLLM server port (server mode)"""
    vllm_server_token_file: str | None = None
    """the token file scripts/vllm_server.py wrote (server mode); default: <cache>/vllm-server-<port>.token"""
    vllm_gpu_memory_utilization: float = 0.3
    """GPU memory share of a colocated vLLM"""
    vllm_kv_cache_gb: float = 1.0
    """KV-cache space of a CPU vLLM"""
    vllm_importance_sampling_cap: float | None = 3.0
    """when the sampler returns its log-probs (vLLM, --async_generation): each sample's E-step weight, KL and anchor
    terms carry the truncated ratio min(π_old/π_sampler, cap) of its whole completion (choice 14); None: only log
    the mismatch"""
    # --- asynchronous generation, online mode (common/async_rollout.py, choice 13)
    async_generation: bool = False
    """sample the next step's completions in a worker (an HF-generate process; with --use_vllm, the vLLM server)
    while the trainer takes its optimizer step; the sampler's log-probs give the correction of choice 14"""
    max_staleness: int = 1
    """with --async_generation: a step's completions are sampled by weights at most this many optimizer steps older
    than the sampler of the synchronous schedule (0: the synchronous schedule, through the worker)"""
    async_timeout: float = 600.0
    """seconds the trainer waits for the generation worker (a weight push or a batch) before it stops with an error"""
    async_worker_threads: int = 0
    """torch threads of the generation worker process (0: as many as the trainer uses)"""
    # --- tools and environments: multi-turn episodes, online mode (common/agents.py, choice 12)
    tools: list[str] | None = None
    """tool functions 'path/file.py:fn' or 'module:fn' (name, signature and docstring describe them); the policy
    calls them as <tool>fn(args)</tool> (or the chat template's <tool_call> JSON) and continues after the result"""
    environment: str | None = None
    """an environment class 'path/file.py:Env': reset(row) -> first observation, step(text) -> (observation | None,
    reward | None, done); its summed reward is a reward source (environment_reward)"""
    agent_command: str | None = None
    """an agent program run once per micro-batch; it plays the episodes through an OpenAI-compatible endpoint served
    from the sampling policy and reports each episode's reward (common/agents.py ExternalAgent; conversational
    prompts)"""
    agent_timeout: float = 600.0
    """seconds the agent program may take per micro-batch"""
    max_turns: int = 4
    """most policy turns per episode (max_new_tokens is per turn); an episode still going is truncated"""
    tool_timeout: float = 5.0
    """seconds a tool call may run (in a child process) before it becomes an error turn"""
    max_tool_output_chars: int = 1000
    """a tool result longer than this becomes an error turn"""
    # --- V-MPO
    topk_fraction: float = 0.5
    """ρ: share of the step's samples (highest advantage first) kept in the E-step"""
    eps_eta: float = 1.0
    """ε_η: target KL of the E-step weights from uniform over the selected samples (< log n)"""
    eps_alpha: float = 0.05
    """ε_α: KL trust-region target, in nats per sequence"""
    eta_init: float = 1.0
    """initial temperature η"""
    alpha_init: float = 1.0
    """initial KL multiplier α"""
    eta_lr: float = 0.05
    """Adam step size of log η (roughly the relative change of η per step)"""
    alpha_lr: float = 0.05
    """Adam step size of log α"""
    min_eta: float = 1e-8
    """lower bound of η"""
    max_eta: float = 100.0
    """upper bound of η"""
    min_alpha: float = 1e-8
    """lower bound of α"""
    max_alpha: float = 100.0
    """upper bound of α"""
    kl_estimator: str = "old_policy_ref"
    """'old_policy_ref', 'old_policy', 'ref' or 'behavior' (see the module docstring)"""
    old_policy_sync_steps: int = 16
    """optimizer steps between hard copies of the policy into the old-policy snapshot"""
    ref_anchor_coef: float = 0.1
    """c_ref, the reference anchor's coefficient (old_policy_ref only; 0 disables it)"""
    baseline: str = "batch"
    """advantage baseline: 'per_prompt' (mean of the prompt's K rewards), 'batch' (step mean) or 'ema'"""
    reward_ema_decay: float = 0.98
    """EMA decay of the 'ema' baseline (updated with the step's mean reward before use)"""
    adv_norm: str = "batch"
    """advantage scale: divide by the 'batch' std, the 'per_prompt' std (per_prompt baseline only) or 'none'"""
    kl_zero_tol: float = 1e-6
    """|KL| below this counts as zero"""
    kl_warning_patience: int = 20
    """consecutive near-zero KL steps before a (single) warning"""
    # --- evaluation and samples
    eval_steps: int = 25
    """held-out reward (eval/reward; eval/gold_reward on the toy tasks) every this many steps, at step 0 and at the
    end (0: start and end only)"""
    num_eval_prompts: int = 256
    """held-out prompts per evaluation (greedy decoding)"""
    log_completions_steps: int = 25
    """log a few sample completions every this many steps (0: never)"""
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
# Shapes: B prompts, K completions per prompt, N = B·K samples (row b*K + k), T completion tokens.
def combine_rewards(per_source: torch.Tensor, weights: torch.Tensor | list[float]) -> torch.Tensor:
    """(N, F) rewards with NaN where a source returned None, (F,) weights -> (N,) weighted sum over the sources that
    scored the sample; NaN (not scored, choice 8) when none did."""
    weights = torch.as_tensor(weights, dtype=per_source.dtype)
    assert per_source.dim() == 2 and weights.shape == (per_source.shape[1],)
    scored = ~torch.isnan(per_source)
    total = torch.where(scored, per_source * weights, torch.zeros_like(per_source)).sum(1)
    return torch.where(scored.any(1), total, torch.full_like(total, float("nan")))


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Biased std over the non-NaN entries (NaN where there are none)."""
    mean = torch.nanmean(x, dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim, keepdim=keepdim) if dim is not None else torch.nanmean((x - mean) ** 2)
    return var.sqrt()


def compute_advantages(rewards: torch.Tensor, baseline: str, norm: str, ema: float | None = None,
                       eps: float = 1e-6) -> torch.Tensor:
    """A = (r - baseline) / scale, rewards (B, K) -> (B, K), NaN = not scored, left out of every statistic and NaN in
    the result (choice 8). The scale only divides (choice 5): the std of the baseline-subtracted advantages, per prompt
    or over the whole step (biased), or 1. `ema` is the (already updated) EMA baseline value."""
    assert rewards.dim() == 2
    if baseline == "per_prompt":
        adv = rewards - torch.nanmean(rewards, 1, keepdim=True)
    elif baseline == "batch":
        adv = rewards - torch.nanmean(rewards)
    elif baseline == "ema":  # None: no scored sample yet, so every reward is NaN too
        adv = rewards - (ema if ema is not None else float("nan"))
    else:
        raise ValueError(f"unknown baseline '{baseline}'")
    if norm == "per_prompt":
        adv = adv / nanstd(adv, 1, keepdim=True).clamp(min=eps)
    elif norm == "batch":
        adv = adv / nanstd(adv).clamp(min=eps)
    elif norm != "none":
        raise ValueError(f"unknown adv_norm '{norm}'")
    return adv


def update_ema(ema: float | None, batch_mean: float, decay: float) -> float:
    """EMA of the step's mean reward; the first step initialises it to that mean (choice 9: the fork starts at 0). A
    step with no scored sample (batch_mean NaN) leaves it unchanged."""
    if math.isnan(batch_mean):
        return ema
    return batch_mean if ema is None else decay * ema + (1 - decay) * batch_mean


def num_selected(n: int, fraction: float) -> int:
    """n = max(1, ceil(ρ N)) of N (scored) samples; 0 when there are none."""
    return max(1, math.ceil(fraction * n)) if n > 0 else 0


def select_top(adv: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask (N,) of the ceil(ρ N_scored) largest advantages among the scored (non-NaN) ones (choice 8; ties
    broken by torch.topk)."""
    assert adv.dim() == 1
    scored = ~torch.isnan(adv)
    idx = torch.topk(adv.masked_fill(~scored, float("-inf")), num_selected(int(scored.sum()), fraction)).indices
    mask = torch.zeros_like(adv, dtype=torch.bool)
    mask[idx] = True
    return mask


def estep_weights(adv: torch.Tensor, selected: torch.Tensor, eta: float | torch.Tensor,
                  log_is: torch.Tensor | None = None) -> torch.Tensor:
    """ψ (N,): softmax(A/η) over the selected samples, 0 elsewhere (all 0 when none is selected), no gradient. With
    log_is (N,), the log importance weights log min(π_old/π_sampler, cap) of samples from another sampler (choice 14),
    softmax(A/η + log_is): the self-normalised estimate of the same target q ∝ π_old exp(A/η)."""
    assert adv.shape == selected.shape and adv.dim() == 1
    if not selected.any():
        return torch.zeros_like(adv)
    logits = adv.detach() / eta if log_is is None else adv.detach() / eta + log_is.detach()
    return torch.softmax(logits.masked_fill(~selected, float("-inf")), 0).detach()


def eta_dual_loss(eta: torch.Tensor, adv: torch.Tensor, selected: torch.Tensor, eps_eta: float,
                  log_is: torch.Tensor | None = None) -> torch.Tensor:
    """L_η = η ε_η + η [logsumexp_{j∈D}(A_j/η) - log n], A detached; dL/dη = ε_η - KL(ψ‖U_D). With log_is
    (choice 14): η ε_η + η [logsumexp_D(A/η + log_is) - logsumexp_D(log_is)], dL/dη = ε_η - KL(ψ‖q_D), q_D ∝ the
    truncated importance weights on D (U_D when they are all equal)."""
    a = adv.detach()[selected]
    if log_is is None:
        return eta * eps_eta + eta * (torch.logsumexp(a / eta, 0) - math.log(a.numel()))
    lw = log_is.detach()[selected]
    return eta * eps_eta + eta * (torch.logsumexp(a / eta + lw, 0) - torch.logsumexp(lw, 0))


def sequence_log_is_weights(target_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                            cap: float) -> torch.Tensor:
    """(N,) log min(π_old(y)/π_sampler(y), cap) of whole completions from per-token log-probs (N, T) of the sampled
    tokens under the synchronous schedule's sampler (π_old) and the sampler that drew them, and the 0/1 mask (N, T)
    of the tokens S sums over (choice 14)."""
    assert target_logps.shape == sampler_logps.shape == mask.shape and mask.dim() == 2
    return (((target_logps - sampler_logps) * mask).sum(1)).clamp(max=math.log(cap)).detach()


def alpha_dual_loss(alpha: torch.Tensor, kl: torch.Tensor | float, eps_alpha: float) -> torch.Tensor:
    """L_α = α (ε_α - sg[KL]): gradient descent raises α while KL > ε_α and lowers it below."""
    return alpha * (eps_alpha - torch.as_tensor(kl).detach())


def weights_kl_from_uniform(weights: torch.Tensor, selected: torch.Tensor) -> float:
    """KL(ψ ‖ uniform on the selected set) = Σ ψ log(ψ n); the η dual drives it to ε_η."""
    w = weights[selected]
    if w.numel() == 0:
        return float("nan")
    return (w * torch.log(w.clamp(min=1e-30) * w.numel())).sum().item()


def weights_entropy(weights: torch.Tensor) -> float:
    w = weights[weights > 0]
    return -(w * w.log()).sum().item()


def sequence_kl(estimator: str, s_policy: torch.Tensor, s_ref: torch.Tensor | None, s_old: torch.Tensor | None,
                s_beh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl value (N,), loss surrogate (N,)) of the chosen estimator; sequence log-probs (N,), s_policy with gradient.
    The surrogate has the value's value and the gradient the trust region needs (choice 2)."""
    assert s_policy.dim() == 1
    if estimator in ("old_policy", "old_policy_ref"):
        kl = s_old - s_policy  # samples from π_old: k1 of KL(π_old‖π_θ), gradient -∇S^θ is that KL's gradient
        return kl.detach(), kl
    if estimator == "behavior":
        kl = s_beh - s_policy
        return kl.detach(), kl
    if estimator == "ref":
        kl = (s_policy - s_ref).detach()
        return kl, score_function_surrogate(kl, s_policy)
    raise ValueError(f"unknown kl_estimator '{estimator}'")


def score_function_surrogate(value: torch.Tensor, s_policy: torch.Tensor) -> torch.Tensor:
    """value + value·(S^θ - sg S^θ): equals `value`, gradient value·∇S^θ (REINFORCE form of ∇KL(π_θ‖π_ref))."""
    return value.detach() + value.detach() * (s_policy - s_policy.detach())


def ref_anchor(s_policy: torch.Tensor, s_ref: torch.Tensor, coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, surrogate) per sequence of c_ref·(S^θ - S^ref) (choice 2)."""
    kl = (s_policy - s_ref).detach()
    return coef * kl, coef * score_function_surrogate(kl, s_policy)


def vmpo_loss(weights: torch.Tensor, s_policy: torch.Tensor, kl_surrogate: torch.Tensor, alpha: float,
              anchor_surrogate: torch.Tensor | None, num_global: int) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of L = -Σ ψ S^θ + α Σ kl / N + Σ anchor / N (sums over its rows, N = the step's
    sample count): summed over micro-batches and processes it is the loss of the whole step."""
    assert weights.shape == s_policy.shape == kl_surrogate.shape and weights.dim() == 1
    policy_loss = -(weights * s_policy).sum()
    kl_loss = alpha * kl_surrogate.sum() / num_global
    anchor_loss = anchor_surrogate.sum() / num_global if anchor_surrogate is not None else s_policy.new_zeros(())
    return policy_loss + kl_loss + anchor_loss, {"policy_loss": policy_loss.item(), "kl_loss": kl_loss.item(),
                                                 "ref_anchor_loss": anchor_loss.item()}


class Duals(torch.nn.Module):
    """η and α, log-parameterised (choice 3)."""

    def __init__(self, eta_init: float, alpha_init: float):
        super().__init__()
        self.log_eta = torch.nn.Parameter(torch.tensor(math.log(eta_init)))
        self.log_alpha = torch.nn.Parameter(torch.tensor(math.log(alpha_init)))

    def eta(self) -> torch.Tensor:
        return self.log_eta.exp()

    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def clamp_(self, min_eta, max_eta, min_alpha, max_alpha):
        with torch.no_grad():
            self.log_eta.clamp_(math.log(min_eta), math.log(max_eta))
            self.log_alpha.clamp_(math.log(min_alpha), math.log(max_alpha))


def dual_optimizer(duals: Duals, eta_lr: float, alpha_lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([{"params": [duals.log_eta], "lr": eta_lr},
                             {"params": [duals.log_alpha], "lr": alpha_lr}], weight_decay=0.0)


# ----------------------------------------------------------------------------- checks and data
def check_args(args: Args):
    """Flag checks that need no data or model (choice 6 continues in check_degenerate)."""
    for name, value, options in (("kl_estimator", args.kl_estimator, KL_ESTIMATORS), ("baseline", args.baseline,
                                 BASELINES), ("adv_norm", args.adv_norm, ADV_NORMS), ("data_mode", args.data_mode,
                                                                                      DATA_MODES)):
        if value not in options:
            raise ValueError(f"--{name} {value}: choose one of {options}")
    if not 0 < args.topk_fraction <= 1:
        raise ValueError(f"--topk_fraction {args.topk_fraction}: must be in (0, 1]")
    if args.eps_eta <= 0 or args.eps_alpha <= 0:
        raise ValueError("--eps_eta and --eps_alpha must be positive")
    if not (0 < args.min_eta <= args.eta_init <= args.max_eta and 0 < args.min_alpha <= args.alpha_init <= args.max_alpha):
        raise ValueError("need 0 < min_eta <= eta_init <= max_eta and 0 < min_alpha <= alpha_init <= max_alpha")
    if args.adv_norm == "per_prompt" and args.baseline != "per_prompt":
        raise ValueError(f"--adv_norm per_prompt divides by each prompt's reward std, which is 0 when its samples "
                         f"tie; with --baseline {args.baseline} those advantages blow up. Use --adv_norm batch or none "
                         f"(or --baseline per_prompt)")
    if args.old_policy_sync_steps < 1:
        raise ValueError("--old_policy_sync_steps must be >= 1")
    if args.k < 1 or args.max_steps < 1 or args.per_device_train_batch_size < 1:
        raise ValueError("--k, --max_steps and --per_device_train_batch_size must be positive")
    if args.async_generation:  # choice 13: online single-turn sampling only
        check_async(args, args.data_mode)
    if args.vllm_importance_sampling_cap is not None and args.vllm_importance_sampling_cap <= 0:
        raise ValueError(f"--vllm_importance_sampling_cap must be > 0 (or None), got "
                         f"{args.vllm_importance_sampling_cap}")
    if args.kl_estimator.startswith("old_policy") and args.old_policy_sync_steps == 1:
        warnings.warn("--old_policy_sync_steps 1 copies the policy into the old policy every step: the KL is always "
                      "0, α decays to its floor and there is no trust region")


def check_async(args: Args, mode: str):
    """--async_generation needs online, single-turn sampling (choice 13); `mode` is --data_mode or the detected one."""
    if mode in ("preference", "prompt_completion_reward"):
        raise ValueError(f"--async_generation samples completions online: drop it with offline data (--data_mode "
                         f"{mode}, or a dataset with completion columns), or train on prompt-only data")
    if args.max_staleness < 0:
        raise ValueError(f"--max_staleness must be >= 0 (optimizer steps), got {args.max_staleness}")
    if args.async_timeout <= 0:
        raise ValueError(f"--async_timeout must be > 0 seconds, got {args.async_timeout}")
    if args.tools or args.environment or args.agent_command:
        raise ValueError("--async_generation samples single-turn completions: drop it with --tools, --environment or "
                         "--agent_command")
    if args.use_vllm and args.vllm_mode != "server":
        raise ValueError("--async_generation with --use_vllm needs --vllm_mode server (a colocated engine shares the "
                         "trainer's process); or drop --use_vllm to sample in an HF-generate worker process")


def check_degenerate(args: Args, k: int, num_global: int, has_behavior: bool):
    """Start-up checks that need K and the step's sample count (choice 6)."""
    if k == 1 and (args.baseline == "per_prompt" or args.adv_norm == "per_prompt"):
        raise ValueError("K = 1 completion per prompt with a per-prompt baseline/normalisation makes every advantage "
                         "0; use --k 2 or more, or --baseline batch|ema with --adv_norm batch|none")
    n_sel = num_selected(num_global, args.topk_fraction)
    if args.eps_eta >= math.log(n_sel):
        raise ValueError(f"--eps_eta {args.eps_eta} >= log(n selected) = log({n_sel}) = {math.log(n_sel):.3f}: the "
                         f"weights can never be that far from uniform, so η is driven to its floor. Lower --eps_eta "
                         f"or select more samples (--topk_fraction, --k, batch size)")
    if args.kl_estimator == "behavior" and not has_behavior:
        raise ValueError("--kl_estimator behavior needs behaviour log-probs (a 'behavior_logps' column in a "
                         "prompt_completion_reward dataset); without them the KL is exactly 0 and the trust region "
                         "is off. Use old_policy, old_policy_ref or ref")


def check_batch(args: Args, k: int, online: bool):
    """per_device_train_batch_size counts completions: it must hold whole prompts of K completions (choice 10)."""
    b = args.per_device_train_batch_size
    if b % k:
        what = f"--k {k} (completions per prompt)" if online else f"K = {k}, the completions per row of the data"
        raise ValueError(f"--per_device_train_batch_size {b} counts completions and must be a multiple of {what}: "
                         f"use e.g. --per_device_train_batch_size {k * max(1, round(b / k))}"
                         + (" or change --k" if online else ""))


def load_rows(args: Args, tokenizer):
    """Rows of the training data and the held-out rows: (mode, K, rows, eval_ds). Online rows: {prompt, prompt_ids,
    columns}; offline rows also carry completion token lists (ending with EOS), rewards (None -> NaN, not scored:
    choice 8) and optional behaviour log-probs. eval_ds: held-out prompts (online; the toy task's test split by default),
    None offline (no reward source to score them: offline toy runs report eval/gold_reward only)."""
    kinds = {"auto": "prompt|preference|prompt_completion_reward", "online": "prompt", "preference": "preference",
             "prompt_completion_reward": "prompt_completion_reward"}[args.data_mode]
    ds, eval_ds = data.load_splits(args, kinds, "vmpo.py", toy_n=args.num_eval_prompts)
    mode = {"prompt": "online"}.get(data.detect_type(ds.column_names), data.detect_type(ds.column_names))
    if mode != "online" and (args.eval_dataset_name or args.eval_fraction):
        raise ValueError(f"--data_mode {mode} trains on logged completions and has no reward source to score "
                         "held-out completions: drop --eval_dataset_name / --eval_fraction, or train online")
    if mode != "online":
        ds, eval_ds = data.convert(ds, "prompt_completion_reward", script="vmpo.py"), None
    prompt_ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in ds["prompt"]])
    extra = [c for c in ds.column_names if c not in ("prompt", "completions", "rewards", "behavior_logps")]
    rows = [{"prompt": p, "prompt_ids": ids[-args.max_prompt_length:], "columns": {c: ds[c][i] for c in extra}}
            for i, (p, ids) in enumerate(zip(ds["prompt"], prompt_ids))]
    if mode == "online":
        return mode, args.k, rows, eval_ds
    ks = {len(c) for c in ds["completions"]}
    if len(ks) != 1 or {len(r) for r in ds["rewards"]} != ks:
        raise data.DatasetFormatError(f"{args.dataset_name}: every row needs the same number K of completions and "
                                      f"rewards; found completion counts {sorted(ks)}")
    k = ks.pop()
    for i, row in enumerate(rows):
        comps = ds["completions"][i]
        texts = [data.completion_text(row["prompt"], c, tokenizer) for c in comps]
        row["completion_ids"] = [c[:args.max_new_tokens] for c in data.tokenize(tokenizer, texts)]
        row["completion_texts"] = [c if isinstance(c, str) else c[-1]["content"] for c in comps]
        row["rewards"] = [float("nan") if r is None else float(r) for r in ds["rewards"][i]]  # null, NaN: not scored
        if any(math.isinf(r) for r in row["rewards"]):
            raise data.DatasetFormatError(f"{args.dataset_name}: column 'rewards' of row {i} holds an infinite "
                                          f"value {ds['rewards'][i]}; use finite numbers (null = not scored)")
        if "behavior_logps" in ds.column_names:
            row["behavior_logps"] = [float("nan") if b is None else float(b) for b in ds["behavior_logps"][i]]
            if not all(math.isfinite(b) for b in row["behavior_logps"]):
                raise data.DatasetFormatError(f"{args.dataset_name}: column 'behavior_logps' of row {i} holds "
                                              f"{ds['behavior_logps'][i]}; every completion needs a finite log-prob")
    return mode, k, rows, None


def generation_rows(gen: Generation, rows: slice) -> Generation:
    """Rows `rows` of a generation batch (one micro-batch of the step's completions)."""
    return dataclasses.replace(gen, completion_ids=gen.completion_ids[rows], completion_mask=gen.completion_mask[rows],
                               terminated=gen.terminated[rows], texts=gen.texts[rows],
                               sampler_logps=None if gen.sampler_logps is None else gen.sampler_logps[rows])


def sequence_logps(model, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (N,) summed over completion tokens, per-token log-probs (N, T))."""
    T = batch["completion_mask"].shape[1]
    logps = model_utils.completion_logps(model, batch["input_ids"], batch["attention_mask"], T, temperature)
    return (logps * batch["completion_mask"]).sum(1), logps


# ----------------------------------------------------------------------------- main
def main(args: Args):
    import copy

    # ---- set-up (plumbing a reader may skip: flags, data, reward sources, models, resume, tracking)
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    check_args(args)
    accelerator = distributed.make_accelerator(args)
    device, W, GA, rank = accelerator.device, accelerator.num_processes, args.gradient_accumulation_steps, \
        accelerator.process_index
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    mode, k, rows, eval_ds = load_rows(args, tokenizer)
    online = mode == "online"
    if args.async_generation:  # the data's columns may only now say it is offline (choice 13)
        check_async(args, mode)
    check_batch(args, k, online)
    agent = agents.Agent.from_args(args, tokenizer)  # None without --tools / --environment (choice 12)
    if agent is not None and not online:
        raise ValueError(f"--tools / --environment / --agent_command sample episodes: they need online mode "
                         f"(prompt-only data), not --data_mode {mode}")
    eval_prompt_ids = None if agent is None or eval_ds is None else data.tokenize(tokenizer, [
        data.prompt_text(p, tokenizer) for p in eval_ds["prompt"][:args.num_eval_prompts]])
    P = args.per_device_train_batch_size // k  # prompts per micro-batch (choice 10)
    num_global = distributed.global_batch_size(args, accelerator)  # N: completions per optimizer step, all processes
    data.check_batch_fits(len(rows), num_global // k, ["--per_device_train_batch_size / K (prompts)",
                                                       "--gradient_accumulation_steps"])
    check_degenerate(args, k, num_global, has_behavior=not online and "behavior_logps" in rows[0])
    if not online and args.k != k:
        accelerator.print(f"offline data has K = {k} completions per prompt (--k {args.k} is ignored)")
    sources = reward_utils.RewardSources(agents.reward_specs(args.reward_funcs, args.reward_model_name_or_path,
                                                             args.dataset_name, args.environment or args.agent_command),
                                         args.reward_weights, args.dataset_name, device) if online else None
    peft_utils.check_args(args)  # LoRA flags and module names, before anything is loaded or written
    # one run per folder: refuses to mix with another run's files
    resume = checkpoint.prepare_output_dir(args, may_change=("async_timeout", "async_worker_threads"))

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters, the rest frozen
    ref_model = (peft_utils.reference_model(model) if args.use_peft  # the policy with its adapters off: no copy
                 else copy.deepcopy(model).to(device).eval().requires_grad_(False))
    old_model = (copy.deepcopy(model).to(device).eval().requires_grad_(False)
                 if args.kl_estimator.startswith("old_policy") else None)
    duals = Duals(args.eta_init, args.alpha_init)
    dual_opt = dual_optimizer(duals, args.eta_lr, args.alpha_lr)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand once per optimizer step
    generator = build_generator(args, tokenizer, accelerator, model) if online else None
    sampler = old_model if old_model is not None else model  # choice 1

    state = {"ema": None, "streak": 0, "warned": False, "syncs": 0, "skipped": 0}
    start_step, elapsed, saved_rng = 0, 0.0, None
    saved_models = {"duals": duals, **({"old_policy": old_model} if old_model is not None else {})}
    if resume is not None:  # duals, their Adam, the old policy and the counters come back with the rest
        saved = checkpoint.load_checkpoint(accelerator, resume, models=saved_models, optimizers={"duals": dual_opt})
        start_step, elapsed, state = saved["step"], saved["elapsed"], {**state, **saved["vmpo_state"]}
        saved_rng = saved.get("async_rng")  # every rank's worker RNG (choice 13)
        accelerator.print(f"resumed from {resume} at step {start_step}")
    if generator is not None:
        generator.sync_weights(sampler)
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("vmpo/rewards_mean", "vmpo/kl_mean", "vmpo/eta", "vmpo/alpha", "eval/reward"))
    accelerator.print(f"vmpo: {mode} mode, {len(rows)} prompts, K = {k}, {num_global} samples per step "
                      f"({num_selected(num_global, args.topk_fraction)} selected), kl {args.kl_estimator}, "
                      f"{args.max_steps} steps -> {args.output_dir}")

    def save(step: int):  # everything --resume_from needs: duals and their Adam, EMA, counters, old policy
        extra = {"elapsed": tracker.elapsed(), "vmpo_state": dict(state)}
        if worker_rng is not None:  # every rank's worker RNG, where its next step's sampling starts (choice 13)
            extra["async_rng"] = accelerator.gather(worker_rng[None].to(device)).cpu()
        checkpoint.save_checkpoint(accelerator, args.output_dir, step, model, tokenizer, args, extra,
                                   args.save_total_limit, models=saved_models, optimizers={"duals": dual_opt})

    def step_prompts(step: int) -> list[list[int]]:  # this process's prompts of each micro-batch of a step
        indices = data.batch_indices(len(rows), num_global // k, step, args.seed)
        return [indices[(m * W + rank) * P:(m * W + rank + 1) * P] for m in range(GA)]

    async_ro, worker_rng = None, None
    if args.async_generation:  # choice 13: a worker samples ahead, from weights at most max_staleness steps old
        if args.use_vllm:
            worker = async_rollout.ThreadWorker(generator, accelerator, args.async_timeout)
        else:  # a copy of the sampler (π_old for the old_policy* estimators, choice 1), its RNG from the trainer's
            worker = async_rollout.ProcessWorker.for_policy(
                sampler, tokenizer, generator.cfg, accelerator, args.async_timeout, args.async_worker_threads,
                rng_state=saved_rng[rank] if saved_rng is not None and len(saved_rng) == W else None)
        async_ro = async_rollout.AsyncRollout(
            worker, lambda s: [rows[i]["prompt_ids"] for mb in step_prompts(s) for i in mb], k, 1, args.max_staleness,
            args.max_steps)

    def evaluate() -> dict:  # greedy completions of held-out prompts, scored by the run's reward sources
        if agent is not None:
            return agents.heldout_reward(agent, generator, model, eval_ds, sources, args.dataset_name,
                                         eval_prompt_ids, args.num_eval_prompts)
        if online:
            return evaluation.heldout_reward(model, tokenizer, eval_ds, sources, args.dataset_name,
                                             args.num_eval_prompts, args.max_new_tokens, accelerator=accelerator)
        return evaluation.heldout_gold_reward(model, tokenizer, args.dataset_name, args.num_eval_prompts,
                                              args.max_new_tokens, accelerator=accelerator)

    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    window, first_rpf = defaultdict(list), []  # per-step metrics since the last log; rewards of the first window
    try:
        if async_ro is not None:
            async_ro.start(sampler, start_step)  # the first steps' completions are sampled during the evaluation
        if start_step == 0 and (first := evaluate()):
            tracker.log(first, 0, args.max_steps)
        model.train()
        for step in range(start_step, args.max_steps):
            done = step + 1
            micro = step_prompts(step)  # this process's prompts, per micro-batch

            # ---- 1. generate: K completions per prompt from the sampler (online) or the data's; frozen log-probs
            mbs, step_gen = [], None
            if async_ro is not None:  # sampled ahead by the worker, with its log-probs (choice 13)
                step_gen, info = async_ro.get(step, step)
                worker_rng = async_rollout.worker_rng_state(info)
                window_add(window, {"async/staleness": float(info["staleness"]), "async/wait_seconds": info["wait"],
                                    "async/sampling_seconds": info["seconds"]})
            for m_idx, mb in enumerate(micro):
                if agent is not None:  # multi-turn episodes, same row layout (choice 12)
                    gen = agent.rollout(generator, sampler, [rows[i]["prompt_ids"] for i in mb],
                                        [{"prompt": rows[i]["prompt"], **rows[i]["columns"]} for i in mb], k)
                    c_ids = rollout.completion_id_lists(gen.completion_ids, gen.completion_mask)
                    texts, terminated, r, s_beh = gen.texts, gen.terminated, None, None
                elif step_gen is not None:  # micro-batch m_idx: rows m_idx*P*K .. of the step's batch
                    gen = generation_rows(step_gen, slice(m_idx * P * k, (m_idx + 1) * P * k))
                    c_ids = rollout.completion_id_lists(gen.completion_ids, gen.completion_mask)
                    texts, terminated, r, s_beh = gen.texts, gen.terminated, None, None
                elif online:
                    gen = generator.generate(sampler, [rows[i]["prompt_ids"] for i in mb], n=k)
                    c_ids = rollout.completion_id_lists(gen.completion_ids, gen.completion_mask)  # EOS kept (choice 7)
                    texts, terminated, r, s_beh = gen.texts, gen.terminated, None, None
                else:
                    gen, c_ids = None, [c for i in mb for c in rows[i]["completion_ids"]]
                    texts = [t for i in mb for t in rows[i]["completion_texts"]]
                    terminated = torch.tensor([len(c) > 0 and c[-1] == eos_id for c in c_ids])
                    r = torch.tensor([x for i in mb for x in rows[i]["rewards"]])
                    s_beh = (torch.tensor([x for i in mb for x in rows[i]["behavior_logps"]], device=device)
                             if "behavior_logps" in rows[mb[0]] else None)
                batch = data.batch_prompt_completion([rows[i]["prompt_ids"] for i in mb for _ in range(k)], c_ids,
                                                     pad_id)
                batch = {key: v.to(device) for key, v in batch.items()}  # completion mask from token counts (choice 7)
                if agent is not None:  # S sums over the policy's own tokens: tool and environment tokens not trained
                    batch["completion_mask"] = batch["completion_mask"] * gen.policy_mask.to(device)
                with torch.no_grad():
                    s_ref, _ = sequence_logps(ref_model, batch, args.temperature)
                    s_old, old_tok = (sequence_logps(old_model, batch, args.temperature) if old_model is not None
                                      else (None, None))
                    log_is = None  # choice 14: drawn by a sampler other than the synchronous schedule's π_old
                    cap = args.vllm_importance_sampling_cap
                    if gen is not None and gen.sampler_logps is not None and cap is not None:
                        target = old_tok if old_tok is not None else sequence_logps(model, batch, args.temperature)[1]
                        log_is = sequence_log_is_weights(target, gen.sampler_logps[:, :target.shape[1]].to(device),
                                                         batch["completion_mask"].float(), cap)
                mbs.append({"mb": mb, "batch": batch, "ids": c_ids, "texts": texts, "terminated": terminated,
                            "rewards": r, "s_ref": s_ref, "s_old": s_old, "old_tok": old_tok, "s_beh": s_beh,
                            "gen": gen, "log_is": log_is})

            # ---- 2. score: (N_local, F) rewards per source, NaN = not scored (choice 8); a NaN or inf from a source
            # stops the run here, before any update. Gathered over processes: (B_global, K)
            if online:
                for m in mbs:
                    prompts = [rows[i]["prompt"] for i in m["mb"] for _ in range(k)]
                    cols = {c: [rows[i]["columns"][c] for i in m["mb"] for _ in range(k)] for c in rows[0]["columns"]}
                    if agent is not None:
                        cols["env_reward"] = m["gen"].env_rewards
                    m["rpf"] = sources(prompts, rollout.as_completions(prompts, m["texts"]), m["ids"], cols)
                    m["rewards"] = combine_rewards(m["rpf"], sources.weights)
                rpf_all = distributed.gather_cat(accelerator, torch.cat([m["rpf"] for m in mbs]).to(device)).cpu()
            local_r = torch.cat([m["rewards"] for m in mbs]).float()
            all_r = distributed.gather_cat(accelerator, local_r.to(device)).cpu().view(-1, k)

            # ---- 3. targets: advantages, the top-n E-step and ψ over the whole step's batch (choices 4, 5, 8)
            if args.baseline == "ema":
                state["ema"] = update_ema(state["ema"], torch.nanmean(all_r).item(), args.reward_ema_decay)
            adv = compute_advantages(all_r, args.baseline, args.adv_norm, state["ema"]).flatten()  # (N,)
            selected = select_top(adv, args.topk_fraction)
            eta_now, alpha_now = duals.eta().item(), duals.alpha().item()
            log_is = (distributed.gather_cat(accelerator, torch.cat([m["log_is"] for m in mbs])).cpu()
                      if mbs[0]["log_is"] is not None else None)  # (N,) choice 14
            psi = estep_weights(adv, selected, eta_now, log_is)
            local_psi = psi[rank * local_r.numel():(rank + 1) * local_r.numel()].to(device)

            # ---- 4. update: weighted maximum likelihood + α·KL (+ reference anchor), one backward per micro-batch
            st, pos = defaultdict(float), 0
            for m in mbs:
                batch, n_mb = m["batch"], len(m["ids"])
                w = local_psi[pos:pos + n_mb]
                pos += n_mb
                with accelerator.accumulate(model):
                    s_pol, tok = sequence_logps(model, batch, args.temperature)
                    kl_val, kl_sur = sequence_kl(args.kl_estimator, s_pol, m["s_ref"], m["s_old"], m["s_beh"])
                    _, anchor_sur = (ref_anchor(s_pol, m["s_ref"], args.ref_anchor_coef)
                                     if args.kl_estimator == "old_policy_ref" else (None, None))
                    if m["log_is"] is not None:  # choice 14: importance-weighted estimates of the KL and the anchor
                        is_w = m["log_is"].exp()
                        kl_val, kl_sur = kl_val * is_w, kl_sur * is_w
                        anchor_sur = anchor_sur * is_w if anchor_sur is not None else None
                    loss, parts = vmpo_loss(w, s_pol, kl_sur, alpha_now, anchor_sur, num_global)
                    # accelerate divides by the accumulation steps and DDP averages over processes; undo both so the
                    # summed micro-batch losses give exactly the gradient of the whole step's loss
                    accelerator.backward(loss * GA * W)
                    if accelerator.sync_gradients:  # a non-finite gradient norm skips the step (choice 11)
                        st["grad_norm"], stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                                              args.max_grad_norm)
                        state["skipped"] += not stepped
                with torch.no_grad():
                    cm = batch["completion_mask"].float()
                    for key, v in parts.items():
                        st[key] += v
                    sampler_s = (m["s_old"] if m["s_old"] is not None
                                 else (m["s_beh"] if m["s_beh"] is not None else s_pol))
                    for key, v in (("kl", kl_val), ("s_policy", s_pol), ("s_ref", m["s_ref"]), ("s_old", sampler_s),
                                   ("len", cm), ("neg_logp", -(tok * cm))):
                        st[key] += v.sum().item()
                    m["trainer_tok"] = m["old_tok"] if m["old_tok"] is not None else tok.detach()  # the sampler's, here
            tot = {key: distributed.gather_sum(accelerator, v) for key, v in st.items() if key != "grad_norm"}

            # duals: one step on L_η + L_α from the global batch (choices 3, 8)
            kl_mean = tot["kl"] / num_global
            dual_opt.zero_grad()
            eta_loss = eta_dual_loss(duals.eta(), adv, selected, args.eps_eta, log_is) if selected.any() else None
            alpha_loss = alpha_dual_loss(duals.alpha(), kl_mean, args.eps_alpha)
            if stepped:  # a skipped step leaves the duals as they were too (choice 11)
                (alpha_loss + eta_loss if eta_loss is not None else alpha_loss).backward()
                dual_opt.step()
                duals.clamp_(args.min_eta, args.max_eta, args.min_alpha, args.max_alpha)
            state["streak"] = state["streak"] + 1 if abs(kl_mean) <= args.kl_zero_tol else 0
            if state["streak"] >= args.kl_warning_patience and not state["warned"]:
                state["warned"] = True
                warnings.warn(f"the KL ({args.kl_estimator}) has been below {args.kl_zero_tol} for {state['streak']} "
                              f"steps: the trust region is inactive (old-policy sync too frequent, or no behaviour "
                              f"log-probs?)")
            # old-policy snapshot: hard copy every old_policy_sync_steps optimizer steps
            if old_model is not None and done % args.old_policy_sync_steps == 0:
                old_model.load_state_dict(distributed.full_state_dict(accelerator, model))  # gathered: ZeRO-3, FSDP2
                state["syncs"] += 1
            if async_ro is not None:
                async_ro.weights_updated(sampler, done)  # push, and request the step now allowed (choice 13)
            elif generator is not None and (old_model is None or done % args.old_policy_sync_steps == 0):
                generator.sync_weights(sampler)

            # ---- 5. log: means over the steps since the last log (NaN-aware), counters and duals at their value now
            sel_adv = adv[selected]
            lens = torch.tensor([len(c) for m in mbs for c in m["ids"]])
            window_add(window, rollout.completion_metrics(accelerator,
                                                          torch.arange(int(lens.max()))[None] < lens[:, None],
                                                          torch.cat([m["terminated"] for m in mbs])))
            if any(m["gen"] is not None and m["gen"].sampler_logps is not None for m in mbs):  # gap to the trainer
                window_add(window, rollout.sampler_gap_metrics(accelerator, [m["trainer_tok"] for m in mbs],
                                                               [m["gen"].sampler_logps for m in mbs],
                                                               [m["batch"]["completion_mask"] for m in mbs]))
            if log_is is not None:
                w_is = log_is.exp()
                window_add(window, {"vmpo/is_weight_mean": w_is.mean().item(), "vmpo/is_weight_min": w_is.min().item(),
                                    "vmpo/is_clipped_fraction": (log_is >= math.log(args.vllm_importance_sampling_cap)
                                                                 ).float().mean().item()})
            if agent is not None:
                for m in mbs:
                    window_add(window, agents.episode_metrics(accelerator, m["gen"]))
            if online:
                window_add(window, sources.metrics(rpf_all))
                first_rpf = first_rpf + [rpf_all] if first_rpf is not None else None
            window_add(window, {
                "vmpo/rewards_mean": torch.nanmean(all_r).item(), "vmpo/rewards_std": nanstd(all_r).item(),
                "vmpo/advantages_mean": torch.nanmean(adv).item(), "vmpo/advantages_std": nanstd(adv).item(),
                "vmpo/top_advantages_mean": sel_adv.mean().item() if sel_adv.numel() else float("nan"),
                "vmpo/top_advantages_std": sel_adv.std(unbiased=False).item() if sel_adv.numel() > 1 else 0.0,
                "vmpo/weights_entropy": weights_entropy(psi),
                "vmpo/weights_kl_uniform": weights_kl_from_uniform(psi, selected),
                "vmpo/selected_fraction": selected.float().mean().item(),
                "vmpo/scored_fraction": (~torch.isnan(all_r)).float().mean().item(),
                "vmpo/eta_loss": eta_loss.item() if eta_loss is not None else float("nan"),
                "vmpo/kl_mean": kl_mean, "vmpo/logps_policy": tot["s_policy"] / num_global,
                "vmpo/logps_ref": tot["s_ref"] / num_global, "vmpo/logps_old": tot["s_old"] / num_global,
                "vmpo/policy_loss": tot["policy_loss"], "vmpo/kl_loss": tot["kl_loss"],
                "vmpo/ref_anchor_loss": tot["ref_anchor_loss"],
                "vmpo/loss": tot["policy_loss"] + tot["kl_loss"] + tot["ref_anchor_loss"],
                "vmpo/reward_ema_baseline": state["ema"] if state["ema"] is not None else torch.nanmean(all_r).item(),
                "kl_ref": (tot["s_policy"] - tot["s_ref"]) / num_global,
                "entropy": tot["neg_logp"] / max(tot["len"], 1), "grad_norm": st["grad_norm"],
            })
            if done % args.logging_steps == 0 or done == args.max_steps:
                if online and first_rpf is not None:  # one loud warning when no reward varied at all
                    sources.check_varies(first_rpf, accelerator.is_main_process)
                    first_rpf = None
                out = {key: (sum(v) / len(v) if v else float("nan")) for key, v in window.items()}
                out.update({"vmpo/eta": eta_now, "vmpo/alpha": alpha_now, "vmpo/near_zero_kl_streak": state["streak"],
                            "vmpo/old_policy_syncs": state["syncs"], "train/skipped_steps": state["skipped"],
                            "learning_rate": scheduler.get_last_lr()[0]})
                window = defaultdict(list)
                if done == args.max_steps or (args.eval_steps and done % args.eval_steps == 0):
                    out.update(evaluate())
                tracker.log(out, done, args.max_steps)
            if args.log_completions_steps and done % args.log_completions_steps == 0:
                m = mbs[0]
                tracker.log_samples(done, [{"prompt": str(rows[m["mb"][j // k]]["prompt"]), "completion": m["texts"][j],
                                            "reward": m["rewards"][j].item()} for j in range(min(4, len(m["texts"])))])
            if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
                save(done)
    finally:
        if async_ro is not None:
            async_ro.close()

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir, args.max_steps)
    if args.save_steps:
        save(args.max_steps)
    tracker.close()
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


def window_add(window: dict, metrics: dict):
    """Add one step's metrics to the logging window; NaN values (undefined this step) are left out."""
    for key, v in metrics.items():
        if not math.isnan(v):
            window[key].append(v)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
