"""KTO: Kahneman-Tversky Optimization on unpaired (prompt, completion, label) data.

Paper: "KTO: Model Alignment as Prospect Theoretic Optimization" (Ethayarajh et al., arXiv 2402.01306, Eq. 7-8), as
TRL 1.16's KTOTrainer implements it. For an example (x, y) with label desirable (D) or undesirable (U):
    S(y|x) = Σ_t m_t log π(y_t | x, y_<t)                 sequence log-prob: a sum over completion tokens (EOS included)
    r      = S^θ(y|x) - S^ref(y|x)                        the log-ratio; the implicit reward is β·r
    z      = max(0, mean_j [S^θ(y'_j|x_j) - S^ref(y'_j|x_j)])   the reference point: a detached estimate of
                                                          KL(π‖π_ref) from mismatched pairs (x_j, y'_j)
    kto:                L_D = λ_D (1 - σ(β(r - z))),   L_U = λ_U (1 - σ(β(z - r)))      (Eq. 8, the constant λ_y
                                                          dropped as TRL does; z carries no gradient)
    apo_zero_unpaired:  L_D = λ_D (1 - σ(βr)),         L_U = λ_U σ(βr)     (APO-zero, arXiv 2408.06266 Eq. 7,
                                                          one example at a time; no reference point)
The loss is the mean of L over the examples of the whole optimizer step (all accumulation micro-batches and
processes), λ_D = --desirable_weight, λ_U = --undesirable_weight. The paper advises λ_D n_D / (λ_U n_U) in [1, 4/3]
(n_D, n_U: desirable and undesirable training examples); outside it a start-up warning gives the weights that fit.

Implementation details (numbered so the tests and the README can point at them):
 1. Data: unpaired rows (prompt, completion, label), or preference rows (prompt, chosen, rejected, explicit or
    implicit prompt) converted to two unpaired rows each: chosen -> label True, rejected -> label False (said once at
    start-up). Standard or conversational. Tokenisation and truncation are common/preference.py's: the prompt keeps
    its last --max_prompt_length tokens, the completion its first tokens that fit --max_length; rows whose prompt
    alone fills --max_length are dropped (counted on screen). Data with no desirable or no undesirable example is
    refused with the counts.
 2. Mismatched pairs: the completions of the step's global batch (rows 0..N-1, in global order) are shifted by one,
    row j's prompt with row (j-1 mod N)'s completion, as TRL's "[last] + completions[:-1]". DEVIATION(TRL): TRL
    shifts within each per-device batch; here the shift runs over the whole global batch, so the pairs (and z) are
    the same however the batch is split over processes and accumulation micro-batches. A global batch of one
    example has no mismatched pair and is refused at start-up. A mismatched row longer than --max_length keeps the
    first tokens of its completion that fit (TRL cuts the sequence at max_length, the same tokens).
 3. z: a no-grad pass of the policy and the reference over the step's mismatched rows before the update; the sums
    are all-reduced once, z = max(0, Σ / N), detached. DEVIATION(TRL): TRL computes z per micro-batch (the mean of
    the per-process means of the micro-batch); here z is that of the whole step, so accumulation gives the update
    of one big batch. With one micro-batch and one process the two coincide. apo_zero_unpaired skips this pass.
 4. One policy forward with gradient per micro-batch over [left-padded prompt | right-padded completion] rows, or
    with --packing over the sequences packed into rows as long as the longest (common/packing.py: positions restart
    at every sequence and attention stays within it, no padding inside a row's sequences), each example's S summed
    back from its tokens. The model runs to its final hidden states; the output head and the float32 log-softmax are
    applied only at the positions that predict completion tokens, a block at a time, forward and backward
    (common/model.py's chunked head), so no (B, T, V) logits tensor is made. The reference runs on the same batch
    without gradient; the mismatched pairs of detail 3 go through the same forward. Dropout is off in both (TRL's
    disable_dropout default), so a policy equal to its reference gives r = 0 exactly.
 5. The loss is Σ L over the micro-batch / N (global batch); the backward undoes accelerate's 1/accumulation and
    DDP's 1/processes, so the update is that of the mean over the global batch. Optimizer steps go through
    distributed.optimizer_step (a non-finite gradient norm skips the step, counted as train/skipped_steps).
 6. Metrics follow TRL: kl (= z), rewards/chosen = mean β r over desirable examples, rewards/rejected over
    undesirable ones, rewards/margins = their difference, logps/chosen|rejected = mean S^θ, logits/chosen|rejected
    = mean over completion tokens of the mean logit, loss, entropy (on logging steps), num_tokens, grad_norm,
    learning_rate, plus count/chosen|rejected (examples per step) and, for kto, kl_estimate: the mismatched-pair
    mean before the clamp at 0 (when it is negative z = 0, and kto's loss is then exactly apo_zero_unpaired's:
    1 - σ(β(0 - r)) = σ(βr)). Sums accumulate over every micro-batch since the
    last log and are reduced across processes once. The same with an eval/ prefix on the evaluation rows (their z
    from the mismatched pairs of each evaluation batch), and on toy tasks eval/gold_reward: greedy exact match on
    held-out prompts (common/evaluation.py).

Toy defaults (the benchmark's): the toy SFT policy (toy-sft) on toy:add unpaired rows (one completion per prompt,
the right sum or a near miss, about half each), 64 examples per step, β = 0.1, lr 3e-5, 200 steps; a few minutes on
2 CPU cores. (At dpo.py's toy lr 1e-4 the held-out exact match of seed 1 peaks at 0.73 by step 15 and falls
to 0.44 by step 60, as the desirable completions' log-probs fall too; at 3e-5 it reaches 0.86 at step 200.)

Run:
    python algos/kto.py                                            # KTO on toy:add from the toy SFT policy
    python algos/kto.py --loss_type apo_zero_unpaired
    python algos/kto.py --packing True                             # padding-free micro-batches (detail 4)
    python algos/kto.py --dataset_name my_pairs.jsonl --eval_fraction 0.05   # preference data, converted
    accelerate launch --multi_gpu --num_processes 2 algos/kto.py   # same global batch, same result
    python algos/kto.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/kto-mix-14k \
        --learning_rate 5e-7 --max_length 1024 --per_device_train_batch_size 8 --gradient_accumulation_steps 4
    bash benchmarks/kto.sh                                         # kto and apo_zero_unpaired x 3 seeds
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro

from common import checkpoint, data, distributed, model as model_utils, packing, peft_utils, preference, tracking
from common.evaluation import heldout_gold_reward


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "kto"
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
    """'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name:
    unpaired rows (prompt, completion, label) or preference rows (converted)"""
    dataset_split: str = "train"
    """split to train on"""
    eval_dataset_name: str | None = None
    """held-out data: a file, a save_to_disk folder or a hub name (split eval_split); toy datasets use their test split"""
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
    learning_rate: float = 3e-5
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
    """examples (prompt + one completion) per micro-batch per process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- data
    max_length: int | None = 1024
    """longest prompt+completion kept: completions are cut from the right (the prompt is kept); None: no limit"""
    max_prompt_length: int | None = None
    """prompts longer than this keep their last tokens (cut from the left); None: no limit of its own"""
    packing: bool = False
    """padding-free micro-batches: the micro-batch's [prompt | completion] sequences (and the mismatched pairs')
    packed into rows as long as the longest (best-fit decreasing; positions restart and attention stays within each
    sequence; common/packing.py). The same sequences and loss as without it, less compute on padding"""
    # --- the loss
    loss_type: str = "kto"
    """'kto' (with the reference point z) or 'apo_zero_unpaired' (no z)"""
    beta: float = 0.1
    """β: the implicit reward scale (higher = closer to the reference)"""
    desirable_weight: float = 1.0
    """λ_D: weight of the desirable examples' losses"""
    undesirable_weight: float = 1.0
    """λ_U: weight of the undesirable examples' losses"""
    disable_dropout: bool = True
    """turn dropout off in the policy and the reference"""
    # --- evaluation
    eval_steps: int = 50
    """evaluate every this many optimizer steps (and at step 0 and at the end); 0: never"""
    num_eval_rows: int = 512
    """at most this many evaluation rows for the eval/ KTO metrics"""
    per_device_eval_batch_size: int = 128
    """evaluation rows per forward"""
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


