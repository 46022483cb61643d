"""DAR (Direct Advantage Regression): advantage-weighted regression of sequence log-probs towards a regularised
optimal policy, with online rewards.

Paper: "Direct Advantage Regression: Aligning LLMs with Online AI Reward" (arXiv 2504.14177). The KL-regularised RL
objective (reward, KL to the reference with coefficient α, KL to the sampling policy with coefficient β) has the
closed-form optimum π* ∝ π_ref^{α/(α+β)} π_beh^{β/(α+β)} exp(A/(α+β)); regressing π_θ onto it with samples from π_beh
gives a weighted maximum likelihood (the paper's weighted objective, here at sequence level):

  A_{b,k}  = r_{b,k} - mean_k r_{b,k}, then scaled by `--adv_norm` (per-prompt std by default: a per-prompt z-score)
  log w_i  = (α/(α+β)) (S^ref_i - S^beh_i) + A_i/(α+β)          (the regularisation and advantage parts)
  w_i      = min(exp(log w_i), w_clip)                            stop-gradient (from frozen quantities)
  L        = - mean_i w_i S^θ_i                                   mean over the N = B·K (scored) samples of the step
S = sum of completion-token log-probs (EOS kept). S^beh is the dataset's `behavior_logps` when given, otherwise the
sampling policy's log-prob, which online is the current policy itself (samples are drawn from π_θ each step), so
S^beh = sg(S^θ). Weights are not normalised (unlike V-MPO's E-step); the clip bounds the largest.

Implementation notes (numbered so the tests can point at them; "the fork" is the TRL fork that first shipped DAR and
V-MPO, nenuadrian/trl, `DARTrainer`):
 1. The loss is a mean over the whole step's (scored) samples, all processes and all accumulation micro-batches: each
    micro-batch contributes its sum divided by that global count, so multi-process runs give the same update (the
    fork takes the mean of each device's micro-batch).
 2. K = 1 makes every per-prompt-centred advantage 0 (all weights equal the regularisation part): it fails at start-up
    (the fork runs it).
 3. The exponent is clamped at log(w_clip) before exp, so a large advantage never overflows; the weight is the same
    min(exp(·), w_clip) as the fork's.
 4. The completion mask comes from generation or from token counts, never from pad_token_id (EOS kept when pad == eos;
    the fork masks `ids != pad`, which drops the EOS token when pad == eos).
 5. A sample no reward source scores (every source returned None; offline: a null reward) is "not scored": NaN
    reward, left out of its prompt's mean and of every std (NaN-aware), weight 0, and not counted in the loss's mean
    (the normaliser is the number of scored samples of the step). The fork has no such case (a reward is required).
 6. The `batch` scale divides the per-prompt-centred advantages by their std over the step (as the fork); `per_prompt`
    divides by each prompt's std of them (the fork's default, a per-prompt z-score).
 7. `--per_device_train_batch_size` counts completions (TRL's meaning), K = `--k` per prompt, so a micro-batch holds
    per_device_train_batch_size / K prompts (it must divide); the fork's counts prompts. Offline, K is the number of
    completions per row of the data.
 8. Non-finite safety: a reward source returning NaN or inf stops the run at that step, before its update (naming the
    source and a sample); a non-finite gradient norm skips the optimizer step and is counted in `train/skipped_steps`;
    non-finite weights are never saved.

Toy defaults (the benchmark's): toy-sft policy on toy:add, 64 completions (32 prompts x K = 2) per step, lr 1e-4,
150 steps, α = β = 0.1 (the fork's), w_clip = 50 (the fork's).

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
from collections import defaultdict
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro

from common import checkpoint, data, distributed, evaluation, model as model_utils, rewards as reward_utils, rollout, tracking
from common import peft_utils
from common.generation import build_generator

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
    overwrite_output_dir: bool = False
    """start a new run in an output_dir that holds another run's files (they are deleted first)"""
    eval_dataset_name: str | None = None
    """held-out prompts (online mode): a file, a save_to_disk folder or a hub name (split eval_split); toy datasets
    use the toy task's test split"""
    eval_split: str = "test"
    """split of eval_dataset_name (hub datasets) or of the toy task used for evaluation"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for evaluation (deterministic; never overlaps training)"""
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
    per_device_train_batch_size: int = 64
    """completions per micro-batch per process (TRL's meaning): per_device_train_batch_size / K prompts (note 7)"""
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
    """one weight per reward source (default all 1); the reward is the weighted sum over the sources that scored the
    sample, 'not scored' (note 5) when none did"""
    # --- sampling (same names in every online script)
    k: int = 2
    """K, completions sampled per prompt (TRL's num_generations, the fork's dar_k); offline it is inferred from the
    data"""
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
    """scale of the per-prompt-centred advantage: 'per_prompt' std (z-score), 'batch' std (over the step) or 'none'"""
    # --- evaluation and samples
    eval_steps: int = 25
    """held-out reward (eval/reward; eval/gold_reward on the toy tasks) every this many steps, at step 0 and at the
    end (0: start and end only)"""
    num_eval_prompts: int = 256
    """held-out prompts per evaluation (greedy decoding)"""
    log_completions_steps: int = 25
    """log a few sample completions every this many steps (0: never)"""
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
# Shapes: B prompts, K completions per prompt, N = B·K samples (row b*K + k), T completion tokens.
def combine_rewards(per_source: torch.Tensor, weights: torch.Tensor | list[float]) -> torch.Tensor:
    """(N, F) rewards with NaN where a source returned None, (F,) weights -> (N,) weighted sum over the sources that
    scored the sample; NaN (not scored, note 5) when none did."""
    weights = torch.as_tensor(weights, dtype=per_source.dtype)
    assert per_source.dim() == 2 and weights.shape == (per_source.shape[1],)
    scored = ~torch.isnan(per_source)
    total = torch.where(scored, per_source * weights, torch.zeros_like(per_source)).sum(1)
    return torch.where(scored.any(1), total, torch.full_like(total, float("nan")))


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Biased std over the non-NaN entries (NaN where there are none)."""
    mean = torch.nanmean(x, dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim, keepdim=keepdim) if dim is not None else torch.nanmean((x - mean) ** 2)
    return var.sqrt()


def dar_advantages(rewards: torch.Tensor, norm: str, eps: float = 1e-6) -> torch.Tensor:
    """A = r - mean_k r, divided by the per-prompt std of A, its std over the batch, or 1 (note 6). rewards (B, K) ->
    (B, K); NaN rewards (not scored) are left out of the means and stds and stay NaN (note 5)."""
    assert rewards.dim() == 2
    adv = rewards - torch.nanmean(rewards, 1, keepdim=True)
    if norm == "per_prompt":
        adv = adv / nanstd(adv, 1, keepdim=True).clamp(min=eps)
    elif norm == "batch":
        adv = adv / nanstd(adv).clamp(min=eps)
    elif norm != "none":
        raise ValueError(f"unknown adv_norm '{norm}'")
    return adv


def dar_weights(adv: torch.Tensor, s_ref: torch.Tensor, s_beh: torch.Tensor, alpha: float, beta: float,
                wclip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, log regularisation part, log advantage part), all (N,) and detached:
    w = min(exp((α/(α+β))(S^ref - S^beh) + A/(α+β)), w_clip); w = 0 where A is NaN (not scored, note 5)."""
    assert adv.shape == s_ref.shape == s_beh.shape and adv.dim() == 1
    log_reg = (alpha / (alpha + beta)) * (s_ref - s_beh).detach()
    log_adv = adv.detach() / (alpha + beta)
    w = torch.exp((log_reg + log_adv).clamp(max=math.log(wclip))).clamp(max=wclip)  # exponent capped: no overflow
    return torch.nan_to_num(w, nan=0.0), log_reg, log_adv


