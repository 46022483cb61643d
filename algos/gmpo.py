"""GMPO: Geometric-Mean Policy Optimization.

Paper: "Geometric-Mean Policy Optimization" (Zhao et al., arXiv 2507.20673), Eq. 4 (the objective) and Sec. 4 (the
clip range). GMPO is GRPO with one change: a completion's importance weight is the geometric mean of its token ratios,
not their arithmetic mean, so one outlier token cannot dominate the update and a much wider clip range is stable.

Sampling, rewards and advantages are GRPO's (see algos/grpo.py): G completions per prompt,
A_i = (r_i - mean_g r) / (std_g r + 1e-4) (--scale_rewards group|batch|none). Then, per completion token,
    δ_t = log π_θ(y_t|.) - log π_old(y_t|.)
    δ̂_t = min(δ_t, clip(δ_t, -ε, ε_high))  if A_i > 0,   max(δ_t, clip(δ_t, -ε, ε_high))  otherwise
(the clip is in log space and one-sided by the sign of the advantage, before the mean), and per completion
    w_i = exp( Σ_t m_t δ̂_t / |y_i| )                     (the geometric mean of the clipped token ratios)
    L   = mean_i [ -A_i w_i ]  +  β · mean_i [ (1/|y_i|) Σ_t m_t k3_t ],   k3 = π_ref/π_θ - log(π_ref/π_θ) - 1
a mean over sequences (the token normalisation lives inside the geometric mean); the optional KL is a loss term and is
not multiplied by the ratio. For one token, GMPO is PPO-clip with the ratio range (e^-ε, e^ε_high); with ε → ∞ it is
unclipped GSPO. Defaults ε = ε_high = 0.4 in log space, i.e. ratios in (0.67, 1.49) (paper, Sec. 4).

Batch arithmetic as in grpo.py: each process samples per_device_train_batch_size * gradient_accumulation_steps /
num_generations prompts, G completions each, and takes num_iterations optimizer steps over them in
gradient_accumulation_steps micro-batches; groups stay on one process. Every micro-batch holds the same number of
completions, so the mean of the micro-batch means (accelerate's accumulation, DDP's average) is the batch mean.

DEVIATION(paper Eq. 4): the official code clips with sgn(A) taking A = 0 into the A > 0 branch; here A = 0 takes the
max branch (as TRL does). It does not change the loss: the term is multiplied by A.

Run:
    python algos/gmpo.py                                  # toy SFT policy on toy:add, a few minutes on 2 CPU cores
    python algos/gmpo.py --num_iterations 2 --beta 0.04   # off-policy reuse and a KL to the initial policy
    accelerate launch --multi_gpu --num_processes 2 algos/gmpo.py --per_device_train_batch_size 32   # same update as 1 process x 64
    bash benchmarks/pg.sh                                 # 3 seeds of GRPO, GMPO, RLOO -> benchmarks/results/pg
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

from common import checkpoint, data, distributed, evaluation, model as model_utils, rewards as reward_utils, tracking
from common.generation import build_generator


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "gmpo"
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
    """'toy-sft' (the toy SFT policy), a local folder or a hub name"""
    dataset_name: str = "toy:add"
    """prompt-only data: 'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk
    folder or a hub name (extra columns are passed to the reward functions)"""
    dataset_split: str = "train"
    """split to train on"""
    logging_steps: int = 5
    """log metrics every this many optimizer steps (averaged over the steps since the last log)"""
    save_steps: int = 0
    """checkpoint every this many optimizer steps (0: only the final model); rounded to generation boundaries"""
    save_total_limit: int | None = 2
    """keep at most this many checkpoints"""
    resume_from: str | None = None
    """a checkpoint folder, or 'auto' for the newest complete one in output_dir"""
    mixed_precision: str | None = None
    """'no', 'fp16' or 'bf16' (default: whatever `accelerate launch` configured)"""
    # --- optimisation
    learning_rate: float = 3e-5
    """AdamW learning rate (the toy policy is tiny; use ~1e-6 for a pretrained LM, as in the paper)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up steps, then constant"""
    max_steps: int = 150
    """optimizer steps (each generation batch gives num_iterations of them)"""
    per_device_train_batch_size: int = 64
    """completions per micro-batch per process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- sampling (common/generation.py)
    num_generations: int = 8
    """G, completions per prompt (a group)"""
    temperature: float = 1.0
    """sampling temperature; the trained log-probs use the same temperature"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    min_p: float | None = None
    """min-p sampling"""
    max_new_tokens: int = 8
    """longest completion"""
    max_prompt_length: int | None = 256
    """prompts longer than this keep their last tokens"""
    use_vllm: bool = False
    """sample with vLLM (common/vllm_backend.py) instead of HF generate"""
    vllm_mode: str = "colocate"
    """'colocate' (in-process) or 'server'"""
    vllm_server_host: str = "127.0.0.1"
    """vLLM server host (server mode)"""
    vllm_server_port: int = 8000
    """vLLM server port (server mode)"""
    vllm_server_token_file: str | None = None
    """the token file scripts/vllm_server.py wrote (server mode); default: <cache>/vllm-server-<port>.token"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory vLLM may take (colocate)"""
    vllm_kv_cache_gb: float = 1.0
    """CPU KV-cache space for vLLM on CPU"""
    # --- rewards
    reward_funcs: list[str] | None = None
    """reward functions: 'add'/'reverse' (toy gold rewards), 'path/file.py:fn', 'module:fn', 'model:<name or dir>';
    default: the toy task's gold reward"""
    reward_model_name_or_path: str | None = None
    """a reward model added to reward_funcs (e.g. 'toy-rm'); same as 'model:<name>' there"""
    reward_weights: list[float] | None = None
    """one weight per reward source (reward_funcs, then the reward model); default all 1"""
    # --- GMPO
    scale_rewards: str = "group"
    """advantage scale: 'group' (group std), 'batch' (std of the whole generation batch) or 'none' (Dr. GRPO)"""
    epsilon: float = 0.4
    """lower clip in log space: δ >= -epsilon, i.e. token ratio >= exp(-epsilon) (paper: 0.4)"""
    epsilon_high: float | None = None
    """upper clip in log space: δ <= epsilon_high, i.e. ratio <= exp(epsilon_high); default: epsilon"""
    beta: float = 0.0
    """weight of the k3 KL to the reference model (the initial policy); the reference is loaded only if beta > 0"""
    num_iterations: int = 1
    """μ: optimizer steps per generation batch (off-policy reuse with stored old log-probs)"""
    mask_truncated_completions: bool = False
    """leave completions that did not end with EOS out of the loss"""
    # --- evaluation and logging
    eval_steps: int = 25
    """held-out gold reward every this many steps (and at step 0 and at the end); 0: never"""
    num_eval_prompts: int = 256
    """held-out prompts of the toy task (greedy decoding)"""
    log_completions_steps: int = 25
    """write sample completions with their rewards every this many steps (0: never)"""
    num_completions_to_log: int = 8
    """sample completions per log"""