LOSS_TYPES = ("kto", "apo_zero_unpaired")


# ----------------------------------------------------------------------------- math
# Shapes: B examples per micro-batch, N per optimizer step (global), T completion tokens (padded), K completion tokens
# of a micro-batch (both layouts), V vocabulary.
def mismatched_completions(n: int) -> list[int]:
    """Detail 2: which row's completion goes with row j's prompt in the mismatched pairs: [n-1, 0, 1, ..., n-2]."""
    assert n >= 2, "mismatched pairs need at least two rows"
    return [n - 1] + list(range(n - 1))


def reference_point(kl_logratio_sum: float, n: int) -> float:
    """Detail 3: z = max(0, mean over the N mismatched pairs of S^θ - S^ref), from their sum (all processes)."""
    return max(0.0, kl_logratio_sum / n)


def kto_losses(logratio: torch.Tensor, desirable: torch.Tensor, z: float, beta: float, desirable_weight: float,
               undesirable_weight: float, loss_type: str = "kto") -> torch.Tensor:
    """Per-example weighted losses (B,) from log-ratios r (B,) and labels (B,) bool (True = desirable)."""
    assert logratio.dim() == 1 and desirable.shape == logratio.shape and desirable.dtype == torch.bool
    if loss_type == "kto":
        loss_d = 1 - torch.sigmoid(beta * (logratio - z))
        loss_u = 1 - torch.sigmoid(beta * (z - logratio))
    elif loss_type == "apo_zero_unpaired":
        loss_d = 1 - torch.sigmoid(beta * logratio)
        loss_u = torch.sigmoid(beta * logratio)
    else:
        raise ValueError(f"unknown loss_type '{loss_type}'; choose one of {LOSS_TYPES}")
    return torch.where(desirable, desirable_weight * loss_d, undesirable_weight * loss_u)


