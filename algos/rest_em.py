"""ReST-EM: expert iteration. Sample from the policy, keep the samples the reward accepts, fine-tune on them, repeat.

Paper: "Beyond Human Data: Scaling Self-Training for Problem-Solving with Language Models" (Singh et al., arXiv
2312.06585), Sec. 3 (ReST-EM as expectation-maximisation) and Algorithm 1. Iteration i = 1..I:
    E-step  for each prompt x of the iteration, K samples y_1..y_K ~ π_{i-1}(.|x), rewards r(x, y_k)
            D_i = {(x, y_k) : r(x, y_k) >= threshold}                (binary rewards: the correct samples)
    M-step  π_i = argmax_θ Σ_{(x,y) ∈ D_i} log π_θ(y | x),  fine-tuned from the BASE model π_0 (the paper: less
            drift, better transfer than fine-tuning π_{i-1}); --continue_from_previous True fine-tunes π_{i-1}
            instead (expert iteration / iterative SFT).
The paper's M-step weights the NLL by r(x, y) in {0, 1}, which is exactly this filter. For non-binary rewards the
threshold keeps samples unweighted; --top_per_prompt m keeps at most the m best passing samples of each prompt (a cap
that keeps easy prompts from dominating D_i; with --threshold -inf --top_per_prompt 1 this is RAFT, arXiv 2304.06767).

M-step loss (completion tokens only, EOS included; global token mean per optimizer step, as algos/sft.py):
    L(θ) = - Σ_{i,t} m_{i,t} log π_θ(y_{i,t} | x_i, y_{i,<t}) / N_tok,   N_tok = completion tokens of the whole step
(the paper's sequence-sum objective up to a per-step constant: the same direction, a batch-dependent scale).

Implementation details (numbered so the tests and the README can point at them):
 1. Prompts: iteration i samples --prompts_per_iteration prompts, the (i-1)-th batch of common/data.batch_indices
    (epochs of a seeded permutation: successive iterations see new prompts until the data is used up). Each process
    samples an equal contiguous share; the samples of all processes are gathered, so every process holds D_i.
 2. Sampling stream: reseeded at every iteration from (--seed, iteration, process index), so a resumed run samples
    exactly what the uninterrupted run did.
 3. Filter (keep_mask): a sample is kept when it is scored (NaN = no source scored it: never kept), its reward
    (the NaN-aware weighted sum over --reward_funcs / the reward model) is >= --threshold, and it ended with EOS
    (--keep_truncated True also keeps completions cut at --max_new_tokens, trained without an EOS). Then
    --top_per_prompt m keeps the m highest-reward kept samples per prompt (ties: the first index).
 4. M-step data: the sampled token ids themselves (not re-tokenised text), prompt tokens cut from the left at
    --max_prompt_length. Batches: data.batch_indices over the kept rows with seed --seed * 1000 + i (the order
    algos/sft.py uses with that --seed); a kept set smaller than one global batch is cycled through (a row may
    appear twice in a batch). Nothing kept: no M-step, π_i = the starting point of the M-step (π_0, or π_{i-1}).
 5. Each M-step starts a fresh AdamW (its moments are cleared) and a fresh linear warm-up of --warmup_steps, then
    a constant learning rate, for --sft_steps optimizer steps. Gradient accumulation and processes give the update
    of one big batch (the loss is multiplied back by accumulation steps x processes, as in sft.py).
 6. Checkpoints at iteration boundaries (checkpoint-<i> holds π_i, the RNG of every process and the counters);
    --resume_from auto continues at iteration i + 1 and gives the uninterrupted run's samples, weights and metrics.
    --iterations may grow on resume. The base model π_0 is loaded again from --model_name_or_path on resume.
 7. Metrics: one record per iteration (step = iteration; step 0 = the starting policy's evaluation): kept,
    kept_fraction, prompts_with_kept, reward (mean sampled reward), rewards/<name>/mean|std, completion lengths,
    sft/loss (token mean over the M-step), sft/mean_token_accuracy, sft/grad_norm, train/skipped_steps and the
    held-out eval/reward and eval/gold_reward (greedy, toy datasets: the exact match). data/iteration-<i>.kept.jsonl
    (prompt, completion: the M-step data, as text) and data/iteration-<i>.samples.jsonl (prompt, completions[K],
    rewards[K]) are written unless --save_data False.
 8. Non-finite safety: a non-finite gradient norm skips the optimizer step (train/skipped_steps); non-finite weights
    are never saved (common/checkpoint.py).

Run:
    python algos/rest_em.py                                     # toy-sft on toy:add, 3 iterations, a few minutes
    python algos/rest_em.py --continue_from_previous True       # expert iteration from the previous policy
    python algos/rest_em.py --threshold -inf --top_per_prompt 1 # RAFT: the best sample of each prompt
    python algos/rest_em.py --reward_model_name_or_path toy-rm --threshold 1.0
    python algos/rest_em.py --resume_from auto --output_dir runs/<run> --iterations 5   # continue a run
    python algos/rest_em.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name prompts.jsonl \
        --reward_funcs my_rewards.py:correct --num_generations 16 --max_new_tokens 512 --learning_rate 1e-5 \
        --per_device_train_batch_size 8 --gradient_accumulation_steps 8 --eval_fraction 0.05
    bash benchmarks/rest_em.sh                                  # held-out gold reward per iteration, 3 seeds
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro
from accelerate.utils import gather_object, set_seed

from common import checkpoint, data, distributed, evaluation, model as model_utils, rollout, tracking
from common import peft_utils, rewards as reward_utils
from common.generation import build_generator


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "rest_em"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (prompt order, sampling, M-step batches)"""
    run_name: str | None = None
    """run name; default '{exp_name}__{dataset}__{seed}__{unix time}'"""
    output_dir: str | None = None
    """where metrics, checkpoints, the per-iteration data and the final model go; default runs/{run_name}"""
    track: bool = False
    """mirror metrics to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "cleanalign"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team)"""
    model_name_or_path: str = "toy-sft"
    """the base model π_0: 'toy-sft' (the toy SFT policy), a local folder or a hub name"""
    dataset_name: str = "toy:add"
    """prompts: 'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a
    hub name (any type with a prompt column; extra columns are passed to the reward functions)"""
    dataset_split: str = "train"
    """split to sample prompts from"""
    logging_steps: int = 25
    """print the M-step loss every this many optimizer steps (metrics.jsonl gets one record per iteration)"""
    save_steps: int = 1
    """checkpoint every this many iterations (0: only the final model)"""
    save_total_limit: int | None = 2
    """keep at most this many checkpoints"""
    resume_from: str | None = None
    """a checkpoint folder, or 'auto' for the newest complete one in output_dir"""
    overwrite_output_dir: bool = False
    """start a new run in an output_dir that holds another run's files (they are deleted first)"""
    eval_dataset_name: str | None = None
    """held-out prompts: a file, a save_to_disk folder or a hub name (split eval_split); toy datasets use the toy
    task's test split"""
    eval_split: str = "test"
    """split of eval_dataset_name (hub datasets) or of the toy task used for evaluation"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for evaluation (deterministic; never overlaps training)"""
    mixed_precision: str | None = None
    """'no', 'fp16' or 'bf16' (default: whatever `accelerate launch` configured)"""
    # --- ReST-EM
    iterations: int = 3
    """I, E-step + M-step rounds (the paper finds 2-3 enough before overfitting)"""
    continue_from_previous: bool = False
    """M-step from the previous iteration's policy (expert iteration) instead of the base model (ReST-EM)"""
    prompts_per_iteration: int = 512
    """prompts sampled per iteration (all processes together)"""
    num_generations: int = 8
    """K, samples per prompt"""
    threshold: float = 1.0
    """keep samples whose reward is >= this (the toy gold reward is 1 for a correct answer); -inf keeps all"""
    top_per_prompt: int | None = None
    """keep at most this many best passing samples per prompt (ties: first index); None: no cap"""
    keep_truncated: bool = False
    """also keep completions that hit --max_new_tokens without EOS"""
    save_data: bool = True
    """write data/iteration-<i>.kept.jsonl and data/iteration-<i>.samples.jsonl"""
    # --- M-step optimisation
    learning_rate: float = 1e-4
    """AdamW learning rate (the toy model; use ~1e-5 for a pretrained LM)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 10
    """linear warm-up steps at the start of every M-step, then constant"""
    sft_steps: int = 60
    """optimizer steps per M-step"""
    per_device_train_batch_size: int = 64
    """sequences per micro-batch per process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- sampling (common/generation.py)
    temperature: float = 1.0
    """sampling temperature of the E-step"""
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
    generation_batch_size: int = 128
    """prompts per generate call (each with K samples)"""
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
    default: the toy task's gold reward (none when --reward_model_name_or_path is given)"""
    reward_model_name_or_path: str | None = None
    """a reward model added to reward_funcs (e.g. 'toy-rm'); same as 'model:<name>' there"""
    reward_weights: list[float] | None = None
    """one weight per reward source (reward_funcs, then the reward model); default all 1"""
    # --- evaluation and logging
    eval_steps: int = 1
    """held-out evaluation (greedy) every this many iterations, at iteration 0 and at the end; 0: never"""
    num_eval_prompts: int = 256
    """held-out prompts per evaluation"""
    num_completions_to_log: int = 8
    """sample completions (with reward and kept flag) written to samples.jsonl per iteration"""
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


