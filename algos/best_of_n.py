"""Best-of-N sampling: draw N completions per prompt, keep the one the reward ranks highest.

Lineage: best-of-n (rejection) sampling against a reward model, as in "WebGPT" (Nakano et al., arXiv 2112.09332)
and "Scaling Laws for Reward Model Overoptimization" (Gao et al., arXiv 2210.10760, Sec. 2: best-of-n as the
no-training baseline, its KL bound log n - (n-1)/n); the bound's analysis: "Theoretical guarantees on the best-of-n
alignment policy" (Beirami et al., arXiv 2401.01879). The same sample-and-rank step is the data generator of
rejection-sampling fine-tuning (RAFT, arXiv 2304.06767) and of the preference pairs of iterative DPO.

For a prompt x, samples y_1..y_N ~ π(.|x) and rewards r_j = Σ_f w_f r_f(x, y_j) over the sources that scored y_j:
    best(x)  = y_{j*},  j* = the first index j with r_j = max_k r_k        (ties: first index of the max)
    worst(x) = y_{j_},  j_ = the first index j with r_j = min_k r_k        (ties: first index of the min)

Outputs in output_dir (jsonl, columns as common/data.py detects them; extra prompt columns are kept):
    best.jsonl        prompt, completion               -> algos/sft.py --dataset_name runs/x/best.jsonl
    preference.jsonl  prompt, chosen, rejected         -> algos/dpo.py, algos/vmpo.py --data_mode preference
    all.jsonl         prompt, completions[N], rewards[N]  -> algos/vmpo.py --data_mode prompt_completion_reward
    eval_samples.jsonl, results.json, metrics.jsonl   the held-out best-of-n curve (below)

Held-out curve (one pass of n_max = max(--n_values) samples per held-out prompt): for each n, the expected reward
of best-of-n, where the n samples are a uniformly random n-subset of the n_max drawn. Under the tie rule the samples
have a total order (higher reward first, then lower index), so sample j is chosen from a random n-subset exactly
when it is in the subset and the other n-1 members rank below it:
    P(j chosen) = C(rank_j, n-1) / C(n_max, n),   rank_j = number of samples ranking below j
    E[gold of best-of-n] = Σ_j P(j chosen) · gold_j
(the pass@k estimator of Chen et al., arXiv 2107.03374, generalised from "any correct" to "the reward's choice";
unbiased for every n <= n_max from one set of samples). n = 1 is one plain sample; `greedy` is greedy decoding.

Implementation details (numbered so the tests and the README can point at them):
 1. Ties: the first index of the max (the generation order of a prompt's samples); the worst sample is the first
    index of the min. A sample no source scores (every source returned None) is NaN: it is never chosen as best or
    worst; a prompt with no scored sample is left out of best.jsonl and preference.jsonl (kept in all.jsonl with
    null rewards). In the held-out curve an unscored sample ranks below every scored one.
 2. preference.jsonl leaves out prompts whose best and worst rewards are equal (no preference; counted in
    results.json as preference_ties).
 3. Sampling stream: seeded with --seed (+ the process index) at the start of each phase (training prompts, then
    held-out prompts); prompts go to generate in chunks of --generation_batch_size, N samples each (row i*N + j =
    sample j of prompt i). With --n 1 the chosen completion is exactly the plain sample of that seed.
 4. Processes: each takes a contiguous share of the prompts; the results are gathered in prompt order and the main
    process writes the files. Reward sources score on the process that sampled.
 5. Completions are stored as decoded text (special tokens removed). A completion that hit --max_new_tokens without
    EOS is stored as it is; sft.py and dpo.py append EOS when they tokenise it.
 6. The gold reward (held-out curve): --gold_reward_funcs, default the toy task's exact match on toy datasets (the
    selection sources default to that same gold reward on toy data, which makes best-of-n = pass@n; pass
    --reward_model_name_or_path toy-rm to select with a learned reward model and judge with the gold one).
    best_of_n/oracle_gold_reward is the expected best gold among n (pass@n on 0/1 rewards): the ceiling of the
    selector.

Run:
    python algos/best_of_n.py                                  # toy-sft on toy:add: datasets + the n = 1..16 curve
    python algos/best_of_n.py --reward_model_name_or_path toy-rm   # select with the toy reward model, judge with gold
    python algos/best_of_n.py --num_prompts 0 --n_values 1 4 16    # only the held-out curve
    python algos/sft.py --model_name_or_path toy-sft --dataset_name runs/<run>/best.jsonl --learning_rate 1e-4
    python algos/dpo.py --dataset_name runs/<run>/preference.jsonl
    python algos/vmpo.py --dataset_name runs/<run>/all.jsonl --data_mode prompt_completion_reward
    python algos/best_of_n.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name prompts.jsonl \
        --reward_model_name_or_path ./my-rm --n 8 --max_new_tokens 256 --eval_fraction 0.05 --use_vllm True
    bash benchmarks/best_of_n.sh                               # the curve over 3 seeds, gold and toy-rm selection
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro
from accelerate.utils import gather_object, set_seed

from common import checkpoint, data, distributed, model as model_utils, rollout, tracking
from common import rewards as reward_utils
from common.generation import build_generator


@dataclass
class Args:
    # --- common block (identical names in every script)
    exp_name: str = "best_of_n"
    """name of this experiment (used in the default run name)"""
    seed: int = 1
    """random seed (the sampling stream, detail 3)"""
    run_name: str | None = None
    """run name; default '{exp_name}__{dataset}__{seed}__{unix time}'"""
    output_dir: str | None = None
    """where the datasets, results.json and metrics go; default runs/{run_name}"""
    track: bool = False
    """mirror metrics to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "cleanalign"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team)"""
    model_name_or_path: str = "toy-sft"
    """the policy to sample from: 'toy-sft' (the toy SFT policy), a run folder, a local model folder or a hub name"""
    dataset_name: str = "toy:add"
    """prompts: 'toy:<add|reverse>[:conversational]', a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a
    hub name (any type with a prompt column; extra columns are passed to the reward functions and kept)"""
    dataset_split: str = "train"
    """split whose prompts make the output datasets"""
    overwrite_output_dir: bool = False
    """start a new run in an output_dir that holds another run's files (they are deleted first)"""
    eval_dataset_name: str | None = None
    """held-out prompts for the curve: a file, a save_to_disk folder or a hub name (split eval_split); toy datasets
    use the toy task's test split"""
    eval_split: str = "test"
    """split of eval_dataset_name (hub datasets) or of the toy task used for the curve"""
    eval_fraction: float = 0.0
    """hold out this fraction of the training rows for the curve (deterministic; never overlaps the datasets)"""
    mixed_precision: str | None = None
    """'no', 'fp16' or 'bf16' (default: whatever `accelerate launch` configured)"""
    # --- best-of-N
    n: int = 16
    """N, completions sampled per training prompt for the output datasets"""
    num_prompts: int | None = 1024
    """training prompts to sample (the first rows of the split); None: all; 0: no datasets, only the curve"""
    n_values: list[int] | None = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """the held-out curve's n values (max(n_values) samples per held-out prompt); None: no curve"""
    num_eval_prompts: int = 256
    """held-out prompts for the curve (the first rows of the eval set)"""
    generation_batch_size: int = 128
    """prompts per generate call (each with N samples)"""
    # --- sampling (common/generation.py)
    temperature: float = 1.0
    """sampling temperature (> 0: best-of-N needs distinct samples)"""
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
    """selection reward: 'add'/'reverse' (toy gold rewards), 'path/file.py:fn', 'module:fn', 'model:<name or dir>';
    default: the toy task's gold reward (none when --reward_model_name_or_path is given)"""
    reward_model_name_or_path: str | None = None
    """a reward model added to reward_funcs (e.g. 'toy-rm'); same as 'model:<name>' there"""
    reward_weights: list[float] | None = None
    """one weight per selection source (reward_funcs, then the reward model); default all 1"""
    gold_reward_funcs: list[str] | None = None
    """sources that judge the chosen samples on the held-out curve (summed); default: the toy task's exact match on
    toy datasets, none elsewhere"""
    num_completions_to_log: int = 8
    """prompts whose best and worst samples go to samples.jsonl"""


