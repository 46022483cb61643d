"""CPO, SimPO, CPO-SimPO and AlphaPO: reference-free preference optimisation on fixed (prompt, chosen, rejected) pairs.

Papers: "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation"
(Xu et al., arXiv 2401.08417, Eq. 3-6); "SimPO: Simple Preference Optimization with a Reference-Free Reward"
(Meng, Xia and Chen, arXiv 2405.14734, Eq. 6); "AlphaPO: Reward Shape Matters for LLM Alignment" (Gupta et al.,
arXiv 2501.03884). TRL 1.16 has all four in one trainer (trl/experimental/cpo), and so does this file. For a pair
(x, y_w, y_l):
    s(y)   = S(y) = Σ_t m_t log π(y_t | x, y_<t)       sigmoid, hinge: a sum over completion tokens (EOS included)
           = S̄(y) = S(y) / |y|                          ipo, simpo: the mean token log-prob (length-normalised)
    r(y)   = s(y)                                      α = 0
           = (1 - e^{-α s(y)}) / α                     AlphaPO's reward shape, α = --alpha ≠ 0 (any loss type)
    z      = r(y_w) - r(y_l);  implicit reward β·r(y)
Per-pair losses (σ the logistic function, ε = --label_smoothing, γ = --simpo_gamma):
    sigmoid  -(1-ε) log σ(βz) - ε log σ(-βz)              CPO Eq. 3 (DPO with π_ref = uniform), ε: cDPO smoothing
    hinge    max(0, 1 - βz)                               SLiC
    ipo      (z - 1/(2β))²                                IPO's loss on length-normalised scores (β = IPO's τ)
    simpo    -(1-ε) log σ(βz - γ) - ε log σ(-(βz - γ))    SimPO Eq. 6 (the target margin γ in reward units)
plus cpo_alpha · L_NLL (CPO Eq. 6's behaviour-cloning term, λ = --cpo_alpha): the NLL of the chosen completion,
a token mean. Named combinations: CPO = sigmoid with cpo_alpha 1 (the default); SimPO = simpo with cpo_alpha 0;
CPO-SimPO = simpo with cpo_alpha > 0; AlphaPO = simpo with cpo_alpha 0 and alpha ≠ 0 (TRL's loss_type="alphapo"
is that shorthand; here spell it out). No reference model is loaded.

γ and β: --simpo_gamma is γ itself, as TRL's simpo_gamma (TRL subtracts γ/β from the log-prob margin z and then
multiplies by β, which is the same βz - γ). The SimPO authors' code takes gamma_beta_ratio = γ/β instead (their
recipes: β 2.0-2.5, γ/β 0.5-0.55): a recipe stated as a ratio is --simpo_gamma β·ratio. With γ fixed, changing β
keeps the margin fixed in reward units; with the ratio fixed, the margin scales with β. TRL's defaults (β = 0.1,
γ = 0.5) are far from the paper's: for SimPO pass the paper's β and γ (the benchmark uses β = 2, γ = 1).

Implementation details (numbered so the tests and the README can point at them):
 1. One forward per micro-batch for chosen and rejected together: rows [prompt|chosen] then [prompt|rejected]
    (left-padded prompt, right-padded completion, explicit completion mask; common/preference.py). The model runs
    up to its final hidden states; the output head and the float32 log-softmax are applied a block of tokens at a
    time at the positions that predict completion tokens only (common/model.py's chunked head), so no (2B, T, V)
    logits tensor is made, forward or backward. S(y), |y| (so S̄), the NLL and the statistics of detail 7 all come
    out of that one pass, as per-sequence sums.
 2. Tokenisation (common/preference.py): prompt and prompt+completion are tokenised whole and split where they first
    differ; completions end with EOS. The prompt is cut to --max_prompt_length keeping its LAST tokens, then each
    completion to fit --max_length keeping its FIRST tokens; pairs whose prompt alone fills --max_length are dropped.
 3. s(y) is a sum for sigmoid and hinge and a mean for ipo and simpo, as in TRL (average_log_prob for ipo/simpo).
 4. AlphaPO's r = (1 - e^{-αs})/α is computed as -expm1(-αs)/α in float32 (exact as α → 0, where it tends to s).
    On summed log-probs (sigmoid, hinge) a large α·|S| overflows float32 (α|S| > 88): the step's gradient is then
    not finite and the step is skipped (train/skipped_steps); AlphaPO is meant for simpo's mean log-probs.
 5. The NLL term is a global token mean: the chosen completions' NLL summed over the optimizer step divided by the
    step's chosen-token count. DEVIATION(TRL): TRL takes a token mean per micro-batch, which differs under
    accumulation when micro-batches differ in length. Every other term is a mean over the step's pairs (all
    accumulation micro-batches and processes), so accumulation and multi-process runs give the one-batch update.
 6. No reference model. Dropout is off (TRL's disable_dropout default): log-probs are deterministic.
 7. Metrics follow TRL's CPOTrainer: rewards/chosen = mean β·r(y_w), rewards/rejected = mean β·r(y_l),
    rewards/margins = mean β(r_w - r_l), rewards/accuracies = mean [r_w > r_l], logps/chosen|rejected = mean s(y)
    (sums or means by loss type, detail 3), nll_loss = the chosen NLL (token mean; TRL logs 0 when cpo_alpha = 0,
    here it is always measured), loss; plus mean_token_accuracy (chosen) and entropy (completion tokens, on logging
    steps). logits/chosen|rejected = mean over completion tokens of the mean logit over the vocabulary (TRL also
    averages over prompt and padding positions). Sums accumulate over every micro-batch since the last log and are
    reduced across processes once. The same with an eval/ prefix on the evaluation pairs, and on toy tasks
    eval/gold_reward: greedy exact match on held-out prompts (common/evaluation.py).
 8. Checkpoints hold the weights, optimizer, scheduler, every rank's RNG, the step, the wall clock and the counters
    (tokens, skipped steps); the data order is a pure function of (seed, step), so a resumed run repeats the
    uninterrupted one exactly. A non-finite gradient norm skips the step (train/skipped_steps).
 9. `--packing`: the micro-batch's 2B sequences (chosen and rejected) are packed into rows as long as the longest
    one (best-fit decreasing; position ids restart at every sequence and attention stays within it;
    common/packing.py); each completion token's log-prob is added to its own sequence's sums (`seq`). The same
    sequences, scores and loss as the padded layout up to float rounding, without the padding's compute.

Toy defaults (the benchmark's CPO run): the toy SFT policy (toy-sft, about 0.47 held-out exact match) on toy:add
pairs (chosen = the right sum, rejected = a near miss), 64 pairs per step, β = 0.1, cpo_alpha 1, lr 1e-4, 200 steps.

Data: preference rows (`prompt, chosen, rejected`, or implicit prompt `chosen, rejected`), standard or
conversational. Unpaired rows (`prompt, completion, label`) belong to kto.py / bco.py.

Run:
    python algos/cpo.py                                                            # CPO on toy:add
    python algos/cpo.py --loss_type simpo --cpo_alpha 0 --beta 2.0 --simpo_gamma 1.0              # SimPO
    python algos/cpo.py --loss_type simpo --cpo_alpha 1 --beta 2.0 --simpo_gamma 1.0              # CPO-SimPO
    python algos/cpo.py --loss_type simpo --cpo_alpha 0 --beta 2.0 --simpo_gamma 1.0 --alpha 0.25 # AlphaPO
    python algos/cpo.py --packing True                                             # padding-free (detail 9)
    accelerate launch --multi_gpu --num_processes 2 algos/cpo.py                   # same global batch, same result
    python algos/cpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized \
        --learning_rate 1e-6 --max_length 1024 --per_device_train_batch_size 4 --gradient_accumulation_steps 8
    bash benchmarks/cpo.sh                                                         # 4 configurations x 3 seeds
"""

