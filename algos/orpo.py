"""ORPO: monolithic preference optimisation without a reference model, on fixed (prompt, chosen, rejected) pairs.

Paper: "ORPO: Monolithic Preference Optimization without Reference Model" (Hong, Lee and Thorne, arXiv 2403.07691,
Eqs. 4-7). For a pair (x, y_w, y_l):
    S̄(y)     = (1/|y|) Σ_t m_t log π(y_t | x, y_<t)        mean token log-prob over the completion (EOS included)
    lo(y)     = log odds(y) = S̄ - log(1 - e^{S̄})             the log-odds of the mean token probability e^{S̄}
    L_OR      = -log σ(lo(y_w) - lo(y_l))                    Eq. 7, the odds-ratio term
    L         = L_SFT + λ · L_OR                              Eq. 6, λ = --beta (TRL's name; 0.1 by default)
L_SFT is the NLL of the chosen sequence, a token mean (see 4 for which tokens). L_OR is a mean over pairs. There is
no reference model: the SFT term anchors the policy, the odds ratio pushes y_w above y_l.

Implementation details (numbered so the tests and the README can point at them):
 1. One forward per micro-batch for chosen and rejected together: rows [prompt|chosen] then [prompt|rejected]
    (left-padded prompt, right-padded completion, explicit completion mask; common/preference.py). The model runs
    up to its final hidden states; the output head and the float32 log-softmax are applied a block of tokens at a
    time, only at the positions that predict a completion token or an SFT prompt token (common/model.py's chunked
    head), so no (2B, L, V) logits tensor is made, forward or backward. S̄, the NLL and the statistics of detail 7
    all come out of that one pass, as per-sequence sums.
 2. Tokenisation (common/preference.py): prompt and prompt+completion are tokenised whole and split where they first
    differ; completions end with EOS. The prompt is cut to --max_prompt_length keeping its LAST tokens, then each
    completion to fit --max_length keeping its FIRST tokens; pairs whose prompt alone fills --max_length are dropped.
 3. The log-odds are computed in float32 from S̄ with log1mexp(x) = log(1 - e^x) branching at x = -ln 2
    (log1p(-e^x) below, log(-expm1(x)) above), so neither branch cancels. S̄ is clamped to at most -1e-7 first
    (log-odds at most about 16.1). DEVIATION(TRL): TRL does not clamp; float32 log-softmax rounds a near-certain token
    to exactly 0, and at S̄ = 0 its log-odds is +inf and the gradient NaN (the step would be skipped); clamped, the
    odds term has no gradient there and the SFT term goes on.
 4. L_SFT covers the chosen sequence's prompt tokens (after the first, which nothing predicts) and its completion
    tokens, as TRL 1.16 and the authors' code do (TRL PRs #1516, #2527; the paper's Eq. 2 writes the completion only).
    --disable_prompt_loss True restricts it to the completion (the authors' flag of that name). It is a global token
    mean: the NLL summed over the step's chosen sequences divided by their token count. DEVIATION(TRL): TRL takes a
    token mean per micro-batch, which differs under accumulation when micro-batches differ in length.
 5. Every term is a mean over the whole optimizer step (all accumulation micro-batches and processes), so gradient
    accumulation and multi-process runs give the update of one big batch.
 6. No reference model is loaded. Dropout is off (TRL's disable_dropout default): log-probs are deterministic.
 7. Metrics follow TRL's ORPOTrainer: rewards/chosen = mean λS̄(y_w), rewards/rejected = mean λS̄(y_l),
    rewards/margins = mean λ(S̄_w - S̄_l), rewards/accuracies = mean [S̄_w > S̄_l], logps/chosen|rejected = mean S̄
    (TRL's ORPO logps are MEAN token log-probs), log_odds_ratio = mean log σ(lo_w - lo_l) (≤ 0, despite the name),
    log_odds_chosen = mean (lo_w - lo_l), nll_loss = L_SFT, loss; plus mean_token_accuracy (chosen completion) and
    entropy (completion tokens, on logging steps). logits/chosen|rejected = mean over completion tokens of the mean
    logit over the vocabulary (TRL also averages over prompt and padding positions). Sums accumulate over every
    micro-batch since the last log and are reduced across processes once. The same with an eval/ prefix on the
    evaluation pairs, and on toy tasks eval/gold_reward: greedy exact match on held-out prompts
    (common/evaluation.py).
 8. Checkpoints hold the weights, optimizer, scheduler, every rank's RNG, the step, the wall clock and the counters
    (tokens, skipped steps); the data order is a pure function of (seed, step), so a resumed run repeats the
    uninterrupted one exactly. A non-finite gradient norm skips the step (train/skipped_steps).
 9. `--packing`: the micro-batch's 2B sequences (chosen and rejected) are packed into rows as long as the longest
    one (best-fit decreasing; position ids restart at every sequence and attention stays within it;
    common/packing.py); each token's log-prob is added to its own sequence's sums (`seq`). The same sequences, S̄,
    NLL and loss as the padded layout up to float rounding, without the padding's compute.

Toy defaults (the benchmark's): the toy SFT policy (toy-sft, about 0.47 held-out exact match) on toy:add pairs
(chosen = the right sum, rejected = a near miss), 64 pairs per step, λ = 0.1, lr 1e-4, 200 steps.

Data: preference rows (`prompt, chosen, rejected`, or implicit prompt `chosen, rejected`), standard or
conversational. Unpaired rows (`prompt, completion, label`) belong to kto.py / bco.py.

Run:
    python algos/orpo.py                                                 # ORPO on toy:add from the toy SFT policy
    python algos/orpo.py --beta 0.5 --disable_prompt_loss True
    python algos/orpo.py --packing True                                  # padding-free micro-batches (detail 9)
    accelerate launch --multi_gpu --num_processes 2 algos/orpo.py        # same global batch, same result
    python algos/orpo.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/ultrafeedback_binarized \
        --learning_rate 8e-6 --max_length 1024 --per_device_train_batch_size 4 --gradient_accumulation_steps 8
    bash benchmarks/orpo.sh                                              # 3 seeds
"""

