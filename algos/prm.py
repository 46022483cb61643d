"""Process reward model (PRM): a token classifier that judges every step of a solution.

Paper lineage: "Let's Verify Step by Step" (Lightman et al., arXiv 2305.20050) and "Math-Shepherd: Verify and
Reinforce LLMs Step-by-step without Human Annotations" (Wang et al., arXiv 2312.08935); the recipe of TRL's
PRMTrainer (experimental, last shipped in TRL 1.13). For a row (x, steps s_1..s_S, labels y_1..y_S ∈ [0, 1]) the
input is x, then every step followed by the step separator; the model's two-class head is read at the last
separator token after each step (position τ_k), and
    L(φ) = - Σ_{rows} Σ_k [ y_k log p_φ(correct | τ_k) + (1 - y_k) log p_φ(incorrect | τ_k) ] / N_lab
with N_lab the labelled steps of the whole optimizer step (all micro-batches and processes): a global mean over
steps. Every other token carries no label. --train_on_last_step_only labels only the last step of training rows.

Implementation details (numbered so the tests and the README can point at them):
 1. Layout (TRL's tokenize_row): the prompt rendered as every script renders it (common/data.prompt_text: BOS for
    tokenizers that add it, the chat template with a generation prompt for conversational prompts), then each step
    tokenised on its own, followed by the separator's own tokens. A step's label sits on the separator's last token,
    so a tokenizer that would merge the separator with the next step's text cannot move it.
 2. Labels: booleans or numbers in [0, 1] (checked at start-up, naming the row). Numbers between 0 and 1 are soft
    targets of the cross-entropy. DEVIATION (TRL): TRL casts labels with int(), which turns 0.7 into 0; hard labels
    give the same loss either way. A step counts as correct (for the accuracies) when its label is > 0.5.
 3. --train_on_last_step_only applies to training rows only; evaluation labels every step (as TRL's is_eval).
 4. Truncation to --max_length: prompt tokens are cut from the left first (keeping one), then the completion from the
    right, so the labels of the last steps go first. (TRL cuts the whole row from the right.)
 5. Aggregation: the per-step cross-entropy is summed over the micro-batch and divided by N_lab of the whole
    optimizer step (TRL: num_items_in_batch), and the backward undoes accelerate's and DDP's averaging, so 4 x 2
    accumulation and 2 processes equal one batch of 8.
 6. Model: `*ForTokenClassification` with two labels {0: incorrect, 1: correct}, starting from a causal-LM checkpoint
    (the toy default: toy-sft-full, the fully trained toy SFT model) with a fresh head; dropout off (TRL's
    disable_dropout). The step separator is saved into config.json (`step_separator`), so the scorer splits steps
    as training did.
 7. Non-finite safety: a non-finite gradient norm skips the optimizer step (train/skipped_steps); non-finite weights
    are never saved.
 8. Metrics: loss, accuracy (over the labelled steps; TRL's compute_accuracy is argmax vs label), num_tokens,
    learning_rate, grad_norm; eval/loss, eval/accuracy (every held-out step), eval/accuracy_correct_steps and
    eval/accuracy_incorrect_steps (per true class), eval/outcome_accuracy (the minimum-aggregated score > 0.5, i.e.
    every step judged correct, against every step labelled correct).

Using the trained PRM as a reward in the online scripts (common/prm_scoring.py): `--reward_funcs prm:<output_dir>`
scores a completion by the minimum over its steps of P(correct) (`prm:prod:<dir>` the product, `prm:last:<dir>`
the last step's).

Data: stepwise supervision (`prompt`, `completions` = list of steps, `labels` = one per step), standard or
conversational prompts. Default: the toy stepwise rows of toy:add (one step per answer digit; half the rows carry a
plausible wrong answer, whose steps are labelled incorrect from the first wrong digit on). Judging a digit means
redoing the addition, and the toy PRM first learns only where errors tend to be: its held-out step accuracy stays
at the share of correct steps (about 0.71) for roughly 1000 steps before it rises (benchmarks/results/prm).

Run:
    python algos/prm.py                                    # toy PRM, about four minutes on 2 CPU cores
    python algos/prm.py --train_on_last_step_only True     # outcome labels only
    accelerate launch --multi_gpu --num_processes 2 algos/prm.py --per_device_train_batch_size 32
    python algos/grpo.py --reward_funcs prm:runs/my_prm    # the trained PRM as the reward of GRPO
    python algos/prm.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/math_shepherd \
        --learning_rate 1e-5 --max_length 1024 --per_device_train_batch_size 8
    bash benchmarks/prm.sh                                 # 3 seeds -> benchmarks/results/prm
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro

from common import checkpoint, data, distributed, model as model_utils, peft_utils, toy, tracking


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "prm"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (head init, data order)"""
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
    model_name_or_path: str = "toy-sft-full"
    """'toy-sft-full' (the fully trained toy SFT model), 'toy' (fresh toy Llama), a local folder or a hub name; a
    causal-LM checkpoint gets a new two-class token head"""
    dataset_name: str = "toy:add"
    """stepwise data: 'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet file, a save_to_disk folder or a
    hub name"""
    dataset_split: str = "train"
    """split to train on"""
    eval_split: str | None = "test"
    """held-out split: of a toy dataset, or of --eval_dataset_name when it is a hub name (None: no toy evaluation)"""
    eval_dataset_name: str | None = None
    """held-out data: a file, a save_to_disk folder or a hub name (split eval_split)"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for evaluation (deterministic; never overlaps training)"""
    logging_steps: int = 10
    """log metrics every this many optimizer steps"""
    save_steps: int = 100
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
    learning_rate: float = 2e-4
    """AdamW learning rate (TRL's PRMConfig uses 1e-5 for pretrained models)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 20
    """linear warm-up steps, then linear decay to 0"""
    max_steps: int = 2000
    """optimizer steps (on the toy task the held-out step accuracy stays at the step-position baseline for about
    1000 steps, then rises)"""
    per_device_train_batch_size: int = 64
    """stepwise rows (sequences) per micro-batch per process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- PRM
    step_separator: str = "\n"
    """text appended to every step; the step's label sits on its last token"""
    train_on_last_step_only: bool = False
    """label only the last step of each training row (evaluation still labels every step)"""
    max_length: int = 128
    """longest tokenised row kept (prompt cut from the left first, then the completion from the right)"""
    disable_dropout: bool = True
    """turn the model's dropout off (TRL's default; the token-classification head has dropout 0.1 otherwise)"""
    eval_steps: int = 100
    """evaluate every this many steps (and at the end)"""
    num_eval_rows: int = 512
    """held-out stepwise rows to evaluate on"""
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


