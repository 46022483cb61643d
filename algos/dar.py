"""DAR (Direct Advantage Regression): advantage-weighted regression of sequence log-probs towards a regularised
optimal policy, with online rewards.

Paper: "Direct Advantage Regression: Aligning LLMs with Online AI Reward" (arXiv 2504.14177). The KL-regularised RL
objective (reward, KL to the reference with coefficient α, KL to the sampling policy with coefficient β) has the
closed-form optimum π* ∝ π_ref^{α/(α+β)} π_beh^{β/(α+β)} exp(A/(α+β)); regressing π_θ onto it with samples from π_beh
gives a weighted maximum likelihood (the paper's weighted objective, here at sequence level):

  A_{b,k}  = r_{b,k} - mean_k r_{b,k}, then scaled by `--adv_norm` (per-prompt std by default: a per-prompt z-score)
  log w_i  = (α/(α+β)) (S^ref_i - S^beh_i) + A_i/(α+β)          (the regularisation and advantage parts)
  w_i      = min(exp(log w_i), w_clip)                            stop-gradient (from frozen quantities)
  L        = - mean_i w_i S^θ_i                                   mean over the N = B·K samples of the optimizer step
S = sum of completion-token log-probs (EOS kept). S^beh is the dataset's `behavior_logps` when given, otherwise the
sampling policy's log-prob, which online is the current policy itself (samples are drawn from π_θ each step), so
S^beh = sg(S^θ). Weights are not normalised (unlike V-MPO's E-step); the clip bounds the largest.

Implementation notes:
 1. The loss is a mean over the whole step's samples (all processes, all accumulation micro-batches): each
    micro-batch contributes its sum divided by that global count, so multi-process runs give the same update.
 2. K = 1 makes every per-prompt-centred advantage 0 (all weights equal the regularisation part): it fails at start-up.
 3. The exponent is clamped at log(w_clip) before exp, so a large advantage never overflows.
 4. The completion mask comes from generation or from token counts, never from pad_token_id (EOS kept when pad == eos).

Toy defaults (the benchmark's): toy-sft policy on toy:add, 32 prompts x K = 2 per step, lr 1e-4, 150 steps,
α = β = 0.1, w_clip = 50.

Data (`--data_mode`): prompt-only -> online; preference -> offline pairs with rewards [1, 0]; prompt-completion-reward
(`completions[K]`, `rewards[K]`, optional `behavior_logps[K]`) -> offline, K inferred from the data.

Run:
    python algos/dar.py
    accelerate launch algos/dar.py --k 4
    python algos/dar.py --data_mode preference
    bash benchmarks/vmpo.sh                                  # DAR next to V-MPO, 3 seeds
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro

from common import checkpoint, data, distributed, evaluation, model as model_utils, rewards as reward_utils, tracking
from common.generation import build_generator, sampler_gap, sampler_gap_metrics

ADV_NORMS = ("per_prompt", "batch", "none")
DATA_MODES = ("auto", "online", "preference", "prompt_completion_reward")


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "dar"
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
    """starting policy (also the reference): 'toy-sft' (the toy SFT policy), a local folder or a hub name"""
    dataset_name: str = "toy:add"
    """'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a hub name"""
    dataset_split: str = "train"
    """split to train on"""
    logging_steps: int = 5
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
    """AdamW learning rate of the policy (use ~5e-7 for a pretrained LM)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up steps, then a constant learning rate"""
    max_steps: int = 150
    """optimizer steps"""
    per_device_train_batch_size: int = 32
    """prompts per micro-batch per process (each brings K completions)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 to disable)"""
    # --- data and rewards
    data_mode: str = "auto"
    """'auto' (toy: online; files: by columns), 'online' (prompts), 'preference' (offline pairs, rewards [1, 0]) or
    'prompt_completion_reward' (offline completions[K] + rewards[K], optional behavior_logps[K])"""
    reward_funcs: list[str] | None = None
    """online reward sources: 'add', 'reverse', 'file.py:fn', 'module:fn', 'model:<name or dir>'; default: the toy
    task's gold reward (none when --reward_model_name_or_path is given)"""
    reward_model_name_or_path: str | None = None
    """a one-output sequence classifier used as a reward (e.g. 'toy-rm'); added to --reward_funcs"""
    reward_weights: list[float] | None = None
    """one weight per reward source (default all 1); the reward is the weighted sum (NaN counts as 0)"""
    # --- sampling (same names in every online script)
    k: int = 2
    """completions sampled per prompt (online); offline it is inferred from the data"""
    temperature: float = 1.0
    """sampling temperature (log-probs are computed at the same temperature)"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    min_p: float | None = None
    """min-p sampling"""
    max_new_tokens: int = 8
    """longest completion"""
    max_prompt_length: int = 128
    """prompts keep their last this many tokens"""
    use_vllm: bool = False
    """sample with vLLM (common/vllm_backend.py)"""
    vllm_mode: str = "colocate"
    """'colocate' or 'server'"""
    vllm_server_host: str = "127.0.0.1"
    """vLLM server host (server mode)"""
    vllm_server_port: int = 8000
    """vLLM server port (server mode)"""
    vllm_server_token_file: str | None = None
    """the token file scripts/vllm_server.py wrote (server mode); default: <cache>/vllm-server-<port>.token"""
    vllm_gpu_memory_utilization: float = 0.3
    """GPU memory share of a colocated vLLM"""
    vllm_kv_cache_gb: float = 1.0
    """KV-cache space of a CPU vLLM"""
    # --- DAR
    alpha: float = 0.1
    """α, the reference-regularisation coefficient"""
    beta: float = 0.1
    """β, the coefficient of the KL to the sampling policy (> 0)"""
    wclip: float = 50.0
    """largest weight"""
    adv_norm: str = "per_prompt"
    """scale of the per-prompt-centred advantage: 'per_prompt' std (z-score), 'batch' std or 'none'"""
    # --- evaluation and samples
    eval_steps: int = 25
    """held-out gold reward (toy tasks) every this many steps, at step 0 and at the end (0: start and end only)"""
    num_eval_prompts: int = 256
    """held-out prompts for the evaluation"""
    log_completions_steps: int = 25
    """log a few sample completions every this many steps (0: never)"""


# ----------------------------------------------------------------------------- the math
# Shapes: B prompts, K completions per prompt, N = B·K samples (row b*K + k), T completion tokens.
def dar_advantages(rewards: torch.Tensor, norm: str, eps: float = 1e-6) -> torch.Tensor:
    """A = r - mean_k r, divided by the per-prompt std, the batch std or 1. rewards (B, K) -> (B, K)."""
    assert rewards.dim() == 2
    adv = rewards - rewards.mean(1, keepdim=True)
    if norm == "per_prompt":
        adv = adv / rewards.std(1, unbiased=False, keepdim=True).clamp(min=eps)
    elif norm == "batch":
        adv = adv / adv.std(unbiased=False).clamp(min=eps)
    elif norm != "none":
        raise ValueError(f"unknown adv_norm '{norm}'")
    return adv


def dar_weights(adv: torch.Tensor, s_ref: torch.Tensor, s_beh: torch.Tensor, alpha: float, beta: float,
                wclip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, log regularisation part, log advantage part), all (N,) and detached:
    w = min(exp((α/(α+β))(S^ref - S^beh) + A/(α+β)), w_clip)."""
    assert adv.shape == s_ref.shape == s_beh.shape and adv.dim() == 1
    log_reg = (alpha / (alpha + beta)) * (s_ref - s_beh).detach()
    log_adv = adv.detach() / (alpha + beta)
    w = torch.exp((log_reg + log_adv).clamp(max=math.log(wclip))).clamp(max=wclip)  # exponent capped: no overflow
    return w, log_reg, log_adv