from __future__ import annotations

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
    exp_name: str = "orpo"
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
    dataset_name: str = "toy:add"
    """'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name"""
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
    learning_rate: float = 1e-4
    """AdamW learning rate (the toy model's; TRL's default for real models is 1e-6, the paper used 5e-6 to 8e-6)"""
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
    packing: bool = False
    """padding-free micro-batches: chosen and rejected sequences packed into rows as long as the longest (best-fit
    decreasing; positions restart and attention stays within each sequence; common/packing.py; detail 9). The same
    sequences and loss as without it, less compute on padding"""
    # --- the loss
    beta: float = 0.1
    """λ, the weight of the odds-ratio term (TRL calls it beta; the paper used 0.1 to 0.25)"""
    disable_prompt_loss: bool = False
    """SFT term on the chosen completion only (False: on the prompt's tokens too, as TRL and the authors' code)"""
    disable_dropout: bool = True
    """turn dropout off in the policy"""
    # --- evaluation
    eval_steps: int = 50
    """evaluate every this many optimizer steps (and at step 0 and at the end); 0: never"""
    num_eval_pairs: int = 512
    """at most this many evaluation pairs for the eval/ ORPO metrics"""
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


# ----------------------------------------------------------------------------- math
# Shapes: B pairs per micro-batch, T completion tokens, L = P + T prompt and completion positions, V vocabulary.
MAX_MEAN_LOGP = -1e-7  # detail 3: S̄ is clamped to at most this before the log-odds


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x ≤ 0 without cancellation: log1p(-e^x) for x < -ln 2, log(-expm1(x)) above."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = e^{S̄}, in float32 (detail 3). mean_logps: (B,) mean token log-probs S̄ ≤ 0."""
    x = mean_logps.float().clamp(max=MAX_MEAN_LOGP)
    return x - log1mexp(x)


def odds_ratio_terms(chosen_mean_logps: torch.Tensor,
                     rejected_mean_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo_w - lo_l, log σ(lo_w - lo_l)), both (B,) float32: the log odds ratio and the (negated) odds-ratio loss."""
    assert chosen_mean_logps.dim() == 1 and chosen_mean_logps.shape == rejected_mean_logps.shape
    ratio = log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)
    return ratio, F.logsigmoid(ratio)


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, chosen_nll: torch.Tensor,
              nll_tokens_per_pair: float, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair ORPO loss (B,) and its parts. chosen_nll: (B,) summed NLL of each chosen sequence's SFT tokens;
    nll_tokens_per_pair: the step's SFT-token count divided by its pairs, so the mean over the step's pairs of
    `sft` is the global token mean Σ NLL / Σ tokens (detail 4). Returns loss = sft - λ·log σ(lo_w - lo_l), sft,
    log_odds_ratio (= log σ), log_odds_chosen (= lo_w - lo_l)."""
    assert chosen_nll.shape == chosen_mean_logps.shape
    ratio, log_sig = odds_ratio_terms(chosen_mean_logps, rejected_mean_logps)
    sft = chosen_nll.float() / nll_tokens_per_pair
    return {"loss": sft - beta * log_sig, "sft": sft, "log_odds_ratio": log_sig, "log_odds_chosen": ratio}