# ----------------------------------------------------------------------------- the math
# Shapes: P prompts per iteration, K samples per prompt, F reward sources; B sequences per micro-batch, T completion
# tokens. NaN reward = not scored. Masks are 0/1 floats over completion tokens (EOS included).
def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, F) rewards with NaN where a source returned None, (F,) weights -> (N,) weighted sum over the sources that
    scored the sample; NaN when none did."""
    assert rewards_per_func.dim() == 2 and weights.shape == (rewards_per_func.shape[1],)
    scored = ~torch.isnan(rewards_per_func)
    total = torch.where(scored, rewards_per_func * weights, torch.zeros_like(rewards_per_func)).sum(1)
    return torch.where(scored.any(1), total, torch.full_like(total, float("nan")))


def keep_mask(rewards: torch.Tensor, terminated: torch.Tensor, threshold: float, top_per_prompt: int | None = None,
              keep_truncated: bool = False) -> torch.Tensor:
    """Detail 3. (P, K) rewards (NaN = not scored) and (P, K) bool terminated -> (P, K) bool, the E-step's kept
    samples: scored, reward >= threshold, ended with EOS (unless keep_truncated); then at most top_per_prompt per
    prompt, the highest rewards first and, among equal rewards, the first index."""
    assert rewards.dim() == 2 and terminated.shape == rewards.shape
    keep = ~torch.isnan(rewards) & (rewards >= threshold)
    if not keep_truncated:
        keep = keep & terminated.bool()
    if top_per_prompt is None:
        return keep
    r = torch.where(keep, rewards, torch.full_like(rewards, -math.inf))
    idx = torch.arange(r.shape[1])
    # ahead[p, j, k]: kept sample k outranks sample j (higher reward, or equal reward and an earlier index)
    ahead = (r[:, None, :] > r[:, :, None]) | ((r[:, None, :] == r[:, :, None]) & (idx[None, :] < idx[:, None]))
    rank = (ahead & keep[:, None, :]).sum(-1)  # (P, K)
    return keep & (rank < top_per_prompt)


def sft_loss(logps: torch.Tensor, mask: torch.Tensor, num_items: float) -> torch.Tensor:
    """M-step loss: masked NLL summed over the micro-batch, divided by the completion-token count of the whole
    optimizer step (global token mean). logps, mask: (B, T)."""
    assert logps.shape == mask.shape
    return -(logps * mask).sum() / num_items


def completion_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_θ(y_t | x, y_<t) (B, T) of the completion tokens of a data.batch_prompt_completion batch, and the most
    likely token at each position (B, T, no gradient). The output head and the float32 log-softmax run a block of
    positions at a time, forward and backward (common/model.py's completion_logps), so no (B, T, V) logits tensor is
    made; models whose logits are not a plain linear head get them from their forward."""
    T = batch["completion_mask"].shape[1]
    return model_utils.completion_logps(model, batch["input_ids"], batch["attention_mask"], T, return_argmax=True)