def dar_loss(weights: torch.Tensor, s_policy: torch.Tensor, num_global: int) -> torch.Tensor:
    """This micro-batch's share of -mean_i w_i S^θ_i over the step's `num_global` (scored) samples (notes 1, 5)."""
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


def check_batch(args: Args, k: int, online: bool):
    """per_device_train_batch_size counts completions: it must hold whole prompts of K completions (note 7)."""
    b = args.per_device_train_batch_size
    if b % k:
        what = f"--k {k} (completions per prompt)" if online else f"K = {k}, the completions per row of the data"
        raise ValueError(f"--per_device_train_batch_size {b} counts completions and must be a multiple of {what}: "
                         f"use e.g. --per_device_train_batch_size {k * max(1, round(b / k))}"
                         + (" or change --k" if online else ""))


def load_rows(args: Args, tokenizer):
    """Rows of the training data and the held-out rows: (mode, K, rows, eval_ds). Online rows: {prompt, prompt_ids,
    columns}; offline rows also carry completion token lists (ending with EOS), rewards (None -> NaN, not scored:
    note 5) and optional behaviour log-probs. eval_ds: held-out prompts (online; the toy task's test split by default),
    None offline (no reward source to score them: offline toy runs report eval/gold_reward only)."""
    kinds = {"auto": "prompt|preference|prompt_completion_reward", "online": "prompt", "preference": "preference",
             "prompt_completion_reward": "prompt_completion_reward"}[args.data_mode]
    ds, eval_ds = data.load_splits(args, kinds, "dar.py", toy_n=args.num_eval_prompts)
    mode = {"prompt": "online"}.get(data.detect_type(ds.column_names), data.detect_type(ds.column_names))
    if mode != "online" and (args.eval_dataset_name or args.eval_fraction):
        raise ValueError(f"--data_mode {mode} trains on logged completions and has no reward source to score "
                         "held-out completions: drop --eval_dataset_name / --eval_fraction, or train online")
    if mode != "online":
        ds, eval_ds = data.convert(ds, "prompt_completion_reward", script="dar.py"), None
    prompt_ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in ds["prompt"]])
    extra = [c for c in ds.column_names if c not in ("prompt", "completions", "rewards", "behavior_logps")]
    rows = [{"prompt": p, "prompt_ids": ids[-args.max_prompt_length:], "columns": {c: ds[c][i] for c in extra}}
            for i, (p, ids) in enumerate(zip(ds["prompt"], prompt_ids))]
    if mode == "online":
        return mode, args.k, rows, eval_ds
    ks = {len(c) for c in ds["completions"]}
    if len(ks) != 1 or {len(r) for r in ds["rewards"]} != ks:
        raise data.DatasetFormatError(f"{args.dataset_name}: every row needs the same number K of completions and "
                                      f"rewards; found completion counts {sorted(ks)}")
    k = ks.pop()
    for i, row in enumerate(rows):
        comps = ds["completions"][i]
        texts = [data.completion_text(row["prompt"], c, tokenizer) for c in comps]
        row["completion_ids"] = [c[:args.max_new_tokens] for c in data.tokenize(tokenizer, texts)]
        row["completion_texts"] = [c if isinstance(c, str) else c[-1]["content"] for c in comps]
        row["rewards"] = [float("nan") if r is None else float(r) for r in ds["rewards"][i]]  # null, NaN: not scored
        if any(math.isinf(r) for r in row["rewards"]):
            raise data.DatasetFormatError(f"{args.dataset_name}: column 'rewards' of row {i} holds an infinite "
                                          f"value {ds['rewards'][i]}; use finite numbers (null = not scored)")
        if "behavior_logps" in ds.column_names:
            row["behavior_logps"] = [float("nan") if b is None else float(b) for b in ds["behavior_logps"][i]]
            if not all(math.isfinite(b) for b in row["behavior_logps"]):
                raise data.DatasetFormatError(f"{args.dataset_name}: column 'behavior_logps' of row {i} holds "
                                              f"{ds['behavior_logps'][i]}; every completion needs a finite log-prob")
    return mode, k, rows, None