def dar_loss(weights: torch.Tensor, s_policy: torch.Tensor, num_global: int) -> torch.Tensor:
    """This micro-batch's share of -mean_i w_i S^θ_i over the step's N samples."""
    assert weights.shape == s_policy.shape and weights.dim() == 1
    return -(weights.detach() * s_policy).sum() / num_global


# ----------------------------------------------------------------------------- checks and data
def check_args(args: Args):
    if args.adv_norm not in ADV_NORMS:
        raise ValueError(f"--adv_norm {args.adv_norm}: choose one of {ADV_NORMS}")
    if args.data_mode not in DATA_MODES:
        raise ValueError(f"--data_mode {args.data_mode}: choose one of {DATA_MODES}")
    if args.alpha < 0 or args.beta <= 0:
        raise ValueError("need --alpha >= 0 and --beta > 0 (β divides the advantage)")
    if args.wclip <= 0:
        raise ValueError("--wclip must be positive")
    if args.k < 1 or args.max_steps < 1 or args.per_device_train_batch_size < 1:
        raise ValueError("--k, --max_steps and --per_device_train_batch_size must be positive")


def check_degenerate(k: int):
    if k == 1:
        raise ValueError("K = 1 completion per prompt makes every per-prompt-centred advantage 0 (DAR would only "
                         "regress on the reference ratio); use --k 2 or more")


