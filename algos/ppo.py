"""PPO for RLHF: a policy, a value model, a per-token KL penalty to the reference and a reward model's score at the end.

Papers: "Proximal Policy Optimization Algorithms" (Schulman et al., arXiv 1707.06347, Eq. 7 clipped surrogate, Eq. 9
combined loss); "High-Dimensional Continuous Control Using Generalized Advantage Estimation" (Schulman et al., arXiv
1506.02438, Eq. 16); "Fine-Tuning Language Models from Human Preferences" (Ziegler et al., arXiv 1909.08593, Eq. 2
KL-shaped reward and the adaptive KL controller); "The N+ Implementation Details of RLHF with PPO: A Case Study on
TL;DR Summarization" (Huang et al., arXiv 2403.17031), whose numbered-details style this docstring follows.

Per rollout: sample one completion y per prompt x from π_θ (the old policy π_old of this rollout), then per
completion token t (m_t = 1 on real tokens, the stop token included):
    kl_t   = ℓ^old_t - ℓ^ref_t  (k1)   or   exp(ℓ^ref_t - ℓ^old_t) - 1 - (ℓ^ref_t - ℓ^old_t)  (k3)
    rew_t  = -β kl_t  +  [t = last token] · score(x, y)                                        (Ziegler Eq. 2)
    δ_t    = rew_t + γ V_old(s_{t+1}) - V_old(s_t),  V after the last token = 0
    Â_t    = δ_t + γλ Â_{t+1}   (GAE),   G_t = Â_t + V_old(s_t)   (value targets),   Â whitened over valid tokens
Update: num_ppo_epochs passes over the rollout, each in num_mini_batches mini-batches (one optimizer step each):
    ρ_t    = exp(ℓ^θ_t - ℓ^old_t)
    L_pg   = Σ m · max(-Â ρ, -Â clip(ρ, 1-ε, 1+ε)) / N_tok                                    (PPO Eq. 7)
    L_V    = ½ Σ m · max((V - G)², (clip(V, V_old - ε_V, V_old + ε_V) - G)²) / N_tok
    L      = L_pg + vf_coef · L_V        N_tok = valid tokens of the whole mini-batch (every micro-batch and process)
Here ℓ = log softmax(logits / τ)[y_t] for every model (τ = the sampling temperature), and the KL is a reward
penalty, not a loss term.

Implementation details (numbered so tests and the README can point at them; "test_dN_..." tests detail N):
 1. Models. Policy π_θ (trained), reference π_ref = the initial policy (frozen), reward model (frozen) and a separate
    value model V_φ: a sequence classifier whose one-output head is applied at every position. V_φ starts from the
    reward model (backbone and head; `--value_model_name_or_path` overrides), or, with `--reward_funcs`, from the
    policy with a fresh head initialised to zero (every value starts at 0). Policy and value model are trained as
    one module (PolicyAndValue, as TRL does): one forward gives both models' outputs, one AdamW with a parameter
    group per model (each its own learning rate), one gradient-norm clip over both. Prepared once, so DeepSpeed (one
    engine per run) and FSDP2 shard both models, and every distributed mode runs the same update.
 2. Dropout off: every forward runs in eval mode, so the rollout and the update compute the same function.
 3. Sampling at temperature τ (top-k off, top-p 1 by default: the sampled distribution is the one the log-probs
    describe, and the k1 KL is not biased negative). The old, reference and trained log-probs all divide the logits
    by the same τ.
 4. Truncation: a completion ends at its first stop token (`--stop_token_id`, default EOS), which is kept and
    trained on; every token after it becomes padding (the mask comes from the stop token, never from pad_token_id,
    so pad == eos is safe). "Terminated" = a stop token occurred within max_new_tokens.
 5. Scoring. The reward model reads the truncated [prompt | completion] *token ids of the policy* and its score is
    the head output at the last real token (the stop token when there is one). No re-tokenisation, as in TRL and
    the paper, so the reward model (and the value model) must share the policy's tokenizer: same vocabulary and
    the same EOS/BOS ids, checked at start-up. A reward model with another tokenizer can be used as a reward
    function instead (`--reward_funcs model:<name>` decodes the completion and re-tokenises the text with the reward
    model's own tokenizer; the value model then starts from the policy). Rule-based rewards (`--reward_funcs`, TRL's
    calling convention) give score = Σ_f w_f r_f over the functions that scored the sample.
 6. `--missing_eos_penalty p`: score -= p for a completion without a stop token (TRL's form of the paper's "EOS
    trick", which pushes truncated completions below any finished one).
 7. Score position. The score is added to rew_t at the last real token: the action that completed the text is the
    one the score judges, and the value after it is 0. DEVIATION(TRL): TRL adds it one position later (a padding
    position that only the value loss sees), which discounts the score by one more γλ and trains V on a state no
    action is taken from. The paper and verl add it at the last token, as here.
 8. KL estimator: k1 (default) or k3 per token, on the rollout's tokens (samples from π_old = the policy that
    sampled them). objective/kl = mean over completions of Σ_t kl_t.
 9. Adaptive KL controller (Ziegler et al. 2019, Sec. 2.2), on with `--kl_target`: after each rollout
    β ← β · (1 + clip(KL / KL_target - 1, -0.2, 0.2) · n / horizon), KL = objective/kl of that rollout, n = its number
    of completions (all processes). β lives in the checkpoint, so a resumed run continues with the adapted value.
10. `--whiten_rewards`: the per-token rewards are rescaled to unit std over the valid tokens of the rollout, keeping
    their mean, (r - mean) / std + mean, as TRL's whiten_rewards.
11. GAE runs backwards over each completion with V = 0 after its last token; the value targets are G = Â + V_old,
    taken before the advantages are whitened.
12. Advantage whitening: (Â - mean) / sqrt(var + 1e-8) over every valid token of the rollout (Bessel-corrected var),
    once per rollout, before the epochs.
13. The rollout is shared: every process holds the whole rollout (all processes' completions, their scores and
    per-token statistics). Each epoch draws a fresh permutation of it (a function of seed, rollout and epoch: the
    same on every process, and reproduced on resume); mini-batch j is the j-th block of M = per_device_batch ·
    processes · grad_accumulation completions, and process r takes micro-batch rows like distributed.micro_batches.
    Statistics (whitening, β's KL, metrics) are over the whole rollout, so 2 processes = 1 process with twice the
    per-device batch, and gradient accumulation = one bigger micro-batch. DEVIATION(TRL): TRL shuffles and whitens
    per process.
14. The rollout's forward passes (old log-probs, reference log-probs, values, reward-model scores) run on exactly the
    micro-batches of the first epoch. So in the first mini-batch of the first epoch the trained log-probs are
    bitwise the old ones: ρ = 1 exactly, nothing is clipped, and with one mini-batch L_pg = -mean Â = 0.
15. Loss aggregation: the token mean over the whole mini-batch (N_tok counts every micro-batch and process), for the
    policy and the value loss alike. With one micro-batch this is TRL's masked_mean; DEVIATION(TRL) otherwise (TRL
    averages per-micro-batch means, which changes with the micro-batch split).
16. Clipped value loss: ½ max((V - G)², (V_clip - G)²), V_clip = V_old + clip(V - V_old, ±cliprange_value), weighted
    by vf_coef. The value model has its own parameters (detail 1), so vf_coef scales only the value gradient, which
    Adam mostly normalises away; it matters through the shared gradient clip and Adam's ε.
17. Each optimizer step clips the gradient norm over both models (max_grad_norm; logged as grad_norm) and is skipped
    when that norm is not finite (distributed.optimizer_step; logged as train/skipped_steps).
18. Bad reward values stop the run before any update: a NaN/inf from a reward function (rewards.RewardSources) or
    from the reward model. A completion that no reward function scores (all None) has no score: it is left out of
    the losses, the whitening and the score metrics (its mask is zeroed), never scored 0.
19. Metrics have TRL's PPOTrainer names. objective/*: over the rollout's completions; policy/*, loss/*, val/ratio,
    val/ratio_var, val/clipfrac_avg: token-weighted over every epoch and mini-batch of the update (all processes);
    val/ratio_var is the variance of ρ over those tokens (TRL: over per-micro-batch means); val/num_eos_tokens counts
    the stop tokens in the rollout's truncated completions, all processes.
20. Held-out evaluation (eval/reward, eval/rewards/*, and eval/gold_reward on the toy tasks): greedy completions of
    the eval prompts (--eval_dataset_name, --eval_fraction, or the toy test split) scored by the same reward sources
    as training; there the reward model reads decoded text re-tokenised with its own (identical) tokenizer.

Batch arithmetic (TRL's): per_device_train_batch_size completions per micro-batch per process; one optimizer step per
mini-batch of per_device_train_batch_size * processes * gradient_accumulation_steps completions; a rollout holds
num_mini_batches mini-batches and gives num_ppo_epochs * num_mini_batches optimizer steps. A "step" of max_steps,
logging_steps, save_steps and eval_steps is one rollout (TRL: one "update"). num_generations completions per prompt
(default 1, as TRL) must divide the per-process rollout.

Toy defaults: toy-sft policy on toy:add prompts, reward model and value model from toy-rm, 64 completions per rollout,
150 rollouts (the same start policy and 9600 samples as the GRPO/RLOO runs of benchmarks/pg.sh), 4 epochs, β 0.05.

Run:
    python algos/ppo.py                                        # toy SFT policy, toy reward model
    python algos/ppo.py --reward_funcs add                     # the gold reward; value model from the policy
    python algos/ppo.py --kl_target 0.5 --kl_horizon 2000      # adaptive β
    accelerate launch --multi_gpu --num_processes 2 algos/ppo.py --per_device_train_batch_size 32  # = 1 process x 64
    accelerate launch --config_file configs/accelerate/zero3.yaml algos/ppo.py --per_device_train_batch_size 32
    python algos/ppo.py --use_vllm True                        # sample with vLLM
    bash benchmarks/ppo.sh                                     # 3 seeds, reward model and gold reward
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
from accelerate.utils import gather_object

from common import checkpoint, data, distributed, evaluation, model as model_utils, rewards as reward_utils
from common import peft_utils, rollout, tracking
from common.generation import build_generator

KL_ESTIMATORS = ("k1", "k3")


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "ppo"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (data order, sampling, mini-batch shuffles)"""
    run_name: str | None = None
    """run name; default '{exp_name}__{dataset}__{seed}__{unix time}'"""
    output_dir: str | None = None
    """where metrics, checkpoints and the final policy go; default runs/{run_name}"""
    overwrite_output_dir: bool = False
    """start a new run in an output_dir that holds another run's files (they are deleted first)"""
    track: bool = False
    """mirror metrics to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "cleanalign"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team)"""
    model_name_or_path: str = "toy-sft"
    """starting policy (also the reference): 'toy-sft' (the toy SFT policy), a local folder or a hub name"""
    dataset_name: str = "toy:add"
    """prompt-only data: 'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk
    folder or a hub name (extra columns are passed to the reward functions)"""
    dataset_split: str = "train"
    """split to train on"""
    eval_dataset_name: str | None = None
    """held-out data: a file, a save_to_disk folder or a hub name (split eval_split)"""
    eval_split: str = "test"
    """split of eval_dataset_name"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for evaluation (deterministic; never overlaps training)"""
    logging_steps: int = 5
    """log metrics every this many rollouts (averaged over the rollouts since the last log)"""
    save_steps: int = 0
    """checkpoint every this many rollouts (0: only the final policy)"""
    save_total_limit: int | None = 2
    """keep at most this many checkpoints"""
    resume_from: str | None = None
    """a checkpoint folder, or 'auto' for the newest complete one in output_dir"""
    mixed_precision: str | None = None
    """'no', 'fp16' or 'bf16' (default: whatever `accelerate launch` configured)"""
    # --- optimisation
    learning_rate: float = 3e-5
    """policy AdamW learning rate (the toy policy is tiny; ~1e-6 to 3e-6 for a pretrained LM, as in the paper)"""
    value_learning_rate: float | None = None
    """learning rate of the value model's parameter group; default: learning_rate"""
    weight_decay: float = 0.0
    """AdamW weight decay (both models)"""
    warmup_steps: int = 0
    """linear warm-up over this many optimizer steps, then constant (both models)"""
    max_steps: int = 150
    """rollouts (each gives num_ppo_epochs * num_mini_batches optimizer steps)"""
    per_device_train_batch_size: int = 64
    """completions per micro-batch per process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step (per mini-batch)"""
    num_mini_batches: int = 1
    """mini-batches (optimizer steps) per epoch over a rollout"""
    num_ppo_epochs: int = 4
    """passes over each rollout"""
    max_grad_norm: float = 1.0
    """gradient clipping of the norm over both models' gradients (0 to disable)"""
    # --- sampling (common/generation.py)
    num_generations: int = 1
    """completions per prompt"""
    temperature: float = 1.0
    """sampling temperature; the old, reference and trained log-probs use the same temperature (TRL: 0.7)"""
    top_p: float = 1.0
    """nucleus sampling (1: off)"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    min_p: float | None = None
    """min-p sampling"""
    max_new_tokens: int = 8
    """longest completion (TRL's response_length)"""
    max_prompt_length: int | None = 256
    """prompts longer than this keep their last tokens"""
    stop_token_id: int | None = None
    """completions end at the first occurrence of this token; default: the tokenizer's EOS"""
    use_vllm: bool = False
    """sample with vLLM (common/vllm_backend.py) instead of HF generate"""
    vllm_mode: str = "colocate"
    """'colocate' (in-process) or 'server'"""
    vllm_server_host: str = "127.0.0.1"
    """vLLM server host (server mode)"""
    vllm_server_port: int = 8000
    """vLLM server port (server mode)"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory vLLM may take (colocate)"""
    vllm_kv_cache_gb: float = 1.0
    """CPU KV-cache space for vLLM on CPU"""
    # --- rewards and the value model
    reward_model_name_or_path: str | None = None
    """the reward model (a one-output sequence classifier with the policy's tokenizer); default 'toy-rm' unless
    --reward_funcs is given"""
    reward_funcs: list[str] | None = None
    """reward functions instead of a reward model: 'add'/'reverse' (toy gold rewards), 'path/file.py:fn',
    'module:fn', 'model:<name or dir>' (a reward model scored on re-tokenised text)"""
    reward_weights: list[float] | None = None
    """one weight per reward function; default all 1"""
    value_model_name_or_path: str | None = None
    """initial value model (a sequence classifier with the policy's tokenizer); default: the reward model, or the
    policy with a zero-initialised head when --reward_funcs is given"""
    missing_eos_penalty: float | None = None
    """subtract this from the score of a completion without a stop token"""
    # --- PPO
    beta: float = 0.05
    """KL penalty coefficient in the per-token reward (TRL's kl_coef); the initial value with --kl_target"""
    kl_estimator: str = "k1"
    """per-token KL estimator of the reward penalty: 'k1' or 'k3'"""
    kl_target: float | None = None
    """adaptive KL controller (Ziegler et al. 2019): target of objective/kl (nats per completion); None: fixed beta"""
    kl_horizon: int = 10000
    """adaptive KL controller horizon, in completions"""
    whiten_rewards: bool = False
    """scale the per-token rewards by their std over the rollout (mean kept)"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE λ"""
    cliprange: float = 0.2
    """policy ratio clip ε"""
    cliprange_value: float = 0.2
    """value clip ε_V around the rollout's values"""
    vf_coef: float = 0.1
    """value loss coefficient"""
    # --- evaluation and logging
    eval_steps: int = 25
    """held-out gold reward every this many rollouts (and at step 0 and at the end); 0: never"""
    num_eval_prompts: int = 256
    """held-out prompts (greedy decoding)"""
    log_completions_steps: int = 25
    """write sample completions with their scores every this many rollouts (0: never)"""
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
# Shapes: N completions in a rollout, B in a micro-batch, T completion tokens. Masks are 0/1 floats over completion
# tokens (stop token included). Per-token tensors hold 0 at padding.
def truncate_after_stop(ids: torch.Tensor, stop_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """(N, T) sampled ids -> (ids with every token after the first stop token set to pad_id, mask (N, T) 0/1 up to
    and including that stop token, terminated (N,) bool: a stop token occurred). Detail 4."""
    is_stop = ids == stop_id
    terminated = is_stop.any(1)
    first = torch.where(terminated, is_stop.float().argmax(1), torch.full_like(terminated, ids.shape[1],
                                                                                dtype=torch.long))
    mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] <= first[:, None]).long()
    return torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)), mask, terminated