def sft_batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Detail 4: rows of M-step optimizer step `step`: data.batch_indices (epochs of a seeded permutation) when
    n >= batch_size; else positions [step * batch_size, (step + 1) * batch_size) of a stream of such permutations."""
    if n >= batch_size:
        return data.batch_indices(n, batch_size, step, seed)
    out, perms = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out.append(perms[epoch][i])
    return out


# ----------------------------------------------------------------------------- plumbing
def check_args(args: Args, num_processes: int = 1):
    """Every flag error, before any data or model is loaded."""
    if args.iterations < 1 or args.prompts_per_iteration < 1 or args.num_generations < 1 or args.sft_steps < 1:
        raise ValueError("--iterations, --prompts_per_iteration, --num_generations and --sft_steps must be >= 1")
    if math.isnan(args.threshold) or args.threshold == math.inf:
        raise ValueError(f"--threshold {args.threshold} keeps no sample; give a number (or -inf to keep all)")
    if args.top_per_prompt is not None and args.top_per_prompt < 1:
        raise ValueError(f"--top_per_prompt {args.top_per_prompt}: keep at least 1 per prompt, or None for no cap")
    if args.prompts_per_iteration % num_processes:
        fix = num_processes * max(1, round(args.prompts_per_iteration / num_processes))
        raise ValueError(f"--prompts_per_iteration {args.prompts_per_iteration} must be a multiple of the "
                         f"{num_processes} processes: use e.g. {fix}")
    if args.per_device_train_batch_size < 1 or args.gradient_accumulation_steps < 1 or args.generation_batch_size < 1:
        raise ValueError("--per_device_train_batch_size, --gradient_accumulation_steps and --generation_batch_size "
                         "must be >= 1")
    if args.max_new_tokens < 1 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.temperature < 0:
        raise ValueError("--max_new_tokens >= 1, --top_p in (0, 1], --top_k >= 0 and --temperature >= 0 please")
    if args.use_vllm and args.vllm_mode not in ("colocate", "server"):
        raise ValueError(f"--vllm_mode {args.vllm_mode!r}: choose 'colocate' or 'server'")


def e_step(generator, model, accelerator, prompts: list, prompt_ids: list, columns: dict, rows: list[int], K: int,
           batch_size: int, sources) -> list[dict]:
    """K samples for each of this process's share of `rows` (detail 1), scored; gathered in row order. One dict per
    prompt: row, completion_ids[K] (EOS kept), texts[K], terminated[K], rpf[K][F]."""
    W, rank = accelerator.num_processes, accelerator.process_index
    share = len(rows) // W
    local = rows[rank * share:(rank + 1) * share]
    out = []
    for s in range(0, len(local), batch_size):
        chunk = local[s:s + batch_size]
        gen = generator.generate(model, [prompt_ids[i] for i in chunk], n=K)  # row a*K + k = sample k of chunk[a]
        ids = rollout.completion_id_lists(gen.completion_ids, gen.completion_mask)
        p_rep, cols = rollout.repeat_rows(chunk, prompts, columns, K)
        rpf = sources(p_rep, rollout.as_completions(p_rep, gen.texts), ids, cols)  # (len(chunk) * K, F)
        for a, row in enumerate(chunk):
            sl = slice(a * K, (a + 1) * K)
            out.append({"row": row, "completion_ids": ids[sl], "texts": gen.texts[sl],
                        "terminated": gen.terminated[sl].tolist(), "rpf": rpf[sl].tolist()})
    return gather_object(out) if W > 1 else out


def e_step_metrics(samples: list[dict], rewards: torch.Tensor, keep: torch.Tensor, sources) -> dict:
    """Detail 7: the iteration's E-step statistics (TRL's completion-length names)."""
    lengths = torch.tensor([len(c) for s in samples for c in s["completion_ids"]], dtype=torch.float64)
    term = torch.tensor([t for s in samples for t in s["terminated"]])
    r = rewards.flatten()
    scored = r[~torch.isnan(r)]
    K = rewards.shape[1]
    rpf = torch.tensor([s["rpf"] for s in samples], dtype=torch.float64).view(-1, len(sources.names))
    return {"samples": r.numel(), "kept": int(keep.sum()), "kept_fraction": keep.float().mean().item(),
            "prompts_with_kept": keep.any(1).float().mean().item(), "samples_per_prompt": K,
            "reward": scored.mean().item() if scored.numel() else float("nan"),
            "reward_std": scored.std().item() if scored.numel() > 1 else 0.0, **sources.metrics(rpf),
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": 1.0 - term.float().mean().item(),
            "completions/mean_terminated_length": lengths[term].mean().item() if term.any() else 0.0}


def write_jsonl(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def as_completion(prompt, text: str):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


# ----------------------------------------------------------------------------- main
def main(args: Args):
    # ---- plumbing (safe to skip): checks, data and reward sources, run folder, models
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    accelerator = distributed.make_accelerator(args)
    check_args(args, accelerator.num_processes)
    W, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    A_steps, B = args.gradient_accumulation_steps, args.per_device_train_batch_size
    global_bs = distributed.global_batch_size(args, accelerator)
    specs = reward_utils.default_specs(args.reward_funcs, args.reward_model_name_or_path, args.dataset_name)
    reward_utils.check_weights(specs, args.reward_weights)
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    ds, eval_ds = data.load_splits(args, "prompt", "rest_em.py", toy_n=args.num_eval_prompts)
    data.check_batch_fits(len(ds), args.prompts_per_iteration, "--prompts_per_iteration")
    prompts = list(ds["prompt"])
    columns = {c: list(ds[c]) for c in ds.column_names if c != "prompt"}  # passed on to the reward functions
    prompt_ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in prompts])
    if args.max_prompt_length:
        prompt_ids = [s[-args.max_prompt_length:] for s in prompt_ids]
    sources = reward_utils.RewardSources(specs, args.reward_weights, args.dataset_name, device)
    peft_utils.check_args(args)  # LoRA flags and module names, before anything is loaded or written
    resume = checkpoint.prepare_output_dir(args, may_change=("iterations", "save_data"))
    out_dir = Path(args.output_dir)

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters (reset to B = 0 = π_0 for ReST-EM)
    base_state = None if args.continue_from_previous else {k: v.detach().cpu().clone()
                                                           for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    # detail 5: the learning rate is set by hand at every step (warm-up restarts each M-step); optimizer_step steps
    # this constant schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = build_generator(args, tokenizer, accelerator, model)

    state = {"step": 0, "elapsed": 0.0, "skipped_steps": 0}
    if resume is not None:
        state.update(checkpoint.load_checkpoint(accelerator, resume))
        accelerator.print(f"resumed from {resume} after iteration {state['step']}")
    start, skipped = state["step"], state["skipped_steps"]
    if accelerator.is_main_process:  # this run's per-iteration data files past the resume point are written again
        for p in (out_dir / "data").glob("iteration-*.jsonl"):
            if int(p.name.split(".")[0].split("-")[1]) > start:
                p.unlink()
    tracker = tracking.Tracker(args, accelerator.is_main_process, start, state["elapsed"],
                               show=("kept_fraction", "reward", "sft/loss", "eval/gold_reward", "eval/reward"))
    accelerator.print(f"rest_em: {len(ds)} prompts; {args.iterations} iterations of {args.prompts_per_iteration} "
                      f"prompts x {args.num_generations} samples, keep reward >= {args.threshold}"
                      + (f" (at most {args.top_per_prompt} per prompt)" if args.top_per_prompt else "")
                      + f", {args.sft_steps} SFT steps of {global_bs} sequences from the "
                      + ("previous policy" if args.continue_from_previous else "base model")
                      + f"; {W} process(es) -> {args.output_dir}")

    def evaluate() -> dict:  # greedy completions of the held-out prompts, scored by the same sources
        return evaluation.heldout_reward(accelerator.unwrap_model(model), tokenizer, eval_ds, sources,
                                         args.dataset_name, args.num_eval_prompts, args.max_new_tokens,
                                         accelerator=accelerator)

    if start == 0 and args.eval_steps and eval_ds is not None:
        tracker.log(evaluate(), 0, args.iterations)

    for it in range(start + 1, args.iterations + 1):
        # ---------------------------------------------------------------- E-step: sample from π_{it-1}, score, filter
        t0 = time.time()
        set_seed(args.seed * 100003 + it * 1009 + rank)  # detail 2
        generator.sync_weights(model)
        rows = data.batch_indices(len(ds), args.prompts_per_iteration, it - 1, args.seed)  # detail 1
        samples = e_step(generator, model, accelerator, prompts, prompt_ids, columns, rows, args.num_generations,
                         args.generation_batch_size, sources)
        K = args.num_generations
        rpf = torch.tensor([s["rpf"] for s in samples], dtype=torch.float32).view(len(samples) * K, -1)
        rewards = combine_rewards(rpf, sources.weights.float()).view(len(samples), K)  # (P, K)
        terminated = torch.tensor([s["terminated"] for s in samples], dtype=torch.bool)  # (P, K)
        keep = keep_mask(rewards, terminated, args.threshold, args.top_per_prompt, args.keep_truncated)
        kept = [(prompt_ids[s["row"]], s["completion_ids"][k], p, k) for p, s in enumerate(samples)
                for k in range(K) if keep[p, k]]
        metrics = e_step_metrics(samples, rewards, keep, sources)
        gen_time = time.time() - t0
        metrics["tokens_per_second/generation"] = sum(len(c) for s in samples for c in s["completion_ids"]) / gen_time
        if it == start + 1:
            sources.check_varies(rpf, accelerator.is_main_process)
        if accelerator.is_main_process:
            shown = [(p, k) for p in range(len(samples)) for k in range(K)][:args.num_completions_to_log]
            tracker.log_samples(it, [{"prompt": prompts[samples[p]["row"]], "completion": samples[p]["texts"][k],
                                      "reward": rewards[p, k].item(), "kept": bool(keep[p, k])} for p, k in shown])
            if args.save_data:
                write_jsonl(out_dir / "data" / f"iteration-{it}.kept.jsonl",
                            [{"prompt": prompts[samples[p]["row"]],
                              "completion": as_completion(prompts[samples[p]["row"]], samples[p]["texts"][k])}
                             for _, _, p, k in kept])
                write_jsonl(out_dir / "data" / f"iteration-{it}.samples.jsonl",
                            [{"prompt": prompts[s["row"]], "completions": [as_completion(prompts[s["row"]], t)
                                                                           for t in s["texts"]],
                              "rewards": [None if math.isnan(v) else v for v in rewards[p].tolist()]}
                             for p, s in enumerate(samples)])

        # ---------------------------------------------------------------- M-step: SFT on the kept samples
        t0 = time.time()
        if base_state is not None:  # ReST-EM: from π_0
            distributed.load_full_state_dict(accelerator, model, base_state)  # each rank keeps its ZeRO-3 / FSDP2 part
        optimizer.state.clear()  # detail 5: fresh AdamW moments
        sums = defaultdict(float)
        model.train()
        for t in range(args.sft_steps if kept else 0):
            for g in optimizer.param_groups:
                g["lr"] = args.learning_rate * min(1.0, (t + 1) / max(1, args.warmup_steps))
            indices = sft_batch_indices(len(kept), global_bs, t, args.seed * 1000 + it)  # detail 4
            micro = distributed.micro_batches(indices, args, accelerator)
            num_items = distributed.gather_sum(accelerator, sum(len(kept[i][1]) for mb in micro for i in mb))
            step_loss = 0.0
            for mb in micro:
                batch = data.batch_prompt_completion([kept[i][0] for i in mb], [kept[i][1] for i in mb],
                                                     tokenizer.pad_token_id)
                batch = {k_: v.to(device) for k_, v in batch.items()}
                with accelerator.accumulate(model):
                    logps, argmax = completion_token_logps(model, batch)  # (B, T) each
                    targets = batch["input_ids"][:, -logps.shape[1]:]
                    mask = batch["completion_mask"].float()
                    loss = sft_loss(logps, mask, num_items)
                    # detail 5: undo accelerate's division by the accumulation steps and DDP's mean over processes
                    accelerator.backward(loss * A_steps * W)
                    if accelerator.sync_gradients:
                        grad_norm, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                                        args.max_grad_norm)
                        skipped += not stepped
                        if stepped:
                            sums["grad_norm"] += grad_norm
                            sums["stepped"] += 1
                with torch.no_grad():
                    sums["nll"] += -(logps * mask).sum().item()
                    sums["correct"] += ((argmax == targets) * mask).sum().item()
                    sums["tokens"] += mask.sum().item()
                    step_loss += -(logps * mask).sum().item()
            if args.logging_steps and (t + 1) % args.logging_steps == 0:  # a progress line (collective)
                step_loss = distributed.gather_sum(accelerator, step_loss) / num_items
                accelerator.print(f"iteration {it} sft step {t + 1}/{args.sft_steps} | loss {step_loss:.4g}")
        generator.sync_weights(model)
        tot = {k_: distributed.gather_sum(accelerator, sums[k_]) for k_ in ("nll", "correct", "tokens")}
        if kept:
            metrics.update({"sft/loss": tot["nll"] / tot["tokens"], "sft/num_tokens": tot["tokens"],
                            "sft/mean_token_accuracy": tot["correct"] / tot["tokens"],
                            "sft/grad_norm": sums["grad_norm"] / sums["stepped"] if sums["stepped"] else math.nan})
        else:
            accelerator.print(f"iteration {it}: no sample passed --threshold {args.threshold}; no M-step this time")
        metrics.update({"train/skipped_steps": skipped, "sft/seconds": time.time() - t0})

        # ---- plumbing (safe to skip): evaluation, logging, checkpoints
        if args.eval_steps and eval_ds is not None and (it % args.eval_steps == 0 or it == args.iterations):
            metrics.update(evaluate())
        tracker.log(metrics, it, args.iterations)
        if args.save_steps and (it % args.save_steps == 0 or it == args.iterations):
            checkpoint.save_checkpoint(accelerator, args.output_dir, it, model, tokenizer, args,
                                       {"elapsed": tracker.elapsed(), "skipped_steps": skipped}, args.save_total_limit)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir, args.iterations)
    tracker.close()
    accelerator.print(f"saved the final policy π_{args.iterations} to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