# ----------------------------------------------------------------------------- the math
# Shapes: P prompts, N samples per prompt, F reward sources. NaN = not scored.
def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(..., F) rewards with NaN where a source returned None, (F,) weights -> (...) weighted sum over the sources
    that scored the sample; NaN when none did."""
    assert rewards_per_func.shape[-1] == weights.shape[0]
    scored = ~torch.isnan(rewards_per_func)
    total = torch.where(scored, rewards_per_func * weights, torch.zeros_like(rewards_per_func)).sum(-1)
    return torch.where(scored.any(-1), total, torch.full_like(total, float("nan")))


def best_index(rewards: torch.Tensor) -> torch.Tensor:
    """(P, N) rewards -> (P,) the first index of the max over the scored samples; -1 where none is scored."""
    assert rewards.dim() == 2
    scored = ~torch.isnan(rewards)
    r = torch.where(scored, rewards, torch.full_like(rewards, -math.inf))
    idx = torch.arange(r.shape[1]).expand_as(r)
    at_max = (r == r.amax(1, keepdim=True)) & scored
    first = torch.where(at_max, idx, torch.full_like(idx, r.shape[1])).amin(1)
    return torch.where(scored.any(1), first, torch.full_like(first, -1))


def worst_index(rewards: torch.Tensor) -> torch.Tensor:
    """(P, N) rewards -> (P,) the first index of the min over the scored samples; -1 where none is scored."""
    return best_index(torch.where(torch.isnan(rewards), rewards, -rewards))


def selection_probs(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """(P, N) rewards -> (P, N): the probability that best-of-n over a uniformly random n-subset of the N samples
    picks sample j, under the tie rule (detail 1; unscored samples rank lowest). Rows sum to 1."""
    assert rewards.dim() == 2 and 1 <= n <= rewards.shape[1]
    N = rewards.shape[1]
    r = torch.where(torch.isnan(rewards), torch.full_like(rewards, -math.inf), rewards).double()
    idx = torch.arange(N)
    # below[p, j, k]: sample k ranks below sample j (lower reward, or equal reward and a later index)
    below = (r[:, None, :] < r[:, :, None]) | ((r[:, None, :] == r[:, :, None]) & (idx[None, :] > idx[:, None]))
    rank = below.sum(-1)  # (P, N), 0..N-1, a permutation per row
    ways = torch.tensor([math.comb(k, n - 1) for k in range(N)], dtype=torch.float64)
    return ways[rank] / math.comb(N, n)


def expected_value(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(P, N) selection probabilities and values -> (P,) expected value of the chosen sample, over the choices
    whose value is known (NaN values left out and the rest renormalised); NaN where no chosen value is known."""
    known = ~torch.isnan(values)
    mass = torch.where(known, probs, torch.zeros_like(probs)).sum(1)
    total = torch.where(known, probs * values.double(), torch.zeros_like(probs)).sum(1)
    return torch.where(mass > 0, total / mass.clamp(min=1e-300), torch.full_like(total, float("nan")))


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n || π) <= log n - (n - 1) / n (2210.10760 Sec. 2; tight for continuous rewards, 2401.01879)."""
    return math.log(n) - (n - 1) / n


def nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return x.mean().item() if x.numel() else float("nan")


# ----------------------------------------------------------------------------- checks and sampling
def check_args(args: Args):
    """Every flag error, before any data or model is loaded."""
    if args.num_prompts is not None and args.num_prompts < 0:
        raise ValueError(f"--num_prompts {args.num_prompts}: give a count >= 0 (0: no datasets), or None for all")
    if args.num_prompts != 0 and args.n < 1:
        raise ValueError(f"--n {args.n}: sample at least 1 completion per prompt (or --num_prompts 0: no datasets)")
    if args.n_values is not None:
        bad = [v for v in args.n_values if v < 1]
        if bad or not args.n_values:
            raise ValueError(f"--n_values {args.n_values}: every n must be >= 1 (e.g. --n_values 1 2 4 8 16), or "
                             "--n_values None for no curve")
        if args.num_eval_prompts < 1:
            raise ValueError(f"--num_eval_prompts {args.num_eval_prompts}: the curve needs at least 1 prompt")
    if args.num_prompts == 0 and args.n_values is None:
        raise ValueError("--num_prompts 0 and --n_values None: nothing to do; give training prompts for the datasets "
                         "and/or n values for the held-out curve")
    if not args.temperature > 0:
        raise ValueError(f"--temperature {args.temperature}: best-of-N needs sampling (temperature > 0); greedy "
                         "decoding gives N copies of one completion (the curve reports greedy anyway)")
    if not 0 < args.top_p <= 1 or args.top_k < 0 or args.max_new_tokens < 1 or args.generation_batch_size < 1:
        raise ValueError("--top_p must be in (0, 1], --top_k >= 0, --max_new_tokens >= 1 and "
                         "--generation_batch_size >= 1")
    if args.use_vllm and args.vllm_mode not in ("colocate", "server"):
        raise ValueError(f"--vllm_mode {args.vllm_mode!r}: choose 'colocate' or 'server'")


def gold_specs(args: Args) -> list[str]:
    """Detail 6: the held-out curve's gold reward sources."""
    if args.gold_reward_funcs:
        return list(args.gold_reward_funcs)
    task = data.toy_task(args.dataset_name)
    return [task] if task else []