def balance_warning(n_d: int, n_u: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """The paper's advice λ_D n_D / (λ_U n_U) ∈ [1, 4/3] (the ratio rounded to two decimals, as TRL rounds its
    bounds): None when it holds, else the message with the λ_D or λ_U ranges that satisfy it."""
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    if 1.0 <= round(ratio, 2) <= 1.33:
        return None
    d_lo, d_hi = undesirable_weight * n_u / n_d, 4 / 3 * undesirable_weight * n_u / n_d
    u_lo, u_hi = 3 / 4 * desirable_weight * n_d / n_u, desirable_weight * n_d / n_u
    return (f"warning: λ_D·n_D / (λ_U·n_U) = {desirable_weight:g}·{n_d} / ({undesirable_weight:g}·{n_u}) = "
            f"{ratio:.3f}, outside the paper's [1, 4/3]; use EITHER --desirable_weight in [{d_lo:.3g}, {d_hi:.3g}] "
            f"OR --undesirable_weight in [{u_lo:.3g}, {u_hi:.3g}] (not both)")


# ----------------------------------------------------------------------------- forwards
# Both layouts (detail 4) describe the trained tokens the same way: K completion tokens, `pred` (K, 2) = (row, column)
# of the position whose output predicts each, `targets` (K,), `seq` (K,) = the example each belongs to, `n` examples,
# `keep` = how many last positions of each row the forward keeps (pred's columns are full-row columns).
def padded_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device,
                 max_length: int | None) -> dict:
    """[left-padded prompt | right-padded completion] rows (B, P+T) (common/preference.py) and their K completion
    tokens in the shared description above."""
    b = preference.completion_batch(prompts, completions, pad_id, device, max_length)
    L, T = b["input_ids"].shape[1], b["completion_mask"].shape[1]
    rows, t = b["completion_mask"].nonzero(as_tuple=True)  # (K,): example by example, tokens in order
    b.update(position_ids=model_utils.position_ids_from_mask(b["attention_mask"]), keep=T + 1,
             pred=torch.stack([rows, L - T - 1 + t], 1), targets=b["input_ids"][rows, L - T + t], seq=rows,
             n=len(prompts))
    return b


