"""Turn the metrics.jsonl files of several runs into curves (mean and spread over seeds) and a markdown table.

    python benchmarks/plot.py --runs "grpo=runs/bench/grpo__*" "vmpo k=2=runs/bench/vmpo_k2__*" \
        --metrics eval/gold_reward reward --out benchmarks/results/rl

Each `label=glob` groups the run folders matching the glob (one per seed) under one label. For every metric it
writes <out>/<metric>_vs_step.png and <out>/<metric>_vs_time.png, and <out>/table.md with, per label: the first and
last value of each metric (mean ± std over seeds), wall time and peak memory (from the run's `perf` record, if any).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
from pathlib import Path


def read_run(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def series(records: list[dict], metric: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = [(r[x], r[metric]) for r in records if r.get(metric) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(runs: list[list[dict]], metric: str, x: str):
    """Mean and std across runs at each x of the first run (runs log on the same step grid; for time, each run's
    values are interpolated onto a common grid)."""
    curves = [series(r, metric, x) for r in runs]
    curves = [c for c in curves if c[0]]
    if not curves:
        return [], [], []
    if x == "step":
        grid = sorted(set.intersection(*[set(c[0]) for c in curves]))
        vals = [[dict(zip(*c))[g] for c in curves] for g in grid]
    else:
        end = min(c[0][-1] for c in curves)
        grid = [end * i / 50 for i in range(1, 51)]
        vals = []
        for g in grid:
            row = []
            for xs, ys in curves:
                j = next((k for k, xv in enumerate(xs) if xv >= g), len(xs) - 1)
                if j == 0:
                    row.append(ys[0])
                else:  # linear interpolation
                    t = (g - xs[j - 1]) / max(xs[j] - xs[j - 1], 1e-9)
                    row.append(ys[j - 1] + t * (ys[j] - ys[j - 1]))
            vals.append(row)
    means = [mean_std(v)[0] for v in vals]
    stds = [mean_std(v)[1] for v in vals]
    return grid, means, stds


def plot(groups: dict[str, list[list[dict]]], metric: str, x: str, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in groups.items():
        grid, means, stds = aggregate(runs, metric, x)
        if not grid:
            continue
        ax.plot(grid, means, label=f"{label} (n={len(runs)})")
        ax.fill_between(grid, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    ax.set_xlabel("optimizer step" if x == "step" else "wall time (s)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(groups: dict[str, list[list[dict]]], metrics: list[str], perf: dict[str, list[dict]]) -> str:
    head = ["run", "seeds"] + [f"{m} start" for m in metrics] + [f"{m} final" for m in metrics] + ["time (s)",
                                                                                                  "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in groups.items():
        starts = [[series(r, m)[1][0] if series(r, m)[1] else None for r in runs] for m in metrics]
        finals = [[series(r, m)[1][-1] if series(r, m)[1] else None for r in runs] for m in metrics]
        times = [r[-1]["time"] for r in runs if r]
        mem = [p.get("peak_rss_mb") for p in perf.get(label, []) if p.get("peak_rss_mb")]
        lines.append("| " + " | ".join([label, str(len(runs))] + [fmt(s) for s in starts] + [fmt(f) for f in finals]
                                       + [fmt(times, 1), fmt(mem, 0)]) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="label=glob of run folders, one per seed")
    ap.add_argument("--metrics", nargs="+", required=True, help="metric names in metrics.jsonl")
    ap.add_argument("--out", required=True, help="output folder")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    groups, perf = {}, {}
    for spec in a.runs:
        label, pattern = spec.split("=", 1)
        folders = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "metrics.jsonl").exists())
        if not folders:
            raise SystemExit(f"no run folders with metrics.jsonl match {pattern}")
        groups[label] = [read_run(f) for f in folders]
        perf[label] = [json.loads((f / "perf.json").read_text()) for f in folders if (f / "perf.json").exists()]
    for metric in a.metrics:
        safe = metric.replace("/", "_")
        plot(groups, metric, "step", out / f"{safe}_vs_step.png")
        plot(groups, metric, "time", out / f"{safe}_vs_time.png")
    (out / "table.md").write_text(table(groups, a.metrics, perf))
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
