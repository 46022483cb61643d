"""algos/dpo.py's losses against TRL 1.16's own DPOTrainer._compute_loss, on the same per-token log-probs.

Not part of the test suite (TRL is never a dependency): it needs trl==1.16.0 importable next to the project's torch,
e.g. from the scratch virtualenv benchmarks/dpo_speed.py makes (`python -m venv --system-site-packages V &&
V/bin/pip install trl==1.16.0 --no-deps`):

    .cache/venv-trl-1.16.0/bin/python benchmarks/dpo_trl_losses.py > benchmarks/results/dpo/trl_losses.txt

TRL's loss is called unchanged with a stand-in model that returns fixed per-token log-probs (its fused-LM-head
output) and precomputed reference sums; dpo.py's pure functions get the same numbers. Every loss type, several
together with weights, each f-divergence, LD-DPO and WPO are compared; the script exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algos"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo import LOSS_TYPES, PairLogps, combined_loss, ld_sequence_logps, wpo_weights  # noqa: E402

B, P, T = 6, 3, 5  # pairs, prompt tokens, completion tokens


def make_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (2 * B,), generator=g)  # completion lengths, chosen rows then rejected rows
    comp = (torch.arange(T)[None] < lens[:, None]).long()  # (2B, T) right-padded completions (float32 throughout:
    # TRL's alpha-divergence clamp knows float16, bfloat16 and float32)
    completion_mask = torch.cat([torch.zeros(2 * B, P, dtype=torch.long), comp], 1)  # (2B, P+T)
    token_logps = -torch.rand(2 * B, T, generator=g, dtype=torch.float32) * 3 * comp  # (2B, T), 0 on padding
    log_sum_sq = -torch.rand(2 * B, T, generator=g, dtype=torch.float32) * 2 * comp
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float32) * 8 - 1  # reference sequence sums
    return completion_mask, comp.float(), token_logps, log_sum_sq, ref


def trl_loss(loss_types, loss_weights, seed=0, beta=0.1, label_smoothing=0.0, f_div="reverse_kl", f_alpha=0.5,
             ld_alpha=None, use_weighting=False, discopop_tau=0.05) -> float:
    from trl import DPOTrainer

    completion_mask, comp, token_logps, log_sum_sq, ref = make_inputs(seed)
    shifted = torch.zeros(2 * B, P + T - 1)  # position t-1 predicts token t
    shifted[:, P - 1:] = token_logps
    lss = torch.zeros_like(shifted)
    lss[:, P - 1:] = log_sum_sq
    out = SimpleNamespace(log_probs=shifted, entropy=torch.zeros_like(shifted), mean_logits=torch.zeros_like(shifted),
                          is_top1=torch.zeros_like(shifted, dtype=torch.bool), log_sum_sq_probs=lss, aux_loss=None)
    acc = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    me = SimpleNamespace(accelerator=acc, aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=True,
                         f_divergence_type=f_div, f_alpha_divergence_coef=f_alpha, loss_types=loss_types,
                         loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
                         args=SimpleNamespace(discopop_tau=discopop_tau), use_weighting=use_weighting,
                         _metrics=defaultdict(lambda: defaultdict(list)), model=SimpleNamespace(training=True),
                         _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, P + T, dtype=torch.long), "attention_mask": torch.ones(2 * B, P + T),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    return float(DPOTrainer._compute_loss(me, lambda **kw: out, inputs, False))


def our_loss(loss_types, loss_weights, seed=0, beta=0.1, label_smoothing=0.0, f_div="reverse_kl", f_alpha=0.5,
             ld_alpha=None, use_weighting=False, discopop_tau=0.05) -> float:
    _, comp, token_logps, log_sum_sq, ref = make_inputs(seed)
    seq = ld_sequence_logps(token_logps, comp, ld_alpha)
    lens = comp.sum(1)
    q = PairLogps(seq[:B], seq[B:], ref[:B], ref[B:], lens[:B], lens[B:], -(token_logps[:B] * comp[:B]).sum(1))
    pw = wpo_weights(token_logps, log_sum_sq, comp) if use_weighting else None
    total, _ = combined_loss(q, loss_types, loss_weights, beta, pw, None, float(lens[:B].sum()) / B,
                             label_smoothing=label_smoothing, discopop_tau=discopop_tau, f_divergence_type=f_div,
                             f_alpha=f_alpha)
    return float(total.mean())


def cases():
    for t in LOSS_TYPES:
        ls = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.05, "aot_unpaired": 0.05}.get(t, 0.0)
        yield t, dict(loss_types=[t], loss_weights=[1.0], label_smoothing=ls, beta=0.3)
    yield "mpo", dict(loss_types=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    yield "hinge+ipo+nca", dict(loss_types=["hinge", "ipo", "nca_pair"], loss_weights=[0.5, 2.0, 1.5], beta=0.5)
    for f_div in ("forward_kl", "js_divergence", "alpha_divergence"):
        for t in ("sigmoid", "sigmoid_norm", "ipo", "discopop", "robust"):
            yield f"{t}/{f_div}", dict(loss_types=[t], loss_weights=[1.0], f_div=f_div, f_alpha=0.3,
                                        label_smoothing=0.1 if t == "robust" else 0.0)
    for ld in (0.0, 0.5, 1.0):
        yield f"sigmoid/ld_alpha={ld}", dict(loss_types=["sigmoid"], loss_weights=[1.0], ld_alpha=ld)
        yield f"ipo/ld_alpha={ld}", dict(loss_types=["ipo"], loss_weights=[1.0], ld_alpha=ld)
    for t in ("sigmoid", "apo_zero", "sppo_hard"):
        yield f"{t}/wpo", dict(loss_types=[t], loss_weights=[1.0], use_weighting=True)


def main() -> int:
    import trl

    print(f"trl {trl.__version__}, torch {torch.__version__}")
    worst, bad = 0.0, []
    for name, kw in cases():
        for seed in range(3):
            a, b = trl_loss(seed=seed, **kw), our_loss(seed=seed, **kw)
            err = abs(a - b) / max(1.0, abs(a))
            worst = max(worst, err)
            if err > 1e-5:  # float32 rounding (exp of large log-ratios in the f-divergences)
                bad.append((name, seed, a, b))
        print(f"{name:32s} trl {a:+.10f}  dpo.py {b:+.10f}")
    print(f"{sum(1 for _ in cases())} configurations x 3 seeds; worst relative difference {worst:.2e}")
    for name, seed, a, b in bad:
        print(f"MISMATCH {name} seed {seed}: trl {a!r} dpo.py {b!r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