def packed_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device,
                 max_length: int | None) -> dict:
    """--packing: the [prompt | completion] sequences packed into rows as long as the longest (common/packing.py:
    best-fit decreasing, positions restart at every sequence, attention stays within it), no padding inside a
    sequence; the completions cut as in padded_batch, so the same K tokens are trained."""
    if max_length:
        completions = [c[:max(1, max_length - len(p))] for p, c in zip(prompts, completions)]
    seqs = [p + c for p, c in zip(prompts, completions)]
    b = packing.pack_rows(seqs, [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)],
                          max(len(q) for q in seqs), pad_id, device)
    b.update(attention_mask=None, keep=b["input_ids"].shape[1], n=len(seqs))
    return b


def per_example(batch: dict, values: torch.Tensor) -> torch.Tensor:
    """Sums (B,) of per-token values (K,) over each example's completion tokens."""
    out = torch.zeros(batch["n"], dtype=values.dtype, device=values.device)
    return out.index_add(0, batch["seq"], values)


def sequence_logps(model, batch: dict, want_stats: bool = False, want_entropy: bool = False):
    """S (B,) of a batch in either layout (detail 4), and with want_stats the no-grad per-example sums over its
    completion tokens of the mean logit (over the vocabulary), of the entropy (want_entropy) and the token count.
    The model runs to its final hidden states; the output head and the float32 log-softmax are applied only at the
    K predicting positions, a block at a time (common/model.py's logps_at), so no (B, T, V) logits tensor is made,
    forward or backward (models whose logits are not a plain head of the hidden state get them from the forward)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    L, keep, pred = batch["input_ids"].shape[1], batch["keep"], batch["pred"]
    stats = (("mean_logits",) + ("entropy",) * want_entropy) if want_stats else ()
    out = model_utils.logps_at(model, inputs, keep, pred[:, 0], pred[:, 1] - (L - keep), batch["targets"],
                               stats=stats)
    token_logps, st = out if stats else (out, None)  # (K,)
    seq = per_example(batch, token_logps)  # (B,)
    if st is not None:
        st = {**{k: per_example(batch, v) for k, v in st.items()}, "tokens": per_example(batch, torch.ones_like(
            token_logps.detach()))}
    return seq, st


# ----------------------------------------------------------------------------- checks and data
def check_args(args: Args):
    """Every configuration error, before any data or model is loaded."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type {args.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive; got {args.beta}")
    if args.desirable_weight < 0 or args.undesirable_weight < 0:
        raise ValueError("--desirable_weight and --undesirable_weight must be non-negative")
    if args.lr_scheduler not in ("constant", "linear"):
        raise ValueError(f"--lr_scheduler {args.lr_scheduler!r}: choose 'constant' or 'linear'")
    if min(args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps,
           args.per_device_eval_batch_size, args.logging_steps) <= 0:
        raise ValueError("--max_steps, --per_device_train_batch_size, --gradient_accumulation_steps, "
                         "--per_device_eval_batch_size and --logging_steps must be positive")
    if args.max_length is not None and args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        raise ValueError(f"--max_prompt_length {args.max_prompt_length} leaves no room for a completion within "
                         f"--max_length {args.max_length}")


def check_batch(args: Args, world: int):
    """Detail 2: the mismatched pairs need two examples in the global batch."""
    if args.loss_type == "kto" and args.per_device_train_batch_size * world * args.gradient_accumulation_steps < 2:
        raise ValueError("KTO's reference point z comes from mismatched (prompt, completion) pairs of the global batch "
                         "(row j's prompt with row j-1's completion), and a global batch of 1 example has none: its z "
                         "would be the example's own reward. Use --per_device_train_batch_size 2 or more (TRL needs "
                         "> 1 per device), or --gradient_accumulation_steps 2 or more")