def load_rows(args: Args, tokenizer):
    """Rows of the training data: (mode, K, rows). Online rows: {prompt, prompt_ids, columns}; offline rows also
    carry completion token lists (ending with EOS), rewards and optional behaviour log-probs."""
    toy = data.toy_task(args.dataset_name) is not None
    mode = args.data_mode if args.data_mode != "auto" else "online"
    ds = data.load_data(args.dataset_name, args.dataset_split, toy_kind="prompt" if mode == "online" else mode)
    if args.data_mode == "auto" and not toy:
        kind = data.detect_type(ds.column_names)
        mode = kind if kind in ("preference", "prompt_completion_reward") else "online"
    if mode == "preference":
        ds = data.convert(ds, "preference", script="dar.py --data_mode preference")
    ds = data.convert(ds, "prompt" if mode == "online" else "prompt_completion_reward", script="dar.py")
    prompt_ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in ds["prompt"]])
    prompt_ids = [p[-args.max_prompt_length:] for p in prompt_ids]
    skip = {"prompt", "completions", "rewards", "behavior_logps"}
    extra = [c for c in ds.column_names if c not in skip]
    rows = [{"prompt": p, "prompt_ids": ids, "columns": {c: ds[c][i] for c in extra}}
            for i, (p, ids) in enumerate(zip(ds["prompt"], prompt_ids))]
    if mode == "online":
        return mode, args.k, rows
    ks = {len(c) for c in ds["completions"]}
    if len(ks) != 1 or {len(r) for r in ds["rewards"]} != ks:
        raise data.DatasetFormatError(f"every row needs the same number K of completions and rewards; found "
                                      f"completion counts {sorted(ks)}")
    k = ks.pop()
    has_beh = "behavior_logps" in ds.column_names
    for i, row in enumerate(rows):
        comps = ds["completions"][i]
        row["completion_ids"] = [c[:args.max_new_tokens] for c in data.tokenize(
            tokenizer, [data.completion_text(row["prompt"], c, tokenizer) for c in comps])]
        row["completion_texts"] = [c if isinstance(c, str) else c[-1]["content"] for c in comps]
        row["rewards"] = [float(r) for r in ds["rewards"][i]]
        if has_beh:
            row["behavior_logps"] = [float(b) for b in ds["behavior_logps"][i]]
    return mode, k, rows


def make_batch(prompt_ids: list[list[int]], completion_ids: torch.Tensor, completion_mask: torch.Tensor, k: int,
               pad_id: int) -> dict:
    """[left-padded prompt (repeated K times) | completion] with the given completion mask (note 4)."""
    p_ids, p_mask = data.pad(prompt_ids, pad_id, "left")
    p_ids, p_mask = p_ids.repeat_interleave(k, 0), p_mask.repeat_interleave(k, 0)
    return {"input_ids": torch.cat([p_ids, completion_ids], 1),
            "attention_mask": torch.cat([p_mask, completion_mask], 1), "completion_mask": completion_mask}


def sequence_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    T = batch["completion_mask"].shape[1]
    logps = model_utils.completion_logps(model, batch["input_ids"], batch["attention_mask"], T, temperature)
    return (logps * batch["completion_mask"]).sum(1)


def combine_rewards(per_func: torch.Tensor, weights: list[float] | None) -> torch.Tensor:
    w = torch.tensor(weights if weights is not None else [1.0] * per_func.shape[1])
    return (torch.nan_to_num(per_func, nan=0.0) * w).sum(1)