def sample_and_score(generator, model, accelerator, rows: dict, n: int, batch_size: int, sources, gold=None,
                     greedy: bool = False, label: str = "") -> list[dict]:
    """n completions for each prompt of `rows` (prompt, prompt_ids, columns: lists; this process samples a
    contiguous share, detail 4), scored by `sources` (and `gold`), gathered in prompt order on every process. One
    dict per prompt: row, texts[n], terminated[n], rewards[n] (weighted sum, NaN = not scored), rpf[n][F], gold[n]
    (or None), tokens."""
    W, rank = accelerator.num_processes, accelerator.process_index
    per = -(-len(rows["prompt"]) // W)
    local = list(range(len(rows["prompt"])))[rank * per:(rank + 1) * per]
    out, t0, done = [], time.time(), 0
    for s in range(0, len(local), batch_size):
        chunk = local[s:s + batch_size]
        gen = generator.generate(model, [rows["prompt_ids"][i] for i in chunk], n=n, greedy=greedy)
        ids = rollout.completion_id_lists(gen.completion_ids, gen.completion_mask)
        prompts, cols = rollout.repeat_rows(chunk, rows["prompt"], rows["columns"], n)
        completions = rollout.as_completions(prompts, gen.texts)
        rpf = sources(prompts, completions, ids, cols)  # (len(chunk) * n, F)
        r = combine_rewards(rpf, sources.weights.to(rpf.dtype))
        g = combine_rewards(gold(prompts, completions, ids, cols), gold.weights) if gold is not None else None
        for a, row in enumerate(chunk):
            sl = slice(a * n, (a + 1) * n)
            out.append({"row": row, "texts": gen.texts[sl], "terminated": gen.terminated[sl].tolist(),
                        "rewards": r[sl].tolist(), "rpf": rpf[sl].tolist(),
                        "gold": g[sl].tolist() if g is not None else None,
                        "tokens": int(gen.completion_mask[sl].sum())})
        done += len(chunk)
        if accelerator.is_main_process:
            print(f"{label}: {min(done * W, len(rows['prompt']))}/{len(rows['prompt'])} prompts x {n} "
                  f"({time.time() - t0:.1f}s)", flush=True)
    return gather_object(out) if W > 1 else out


def as_completion(prompt, text: str):
    """A completion in the prompt's format: a string, or one assistant message for conversational prompts."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def write_jsonl(path: str, rows: list[dict]):
    """One JSON object per line, written to a temporary file and moved into place."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def nan_to_none(value):
    """NaN (not scored) -> None (JSON null), in nested lists and dicts."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    return value


def build_datasets(rows: dict, results: list[dict]) -> tuple[list[dict], list[dict], list[dict], dict]:
    """best / preference / all rows from the sampled training prompts (details 1, 2), and their counts."""
    rewards = torch.tensor([res["rewards"] for res in results], dtype=torch.float64).view(len(results), -1)
    best, worst = best_index(rewards), worst_index(rewards)
    best_rows, pref_rows, all_rows, ties = [], [], [], 0
    for p, res in enumerate(results):
        prompt = rows["prompt"][res["row"]]
        cols = {c: v[res["row"]] for c, v in rows["columns"].items()}
        all_rows.append({"prompt": prompt, "completions": [as_completion(prompt, t) for t in res["texts"]],
                         "rewards": nan_to_none(res["rewards"]), **cols})
        b, w = int(best[p]), int(worst[p])
        if b < 0:
            continue
        best_rows.append({"prompt": prompt, "completion": as_completion(prompt, res["texts"][b]), **cols})
        if rewards[p, b] == rewards[p, w]:
            ties += 1
            continue
        pref_rows.append({"prompt": prompt, "chosen": as_completion(prompt, res["texts"][b]),
                          "rejected": as_completion(prompt, res["texts"][w]), **cols})
    scored = ~torch.isnan(rewards)
    stats = {"prompts": len(results), "best": len(best_rows), "preference": len(pref_rows),
             "preference_ties": ties, "unscored_prompts": int((~scored.any(1)).sum()),
             "mean_reward_all": nanmean(rewards.flatten()),
             "mean_reward_best": nanmean(torch.stack([rewards[p, b] for p, b in enumerate(best.tolist()) if b >= 0]))
             if len(best_rows) else float("nan")}
    return best_rows, pref_rows, all_rows, stats


def curve(results: list[dict], n_values: list[int], has_gold: bool) -> list[dict]:
    """The held-out best-of-n curve from n_max samples per prompt (the module docstring's estimator)."""
    rewards = torch.tensor([res["rewards"] for res in results], dtype=torch.float64)
    gold = torch.tensor([res["gold"] for res in results], dtype=torch.float64) if has_gold else None
    out = []
    for n in n_values:
        probs = selection_probs(rewards, n)
        row = {"n": n, "reward": nanmean(expected_value(probs, rewards)), "kl_bound": best_of_n_kl_bound(n)}
        if gold is not None:
            row["gold_reward"] = nanmean(expected_value(probs, gold))
            row["oracle_gold_reward"] = nanmean(expected_value(selection_probs(gold, n), gold))
        out.append(row)
    return out


# ----------------------------------------------------------------------------- main
def main(args: Args):
    # ---- plumbing (safe to skip): checks, data, reward sources, run folder, model
    args.run_name = args.run_name or f"{args.exp_name}__{args.dataset_name.replace('/', '_').replace(':', '_')}__{args.seed}__{int(time.time())}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    check_args(args)
    n_values = sorted(set(args.n_values)) if args.n_values is not None else []
    # inference only: one micro-batch, no gradient accumulation
    accelerator = distributed.make_accelerator(SimpleNamespace(gradient_accumulation_steps=1, seed=args.seed,
                                                               mixed_precision=args.mixed_precision))
    rank, device, main_process = accelerator.process_index, accelerator.device, accelerator.is_main_process
    specs = reward_utils.default_specs(args.reward_funcs, args.reward_model_name_or_path, args.dataset_name)
    reward_utils.check_weights(specs, args.reward_weights)
    tokenizer = model_utils.load_tokenizer(args.model_name_or_path, args.dataset_name)
    ds, eval_ds = data.load_splits(args, "prompt", "best_of_n.py", toy_n=args.num_eval_prompts)
    if n_values and eval_ds is None:
        raise ValueError("the held-out curve (--n_values) needs held-out prompts: pass --eval_dataset_name FILE or "
                         "--eval_fraction F, or --n_values None to write only the datasets")

    def prompt_rows(d, k: int) -> dict:  # the first k rows: prompts, their token ids, the other columns (as lists)
        d = d.select(range(min(k, len(d))))
        if not len(d):
            return {"prompt": [], "columns": {}, "prompt_ids": []}
        ids = data.tokenize(tokenizer, [data.prompt_text(p, tokenizer) for p in d["prompt"]])
        return {"prompt": list(d["prompt"]), "columns": {c: list(d[c]) for c in d.column_names if c != "prompt"},
                "prompt_ids": [s[-args.max_prompt_length:] for s in ids] if args.max_prompt_length else ids}

    train = prompt_rows(ds, len(ds) if args.num_prompts is None else args.num_prompts)
    held = prompt_rows(eval_ds, args.num_eval_prompts) if n_values else prompt_rows(ds, 0)
    sources = reward_utils.RewardSources(specs, args.reward_weights, args.dataset_name, device)
    g_specs = gold_specs(args)
    gold = reward_utils.RewardSources(g_specs, None, args.dataset_name, device) if g_specs and n_values else None
    checkpoint.prepare_output_dir(SimpleNamespace(output_dir=args.output_dir, resume_from=None,
                                                  overwrite_output_dir=args.overwrite_output_dir))

    model = model_utils.load_causal_lm(args.model_name_or_path, tokenizer, args.dataset_name, seed=args.seed)
    model = model.to(device).eval()
    generator = build_generator(args, tokenizer, accelerator, model)
    tracker = tracking.Tracker(args, main_process, 0, 0.0,
                               show=("best_of_n/reward", "best_of_n/gold_reward", "greedy/gold_reward"))
    accelerator.print(f"best_of_n: {len(train['prompt'])} training prompts x {args.n}, {len(held['prompt'])} held-out "
                      f"prompts x {max(n_values, default=0)}; selection {', '.join(specs)}"
                      + (f"; gold {', '.join(g_specs)}" if gold is not None else "") + f" -> {args.output_dir}")
    results = {"model": args.model_name_or_path, "selection": specs, "selection_weights": sources.weights.tolist(),
               "gold": g_specs if gold is not None else [], "tie_rule": "first index of the max"}
    out_path = lambda name: os.path.join(args.output_dir, name)  # noqa: E731

    # ---------------------------------------------------------------- datasets from the training prompts
    if train["prompt"]:
        set_seed(args.seed + rank)  # detail 3
        t0 = time.time()
        res = sample_and_score(generator, model, accelerator, train, args.n, args.generation_batch_size, sources,
                               label="datasets")
        best_rows, pref_rows, all_rows, stats = build_datasets(train, res)
        stats["seconds"] = time.time() - t0
        stats["tokens_per_second"] = sum(r["tokens"] for r in res) / max(stats["seconds"], 1e-9)
        results["datasets"] = {"n": args.n, **stats}
        if main_process:
            write_jsonl(out_path("best.jsonl"), best_rows)
            write_jsonl(out_path("all.jsonl"), all_rows)
            if pref_rows:
                write_jsonl(out_path("preference.jsonl"), pref_rows)
            elif os.path.exists(out_path("preference.jsonl")):  # no pairs (e.g. --n 1): no file, not an empty one
                os.remove(out_path("preference.jsonl"))
            rewards = torch.tensor([r["rewards"] for r in res], dtype=torch.float64)
            b, w = best_index(rewards).tolist(), worst_index(rewards).tolist()
            tracker.log_samples(0, [{"prompt": train["prompt"][r["row"]], "best": r["texts"][b[p]],
                                     "best_reward": r["rewards"][b[p]], "worst": r["texts"][w[p]],
                                     "worst_reward": r["rewards"][w[p]]}
                                    for p, r in enumerate(res[:args.num_completions_to_log]) if b[p] >= 0])
        tracker.log({f"datasets/{k}": v for k, v in stats.items()}, 0)
        accelerator.print(f"wrote {len(best_rows)} best, {len(pref_rows)} preference pairs "
                          f"({stats['preference_ties']} tied prompts left out) and {len(all_rows)} rows of all {args.n} "
                          f"samples to {args.output_dir}")

    # ---------------------------------------------------------------- the held-out curve
    if n_values:
        n_max = max(n_values)
        greedy = sample_and_score(generator, model, accelerator, held, 1, args.generation_batch_size, sources, gold,
                                  greedy=True, label="greedy")
        set_seed(args.seed + rank)  # detail 3
        res = sample_and_score(generator, model, accelerator, held, n_max, args.generation_batch_size, sources, gold,
                               label=f"held-out best-of-{n_max}")
        greedy_stats = {"reward": nanmean(torch.tensor([r["rewards"][0] for r in greedy], dtype=torch.float64))}
        if gold is not None:
            greedy_stats["gold_reward"] = nanmean(torch.tensor([r["gold"][0] for r in greedy], dtype=torch.float64))
        rows = curve(res, n_values, gold is not None)
        one = curve(res, [1], gold is not None)[0]
        results.update({"num_eval_prompts": len(held["prompt"]), "samples_per_prompt": n_max, "greedy": greedy_stats,
                        "one_sample": {k: one[k] for k in ("reward", "gold_reward") if k in one}, "best_of_n": rows})
        for row in rows:
            tracker.log({**{f"best_of_n/{k}": v for k, v in row.items() if k != "n"},
                         **{f"greedy/{k}": v for k, v in greedy_stats.items()}}, row["n"])
        if main_process:
            write_jsonl(out_path("eval_samples.jsonl"), [
                {"prompt": held["prompt"][r["row"]],
                 "completions": [as_completion(held["prompt"][r["row"]], t) for t in r["texts"]],
                 "rewards": nan_to_none(r["rewards"]),
                 **({"gold_rewards": nan_to_none(r["gold"])} if gold is not None else {})} for r in res])
            print("    n | reward | gold   | oracle | KL bound", flush=True)
            for row in rows:
                print(f"{row['n']:5d} | {row['reward']:.4f} | {row.get('gold_reward', math.nan):.4f} | "
                      f"{row.get('oracle_gold_reward', math.nan):.4f} | {row['kl_bound']:.3f}", flush=True)
            print("greedy: " + ", ".join(f"{k} {v:.4f}" for k, v in greedy_stats.items()), flush=True)

    if main_process:
        with open(out_path("results.json.tmp"), "w") as f:
            f.write(json.dumps(nan_to_none(results), indent=1) + "\n")
        os.replace(out_path("results.json.tmp"), out_path("results.json"))
    tracker.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,)))
