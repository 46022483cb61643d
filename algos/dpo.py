"""DPO and its offline loss family: preference optimisation on fixed (prompt, chosen, rejected) pairs.

Paper: "Direct Preference Optimization: Your Language Model is Secretly a Reward Model" (Rafailov et al., arXiv
2305.18290, Eq. 7), plus every loss type of TRL 1.16's DPOTrainer, named as TRL names them. For a pair (x, y_w, y_l):
    S(y)   = Σ_t m_t log π(y_t | x, y_<t)           sequence log-prob: a sum over completion tokens (EOS included)
    Δ_w    = S^θ(y_w) - S^ref(y_w),  Δ_l likewise   log-ratios; the implicit reward is β·Δ
    u_w    = f'(Δ_w), u_l = f'(Δ_l)                 f-divergence scores (u = Δ for the default reverse KL)
    h      = u_w - u_l,  h̄ = u_w/|y_w| - u_l/|y_l|  (|y| = completion tokens)
Per-pair losses (σ the logistic function, ε = --label_smoothing, δ the bco running mean):
    sigmoid       -log σ(βh)                                       DPO, 2305.18290 Eq. 7
    hinge         max(0, 1 - βh)                                   SLiC 2305.10425 / RSO 2309.06657
    ipo           (h̄ - 1/(2β))²                                    IPO, 2310.12036 Eq. 17, length-normalised as TRL
    exo_pair      σ(βh)(log σ(βh) - log(1-ε)) + σ(-βh)(log σ(-βh) - log ε)        EXO, 2402.00856 Eq. 16
    nca_pair      -log σ(βΔ_w) - ½ log σ(-βΔ_w) - ½ log σ(-βΔ_l)   NCA, 2402.05369
    robust        [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε)       rDPO, 2403.00409 Eq. 8 (ε = flip rate)
    bco_pair      -log σ(βΔ_w - δ) - log σ(-(βΔ_l - δ))            BCO, 2404.04656 (δ = 0 as TRL 1.16; see 5)
    sppo_hard     (Δ_w - 1/(2β))² + (Δ_l + 1/(2β))²                SPPO, 2405.00675 Eq. 4.7 with P ∈ {0, 1}
    aot           -(1-ε) log σ(βd_k) - ε log σ(-βd_k),             AOT, 2406.05882
                  d = sort(S^θ_w - S^θ_l) - sort(S^ref_w - S^ref_l) over the batch
    aot_unpaired  the same with d = sort(Δ_w) - sort(Δ_l)
    apo_zero      1 - σ(βΔ_w) + σ(βΔ_l)                            APO, 2408.06266 Eq. 7
    apo_down      σ(βΔ_w) + 1 - σ(β(Δ_w - Δ_l))                    APO, 2408.06266 Eq. 8
    discopop      (1 - s)(-log σ(βh)) + s·exp(-βh), s = σ(βh/τ)    DiscoPOP, 2406.08414 Eq. 5 (--discopop_tau)
    sft           NLL of the chosen completion (token mean)        the SFT part of MPO, 2411.10442
    sigmoid_norm  -log σ(βh̄)                                       length-normalised DPO
Several at once: L = Σ_k w_k L_k (`--loss_type sigmoid bco_pair sft --loss_weights 0.8 0.2 1.0` is MPO). Every loss
is a mean over the pairs of the whole optimizer step (all accumulation micro-batches and processes), so gradient
accumulation and multi-process runs give the update of one big batch (except aot's sorting: see 6).

f-divergences (`--f_divergence_type`, f-DPO, 2309.16240): f'(t) at t = π/π_ref, i.e. u = Δ (reverse_kl),
1 - e^{-Δ} (forward_kl), log 2 + log σ(Δ) (js_divergence), (e^{(α-1)Δ} - 1)/(α-1) (alpha_divergence, α =
--f_alpha_divergence_coef). They enter only through h, so, as in TRL, only the losses built on h accept them.

Implementation details (numbered so the tests and the README can point at them):
 1. One forward per micro-batch for chosen and rejected together, with the prompt computed once per pair: each pair
    is one row [prompt | chosen | rejected | padding]; the rejected tokens' positions restart after the prompt and a
    block attention mask lets each token see only the causal past of its own sequence (prompt + itself), so every
    log-prob equals that of a separate forward of prompt + completion, at the cost of one prompt instead of two
    (prefix sharing, as in arXiv 2410.20305). It needs an attention that takes a custom 4D mask (sdpa, eager) and no
    sliding window shorter than a sequence (the mask replaces it); otherwise, or with --share_prompt False, each pair
    is two rows [left-padded prompt | right-padded completion] (TRL's layout). Only the logits from the first
    position that predicts a completion token on go through the model (`logits_to_keep`), and only up to the final
    hidden states: the hidden state that predicts each completion token is picked, and the output head, the float32
    log-softmax and the no-grad statistics (mean logits, WPO's log Σ p², the entropy) are applied a block of tokens
    at a time, forward and backward (common/model.py's logps_at), so no (2B, T, V) logits tensor is ever made (models
    that post-process their logits get them from their forward). Masks are explicit, never from pad ids.
 2. Tokenisation: prompt and prompt+completion are tokenised whole and split where they first differ (so merges across
    the boundary do not corrupt the split, as TRL does); completions end with EOS. Truncation: the prompt is cut to
    --max_prompt_length keeping its LAST tokens (left side); then each completion is cut to fit --max_length keeping
    its FIRST tokens (right side, TRL's keep_start). Pairs whose prompt is empty or alone fills --max_length are
    dropped (counted on screen). Sequence log-probs are sums, never means; the length-normalised losses divide by
    |y| themselves.
 3. --precompute_ref_log_probs: one pass of the reference model over the training and evaluation pairs before training,
    stored in output_dir/ref_logps/ref_logps.safetensors with a fingerprint of the tokenised data, the reference and
    the options that change S^ref (a resumed run with the same fingerprint reuses it; a new run recomputes it); the
    reference model is then freed. Incompatible with TR-DPO (its reference moves) and --reference_free (none).
 4. TR-DPO (2404.09656): after every --ref_model_sync_steps-th optimizer step, θ_ref ← α θ + (1 - α) θ_ref with
    α = --ref_model_mixup_alpha (soft update; α = 1 is a hard copy). The reference weights are saved with each
    checkpoint, so a resumed run continues with the same reference.
 5. bco_pair: TRL 1.16's bco_pair has no reward shift (δ = 0). --bco_running_mean True restores the BCO paper's δ (as
    older TRL releases had it): the running mean of the mean implicit reward β(Δ_w + Δ_l)/2 of each optimizer step's
    global batch, one observation per step. DEVIATION(older TRL): δ is updated after the step (TRL updated it with
    each micro-batch before using it), so δ is the same for every micro-batch and process of a step and accumulation
    gives the one-batch update. δ and its count are saved with each checkpoint.
 6. aot and aot_unpaired sort log-ratios within each micro-batch, as TRL sorts within each device's batch: they are the
    only losses whose update depends on how the global batch is split (the start-up line says so).
 7. sft (and --rpo_alpha, which adds rpo_alpha·NLL(chosen), RPO 2404.19733, as older TRL releases had it) is a global
    token mean: the chosen tokens' NLL summed over the step divided by the step's chosen-token count. DEVIATION(TRL):
    TRL takes a token mean per micro-batch, which differs under accumulation when micro-batches differ in length.
    With --use_weighting each pair's NLL is weighted by its own WPO weight (TRL weights the batch mean by the mean
    weight); the RPO term is never weighted (as in older TRL).
 8. WPO (--use_weighting, 2406.11827 Eq. 2): each pair's loss is multiplied by w_w·w_l, w = exp(mean_t [log p_t -
    log Σ_v p_v²]) from the policy, without gradient. LD-DPO (--ld_alpha, 2409.06411): S = S_shared + α·S_tail,
    where the shared part is the first min(|y_w|, |y_l|) completion tokens of each pair (policy and reference).
 9. --reference_free: S^ref = 0 (no reference model is loaded).
10. Dropout is off in the policy and the reference (TRL's disable_dropout default), and the reference's weights keep
    requires_grad (it runs under no_grad): on CPU frozen weights take a matmul path with other rounding. So at the
    first step (policy = reference) every Δ is exactly 0 and rewards/accuracies is 0, not a coin flip on noise.
11. Metrics follow TRL: rewards/chosen = mean βΔ_w, rewards/rejected, rewards/margins = mean β(Δ_w - Δ_l),
    rewards/accuracies = mean [Δ_w > Δ_l], logps/chosen|rejected = mean S^θ, logits/chosen|rejected = mean over
    completion tokens of the mean logit over the vocabulary, loss, plus entropy (on logging steps) and
    mean_token_accuracy. Sums accumulate over every micro-batch since the last log and are reduced across processes
    once. The same with an eval/ prefix on the evaluation pairs, and on toy tasks eval/gold_reward: greedy exact match
    on held-out prompts (common/evaluation.py).
12. --packing (padding-free micro-batches): with the shared prompt, whole pairs [prompt | chosen | rejected] are
    packed into rows as long as the micro-batch's longest pair (best-fit decreasing), positions restart at each pair
    and the block mask of detail 1 is built per pair; otherwise the 2B sequences prompt + completion are packed into
    rows as long as the longest one with position ids restarting at each sequence and no attention mask, so
    transformers keeps attention within each sequence (common/packing.py; flash attention's varlen kernels too). The
    head runs at the K completion tokens only, and their log-probs and statistics go back to (2B, T) per sequence, so
    everything after the forward (the reference and its precomputed pass, LD-DPO, WPO, RPO, every loss, the metrics)
    is unchanged: the same sequences and the same loss as padded batches, up to float rounding.

Toy defaults (the benchmark's): the toy SFT policy (toy-sft, about 0.47 held-out exact match) on toy:add pairs
(chosen = the right sum, rejected = a near miss), 64 pairs per step, β = 0.1, lr 1e-4, 200 steps; a few minutes on 2
CPU cores.

Data: preference rows (`prompt, chosen, rejected`, or implicit prompt `chosen, rejected`), standard or
conversational. Unpaired rows (`prompt, completion, label`) belong to KTO-type methods, not here.

Run:
    python algos/dpo.py                                                  # DPO on toy:add from the toy SFT policy
    python algos/dpo.py --loss_type ipo --beta 0.5
    python algos/dpo.py --loss_type sigmoid bco_pair sft --loss_weights 0.8 0.2 1.0          # MPO
    python algos/dpo.py --loss_type robust --label_smoothing 0.1 --precompute_ref_log_probs True
    python algos/dpo.py --sync_ref_model True --ref_model_sync_steps 50 --ref_model_mixup_alpha 0.6   # TR-DPO
    python algos/dpo.py --packing True                                   # padding-free micro-batches (detail 12)
    accelerate launch --multi_gpu --num_processes 2 algos/dpo.py         # same global batch, same result
    python algos/dpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized \
        --learning_rate 5e-7 --max_length 1024 --per_device_train_batch_size 4 --gradient_accumulation_steps 8
    bash benchmarks/dpo.sh                                               # 8 loss configurations x 3 seeds
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
import tyro

from common import checkpoint, data, distributed, model as model_utils, peft_utils, preference, tracking
from common.evaluation import heldout_gold_reward


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "dpo"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (data order)"""
    run_name: str | None = None
    """run name; default '{exp_name}__{dataset}__{seed}__{unix time}'"""
    output_dir: str | None = None
    """where metrics, checkpoints and the final model go; default runs/{run_name}"""
    overwrite_output_dir: bool = False
    """start a new run in an output_dir that holds another run's files (they are deleted first)"""
    track: bool = False
    """mirror metrics to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "cleanalign"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team)"""
    model_name_or_path: str = "toy-sft"
    """starting policy: 'toy-sft' (the toy SFT policy of the dataset's task), a local folder or a hub name"""
    ref_model_name_or_path: str | None = None
    """reference model (default: a copy of the starting policy)"""
    dataset_name: str = "toy:add"
    """'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name"""
    dataset_split: str = "train"
    """split to train on"""
    eval_dataset_name: str | None = None
    """held-out data: a file, a save_to_disk folder or a hub name (split eval_split); toy data: its test split"""
    eval_split: str = "test"
    """split of the evaluation data"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for evaluation (deterministic; never overlaps training)"""
    logging_steps: int = 10
    """log metrics every this many optimizer steps"""
    save_steps: int = 0
    """checkpoint every this many optimizer steps (0: only the final model)"""
    save_total_limit: int | None = 2
    """keep at most this many checkpoints"""
    resume_from: str | None = None
    """a checkpoint folder, or 'auto' for the newest complete one in output_dir"""
    mixed_precision: str | None = None
    """'no', 'fp16' or 'bf16' (default: whatever `accelerate launch` configured)"""
    # --- optimisation
    learning_rate: float = 1e-4
    """AdamW learning rate (the toy model's; TRL's default for real models is 1e-6)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up steps"""
    lr_scheduler: str = "constant"
    """after warm-up: 'constant' or 'linear' decay to 0"""
    max_steps: int = 200
    """optimizer steps"""
    per_device_train_batch_size: int = 64
    """preference pairs per micro-batch per process (each pair is two sequences, in one forward)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- data
    max_length: int | None = 1024
    """longest prompt+completion kept: completions are cut from the right (the prompt is kept); None: no limit"""
    max_prompt_length: int | None = None
    """prompts longer than this keep their last tokens (cut from the left); None: no limit of its own"""
    # --- the loss
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """one or more of sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired,
    apo_zero, apo_down, discopop, sft, sigmoid_norm (TRL's names); several are summed with --loss_weights"""
    loss_weights: list[float] | None = None
    """one weight per loss type (default 1 each); MPO: --loss_type sigmoid bco_pair sft --loss_weights 0.8 0.2 1.0"""
    beta: float = 0.1
    """β: the implicit reward scale (higher = closer to the reference); for ipo the regulariser τ of the paper"""
    label_smoothing: float = 0.0
    """ε, used by robust (label flip rate, in [0, 0.5)), exo_pair (must be > 0; the paper uses 1e-3), aot and
    aot_unpaired (smoothing); an error with any other loss type"""
    discopop_tau: float = 0.05
    """τ of discopop's mixing gate σ(βh/τ) (the paper's value)"""
    bco_running_mean: bool = False
    """bco_pair: subtract δ, the running mean of the implicit rewards (the BCO paper; older TRL). False: δ = 0, as
    TRL 1.16"""
    rpo_alpha: float | None = None
    """RPO: add rpo_alpha · NLL(chosen) (token mean) to the loss (the paper suggests 1.0); None: off"""
    f_divergence_type: str = "reverse_kl"
    """reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence (f-DPO); non-default values only with sigmoid,
    sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft"""
    f_alpha_divergence_coef: float = 0.5
    """α of alpha_divergence"""
    ld_alpha: float | None = None
    """LD-DPO: weight in [0, 1] of the completion tokens past the pair's shared length; None: off"""
    use_weighting: bool = False
    """WPO: weight each pair by the policy's length-normalised probabilities of both completions"""
    reference_free: bool = False
    """use S^ref = 0 (no reference model)"""
    sync_ref_model: bool = False
    """TR-DPO: mix the policy into the reference every --ref_model_sync_steps optimizer steps"""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO α: θ_ref ← α θ + (1 - α) θ_ref"""
    ref_model_sync_steps: int = 512
    """TR-DPO τ: optimizer steps between reference updates"""
    precompute_ref_log_probs: bool = False
    """compute the reference log-probs of all pairs once before training (cached in output_dir) and free the
    reference model"""
    precompute_ref_batch_size: int | None = None
    """pairs per forward of that pass (default: per_device_eval_batch_size)"""
    disable_dropout: bool = True
    """turn dropout off in the policy and the reference"""
    share_prompt: bool = True
    """one row per pair in the forward: chosen and rejected share one copy of the prompt (a block attention mask;
    sdpa or eager attention, else off); False: two rows per pair, as TRL"""
    packing: bool = False
    """padding-free micro-batches (detail 12): the micro-batch's pairs (shared prompt) or sequences packed into rows
    as long as its longest one (best-fit decreasing; positions restart and attention stays within each sequence).
    The same sequence log-probs and loss as without it, less compute on padding"""
    # --- evaluation
    eval_steps: int = 50
    """evaluate every this many optimizer steps (and at step 0 and at the end); 0: never"""
    num_eval_pairs: int = 512
    """at most this many evaluation pairs for the eval/ DPO metrics"""
    per_device_eval_batch_size: int = 128
    """pairs per evaluation forward"""
    num_eval_prompts: int = 256
    """held-out prompts for the greedy gold-reward evaluation on toy tasks"""
    max_new_tokens: int = 8
    """generation length of that evaluation"""
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


LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
USES_LABEL_SMOOTHING = ("robust", "exo_pair", "aot", "aot_unpaired")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SORTING_LOSSES = ("aot", "aot_unpaired")
RENAMED = {"aot_pair": "aot_unpaired (its name since TRL 1.0)",
           "cdpo": "robust with --label_smoothing (TRL 1.16 dropped cDPO's smoothed sigmoid)",
           "kto_pair": "an unpaired method such as KTO (kto.py)", "simpo": "cpo.py", "orpo": "orpo.py"}


# ----------------------------------------------------------------------------- math
# Shapes: B pairs per micro-batch, T completion tokens, V vocabulary. Sequence log-probs are (B,) sums over tokens.
class PairLogps(NamedTuple):
    chosen: torch.Tensor  # (B,) S^θ(y_w), LD-weighted when --ld_alpha
    rejected: torch.Tensor  # (B,) S^θ(y_l)
    ref_chosen: torch.Tensor  # (B,) S^ref(y_w) (zeros when reference-free)
    ref_rejected: torch.Tensor  # (B,) S^ref(y_l)
    chosen_len: torch.Tensor  # (B,) |y_w|, completion tokens
    rejected_len: torch.Tensor  # (B,) |y_l|
    chosen_nll: torch.Tensor  # (B,) -Σ_t log π(y_w,t), never LD-weighted (the sft term)


def f_divergence_scores(logratio: torch.Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """u = f'(π/π_ref) from the log-ratio Δ (B,): the term each f-DPO loss compares between chosen and rejected."""
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit α -> 1 is the reverse KL
            return logratio
        t = ((alpha - 1.0) * logratio.float()).clamp(max=80.0)  # keep exp finite in float32
        return ((torch.exp(t) - 1.0) / (alpha - 1.0)).to(logratio.dtype)
    raise ValueError(f"unknown f_divergence_type '{kind}'; choose one of {F_DIVERGENCES}")


def sigmoid_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * h)


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.relu(1 - beta * h)