# ----------------------------------------------------------------------------- main
def main(args: Args):
    import copy

    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    check_args(args)
    accelerator = distributed.make_accelerator(args)
    device, W, GA = accelerator.device, accelerator.num_processes, args.gradient_accumulation_steps

    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    mode, k, rows = load_rows(args, tokenizer)
    online = mode == "online"
    check_degenerate(k)
    global_prompts = distributed.global_batch_size(args, accelerator)
    num_global = global_prompts * k
    funcs = []
    if online:
        specs = list(args.reward_funcs) if args.reward_funcs is not None else (
            [] if args.reward_model_name_or_path else [data.toy_task(args.dataset_name) or "add"])
        if args.reward_model_name_or_path:
            specs.append(f"model:{args.reward_model_name_or_path}")
        if not specs:
            raise ValueError("online mode needs a reward: --reward_funcs and/or --reward_model_name_or_path")
        if args.reward_weights is not None and len(args.reward_weights) != len(specs):
            raise ValueError(f"--reward_weights has {len(args.reward_weights)} values for {len(specs)} reward sources "
                             f"{specs}")
        funcs = reward_utils.load_reward_sources(specs, args.dataset_name, device)

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    ref_model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    generator = build_generator(args, tokenizer, accelerator, model) if online else None

    start_step, elapsed = 0, 0.0
    resume = checkpoint.resolve_resume(args.resume_from, args.output_dir)
    if resume is not None:
        saved = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed = saved["step"], saved["elapsed"]
        accelerator.print(f"resumed from {resume} at step {start_step}")
    if generator is not None:
        generator.sync_weights(model)
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("dar/rewards_mean", "dar/weights_mean", "dar/kl_from_ref", "eval/gold_reward"))
    accelerator.print(f"dar: {mode} mode, {len(rows)} prompts, K = {k}, {num_global} samples per step, "
                      f"{args.max_steps} steps -> {args.output_dir}")

    def evaluate() -> dict:
        return evaluation.heldout_gold_reward(model, tokenizer, args.dataset_name, args.num_eval_prompts,
                                              args.max_new_tokens, accelerator=accelerator)

    if start_step == 0 and (first := evaluate()):
        tracker.log(first, 0, args.max_steps)
    pad_id = tokenizer.pad_token_id
    sums, n_logged = {}, 0
    model.train()
    for step in range(start_step, args.max_steps):
        done = step + 1
        indices = data.batch_indices(len(rows), global_prompts, step, args.seed)
        micro = distributed.micro_batches(indices, args, accelerator)

        # 1. completions (from the current policy), rewards, reference log-probs
        mbs, sample_rows, gaps = [], [], []
        for mb in micro:
            prompt_ids = [rows[i]["prompt_ids"] for i in mb]
            if online:
                gen = generator.generate(model, prompt_ids, n=k)
                c_ids, c_mask = gen.completion_ids.to(device), gen.completion_mask.to(device)
                texts = gen.texts
                prompts = [rows[i]["prompt"] for i in mb for _ in range(k)]
                completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                               for p, t in zip(prompts, texts)]
                cols = {c: [rows[i]["columns"][c] for i in mb for _ in range(k)] for c in rows[mb[0]]["columns"]}
                ids_list = [c[m.bool()].tolist() for c, m in zip(gen.completion_ids, gen.completion_mask)]
                r = combine_rewards(reward_utils.score(funcs, prompts, completions, ids_list, cols), args.reward_weights)
                beh = None
            else:
                comp = [c for i in mb for c in rows[i]["completion_ids"]]
                c_ids, c_mask = data.pad(comp, pad_id, "right")
                c_ids, c_mask = c_ids.to(device), c_mask.to(device)
                texts = [t for i in mb for t in rows[i]["completion_texts"]]
                r = torch.tensor([x for i in mb for x in rows[i]["rewards"]])
                beh = (torch.tensor([x for i in mb for x in rows[i]["behavior_logps"]], device=device)
                       if "behavior_logps" in rows[mb[0]] else None)
            batch = {key: v.to(device) for key, v in make_batch(prompt_ids, c_ids, c_mask, k, pad_id).items()}
            with torch.no_grad():
                s_ref = sequence_logps(ref_model, batch, args.temperature)
                if beh is not None:
                    s_beh = beh
                else:  # the sampling policy's log-probs, recomputed by the trainer
                    T = batch["completion_mask"].shape[1]
                    tok_beh = model_utils.completion_logps(model, batch["input_ids"], batch["attention_mask"], T,
                                                           args.temperature)
                    s_beh = (tok_beh * batch["completion_mask"]).sum(1)
                    if online and gen.sampler_logps is not None:  # sampler (vLLM) vs trainer gap: logged
                        gaps.append(sampler_gap(tok_beh, gen.sampler_logps, batch["completion_mask"]))
            mbs.append({"batch": batch, "rewards": r, "s_ref": s_ref, "s_beh": s_beh})
            if len(sample_rows) < 4:
                sample_rows += [{"prompt": str(rows[i]["prompt"]), "completion": texts[j * k + kk],
                                 "reward": r[j * k + kk].item()} for j, i in enumerate(mb[:2]) for kk in range(k)]

        # 2. advantages over the step's batch (gathered: --adv_norm batch uses the global std) and weights
        local_r = torch.cat([m["rewards"] for m in mbs]).float()
        all_r = distributed.gather_cat(accelerator, local_r.to(device)).cpu().view(-1, k)  # (B_global, K)
        adv = dar_advantages(all_r, args.adv_norm).flatten()
        offset = accelerator.process_index * local_r.numel()
        local_adv = adv[offset:offset + local_r.numel()].to(device)

        # 3. weighted regression, one backward per micro-batch
        st = dict.fromkeys(("loss", "w", "clip", "log_reg", "log_adv", "s_policy", "s_ref", "s_beh", "len"), 0.0)
        w_max, pos = 0.0, 0
        for m in mbs:
            batch, n_mb = m["batch"], m["rewards"].numel()
            w, log_reg, log_adv = dar_weights(local_adv[pos:pos + n_mb], m["s_ref"], m["s_beh"], args.alpha,
                                              args.beta, args.wclip)
            pos += n_mb
            with accelerator.accumulate(model):
                s_pol = sequence_logps(model, batch, args.temperature)
                loss = dar_loss(w, s_pol, num_global)
                accelerator.backward(loss * GA * W)  # undo accelerate's 1/GA and DDP's 1/W: the global mean (note 1)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            st["loss"] += loss.item()
            st["w"] += w.sum().item()
            st["clip"] += (w >= args.wclip * (1 - 1e-6)).float().sum().item()
            st["log_reg"] += log_reg.sum().item()
            st["log_adv"] += log_adv.sum().item()
            st["s_policy"] += s_pol.detach().sum().item()
            st["s_ref"] += m["s_ref"].sum().item()
            st["s_beh"] += m["s_beh"].sum().item()
            st["len"] += batch["completion_mask"].sum().item()
            w_max = max(w_max, w.max().item())
        tot = {key: distributed.gather_sum(accelerator, v) for key, v in st.items()}
        w_max = distributed.gather_cat(accelerator, torch.tensor([w_max], device=device)).max().item()
        if generator is not None:
            generator.sync_weights(model)

        # 4. metrics (means over the steps since the last log)
        q = torch.quantile(all_r.flatten(), torch.tensor([0.25, 0.5, 0.75]))
        metrics = {
            "dar/rewards_mean": all_r.mean().item(), "dar/rewards_std": all_r.std(unbiased=False).item(),
            "dar/rewards_p25": q[0].item(), "dar/rewards_median": q[1].item(), "dar/rewards_p75": q[2].item(),
            "dar/advantages_mean": adv.mean().item(), "dar/advantages_std": adv.std(unbiased=False).item(),
            "dar/weights_mean": tot["w"] / num_global, "dar/weights_max": w_max,
            "dar/weights_clip_fraction": tot["clip"] / num_global,
            "dar/log_reg_weight_mean": tot["log_reg"] / num_global, "dar/log_adv_weight_mean": tot["log_adv"] / num_global,
            "dar/kl_from_ref": (tot["s_policy"] - tot["s_ref"]) / num_global,
            "dar/completion_length_mean": tot["len"] / num_global, "dar/logps_policy": tot["s_policy"] / num_global,
            "dar/logps_ref": tot["s_ref"] / num_global, "dar/logps_behavior": tot["s_beh"] / num_global,
            "dar/loss": tot["loss"], "learning_rate": scheduler.get_last_lr()[0],
        }
        metrics.update(sampler_gap_metrics(gaps))  # this step's sampler vs trainer gap (vLLM only)
        for key, v in metrics.items():
            sums[key] = sums.get(key, 0.0) + v
        n_logged += 1
        if done % args.logging_steps == 0 or done == args.max_steps:
            out = {key: v / n_logged for key, v in sums.items()}
            sums, n_logged = {}, 0
            if done == args.max_steps or (args.eval_steps and done % args.eval_steps == 0):
                out.update(evaluate())
            tracker.log(out, done, args.max_steps)
        if args.log_completions_steps and done % args.log_completions_steps == 0:
            tracker.log_samples(done, sample_rows)
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