IGNORE = -100.0  # label of the tokens that carry none
LABELS = {0: "incorrect", 1: "correct"}


# ----------------------------------------------------------------------------- the loss
# Shapes: B rows per micro-batch, L tokens per row, N labelled steps in the micro-batch.
def step_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: float) -> torch.Tensor:
    """Soft-target cross-entropy -[y log p(correct) + (1 - y) log p(incorrect)] summed over the labelled positions
    and divided by the labelled steps of the whole optimizer step (detail 5). logits (B, L, 2); labels (B, L) with
    IGNORE where there is no label."""
    assert logits.shape[:2] == labels.shape and logits.shape[-1] == 2
    keep = labels != IGNORE
    logp = torch.log_softmax(logits[keep].float(), -1)  # (N, 2)
    y = labels[keep]  # (N,)
    return -(y * logp[:, 1] + (1.0 - y) * logp[:, 0]).sum() / num_items


def step_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) 1.0 where the argmax class agrees with the label (correct when > 0.5) at the labelled positions."""
    keep = labels != IGNORE
    return (logits[keep].argmax(-1) == (labels[keep] > 0.5).long()).float()


# ----------------------------------------------------------------------------- data
def tokenize_row(prompt_ids: list[int], step_ids: list[list[int]], sep_ids: list[int], labels: list[float],
                 last_step_only: bool, max_length: int) -> tuple[list[int], list[float]]:
    """Ids of prompt + (step + separator) per step and their labels: each step's label on its separator's last
    token, IGNORE elsewhere (detail 1; detail 3 for last_step_only); then the cut of detail 4."""
    assert len(step_ids) == len(labels) and sep_ids
    ids, lab = list(prompt_ids), [IGNORE] * len(prompt_ids)
    for k, (s, y) in enumerate(zip(step_ids, labels)):
        piece = list(s) + list(sep_ids)
        ids += piece
        labelled = not last_step_only or k == len(step_ids) - 1
        lab += [IGNORE] * (len(piece) - 1) + [float(y) if labelled else IGNORE]
    over = len(ids) - max_length
    if over > 0:
        cut = min(over, max(len(prompt_ids) - 1, 0))
        ids, lab = ids[cut:][:max_length], lab[cut:][:max_length]
    return ids, lab


def step_text(step) -> str:
    """A step: a string, or a {"role", "content"} message (its content)."""
    return step["content"] if isinstance(step, dict) else step


def check_stepwise(ds, what: str):
    """Every row has a non-empty list of steps and one label per step, each a bool or a number in [0, 1]."""
    for i, (steps, labels) in enumerate(zip(ds["completions"], ds["labels"])):
        if not isinstance(steps, list) or not steps:
            raise data.DatasetFormatError(f"{what}: row {i}, column 'completions' is {steps!r:.80}, not a non-empty "
                                          "list of steps")
        if not isinstance(labels, list) or len(labels) != len(steps):
            raise data.DatasetFormatError(f"{what}: row {i} has {len(steps)} steps but 'labels' is {labels!r:.80}; "
                                          "give one label per step")
        for k, y in enumerate(labels):
            ok = isinstance(y, numbers.Real) and math.isfinite(float(y)) and 0.0 <= float(y) <= 1.0
            if not ok:
                raise data.DatasetFormatError(f"{what}: row {i}, label {k} is {y!r}; a step label is True/False or a "
                                              "number in [0, 1] (the probability that the step is correct)")
        for k, s in enumerate(steps):
            if not isinstance(step_text(s), str):
                raise data.DatasetFormatError(f"{what}: row {i}, step {k} is {s!r:.80}, not a string")


def tokenize_rows(ds, tokenizer, sep: str, last_step_only: bool, max_length: int):
    sep_ids = data.tokenize(tokenizer, [sep])[0]
    p_ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in ds["prompt"]])
    out = []
    for p, steps, labels in zip(p_ids, ds["completions"], ds["labels"]):
        s_ids = data.tokenize(tokenizer, [step_text(s) for s in steps])
        out.append(tokenize_row(p, s_ids, sep_ids, [float(y) for y in labels], last_step_only, max_length))
    return out


def batch_rows(rows, pad_id: int, device) -> dict:
    ids, mask = data.pad([r[0] for r in rows], pad_id, "right")
    labels = torch.full(ids.shape, IGNORE)
    for i, (_, lab) in enumerate(rows):
        labels[i, :len(lab)] = torch.tensor(lab)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def forward(model, batch: dict) -> torch.Tensor:
    """(B, L, 2) logits of a right-padded batch."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=model_utils.position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits


