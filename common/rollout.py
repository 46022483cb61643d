"""Plumbing around a rollout (safe to skip when reading an algorithm): the inputs reward functions receive, and the
generation metrics every online script logs under TRL's names, reduced over all processes.

    completion_metrics(accelerator, completion_mask, terminated)   completions/mean_length, min_length, max_length,
                                                                   clipped_ratio, mean/min/max_terminated_length
    sampler_gap_metrics(accelerator, trainer_logps, sampler_logps, mask)
                                                                   sampling/sampling_logp_difference/{mean,max},
                                                                   sampling/importance_sampling_ratio/{min,mean,max}
Every process must call these at the same point (they communicate). Nothing here changes a loss.
"""

from __future__ import annotations

import torch


def _gather_rows(accelerator, values: list[float]) -> torch.Tensor:
    """(processes, k) float64: this process's k statistics next to every other process's."""
    t = torch.tensor(values, dtype=torch.float64)
    if accelerator is None or accelerator.num_processes == 1:
        return t[None]
    return accelerator.gather(t[None].to(accelerator.device)).cpu().view(accelerator.num_processes, -1)


def completion_metrics(accelerator, completion_mask: torch.Tensor, terminated: torch.Tensor) -> dict:
    """Length statistics of the completions of every process. completion_mask (N, T) 0/1 (EOS included);
    terminated (N,) bool (ended with EOS). clipped_ratio = fraction that hit max_new_tokens; the terminated-length
    statistics are 0 when no completion terminated (as TRL)."""
    assert completion_mask.dim() == 2 and terminated.shape == completion_mask.shape[:1]
    lengths = completion_mask.detach().float().sum(1).cpu().double()
    term = terminated.detach().bool().cpu()
    tl = lengths[term]
    inf = float("inf")
    rows = _gather_rows(accelerator, [
        lengths.sum().item(), float(lengths.numel()), lengths.min().item() if lengths.numel() else inf,
        lengths.max().item() if lengths.numel() else -inf, tl.sum().item(), float(tl.numel()),
        tl.min().item() if tl.numel() else inf, tl.max().item() if tl.numel() else -inf])
    total, n, mn = rows[:, 0].sum().item(), rows[:, 1].sum().item(), rows[:, 2].min().item()
    mx, t_total, t_n = rows[:, 3].max().item(), rows[:, 4].sum().item(), rows[:, 5].sum().item()
    t_mn, t_mx = rows[:, 6].min().item(), rows[:, 7].max().item()
    return {"completions/mean_length": total / max(n, 1), "completions/min_length": mn if n else 0.0,
            "completions/max_length": mx if n else 0.0, "completions/clipped_ratio": 1.0 - t_n / max(n, 1),
            "completions/mean_terminated_length": t_total / t_n if t_n else 0.0,
            "completions/min_terminated_length": t_mn if t_n else 0.0,
            "completions/max_terminated_length": t_mx if t_n else 0.0}


def sampler_gap(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token trainer-minus-sampler log-prob differences d over completion tokens (1-D). trainer_logps, mask:
    (N, T); sampler_logps: (N, T') (the sampler's own width; only the first min(T, T') columns are compared).
    Tokens the sampler could not score (NaN) are left out."""
    T = min(trainer_logps.shape[1], sampler_logps.shape[1])
    d = trainer_logps[:, :T].detach().float() - sampler_logps[:, :T].to(trainer_logps.device).float()
    d = d[mask[:, :T].bool()]
    return d[~torch.isnan(d)]


def sampler_gap_metrics_from_diffs(accelerator, diffs: list[torch.Tensor] | torch.Tensor) -> dict:
    """The sampler-trainer gap over the tokens of every process, from `sampler_gap` outputs (one per micro-batch):
    |d| mean (token-weighted) and max, and the ratio exp(d) min / mean / max. {} when no process has a token."""
    d = torch.cat([x.detach().double().cpu().reshape(-1) for x in diffs]) if isinstance(diffs, (list, tuple)) \
        else diffs.detach().double().cpu().reshape(-1)
    inf = float("inf")
    if d.numel():
        a, r = d.abs(), d.exp()
        stats = [a.sum().item(), float(d.numel()), a.max().item(), r.sum().item(), r.min().item(), r.max().item()]
    else:
        stats = [0.0, 0.0, -inf, 0.0, inf, -inf]
    rows = _gather_rows(accelerator, stats)
    n = rows[:, 1].sum().item()
    if n == 0:
        return {}
    return {"sampling/sampling_logp_difference/mean": rows[:, 0].sum().item() / n,
            "sampling/sampling_logp_difference/max": rows[:, 2].max().item(),
            "sampling/importance_sampling_ratio/min": rows[:, 4].min().item(),
            "sampling/importance_sampling_ratio/mean": rows[:, 3].sum().item() / n,
            "sampling/importance_sampling_ratio/max": rows[:, 5].max().item()}


def sampler_gap_metrics(accelerator, trainer_logps, sampler_logps, mask) -> dict:
    """`sampler_gap_metrics_from_diffs` of the trainer's and the sampler's per-token log-probs: tensors (N, T), or
    lists of them (one per micro-batch, each with its own width)."""
    if not isinstance(trainer_logps, (list, tuple)):
        trainer_logps, sampler_logps, mask = [trainer_logps], [sampler_logps], [mask]
    return sampler_gap_metrics_from_diffs(accelerator, [sampler_gap(t, s, m) for t, s, m in
                                                        zip(trainer_logps, sampler_logps, mask)])


def frac_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """TRL's frac_reward_zero_std, NaN-aware: the fraction of groups (rows g*G..(g+1)*G-1 of (N,) rewards) whose
    scored rewards are all equal (fewer than two scored counts as equal): the groups that carry no signal."""
    r = rewards.view(-1, group_size)
    valid = ~torch.isnan(r)
    hi = torch.where(valid, r, torch.full_like(r, -float("inf"))).amax(1)
    lo = torch.where(valid, r, torch.full_like(r, float("inf"))).amin(1)
    return ((valid.sum(1) < 2) | (hi == lo)).float().mean().item()


def as_completions(prompts: list, texts: list[str]) -> list:
    """Completions in the prompts' format, as reward functions receive them: strings, or one assistant message for
    conversational prompts."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def completion_id_lists(completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[list[int]]:
    """The token ids of each completion (padding removed, EOS kept), as reward functions receive them."""
    return [row[m.bool()].tolist() for row, m in zip(completion_ids.cpu(), completion_mask.cpu())]


def repeat_rows(rows: list[int], prompts: list, columns: dict[str, list], n: int) -> tuple[list, dict[str, list]]:
    """The prompt and extra dataset columns of each sample, for dataset rows `rows` with n samples each
    (sample i*n + j belongs to rows[i]). Columns may be lists or datasets Columns (read in one call per column:
    item by item, each lookup is an Arrow read of ~50 us)."""
    def take(vals):
        return [vals[i] for i in rows] if isinstance(vals, (list, tuple)) else list(vals[list(rows)])

    picked, cols = take(prompts), {c: take(vals) for c, vals in columns.items()}
    return ([p for p in picked for _ in range(n)], {c: [v for v in vs for _ in range(n)] for c, vs in cols.items()})
