"""BCO: Binary Classifier Optimization on unpaired (prompt, completion, label) data.

Paper: "Binary Classifier Optimization for Large Language Model Alignment" (Jung et al., arXiv 2404.04656, Eq. 6-7
and Sec. 4.2 for UDM), as TRL's BCOTrainer implemented it (it lived in trl.experimental.bco until TRL 1.13). The
policy's implicit reward is the logit of a binary classifier "desirable vs undesirable":
    S(y|x) = Σ_t m_t log π(y_t | x, y_<t)            sequence log-prob: a sum over completion tokens (EOS included)
    r      = β (S^θ(y|x) - S^ref(y|x))               the implicit reward
    δ      = the running mean of every r seen in training so far (the reward shift)
    desirable:    L = -log σ(r - δ)
    undesirable:  L = -w(x) log σ(-(r - δ))          w = 1, or the UDM density ratio below
The loss is the mean of L over the examples of the whole optimizer step (all accumulation micro-batches and
processes). At policy = reference, r = 0 and δ = 0: L = log 2 for every example.

UDM (underlying distribution matching, --udm True, Sec. 4.2): when desirable and undesirable examples come from
different prompt distributions, undesirable examples are reweighted by the density ratio p_D(x) / p_U(x) ≈
P(D | x) / P(U | x) of a logistic-regression classifier on prompt embeddings, clipped to [--min_density_ratio,
--max_density_ratio] ([0.5, 10], TRL's defaults).

Implementation details (numbered so the tests and the README can point at them):
 1. Data: unpaired rows (prompt, completion, label), or preference rows (explicit or implicit prompt) converted to
    two unpaired rows each: chosen -> label True, rejected -> label False (said once at start-up). Standard or
    conversational. Tokenisation and truncation are common/preference.py's: the prompt keeps its last
    --max_prompt_length tokens, the completion its first tokens that fit --max_length; rows whose prompt alone
    fills --max_length are dropped (counted on screen). Data with no desirable or no undesirable example is refused
    with the counts.
 2. δ is the count-weighted running mean of all implicit rewards of the training batches seen so far (TRL's
    RunningMoments mean), updated with each optimizer step's global batch BEFORE that step's loss uses it (as TRL
    updates it before use), all processes together (one all-reduce of the reward sum and count). With one
    micro-batch per step the rewards come from the training forward itself; with gradient accumulation a no-grad
    pass of the policy over the step's micro-batches comes first, so δ is the same for every micro-batch and
    accumulation gives the update of one big batch. DEVIATION(TRL): TRL updates δ with each micro-batch, so under
    accumulation its earlier micro-batches use a δ that has not seen the later ones. δ and its count are saved with
    each checkpoint and restored on resume. Evaluation uses δ without updating it.
 3. UDM embeddings come from the model itself, so no embedding model or network is needed: the mean over prompt
    tokens of the reference's (by default the starting policy's) last hidden layer. The reference is fixed, so the
    embedding of a prompt never changes. At start-up, up to --prompt_sample_size desirable and as many undesirable
    prompts (a seeded sample) are embedded and a logistic regression is fitted (class-balanced, L2 penalty ½‖w‖²
    as scikit-learn's default C = 1, L-BFGS in float64, the same on every process). During training the
    embeddings come for free from the reference forward of each row (causal attention: the prompt positions see only
    the prompt). The classifier is saved with each checkpoint and restored on resume (not refitted).
 4. One policy forward with gradient per micro-batch over [left-padded prompt | right-padded completion] rows, or
    with --packing over the sequences packed into rows as long as the longest (common/packing.py: positions restart
    at every sequence and attention stays within it, no padding inside a row's sequences), each example's S summed
    back from its tokens. The model runs to its final hidden states; the output head and the float32 log-softmax are
    applied only at the positions that predict completion tokens, a block at a time, forward and backward
    (common/model.py's chunked head), so no (B, T, V) logits tensor is made. The reference runs on the same batch
    without gradient (and gives the UDM prompt embeddings from the same hidden states). Dropout is off in both
    (TRL's disable_dropout default), so a policy equal to its reference gives r = 0 exactly.
 5. The loss is Σ L over the micro-batch / N (global batch); the backward undoes accelerate's 1/accumulation and
    DDP's 1/processes. Optimizer steps go through distributed.optimizer_step (a non-finite gradient norm skips the
    step, counted as train/skipped_steps).
 6. Metrics follow TRL's BCOTrainer: delta (the δ the step's loss used), rewards/chosen = mean r over desirable
    examples, rewards/rejected over undesirable ones, rewards/margins = their difference, logps/chosen|rejected =
    mean S^θ, count/chosen|rejected (examples per step), loss; logits/chosen|rejected = mean over completion tokens
    of the mean logit (DEVIATION(TRL): TRL divides the sum of every logit of the sequences by the example count);
    with UDM, udm/weight (mean weight of the undesirable examples); plus entropy (on logging steps), num_tokens,
    grad_norm, learning_rate. Sums accumulate over every micro-batch since the last log and are reduced across
    processes once. The same with an eval/ prefix on the evaluation rows, and on toy tasks eval/gold_reward: greedy
    exact match on held-out prompts (common/evaluation.py).

Toy defaults (the benchmark's): the toy SFT policy (toy-sft) on toy:add unpaired rows (one completion per prompt,
the right sum or a near miss, about half each), 64 examples per step, β = 0.1, lr 3e-5, 200 steps; a few minutes on
2 CPU cores. (At dpo.py's toy lr 1e-4 the held-out exact match of seed 1 swings between 0.64 and 0.81 over steps
25-200; at 3e-5 it rises to 0.82 by step 25 and ends at 0.87.)

Run:
    python algos/bco.py                                            # BCO on toy:add from the toy SFT policy
    python algos/bco.py --udm True                                 # with the density-ratio reweighting
    python algos/bco.py --packing True                             # padding-free micro-batches (detail 4)
    python algos/bco.py --dataset_name my_pairs.jsonl --eval_fraction 0.05   # preference data, converted
    accelerate launch --multi_gpu --num_processes 2 algos/bco.py   # same global batch, same result
    python algos/bco.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/kto-mix-14k \
        --learning_rate 5e-7 --max_length 1024 --per_device_train_batch_size 8 --gradient_accumulation_steps 4
    bash benchmarks/bco.sh                                         # bco and bco + UDM x 3 seeds
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
import tyro

from common import checkpoint, data, distributed, model as model_utils, packing, peft_utils, preference, tracking
from common.evaluation import heldout_gold_reward


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "bco"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (data order, the UDM prompt sample)"""
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
    """AdamW learning rate (the toy model's; TRL's default for real models is 5e-7)"""
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
    """padding-free micro-batches: the micro-batch's [prompt | completion] sequences packed into rows as long as the
    longest (best-fit decreasing; positions restart and attention stays within each sequence; common/packing.py).
    The same sequences and loss as without it, less compute on padding"""
    # --- the loss
    beta: float = 0.1
    """β: the implicit reward scale (higher = closer to the reference)"""
    udm: bool = False
    """underlying distribution matching: reweight undesirable examples by a prompt density ratio (detail 3)"""
    prompt_sample_size: int = 1024
    """UDM: prompts of each kind (desirable, undesirable) the density-ratio classifier is fitted on"""
    min_density_ratio: float = 0.5
    """UDM: the density ratio is clipped from below to this value"""
    max_density_ratio: float = 10.0
    """UDM: the density ratio is clipped from above to this value"""
    disable_dropout: bool = True
    """turn dropout off in the policy and the reference"""
    # --- evaluation
    eval_steps: int = 50
    """evaluate every this many optimizer steps (and at step 0 and at the end); 0: never"""
    num_eval_rows: int = 512
    """at most this many evaluation rows for the eval/ BCO metrics"""
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