def ipo_loss(h_norm: torch.Tensor, beta: float) -> torch.Tensor:
    """h_norm: the margin of length-normalised scores u/|y|."""
    return (h_norm - 1 / (2 * beta)) ** 2


def exo_pair_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """KL(softmax over {w, l} of βu ‖ [1-ε, ε]), written with log σ for stability."""
    z = beta * h
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair_loss(lr_w: torch.Tensor, lr_l: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * lr_w) - 0.5 * F.logsigmoid(-beta * lr_w) - 0.5 * F.logsigmoid(-beta * lr_l)


def robust_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Unbiased under preference flips with rate ε: note the + on the flipped term (not label smoothing)."""
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def bco_pair_loss(lr_w: torch.Tensor, lr_l: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    return -F.logsigmoid(beta * lr_w - delta) - F.logsigmoid(-(beta * lr_l - delta))


def sppo_hard_loss(lr_w: torch.Tensor, lr_l: torch.Tensor, beta: float) -> torch.Tensor:
    return (lr_w - 0.5 / beta) ** 2 + (lr_l + 0.5 / beta) ** 2


def _smoothed_sigmoid(d: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)


def aot_loss(policy_margin: torch.Tensor, ref_margin: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    """Alignment via optimal transport: the k-th smallest policy margin S^θ_w - S^θ_l is paired with the k-th smallest
    reference margin (sorting over the batch given)."""
    d = torch.sort(policy_margin, dim=0).values - torch.sort(ref_margin, dim=0).values
    return _smoothed_sigmoid(d, beta, eps)


def aot_unpaired_loss(lr_w: torch.Tensor, lr_l: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    """The k-th smallest chosen log-ratio is paired with the k-th smallest rejected one."""
    d = torch.sort(lr_w, dim=0).values - torch.sort(lr_l, dim=0).values
    return _smoothed_sigmoid(d, beta, eps)


def apo_zero_loss(lr_w: torch.Tensor, lr_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Anchored: push chosen up and rejected down (chosen better than the model's own outputs)."""
    return 1 - torch.sigmoid(beta * lr_w) + torch.sigmoid(beta * lr_l)


