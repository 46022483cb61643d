"""Reward modelling with the Bradley-Terry model (outcome reward model).

Paper lineage: "Training language models to follow instructions with human feedback" (Ouyang et al., arXiv
2203.02155, Eq. 1); the margin term from Llama 2 (arXiv 2307.09288, Eq. 2); reward centring from "Helping or
Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking" (Eisenstein et al., arXiv 2312.09244).
Implements, for preference pairs (x, y_w, y_l) with scalar scores r = r_φ(x, y) read at the last real token:
    L(φ) = mean_i [ -log σ(r_w,i - r_l,i - margin_i) ]  +  c · mean_i (r_w,i + r_l,i)^2     (c = --center_rewards_coefficient)
margin_i comes from an optional `margin` column (0 when absent). The model is a `*ForSequenceClassification` with
one output, saved so that `AutoModelForSequenceClassification.from_pretrained` loads it back.

Implementation details (numbered; tests name the detail they check):
  1. The score is read at the last real token of prompt+completion (the completion ends with EOS), whatever the
     padding side (`common/model.sequence_classifier_scores`); rows are cut from the LEFT to --max_length so that
     token is always kept.
  2. Chosen and rejected rows of a micro-batch go through one forward (2B rows), so both see the same weights and
     the same dropout mode.
  3. The loss is the pair mean of -log σ(r_w - r_l - margin) (+ the centring term); micro-batches hold equally many
     pairs, so the mean over accumulation steps and processes equals the mean over the whole optimizer-step batch.
  4. The optional `margin` column is subtracted inside the sigmoid (Llama 2, Eq. 2); centring penalises
     (r_w + r_l)^2, pulling the scores' mean to 0 without changing any difference (the loss is shift-invariant without
     it).
  5. Accuracy counts a pair as right only when r_w > r_l strictly (ties are wrong); `margin` logs mean(r_w - r_l).
  6. The toy default starts from the fully trained toy SFT model (`toy-sft-full`) with a fresh one-output head, as
     InstructGPT starts its reward model from the SFT model.
  7. `--packing`: the micro-batch's 2B sequences are packed into rows as long as the longest (best-fit decreasing,
     positions restart and attention stays within each sequence; common/packing.py) and each score is read at its
     sequence's last token: the same scores and loss as left padding, without the padding's compute.

Data: preference (`prompt, chosen, rejected`, or implicit prompt `chosen, rejected`), standard or conversational.
Default: the toy addition task's pairs (chosen correct, rejected a plausible wrong answer), toy Llama backbone.

Run:
    python algos/reward.py                                  # toy reward model, well under a minute on 2 CPU cores
    accelerate launch --multi_gpu --num_processes 2 algos/reward.py
    python algos/reward.py --dataset_name pairs.jsonl --eval_fraction 0.1   # eval/accuracy on 10% held-out pairs
    python algos/reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --learning_rate 1e-5 --max_length 1024
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

from common import checkpoint, data, distributed, model as model_utils, packing, peft_utils, tracking


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "reward"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (model init, data order)"""
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
    """'toy-sft-full' (a fully trained toy SFT model: the reward model starts from an SFT model, as in InstructGPT),
    'toy' (fresh toy Llama), a local folder or a hub name; a causal-LM checkpoint gets a new score head"""
    dataset_name: str = "toy:add"
    """'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name"""
    dataset_split: str = "train"
    """split to train on"""
    eval_split: str | None = "test"
    """held-out split for pairwise accuracy: of a toy dataset, or of --eval_dataset_name when it is a hub name"""
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
    """AdamW learning rate (TRL's default is 1e-4)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    optim: str = "adamw_torch"
    """AdamW kernel: 'adamw_torch' (torch's default for the device; the toy start policies are built with it) or
    'adamw_torch_fused' (TRL's default: one fused kernel per step, faster, other float rounding; single process or
    DDP on CPU / CUDA)"""
    warmup_steps: int = 20
    """linear warm-up steps, then linear decay to 0"""
    max_steps: int = 1000
    """optimizer steps"""
    per_device_train_batch_size: int = 64
    """preference pairs per micro-batch per process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- reward model
    max_length: int = 128
    """longest tokenised prompt+completion kept (cut from the left)"""
    packing: bool = False
    """padding-free micro-batches: chosen and rejected sequences packed into rows as long as the longest (detail 7)"""
    center_rewards_coefficient: float | None = None
    """c in + c·mean((r_w + r_l)^2), keeps scores centred on 0 (2312.09244 recommends 0.01; None: off)"""
    eval_steps: int = 100
    """evaluate every this many steps"""
    num_eval_pairs: int = 512
    """held-out pairs for the evaluation accuracy"""
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


# ----------------------------------------------------------------------------- the loss
# Shapes: B preference pairs.
def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float | None = None) -> torch.Tensor:
    """mean(-log σ(r_w - r_l - margin)) [+ c·mean((r_w + r_l)^2)]. r_chosen, r_rejected, margin: (B,)."""
    assert r_chosen.shape == r_rejected.shape and r_chosen.dim() == 1
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# ----------------------------------------------------------------------------- data
def tokenize_pairs(ds, tokenizer, max_length: int):
    """Token ids of prompt+chosen and prompt+rejected per row (cut from the left to max_length), and margins."""
    prompts = [data.prompt_text(p, tokenizer) for p in ds["prompt"]]
    chosen = data.tokenize(tokenizer, [p + data.completion_text(q, c, tokenizer)
                                       for p, q, c in zip(prompts, ds["prompt"], ds["chosen"])])
    rejected = data.tokenize(tokenizer, [p + data.completion_text(q, r, tokenizer)
                                         for p, q, r in zip(prompts, ds["prompt"], ds["rejected"])])
    margins = [float(m) for m in ds["margin"]] if "margin" in ds.column_names else [0.0] * len(ds)
    return [(c[-max_length:], r[-max_length:], m) for c, r, m in zip(chosen, rejected, margins)]