# ----------------------------------------------------------------------------- math
# Shapes: B examples per micro-batch, N per optimizer step (global), T completion tokens (padded), K completion tokens
# of a micro-batch (both layouts), H hidden size.
def bco_losses(rewards: torch.Tensor, desirable: torch.Tensor, delta: float,
               undesirable_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example losses (B,) from implicit rewards r = β(S^θ - S^ref) (B,), labels (B,) bool (True = desirable),
    the shift δ and optional UDM weights (B,) (used on the undesirable examples only)."""
    assert rewards.dim() == 1 and desirable.shape == rewards.shape and desirable.dtype == torch.bool
    loss_d = -F.logsigmoid(rewards - delta)
    loss_u = -F.logsigmoid(-(rewards - delta))
    if undesirable_weights is not None:
        assert undesirable_weights.shape == rewards.shape
        loss_u = undesirable_weights * loss_u
    return torch.where(desirable, loss_d, loss_u)


def running_mean_update(mean: float, count: int, batch_sum: float, batch_count: int) -> tuple[float, int]:
    """Detail 2: the mean of every value seen, after a batch of `batch_count` values summing to `batch_sum`."""
    total = count + batch_count
    return mean + (batch_sum / batch_count - mean) * batch_count / total, total


def fit_density_classifier(x: torch.Tensor, y: torch.Tensor, l2: float = 1.0,
                           max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Detail 3: logistic regression P(desirable | embedding) on x (n, H), y (n,) bool: class-balanced log loss
    Σ_i c_i ℓ_i with c = n / (2 n_class), plus l2/2 ‖w‖² (the bias is not penalised), by L-BFGS in float64.
    Returns (w (H,), b ())."""
    assert x.dim() == 2 and y.shape == (x.shape[0],) and y.dtype == torch.bool
    x, t = x.double().cpu(), y.double().cpu()
    n_pos, n_neg = float(t.sum()), float((1 - t).sum())
    assert n_pos > 0 and n_neg > 0, "the classifier needs examples of both kinds"
    c = torch.where(y.cpu(), len(t) / (2 * n_pos), len(t) / (2 * n_neg))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (c * F.binary_cross_entropy_with_logits(x @ w + b, t, reduction="none")).sum() + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def density_ratio_weights(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """UDM weights (B,) = clip(p / (1 - p), lo, hi), p = σ(x·w + b) the classifier's P(desirable | prompt)."""
    p = torch.sigmoid(x.double().to(w.device) @ w + b)
    return (p / (1 - p + 1e-8)).clamp(min=lo, max=hi)


# ----------------------------------------------------------------------------- forwards
# Both layouts (detail 4) describe the trained tokens the same way: K completion tokens, `pred` (K, 2) = (row, column)
# of the position whose output predicts each, `targets` (K,), `seq` (K,) = the example each belongs to, `n` examples,
# `keep` = how many last positions of each row the forward keeps (pred's columns are full-row columns); and the M
# prompt tokens (detail 3): `prompt_pos` (M, 2), `prompt_seq` (M,).
def padded_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device,
                 max_length: int | None = None) -> dict:
    """[left-padded prompt | right-padded completion] rows (B, P+T) (common/preference.py) and their completion and
    prompt tokens in the shared description above."""
    b = preference.completion_batch(prompts, completions, pad_id, device, max_length)
    L, T = b["input_ids"].shape[1], b["completion_mask"].shape[1]
    rows, t = b["completion_mask"].nonzero(as_tuple=True)  # (K,): example by example, tokens in order
    prompt_pos = b["attention_mask"][:, :L - T].nonzero()  # (M, 2)
    b.update(position_ids=model_utils.position_ids_from_mask(b["attention_mask"]), keep=T + 1,
             pred=torch.stack([rows, L - T - 1 + t], 1), targets=b["input_ids"][rows, L - T + t], seq=rows,
             n=len(prompts), prompt_pos=prompt_pos, prompt_seq=prompt_pos[:, 0])
    return b


def packed_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device,
                 max_length: int | None = None) -> dict:
    """--packing: the [prompt | completion] sequences packed into rows as long as the longest (common/packing.py:
    best-fit decreasing, positions restart at every sequence, attention stays within it), no padding inside a
    sequence; the completions cut as in padded_batch, so the same K tokens are trained."""
    if max_length:
        completions = [c[:max(1, max_length - len(p))] for p, c in zip(prompts, completions)]
    seqs = [p + c for p, c in zip(prompts, completions)]
    b = packing.pack_rows(seqs, [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)],
                          max(len(q) for q in seqs), pad_id, device)
    starts = [(int(r), int(c) - len(q) + 1) for (r, c), q in zip(b["last"].tolist(), seqs)]
    prompt_pos = [(r, c + j) for (r, c), p in zip(starts, prompts) for j in range(len(p))]
    b.update(attention_mask=None, keep=b["input_ids"].shape[1], n=len(seqs),
             prompt_pos=torch.tensor(prompt_pos, dtype=torch.long, device=device).view(-1, 2),
             prompt_seq=torch.tensor([i for i, p in enumerate(prompts) for _ in p], dtype=torch.long, device=device))
    return b