@torch.no_grad()
def evaluate(model, rows, pad_id: int, device, batch_size: int = 128) -> dict:
    """Loss and accuracies over every labelled step of the held-out rows (every process evaluates all of them)."""
    was_training = model.training
    model.eval()
    loss, n, correct, pos, pos_ok, neg_ok, outcome_ok = 0.0, 0, 0.0, 0, 0.0, 0.0, 0.0
    for s in range(0, len(rows), batch_size):
        batch = batch_rows(rows[s:s + batch_size], pad_id, device)
        logits, labels = forward(model, batch), batch["labels"]
        loss += step_loss(logits, labels, 1.0).item()
        ok, keep = step_correct(logits, labels), labels != IGNORE
        is_pos = labels[keep] > 0.5
        n, correct = n + ok.numel(), correct + ok.sum().item()
        pos, pos_ok = pos + is_pos.sum().item(), pos_ok + ok[is_pos].sum().item()
        neg_ok += ok[~is_pos].sum().item()
        pred_all = torch.where(keep, logits.argmax(-1) == 1, True).all(1)  # min over steps of P(correct) > 0.5
        true_all = torch.where(keep, labels > 0.5, True).all(1)
        outcome_ok += (pred_all == true_all)[keep.any(1)].float().sum().item()
    model.train(was_training)
    n_rows = sum(1 for r in rows if any(y != IGNORE for y in r[1]))
    return {"eval/loss": loss / max(n, 1), "eval/accuracy": correct / max(n, 1),
            "eval/accuracy_correct_steps": pos_ok / max(pos, 1),
            "eval/accuracy_incorrect_steps": neg_ok / max(n - pos, 1),
            "eval/outcome_accuracy": outcome_ok / max(n_rows, 1)}


