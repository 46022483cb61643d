"""Supervised fine-tuning (SFT): maximum likelihood on demonstrations.

Paper lineage: the SFT stage of "Training language models to follow instructions with human feedback"
(Ouyang et al., arXiv 2203.02155). Implements
    L(θ) = - Σ_{i,t} m_{i,t} log π_θ(y_{i,t} | x_i, y_{i,<t}) / N_lab
with N_lab the number of label tokens in the whole optimizer-step batch (all accumulation micro-batches and all
processes): a global token mean, so gradient accumulation and multi-process runs give the same update as one big
batch. By default the loss covers completion tokens only (prompt-completion data) or every token (language-modelling
data); `--completion_only_loss False` trains on prompt tokens too. Completions keep their EOS token.

Implementation details (numbered; tests name the detail they check):
  1. Loss aggregation: a global token mean over the optimizer step (above), for both loss types.
  2. `--assistant_only_loss` (multi-turn `messages`): only the tokens of assistant turns are trained (their content
     and the token that ends the turn). The mask comes from the chat template's `{% generation %}` markers when the
     template has them (transformers' `return_assistant_tokens_mask`), otherwise from rendering the conversation turn
     by turn: the tokens an assistant turn adds to the rendered prefix are its tokens (the template must render each
     prefix of the conversation as a prefix of the whole; if not, the run stops at start-up naming the row).
  3. `--loss_type dft` (Dynamic Fine-Tuning, Wu et al., arXiv 2508.05629, Eq. 9): per token -sg(p_t) log p_t, with
     p_t = exp(log π_θ(y_t|.)) detached; the same global token mean as NLL (TRL's SFT `loss_type="dft"`).
  4. NEFTune (Jain et al., arXiv 2310.05914, Alg. 1): in training only, the input embeddings get
     ε ~ Uniform(-1, 1) · α / sqrt(L · d) (L the padded sequence length of the micro-batch, d the hidden size), added
     by a forward hook on the input embedding layer; evaluation and the saved model are untouched.
  5. `--packing`: each micro-batch's sequences are packed into rows as long as its longest sequence (best-fit
     decreasing; so no row is longer than a padded one and attention costs no more), position ids restart at every
     sequence and attention stays within it (common/packing.py), and the head runs only where a token is trained. Same sequences, same loss (a global token mean), same gradient as the
     padded batch up to float rounding; only the padding's compute is gone. NEFTune's L is then the packed row length.

Data: language modelling (`text` / `messages`) or prompt-completion (`prompt`, `completion`), standard or
conversational. Default: the built-in toy addition task and a freshly initialised toy Llama (no network).

Run:
    python algos/sft.py                                   # toy model on toy:add, about two minutes on 2 CPU cores
    python algos/sft.py --max_steps 475 --lr_decay_steps 1000   # the RL scripts' start policy (toy-sft)
    python algos/sft.py --dataset_name toy:reverse:conversational
    python algos/sft.py --packing True                     # padding-free micro-batches (detail 5)
    python algos/sft.py --dataset_name my_data.jsonl --eval_fraction 0.05   # eval/loss on 5% held-out rows
    accelerate launch --multi_gpu --num_processes 2 algos/sft.py   # same global batch, same result (--multi_gpu: also on CPU)
    python algos/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \
        --learning_rate 2e-5 --max_length 1024 --per_device_train_batch_size 4 --gradient_accumulation_steps 8
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro

from common import checkpoint, data, distributed, model as model_utils, packing, peft_utils, tracking
from common.evaluation import heldout_gold_reward


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "sft"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (model init, data order, sampling)"""
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
    model_name_or_path: str = "toy"
    """'toy' (fresh toy Llama), a local folder or a hub name"""
    dataset_name: str = "toy:add"
    """'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name"""
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
    learning_rate: float = 1e-3
    """AdamW learning rate (the toy model trains from scratch; use ~2e-5 for a pretrained model)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    optim: str = "adamw_torch"
    """AdamW kernel: 'adamw_torch' (torch's default for the device; the toy start policies are built with it) or
    'adamw_torch_fused' (TRL's default: one fused kernel per step, faster, other float rounding; single process or
    DDP on CPU / CUDA)"""
    warmup_steps: int = 20
    """linear warm-up steps"""
    lr_scheduler: str = "linear"
    """after warm-up: 'linear' decay to 0 or 'constant'"""
    lr_decay_steps: int | None = None
    """step at which the linear decay reaches 0 (default --max_steps); larger than --max_steps, the run is the start
    of that longer run (the RL scripts' start policy is the default run stopped at 475 of its 1000 steps)"""
    max_steps: int = 1000
    """optimizer steps"""
    per_device_train_batch_size: int = 64
    """sequences per micro-batch per process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- SFT
    max_length: int = 128
    """longest tokenised sequence kept (prompt tokens are cut from the left first)"""
    packing: bool = False
    """padding-free micro-batches: the micro-batch's sequences packed into rows as long as its longest sequence
    (best-fit decreasing; positions restart and attention stays within each sequence; common/packing.py). The same
    sequences and loss as without it, less compute on padding"""
    completion_only_loss: bool = True
    """prompt-completion data: loss on completion tokens only (False: on every token)"""
    assistant_only_loss: bool = False
    """conversational `messages` data: loss on the assistant turns' tokens only (detail 2)"""
    loss_type: str = "nll"
    """'nll' (maximum likelihood) or 'dft' (Dynamic Fine-Tuning, arXiv 2508.05629: each token's NLL weighted by its
    detached probability)"""
    neftune_noise_alpha: float | None = None
    """NEFTune (arXiv 2310.05914): uniform noise of scale alpha/sqrt(L*d) added to the input embeddings in training
    (the paper uses 5); None: off"""
    eval_steps: int = 100
    """evaluate every this many steps (at logging steps: make it a multiple of --logging_steps)"""
    num_eval_prompts: int = 256
    """held-out prompts for the greedy exact-match evaluation on toy tasks"""
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
# Shapes: B sequences per micro-batch, T target tokens.
def sft_loss(logps: torch.Tensor, mask: torch.Tensor, num_items: float) -> torch.Tensor:
    """Masked negative log-likelihood summed over the micro-batch and divided by the label-token count of the whole
    optimizer step (global token mean). logps, mask: (B, T)."""
    assert logps.shape == mask.shape
    return -(logps * mask).sum() / num_items


def dft_loss(logps: torch.Tensor, mask: torch.Tensor, num_items: float) -> torch.Tensor:
    """Dynamic Fine-Tuning (detail 3): Σ m · (-sg(p) log p) / num_items with p = exp(logps). logps, mask: (B, T)."""
    assert logps.shape == mask.shape
    return -(logps * logps.detach().exp() * mask).sum() / num_items


def neftune_noise(embeddings: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """NEFTune (detail 4): embeddings (B, L, d) + Uniform(-1, 1) · alpha / sqrt(L · d)."""
    assert embeddings.dim() == 3
    scale = alpha / (embeddings.shape[1] * embeddings.shape[2]) ** 0.5
    noise = torch.rand(embeddings.shape, generator=generator, dtype=embeddings.dtype, device=embeddings.device)
    return embeddings + (2 * noise - 1) * scale


def add_neftune_hook(model, alpha: float):
    """Register NEFTune on the input embedding layer (active only while the model is in training mode)."""
    def hook(module, inputs, output):
        return neftune_noise(output, alpha) if module.training else output

    return model.get_input_embeddings().register_forward_hook(hook)


def token_accuracy(logits_argmax: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    return ((logits_argmax == targets) * mask).sum().item() / max(mask.sum().item(), 1)


# ----------------------------------------------------------------------------- data
def assistant_token_mask(messages: list, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation: mask 1 on the tokens of assistant turns (detail 2)."""
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    ids, mask, done = [], [], ""
    for i, m in enumerate(messages):
        text = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False) if i + 1 < len(messages) else full
        if m["role"] == "assistant":  # the generation prompt belongs to the context, the reply to the assistant
            head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            pieces = [(head, 0), (text, 1)]
        else:
            pieces = [(text, 0)]
        for piece, flag in pieces:
            if not piece.startswith(done):
                raise data.DatasetFormatError(
                    "--assistant_only_loss: the chat template does not render this conversation turn by turn as "
                    "prefixes of the whole (so assistant tokens cannot be located); add {% generation %} markers to "
                    "the template or train without --assistant_only_loss")
            new = data.tokenize(tokenizer, [piece[len(done):]])[0] if piece != done else []
            ids += new
            mask += [flag] * len(new)
            done = piece
    if data.tokenize(tokenizer, [full])[0] != ids:
        raise data.DatasetFormatError("--assistant_only_loss: tokenising the conversation turn by turn gives other "
                                      "ids than tokenising it whole; add {% generation %} markers to the chat template")
    return ids, mask


def tokenize_rows(ds, tokenizer, completion_only: bool, max_length: int, assistant_only: bool = False):
    """(prefix ids, target ids, target weights) per row: the loss covers the targets whose weight is 1. For
    language-modelling rows the prefix is the first token; with completion_only=False the prompt's tokens after the
    first become targets too; with assistant_only (conversational `messages`) only assistant tokens weigh 1."""
    kind = data.detect_type(ds.column_names)
    if assistant_only and not (kind == "lm" and "messages" in ds.column_names):
        raise data.DatasetFormatError("--assistant_only_loss needs conversational language-modelling rows (a "
                                      f"`messages` column); this dataset has {ds.column_names}")
    if kind == "lm" and assistant_only:
        rows = []
        for r, ex in enumerate(ds):
            ids, mask = assistant_token_mask(ex["messages"], tokenizer)
            if sum(mask) == 0:
                raise data.DatasetFormatError(f"--assistant_only_loss: row {r} has no assistant turn to train on")
            rows.append((ids[:1], ids[1:], mask[1:]))
    elif kind == "lm":
        texts = [data.lm_text(ex, tokenizer) for ex in ds]
        rows = [(s[:1], s[1:], [1] * (len(s) - 1)) for s in data.tokenize(tokenizer, texts)]
    else:
        p_ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in ds["prompt"]])
        c_ids = data.tokenize(tokenizer, [data.completion_text(p, c, tokenizer)
                                          for p, c in zip(ds["prompt"], ds["completion"])])
        if completion_only:
            rows = [(p, c, [1] * len(c)) for p, c in zip(p_ids, c_ids)]
        else:
            rows = [((p + c)[:1], (p + c)[1:], [1] * (len(p) + len(c) - 1)) for p, c in zip(p_ids, c_ids)]
    out = []
    for prefix, target, weights in rows:
        over = len(prefix) + len(target) - max_length
        if over > 0:  # cut the prompt from the left first, then the target from the right
            cut = min(over, max(len(prefix) - 1, 0))
            keep = len(target) - (over - cut)
            prefix, target, weights = prefix[cut:], target[:keep], weights[:keep]
        out.append((prefix, target, weights))
    return out


def weight_mask(rows: list, T: int, device) -> torch.Tensor:
    """(B, T) 0/1 loss mask from the rows' target weights, right-padded like the completions."""
    return torch.tensor([list(r[2]) + [0] * (T - len(r[2])) for r in rows], dtype=torch.float).to(device)


@torch.no_grad()
def evaluate(model, tokenizer, args, accelerator, eval_rows) -> dict:
    """Loss and token accuracy on the eval rows (the training loss's masking, token means over all eval rows; every
    process evaluates all of them), and on toy tasks the held-out greedy exact match."""
    out = {}
    if eval_rows:
        was_training = model.training
        model.eval()
        nll, correct, tokens = 0.0, 0.0, 0.0
        for s in range(0, len(eval_rows), args.per_device_train_batch_size):
            chunk = eval_rows[s:s + args.per_device_train_batch_size]
            batch = data.batch_prompt_completion([r[0] for r in chunk], [r[1] for r in chunk], tokenizer.pad_token_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            T = batch["completion_mask"].shape[1]
            logps, argmax = model_utils.completion_logps(model, batch["input_ids"], batch["attention_mask"], T,
                                                         return_argmax=True)
            targets, mask = batch["input_ids"][:, -T:], weight_mask(chunk, T, accelerator.device)
            nll += -(logps * mask).sum().item()
            correct += ((argmax == targets) * mask).sum().item()
            tokens += mask.sum().item()
        model.train(was_training)
        out = {"eval/loss": nll / tokens, "eval/mean_token_accuracy": correct / tokens}
    if args.eval_split and data.toy_task(args.dataset_name):
        gold = heldout_gold_reward(model, tokenizer, args.dataset_name, args.num_eval_prompts, max_new_tokens=16,
                                   accelerator=accelerator, split=args.eval_split)
        out.update({"eval/accuracy": gold["eval/gold_reward"], "eval/terminated": gold["eval/terminated"]})
    return out


# ----------------------------------------------------------------------------- main
def main(args: Args):
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    if args.lr_scheduler not in ("constant", "linear"):
        raise ValueError(f"--lr_scheduler {args.lr_scheduler!r}: choose 'constant' or 'linear'")
    if args.loss_type not in ("nll", "dft"):
        raise ValueError(f"--loss_type {args.loss_type!r}: choose 'nll' or 'dft'")
    if args.neftune_noise_alpha is not None and args.neftune_noise_alpha <= 0:
        raise ValueError(f"--neftune_noise_alpha {args.neftune_noise_alpha}: must be > 0 (None turns NEFTune off)")
    if args.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError(f"--optim {args.optim!r}: choose 'adamw_torch' or 'adamw_torch_fused'")
    accelerator = distributed.make_accelerator(args)
    if args.optim == "adamw_torch_fused" and (accelerator.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU")
                                             or accelerator.device.type not in ("cpu", "cuda")):
        raise ValueError(f"--optim adamw_torch_fused: not with {accelerator.distributed_type.value} on "
                         f"{accelerator.device.type} (DeepSpeed and FSDP manage the parameters); use --optim adamw_torch")
    if args.max_steps <= 0 or args.per_device_train_batch_size <= 0:
        raise ValueError("--max_steps and --per_device_train_batch_size must be positive")

    # data first: a bad dataset fails before any model is built
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    train_ds, eval_ds = data.load_splits(args, "prompt_completion|lm", "sft.py", toy_n=args.num_eval_prompts)
    train = tokenize_rows(train_ds, tokenizer, args.completion_only_loss, args.max_length, args.assistant_only_loss)
    eval_rows = (tokenize_rows(eval_ds, tokenizer, args.completion_only_loss, args.max_length, args.assistant_only_loss)
                 if eval_ds is not None else [])
    global_bs = distributed.global_batch_size(args, accelerator)
    data.check_batch_fits(len(train), global_bs, ["--per_device_train_batch_size", "--gradient_accumulation_steps"])
    peft_utils.check_args(args)  # LoRA flags and module names, before anything is loaded or written
    resume = checkpoint.prepare_output_dir(args)  # one run per folder: refuses to mix with another run's files

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters, the rest frozen
    if args.neftune_noise_alpha is not None:
        add_neftune_hook(model, args.neftune_noise_alpha)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=True if args.optim == "adamw_torch_fused" else None)  # None: torch's default

    def lr_lambda(step):  # linear warm-up, then constant or linear decay to 0
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.lr_scheduler == "constant":
            return 1.0
        decay_end = args.lr_decay_steps or args.max_steps
        return max(0.0, (decay_end - step) / max(1, decay_end - args.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model, optimizer = accelerator.prepare(model, optimizer)
    # stepped by hand once per optimizer step (accelerate's wrapper would step it once per process)
    accelerator.register_for_checkpointing(scheduler)

    start_step, elapsed, skipped_steps = 0, 0.0, 0
    if resume is not None:
        state = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed, skipped_steps = state["step"], state["elapsed"], state.get("skipped_steps", 0)
        accelerator.print(f"resumed from {resume} at step {start_step}")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss", "mean_token_accuracy", "eval/loss", "eval/accuracy"))
    if accelerator.is_main_process:
        n_params = distributed.parameter_elements(model)[1]  # the whole model's, also when sharded
        print(f"sft: {len(train)} rows, {n_params / 1e6:.2f}M parameters, global batch {global_bs}, "
              f"{args.max_steps} steps -> {args.output_dir}", flush=True)

    pad_id = tokenizer.pad_token_id
    stats = {"loss": 0.0, "correct": 0.0, "tokens": 0.0, "entropy": 0.0, "entropy_tokens": 0.0}
    model.train()
    for step in range(start_step, args.max_steps):
        # the entropy is summed on the steps that get logged
        log_step = (step + 1) % args.logging_steps == 0 or step + 1 == args.max_steps
        indices = data.batch_indices(len(train), global_bs, step, args.seed)
        micro = distributed.micro_batches(indices, args, accelerator)
        local_tokens = sum(sum(train[i][2]) for mb in micro for i in mb)
        # label tokens in the whole step (one process: no tensor round trip, so no device sync per step)
        num_items = (float(local_tokens) if accelerator.num_processes == 1
                     else distributed.gather_sum(accelerator, local_tokens))
        for mb in micro:
            rows = [train[i] for i in mb]
            if args.packing:  # one flat (K,) vector of trained tokens instead of (B, T); rows as long as the longest
                seqs = [r[0] + r[1] for r in rows]  # sequence, so attention is never longer than with padding
                batch = packing.pack_rows(seqs, [[0] * len(r[0]) + list(r[2]) for r in rows],
                                          max(len(q) for q in seqs), pad_id, accelerator.device)
            else:
                batch = data.batch_prompt_completion([r[0] for r in rows], [r[1] for r in rows], pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                # the head chunk by chunk: no (B, T, V) logits (common/model.py); the entropy (a softmax over the
                # vocabulary per token) only on logged steps
                if args.packing:
                    logps, *entropy, argmax = packing.packed_token_logps(model, batch, return_entropy=log_step,
                                                                         return_argmax=True)
                    targets, mask = batch["targets"], batch["weights"]
                else:
                    T = batch["completion_mask"].shape[1]
                    logps, *entropy, argmax = model_utils.completion_logps(
                        model, batch["input_ids"], batch["attention_mask"], T, return_entropy=log_step,
                        return_argmax=True)
                    targets, mask = batch["input_ids"][:, -T:], weight_mask(rows, T, accelerator.device)
                loss = (dft_loss if args.loss_type == "dft" else sft_loss)(logps, mask, num_items)
                # accelerate divides by the accumulation steps and DDP averages over processes; undo both so the
                # gradient is exactly that of the global token mean
                accelerator.backward(loss * args.gradient_accumulation_steps * accelerator.num_processes)
                if accelerator.sync_gradients:  # a non-finite gradient norm skips the step (counted)
                    _, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                            args.max_grad_norm)
                    skipped_steps += not stepped
            with torch.no_grad():  # summed as tensors: read (one device sync) on logged steps only
                stats["loss"] += loss.detach() * num_items  # the trained loss (NLL or DFT) summed over tokens
                stats["correct"] += ((argmax == targets) * mask).sum()
                stats["tokens"] += mask.sum()
                if log_step:
                    stats["entropy"] += (entropy[0] * mask).sum()
                    stats["entropy_tokens"] += mask.sum()

        done = step + 1
        if log_step:
            tot = {k: distributed.gather_sum(accelerator, v) for k, v in stats.items()}
            metrics = {"loss": tot["loss"] / tot["tokens"], "mean_token_accuracy": tot["correct"] / tot["tokens"],
                       "entropy": tot["entropy"] / tot["entropy_tokens"], "num_tokens": tot["tokens"],
                       "learning_rate": scheduler.get_last_lr()[0], "train/skipped_steps": skipped_steps}
            stats = dict.fromkeys(stats, 0.0)
            if args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps):
                metrics.update(evaluate(model, tokenizer, args, accelerator, eval_rows))
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
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