def check_labels(rows: list, desirable_weight: float, undesirable_weight: float) -> tuple[int, int, str | None]:
    """(n_D, n_U, balance warning or None); data with only one kind of example is refused with the counts."""
    n_d = sum(1 for r in rows if r[2])
    n_u = len(rows) - n_d
    if n_d == 0 or n_u == 0:
        raise ValueError(f"KTO needs desirable (label True) and undesirable (label False) examples; the training data "
                         f"has {n_d} desirable and {n_u} undesirable rows. Add rows of the missing kind (for "
                         "desirable-only data, sft.py is the method)")
    return n_d, n_u, balance_warning(n_d, n_u, desirable_weight, undesirable_weight)


def disable_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


# ----------------------------------------------------------------------------- main
def main(args: Args):
    check_args(args)
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    accelerator = distributed.make_accelerator(args)
    device, world, GA = accelerator.device, accelerator.num_processes, args.gradient_accumulation_steps
    check_batch(args, world)
    use_z = args.loss_type == "kto"

    # data first: a bad dataset fails before any model is built (detail 1)
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    train_ds, eval_ds, converted = preference.load_unpaired(args, "kto.py", toy_n=args.num_eval_rows)
    if converted:
        accelerator.print("kto: preference data converted to unpaired rows: each pair gives its chosen completion "
                          "(label True, desirable) and its rejected one (label False, undesirable)")
    train, dropped = preference.tokenize_unpaired(train_ds, tokenizer, args.max_length, args.max_prompt_length)
    eval_rows = (preference.tokenize_unpaired(eval_ds, tokenizer, args.max_length, args.max_prompt_length)[0]
                 if eval_ds is not None else [])[:args.num_eval_rows]
    if len(eval_rows) < 2 * world:  # every process evaluates a share, and z needs mismatched pairs
        eval_rows = []
    if dropped:
        accelerator.print(f"dropped {dropped} training rows whose prompt alone fills --max_length {args.max_length}")
    n_d, n_u, warning = check_labels(train, args.desirable_weight, args.undesirable_weight)
    if warning:
        accelerator.print(warning)
    global_bs = distributed.global_batch_size(args, accelerator)
    data.check_batch_fits(len(train), global_bs, ["--per_device_train_batch_size", "--gradient_accumulation_steps"])
    peft_utils.check_args(args)  # LoRA flags and module names, before anything is loaded or written
    # one run per folder, before any model loads
    resume = checkpoint.prepare_output_dir(args, may_change=("num_eval_rows", "per_device_eval_batch_size",
                                                             "num_eval_prompts", "max_new_tokens"))

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters, the rest frozen
    ref_model = (model_utils.load_causal_lm(args.ref_model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
                 if args.ref_model_name_or_path else peft_utils.reference_model(model) if args.use_peft
                 else copy.deepcopy(model))  # --use_peft: the policy with its adapters off (no second copy)
    # no requires_grad_(False): the reference only runs under no_grad, and on CPU frozen weights take another matmul
    # path whose rounding differs, so policy = reference would not give exactly r = 0
    ref_model.to(device).eval()
    if args.disable_dropout:
        disable_dropout(model)
        disable_dropout(ref_model)
    pad_id = tokenizer.pad_token_id

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    def lr_lambda(step):
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.lr_scheduler == "constant":
            return 1.0
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand once per optimizer step

    state = {"num_tokens": 0, "skipped_steps": 0}
    start_step, elapsed = 0, 0.0
    if resume is not None:
        saved = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed, state = saved["step"], saved["elapsed"], {**state, **saved["kto_state"]}
        accelerator.print(f"resumed from {resume} at step {start_step}")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss", "kl", "rewards/margins", "eval/gold_reward"))
    accelerator.print(f"kto: {len(train)} rows ({n_d} desirable, {n_u} undesirable), {len(eval_rows)} eval rows, "
                      f"loss {args.loss_type}, β {args.beta}, λ_D {args.desirable_weight:g}, λ_U "
                      f"{args.undesirable_weight:g}, {global_bs} examples per step, {args.max_steps} steps -> "
                      f"{args.output_dir}")

    def batch_of(prompts, completions):
        return (packed_batch if args.packing else padded_batch)(prompts, completions, pad_id, device, args.max_length)

    @torch.no_grad()
    def kl_sum(m, rows: list, positions: list[int], shift: list[int]) -> float:
        """Σ S^θ - S^ref over the mismatched pairs of the rows at `positions` (detail 3): prompt of rows[j] with
        the completion of rows[shift[j]]."""
        if not positions:
            return 0.0
        batch = batch_of([rows[j][0] for j in positions], [rows[shift[j]][1] for j in positions])
        return float((sequence_logps(m, batch)[0] - sequence_logps(ref_model, batch)[0]).sum())

    def step_z(m, rows: list, my_positions: list[list[int]]) -> tuple[float, float]:
        """(z, the unclamped estimate Σ / N) of a global batch `rows` (every process holds the same list), from this
        process's share."""
        if not use_z:
            return 0.0, 0.0
        shift = mismatched_completions(len(rows))
        total = distributed.gather_sum(accelerator, sum(kl_sum(m, rows, pos, shift) for pos in my_positions))
        return reference_point(total, len(rows)), total / len(rows)

    def micro_step(m, rows: list, z: float, want_entropy: bool, acc: dict):
        """Losses (B,) of one micro-batch (policy with grad when enabled), and the metric sums added to `acc`."""
        batch = batch_of([r[0] for r in rows], [r[1] for r in rows])
        desirable = torch.tensor([r[2] for r in rows], dtype=torch.bool, device=device)
        with torch.no_grad():
            ref_seq = sequence_logps(ref_model, batch)[0]
        seq, st = sequence_logps(m, batch, want_stats=True, want_entropy=want_entropy)
        losses = kto_losses(seq - ref_seq, desirable, z, args.beta, args.desirable_weight,
                            args.undesirable_weight, args.loss_type)
        with torch.no_grad():  # detail 6: sums, reduced once at log time
            ntok = st["tokens"].double()
            rewards = args.beta * (seq - ref_seq)
            d, u = desirable.double(), (~desirable).double()
            tok_logits = st["mean_logits"].double()
            vals = {"examples": float(len(rows)), "loss": losses.sum(), "count/chosen": d.sum(),
                    "count/rejected": u.sum(),
                    "rewards/chosen": (rewards * d).sum(), "rewards/rejected": (rewards * u).sum(),
                    "logps/chosen": (seq * d).sum(), "logps/rejected": (seq * u).sum(),
                    "logits/chosen": (tok_logits * d).sum(), "logits/rejected": (tok_logits * u).sum(),
                    "tokens/chosen": (ntok * d).sum(), "tokens/rejected": (ntok * u).sum()}
            if want_entropy:
                vals["entropy"] = st["entropy"].sum()
                vals["entropy_tokens"] = ntok.sum()
            for k, v in vals.items():
                acc[k] = acc.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else v)
        return losses

    def reduce_stats(acc: dict, prefix: str = "") -> dict:
        """One all-reduce of every sum, then the means."""
        keys = sorted(acc)
        vec = torch.tensor([float(acc[k]) for k in keys], dtype=torch.float64, device=device)
        if world > 1:
            vec = accelerator.reduce(vec, reduction="sum")
        tot = dict(zip(keys, vec.tolist()))
        nd, nu = tot["count/chosen"], tot["count/rejected"]
        out = {"loss": tot["loss"] / tot["examples"]}
        for side, n in (("chosen", nd), ("rejected", nu)):
            if n > 0:  # TRL leaves a side out of the log when the window had none of it
                out[f"rewards/{side}"] = tot[f"rewards/{side}"] / n
                out[f"logps/{side}"] = tot[f"logps/{side}"] / n
                out[f"logits/{side}"] = tot[f"logits/{side}"] / max(tot[f"tokens/{side}"], 1)
        if nd > 0 and nu > 0:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if "entropy" in tot:
            out["entropy"] = tot["entropy"] / max(tot["entropy_tokens"], 1)
        return {prefix + k: v for k, v in out.items()}, tot

    @torch.no_grad()
    def evaluate() -> dict:
        out = {}
        if eval_rows:
            model.eval()
            acc: dict = {}
            zs, raws = [], []
            E = args.per_device_eval_batch_size * world
            for s in range(0, len(eval_rows), E):
                rows = eval_rows[s:s + E]
                if len(rows) < 2:
                    break
                mine = list(range(accelerator.process_index, len(rows), world))
                z, raw = step_z(model, rows, [mine])
                zs.append(z)
                raws.append(raw)
                if mine:
                    micro_step(model, [rows[j] for j in mine], z, False, acc)
            stats, tot = reduce_stats(acc, "eval/")
            out.update(stats)
            out["eval/kl"] = sum(zs) / len(zs)
            if use_z:
                out["eval/kl_estimate"] = sum(raws) / len(raws)
            out["eval/count/chosen"], out["eval/count/rejected"] = tot["count/chosen"], tot["count/rejected"]
            model.train()
        out.update(heldout_gold_reward(model, tokenizer, args.dataset_name, args.num_eval_prompts,
                                       args.max_new_tokens, accelerator=accelerator) if args.num_eval_prompts else {})
        return out

    if start_step == 0 and args.eval_steps:
        tracker.log(evaluate(), 0, args.max_steps)

    acc: dict = {}
    grad_norms, zs, raws = [], [], []
    model.train()
    for step in range(start_step, args.max_steps):
        done = step + 1
        log_step = done % args.logging_steps == 0 or done == args.max_steps
        indices = data.batch_indices(len(train), global_bs, step, args.seed)
        rows = [train[i] for i in indices]  # the global batch, in global order, on every process
        micro = distributed.micro_batches(list(range(global_bs)), args, accelerator)  # positions in `rows`
        z, raw = step_z(model, rows, micro)  # detail 3: before the update, detached
        zs.append(z)
        raws.append(raw)
        for pos in micro:
            with accelerator.accumulate(model):
                losses = micro_step(model, [rows[j] for j in pos], z, log_step, acc)
                # mean over the global batch (detail 5): undo accelerate's 1/accumulation and DDP's 1/processes
                accelerator.backward(losses.sum() / global_bs * GA * world)
                if accelerator.sync_gradients:  # a non-finite gradient norm skips the step
                    gn, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                             args.max_grad_norm)
                    state["skipped_steps"] += not stepped
                    if stepped:
                        grad_norms.append(gn)
        state["num_tokens"] += sum(len(r[0]) + len(r[1]) for r in rows)

        eval_step = args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps)
        if log_step or eval_step:
            metrics = {}
            if log_step:
                metrics, tot = reduce_stats(acc)
                metrics.update({"kl": sum(zs) / len(zs), "count/chosen": tot["count/chosen"] / len(zs),
                                "count/rejected": tot["count/rejected"] / len(zs),
                                "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                                "learning_rate": scheduler.get_last_lr()[0], "num_tokens": state["num_tokens"],
                                "train/skipped_steps": state["skipped_steps"]})
                if use_z:
                    metrics["kl_estimate"] = sum(raws) / len(raws)
                acc, grad_norms, zs, raws = {}, [], [], []
            if eval_step:
                metrics.update(evaluate())
            tracker.log(metrics, done, args.max_steps)
        if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
            save(accelerator, args, done, model, tokenizer, tracker, state)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir)
    if args.save_steps:
        save(accelerator, args, args.max_steps, model, tokenizer, tracker, state)
    tracker.close()
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


def save(accelerator, args, step, model, tokenizer, tracker, state):
    checkpoint.save_checkpoint(accelerator, args.output_dir, step, model, tokenizer, args,
                               {"elapsed": tracker.elapsed(), "kto_state": dict(state)}, args.save_total_limit)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