# ----------------------------------------------------------------------------- main
def main(args: Args):
    from transformers import AutoModelForTokenClassification

    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    if not args.step_separator:
        raise ValueError("--step_separator must be a non-empty string (TRL's default is '\\n')")
    if args.max_steps <= 0 or args.per_device_train_batch_size <= 0:
        raise ValueError("--max_steps and --per_device_train_batch_size must be positive")
    accelerator = distributed.make_accelerator(args)
    W, A = accelerator.num_processes, args.gradient_accumulation_steps

    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    if not data.tokenize(tokenizer, [args.step_separator])[0]:
        raise ValueError(f"--step_separator {args.step_separator!r} tokenises to nothing with this tokenizer")
    train_ds, eval_ds = data.load_splits(args, "stepwise", "prm.py", toy_n=args.num_eval_rows)
    check_stepwise(train_ds, f"--dataset_name {args.dataset_name}")
    train = tokenize_rows(train_ds, tokenizer, args.step_separator, args.train_on_last_step_only, args.max_length)
    eval_rows = []
    if eval_ds is not None:
        check_stepwise(eval_ds, f"{args.eval_dataset_name or args.dataset_name} (held-out rows)")
        eval_rows = tokenize_rows(eval_ds, tokenizer, args.step_separator, False, args.max_length)[:args.num_eval_rows]
    global_bs = distributed.global_batch_size(args, accelerator)
    data.check_batch_fits(len(train), global_bs, ["--per_device_train_batch_size", "--gradient_accumulation_steps"])
    peft_utils.check_args(args, task="TOKEN_CLS")  # LoRA flags and module names, before anything is loaded or written
    resume = checkpoint.prepare_output_dir(args)  # one run per folder: refuses to mix with another run's files

    torch.manual_seed(args.seed)  # the new head's initialisation
    label_kwargs = {"num_labels": 2, "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    if args.model_name_or_path in model_utils.TOY_CONFIGS:
        config = toy.make_config(tokenizer, **model_utils.TOY_CONFIGS[args.model_name_or_path])
        config.update(label_kwargs)
        model = AutoModelForTokenClassification.from_config(config)
    else:
        model = AutoModelForTokenClassification.from_pretrained(
            model_utils.resolve(args.model_name_or_path, args.dataset_name), **label_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.step_separator = args.step_separator  # detail 6: the scorer splits steps as training did
    model = peft_utils.maybe_wrap(model, args, task="TOKEN_CLS")  # --use_peft: LoRA; the score head trains fully
    if args.disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    def lr_lambda(step):
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - args.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand once per optimizer step

    start_step, elapsed, skipped_steps = 0, 0.0, 0
    if resume is not None:
        state = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed, skipped_steps = state["step"], state["elapsed"], state.get("skipped_steps", 0)
        accelerator.print(f"resumed from {resume} at step {start_step}")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss", "accuracy", "eval/accuracy"))
    accelerator.print(f"prm: {len(train)} rows; {W} process(es), global batch {global_bs}, separator "
                      f"{args.step_separator!r}, {args.max_steps} steps -> {args.output_dir}")

    pad_id, device = tokenizer.pad_token_id, accelerator.device
    stats = {"loss": 0.0, "correct": 0.0, "steps": 0.0, "tokens": 0.0}
    norms = []
    model.train()
    for step in range(start_step, args.max_steps):
        indices = data.batch_indices(len(train), global_bs, step, args.seed)
        micro = distributed.micro_batches(indices, args, accelerator)
        local_steps = sum(sum(y != IGNORE for y in train[i][1]) for mb in micro for i in mb)
        num_items = max(distributed.gather_sum(accelerator, local_steps), 1.0)  # labelled steps in the whole step
        for mb in micro:
            batch = batch_rows([train[i] for i in mb], pad_id, device)
            with accelerator.accumulate(model):
                logits = forward(model, batch)
                loss = step_loss(logits, batch["labels"], num_items)
                # accelerate divides by the accumulation steps and DDP averages over processes; undo both (detail 5)
                accelerator.backward(loss * A * W)
                if accelerator.sync_gradients:  # a non-finite gradient norm skips the step (counted)
                    norm, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                               args.max_grad_norm)
                    skipped_steps += not stepped
                    norms.append(norm)
            with torch.no_grad():
                ok = step_correct(logits, batch["labels"])
                stats["loss"] += loss.item() * num_items
                stats["correct"] += ok.sum().item()
                stats["steps"] += ok.numel()
                stats["tokens"] += batch["attention_mask"].sum().item()

        done = step + 1
        if done % args.logging_steps == 0 or done == args.max_steps:
            tot = {k: distributed.gather_sum(accelerator, v) for k, v in stats.items()}
            metrics = {"loss": tot["loss"] / max(tot["steps"], 1), "accuracy": tot["correct"] / max(tot["steps"], 1),
                       "num_tokens": tot["tokens"], "grad_norm": sum(norms) / len(norms),
                       "learning_rate": scheduler.get_last_lr()[0], "train/skipped_steps": skipped_steps}
            stats, norms = dict.fromkeys(stats, 0.0), []
            if eval_rows and args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps):
                metrics.update(evaluate(model, eval_rows, pad_id, device))
            tracker.log(metrics, done, args.max_steps)
        if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
            checkpoint.save_checkpoint(accelerator, args.output_dir, done, model, tokenizer, args,
                                       {"elapsed": tracker.elapsed(), "skipped_steps": skipped_steps},
                                       args.save_total_limit)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir, args.max_steps)
    if args.save_steps:
        checkpoint.save_checkpoint(accelerator, args.output_dir, args.max_steps, model, tokenizer, args,
                                   {"elapsed": tracker.elapsed(), "skipped_steps": skipped_steps},
                                   args.save_total_limit)
    tracker.close()
    accelerator.print(f"saved the final process reward model to {args.output_dir}; use it as a reward with "
                      f"--reward_funcs prm:{args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