# ----------------------------------------------------------------------------- the math
# Shapes: N completions in a generation batch (N = prompts * G), G completions per prompt, B completions per
# micro-batch, T completion tokens. Masks are 0/1 floats over completion tokens (EOS included).
def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, F) rewards with NaN where a function returned None, (F,) weights -> (N,) weighted sum over the functions
    that scored the sample; NaN when none did."""
    assert rewards_per_func.dim() == 2 and weights.shape == (rewards_per_func.shape[1],)
    scored = ~torch.isnan(rewards_per_func)
    total = torch.where(scored, rewards_per_func * weights, torch.zeros_like(rewards_per_func)).sum(1)
    return torch.where(scored.any(1), total, torch.full_like(total, float("nan")))


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards, rows g*G..(g+1)*G-1 one group -> (N,) advantages (r - group mean) / (std + eps).
    std: Bessel-corrected group std ('group'), std of all rewards in the batch ('batch'), or no scaling ('none').
    NaN rewards (unscored) are left out of the statistics and get A = 0; a group whose scored rewards are all equal
    gets exactly A = 0."""
    assert rewards.dim() == 1 and rewards.numel() % group_size == 0
    r = rewards.view(-1, group_size)  # (N/G, G)
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    count = valid.sum(1, keepdim=True)
    mean = r0.sum(1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(valid, r - mean, torch.zeros_like(r))
    big, small = torch.finfo(r.dtype).max, torch.finfo(r.dtype).min
    all_equal = (torch.where(valid, r, torch.full_like(r, small)).amax(1, keepdim=True)
                 == torch.where(valid, r, torch.full_like(r, big)).amin(1, keepdim=True))
    centered = torch.where(all_equal, torch.zeros_like(centered), centered)
    if scale_rewards == "group":
        std = ((centered ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        adv = centered / (std + eps)
    elif scale_rewards == "batch":
        flat = rewards[~torch.isnan(rewards)]
        std = flat.std() if flat.numel() > 1 else torch.zeros(())
        adv = centered / (std + eps)
    elif scale_rewards == "none":
        adv = centered
    else:
        raise ValueError(f"--scale_rewards {scale_rewards!r}: use 'group', 'batch' or 'none'")
    return adv.reshape(-1)


def clipped_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                      epsilon_high: float) -> torch.Tensor:
    """δ̂ (B, T): the token log-ratio δ = ℓ - ℓ_old clipped to (-ε, ε_high) one-sided by the sign of A:
    min(δ, clip(δ)) for A > 0 (only a ratio that grew too much is cut), max(δ, clip(δ)) otherwise."""
    assert logps.shape == old_logps.shape and advantages.shape == (logps.shape[0],)
    delta = logps - old_logps
    clipped = delta.clamp(-epsilon, epsilon_high)
    return torch.where(advantages[:, None] > 0, torch.min(delta, clipped), torch.max(delta, clipped))


def geometric_mean_ratio(clipped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w (B,) = exp(Σ_t m δ̂ / |y|): the geometric mean of the clipped token ratios over the valid tokens."""
    assert clipped.shape == mask.shape
    return torch.exp((clipped * mask).sum(1) / mask.sum(1).clamp(min=1))


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref): exp(ℓ_ref - ℓ) - (ℓ_ref - ℓ) - 1 >= 0. (B, T)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def gmpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float, epsilon_high: float, beta: float = 0.0,
              ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_i[-A_i w_i] + β mean_i[token-mean k3] over a micro-batch; returns (loss, per-token k3 or None).
    logps, old_logps, ref_logps, mask: (B, T); advantages: (B,)."""
    assert logps.shape == mask.shape
    w = geometric_mean_ratio(clipped_log_ratio(logps, old_logps, advantages, epsilon, epsilon_high), mask)  # (B,)
    loss = (-advantages * w).mean()
    kl = None
    if beta > 0:
        kl = k3(logps, ref_logps)
        loss = loss + beta * ((kl * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()  # not multiplied by w
    return loss, kl


def log_clip_counts(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float,
                    epsilon_high: float) -> dict[str, torch.Tensor]:
    """Token counts where the log-space clip takes effect: δ < -ε with A < 0 (low), δ > ε_high with A > 0 (high),
    either (region). Divide by the mask sum for fractions."""
    adv = advantages[:, None]
    low = (log_ratio < -epsilon) & (adv < 0)
    high = (log_ratio > epsilon_high) & (adv > 0)
    return {"low": (low * mask).sum(), "high": (high * mask).sum(), "region": ((low | high) * mask).sum()}


# ----------------------------------------------------------------------------- set-up helpers
def check_args(args: Args) -> int:
    """Reject bad flag combinations before anything is loaded; returns the prompts per process and generation."""
    if args.epsilon <= 0 or (args.epsilon_high is not None and args.epsilon_high <= 0):
        raise ValueError("--epsilon and --epsilon_high are log-space clip widths and must be positive")
    if args.scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"--scale_rewards {args.scale_rewards!r}: use 'group', 'batch' or 'none'")
    if args.num_generations < 2:
        raise ValueError("--num_generations must be >= 2 (the advantage compares completions of the same prompt)")
    if args.num_iterations < 1 or args.max_steps <= 0:
        raise ValueError("--num_iterations and --max_steps must be positive")
    gen_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if gen_batch % args.num_generations:
        good = args.num_generations * max(1, round(gen_batch / args.num_generations))
        raise ValueError(
            f"the per-process batch per_device_train_batch_size * gradient_accumulation_steps = "
            f"{args.per_device_train_batch_size} * {args.gradient_accumulation_steps} = {gen_batch} completions is not "
            f"divisible by --num_generations {args.num_generations} (groups are kept whole on one process); e.g. set "
            f"--per_device_train_batch_size {good // args.gradient_accumulation_steps if good % args.gradient_accumulation_steps == 0 else good} "
            f"{'' if good % args.gradient_accumulation_steps == 0 else '--gradient_accumulation_steps 1 '}"
            f"or change --num_generations")
    n_sources = len(reward_specs(args))
    if args.reward_weights is not None and len(args.reward_weights) != n_sources:
        raise ValueError(f"--reward_weights has {len(args.reward_weights)} values but there are {n_sources} reward "
                         f"sources ({reward_specs(args)}); give one weight per source")
    return gen_batch // args.num_generations


def reward_specs(args: Args) -> list[str]:
    specs = list(args.reward_funcs) if args.reward_funcs else []
    if not specs and args.reward_model_name_or_path is None:
        task = data.toy_task(args.dataset_name)
        if task is None:
            raise ValueError("--reward_funcs is required for non-toy datasets (e.g. 'my_rewards.py:accuracy' or "
                             "--reward_model_name_or_path DIR)")
        specs = [task]
    if args.reward_model_name_or_path is not None:
        specs.append(f"model:{args.reward_model_name_or_path}")
    return specs


def load_prompts(args: Args, tokenizer):
    """Prompt-only rows (other columns kept for the reward functions) and their tokenised rendered prompts."""
    ds = data.convert(data.load_data(args.dataset_name, args.dataset_split, toy_kind="prompt"), "prompt",
                      script="gmpo.py")
    ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in ds["prompt"]])
    if args.max_prompt_length:
        ids = [s[-args.max_prompt_length:] for s in ids]
    return ds, ids


def sequence_logps(model, batch: dict, rows: slice, temperature: float, return_entropy: bool = False):
    """Per-token log-probs (B, T) of the completions in `rows`, trimmed to the micro-batch's own padding."""
    cmask = batch["completion_mask"][rows]
    T = max(int(cmask.sum(1).max()), 1)
    amask = batch["attention_mask"][rows]
    P = batch["prompt_len"]
    keep = P - int(amask[:, :P].sum(1).max())  # leading columns that are padding in every row
    ids = batch["input_ids"][rows, keep:P + T]
    am = amask[:, keep:P + T]
    out = model_utils.completion_logps(model, ids, am, T, temperature, return_entropy)
    return out, T


# ----------------------------------------------------------------------------- main
def main(args: Args):
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    prompts_per_process = check_args(args)
    eps_low, eps_high = args.epsilon, args.epsilon if args.epsilon_high is None else args.epsilon_high
    G, A_steps, mu = args.num_generations, args.gradient_accumulation_steps, args.num_iterations
    accelerator = distributed.make_accelerator(args)
    W, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device

    # data and reward functions first: bad input fails before any model is loaded
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    ds, prompt_ids = load_prompts(args, tokenizer)
    all_prompts = ds["prompt"]
    extra_columns = {c: ds[c] for c in ds.column_names if c != "prompt"}  # passed on to the reward functions
    conversational = data.is_conversational(ds[0])
    specs = reward_specs(args)
    reward_funcs = reward_utils.load_reward_sources(specs, args.dataset_name, device)
    reward_names = [reward_utils.reward_name(f) for f in reward_funcs]
    weights = torch.tensor(args.reward_weights if args.reward_weights is not None else [1.0] * len(specs))

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    ref_model = None
    if args.beta > 0:  # frozen reference = the initial policy, outside accelerator.prepare
        ref_model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name).to(device).eval()
        ref_model.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(args.warmup_steps, 1)))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand once per optimizer step
    generator = build_generator(args, tokenizer, accelerator, model)

    start_step, elapsed, num_tokens = 0, 0.0, 0.0
    resume = checkpoint.resolve_resume(args.resume_from, args.output_dir)
    if resume is not None:
        state = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed, num_tokens = state["step"], state["elapsed"], state["num_tokens"]
        accelerator.print(f"resumed from {resume} at step {start_step}")
        generator.sync_weights(model)
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("reward", "loss", "eval/gold_reward"))
    accelerator.print(f"gmpo: {len(ds)} prompts; {W} process(es) x {prompts_per_process} prompts x {G} completions per "
                      f"generation, {mu} optimizer step(s) each, {args.max_steps} steps -> {args.output_dir}")

    def evaluate() -> dict:
        return evaluation.heldout_gold_reward(accelerator.unwrap_model(model), tokenizer, args.dataset_name,
                                              args.num_eval_prompts, args.max_new_tokens, accelerator=accelerator)

    if start_step == 0 and args.eval_steps:
        tracker.log(evaluate(), 0, args.max_steps)

    pad_id = tokenizer.pad_token_id
    window = defaultdict(list)  # per-step metrics since the last log
    batch = None
    model.train()
    for step in range(start_step, args.max_steps):
        # ---------------------------------------------------------------- generate and score (every μ steps)
        if batch is None or step % mu == 0:
            t0 = time.time()
            n_prompts = prompts_per_process * W
            gen_round = step // mu
            indices = data.batch_indices(len(ds), n_prompts, gen_round, args.seed)
            local = indices[rank * prompts_per_process:(rank + 1) * prompts_per_process]
            p_ids = [prompt_ids[i] for i in local]
            out = generator.generate(model, p_ids, n=G)  # (N, T), row i*G + j = sample j of prompt i
            gen_time = time.time() - t0
            cmask = out.completion_mask.float()
            prompts = [all_prompts[i] for i in local for _ in range(G)]
            completions = ([[{"role": "assistant", "content": t}] for t in out.texts] if conversational
                           else list(out.texts))
            columns = {c: [vals[i] for i in local for _ in range(G)] for c, vals in extra_columns.items()}
            comp_id_lists = [row[m.bool()].tolist() for row, m in zip(out.completion_ids, out.completion_mask)]
            rpf = reward_utils.score(reward_funcs, prompts, completions, comp_id_lists, columns)  # (N, F)
            # advantages: groups are local, but 'batch' scaling and the metrics need every process's rewards
            rpf_all = distributed.gather_cat(accelerator, rpf)
            r_all = combine_rewards(rpf_all, weights)
            adv_all = group_advantages(r_all, G, args.scale_rewards)
            N = rpf.shape[0]
            advantages = adv_all[rank * N:(rank + 1) * N].to(device)

            loss_mask = cmask * out.terminated[:, None].float() if args.mask_truncated_completions else cmask
            pp_ids, pp_mask = data.pad(p_ids, pad_id, "left")
            P = pp_ids.shape[1]
            batch = {
                "input_ids": torch.cat([pp_ids.repeat_interleave(G, 0), out.completion_ids.cpu()], 1).to(device),
                "attention_mask": torch.cat([pp_mask.repeat_interleave(G, 0), out.completion_mask.cpu()], 1).to(device),
                "completion_mask": out.completion_mask.to(device), "loss_mask": loss_mask.to(device), "prompt_len": P,
            }
            # old (π_old) and reference log-probs: once per generation batch, no grad
            old_logps, ref_logps = [None] * A_steps, [None] * A_steps
            B = args.per_device_train_batch_size
            need_old = mu > 1 or out.sampler_logps is not None
            if need_old or ref_model is not None:
                with torch.no_grad():
                    for m in range(A_steps):
                        rows = slice(m * B, (m + 1) * B)
                        if need_old:
                            old_logps[m], _ = sequence_logps(model, batch, rows, args.temperature)
                        if ref_model is not None:
                            ref_logps[m], _ = sequence_logps(ref_model, batch, rows, args.temperature)
            if out.sampler_logps is not None:  # sampler vs trainer mismatch (vLLM): logged, not corrected (as TRL)
                diffs, ratios = [], []
                for m in range(A_steps):
                    rows = slice(m * B, (m + 1) * B)
                    T_m = old_logps[m].shape[1]
                    mm = batch["completion_mask"][rows, :T_m].bool()
                    d = old_logps[m] - out.sampler_logps[rows, :T_m].to(device)
                    diffs.append(d[mm].abs())
                    ratios.append(torch.exp(d)[mm])
                diffs, ratios = torch.cat(diffs), torch.cat(ratios)
                window["sampling/sampling_logp_difference/mean"].append(diffs.mean().item())
                window["sampling/sampling_logp_difference/max"].append(diffs.max().item())
                window["sampling/importance_sampling_ratio/min"].append(ratios.min().item())
                window["sampling/importance_sampling_ratio/mean"].append(ratios.mean().item())
                window["sampling/importance_sampling_ratio/max"].append(ratios.max().item())

            # generation and reward metrics over every process's samples
            lengths = distributed.gather_cat(accelerator, cmask.sum(1).cpu())
            term = distributed.gather_cat(accelerator, out.terminated.float().cpu())
            grouped = r_all.view(-1, G)
            for f, name in enumerate(reward_names):
                window[f"rewards/{name}/mean"].append(torch.nanmean(rpf_all[:, f]).item())
                col = rpf_all[:, f][~torch.isnan(rpf_all[:, f])]
                window[f"rewards/{name}/std"].append(col.std().item() if col.numel() > 1 else 0.0)
            window["reward"].append(torch.nanmean(r_all).item())
            window["reward_std"].append(r_all[~torch.isnan(r_all)].std().item() if (~torch.isnan(r_all)).sum() > 1 else 0.0)
            window["frac_reward_zero_std"].append((torch.nan_to_num(grouped, 0.0).std(1) == 0).float().mean().item())
            window["completions/mean_length"].append(lengths.mean().item())
            window["completions/min_length"].append(lengths.min().item())
            window["completions/max_length"].append(lengths.max().item())
            window["completions/clipped_ratio"].append(1.0 - term.mean().item())
            window["completions/mean_terminated_length"].append(
                lengths[term.bool()].mean().item() if term.any() else 0.0)
            gen_tokens = lengths.sum().item()
            window["tokens_per_second/generation"].append(gen_tokens / max(gen_time, 1e-9) * W)
            num_tokens += gen_tokens + distributed.gather_sum(accelerator, pp_mask.sum().item() * G)
            if args.log_completions_steps and gen_round % max(1, args.log_completions_steps // mu) == 0:
                k = min(args.num_completions_to_log, N)
                tracker.log_samples(step, [{"prompt": prompts[i], "completion": out.texts[i],
                                            **{n: rpf[i, f].item() for f, n in enumerate(reward_names)},
                                            "advantage": advantages[i].item()} for i in range(k)])

        # ---------------------------------------------------------------- one optimizer step over the batch
        t0 = time.time()
        B = args.per_device_train_batch_size
        sums = defaultdict(float)
        for m in range(A_steps):
            rows = slice(m * B, (m + 1) * B)
            with accelerator.accumulate(model):
                (logps, entropy), T = sequence_logps(model, batch, rows, args.temperature, return_entropy=True)
                mask = batch["loss_mask"][rows, :T]
                old = old_logps[m] if old_logps[m] is not None else logps.detach()  # μ = 1: δ exactly 0
                adv = advantages[rows]
                # a sequence mean per micro-batch: accelerate's 1/accumulation and DDP's mean give the batch mean
                loss, kl = gmpo_loss(logps, old, adv, mask, eps_low, eps_high, args.beta, ref_logps[m])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if args.max_grad_norm > 0:
                        sums["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            with torch.no_grad():
                log_ratio = logps - old
                valid = mask.bool()
                sums["loss"] += loss.item()
                sums["tokens"] += mask.sum().item()
                sums["entropy"] += (entropy * mask).sum().item()
                for k_, v in log_clip_counts(log_ratio, adv, mask, eps_low, eps_high).items():
                    sums[f"clip_{k_}"] += v.item()
                if valid.any():
                    sums["log_ratio_min"] = min(sums.get("log_ratio_min", 0.0), log_ratio[valid].min().item())
                    sums["log_ratio_max"] = max(sums.get("log_ratio_max", 0.0), log_ratio[valid].max().item())
                if kl is not None:
                    sums["kl"] += (kl * mask).sum().item()
        generator.sync_weights(model)
        train_time = time.time() - t0
        tot = {k_: distributed.gather_sum(accelerator, v) for k_, v in sums.items()
               if k_ not in ("grad_norm", "log_ratio_min", "log_ratio_max")}
        ntok = max(tot["tokens"], 1)
        window["loss"].append(tot["loss"] / (A_steps * W))
        window["entropy"].append(tot["entropy"] / ntok)
        for k_ in ("low", "high", "region"):
            window[f"clip_ratio/{k_}_mean"].append(tot[f"clip_{k_}"] / ntok)
        if ref_model is not None:
            window["kl"].append(tot["kl"] / ntok)
        if "grad_norm" in sums:
            window["grad_norm"].append(sums["grad_norm"])
        if "log_ratio_min" in sums:  # this process's extremes of δ (0 on-policy)
            window["log_ratio/min"].append(sums["log_ratio_min"])
            window["log_ratio/max"].append(sums["log_ratio_max"])
        window["tokens_per_second/training"].append(tot["tokens"] / max(train_time, 1e-9))

        done = step + 1
        if done % args.logging_steps == 0 or done == args.max_steps:
            metrics = {k_: sum(v) / len(v) for k_, v in window.items() if v}
            metrics.update({"num_tokens": num_tokens, "learning_rate": scheduler.get_last_lr()[0]})
            window = defaultdict(list)
            if args.eval_steps and (done % args.eval_steps == 0 or done == args.max_steps):
                metrics.update(evaluate())
            tracker.log(metrics, done, args.max_steps)
        if args.save_steps and done % args.save_steps == 0 and done % mu == 0 and done < args.max_steps:
            checkpoint.save_checkpoint(accelerator, args.output_dir, done, model, tokenizer, args,
                                       {"elapsed": tracker.elapsed(), "num_tokens": num_tokens}, args.save_total_limit)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir)
    if args.save_steps:
        checkpoint.save_checkpoint(accelerator, args.output_dir, args.max_steps, model, tokenizer, args,
                                   {"elapsed": tracker.elapsed(), "num_tokens": num_tokens}, args.save_total_limit)
    tracker.close()
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
