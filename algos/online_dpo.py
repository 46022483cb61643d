"""Online DPO: DPO on pairs sampled from the current policy and ranked on the fly.

Paper: "Direct Language Model Alignment from Online AI Feedback" (Guo et al., arXiv 2402.04792), Algorithm 1.
Each step, for every prompt x: sample two completions y_1, y_2 ~ π_θ(·|x), rank them with the preference source
(reward model, reward function or pairwise judge) into (y⁺, y⁻), and minimise the DPO loss on that pair:
    Δ(y) = S^θ(y|x) - S^ref(y|x)           S = Σ_t m_t log π(y_t | x, y_<t)   (sums over completion tokens)
    h    = Δ(y⁺) - Δ(y⁻)
    sigmoid:  L = mean_pairs[ -log σ(β h) ]        (DPO, arXiv 2305.18290, Eq. 7)
    ipo:      L = mean_pairs[ (h - 1/(2β))² ]      (IPO, arXiv 2310.12036, Eq. 17, on un-normalised sums)
The mean is over the pairs of the whole optimizer step (all accumulation micro-batches and processes), so gradient
accumulation and multi-process runs give the update of one big batch.

Preferences come from exactly one source:
  --reward_model_name_or_path NAME   a one-output sequence classifier (default: toy-rm, the toy reward model)
  --reward_funcs SPEC                one reward function: add | reverse | path/file.py:fn | module:fn
  --judge SPEC                       a pairwise judge: rm:<model> | fn:<reward spec> | file.py:Name | module:Name
With a score (reward model or function), y_1 is chosen iff r(y_1) >= r(y_2): ties go to the first sample (the two
samples are exchangeable, so this adds no bias in expectation, only variance: with a binary reward most pairs tie,
and `--drop_ties` leaves them out of the loss). `--missing_eos_penalty p` subtracts p from the score of every
completion that did not end with EOS within max_new_tokens; a judge gives ranks, not scores, so it cannot be
combined with the penalty. To use a reward function or judge, turn the default reward model off:
`--reward_model_name_or_path None`.

Schedules: `--beta` takes one value or a list, one value per epoch, the last one holding afterwards. An epoch is one
pass over the prompt dataset: at optimizer step s (0-based) the epoch is floor(s * B_global / N_prompts), with
B_global the prompts per optimizer step.

Log-probs use temperature 1 (the policy's own distribution, as in DPO); sampling uses --temperature.

Data: prompt-only (`prompt`), standard or conversational; other dataset types are reduced to their prompts.

Run:
    python algos/online_dpo.py                                      # toy SFT policy + toy reward model, toy:add
    python algos/online_dpo.py --reward_model_name_or_path None --reward_funcs add     # gold reward function
    python algos/online_dpo.py --reward_model_name_or_path None --judge rm:toy-rm      # pairwise judge
    python algos/online_dpo.py --dataset_name toy:add:conversational --beta 0.1 0.05   # chat prompts, per-epoch β
    accelerate launch --multi_gpu --num_processes 2 algos/online_dpo.py
    bash benchmarks/online_pref.sh                                  # 3 seeds of online DPO, XPO and Nash-MD
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
import tyro

from common import checkpoint, data, distributed, model as model_utils, tracking
from common.evaluation import heldout_gold_reward
from common.generation import build_generator, sampler_gap, sampler_gap_metrics
from common.judges import check_ranks, load_judge
from common.rewards import load_reward_sources, reward_name, score


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "online_dpo"
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
    """starting policy: 'toy-sft' (the toy SFT policy of the dataset's task), a local folder or a hub name"""
    ref_model_name_or_path: str | None = None
    """frozen reference model (default: a copy of the starting policy)"""
    dataset_name: str = "toy:add"
    """'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name"""
    dataset_split: str = "train"
    """split to train on"""
    eval_split: str | None = "test"
    """held-out split for the gold-reward evaluation on toy tasks (None to skip)"""
    logging_steps: int = 5
    """log metrics every this many optimizer steps"""
    log_completions_steps: int = 25
    """log a few sample completions with their scores every this many steps (0 to disable)"""
    save_steps: int = 0
    """checkpoint every this many optimizer steps (0: only the final model)"""
    save_total_limit: int | None = 2
    """keep at most this many checkpoints"""
    resume_from: str | None = None
    """a checkpoint folder, or 'auto' for the newest complete one in output_dir"""
    mixed_precision: str | None = None
    """'no', 'fp16' or 'bf16' (default: whatever `accelerate launch` configured)"""
    # --- optimisation
    learning_rate: float = 2e-5
    """AdamW learning rate (TRL's default for real models is 5e-7)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up steps, then constant"""
    max_steps: int = 150
    """optimizer steps"""
    per_device_train_batch_size: int = 32
    """prompts per micro-batch per process (each gives one pair, two completions)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- sampling
    temperature: float = 1.0
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    min_p: float | None = None
    """min-p sampling"""
    max_new_tokens: int = 8
    """completion length cap"""
    max_prompt_length: int = 256
    """prompts longer than this keep their last tokens"""
    use_vllm: bool = False
    """sample the policy with vLLM (common/vllm_backend.py) instead of HF generate"""
    vllm_mode: str = "colocate"
    """'colocate' (engine in this process) or 'server' (a running `trl vllm-serve`-style server)"""
    vllm_server_host: str = "127.0.0.1"
    """vLLM server host (server mode)"""
    vllm_server_port: int = 8000
    """vLLM server port (server mode)"""
    vllm_server_token_file: str | None = None
    """the token file scripts/vllm_server.py wrote (server mode); default: <cache>/vllm-server-<port>.token"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory for the colocated engine"""
    vllm_kv_cache_gb: float = 1.0
    """KV-cache space (GiB) of a CPU vLLM engine"""
    # --- preference source (exactly one)
    reward_model_name_or_path: str | None = "toy-rm"
    """reward model ranking the pair ('toy-rm', a folder or hub name); None to use --reward_funcs or --judge"""
    reward_funcs: list[str] = field(default_factory=list)
    """one reward function instead of a reward model: add | reverse | path/file.py:fn | module:fn"""
    judge: str | None = None
    """a pairwise judge instead of a reward: rm:<model> | fn:<reward spec> | file.py:Name | module:Name"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of completions without EOS (reward model or function only)"""
    drop_ties: bool = False
    """leave pairs with equal scores out of the loss (they count as zero in the mean over pairs); by default a tie
    keeps the first sample as chosen. Useful with binary rewards, where most pairs tie"""
    # --- online DPO
    beta: list[float] = field(default_factory=lambda: [0.1])
    """β, the strength of the implicit KL to the reference; one value, or one per epoch (the last holds after)"""
    loss_type: str = "sigmoid"
    """'sigmoid' (DPO) or 'ipo'"""
    eval_steps: int = 25
    """held-out greedy gold-reward evaluation every this many steps (toy tasks), plus at step 0 and at the end"""
    num_eval_prompts: int = 256
    """held-out prompts for that evaluation"""


LOSS_TYPES = ("sigmoid", "ipo")


# ----------------------------------------------------------------------------- math
# Shapes: B prompts (= pairs), T completion tokens; sequence log-probs are sums over completion tokens.
def scheduled(values: list[float], epoch: int) -> float:
    """The value for `epoch` of a per-epoch schedule; the last value holds for all later epochs."""
    assert len(values) > 0 and epoch >= 0
    return float(values[min(epoch, len(values) - 1)])


def epoch_at(step: int, prompts_per_step: int, num_prompts: int) -> int:
    """The epoch (pass over the prompt dataset) that optimizer step `step` (0-based) belongs to."""
    return step * prompts_per_step // num_prompts


def apply_missing_eos_penalty(scores: torch.Tensor, terminated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """scores (N,) minus `penalty` where terminated (N,) is False."""
    assert scores.shape == terminated.shape
    if not penalty:
        return scores
    return scores - penalty * (~terminated.bool()).float()


def first_is_chosen(scores_first: torch.Tensor, scores_second: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the first completion of each pair is chosen iff its score is >= the second's (ties -> first)."""
    assert scores_first.shape == scores_second.shape
    return scores_first >= scores_second


def pair_weights(scores_first: torch.Tensor, scores_second: torch.Tensor, drop_ties: bool) -> torch.Tensor:
    """(B,) float weight of each pair in the loss: 1, or 0 for a tie when drop_ties."""
    assert scores_first.shape == scores_second.shape
    if not drop_ties:
        return torch.ones_like(scores_first, dtype=torch.float32)
    return (scores_first != scores_second).float()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (B,) and the log-ratio margin h (B,) from sequence log-prob sums, each (B,).
    sigmoid: -log σ(β h);  ipo: (h - 1/(2β))²."""
    assert policy_chosen.shape == policy_rejected.shape == ref_chosen.shape == ref_rejected.shape
    assert policy_chosen.dim() == 1
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type '{loss_type}'; choose one of {LOSS_TYPES}")
    return losses, h


# ----------------------------------------------------------------------------- setup helpers
def check_args(args: Args):
    """Fail before any model is loaded."""
    sources = [n for n, on in (("--reward_model_name_or_path", args.reward_model_name_or_path),
                               ("--reward_funcs", args.reward_funcs), ("--judge", args.judge)) if on]
    if len(sources) != 1:
        raise ValueError(
            f"give exactly one preference source; got {len(sources)} ({', '.join(sources) or 'none'}). The reward "
            "model is on by default: to use a reward function or a judge pass --reward_model_name_or_path None, e.g. "
            "--reward_model_name_or_path None --reward_funcs add")
    if len(args.reward_funcs) > 1:
        raise ValueError(f"--reward_funcs takes one reward function here; got {args.reward_funcs}")
    if args.judge and args.drop_ties:
        raise ValueError("--drop_ties needs scores to compare, and a judge returns ranks: drop the flag, or rank with a "
                         "reward model or function instead")
    if args.judge and args.missing_eos_penalty:
        raise ValueError("--missing_eos_penalty changes scores, and a judge returns ranks: drop the penalty, or rank "
                         "with a reward model or function instead")
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type {args.loss_type!r}: choose one of {LOSS_TYPES}")
    if not args.beta or any(b <= 0 for b in args.beta):
        raise ValueError(f"--beta must be one or more positive values; got {args.beta}")
    if args.max_steps <= 0 or args.per_device_train_batch_size <= 0 or args.max_new_tokens <= 0:
        raise ValueError("--max_steps, --per_device_train_batch_size and --max_new_tokens must be positive")


def load_prompts(args: Args):
    ds = data.load_data(args.dataset_name, args.dataset_split, toy_kind="prompt")
    return data.convert(ds, "prompt", "online_dpo.py")


def as_completions(prompts: list, texts: list[str]) -> list:
    """Completions in the prompts' format: strings, or one assistant message for conversational prompts."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def prompt_completion_batch(prompt_ids: list[list[int]], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                            repeat: int, pad_id: int, device) -> dict:
    """[left-padded prompt | right-padded completion] for `repeat` completions per prompt (rows i*repeat + j)."""
    p_ids, p_mask = data.pad(prompt_ids, pad_id, "left")
    p_ids, p_mask = p_ids.repeat_interleave(repeat, 0), p_mask.repeat_interleave(repeat, 0)
    return {"input_ids": torch.cat([p_ids, completion_ids.cpu()], 1).to(device),
            "attention_mask": torch.cat([p_mask, completion_mask.cpu()], 1).to(device),
            "completion_mask": completion_mask.to(device).float()}


# ----------------------------------------------------------------------------- main
def main(args: Args):
    check_args(args)
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    accelerator = distributed.make_accelerator(args)
    device = accelerator.device

    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    train = load_prompts(args)
    columns = [c for c in train.column_names if c != "prompt"]
    prompt_ids_all = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in train["prompt"]])
    prompt_ids_all = [p[-args.max_prompt_length:] for p in prompt_ids_all]
    global_bs = distributed.global_batch_size(args, accelerator)
    if global_bs > len(train):
        raise ValueError(f"the dataset has {len(train)} prompts, fewer than one global batch of {global_bs}")

    reward_fn = judge = None
    if args.judge:
        judge = load_judge(args.judge, args.dataset_name, device)
    else:
        spec = f"model:{args.reward_model_name_or_path}" if args.reward_model_name_or_path else args.reward_funcs[0]
        reward_fn = load_reward_sources([spec], args.dataset_name, device)[0]
    gold = None
    if data.toy_task(args.dataset_name):
        from common import toy
        gold = toy.gold_reward(data.toy_task(args.dataset_name))

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    ref_model = model_utils.load_causal_lm(args.ref_model_name_or_path or args.model_name_or_path, tokenizer,
                                           args.dataset_name, seed=args.seed)
    ref_model.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    generator = build_generator(args, tokenizer, accelerator, model)

    start_step, elapsed = 0, 0.0
    resume = checkpoint.resolve_resume(args.resume_from, args.output_dir)
    if resume is not None:
        state = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed = state["step"], state["elapsed"]
        generator.sync_weights(model)
        accelerator.print(f"resumed from {resume} at step {start_step}")
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("loss/dpo", "objective/scores", "train/gold_reward", "eval/gold_reward"))
    source = args.judge or reward_name(reward_fn)
    accelerator.print(f"online_dpo: {len(train)} prompts, {global_bs} pairs per step, {args.max_steps} steps, "
                      f"preferences from {source} -> {args.output_dir}")

    def evaluate() -> dict:
        if not args.eval_split:
            return {}
        return heldout_gold_reward(model, tokenizer, args.dataset_name, args.num_eval_prompts, args.max_new_tokens,
                                   accelerator=accelerator, split=args.eval_split)

    if start_step == 0:
        tracker.log({**evaluate(), "beta": scheduled(args.beta, 0)}, 0, args.max_steps)

    pad_id = tokenizer.pad_token_id
    stats: dict[str, float] = {}
    gaps: list[torch.Tensor] = []  # sampler vs trainer per-token log-prob differences since the last log (vLLM)

    def add(name: str, value: torch.Tensor | float):
        stats[name] = stats.get(name, 0.0) + float(value.sum() if torch.is_tensor(value) else value)

    model.train()
    for step in range(start_step, args.max_steps):
        beta = scheduled(args.beta, epoch_at(step, global_bs, len(train)))
        indices = data.batch_indices(len(train), global_bs, step, args.seed)
        sample_rows = None
        for mb in distributed.micro_batches(indices, args, accelerator):
            prompts = [train[i]["prompt"] for i in mb]
            B = len(mb)
            # 1. two samples per prompt from the current policy: rows 2i and 2i+1 belong to prompt i
            gen = generator.generate(model, [prompt_ids_all[i] for i in mb], n=2)
            prompts2 = [p for p in prompts for _ in range(2)]
            completions = as_completions(prompts2, gen.texts)
            terminated = gen.terminated.cpu()
            # 2. rank each pair
            scores = None
            if judge is not None:
                ranks = judge.judge(prompts, [(completions[2 * b], completions[2 * b + 1]) for b in range(B)])
                first_wins = check_ranks(ranks, B, source)
                weights = torch.ones(B)
            else:
                cols = {c: [train[i][c] for i in mb for _ in range(2)] for c in columns}
                ids_list = [c[m.bool()].tolist() for c, m in zip(gen.completion_ids, gen.completion_mask)]
                raw = score([reward_fn], prompts2, completions, ids_list, cols)[:, 0]
                if torch.isnan(raw).any():
                    raise ValueError(f"{source} returned None for some completions; online DPO needs a score for each")
                scores = apply_missing_eos_penalty(raw, terminated, args.missing_eos_penalty)  # (2B,)
                first_wins = first_is_chosen(scores[0::2], scores[1::2])  # (B,)
                weights = pair_weights(scores[0::2], scores[1::2], args.drop_ties)  # (B,)
            # 3. log-probs of both samples under the policy (with grad) and the reference
            batch = prompt_completion_batch([prompt_ids_all[i] for i in mb], gen.completion_ids, gen.completion_mask,
                                            2, pad_id, device)
            mask, T = batch["completion_mask"], batch["completion_mask"].shape[1]
            with torch.no_grad():
                ref_lp = model_utils.completion_logps(ref_model, batch["input_ids"], batch["attention_mask"], T)
            ref_seq = (ref_lp * mask).sum(1)  # (2B,)
            chosen_idx = 2 * torch.arange(B) + (~first_wins).long()  # (B,)
            rejected_idx = 2 * torch.arange(B) + first_wins.long()
            chosen_idx, rejected_idx = chosen_idx.to(device), rejected_idx.to(device)
            with accelerator.accumulate(model):
                logps = model_utils.completion_logps(model, batch["input_ids"], batch["attention_mask"], T)
                seq = (logps * mask).sum(1)  # (2B,)
                if gen.sampler_logps is not None:  # sampler (vLLM) vs trainer gap, logged
                    gaps.append(sampler_gap(logps, gen.sampler_logps, mask))
                losses, h = dpo_loss(seq[chosen_idx], seq[rejected_idx], ref_seq[chosen_idx], ref_seq[rejected_idx],
                                     beta, args.loss_type)
                # mean over the global batch's pairs: undo accelerate's 1/accumulation and DDP's 1/processes
                loss = (losses * weights.to(device)).sum() / global_bs
                accelerator.backward(loss * args.gradient_accumulation_steps * accelerator.num_processes)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            # 4. statistics, summed over the step and reduced once
            with torch.no_grad():
                seq, kl = seq.detach(), (seq.detach() - ref_seq)  # (2B,)
                add("pairs", B)
                add("objective/tie_rate", (scores[0::2] == scores[1::2]).float() if scores is not None else 0.0)
                add("samples", 2 * B)
                add("loss/dpo", losses.detach())
                add("objective/kl", kl)
                add("objective/entropy", -seq)
                add("rewards/chosen", beta * (seq[chosen_idx] - ref_seq[chosen_idx]))
                add("rewards/rejected", beta * (seq[rejected_idx] - ref_seq[rejected_idx]))
                add("rewards/margins", beta * h.detach())
                add("rewards/accuracies", (h.detach() > 0).float())
                add("logps/chosen", seq[chosen_idx])
                add("logps/rejected", seq[rejected_idx])
                add("val/contain_eos_token", terminated.float())
                add("completions/mean_length", mask.sum(1))
                if scores is not None:
                    add("objective/scores", scores)
                    add("objective/scores_margin", scores[chosen_idx.cpu()] - scores[rejected_idx.cpu()])
                if gold is not None:
                    g = torch.tensor([float("nan") if v is None else v for v in gold(prompts2, completions)])
                    add("train/gold_reward", torch.nan_to_num(g, 0.0))
            if sample_rows is None:
                sample_rows = [{"prompt": str(prompts[b]), "chosen": gen.texts[int(chosen_idx[b])],
                                "rejected": gen.texts[int(rejected_idx[b])],
                                **({"score_chosen": float(scores[int(chosen_idx[b])]),
                                    "score_rejected": float(scores[int(rejected_idx[b])])}
                                   if scores is not None else {})}
                               for b in range(min(4, B))]
        generator.sync_weights(model)

        done = step + 1
        if done % args.logging_steps == 0 or done == args.max_steps:
            tot = {k: distributed.gather_sum(accelerator, v) for k, v in sorted(stats.items())}
            stats = {}
            n_pairs, n_samples = tot.pop("pairs"), tot.pop("samples")
            per_sample = {"objective/kl", "objective/entropy", "val/contain_eos_token", "completions/mean_length",
                          "objective/scores", "train/gold_reward"}
            metrics = {k: v / (n_samples if k in per_sample else n_pairs) for k, v in tot.items()}
            metrics["objective/non_score_reward"] = -beta * metrics["objective/kl"]
            metrics["objective/model_kl"] = metrics["objective/kl"]  # same name as in xpo.py / nash_md.py
            if "objective/scores" in metrics:
                metrics["objective/model_scores"] = metrics["objective/scores"]
                metrics["objective/rlhf_reward"] = metrics["objective/scores"] + metrics["objective/non_score_reward"]
            metrics["val/model_contain_eos_token"] = metrics["val/contain_eos_token"]
            metrics.update({"beta": beta, "learning_rate": scheduler.get_last_lr()[0], **sampler_gap_metrics(gaps)})
            gaps = []
            if args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps):
                metrics.update(evaluate())
            tracker.log(metrics, done, args.max_steps)
        if args.log_completions_steps and (done % args.log_completions_steps == 0 or done == args.max_steps):
            tracker.log_samples(done, sample_rows or [])
        if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
            checkpoint.save_checkpoint(accelerator, args.output_dir, done, model, tokenizer, args,
                                       {"elapsed": tracker.elapsed()}, args.save_total_limit)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir)
    if args.save_steps:
        checkpoint.save_checkpoint(accelerator, args.output_dir, args.max_steps, model, tokenizer, args,
                                   {"elapsed": tracker.elapsed()}, args.save_total_limit)
    tracker.close()
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
