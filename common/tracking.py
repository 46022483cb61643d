"""Run tracking: resolved args and one JSON record per logging step in the run folder, mirrored to wandb with
`--track` (WANDB_MODE=offline works without a network), sample completions at an interval, a progress line.

Files in `output_dir`: args.json, metrics.jsonl (one {"step", "time", ...metrics} per line), samples.jsonl.
`benchmarks/plot.py` reads metrics.jsonl. The folder holds one run (checkpoint.prepare_output_dir sees to it at
start-up): a new run never deletes another run's metrics, it refuses to start; a resumed run drops the records past
its resume step, which it writes again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path


def _jsonable(v):
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if hasattr(v, "item"):
        return _jsonable(v.item())
    return str(v)


class Tracker:
    def __init__(self, args, is_main: bool = True, resume_step: int = 0, elapsed: float = 0.0,
                 show: tuple[str, ...] = ("loss",)):
        self.args, self.is_main, self.show = args, is_main, show
        self.dir = Path(args.output_dir)
        self.t0 = time.time() - elapsed  # a resumed run continues the wall clock where it stopped
        self.wandb = None
        if not resume_step and (self.dir / "metrics.jsonl").exists():  # every rank raises
            from common.checkpoint import RunFolderError

            raise RunFolderError(f"--output_dir {self.dir} already holds another run's metrics.jsonl; a new run would "
                                 f"mix with it: pass --resume_from auto, --overwrite_output_dir True, or another "
                                 f"--output_dir")
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # no rank writes metrics.jsonl before every rank has checked for it
        if not is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        config = _jsonable(dataclasses.asdict(args) if dataclasses.is_dataclass(args) else vars(args))
        (self.dir / "args.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in ("metrics.jsonl", "samples.jsonl"):  # drop records past the resume point: written again
            path = self.dir / name
            if resume_step and path.exists():
                lines = path.read_text().splitlines()
                keep = [line for line in lines if line and json.loads(line)["step"] <= resume_step]
                path.write_text("".join(line + "\n" for line in keep))
        if getattr(args, "track", False):
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.run_name,
                                    config=config, dir=str(self.dir), resume="allow")

    def elapsed(self) -> float:
        return time.time() - self.t0

    def log(self, metrics: dict, step: int, total_steps: int | None = None):
        if not self.is_main:
            return
        record = {"step": step, "time": round(self.elapsed(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
        for k in self.show:
            if k in record and record[k] is not None:
                parts.append(f"{k} {record[k]:.4g}")
        parts.append(f"{record['time']:.1f}s")
        print(" | ".join(parts), flush=True)

    def log_samples(self, step: int, rows: list[dict], n_print: int = 2):
        """Sample completions with their rewards: samples.jsonl, a wandb table, and a couple printed."""
        if not self.is_main or not rows:
            return
        rows = [{k: _jsonable(v) for k, v in r.items()} for r in rows]
        with open(self.dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")
        if self.wandb is not None:
            import wandb

            cols = list(rows[0])
            self.wandb.log({"completions": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])},
                           step=step)
        for r in rows[:n_print]:
            print("   sample:", " | ".join(f"{k}={str(v)!r:.80}" for k, v in r.items()), flush=True)

    def close(self):
        """Write perf.json (wall time, peak resident memory of this process) and finish wandb."""
        if self.is_main:
            import resource

            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
            (self.dir / "perf.json").write_text(json.dumps({"time": round(self.elapsed(), 3),
                                                            "peak_rss_mb": round(peak_mb, 1)}) + "\n")
        if self.wandb is not None:
            self.wandb.finish()