def sft_token_mask(attention_mask: torch.Tensor, completion_mask: torch.Tensor, prompt_loss: bool) -> torch.Tensor:
    """(N, L-1) float mask over the targets input_ids[:, 1:] of the SFT term (detail 4): completion tokens, and with
    prompt_loss the prompt tokens whose predecessor is a real token (every prompt token but the first)."""
    T = completion_mask.shape[1]
    am = attention_mask.float()
    prompt = am[:, 1:-T] * am[:, :-T - 1] if prompt_loss else torch.zeros_like(am[:, 1:-T])
    return torch.cat([prompt, completion_mask.float()], 1)


# ----------------------------------------------------------------------------- forwards
def _group(rows, cols, targets, seq, weights, device) -> dict:
    """Tokens that get a log-prob: (row, column) of the predicting position among the forward's kept positions, the
    target, the sequence it belongs to and a weight (1: pair_layout lists real tokens only), all (K,)."""
    return {"rows": rows.reshape(-1).to(device), "cols": cols.reshape(-1).to(device),
            "targets": targets.reshape(-1).to(device), "seq": seq.reshape(-1).to(device),
            "weights": weights.reshape(-1).float().to(device)}


def pair_layout(rows: list, pad_id: int, device, prompt_loss: bool, packed: bool = False) -> dict:
    """A micro-batch of pairs for forward_pairs: the 2B sequences [prompt | chosen] (0..B-1) then [prompt | rejected]
    (B..2B-1), the forward's inputs, how many final positions it keeps (`keep`), and two token groups (_group):
    `comp`, the completion tokens of every sequence, and `sft`, the chosen prompts' SFT tokens (detail 4; None
    without prompt loss).
    padded (detail 1): two rows per pair, left-padded prompt and right-padded completion (common/preference.py);
      keep = T + 1, or every position with prompt loss.
    packed (detail 9): the sequences packed into rows as long as the longest one (common/packing.py: positions
      restart and attention stays within each sequence); keep = the row length.
    In both, the groups list real tokens only (weight 1), and `seq` says whose each is."""
    B = len(rows)
    if packed:
        seqs = [p + c for p, c, _ in rows] + [p + r for p, _, r in rows]
        starts = [len(p) for p, _, _ in rows] * 2  # the first completion token of each sequence
        weights = [[1] * len(s) if i < B and prompt_loss else [0] * starts[i] + [1] * (len(s) - starts[i])
                   for i, s in enumerate(seqs)]
        b = packing.pack_rows(seqs, weights, max(len(s) for s in seqs), pad_id)
        # pack_rows lists sequence 0's trained tokens, then sequence 1's, ..., each in order (its token 0 never)
        is_comp = torch.tensor([j >= starts[i] for i, (s, w) in enumerate(zip(seqs, weights))
                                for j in range(1, len(s)) if w[j]], dtype=torch.bool)
        groups = {}
        for name, sel in (("comp", is_comp), ("sft", ~is_comp)):
            pred = b["pred"][sel]
            groups[name] = _group(pred[:, 0], pred[:, 1], b["targets"][sel], b["seq"][sel], b["weights"][sel], device)
        inputs = {"input_ids": b["input_ids"].to(device), "position_ids": b["position_ids"].to(device)}
        return {"inputs": inputs, "keep": b["input_ids"].shape[1], "n": 2 * B, **groups,
                "sft": groups["sft"] if prompt_loss else None}
    b = preference.pair_batch(rows, pad_id, "cpu")  # the index lists are made on the CPU: no device sync
    ids, am, cm = b["input_ids"], b["attention_mask"], b["completion_mask"]
    (N, T), L = cm.shape, ids.shape[1]
    keep = L if prompt_loss else T + 1  # hidden states of the last `keep` positions; column 0 = position L - keep
    r, t = cm.nonzero(as_tuple=True)  # the real completion tokens only: the head never runs on padding
    comp = _group(r, keep - T - 1 + t, ids[r, L - T + t], r, torch.ones(len(r)), device)
    sft = None
    if prompt_loss:  # targets 1 .. L-T-1 (prompt tokens), predicted at positions 0 .. L-T-2
        r, j = sft_token_mask(am[:B], cm[:B], True)[:, :L - T - 1].nonzero(as_tuple=True)
        sft = _group(r, j, ids[r, j + 1], r, torch.ones(len(r)), device)
    inputs = {"input_ids": ids.to(device), "attention_mask": am.to(device),
              "position_ids": model_utils.position_ids_from_mask(am).to(device)}
    return {"inputs": inputs, "keep": keep, "n": N, "comp": comp, "sft": sft}