def per_example(n: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sums (n, ...) of per-token values (K, ...) over the tokens of each example (index (K,))."""
    return torch.zeros((n,) + values.shape[1:], dtype=values.dtype, device=values.device).index_add(0, index, values)


def sequence_logps(model, batch: dict, want_stats: bool = False, want_entropy: bool = False,
                   want_embedding: bool = False):
    """S (B,) of a batch in either layout (detail 4); with want_stats the no-grad per-example sums over its
    completion tokens of the mean logit (over the vocabulary), of the entropy (want_entropy) and the token count;
    with want_embedding the prompt embeddings (B, H) (detail 3). The model runs to its final hidden states; the
    output head and the float32 log-softmax are applied only at the K predicting positions, a block at a time
    (common/model.py's chunked head), so no (B, T, V) logits tensor is made, forward or backward (models whose logits
    are not a plain head of the hidden state get them from the forward)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    L, pred, n = batch["input_ids"].shape[1], batch["pred"], batch["n"]
    keep = L if want_embedding else batch["keep"]  # the embeddings need the prompt positions too
    rows, cols = pred[:, 0], pred[:, 1] - (L - keep)
    stats = (("mean_logits",) + ("entropy",) * want_entropy) if want_stats else ()
    head = model_utils.chunked_head(model)
    if head is not None:
        hidden = model_utils.hidden_before_head(model, head, keep, **inputs)  # (R, keep, H)
        out = model_utils.head_logps(hidden[rows, cols], head, batch["targets"], stats=stats)
        token_logps, st = out if stats else (out, None)
    else:
        o = model(**inputs, logits_to_keep=keep, use_cache=False, output_hidden_states=want_embedding)
        hidden = o.hidden_states[-1] if want_embedding else None  # after the final norm, as fed to the head
        logits = o.logits[rows, cols]  # (K, V)
        token_logps = model_utils.selective_log_softmax(logits, batch["targets"])
        st = model_utils.logits_stats(logits, stats) if stats else None
    seq = per_example(n, batch["seq"], token_logps)  # (B,)
    if st is not None:
        st = {**{k: per_example(n, batch["seq"], v) for k, v in st.items()},
              "tokens": per_example(n, batch["seq"], torch.ones_like(token_logps.detach()))}
    emb = None
    if want_embedding:  # the mean over each prompt's tokens of the final hidden states
        pr, ps = batch["prompt_pos"], batch["prompt_seq"]
        emb = per_example(n, ps, hidden[pr[:, 0], pr[:, 1]].detach().float())
        emb = emb / per_example(n, ps, torch.ones(len(ps), device=emb.device)).clamp(min=1)[:, None]
    return seq, st, emb


def prompt_mean(hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Mean over prompt tokens (B, H) of hidden states (B, P, H) under a 0/1 prompt mask (B, P)."""
    m = prompt_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def prompt_embeddings(model, prompts: list[list[int]], pad_id: int, batch_size: int, accelerator) -> torch.Tensor:
    """Detail 3: embeddings (n, H) of tokenised prompts; each process embeds a contiguous block, gathered."""
    n, world, rank = len(prompts), accelerator.num_processes, accelerator.process_index
    per = math.ceil(n / world)
    mine = prompts[rank * per:(rank + 1) * per]
    mine = mine + [prompts[-1]] * (per - len(mine))  # same shape on every process
    out = []
    for s in range(0, per, batch_size):
        ids, mask = data.pad(mine[s:s + batch_size], pad_id, "left")
        ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=model_utils.position_ids_from_mask(mask),
                       logits_to_keep=1, use_cache=False, output_hidden_states=True).hidden_states[-1]
        out.append(prompt_mean(hidden.float(), mask))
    return distributed.gather_cat(accelerator, torch.cat(out)).cpu()[:n]


# ----------------------------------------------------------------------------- checks and data
def check_args(args: Args):
    """Every configuration error, before any data or model is loaded."""
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive; got {args.beta}")
    if not 0 < args.min_density_ratio <= args.max_density_ratio:
        raise ValueError(f"--min_density_ratio {args.min_density_ratio} and --max_density_ratio "
                         f"{args.max_density_ratio}: need 0 < min <= max (TRL's defaults: 0.5 and 10)")
    if args.udm and args.prompt_sample_size < 1:
        raise ValueError("--udm True needs --prompt_sample_size of at least 1")
    if args.lr_scheduler not in ("constant", "linear"):
        raise ValueError(f"--lr_scheduler {args.lr_scheduler!r}: choose 'constant' or 'linear'")
    if min(args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps,
           args.per_device_eval_batch_size, args.logging_steps) <= 0:
        raise ValueError("--max_steps, --per_device_train_batch_size, --gradient_accumulation_steps, "
                         "--per_device_eval_batch_size and --logging_steps must be positive")
    if args.max_length is not None and args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        raise ValueError(f"--max_prompt_length {args.max_prompt_length} leaves no room for a completion within "
                         f"--max_length {args.max_length}")


def check_labels(rows: list) -> tuple[int, int]:
    """(n_D, n_U); data with only one kind of example is refused with the counts."""
    n_d = sum(1 for r in rows if r[2])
    n_u = len(rows) - n_d
    if n_d == 0 or n_u == 0:
        raise ValueError(f"BCO trains a classifier of desirable (label True) vs undesirable (label False) examples; "
                         f"the training data has {n_d} desirable and {n_u} undesirable rows. Add rows of the missing "
                         "kind (for desirable-only data, sft.py is the method)")
    return n_d, n_u


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

    # data first: a bad dataset fails before any model is built (detail 1)
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    train_ds, eval_ds, converted = preference.load_unpaired(args, "bco.py", toy_n=args.num_eval_rows)
    if converted:
        accelerator.print("bco: preference data converted to unpaired rows: each pair gives its chosen completion "
                          "(label True, desirable) and its rejected one (label False, undesirable)")
    train, dropped = preference.tokenize_unpaired(train_ds, tokenizer, args.max_length, args.max_prompt_length)
    eval_rows = (preference.tokenize_unpaired(eval_ds, tokenizer, args.max_length, args.max_prompt_length)[0]
                 if eval_ds is not None else [])[:args.num_eval_rows]
    if len(eval_rows) < world:  # every process evaluates a share
        eval_rows = []
    if dropped:
        accelerator.print(f"dropped {dropped} training rows whose prompt alone fills --max_length {args.max_length}")
    n_d, n_u = check_labels(train)
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

    state = {"delta": 0.0, "delta_count": 0, "num_tokens": 0, "skipped_steps": 0}
    clf = None  # (w (H,), b ()) of the UDM classifier
    start_step, elapsed = 0, 0.0
    if resume is not None:  # detail 2 and 3: δ and the classifier come back with the checkpoint
        saved = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed, state = saved["step"], saved["elapsed"], {**state, **saved["bco_state"]}
        if args.udm:
            clf = (saved["udm_w"], saved["udm_b"].reshape(()))
        accelerator.print(f"resumed from {resume} at step {start_step}")
    if args.udm and clf is None:  # detail 3: fit the density-ratio classifier once
        g = torch.Generator().manual_seed(args.seed)
        des = [i for i, r in enumerate(train) if r[2]]
        und = [i for i, r in enumerate(train) if not r[2]]
        pick = [[idx[j] for j in torch.randperm(len(idx), generator=g)[:args.prompt_sample_size].tolist()]
                for idx in (des, und)]
        x = prompt_embeddings(ref_model, [train[i][0] for i in pick[0] + pick[1]], pad_id,
                              args.per_device_eval_batch_size, accelerator)
        y = torch.tensor([True] * len(pick[0]) + [False] * len(pick[1]))
        clf = fit_density_classifier(x, y)
        pred = (x.double() @ clf[0] + clf[1]) > 0
        accelerator.print(f"udm: classifier on {len(pick[0])} desirable + {len(pick[1])} undesirable prompt "
                          f"embeddings, training accuracy {float((pred == y)[y].float().mean()):.3f} (desirable) / "
                          f"{float((pred == y)[~y].float().mean()):.3f} (undesirable)")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss", "delta", "rewards/margins", "eval/gold_reward"))
    accelerator.print(f"bco: {len(train)} rows ({n_d} desirable, {n_u} undesirable), {len(eval_rows)} eval rows, "
                      f"β {args.beta}{', UDM' if args.udm else ''}, {global_bs} examples per step, {args.max_steps} "
                      f"steps -> {args.output_dir}")

    def batch_of(rows):
        return (packed_batch if args.packing else padded_batch)([r[0] for r in rows], [r[1] for r in rows], pad_id,
                                                               device)

    @torch.no_grad()
    def reference(batch):
        """S^ref (B,) and, with UDM, the prompt embeddings (B, H) (detail 3)."""
        seq, _, emb = sequence_logps(ref_model, batch, want_embedding=args.udm)
        return seq, emb

    def update_delta(reward_sum: float, count: int):
        """Detail 2: fold a global batch's rewards (all processes) into δ."""
        total = distributed.gather_sum(accelerator, reward_sum)
        n = int(round(distributed.gather_sum(accelerator, float(count))))
        state["delta"], state["delta_count"] = running_mean_update(state["delta"], state["delta_count"], total, n)

    def losses_and_stats(m, rows, batch, ref_seq, emb, delta, want_entropy, acc, seq_stats=None):
        """Losses (B,) of a micro-batch and the metric sums (detail 6) added to `acc`."""
        desirable = torch.tensor([r[2] for r in rows], dtype=torch.bool, device=device)
        seq, st = seq_stats if seq_stats is not None else sequence_logps(m, batch, True, want_entropy)[:2]
        rewards = args.beta * (seq - ref_seq)
        weights = (density_ratio_weights(emb, *clf, args.min_density_ratio, args.max_density_ratio).to(rewards.dtype)
                   if args.udm else None)
        losses = bco_losses(rewards, desirable, delta, weights)
        with torch.no_grad():
            ntok = st["tokens"].double()
            r = rewards.detach().double()
            d, u = desirable.double(), (~desirable).double()
            tok_logits = st["mean_logits"].double()
            vals = {"examples": float(len(rows)), "loss": losses.sum(), "count/chosen": d.sum(),
                    "count/rejected": u.sum(),
                    "rewards/chosen": (r * d).sum(), "rewards/rejected": (r * u).sum(),
                    "logps/chosen": (seq * d).sum(), "logps/rejected": (seq * u).sum(),
                    "logits/chosen": (tok_logits * d).sum(), "logits/rejected": (tok_logits * u).sum(),
                    "tokens/chosen": (ntok * d).sum(), "tokens/rejected": (ntok * u).sum()}
            if weights is not None:
                vals["udm/weight"] = (weights.double() * u).sum()
            if want_entropy:
                vals["entropy"] = st["entropy"].sum()
                vals["entropy_tokens"] = ntok.sum()
            for k, v in vals.items():
                acc[k] = acc.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else v)
        return losses, rewards

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
        if "udm/weight" in tot and nu > 0:
            out["udm/weight"] = tot["udm/weight"] / nu
        if "entropy" in tot:
            out["entropy"] = tot["entropy"] / max(tot["entropy_tokens"], 1)
        return {prefix + k: v for k, v in out.items()}, tot

    @torch.no_grad()
    def evaluate() -> dict:
        out = {}
        if eval_rows:
            model.eval()
            acc: dict = {}
            mine = list(range(accelerator.process_index, len(eval_rows), world))
            for s in range(0, len(mine), args.per_device_eval_batch_size):
                rows = [eval_rows[i] for i in mine[s:s + args.per_device_eval_batch_size]]
                batch = batch_of(rows)
                ref_seq, emb = reference(batch)
                losses_and_stats(model, rows, batch, ref_seq, emb, state["delta"], False, acc)  # δ not updated
            stats, tot = reduce_stats(acc, "eval/")
            out.update(stats)
            out["eval/delta"] = state["delta"]
            model.train()
        out.update(heldout_gold_reward(model, tokenizer, args.dataset_name, args.num_eval_prompts,
                                       args.max_new_tokens, accelerator=accelerator) if args.num_eval_prompts else {})
        return out

    if start_step == 0 and args.eval_steps:
        tracker.log(evaluate(), 0, args.max_steps)

    acc: dict = {}
    grad_norms, deltas = [], []
    model.train()
    for step in range(start_step, args.max_steps):
        done = step + 1
        log_step = done % args.logging_steps == 0 or done == args.max_steps
        indices = data.batch_indices(len(train), global_bs, step, args.seed)
        micro = distributed.micro_batches(indices, args, accelerator)
        prepared = []  # (rows, batch, S^ref, embeddings) per micro-batch
        for mb in micro:
            rows = [train[i] for i in mb]
            batch = batch_of(rows)
            prepared.append((rows, batch, *reference(batch)))
        if GA > 1:  # detail 2: δ from the whole step's rewards before any micro-batch uses it
            with torch.no_grad():
                pre = [sequence_logps(model, batch)[0] for _, batch, _, _ in prepared]
            update_delta(sum(args.beta * float((s - ref_seq).sum()) for s, (_, _, ref_seq, _) in zip(pre, prepared)),
                         sum(len(p[0]) for p in prepared))
        for rows, batch, ref_seq, emb in prepared:
            with accelerator.accumulate(model):
                seq_stats = None
                if GA == 1:  # the rewards of the training forward itself update δ before the loss uses it
                    seq_stats = sequence_logps(model, batch, True, log_step)[:2]
                    update_delta(args.beta * float((seq_stats[0].detach() - ref_seq).sum()), len(rows))
                losses, _ = losses_and_stats(model, rows, batch, ref_seq, emb, state["delta"], log_step, acc,
                                             seq_stats)
                # mean over the global batch (detail 5): undo accelerate's 1/accumulation and DDP's 1/processes
                accelerator.backward(losses.sum() / global_bs * GA * world)
                if accelerator.sync_gradients:  # a non-finite gradient norm skips the step
                    gn, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                             args.max_grad_norm)
                    state["skipped_steps"] += not stepped
                    if stepped:
                        grad_norms.append(gn)
        deltas.append(state["delta"])
        state["num_tokens"] += sum(len(train[i][0]) + len(train[i][1]) for i in indices)

        eval_step = args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps)
        if log_step or eval_step:
            metrics = {}
            if log_step:
                metrics, tot = reduce_stats(acc)
                metrics.update({"delta": sum(deltas) / len(deltas),
                                "count/chosen": tot["count/chosen"] / len(deltas),
                                "count/rejected": tot["count/rejected"] / len(deltas),
                                "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                                "learning_rate": scheduler.get_last_lr()[0], "num_tokens": state["num_tokens"],
                                "train/skipped_steps": state["skipped_steps"]})
                acc, grad_norms, deltas = {}, [], []
            if eval_step:
                metrics.update(evaluate())
            tracker.log(metrics, done, args.max_steps)
        if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
            save(accelerator, args, done, model, tokenizer, tracker, state, clf)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir)
    if args.save_steps:
        save(accelerator, args, args.max_steps, model, tokenizer, tracker, state, clf)
    tracker.close()
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


def save(accelerator, args, step, model, tokenizer, tracker, state, clf):
    extra = {"elapsed": tracker.elapsed(), "bco_state": dict(state)}
    if clf is not None:
        extra.update({"udm_w": clf[0], "udm_b": clf[1].reshape(1)})  # float64: a resumed run weighs the same
    checkpoint.save_checkpoint(accelerator, args.output_dir, step, model, tokenizer, args, extra,
                               args.save_total_limit)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