from __future__ import annotations

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
    exp_name: str = "cpo"
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
    packing: bool = False
    """padding-free micro-batches: chosen and rejected sequences packed into rows as long as the longest (best-fit
    decreasing; positions restart and attention stays within each sequence; common/packing.py; detail 9). The same
    sequences and loss as without it, less compute on padding"""
    # --- the loss
    loss_type: str = "sigmoid"
    """sigmoid (CPO), hinge, ipo or simpo (SimPO; with --cpo_alpha > 0: CPO-SimPO; with --alpha: AlphaPO)"""
    beta: float = 0.1
    """β, the reward scale (TRL's default 0.1; SimPO's paper uses 2 to 2.5); for ipo the regulariser τ"""
    cpo_alpha: float = 1.0
    """λ, the weight of the chosen completion's NLL (CPO's behaviour-cloning term); 0 for pure SimPO / AlphaPO"""
    simpo_gamma: float | None = None
    """γ, SimPO's target margin in reward units (TRL's simpo_gamma, not the SimPO code's γ/β ratio); only with
    --loss_type simpo; default 0.5 (TRL's)"""
    alpha: float = 0.0
    """AlphaPO's reward shape: r = (1 - p^{-α})/α of p = e^{s} (0: r = s, the plain log-prob); any loss type"""
    label_smoothing: float = 0.0
    """ε in [0, 0.5): the preference label is taken as flipped with probability ε (sigmoid and simpo only)"""
    disable_dropout: bool = True
    """turn dropout off in the policy"""
    # --- evaluation
    eval_steps: int = 50
    """evaluate every this many optimizer steps (and at step 0 and at the end); 0: never"""
    num_eval_pairs: int = 512
    """at most this many evaluation pairs for the eval/ CPO metrics"""
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


LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
LENGTH_NORMALISED = ("ipo", "simpo")  # detail 3
USES_LABEL_SMOOTHING = ("sigmoid", "simpo")
DEFAULT_SIMPO_GAMMA = 0.5


# ----------------------------------------------------------------------------- math
# Shapes: B pairs per micro-batch, T completion tokens, V vocabulary.
def sequence_scores(logps: torch.Tensor, tokens: torch.Tensor, length_normalised: bool) -> torch.Tensor:
    """s(y) (N,): the summed completion log-prob S(y), or the mean S(y) / |y| (detail 3). logps: S(y) (N,),
    tokens: |y| (N,)."""
    assert logps.shape == tokens.shape
    return logps / tokens.clamp(min=1) if length_normalised else logps


def alphapo_reward(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's r = (1 - e^{-α s}) / α (detail 4), float32; α = 0 gives s itself (the limit)."""
    s = scores.float()
    return s if alpha == 0 else -torch.expm1(-alpha * s) / alpha


def cpo_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, loss_type: str, beta: float,
             simpo_gamma: float = DEFAULT_SIMPO_GAMMA, alpha: float = 0.0,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss (B,) and the implicit rewards β·r(y_w), β·r(y_l) (B,) from the scores s(y) (B,)
    (sums or means, as the loss type wants: detail 3). The NLL term is added by the caller."""
    assert chosen_scores.dim() == 1 and chosen_scores.shape == rejected_scores.shape
    r_w, r_l = alphapo_reward(chosen_scores, alpha), alphapo_reward(rejected_scores, alpha)
    z = r_w - r_l
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        u = beta * z - (simpo_gamma if loss_type == "simpo" else 0.0)
        losses = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type '{loss_type}'; choose from {LOSS_TYPES}")
    return losses, beta * r_w.detach(), beta * r_l.detach()


def nll_share(chosen_nll: torch.Tensor, tokens_per_pair: float) -> torch.Tensor:
    """Per-pair share (B,) of the global token-mean NLL (detail 5): chosen_nll (B,) summed over each chosen
    completion, tokens_per_pair = the step's chosen tokens / its pairs; the mean over the step's pairs is
    Σ NLL / Σ tokens."""
    return chosen_nll.float() / tokens_per_pair


# ----------------------------------------------------------------------------- forwards
def pair_layout(rows: list, pad_id: int, device, packed: bool = False) -> dict:
    """A micro-batch of pairs for forward_pairs: the 2B sequences [prompt | chosen] (0..B-1) then [prompt | rejected]
    (B..2B-1), the forward's inputs, how many final positions it keeps (`keep`), and for the completion tokens
    (`comp`, each (K,), real tokens only: the head never runs on padding): (row, column) of the predicting position
    among the kept ones, the target, the sequence it belongs to (`seq`) and a weight (1).
    padded (detail 1): two rows per pair, left-padded prompt and right-padded completion (common/preference.py);
      keep = T + 1.
    packed (detail 9): the sequences packed into rows as long as the longest one (common/packing.py: positions
      restart and attention stays within each sequence); keep = the row length."""
    if packed:
        seqs = [p + c for p, c, _ in rows] + [p + r for p, _, r in rows]
        starts = [len(p) for p, _, _ in rows] * 2  # the first completion token of each sequence
        b = packing.pack_rows(seqs, [[0] * n + [1] * (len(s) - n) for s, n in zip(seqs, starts)],
                              max(len(s) for s in seqs), pad_id, device)
        comp = {"rows": b["pred"][:, 0], "cols": b["pred"][:, 1], "targets": b["targets"], "seq": b["seq"],
                "weights": b["weights"]}
        return {"inputs": {"input_ids": b["input_ids"], "position_ids": b["position_ids"]},
                "keep": b["input_ids"].shape[1], "n": len(seqs), "comp": comp}
    b = preference.pair_batch(rows, pad_id, "cpu")  # the index lists are made on the CPU: no device sync
    ids, am, cm = b["input_ids"], b["attention_mask"], b["completion_mask"]
    N, T = cm.shape
    r, t = cm.nonzero(as_tuple=True)  # the real completion tokens only: the head never runs on padding
    comp = {"rows": r, "cols": t, "targets": ids[r, ids.shape[1] - T + t], "seq": r, "weights": torch.ones(len(r))}
    inputs = {"input_ids": ids, "attention_mask": am, "position_ids": model_utils.position_ids_from_mask(am)}
    return {"inputs": {k: v.to(device) for k, v in inputs.items()}, "keep": T + 1, "n": N,
            "comp": {k: v.to(device) for k, v in comp.items()}}


def forward_pairs(model, batch: dict, want_entropy: bool = False) -> dict:
    """One forward of a micro-batch's 2B sequences (pair_layout), and per-sequence sums over completion tokens:
    logps (2B,) = S(y), tokens (2B,) = |y|, and no-grad statistics (2B,): mean_logits (the vocabulary-mean logit,
    summed over tokens), correct (tokens whose most likely token is the target), entropy (summed; with
    want_entropy). The model runs up to its final hidden states; the output head and the float32 log-softmax are
    applied a block of tokens at a time at the predicting positions only (common/model.py's logps_at), so no
    (2B, T, V) float32 logits tensor is made, forward or backward (a model whose logits are not a plain linear head
    of the hidden states gets them from its own forward)."""
    stats = ("mean_logits", "argmax") + ("entropy",) * want_entropy
    comp = batch["comp"]
    lp, st = model_utils.logps_at(model, batch["inputs"], batch["keep"], comp["rows"], comp["cols"],
                                  comp["targets"], stats=stats)
    n, w, seq = batch["n"], comp["weights"], comp["seq"]

    def per_seq(x):  # Σ over each sequence's completion tokens
        return torch.zeros(n, dtype=torch.float32, device=x.device).index_add(0, seq, x.float() * w)

    out = {"logps": per_seq(lp), "tokens": per_seq(torch.ones_like(lp))}
    with torch.no_grad():
        out["mean_logits"] = per_seq(st["mean_logits"])
        out["correct"] = per_seq((st["argmax"] == comp["targets"]).float())
        if want_entropy:
            out["entropy"] = per_seq(st["entropy"])
    return out


# ----------------------------------------------------------------------------- data
def check_args(args: Args):
    """Every configuration error, before any data or model is loaded."""
    if args.loss_type not in LOSS_TYPES:
        hint = (" TRL's 'alphapo' is --loss_type simpo --cpo_alpha 0 --alpha A." if args.loss_type == "alphapo" else
                " For DPO-type losses with a reference model use dpo.py; for ORPO use orpo.py."
                if args.loss_type in ("sigmoid_norm", "robust", "orpo", "dpo") else "")
        raise ValueError(f"--loss_type: unknown loss type '{args.loss_type}'; choose from {', '.join(LOSS_TYPES)}."
                         + hint)
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive; got {args.beta}")
    if args.cpo_alpha < 0:
        raise ValueError(f"--cpo_alpha (the NLL weight) must be non-negative; got {args.cpo_alpha}")
    if args.simpo_gamma is not None and args.loss_type != "simpo":
        raise ValueError(f"--simpo_gamma {args.simpo_gamma}: only --loss_type simpo has a target margin (this run's "
                         f"loss type is {args.loss_type}); drop --simpo_gamma or pass --loss_type simpo")
    ls = args.label_smoothing
    if ls != 0 and args.loss_type not in USES_LABEL_SMOOTHING:
        raise ValueError(f"--label_smoothing {ls}: --loss_type {args.loss_type} does not use it (only "
                         f"{' and '.join(USES_LABEL_SMOOTHING)} do; TRL ignores it with a warning)")
    if not 0 <= ls < 0.5:
        raise ValueError(f"--label_smoothing {ls}: give a flip probability in [0, 0.5)")
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


def disable_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


# ----------------------------------------------------------------------------- main
def main(args: Args):
    check_args(args)
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    gamma = args.simpo_gamma if args.simpo_gamma is not None else DEFAULT_SIMPO_GAMMA
    norm = args.loss_type in LENGTH_NORMALISED
    accelerator = distributed.make_accelerator(args)
    device, world, GA = accelerator.device, accelerator.num_processes, args.gradient_accumulation_steps

    # data first: a bad dataset fails before any model is built
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    train_ds, eval_ds = preference.load_pairs(args, "cpo.py", toy_n=args.num_eval_pairs)
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
        start_step, elapsed, state = saved["step"], saved["elapsed"], {**state, **saved["cpo_state"]}
        accelerator.print(f"resumed from {resume} at step {start_step}")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss", "nll_loss", "rewards/margins", "rewards/accuracies",
                                     "eval/rewards/accuracies", "eval/gold_reward"))
    name = ({"sigmoid": "CPO", "simpo": "CPO-SimPO" if args.cpo_alpha else "SimPO"}.get(args.loss_type, args.loss_type)
            if not args.alpha else f"AlphaPO (α {args.alpha:g}, {args.loss_type})")
    accelerator.print(f"cpo: {name}: {len(train)} pairs, {len(eval_rows)} eval pairs, β {args.beta}"
                      f"{f', γ {gamma}' if args.loss_type == 'simpo' else ''}, cpo_alpha {args.cpo_alpha}, "
                      f"{global_bs} pairs per step, {args.max_steps} steps, {world} process(es) -> {args.output_dir}")
    pad_id = tokenizer.pad_token_id

    def pair_terms(m, rows, batch, tokens_per_pair, want_entropy):
        """The per-pair total loss (B,), its parts and what the metrics need, for one micro-batch."""
        f = forward_pairs(m, batch, want_entropy)  # S, |y| and the statistics from one chunked-head pass
        B = len(rows)
        s = sequence_scores(f["logps"], f["tokens"], norm)  # (2B,)
        losses, rew_w, rew_l = cpo_loss(s[:B], s[B:], args.loss_type, args.beta, gamma, args.alpha,
                                        args.label_smoothing)
        chosen_nll = -f["logps"][:B]  # (B,) summed over each chosen completion
        total = losses + args.cpo_alpha * nll_share(chosen_nll, tokens_per_pair)
        return total, {"s": s, "rew_w": rew_w, "rew_l": rew_l, "nll": chosen_nll, "f": f}

    def add_stats(acc: dict, total, q: dict):
        """Sums for the TRL metrics (detail 7), as tensors; reduced once at log time."""
        with torch.no_grad():
            f, s = q["f"], q["s"]
            B = s.shape[0] // 2
            vals = {"pairs": float(B), "loss": total.sum(), "nll": q["nll"].sum(),
                    "chosen_tokens": f["tokens"][:B].sum(),
                    "rewards/chosen": q["rew_w"].sum(), "rewards/rejected": q["rew_l"].sum(),
                    "rewards/margins": (q["rew_w"] - q["rew_l"]).sum(),
                    "rewards/accuracies": (q["rew_w"] > q["rew_l"]).float().sum(),
                    "logps/chosen": s[:B].sum(), "logps/rejected": s[B:].sum(),
                    "logits/chosen": f["mean_logits"][:B].sum(),
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
        out = {k: tot[k] / n for k in keys if k.startswith(("loss", "rewards/", "logps/"))}
        out["nll_loss"] = tot["nll"] / max(tot["chosen_tokens"], 1)
        out["logits/chosen"] = tot["logits/chosen"] / max(tot["chosen_tokens"], 1)
        out["logits/rejected"] = tot["logits/rejected"] / max(tot["rejected_tokens"], 1)
        out["mean_token_accuracy"] = tot["correct_tokens"] / max(tot["chosen_tokens"], 1)
        if "entropy" in tot:
            out["entropy"] = tot["entropy"] / max(tot["entropy_tokens"], 1)
        return {prefix + k: v for k, v in out.items()}

    eval_tokens_per_pair = (sum(len(r[1]) for r in eval_rows) / len(eval_rows)) if eval_rows else 1.0

    @torch.no_grad()
    def evaluate() -> dict:
        out = {}
        if eval_rows:
            model.eval()
            acc: dict = {}
            mine = list(range(accelerator.process_index, len(eval_rows), world))
            for s in range(0, len(mine), args.per_device_eval_batch_size):
                rows = [eval_rows[i] for i in mine[s:s + args.per_device_eval_batch_size]]
                batch = pair_layout(rows, pad_id, device, args.packing)
                total, q = pair_terms(model, rows, batch, eval_tokens_per_pair, False)
                add_stats(acc, total, q)
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
        # the step's chosen-token count (known from the data): the NLL's global token mean (detail 5)
        tokens_per_pair = sum(len(train[i][1]) for i in indices) / global_bs
        for mb in micro:
            rows = [train[i] for i in mb]
            batch = pair_layout(rows, pad_id, device, args.packing)
            with accelerator.accumulate(model):
                total, q = pair_terms(model, rows, batch, tokens_per_pair, log_step)
                # mean over the global batch's pairs: undo accelerate's 1/accumulation and DDP's 1/processes
                loss = total.sum() / global_bs
                accelerator.backward(loss * GA * world)
                if accelerator.sync_gradients:  # a non-finite gradient norm skips the step
                    gn, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                             args.max_grad_norm)
                    state["skipped_steps"] += not stepped
                    if stepped:
                        grad_norms.append(gn)
            add_stats(acc, total, q)
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
                               {"elapsed": tracker.elapsed(), "cpo_state": dict(state)}, args.save_total_limit)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