def forward_pairs(model, batch: dict, want_entropy: bool = False) -> dict:
    """One forward of a micro-batch's 2B sequences (pair_layout), and per-sequence sums: logps (2B,) = S(y), the
    summed completion log-probs, tokens (2B,) = |y|, nll (B,) = the chosen sequences' summed SFT NLL (detail 4),
    nll_tokens (B,), and no-grad completion statistics (2B,): mean_logits (the vocabulary-mean logit, summed over
    tokens), correct (tokens whose most likely token is the target), entropy (summed; with want_entropy).
    The model runs up to its final hidden states; the output head and the float32 log-softmax are applied a block of
    tokens at a time at the predicting positions only (common/model.py's chunked head), so no (2B, L, V) float32
    logits tensor is made, forward or backward. A model whose logits are not a plain linear head of the hidden
    states (model_utils.chunked_head is None) gets its logits from its own forward at the kept positions."""
    stats = ("mean_logits", "argmax") + ("entropy",) * want_entropy
    comp, sft = batch["comp"], batch["sft"]
    head = model_utils.chunked_head(model)
    if head is not None:
        h = model_utils.hidden_before_head(model, head, batch["keep"], **batch["inputs"])  # (R, keep, H)
        lp, st = model_utils.head_logps(h[comp["rows"], comp["cols"]], head, comp["targets"], stats=stats)
        sft_lp = model_utils.head_logps(h[sft["rows"], sft["cols"]], head, sft["targets"]) if sft else None
    else:
        logits = model(**batch["inputs"], logits_to_keep=batch["keep"], use_cache=False).logits  # (R, keep, V)
        z = logits[comp["rows"], comp["cols"]]
        lp, st = model_utils.selective_log_softmax(z, comp["targets"]), model_utils.logits_stats(z, stats)
        sft_lp = (model_utils.selective_log_softmax(logits[sft["rows"], sft["cols"]], sft["targets"])
                  if sft else None)
    n = batch["n"]

    def per_seq(x, g, size=n):  # Σ over each sequence's tokens of the group
        return torch.zeros(size, dtype=torch.float32, device=x.device).index_add(0, g["seq"], x.float() * g["weights"])

    out = {"logps": per_seq(lp, comp), "tokens": per_seq(torch.ones_like(lp), comp)}
    out["nll"], out["nll_tokens"] = -out["logps"][:n // 2], out["tokens"][:n // 2]
    if sft is not None:
        out["nll"] = out["nll"] - per_seq(sft_lp, sft, n // 2)
        out["nll_tokens"] = out["nll_tokens"] + per_seq(torch.ones_like(sft_lp), sft, n // 2)
    with torch.no_grad():
        out["mean_logits"] = per_seq(st["mean_logits"], comp)
        out["correct"] = per_seq((st["argmax"] == comp["targets"]).float(), comp)
        if want_entropy:
            out["entropy"] = per_seq(st["entropy"], comp)
    return out


# ----------------------------------------------------------------------------- data
def check_args(args: Args):
    """Every configuration error, before any data or model is loaded."""
    if args.beta < 0:
        raise ValueError(f"--beta (λ, the odds-ratio weight) must be non-negative; got {args.beta}")
    if args.lr_scheduler not in ("constant", "linear"):
        raise ValueError(f"--lr_scheduler {args.lr_scheduler!r}: choose 'constant' or 'linear'")
    if min(args.max_steps, args.per_device_train_batch_size, args.per_device_eval_batch_size, args.logging_steps,
           args.gradient_accumulation_steps) <= 0:
        raise ValueError("--max_steps, --per_device_train_batch_size, --per_device_eval_batch_size, "
                         "--gradient_accumulation_steps and --logging_steps must be positive")
    if args.max_length is not None and args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        raise ValueError(f"--max_prompt_length {args.max_prompt_length} leaves no room for a completion within "
                         f"--max_length {args.max_length}")
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval_fraction must lie in [0, 1); got {args.eval_fraction}")


def sft_tokens(row, prompt_loss: bool) -> int:
    """SFT-target tokens of a pair's chosen sequence (detail 4)."""
    return len(row[1]) + (max(len(row[0]) - 1, 0) if prompt_loss else 0)


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
    prompt_loss = not args.disable_prompt_loss

    # data first: a bad dataset fails before any model is built
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    train_ds, eval_ds = preference.load_pairs(args, "orpo.py", toy_n=args.num_eval_pairs)
    train, dropped = preference.tokenize_pairs(train_ds, tokenizer, args.max_length, args.max_prompt_length)
    eval_rows = (preference.tokenize_pairs(eval_ds, tokenizer, args.max_length, args.max_prompt_length)[0]
                 if eval_ds is not None else [])[:args.num_eval_pairs]
    if len(eval_rows) < world:  # every process evaluates a share (at least one pair)
        eval_rows = []
    if dropped:
        accelerator.print(f"dropped {dropped} training pairs whose prompt alone fills --max_length {args.max_length}")
    global_bs = distributed.global_batch_size(args, accelerator)
    data.check_batch_fits(len(train), global_bs, ["--per_device_train_batch_size", "--gradient_accumulation_steps"])
    peft_utils.check_args(args)  # LoRA flags and module names, before anything is loaded or written
    # one run per folder, before any model loads
    resume = checkpoint.prepare_output_dir(args, may_change=("num_eval_pairs", "per_device_eval_batch_size",
                                                             "max_new_tokens"))

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters, the rest frozen
    if args.disable_dropout:
        disable_dropout(model)
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
    if resume is not None:  # detail 8
        saved = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed, state = saved["step"], saved["elapsed"], {**state, **saved["orpo_state"]}
        accelerator.print(f"resumed from {resume} at step {start_step}")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss", "nll_loss", "log_odds_ratio", "rewards/accuracies",
                                     "eval/rewards/accuracies", "eval/gold_reward"))
    accelerator.print(f"orpo: {len(train)} pairs, {len(eval_rows)} eval pairs, λ {args.beta}, SFT on "
                      f"{'prompt + completion' if prompt_loss else 'completion'} tokens, {global_bs} pairs per step, "
                      f"{args.max_steps} steps, {world} process(es) -> {args.output_dir}")
    pad_id = tokenizer.pad_token_id

    def add_stats(acc: dict, parts: dict, f: dict):
        """Sums for the TRL metrics (detail 7), as tensors; reduced once at log time."""
        with torch.no_grad():
            B = f["nll"].shape[0]
            mean = f["logps"] / f["tokens"].clamp(min=1)  # (2B,) S̄
            r_w, r_l = args.beta * mean[:B], args.beta * mean[B:]
            vals = {"pairs": float(B), "loss": parts["loss"].sum(), "nll": f["nll"].sum(),
                    "nll_tokens": f["nll_tokens"].sum(),
                    "rewards/chosen": r_w.sum(), "rewards/rejected": r_l.sum(), "rewards/margins": (r_w - r_l).sum(),
                    "rewards/accuracies": (mean[:B] > mean[B:]).float().sum(),
                    "logps/chosen": mean[:B].sum(), "logps/rejected": mean[B:].sum(),
                    "log_odds_ratio": parts["log_odds_ratio"].sum(), "log_odds_chosen": parts["log_odds_chosen"].sum(),
                    "logits/chosen": f["mean_logits"][:B].sum(), "chosen_tokens": f["tokens"][:B].sum(),
                    "logits/rejected": f["mean_logits"][B:].sum(), "rejected_tokens": f["tokens"][B:].sum(),
                    "correct_tokens": f["correct"][:B].sum()}
            if "entropy" in f:
                vals["entropy"] = f["entropy"].sum()
                vals["entropy_tokens"] = f["tokens"].sum()
            for k, v in vals.items():
                acc[k] = acc.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else v)

    def reduce_stats(acc: dict, prefix: str = "") -> dict:
        """One all-reduce of every sum, then the means."""
        keys = sorted(acc)
        vec = torch.tensor([float(acc[k]) for k in keys], dtype=torch.float64, device=device)
        if world > 1:
            vec = accelerator.reduce(vec, reduction="sum")
        tot = dict(zip(keys, vec.tolist()))
        n = tot["pairs"]
        out = {k: tot[k] / n for k in keys if k.startswith(("loss", "rewards/", "logps/", "log_odds"))}
        out["nll_loss"] = tot["nll"] / max(tot["nll_tokens"], 1)
        out["logits/chosen"] = tot["logits/chosen"] / max(tot["chosen_tokens"], 1)
        out["logits/rejected"] = tot["logits/rejected"] / max(tot["rejected_tokens"], 1)
        out["mean_token_accuracy"] = tot["correct_tokens"] / max(tot["chosen_tokens"], 1)
        if "entropy" in tot:
            out["entropy"] = tot["entropy"] / max(tot["entropy_tokens"], 1)
        return {prefix + k: v for k, v in out.items()}

    eval_tokens_per_pair = (sum(sft_tokens(r, prompt_loss) for r in eval_rows) / len(eval_rows)) if eval_rows else 1.0

    @torch.no_grad()
    def evaluate() -> dict:
        out = {}
        if eval_rows:
            model.eval()
            acc: dict = {}
            mine = list(range(accelerator.process_index, len(eval_rows), world))
            for s in range(0, len(mine), args.per_device_eval_batch_size):
                rows = [eval_rows[i] for i in mine[s:s + args.per_device_eval_batch_size]]
                f = forward_pairs(model, pair_layout(rows, pad_id, device, prompt_loss, args.packing))
                mean = f["logps"] / f["tokens"].clamp(min=1)
                parts = orpo_loss(mean[:len(rows)], mean[len(rows):], f["nll"], eval_tokens_per_pair, args.beta)
                add_stats(acc, parts, f)
            out.update(reduce_stats(acc, "eval/"))
            model.train()
        out.update(heldout_gold_reward(model, tokenizer, args.dataset_name, args.num_eval_prompts,
                                       args.max_new_tokens, accelerator=accelerator) if args.num_eval_prompts else {})
        return out

    if start_step == 0 and args.eval_steps:
        tracker.log(evaluate(), 0, args.max_steps)

    acc: dict = {}
    grad_norms: list[float] = []
    model.train()
    for step in range(start_step, args.max_steps):
        done = step + 1
        log_step = done % args.logging_steps == 0 or done == args.max_steps
        indices = data.batch_indices(len(train), global_bs, step, args.seed)
        micro = distributed.micro_batches(indices, args, accelerator)
        # the step's SFT-token count (known from the data): the global token mean of detail 4
        tokens_per_pair = sum(sft_tokens(train[i], prompt_loss) for i in indices) / global_bs
        for mb in micro:
            rows = [train[i] for i in mb]
            batch = pair_layout(rows, pad_id, device, prompt_loss, args.packing)
            with accelerator.accumulate(model):
                f = forward_pairs(model, batch, log_step)  # the entropy only on logged steps
                mean = f["logps"] / f["tokens"].clamp(min=1)  # (2B,) S̄
                parts = orpo_loss(mean[:len(rows)], mean[len(rows):], f["nll"], tokens_per_pair, args.beta)
                # mean over the global batch's pairs: undo accelerate's 1/accumulation and DDP's 1/processes
                loss = parts["loss"].sum() / global_bs
                accelerator.backward(loss * GA * world)
                if accelerator.sync_gradients:  # a non-finite gradient norm skips the step
                    gn, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                             args.max_grad_norm)
                    state["skipped_steps"] += not stepped
                    if stepped:
                        grad_norms.append(gn)
            add_stats(acc, parts, f)
        state["num_tokens"] += sum(2 * len(train[i][0]) + len(train[i][1]) + len(train[i][2]) for i in indices)

        eval_step = args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps)
        if log_step or eval_step:
            metrics = {}
            if log_step:
                metrics = reduce_stats(acc)
                metrics.update({"grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                                "learning_rate": scheduler.get_last_lr()[0], "num_tokens": state["num_tokens"],
                                "train/skipped_steps": state["skipped_steps"]})
                acc, grad_norms = {}, []
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
                               {"elapsed": tracker.elapsed(), "orpo_state": dict(state)}, args.save_total_limit)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