def apply_missing_eos_penalty(scores: torch.Tensor, terminated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """score - penalty for completions without a stop token (N,). Detail 6."""
    if penalty is None:
        return scores
    return torch.where(terminated, scores, scores - penalty)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) on samples of π: k1 = ℓ - ℓ_ref, k3 = exp(ℓ_ref - ℓ) - 1 - (ℓ_ref - ℓ).
    (N, T). Detail 8."""
    log_r = ref_logps - logps
    if estimator == "k1":
        return -log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"--kl_estimator {estimator!r}: use one of {KL_ESTIMATORS}")


def per_token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """rew_t = -β kl_t on valid tokens, plus the score at each completion's last valid token (detail 7).
    kl, mask (N, T); scores (N,). Returns (rewards (N, T), non_score_reward (N, T) = -β kl · m)."""
    assert kl.shape == mask.shape and scores.shape == (mask.shape[0],)
    non_score = -beta * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # masks are prefixes: the last valid index
    rewards = non_score.clone()
    rewards[torch.arange(mask.shape[0]), last] += scores * (mask.sum(1) > 0)
    return rewards, non_score


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected variance of the valid entries."""
    n = mask.sum()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens in the rollout, got {int(n)}; use a larger batch")
    centered = (x - masked_mean(x, mask)) * mask
    return (centered ** 2).sum() / (n - 1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid entries (the mean added back when shift_mean is False); 0 at
    padding. Details 10 and 12."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (arXiv 1506.02438 Eq. 16), backwards over each completion, with V = 0 after
    the last valid token. rewards, values, mask (N, T). Returns (advantages, returns = advantages + values), both 0 at
    padding (detail 11)."""
    assert rewards.shape == values.shape == mask.shape
    r, v = rewards * mask, values * mask
    T = r.shape[1]
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + v) * mask


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, cliprange: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token max(-Â ρ, -Â clip(ρ, 1-ε, 1+ε)) (PPO Eq. 7, as a loss). Returns (loss (B, T), ρ (B, T), clipped
    (B, T) bool: the clipped term is the larger one, TRL's clipfrac)."""
    assert logps.shape == old_logps.shape == advantages.shape
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return torch.max(unclipped, clipped), ratio, clipped > unclipped


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ½ max((V - G)², (V_clip - G)²), V_clip = clip(V, V_old - ε_V, V_old + ε_V). Returns (loss (B, T),
    clipped (B, T) bool: the clipped term is the larger one). Detail 16."""
    assert values.shape == old_values.shape == returns.shape
    v_clip = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), clipped > unclipped


def adaptive_kl_update(beta: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al. 2019 Sec. 2.2: β · (1 + clip(KL / target - 1, -0.2, 0.2) · n / horizon). Detail 9."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


# ----------------------------------------------------------------------------- set-up helpers
def check_args(args: Args) -> None:
    """Reject bad flag combinations before anything is loaded."""
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
                 "num_generations", "max_steps", "max_new_tokens", "kl_horizon"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"--kl_estimator {args.kl_estimator!r}: use one of {KL_ESTIMATORS}")
    if args.beta < 0 or (args.kl_target is not None and args.kl_target <= 0):
        raise ValueError("--beta must be >= 0 and --kl_target > 0")
    if args.kl_target is not None and args.beta == 0:
        raise ValueError("--kl_target adapts beta multiplicatively: start from --beta > 0")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1):
        raise ValueError("--gamma and --lam must be in [0, 1]")
    if args.reward_funcs and args.reward_model_name_or_path:
        raise ValueError("give either --reward_model_name_or_path (scored on the policy's token ids) or "
                         "--reward_funcs, not both; to combine a reward model with functions, list it as "
                         "--reward_funcs model:<name>")
    if args.reward_weights is not None and not args.reward_funcs:
        raise ValueError("--reward_weights weighs --reward_funcs; there are none (the reward model has weight 1)")
    rollout_per_process = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_mini_batches
    if rollout_per_process % args.num_generations:
        raise ValueError(
            f"the per-process rollout per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches = "
            f"{args.per_device_train_batch_size} * {args.gradient_accumulation_steps} * {args.num_mini_batches} = "
            f"{rollout_per_process} completions is not divisible by --num_generations {args.num_generations}; change "
            f"one of those flags")


def tokenizer_mismatch(policy_tok, other_tok) -> str | None:
    """Why `other_tok` cannot read the policy's token ids (a different vocabulary or EOS/BOS id), or None. The pad id
    may differ: masks here never come from it."""
    a, b = policy_tok.get_vocab(), other_tok.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        return f"vocabularies differ ({len(a)} vs {len(b)} tokens; e.g. {diff})"
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(policy_tok, attr) != getattr(other_tok, attr):
            return f"{attr} differs ({getattr(policy_tok, attr)} vs {getattr(other_tok, attr)})"
    return None


def check_tokenizer(policy_tok, name: str, flag: str, dataset_name: str) -> None:
    from transformers import AutoTokenizer

    why = tokenizer_mismatch(policy_tok, AutoTokenizer.from_pretrained(model_utils.resolve(name, dataset_name)))
    if why is not None:
        raise ValueError(
            f"{flag} {name}: its tokenizer differs from the policy's: {why}. PPO feeds the policy's token ids to the "
            f"reward and value models without re-tokenising. Use a model trained with the policy's tokenizer, or pass "
            f"the reward model as a reward function, --reward_funcs model:{name}, which decodes each completion and "
            f"re-tokenises the text with the reward model's own tokenizer (the value model then starts from the "
            f"policy; pass --value_model_name_or_path for another one with the policy's tokenizer)")


def load_value_model(name: str, dataset_name: str, fresh_head: bool):
    """A one-output sequence classifier used as V(s_t) at every position (detail 1); head zeroed when fresh."""
    model, _ = model_utils.load_reward_model(name, dataset_name)
    if fresh_head:
        torch.nn.init.zeros_(model.score.weight)
        if getattr(model.score, "bias", None) is not None:
            torch.nn.init.zeros_(model.score.bias)
    return model


def micro_inputs(batch: dict, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[prompt | completion] ids and attention mask of `rows`, trimmed to the rows' own padding; T = their longest
    completion."""
    cmask = batch["completion_mask"][rows]
    T = max(int(cmask.sum(1).max()), 1)
    pmask = batch["prompt_mask"][rows]
    keep = pmask.shape[1] - int(pmask.sum(1).max())  # leading columns that are padding in every row
    ids = torch.cat([batch["prompt_ids"][rows, keep:], batch["completion_ids"][rows, :T]], 1)
    am = torch.cat([pmask[:, keep:], cmask[:, :T]], 1)
    return ids, am, T


def token_values(value_model, head, input_ids: torch.Tensor, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """V(s_t) (B, T): the head on the hidden state that predicts completion token t (the state before action t).
    Called through the (possibly DDP-wrapped) model's own forward; `head` is the unwrapped model's score layer."""
    out = value_model(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=model_utils.position_ids_from_mask(attention_mask), output_hidden_states=True,
                      use_cache=False)
    return head(out.hidden_states[-1][:, -(T + 1):-1])[..., 0].float()


class PolicyAndValue(torch.nn.Module):
    """The trained models as one module (detail 1), prepared once with one optimizer: DeepSpeed runs one engine per
    run, and FSDP2 then shards both models (each decoder layer of either is its own unit). Its forward computes both
    models' outputs for the same rows, so every distributed wrapper sees one forward per backward."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy, self.value = policy, value
        self._no_split_modules = sorted({n for m in (policy, value)
                                         for n in getattr(model_utils._unwrap(m), "_no_split_modules", None) or []})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                temperature: float, return_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(policy log-probs (B, T), their entropy (B, T) or None, values V(s_t) (B, T)) of the last T tokens."""
        out = model_utils.completion_logps(self.policy, input_ids, attention_mask, completion_len, temperature,
                                           return_entropy=return_entropy)
        logps, entropy = out if return_entropy else (out, None)
        head = model_utils._unwrap(self.value).score
        return logps, entropy, token_values(self.value, head, input_ids, attention_mask, completion_len)


def micro_rows(perm: torch.Tensor, j: int, m: int, rank: int, B: int, W: int, GA: int) -> torch.Tensor:
    """Rows of micro-batch m of mini-batch j on process `rank` (detail 13)."""
    start = j * B * W * GA + (m * W + rank) * B
    return perm[start:start + B]


def epoch_permutation(n: int, seed: int, rollout_index: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + rollout_index * 1009 + epoch)
    return torch.randperm(n, generator=g)


def to_global(accelerator, local: torch.Tensor) -> torch.Tensor:
    """Rows each process filled (zeros elsewhere) -> the rollout every process holds (each row has one owner)."""
    if accelerator.num_processes == 1:
        return local
    return accelerator.reduce(local.to(accelerator.device).contiguous(), reduction="sum")


# ----------------------------------------------------------------------------- main
def main(args: Args):
    dataset = args.dataset_name.replace("/", "_").replace(":", "_")
    args.run_name = args.run_name or f"{args.exp_name}__{dataset}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    check_args(args)
    B, GA, nmb, G = (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_mini_batches,
                     args.num_generations)
    accelerator = distributed.make_accelerator(args)
    W, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    N = B * W * GA * nmb  # completions per rollout, all processes
    M = B * W * GA  # completions per mini-batch (one optimizer step)
    prompts_per_process = N // W // G

    # data, rewards and tokenizers first: bad input fails before the policy is loaded
    rm_name = None if args.reward_funcs else (args.reward_model_name_or_path or "toy-rm")
    specs = list(args.reward_funcs) if args.reward_funcs else [f"model:{rm_name}"]
    reward_utils.check_weights(specs, args.reward_weights)
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    stop_id = tokenizer.eos_token_id if args.stop_token_id is None else args.stop_token_id
    ds, eval_ds = data.load_splits(args, "prompt", "ppo.py", toy_n=args.num_eval_prompts)
    data.check_batch_fits(len(ds), N // G, "--per_device_train_batch_size x --gradient_accumulation_steps x "
                          "--num_mini_batches / --num_generations (prompts per rollout)")
    all_prompts = ds["prompt"]
    prompt_ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in all_prompts])
    if args.max_prompt_length:
        prompt_ids = [s[-args.max_prompt_length:] for s in prompt_ids]
    extra_columns = {c: ds[c] for c in ds.column_names if c != "prompt"}  # passed on to the reward functions
    if rm_name is not None:
        check_tokenizer(tokenizer, rm_name, "--reward_model_name_or_path", args.dataset_name)
    value_name = args.value_model_name_or_path or rm_name or args.model_name_or_path
    if args.value_model_name_or_path is not None:
        check_tokenizer(tokenizer, value_name, "--value_model_name_or_path", args.dataset_name)
    # the reward functions, or the reward model: PPO scores the policy's ids with it (detail 5); the held-out
    # evaluation scores decoded text through the same object
    sources = reward_utils.RewardSources(specs, args.reward_weights, args.dataset_name, device)
    reward_model = sources.funcs[0].model if rm_name is not None else None
    peft_utils.check_args(args)  # LoRA flags and module names (policy, value model), before anything is loaded
    peft_utils.check_args(args, task="SEQ_CLS", model_name=value_name, what="the value model")
    resume = checkpoint.prepare_output_dir(args)

    policy = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    policy = peft_utils.maybe_wrap(policy, args)  # --use_peft: LoRA adapters, the rest frozen
    ref_model = (peft_utils.reference_model(policy) if args.use_peft  # the policy with its adapters off: no copy
                 else model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name).to(device))
    value_model = load_value_model(value_name, args.dataset_name,
                                   fresh_head=args.value_model_name_or_path is None and rm_name is None)
    value_model = peft_utils.maybe_wrap(value_model, args, task="SEQ_CLS")  # --use_peft: the score head trains fully
    for frozen in (ref_model, reward_model):
        if frozen is not None:
            frozen.eval().requires_grad_(False)
    model = PolicyAndValue(policy, value_model)  # detail 1: one module, one optimizer, one clip
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    opt = torch.optim.AdamW([{"params": trainable(policy), "lr": args.learning_rate},
                             {"params": trainable(value_model), "lr": args.value_learning_rate or args.learning_rate}],
                            lr=args.learning_rate, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(args.warmup_steps, 1)))
    model, opt = accelerator.prepare(model, opt)
    accelerator.register_for_checkpointing(sched)  # stepped once per optimizer step
    model.eval()  # detail 2: no dropout anywhere
    with distributed.submodule_for_generation(accelerator, model, "policy") as gen_policy:
        generator = build_generator(args, tokenizer, accelerator, gen_policy)

    start, elapsed, num_tokens, beta, skipped = 0, 0.0, 0.0, args.beta, 0
    if resume is not None:
        state = checkpoint.load_checkpoint(accelerator, resume)
        start, elapsed, num_tokens = state["step"], state["elapsed"], state["num_tokens"]
        beta, skipped = state["kl_coef"], state["skipped_steps"]
        accelerator.print(f"resumed from {resume} at rollout {start} (beta {beta:.4g})")
        with distributed.submodule_for_generation(accelerator, model, "policy") as gen_policy:
            generator.sync_weights(gen_policy)
    tracker = tracking.Tracker(args, accelerator.is_main_process, start, elapsed, show=(
        "objective/scores", "objective/kl", "loss/value_avg", "eval/reward", "eval/gold_reward"))
    accelerator.print(f"ppo: {len(ds)} prompts; {W} process(es) x {prompts_per_process} prompts x {G} completion(s) "
                      f"per rollout, {args.num_ppo_epochs} epochs x {nmb} mini-batches of {M} completions, "
                      f"{args.max_steps} rollouts; reward: {', '.join(sources.names)}; value model from {value_name} "
                      f"-> {args.output_dir}")

    def evaluate() -> dict:  # greedy completions of the held-out prompts, scored by the same reward sources
        with distributed.submodule_for_generation(accelerator, model, "policy") as gen_policy:
            return evaluation.heldout_reward(gen_policy, tokenizer, eval_ds, sources, args.dataset_name,
                                             args.num_eval_prompts, args.max_new_tokens, accelerator=accelerator)

    if start == 0 and args.eval_steps and eval_ds is not None:
        tracker.log(evaluate(), 0, args.max_steps)

    task = data.toy_task(args.dataset_name)
    gold = reward_utils.load_function(task) if task else None  # logged as train/gold_reward, never trained on
    pad_id, T_max = tokenizer.pad_token_id, args.max_new_tokens
    window = defaultdict(list)
    for step in range(start, args.max_steps):
        # ---------------------------------------------------------------- rollout: sample, truncate, gather
        t0 = time.time()
        indices = data.batch_indices(len(ds), N // G, step, args.seed)  # the rollout's prompts, all processes
        local = indices[rank * prompts_per_process:(rank + 1) * prompts_per_process]
        with distributed.submodule_for_generation(accelerator, model, "policy") as gen_policy:
            out = generator.generate(gen_policy, [prompt_ids[i] for i in local], n=G)  # row i*G + j: sample j of i
        gen_time = time.time() - t0
        c_ids = torch.full((out.completion_ids.shape[0], T_max), pad_id, dtype=torch.long)
        c_ids[:, :out.completion_ids.shape[1]] = out.completion_ids.cpu()[:, :T_max]
        c_ids, c_mask, terminated = truncate_after_stop(c_ids, stop_id, pad_id)  # detail 4
        texts = tokenizer.batch_decode([r[m.bool()] for r, m in zip(c_ids, c_mask)], skip_special_tokens=True)
        prompts, columns = rollout.repeat_rows(local, all_prompts, extra_columns, G)
        completions = rollout.as_completions(prompts, texts)
        comp_lists = rollout.completion_id_lists(c_ids, c_mask)
        rpf = sources(prompts, completions, comp_lists, columns) if rm_name is None else None  # (n, F), checked
        rows_global = [i for i in indices for _ in range(G)]
        p_ids, p_mask = data.pad([prompt_ids[i] for i in rows_global], pad_id, "left")
        batch = {"prompt_ids": p_ids.to(device), "prompt_mask": p_mask.to(device),
                 "completion_ids": distributed.gather_cat(accelerator, c_ids).to(device),
                 "completion_mask": distributed.gather_cat(accelerator, c_mask).to(device)}
        terminated_all = distributed.gather_cat(accelerator, terminated.long()).bool().to(device)
        cmask = batch["completion_mask"].float()

        # ---------------------------------------------------------------- old / ref log-probs, values, scores
        # on exactly the first epoch's micro-batches (detail 14); each process fills its rows, then all share them
        perm0 = epoch_permutation(N, args.seed, step, 0).to(device)
        old_logps, ref_logps, values = (torch.zeros(N, T_max, device=device) for _ in range(3))
        rm_scores = torch.zeros(N, device=device)
        with torch.no_grad():
            for j in range(nmb):
                for m in range(GA):
                    rows = micro_rows(perm0, j, m, rank, B, W, GA)
                    ids, am, T = micro_inputs(batch, rows)
                    old_logps[rows, :T], _, values[rows, :T] = model(ids, am, T, args.temperature)
                    ref_logps[rows, :T] = model_utils.completion_logps(ref_model, ids, am, T, args.temperature)
                    if reward_model is not None:
                        rm_scores[rows] = model_utils.sequence_classifier_scores(reward_model, ids, am)
        old_logps, ref_logps, values, rm_scores = (to_global(accelerator, t) for t in
                                                   (old_logps, ref_logps, values, rm_scores))
        if reward_model is not None:
            scores = rm_scores
            if not torch.isfinite(scores).all():  # detail 18: stop before any update
                i = int((~torch.isfinite(scores)).nonzero()[0])
                raise FloatingPointError(
                    f"the reward model {rm_name} returned {scores[i].item()} at rollout {step + 1} for "
                    f"{tokenizer.decode(torch.cat([batch['prompt_ids'][i], batch['completion_ids'][i]]))!r}; "
                    "stopped before the update")
            rpf_all = scores[:, None].cpu()
        else:
            rpf_all = distributed.gather_cat(accelerator, rpf)
            scored = ~torch.isnan(rpf_all)
            scores = torch.where(scored, rpf_all * sources.weights, torch.zeros_like(rpf_all)).sum(1)
            scores = torch.where(scored.any(1), scores, torch.full_like(scores, float("nan"))).to(device)
        valid_rows = ~torch.isnan(scores)  # detail 18: unscored completions are left out of the update
        scores = apply_missing_eos_penalty(torch.nan_to_num(scores, 0.0), terminated_all, args.missing_eos_penalty)
        mask = cmask * valid_rows[:, None].float()

        # ---------------------------------------------------------------- rewards, GAE, whitening
        kl = kl_penalty(old_logps, ref_logps, args.kl_estimator) * cmask
        rewards, non_score = per_token_rewards(kl, scores * valid_rows, mask, beta)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)
        n_valid = valid_rows.sum().clamp(min=1)
        objective = {
            "objective/kl": kl.sum(1).mean().item(), "objective/entropy": (-old_logps * cmask).sum(1).mean().item(),
            "objective/non_score_reward": (non_score.sum(1) * valid_rows).sum().item() / n_valid.item(),
            "objective/scores": (scores * valid_rows).sum().item() / n_valid.item(), "objective/kl_coef": beta}
        objective["objective/rlhf_reward"] = objective["objective/scores"] + objective["objective/non_score_reward"]

        # ---------------------------------------------------------------- num_ppo_epochs x num_mini_batches steps
        t1 = time.time()
        sums = torch.zeros(9, dtype=torch.float64)  # tokens, pg, vf, pg_clip, vf_clip, approxkl, entropy, ρ, ρ²
        grad_norms = []
        for epoch in range(args.num_ppo_epochs):
            perm = perm0 if epoch == 0 else epoch_permutation(N, args.seed, step, epoch).to(device)
            for j in range(nmb):
                n_tok = mask[perm[j * M:(j + 1) * M]].sum().clamp(min=1)  # detail 15: the whole mini-batch
                for m in range(GA):
                    rows = micro_rows(perm, j, m, rank, B, W, GA)
                    ids, am, T = micro_inputs(batch, rows)
                    mk = mask[rows, :T]
                    with accelerator.accumulate(model):
                        logps, entropy, vpred = model(ids, am, T, args.temperature, return_entropy=True)
                        pg, ratio, pg_clipped = clipped_policy_loss(logps, old_logps[rows, :T], advantages[rows, :T],
                                                                    args.cliprange)
                        vf, vf_clipped = clipped_value_loss(vpred, values[rows, :T], returns[rows, :T],
                                                            args.cliprange_value)
                        loss = ((pg * mk).sum() + args.vf_coef * (vf * mk).sum()) / n_tok
                        # accelerate divides by the accumulation steps and DDP averages over processes; the
                        # normaliser n_tok already covers both
                        accelerator.backward(loss * GA * W)
                        if accelerator.sync_gradients:  # detail 17: one clip over both models
                            gn, ok = distributed.optimizer_step(accelerator, model, opt, sched, args.max_grad_norm)
                            skipped += not ok
                            grad_norms.append(gn)
                    with torch.no_grad():
                        d = (logps - old_logps[rows, :T]) * mk
                        sums += torch.tensor([mk.sum(), (pg * mk).sum(), (vf * mk).sum(), (pg_clipped * mk).sum(),
                                              (vf_clipped * mk).sum(), 0.5 * (d ** 2).sum(), (entropy * mk).sum(),
                                              (ratio * mk).sum(), (ratio ** 2 * mk).sum()], dtype=torch.float64)
        with distributed.submodule_for_generation(accelerator, model, "policy") as gen_policy:
            generator.sync_weights(gen_policy)
        train_time = time.time() - t1
        if W > 1:
            sums = accelerator.reduce(sums.to(device), reduction="sum").cpu()
        tok = max(sums[0].item(), 1.0)
        ratio_mean = sums[7].item() / tok
        metrics = {**objective,
                   "policy/approxkl_avg": sums[5].item() / tok, "policy/clipfrac_avg": sums[3].item() / tok,
                   "policy/entropy_avg": sums[6].item() / tok, "loss/policy_avg": sums[1].item() / tok,
                   "loss/value_avg": sums[2].item() / tok, "val/clipfrac_avg": sums[4].item() / tok,
                   "val/ratio": ratio_mean, "val/ratio_var": max(sums[8].item() / tok - ratio_mean ** 2, 0.0),
                   "val/num_eos_tokens": float(((batch["completion_ids"] == stop_id) & (cmask > 0)).sum().item()),
                   "grad_norm": sum(grad_norms) / len(grad_norms),
                   "tokens_per_second/generation": cmask.sum().item() / max(gen_time, 1e-9),
                   "tokens_per_second/training": args.num_ppo_epochs * cmask.sum().item() / max(train_time, 1e-9)}
        metrics.update(rollout.completion_metrics(accelerator, c_mask, terminated))
        metrics.update(sources.metrics(rpf_all))  # rewards/{name}/mean|std, before the missing-EOS penalty
        if step == start:
            sources.check_varies(rpf_all, accelerator.is_main_process)
        if gold is not None:
            all_texts = texts if W == 1 else gather_object(texts)  # every process's, in process order
            g = [x for x in gold([all_prompts[i] for i in rows_global], all_texts) if x is not None]
            metrics["train/gold_reward"] = sum(g) / max(len(g), 1)
        if out.sampler_logps is not None:  # vLLM: the sampler-trainer gap, logged (the old log-probs are the trainer's)
            own = torch.arange(rank * N // W, (rank + 1) * N // W, device=device)
            metrics.update(rollout.sampler_gap_metrics(accelerator, old_logps[own], out.sampler_logps[:, :T_max],
                                                       cmask[own]))
        num_tokens += cmask.sum().item() + p_mask.sum().item()
        for k, v in metrics.items():
            window[k].append(v)
        if args.log_completions_steps and step % args.log_completions_steps == 0:
            k = min(args.num_completions_to_log, len(texts))
            off = rank * N // W
            tracker.log_samples(step, [{"prompt": prompts[i], "completion": texts[i],
                                        "score": scores[off + i].item(), "terminated": bool(terminated[i])}
                                       for i in range(k)])
        if args.kl_target is not None:  # detail 9: after the update, from this rollout's KL
            beta = adaptive_kl_update(beta, objective["objective/kl"], args.kl_target, args.kl_horizon, N)

        done = step + 1
        if done % args.logging_steps == 0 or done == args.max_steps:
            logged = {k: sum(v) / len(v) for k, v in window.items()}
            logged.update({"num_tokens": num_tokens, "episode": done * N, "learning_rate": sched.get_last_lr()[0],
                           "train/skipped_steps": skipped})
            window = defaultdict(list)
            if args.eval_steps and eval_ds is not None and (done % args.eval_steps == 0 or done == args.max_steps):
                logged.update(evaluate())
            tracker.log(logged, done, args.max_steps)
        state = {"elapsed": tracker.elapsed(), "num_tokens": num_tokens, "kl_coef": beta, "skipped_steps": skipped}
        if args.save_steps and (done % args.save_steps == 0 or done == args.max_steps):
            checkpoint.save_checkpoint(accelerator, args.output_dir, done, model, tokenizer, args, state,
                                       args.save_total_limit, part="policy")

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir, args.max_steps, part="policy")
    tracker.close()
    accelerator.print(f"saved the final policy to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