def score_pairs(model, rows, pad_id, device, score_head=None, packed: bool = False):
    """Scores (2B,) for the chosen rows then the rejected rows, in one left-padded (or packed, detail 7) forward."""
    if packed:
        return packing.packed_sequence_scores(model, [r[0] for r in rows] + [r[1] for r in rows], pad_id, device,
                                              score_head)
    ids, mask = data.pad([r[0] for r in rows] + [r[1] for r in rows], pad_id, "left")
    return model_utils.sequence_classifier_scores(model, ids.to(device), mask.to(device), score_head)


@torch.no_grad()
def evaluate(model, rows, pad_id, device, score_head, batch_size=256) -> dict:
    correct, margin = 0.0, 0.0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        scores = score_pairs(model, chunk, pad_id, device, score_head)
        rc, rr = scores[: len(chunk)], scores[len(chunk):]
        correct += (rc > rr).float().sum().item()
        margin += (rc - rr).sum().item()
    return {"eval/accuracy": correct / len(rows), "eval/margin": margin / len(rows)}


# ----------------------------------------------------------------------------- main
def main(args: Args):
    from transformers import AutoModelForSequenceClassification

    from common import toy

    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    if args.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError(f"--optim {args.optim!r}: choose 'adamw_torch' or 'adamw_torch_fused'")
    accelerator = distributed.make_accelerator(args)
    if args.optim == "adamw_torch_fused" and (accelerator.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU")
                                             or accelerator.device.type not in ("cpu", "cuda")):
        raise ValueError(f"--optim adamw_torch_fused: not with {accelerator.distributed_type.value} on "
                         f"{accelerator.device.type} (DeepSpeed and FSDP manage the parameters); use --optim adamw_torch")

    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    train_ds, eval_ds = data.load_splits(args, "preference", "reward.py", toy_n=args.num_eval_pairs)
    train = tokenize_pairs(train_ds, tokenizer, args.max_length)
    eval_rows = tokenize_pairs(eval_ds, tokenizer, args.max_length) if eval_ds is not None else []  # never train rows
    global_bs = distributed.global_batch_size(args, accelerator)
    data.check_batch_fits(len(train), global_bs, ["--per_device_train_batch_size", "--gradient_accumulation_steps"])
    peft_utils.check_args(args, task="SEQ_CLS")  # LoRA flags and module names, before anything is loaded or written
    resume = checkpoint.prepare_output_dir(args)  # one run per folder: refuses to mix with another run's files

    if args.model_name_or_path == "toy":
        torch.manual_seed(args.seed)
        config = toy.make_config(tokenizer)
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_utils.resolve(args.model_name_or_path, args.dataset_name),
                                                                   num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = peft_utils.maybe_wrap(model, args, task="SEQ_CLS")  # --use_peft: LoRA adapters; the score head trains fully
    score_head = model.score
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=True if args.optim == "adamw_torch_fused" else None)  # None: torch's default

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
    accelerator.print(f"reward: {len(train)} pairs, global batch {global_bs}, {args.max_steps} steps -> {args.output_dir}")

    pad_id = tokenizer.pad_token_id
    stats = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0, "pairs": 0.0, "tokens": 0.0}
    rmin, rmax = float("inf"), float("-inf")
    model.train()
    for step in range(start_step, args.max_steps):
        indices = data.batch_indices(len(train), global_bs, step, args.seed)
        for mb in distributed.micro_batches(indices, args, accelerator):
            rows = [train[i] for i in mb]
            with accelerator.accumulate(model):
                scores = score_pairs(model, rows, pad_id, accelerator.device, score_head, args.packing)
                rc, rr = scores[: len(rows)], scores[len(rows):]
                margin = torch.tensor([r[2] for r in rows], device=rc.device)
                # each micro-batch holds the same number of pairs, so the mean of micro-batch means is the batch mean
                loss = bradley_terry_loss(rc, rr, margin, args.center_rewards_coefficient)
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # a non-finite gradient norm skips the step (counted)
                    _, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                            args.max_grad_norm)
                    skipped_steps += not stepped
            with torch.no_grad():  # summed as tensors: read (one device sync) on logged steps only
                stats["loss"] += loss.detach() * len(rows)
                stats["correct"] += (rc > rr).float().sum()
                stats["margin"] += (rc - rr).sum()
                stats["chosen"] += rc.sum()
                stats["rejected"] += rr.sum()
                stats["pairs"] += len(rows)
                stats["tokens"] += sum(len(r[0]) + len(r[1]) for r in rows)
                rmin, rmax = torch.minimum(scores.min(), torch.as_tensor(rmin)), torch.maximum(scores.max(),
                                                                                               torch.as_tensor(rmax))

        done = step + 1
        if done % args.logging_steps == 0 or done == args.max_steps:
            tot = {k: distributed.gather_sum(accelerator, v) for k, v in stats.items()}
            n = tot["pairs"]
            metrics = {"loss": tot["loss"] / n, "accuracy": tot["correct"] / n, "margin": tot["margin"] / n,
                       "mean_reward": (tot["chosen"] + tot["rejected"]) / (2 * n), "chosen_reward": tot["chosen"] / n,
                       "rejected_reward": tot["rejected"] / n, "min_reward": float(rmin), "max_reward": float(rmax),
                       "num_tokens": tot["tokens"], "learning_rate": scheduler.get_last_lr()[0],
                       "train/skipped_steps": skipped_steps}
            stats, rmin, rmax = dict.fromkeys(stats, 0.0), float("inf"), float("-inf")
            if eval_rows and args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps):
                model.eval()
                metrics.update(evaluate(model, eval_rows, pad_id, accelerator.device, score_head))
                model.train()
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
    accelerator.print(f"saved the final reward model to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