def apo_down_loss(lr_w: torch.Tensor, lr_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Anchored: push both down, rejected more (chosen worse than the model's own outputs)."""
    return torch.sigmoid(beta * lr_w) + 1 - torch.sigmoid(beta * (lr_w - lr_l))


def discopop_loss(h: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """Log-ratio modulated loss: a σ(βh/τ) gate blends the logistic loss and the exponential loss e^{-βh}. Its slope
    at h = 0 is β((1 - log 2)/(4τ) - 3/4), positive for τ < 0.10: from policy = reference the margins first go down
    (a local minimum near βh = -0.12 at τ = 0.05)."""
    z = beta * h
    gate = torch.sigmoid(z / tau)
    return (1 - gate) * (-F.logsigmoid(z)) + gate * torch.exp(-z)


def sft_loss(chosen_nll: torch.Tensor, tokens_per_pair: float) -> torch.Tensor:
    """Per-pair share of the global token-mean NLL: its mean over the step's pairs is Σ NLL / (chosen tokens)."""
    return chosen_nll / tokens_per_pair


def pair_loss(loss_type: str, q: PairLogps, beta: float, label_smoothing: float = 0.0, discopop_tau: float = 0.05,
              f_divergence_type: str = "reverse_kl", f_alpha: float = 0.5, bco_delta: float = 0.0,
              tokens_per_pair: float = 1.0) -> torch.Tensor:
    """Per-pair loss (B,) of one loss type from sequence log-probs."""
    assert q.chosen.dim() == 1 and all(t.shape == q.chosen.shape for t in q)
    lr_w, lr_l = q.chosen - q.ref_chosen, q.rejected - q.ref_rejected  # Δ_w, Δ_l
    u_w = f_divergence_scores(lr_w, f_divergence_type, f_alpha)
    u_l = f_divergence_scores(lr_l, f_divergence_type, f_alpha)
    h = u_w - u_l
    eps = label_smoothing
    if loss_type in ("ipo", "sigmoid_norm"):
        h_norm = u_w / q.chosen_len.clamp(min=1) - u_l / q.rejected_len.clamp(min=1)
        return ipo_loss(h_norm, beta) if loss_type == "ipo" else sigmoid_loss(h_norm, beta)
    if loss_type == "sigmoid":
        return sigmoid_loss(h, beta)
    if loss_type == "hinge":
        return hinge_loss(h, beta)
    if loss_type == "exo_pair":
        return exo_pair_loss(h, beta, eps)
    if loss_type == "nca_pair":
        return nca_pair_loss(lr_w, lr_l, beta)
    if loss_type == "robust":
        return robust_loss(h, beta, eps)
    if loss_type == "bco_pair":
        return bco_pair_loss(lr_w, lr_l, beta, bco_delta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(lr_w, lr_l, beta)
    if loss_type == "aot":
        return aot_loss(q.chosen - q.rejected, q.ref_chosen - q.ref_rejected, beta, eps)
    if loss_type == "aot_unpaired":
        return aot_unpaired_loss(lr_w, lr_l, beta, eps)
    if loss_type == "apo_zero":
        return apo_zero_loss(lr_w, lr_l, beta)
    if loss_type == "apo_down":
        return apo_down_loss(lr_w, lr_l, beta)
    if loss_type == "discopop":
        return discopop_loss(h, beta, discopop_tau)
    if loss_type == "sft":
        return sft_loss(q.chosen_nll, tokens_per_pair)
    raise ValueError(f"unknown loss_type '{loss_type}'; choose from {LOSS_TYPES}")


def combined_loss(q: PairLogps, loss_types: list[str], loss_weights: list[float], beta: float,
                  pair_weights: torch.Tensor | None = None, rpo_alpha: float | None = None,
                  tokens_per_pair: float = 1.0, **options) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_k w_k · weight_pair · L_k per pair (+ rpo_alpha · NLL(chosen)): the total (B,) and each term (B,) by name.
    `options` are pair_loss's keyword arguments (label_smoothing, discopop_tau, f_divergence_type, f_alpha,
    bco_delta)."""
    assert len(loss_types) == len(loss_weights)
    parts = {}
    for loss_type, w in zip(loss_types, loss_weights):
        losses = pair_loss(loss_type, q, beta, tokens_per_pair=tokens_per_pair, **options)
        parts[loss_type] = w * (losses * pair_weights if pair_weights is not None else losses)
    if rpo_alpha is not None:
        parts["rpo"] = rpo_alpha * sft_loss(q.chosen_nll, tokens_per_pair)
    total = torch.stack(list(parts.values())).sum(0)
    return total, parts


def ld_sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Sequence log-probs (2B,) of rows [chosen (B) | rejected (B)]: Σ_t m_t log p_t, or with LD-DPO the first
    min(|y_w|, |y_l|) tokens of each pair at weight 1 and the rest at weight ld_alpha. token_logps, mask: (2B, T)."""
    assert token_logps.shape == mask.shape and mask.shape[0] % 2 == 0
    if ld_alpha is None:
        return (token_logps * mask).sum(1)
    lens = mask.sum(1)
    w_len, l_len = lens.chunk(2)
    shared = torch.minimum(w_len, l_len).repeat(2)[:, None]  # (2B, 1)
    pos = mask.cumsum(1)  # 1-based position among completion tokens
    weight = torch.where(pos <= shared, 1.0, ld_alpha) * mask
    return (token_logps * weight).sum(1)


def wpo_weights(token_logps: torch.Tensor, log_sum_sq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO pair weights (B,) = w_w · w_l, w = exp(mean_t [log p_t - log Σ_v p_v²]), without gradient.
    Rows [chosen (B) | rejected (B)]; token_logps, log_sum_sq, mask: (2B, T)."""
    assert token_logps.shape == log_sum_sq.shape == mask.shape
    with torch.no_grad():
        aligned = ((token_logps - log_sum_sq) * mask).sum(1) / mask.sum(1).clamp(min=1)
        w = torch.exp(aligned)
        w_w, w_l = w.chunk(2)
        return w_w * w_l


def running_mean_update(mean: float, count: int, value: float) -> tuple[float, int]:
    """Welford's mean with one more observation."""
    count += 1
    return mean + (value - mean) / count, count


@torch.no_grad()
def mix_reference(ref_model: torch.nn.Module, model: torch.nn.Module, alpha: float):
    """TR-DPO soft update, in place: θ_ref ← α θ + (1 - α) θ_ref."""
    for p_ref, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        p_ref.mul_(1.0 - alpha).add_(p.detach().to(p_ref.dtype), alpha=alpha)


# ----------------------------------------------------------------------------- forwards
def forward_pairs(model, batch: dict, want_log_sum_sq: bool = False, want_entropy: bool = False):
    """Token log-probs (2B, T) of the [chosen | rejected] completions in one forward (detail 1), and the no-grad
    token statistics (2B, T): mean_logits, argmax, and log_sum_sq / entropy when asked for. The model runs up to its
    final hidden states at the last `logits_to_keep` positions; the hidden state that predicts each completion token
    is picked (`pred`, for the shared-prompt layout; else position t-1 predicts token t) and the output head and the
    float32 log-softmax are applied a block of tokens at a time (common/model.py's logps_at), so no (2B, T, V)
    logits tensor is made, forward or backward."""
    targets = batch["targets"]
    n, T = targets.shape
    device = targets.device
    stats = ("mean_logits", "argmax") + ("log_sum_sq",) * want_log_sum_sq + ("entropy",) * want_entropy
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "scatter" in batch:  # packed (detail 12): the K completion tokens, then back into (2B, T) per sequence
        g, s = batch["gather"], batch["scatter"]
        logps, named = model_utils.logps_at(model, inputs, batch["logits_to_keep"], g[:, 0], g[:, 1],
                                            targets[s[:, 0], s[:, 1]], stats=stats)

        def dense(v):  # (K,) -> (2B, T), zeros at padding (masked by completion_mask everywhere)
            return v.new_zeros((n, T)).index_put((s[:, 0], s[:, 1]), v)

        return dense(logps), {k: dense(v) for k, v in named.items()}
    if batch["pred"] is None:  # two rows per pair: column t of the kept positions predicts token t
        rows, cols = torch.arange(n, device=device)[:, None], torch.arange(T, device=device)[None, :]
    else:  # one row per pair: the predicting positions of the chosen, then of the rejected, tokens
        rows, cols = torch.arange(n // 2, device=device).repeat(2)[:, None], batch["pred"]
    return model_utils.logps_at(model, inputs, batch["logits_to_keep"], rows.expand(n, T), cols.expand(n, T),
                                targets, stats=stats)


@torch.no_grad()
def reference_logps(ref_model, batch: dict, ld_alpha: float | None) -> torch.Tensor:
    """S^ref (2B,) of [chosen | rejected], through the same forward as the policy's (so policy = reference gives
    exactly Δ = 0)."""
    token_logps, _ = forward_pairs(ref_model, batch)
    return ld_sequence_logps(token_logps, batch["completion_mask"].float(), ld_alpha)


# ----------------------------------------------------------------------------- data
def check_args(args: Args):
    """Every configuration error, before any data or model is loaded."""
    for t in args.loss_type:
        if t not in LOSS_TYPES:
            hint = f" Use {RENAMED[t]}." if t in RENAMED else ""
            raise ValueError(f"--loss_type: unknown loss type '{t}'; choose from {', '.join(LOSS_TYPES)}.{hint}")
    if not args.loss_type or len(set(args.loss_type)) != len(args.loss_type):
        raise ValueError(f"--loss_type needs one or more distinct loss types; got {args.loss_type}")
    if args.loss_weights is not None and len(args.loss_weights) != len(args.loss_type):
        raise ValueError(f"--loss_weights has {len(args.loss_weights)} values for {len(args.loss_type)} loss types "
                         f"({' '.join(args.loss_type)}); give one weight per loss type, or none for 1 each")
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive; got {args.beta}")
    ls = args.label_smoothing
    if ls != 0 and not set(args.loss_type) & set(USES_LABEL_SMOOTHING):
        raise ValueError(f"--label_smoothing {ls}: the loss types {' '.join(args.loss_type)} do not use it (only "
                         f"{', '.join(USES_LABEL_SMOOTHING)} do; TRL 1.16 has no label-smoothed sigmoid/ipo: for "
                         "noisy labels use --loss_type robust)")
    if "robust" in args.loss_type and not 0 <= ls < 0.5:
        raise ValueError(f"--label_smoothing {ls}: robust needs a flip rate in [0, 0.5) (the paper uses 0.1)")
    if "exo_pair" in args.loss_type and not 0 < ls < 1:
        raise ValueError(f"--label_smoothing {ls}: exo_pair needs ε in (0, 1) (the paper uses 1e-3)")
    if set(args.loss_type) & set(SORTING_LOSSES) and not 0 <= ls <= 0.5:
        raise ValueError(f"--label_smoothing {ls}: aot/aot_unpaired need a value in [0, 0.5]")
    if args.f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"--f_divergence_type {args.f_divergence_type!r}: choose one of {F_DIVERGENCES}")
    if args.f_divergence_type != "reverse_kl" and not set(args.loss_type) <= set(F_DIVERGENCE_LOSSES):
        bad = sorted(set(args.loss_type) - set(F_DIVERGENCE_LOSSES))
        raise ValueError(f"--f_divergence_type {args.f_divergence_type}: {', '.join(bad)} are not built on the "
                         f"chosen-rejected margin and have no f-divergence form; only {', '.join(F_DIVERGENCE_LOSSES)}")
    if args.ld_alpha is not None and not 0 <= args.ld_alpha <= 1:
        raise ValueError(f"--ld_alpha must lie in [0, 1]; got {args.ld_alpha}")
    if args.use_weighting and set(args.loss_type) & set(SORTING_LOSSES):
        raise ValueError("--use_weighting cannot be combined with aot/aot_unpaired: they sort the pairs, so a pair's "
                         "weight would multiply another pair's loss")
    if args.discopop_tau <= 0:
        raise ValueError(f"--discopop_tau must be positive; got {args.discopop_tau}")
    if args.rpo_alpha is not None and (args.rpo_alpha < 0 or "sft" in args.loss_type):
        raise ValueError("--rpo_alpha adds α·NLL(chosen), the same term as --loss_type sft: use one of them, with "
                         "a non-negative value")
    if args.reference_free and (args.sync_ref_model or args.precompute_ref_log_probs or args.ref_model_name_or_path):
        raise ValueError("--reference_free has no reference model: drop --sync_ref_model, --precompute_ref_log_probs "
                         "and --ref_model_name_or_path")
    if args.sync_ref_model and args.precompute_ref_log_probs:
        raise ValueError("--sync_ref_model moves the reference during training, so precomputed reference log-probs "
                         "would go stale: drop --precompute_ref_log_probs or --sync_ref_model")
    if args.sync_ref_model and (not 0 < args.ref_model_mixup_alpha <= 1 or args.ref_model_sync_steps <= 0):
        raise ValueError("TR-DPO needs --ref_model_mixup_alpha in (0, 1] and --ref_model_sync_steps > 0")
    if args.lr_scheduler not in ("constant", "linear"):
        raise ValueError(f"--lr_scheduler {args.lr_scheduler!r}: choose 'constant' or 'linear'")
    if min(args.max_steps, args.per_device_train_batch_size, args.per_device_eval_batch_size, args.logging_steps) <= 0:
        raise ValueError("--max_steps, --per_device_train_batch_size, --per_device_eval_batch_size and "
                         "--logging_steps must be positive")
    if args.max_length is not None and args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        raise ValueError(f"--max_prompt_length {args.max_prompt_length} leaves no room for a completion within "
                         f"--max_length {args.max_length}")
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval_fraction must lie in [0, 1); got {args.eval_fraction}")


def load_pairs(args: Args):
    """Training pairs and evaluation pairs (or None): common/data.py's load_splits, with a pointer to the script
    that takes a dataset of another type (common/preference.py)."""
    return preference.load_pairs(args, "dpo.py", toy_n=args.num_eval_pairs)


def tokenize_pairs(ds, tokenizer, max_length: int | None, max_prompt_length: int | None) -> tuple[list, int]:
    """(prompt ids, chosen ids, rejected ids) per pair (detail 2), and the number of pairs dropped: an empty prompt
    (nothing predicts the first completion token from it) or one that fills max_length (common/preference.py)."""
    return preference.tokenize_pairs(ds, tokenizer, max_length, max_prompt_length, drop_empty_prompt=True)


pair_batch = preference.shared_prompt_pair_batch  # detail 1's and detail 12's layouts (common/preference.py)


@torch.no_grad()
def precompute_reference(ref_model, rows: list, batch_size: int, make_batch, ld_alpha, accelerator):
    """S^ref of every pair: (N,) chosen and (N,) rejected. Each process computes a contiguous block; gathered."""
    n, world, rank = len(rows), accelerator.num_processes, accelerator.process_index
    per = math.ceil(n / world)
    mine = rows[rank * per:(rank + 1) * per]
    out = torch.zeros(per, 2, dtype=torch.float32, device=accelerator.device)
    for s in range(0, len(mine), batch_size):
        chunk = mine[s:s + batch_size]
        seq = reference_logps(ref_model, make_batch(chunk), ld_alpha)
        out[s:s + len(chunk)] = torch.stack(seq.float().chunk(2), 1)
    allv = distributed.gather_cat(accelerator, out).cpu()[:n]
    return allv[:, 0].contiguous(), allv[:, 1].contiguous()


def load_or_precompute(args, ref_model, train, eval_rows, make_batch, accelerator, resuming: bool) -> dict:
    """Detail 3: reference log-probs from the run's cache when resuming with the same fingerprint, else one pass."""
    from safetensors.torch import load_file, save_file

    fp = hashlib.sha256(json.dumps([args.ref_model_name_or_path or args.model_name_or_path, args.dataset_name,
                                    args.ld_alpha, args.mixed_precision]).encode())
    for row in train + eval_rows:
        fp.update(json.dumps(row).encode())
    h = fp.hexdigest()
    path = os.path.join(args.output_dir, "ref_logps", "ref_logps.safetensors")
    if resuming and os.path.exists(path):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            same = (f.metadata() or {}).get("fingerprint") == h
        if same:
            accelerator.print(f"reference log-probs from {path}")
            return load_file(path)
    bs = args.precompute_ref_batch_size or args.per_device_eval_batch_size
    t0 = time.time()
    cache = {}
    cache["train_chosen"], cache["train_rejected"] = precompute_reference(ref_model, train, bs, make_batch,
                                                                          args.ld_alpha, accelerator)
    if eval_rows:
        cache["eval_chosen"], cache["eval_rejected"] = precompute_reference(ref_model, eval_rows, bs, make_batch,
                                                                            args.ld_alpha, accelerator)
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(cache, path + ".tmp", metadata={"fingerprint": h})
        os.replace(path + ".tmp", path)
    accelerator.wait_for_everyone()
    accelerator.print(f"reference log-probs of {len(train) + len(eval_rows)} pairs in {time.time() - t0:.1f}s "
                      f"-> {path}")
    return cache


def disable_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


# ----------------------------------------------------------------------------- main
def main(args: Args):
    check_args(args)
    dataset = args.dataset_name.replace('/', '_').replace(':', '_')
    args.run_name = args.run_name or f"{args.exp_name}__{dataset}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    weights = list(args.loss_weights or [1.0] * len(args.loss_type))
    accelerator = distributed.make_accelerator(args)
    device, world, GA = accelerator.device, accelerator.num_processes, args.gradient_accumulation_steps

    # data first: a bad dataset fails before any model is built
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    train_ds, eval_ds = load_pairs(args)
    train, dropped = tokenize_pairs(train_ds, tokenizer, args.max_length, args.max_prompt_length)
    eval_rows = tokenize_pairs(eval_ds, tokenizer, args.max_length, args.max_prompt_length)[0] if eval_ds else []
    eval_rows = eval_rows[:args.num_eval_pairs]
    if len(eval_rows) < world:  # every process evaluates a share (at least one pair)
        eval_rows = []
    if dropped:
        accelerator.print(f"dropped {dropped} training pairs whose prompt is empty or fills --max_length "
                          f"{args.max_length}")
    global_bs = distributed.global_batch_size(args, accelerator)
    if global_bs > len(train):
        raise ValueError(f"the dataset has {len(train)} usable pairs, fewer than one global batch of {global_bs}")
    peft_utils.check_args(args)  # LoRA flags and module names, before anything is loaded or written
    # one run per folder, before any model loads
    resume = checkpoint.prepare_output_dir(args, may_change=("num_eval_pairs", "per_device_eval_batch_size",
                                                             "max_new_tokens", "precompute_ref_batch_size"))

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters, the rest frozen
    ref_model = None
    if not args.reference_free:
        ref_model = (model_utils.load_causal_lm(args.ref_model_name_or_path, tokenizer, args.dataset_name,
                                                seed=args.seed) if args.ref_model_name_or_path
                     else peft_utils.reference_model(model) if args.use_peft  # adapters off: no second copy
                     else copy.deepcopy(model))
        ref_model.to(device).eval()  # no requires_grad_(False): detail 10
    if args.disable_dropout:
        disable_dropout(model)
        if ref_model is not None:
            disable_dropout(ref_model)
    # detail 1: the shared-prompt layout needs a custom 4D attention mask, which sdpa (bool) and eager (float) take;
    # the mask replaces a sliding window, so that must be longer than every sequence
    attn = getattr(model.config, "_attn_implementation", None)
    cfg = model.config.get_text_config()
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in train + eval_rows)
    share = args.share_prompt and attn in ("sdpa", "eager") and (not window or longest <= window)
    if args.share_prompt and not share:
        accelerator.print(f"attention {attn!r} (sliding window {window}) cannot take the shared-prompt mask: chosen "
                          "and rejected get their own copy of the prompt, as with --share_prompt False")
    mask_dtype = torch.bool if attn == "sdpa" else next(model.parameters()).dtype
    make_batch = functools.partial(pair_batch, pad_id=tokenizer.pad_token_id, device=device, share_prompt=share,
                                   mask_dtype=mask_dtype, packing=args.packing)
    ref_cache = None
    if args.precompute_ref_log_probs:  # detail 3: one pass, then the reference is not held in memory
        ref_cache = load_or_precompute(args, ref_model, train, eval_rows, make_batch, accelerator, resume is not None)
        ref_model = None

    # the fused kernel (TRL's default optimizer too); not under DeepSpeed / FSDP, which manage their own parameters
    fused = accelerator.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU") and device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=fused)

    def lr_lambda(step):
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.lr_scheduler == "constant":
            return 1.0
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand once per optimizer step

    state = {"bco_delta": 0.0, "bco_count": 0, "ref_syncs": 0, "num_tokens": 0, "skipped_steps": 0}
    start_step, elapsed = 0, 0.0
    if resume is not None:  # detail 4: a TR-DPO reference comes back with the checkpoint
        saved = checkpoint.load_checkpoint(accelerator, resume,
                                           models={"ref": ref_model} if args.sync_ref_model else None)
        start_step, elapsed, state = saved["step"], saved["elapsed"], {**state, **saved["dpo_state"]}
        accelerator.print(f"resumed from {resume} at step {start_step}")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies",
                                     "eval/gold_reward"))
    sorting = set(args.loss_type) & set(SORTING_LOSSES)
    accelerator.print(
        f"dpo: {len(train)} pairs, {len(eval_rows)} eval pairs, "
        f"loss {' + '.join(f'{w:g}·{t}' for t, w in zip(args.loss_type, weights))}"
        f"{f' + {args.rpo_alpha:g}·rpo' if args.rpo_alpha is not None else ''}, β {args.beta}, {global_bs} pairs per "
        f"step, {args.max_steps} steps -> {args.output_dir}"
        + (f"\n  note: {', '.join(sorted(sorting))} sort within each micro-batch of {args.per_device_train_batch_size} "
           "pairs (detail 6)" if sorting and global_bs != args.per_device_train_batch_size else ""))

    want_lss = args.use_weighting

    def pair_quantities(m, rows, batch, ref_seq, want_entropy):
        """PairLogps for a micro-batch (policy with grad), WPO weights, and the no-grad token statistics."""
        mask = batch["completion_mask"].float()  # (2B, T)
        token_logps, st = forward_pairs(m, batch, want_lss, want_entropy)
        seq = ld_sequence_logps(token_logps, mask, args.ld_alpha)  # (2B,)
        if ref_seq is None:
            ref_seq = (torch.zeros_like(seq) if args.reference_free
                       else reference_logps(ref_model, batch, args.ld_alpha))
        lens = mask.sum(1)
        B = len(rows)
        q = PairLogps(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], lens[:B], lens[B:],
                      -(token_logps[:B] * mask[:B]).sum(1))
        pw = wpo_weights(token_logps, st["log_sum_sq"], mask) if args.use_weighting else None
        return q, pw, st, token_logps, mask

    loss_options = {"label_smoothing": args.label_smoothing, "discopop_tau": args.discopop_tau,
                    "f_divergence_type": args.f_divergence_type, "f_alpha": args.f_alpha_divergence_coef}

    def add_stats(acc: dict, q: PairLogps, total, parts, pw, st, mask, targets, beta=args.beta):
        """Sums for the TRL metrics (detail 11), as tensors; reduced once at log time."""
        B = q.chosen.shape[0]
        with torch.no_grad():
            r_w, r_l = beta * (q.chosen - q.ref_chosen), beta * (q.rejected - q.ref_rejected)
            m_w, m_l = mask[:B], mask[B:]
            vals = {"pairs": float(B), "loss": total.sum(), "rewards/chosen": r_w.sum(), "rewards/rejected": r_l.sum(),
                    "rewards/margins": (r_w - r_l).sum(), "rewards/accuracies": (r_w > r_l).float().sum(),
                    "logps/chosen": q.chosen.sum(), "logps/rejected": q.rejected.sum(),
                    "logits/chosen": (st["mean_logits"][:B] * m_w).sum(), "chosen_tokens": m_w.sum(),
                    "logits/rejected": (st["mean_logits"][B:] * m_l).sum(), "rejected_tokens": m_l.sum(),
                    "correct_tokens": ((st["argmax"][:B] == targets[:B]).float() * m_w).sum()}
            if len(parts) > 1:
                vals.update({f"loss/{k}": v.sum() for k, v in parts.items()})
            if pw is not None:
                vals["wpo/weights"] = pw.sum()
            if "entropy" in st:
                vals["entropy"] = (st["entropy"] * mask).sum()
                vals["entropy_tokens"] = mask.sum()
            for k, v in vals.items():
                acc[k] = acc.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else v)

    def reduce_stats(acc: dict, prefix: str = "") -> tuple[dict, dict]:
        """One all-reduce of every sum; the means (prefixed) and the totals."""
        keys = sorted(acc)
        vec = torch.tensor([float(acc[k]) for k in keys], dtype=torch.float64, device=device)
        if world > 1:
            vec = accelerator.reduce(vec, reduction="sum")
        tot = dict(zip(keys, vec.tolist()))
        n = tot["pairs"]
        out = {k: tot[k] / n for k in keys if k.startswith(("loss", "rewards/", "logps/", "wpo/"))}
        out["logits/chosen"] = tot["logits/chosen"] / max(tot["chosen_tokens"], 1)
        out["logits/rejected"] = tot["logits/rejected"] / max(tot["rejected_tokens"], 1)
        out["mean_token_accuracy"] = tot["correct_tokens"] / max(tot["chosen_tokens"], 1)
        if "entropy" in tot:
            out["entropy"] = tot["entropy"] / max(tot["entropy_tokens"], 1)
        return {prefix + k: v for k, v in out.items()}, tot

    eval_tokens_per_pair = (sum(len(r[1]) for r in eval_rows) / len(eval_rows)) if eval_rows else 1.0

    @torch.no_grad()
    def evaluate() -> dict:
        out = {}
        if eval_rows:
            model.eval()
            acc: dict = {}
            mine = list(range(accelerator.process_index, len(eval_rows), world))
            for s in range(0, len(mine), args.per_device_eval_batch_size):
                idx = mine[s:s + args.per_device_eval_batch_size]
                rows = [eval_rows[i] for i in idx]
                batch = make_batch(rows)
                ref_seq = (torch.cat([ref_cache["eval_chosen"][idx], ref_cache["eval_rejected"][idx]]).to(device)
                           if ref_cache is not None else None)
                q, pw, st, _, mask = pair_quantities(model, rows, batch, ref_seq, False)
                total, parts = combined_loss(q, args.loss_type, weights, args.beta, pw, args.rpo_alpha,
                                             eval_tokens_per_pair, bco_delta=state["bco_delta"], **loss_options)
                add_stats(acc, q, total, parts, pw, st, mask, batch["targets"])
            out.update(reduce_stats(acc, "eval/")[0])
            model.train()
        out.update(heldout_gold_reward(model, tokenizer, args.dataset_name, args.num_eval_prompts,
                                       args.max_new_tokens, accelerator=accelerator) if args.num_eval_prompts else {})
        return out

    if start_step == 0 and args.eval_steps:
        tracker.log(evaluate(), 0, args.max_steps)

    acc: dict = {}
    grad_norms: list[float] = []
    bco_running = args.bco_running_mean and "bco_pair" in args.loss_type
    model.train()
    for step in range(start_step, args.max_steps):
        done = step + 1
        log_step = done % args.logging_steps == 0 or done == args.max_steps
        indices = data.batch_indices(len(train), global_bs, step, args.seed)
        micro = distributed.micro_batches(indices, args, accelerator)
        # the step's chosen-token count (known from the data): the sft/rpo global token mean (detail 7)
        tokens_per_pair = sum(len(train[i][1]) for i in indices) / global_bs
        step_rewards = 0.0
        for mb in micro:
            rows = [train[i] for i in mb]
            batch = make_batch(rows)
            ref_seq = (torch.cat([ref_cache["train_chosen"][mb], ref_cache["train_rejected"][mb]]).to(device)
                       if ref_cache is not None else None)
            with accelerator.accumulate(model):
                q, pw, st, token_logps, mask = pair_quantities(model, rows, batch, ref_seq, log_step)
                total, parts = combined_loss(q, args.loss_type, weights, args.beta, pw, args.rpo_alpha,
                                             tokens_per_pair, bco_delta=state["bco_delta"], **loss_options)
                # mean over the global batch's pairs: undo accelerate's 1/accumulation and DDP's 1/processes
                loss = total.sum() / global_bs
                accelerator.backward(loss * GA * world)
                if accelerator.sync_gradients:  # a non-finite gradient norm skips the step
                    gn, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                             args.max_grad_norm)
                    state["skipped_steps"] += not stepped
                    if stepped:
                        grad_norms.append(gn)
            add_stats(acc, q, total, parts, pw, st, mask, batch["targets"])
            if bco_running:
                step_rewards += args.beta * float((q.chosen - q.ref_chosen + q.rejected - q.ref_rejected).sum())
        state["num_tokens"] += sum(2 * len(train[i][0]) + len(train[i][1]) + len(train[i][2]) for i in indices)
        delta_used = state["bco_delta"]
        if bco_running:  # detail 5: one observation per step (the global batch's mean implicit reward), after it
            step_mean = distributed.gather_sum(accelerator, step_rewards) / (2 * global_bs)
            state["bco_delta"], state["bco_count"] = running_mean_update(state["bco_delta"], state["bco_count"],
                                                                         step_mean)
        if args.sync_ref_model and done % args.ref_model_sync_steps == 0:  # detail 4
            with distributed.whole_parameters(accelerator, model) as policy:  # ZeRO-3 / FSDP2: gathered to read
                mix_reference(ref_model, policy, args.ref_model_mixup_alpha)
            state["ref_syncs"] += 1

        eval_step = args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps)
        if log_step or eval_step:
            metrics = {}
            if log_step:
                metrics, _ = reduce_stats(acc)
                metrics.update({"grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                                "learning_rate": scheduler.get_last_lr()[0], "num_tokens": state["num_tokens"],
                                "train/skipped_steps": state["skipped_steps"]})
                if bco_running:
                    metrics["bco/delta"] = delta_used  # the δ this step's loss used
                if args.sync_ref_model:
                    metrics["ref_model_syncs"] = state["ref_syncs"]
                acc, grad_norms = {}, []
            if eval_step:
                metrics.update(evaluate())
            tracker.log(metrics, done, args.max_steps)
        if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
            save(accelerator, args, done, model, tokenizer, tracker, state, ref_model)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir)
    if args.save_steps:
        save(accelerator, args, args.max_steps, model, tokenizer, tracker, state, ref_model)
    tracker.close()
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


def save(accelerator, args, step, model, tokenizer, tracker, state, ref_model):
    checkpoint.save_checkpoint(accelerator, args.output_dir, step, model, tokenizer, args,
                               {"elapsed": tracker.elapsed(), "dpo_state": dict(state)}, args.save_total_limit,
                               models={"ref": ref_model} if args.sync_ref_model else None)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