def sequence_logps(model, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (N,) summed over completion tokens, per-token log-probs (N, T))."""
    T = batch["completion_mask"].shape[1]
    logps = model_utils.completion_logps(model, batch["input_ids"], batch["attention_mask"], T, temperature)
    return (logps * batch["completion_mask"]).sum(1), logps


# ----------------------------------------------------------------------------- main
def main(args: Args):
    import copy

    # ---- set-up (plumbing a reader may skip: flags, data, reward sources, models, resume, tracking)
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    check_args(args)
    accelerator = distributed.make_accelerator(args)
    device, W, GA, rank = accelerator.device, accelerator.num_processes, args.gradient_accumulation_steps, \
        accelerator.process_index
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    mode, k, rows, eval_ds = load_rows(args, tokenizer)
    online = mode == "online"
    check_degenerate(k)
    check_batch(args, k, online)
    P = args.per_device_train_batch_size // k  # prompts per micro-batch (note 7)
    num_global = distributed.global_batch_size(args, accelerator)  # N: completions per optimizer step, all processes
    data.check_batch_fits(len(rows), num_global // k, ["--per_device_train_batch_size / K (prompts)",
                                                       "--gradient_accumulation_steps"])
    sources = reward_utils.RewardSources(reward_utils.default_specs(args.reward_funcs, args.reward_model_name_or_path,
                                                                    args.dataset_name),
                                         args.reward_weights, args.dataset_name, device) if online else None
    peft_utils.check_args(args)  # LoRA flags and module names, before anything is loaded or written
    resume = checkpoint.prepare_output_dir(args)  # one run per folder: refuses to mix with another run's files

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = peft_utils.maybe_wrap(model, args)  # --use_peft: LoRA adapters, the rest frozen
    ref_model = (peft_utils.reference_model(model) if args.use_peft  # the policy with its adapters off: no copy
                 else copy.deepcopy(model).to(device).eval().requires_grad_(False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    generator = build_generator(args, tokenizer, accelerator, model) if online else None

    start_step, elapsed, skipped = 0, 0.0, 0
    if resume is not None:
        saved = checkpoint.load_checkpoint(accelerator, resume)
        start_step, elapsed, skipped = saved["step"], saved["elapsed"], saved["skipped_steps"]
        accelerator.print(f"resumed from {resume} at step {start_step}")
    if generator is not None:
        generator.sync_weights(model)
    tracker = tracking.Tracker(args, accelerator.is_main_process, start_step, elapsed,
                               show=("dar/rewards_mean", "dar/weights_mean", "dar/kl_from_ref", "eval/reward"))
    accelerator.print(f"dar: {mode} mode, {len(rows)} prompts, K = {k}, {num_global} samples per step, "
                      f"{args.max_steps} steps -> {args.output_dir}")

    def evaluate() -> dict:  # greedy completions of held-out prompts, scored by the run's reward sources
        if online:
            return evaluation.heldout_reward(model, tokenizer, eval_ds, sources, args.dataset_name,
                                             args.num_eval_prompts, args.max_new_tokens, accelerator=accelerator)
        return evaluation.heldout_gold_reward(model, tokenizer, args.dataset_name, args.num_eval_prompts,
                                              args.max_new_tokens, accelerator=accelerator)

    if start_step == 0 and (first := evaluate()):
        tracker.log(first, 0, args.max_steps)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    window, first_rpf = defaultdict(list), []  # per-step metrics since the last log; rewards of the first window
    model.train()
    for step in range(start_step, args.max_steps):
        done = step + 1
        indices = data.batch_indices(len(rows), num_global // k, step, args.seed)
        micro = [indices[(m * W + rank) * P:(m * W + rank + 1) * P] for m in range(GA)]  # this process's prompts

        # ---- 1. generate: K completions per prompt from the current policy (online) or the data's; frozen log-probs
        mbs = []
        for mb in micro:
            if online:
                gen = generator.generate(model, [rows[i]["prompt_ids"] for i in mb], n=k)
                c_ids = rollout.completion_id_lists(gen.completion_ids, gen.completion_mask)  # EOS kept (note 4)
                texts, terminated, r, s_beh = gen.texts, gen.terminated, None, None
            else:
                gen, c_ids = None, [c for i in mb for c in rows[i]["completion_ids"]]
                texts = [t for i in mb for t in rows[i]["completion_texts"]]
                terminated = torch.tensor([len(c) > 0 and c[-1] == eos_id for c in c_ids])
                r = torch.tensor([x for i in mb for x in rows[i]["rewards"]])
                s_beh = (torch.tensor([x for i in mb for x in rows[i]["behavior_logps"]], device=device)
                         if "behavior_logps" in rows[mb[0]] else None)
            batch = data.batch_prompt_completion([rows[i]["prompt_ids"] for i in mb for _ in range(k)], c_ids, pad_id)
            batch = {key: v.to(device) for key, v in batch.items()}  # completion mask from token counts (note 4)
            tok_beh = None
            with torch.no_grad():
                s_ref, _ = sequence_logps(ref_model, batch, args.temperature)
                if s_beh is None:  # the sampling policy's log-probs (online: the current policy), by the trainer
                    s_beh, tok_beh = sequence_logps(model, batch, args.temperature)
            mbs.append({"mb": mb, "batch": batch, "ids": c_ids, "texts": texts, "terminated": terminated,
                        "rewards": r, "s_ref": s_ref, "s_beh": s_beh, "tok_beh": tok_beh, "gen": gen})

        # ---- 2. score: (N_local, F) rewards per source, NaN = not scored (note 5); a NaN or inf from a source
        # stops the run here, before any update. Gathered over processes: (B_global, K)
        if online:
            for m in mbs:
                prompts = [rows[i]["prompt"] for i in m["mb"] for _ in range(k)]
                cols = {c: [rows[i]["columns"][c] for i in m["mb"] for _ in range(k)] for c in rows[0]["columns"]}
                m["rpf"] = sources(prompts, rollout.as_completions(prompts, m["texts"]), m["ids"], cols)
                m["rewards"] = combine_rewards(m["rpf"], sources.weights)
            rpf_all = distributed.gather_cat(accelerator, torch.cat([m["rpf"] for m in mbs]).to(device)).cpu()
        local_r = torch.cat([m["rewards"] for m in mbs]).float()
        all_r = distributed.gather_cat(accelerator, local_r.to(device)).cpu().view(-1, k)

        # ---- 3. targets: advantages over the step's batch (gathered: --adv_norm batch uses the global std)
        adv = dar_advantages(all_r, args.adv_norm).flatten()  # (N,), NaN where not scored
        num_scored = max(int((~torch.isnan(adv)).sum()), 1)  # the loss's mean runs over these (note 5)
        local_adv = adv[rank * local_r.numel():(rank + 1) * local_r.numel()].to(device)

        # ---- 4. update: weighted regression, one backward per micro-batch
        st, pos, w_max = defaultdict(float), 0, 0.0
        for m in mbs:
            batch, n_mb = m["batch"], len(m["ids"])
            w, log_reg, log_adv = dar_weights(local_adv[pos:pos + n_mb], m["s_ref"], m["s_beh"], args.alpha,
                                              args.beta, args.wclip)
            pos += n_mb
            with accelerator.accumulate(model):
                s_pol, _ = sequence_logps(model, batch, args.temperature)
                loss = dar_loss(w, s_pol, num_scored)
                accelerator.backward(loss * GA * W)  # undo accelerate's 1/GA and DDP's 1/W: the global mean (note 1)
                if accelerator.sync_gradients:  # a non-finite gradient norm skips the step (note 8)
                    grad_norm, stepped = distributed.optimizer_step(accelerator, model, optimizer, scheduler,
                                                                    args.max_grad_norm)
                    skipped += not stepped
            scored = ~torch.isnan(log_adv)
            for key, v in (("loss", loss.detach()), ("w", w), ("clip", (w >= args.wclip * (1 - 1e-6)).float()),
                           ("log_reg", log_reg), ("log_adv", log_adv[scored]), ("s_policy", s_pol.detach()),
                           ("s_ref", m["s_ref"]), ("s_beh", m["s_beh"])):
                st[key] += v.sum().item()
            w_max = max(w_max, w.max().item())
        tot = {key: distributed.gather_sum(accelerator, v) for key, v in st.items()}
        w_max = distributed.gather_cat(accelerator, torch.tensor([w_max], device=device)).max().item()
        if generator is not None:
            generator.sync_weights(model)

        # ---- 5. log: means over the steps since the last log (NaN-aware)
        lens = torch.tensor([len(c) for m in mbs for c in m["ids"]])
        window_add(window, rollout.completion_metrics(accelerator, torch.arange(int(lens.max()))[None] < lens[:, None],
                                                      torch.cat([m["terminated"] for m in mbs])))
        if any(m["gen"] is not None and m["gen"].sampler_logps is not None for m in mbs):  # vLLM: gap to the trainer
            window_add(window, rollout.sampler_gap_metrics(accelerator, [m["tok_beh"] for m in mbs],
                                                           [m["gen"].sampler_logps for m in mbs],
                                                           [m["batch"]["completion_mask"] for m in mbs]))
        if online:
            window_add(window, sources.metrics(rpf_all))
            first_rpf = first_rpf + [rpf_all] if first_rpf is not None else None
        flat_r = all_r.flatten()
        q = (torch.nanquantile(flat_r, torch.tensor([0.25, 0.5, 0.75])) if (~torch.isnan(flat_r)).any()
             else torch.full((3,), float("nan")))
        window_add(window, {
            "dar/rewards_mean": torch.nanmean(all_r).item(), "dar/rewards_std": nanstd(all_r).item(),
            "dar/rewards_p25": q[0].item(), "dar/rewards_median": q[1].item(), "dar/rewards_p75": q[2].item(),
            "dar/advantages_mean": torch.nanmean(adv).item(), "dar/advantages_std": nanstd(adv).item(),
            "dar/scored_fraction": (~torch.isnan(adv)).float().mean().item(),
            "dar/weights_mean": tot["w"] / num_scored, "dar/weights_max": w_max,
            "dar/weights_clip_fraction": tot["clip"] / num_scored,
            "dar/log_reg_weight_mean": tot["log_reg"] / num_global, "dar/log_adv_weight_mean": tot["log_adv"] / num_scored,
            "dar/kl_from_ref": (tot["s_policy"] - tot["s_ref"]) / num_global,
            "dar/logps_policy": tot["s_policy"] / num_global,
            "dar/logps_ref": tot["s_ref"] / num_global, "dar/logps_behavior": tot["s_beh"] / num_global,
            "dar/loss": tot["loss"], "grad_norm": grad_norm,
        })
        if done % args.logging_steps == 0 or done == args.max_steps:
            if online and first_rpf is not None:  # one loud warning when no reward varied at all
                sources.check_varies(first_rpf, accelerator.is_main_process)
                first_rpf = None
            out = {key: sum(v) / len(v) for key, v in window.items()}
            out.update({"train/skipped_steps": skipped, "learning_rate": scheduler.get_last_lr()[0]})
            window = defaultdict(list)
            if done == args.max_steps or (args.eval_steps and done % args.eval_steps == 0):
                out.update(evaluate())
            tracker.log(out, done, args.max_steps)
        if args.log_completions_steps and done % args.log_completions_steps == 0:
            m = mbs[0]
            tracker.log_samples(done, [{"prompt": str(rows[m["mb"][j // k]]["prompt"]), "completion": m["texts"][j],
                                        "reward": m["rewards"][j].item()} for j in range(min(4, len(m["texts"])))])
        if args.save_steps and done % args.save_steps == 0 and done < args.max_steps:
            checkpoint.save_checkpoint(accelerator, args.output_dir, done, model, tokenizer, args,
                                       {"elapsed": tracker.elapsed(), "skipped_steps": skipped}, args.save_total_limit)

    checkpoint.save_model(accelerator, model, tokenizer, args.output_dir, args.max_steps)
    if args.save_steps:
        checkpoint.save_checkpoint(accelerator, args.output_dir, args.max_steps, model, tokenizer, args,
                                   {"elapsed": tracker.elapsed(), "skipped_steps": skipped}, args.save_total_limit)
    tracker.close()
    accelerator.print(f"saved the final model to {args.output_dir}")
    accelerator.end_training()


def window_add(window: dict, metrics: dict):
    """Add one step's metrics to the logging window; NaN values (undefined this step) are left out."""
    for key, v in metrics.items():
        if not math.isnan(v):
            window[key].append(v)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
