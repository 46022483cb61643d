"""Golden values of every pure loss / advantage function of the policy-gradient and online preference scripts, on
fixed seeded inputs. The numbers in GOLDEN are the outputs of these functions as they stood before the scripts
were moved onto the shared reward/rollout plumbing (recorded by running `python tests/test_loss_golden.py`):
a refactor that keeps the math must reproduce them to 1e-6.

Left out on purpose: vmpo with baseline per_prompt and adv_norm batch (its batch scale is meant to change), and NaN
inputs to vmpo/dar's combine_rewards (an unscored sample is meant to stop counting as 0 there).
To re-record after a deliberate change of the math, run this file as a script and paste its output into GOLDEN.
Deliberate changes so far: rloo.leave_one_out_advantages with normalize and unscored samples (the z-score is taken
over the samples that have a baseline, and unscored samples keep A = 0, as TRL 1.16 does; before, their zeros were
part of the mean and std and they got a non-zero advantage).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "algos"))


def _inputs():
    g = torch.Generator().manual_seed(1234)
    B, T, G = 6, 5, 3  # 6 sequences = 2 groups of 3, 5 tokens
    logps = -torch.rand(B, T, generator=g) * 2
    old = logps + 0.3 * torch.randn(B, T, generator=g)
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    adv = torch.randn(B, generator=g)
    rewards = torch.randn(B, generator=g)
    rpf = torch.randn(B, 2, generator=g)
    rpf_nan = rpf.clone()
    rpf_nan[1, 0] = float("nan")
    rpf_nan[4] = float("nan")  # a sample no function scores
    r_nan = torch.tensor([1.0, float("nan"), 0.0, 0.5, 0.5, 0.5])  # group 2: all equal
    seq = -torch.rand(B, generator=g) * 10  # sequence log-probs
    seq_ref = seq + torch.randn(B, generator=g)
    seq_old = seq + 0.5 * torch.randn(B, generator=g)
    terminated = torch.tensor([True, False, True, True, False, True])
    logits = torch.randn(2, 3, 7, generator=g)
    ref_logits = torch.randn(2, 3, 7, generator=g)
    return dict(B=B, T=T, G=G, logps=logps, old=old, ref=ref, mask=mask, adv=adv, rewards=rewards, rpf=rpf,
                rpf_nan=rpf_nan, r_nan=r_nan, seq=seq, seq_ref=seq_ref, seq_old=seq_old, terminated=terminated,
                logits=logits, ref_logits=ref_logits)


def _flat(out) -> list[float]:
    if isinstance(out, dict):
        return [v for k in sorted(out) for v in _flat(out[k])]
    if isinstance(out, (tuple, list)):
        return [v for o in out for v in _flat(o)]
    if isinstance(out, torch.Tensor):
        return [float(v) for v in out.detach().double().reshape(-1).tolist()]
    return [float(out)]


def cases() -> dict:
    import dar
    import gmpo
    import grpo
    import nash_md
    import online_dpo
    import rloo
    import vmpo
    import xpo

    x = _inputs()
    lp, old, ref, m, adv, G = x["logps"], x["old"], x["ref"], x["mask"], x["adv"], x["G"]
    w2 = torch.tensor([0.5, 2.0])
    c = {}
    # grpo
    c["grpo.combine_rewards"] = lambda: grpo.combine_rewards(x["rpf_nan"], w2)
    for s in ("group", "batch", "none"):
        c[f"grpo.group_advantages.{s}"] = lambda s=s: grpo.group_advantages(x["rewards"], G, s)
        c[f"grpo.group_advantages.{s}.nan"] = lambda s=s: grpo.group_advantages(x["r_nan"], G, s)
    for lvl in ("token", "sequence"):
        c[f"grpo.importance_ratio.{lvl}"] = lambda lvl=lvl: grpo.importance_ratio(lp, old, m, lvl)
    ratio = grpo.importance_ratio(lp, old, m, "token")
    c["grpo.clipped_surrogate"] = lambda: grpo.clipped_surrogate(ratio, adv, 0.2, 0.28)
    c["grpo.clipped_surrogate.delta"] = lambda: grpo.clipped_surrogate(ratio, adv, 0.2, 0.28, 1.5)
    c["grpo.k3"] = lambda: grpo.k3(lp, ref)
    per_token = grpo.clipped_surrogate(ratio, adv, 0.2, 0.28) + 0.04 * grpo.k3(lp, ref)
    for lt in grpo.LOSS_TYPES:
        c[f"grpo.aggregate.{lt}"] = lambda lt=lt: grpo.aggregate(per_token, m, lt, 40.0, 8)
    c["grpo.clip_fractions"] = lambda: grpo.clip_fractions(ratio, adv, m, 0.2, 0.28)
    # gmpo
    c["gmpo.combine_rewards"] = lambda: gmpo.combine_rewards(x["rpf_nan"], w2)
    for s in ("group", "batch", "none"):
        c[f"gmpo.group_advantages.{s}.nan"] = lambda s=s: gmpo.group_advantages(x["r_nan"], G, s)
    c["gmpo.clipped_log_ratio"] = lambda: gmpo.clipped_log_ratio(lp, old, adv, 0.4, 0.3)
    c["gmpo.geometric_mean_ratio"] = lambda: gmpo.geometric_mean_ratio(gmpo.clipped_log_ratio(lp, old, adv, 0.4, 0.3), m)
    c["gmpo.gmpo_loss"] = lambda: gmpo.gmpo_loss(lp, old, adv, m, 0.4, 0.3)[0]
    c["gmpo.gmpo_loss.beta"] = lambda: gmpo.gmpo_loss(lp, old, adv, m, 0.4, 0.3, 0.04, ref)
    c["gmpo.k3"] = lambda: gmpo.k3(lp, ref)
    c["gmpo.log_clip_counts"] = lambda: gmpo.log_clip_counts(lp - old, adv, m, 0.1, 0.15)
    # rloo
    c["rloo.combine_rewards"] = lambda: rloo.combine_rewards(x["rpf_nan"], w2)
    c["rloo.kl_shaped_rewards"] = lambda: rloo.kl_shaped_rewards(x["rewards"], old, ref, m, 0.05)
    c["rloo.kl_shaped_rewards.beta0"] = lambda: rloo.kl_shaped_rewards(x["rewards"], old, ref, m, 0.0)
    for norm in (False, True):
        c[f"rloo.leave_one_out_advantages.{norm}"] = lambda norm=norm: rloo.leave_one_out_advantages(x["rewards"], G, norm)
        c[f"rloo.leave_one_out_advantages.{norm}.nan"] = lambda norm=norm: rloo.leave_one_out_advantages(x["r_nan"], G, norm)
    c["rloo.sequence_ratio"] = lambda: rloo.sequence_ratio(lp, old, m)
    c["rloo.rloo_loss"] = lambda: rloo.rloo_loss(lp, old, adv, m, 0.2, 0.28)
    # vmpo (baseline per_prompt + adv_norm batch left out: about to change)
    r2 = x["rewards"].view(2, 3)
    for b in vmpo.BASELINES:
        for n in vmpo.ADV_NORMS:
            if (b, n) != ("per_prompt", "batch"):
                c[f"vmpo.compute_advantages.{b}.{n}"] = lambda b=b, n=n: vmpo.compute_advantages(r2, b, n, ema=0.1)
    c["vmpo.update_ema"] = lambda: [vmpo.update_ema(None, 0.3, 0.9), vmpo.update_ema(0.5, 0.3, 0.9)]
    sel = vmpo.select_top(adv, 0.5)
    c["vmpo.select_top"] = lambda: sel.float()
    c["vmpo.estep_weights"] = lambda: vmpo.estep_weights(adv, sel, 0.7)
    c["vmpo.eta_dual_loss"] = lambda: vmpo.eta_dual_loss(torch.tensor(0.7), adv, sel, 0.1)
    c["vmpo.alpha_dual_loss"] = lambda: vmpo.alpha_dual_loss(torch.tensor(0.3), torch.tensor(0.05), 0.01)
    psi = vmpo.estep_weights(adv, sel, 0.7)
    c["vmpo.weights_kl_from_uniform"] = lambda: vmpo.weights_kl_from_uniform(psi, sel)
    c["vmpo.weights_entropy"] = lambda: vmpo.weights_entropy(psi)
    for est in vmpo.KL_ESTIMATORS:
        c[f"vmpo.sequence_kl.{est}"] = lambda est=est: vmpo.sequence_kl(est, x["seq"], x["seq_ref"], x["seq_old"],
                                                                        x["seq_old"] - 0.1)
    c["vmpo.ref_anchor"] = lambda: vmpo.ref_anchor(x["seq"], x["seq_ref"], 0.2)
    kl_val, kl_sur = vmpo.sequence_kl("ref", x["seq"], x["seq_ref"], None, None)
    anchor = vmpo.ref_anchor(x["seq"], x["seq_ref"], 0.2)[1]
    c["vmpo.vmpo_loss"] = lambda: vmpo.vmpo_loss(psi, x["seq"], kl_sur, 0.3, anchor, 12)
    c["vmpo.combine_rewards"] = lambda: vmpo.combine_rewards(x["rpf"], [0.5, 2.0])
    # dar
    for n in dar.ADV_NORMS:
        c[f"dar.dar_advantages.{n}"] = lambda n=n: dar.dar_advantages(r2, n)
    c["dar.dar_weights"] = lambda: dar.dar_weights(adv, x["seq_ref"], x["seq_old"], 0.5, 0.1, 20.0)
    c["dar.dar_weights.clipped"] = lambda: dar.dar_weights(adv * 10, x["seq_ref"], x["seq_old"], 0.5, 0.1, 2.0)
    c["dar.dar_loss"] = lambda: dar.dar_loss(adv.abs(), x["seq"], 12)
    c["dar.combine_rewards"] = lambda: dar.combine_rewards(x["rpf"], [0.5, 2.0])
    # online_dpo / xpo / nash_md
    pc, pr, rc, rr = x["seq"][:3], x["seq"][3:], x["seq_ref"][:3], x["seq_ref"][3:]
    for mod in (online_dpo, xpo):
        name = mod.__name__
        for lt in ("sigmoid", "ipo"):
            c[f"{name}.dpo_loss.{lt}"] = lambda mod=mod, lt=lt: mod.dpo_loss(pc, pr, rc, rr, 0.1, lt)
        c[f"{name}.apply_missing_eos_penalty"] = lambda mod=mod: mod.apply_missing_eos_penalty(
            x["rewards"], x["terminated"], 1.5)
        c[f"{name}.pair_weights"] = lambda mod=mod: mod.pair_weights(torch.tensor([1.0, 2.0, 3.0]),
                                                                     torch.tensor([1.0, 1.0, 4.0]), True)
    for lt in ("sigmoid", "ipo"):
        c[f"xpo.xpo_loss.{lt}"] = lambda lt=lt: xpo.xpo_loss(pc, pr, rc, rr, x["seq_old"][:3], 0.1, 1e-3, lt)
    c["nash_md.preference_probability"] = lambda: nash_md.preference_probability(x["rewards"], x["rpf"][:, 0])
    c["nash_md.mixture_logits"] = lambda: nash_md.mixture_logits(x["logits"], x["ref_logits"], 0.3)
    c["nash_md.nash_md_loss"] = lambda: nash_md.nash_md_loss(lp, ref, m, torch.sigmoid(adv), 0.1)
    c["nash_md.apply_missing_eos_penalty"] = lambda: nash_md.apply_missing_eos_penalty(x["rewards"], x["terminated"], 1.5)
    # gradients of the losses with respect to the policy log-probs (surrogates have the right value AND gradient)
    def grad(f, t):
        t = t.clone().requires_grad_(True)
        return torch.autograd.grad(f(t), t)[0]

    c["grad.grpo"] = lambda: grad(lambda t: grpo.aggregate(
        grpo.clipped_surrogate(grpo.importance_ratio(t, old, m, "sequence"), adv, 0.2, 0.28) + 0.04 * grpo.k3(t, ref),
        m, "dapo", 40.0), lp)
    c["grad.gmpo"] = lambda: grad(lambda t: gmpo.gmpo_loss(t, old, adv, m, 0.4, 0.3, 0.04, ref)[0], lp)
    c["grad.rloo"] = lambda: grad(lambda t: rloo.rloo_loss(t, old, adv, m, 0.2, 0.28)[0], lp)
    c["grad.vmpo"] = lambda: grad(lambda t: vmpo.vmpo_loss(
        psi, t, vmpo.sequence_kl("ref", t, x["seq_ref"], None, None)[1], 0.3,
        vmpo.ref_anchor(t, x["seq_ref"], 0.2)[1], 12)[0], x["seq"])
    c["grad.dar"] = lambda: grad(lambda t: dar.dar_loss(adv.abs(), t, 12), x["seq"])
    c["grad.online_dpo"] = lambda: grad(lambda t: online_dpo.dpo_loss(t[:3], t[3:], rc, rr, 0.1)[0].sum(), x["seq"])
    c["grad.xpo"] = lambda: grad(lambda t: xpo.xpo_loss(t[:3], t[3:], rc, rr, t[:3] * 0.5, 0.1, 1e-3)[0].sum(),
                                 x["seq"])
    c["grad.nash_md"] = lambda: grad(lambda t: nash_md.nash_md_loss(t, ref, m, torch.sigmoid(adv), 0.1)[0].sum(), lp)
    return c


def compute() -> dict[str, list[float]]:
    return {name: _flat(fn()) for name, fn in cases().items()}


# today's values (recorded from the functions above before the refactor onto common/rewards.py and common/rollout.py)
GOLDEN: dict[str, list[float]] = {
    'grpo.combine_rewards': [0.8848679065704346, 1.731230616569519, 0.7488839626312256, -3.4680614471435547, float('nan'), -1.2605637311935425],
    'grpo.group_advantages.group': [0.45335090160369873, 0.6929532885551453, -1.1463042497634888, 0.36079490184783936, 0.7694603204727173, -1.1302552223205566],
    'grpo.group_advantages.group.nan': [0.7070068120956421, 0.0, -0.7070068120956421, 0.0, 0.0, 0.0],
    'grpo.group_advantages.batch': [0.47432345151901245, 0.725010097026825, -1.199333667755127, 0.3700377345085144, 0.789172351360321, -1.1592100858688354],
    'grpo.group_advantages.batch.nan': [1.4138137102127075, 0.0, -1.4138137102127075, 0.0, 0.0, 0.0],
    'grpo.group_advantages.none': [0.658629298210144, 1.006724238395691, -1.6653536558151245, 0.5138217210769653, 1.0958176851272583, -1.6096394062042236],
    'grpo.group_advantages.none.nan': [0.5, 0.0, -0.5, 0.0, 0.0, 0.0],
    'grpo.importance_ratio.token': [0.6520344018936157, 0.7869381308555603, 1.5659030675888062, 0.7677521109580994, 1.4241772890090942, 1.323392629623413, 1.185617446899414, 1.0867246389389038, 1.1285279989242554, 0.8817398548126221, 0.7547202110290527, 0.9976577758789062, 1.0987335443496704, 1.4148327112197876, 1.0932344198226929, 1.586279273033142, 1.3599594831466675, 1.120100498199463, 0.7575068473815918, 0.7577446103096008, 0.9467116594314575, 1.022355556488037, 0.7117655277252197, 0.7748180627822876, 0.7290470600128174, 0.8951593637466431, 0.9813376069068909, 1.1039584875106812, 1.7144466638565063, 0.7696300148963928],
    'grpo.importance_ratio.sequence': [0.9744334816932678, 0.9744334816932678, 0.9744334816932678, 0.9744334816932678, 0.9744334816932678, 1.1946781873703003, 1.1946781873703003, 1.1946781873703003, 1.1946781873703003, 1.1946781873703003, 0.7547202110290527, 0.7547202110290527, 0.7547202110290527, 0.7547202110290527, 0.7547202110290527, 1.1631542444229126, 1.1631542444229126, 1.1631542444229126, 1.1631542444229126, 1.1631542444229126, 0.983806848526001, 0.983806848526001, 0.983806848526001, 0.983806848526001, 0.983806848526001, 1.0505470037460327, 1.0505470037460327, 1.0505470037460327, 1.0505470037460327, 1.0505470037460327],
    'grpo.clipped_surrogate': [-0.1687861829996109, -0.2037074714899063, -0.3313418924808502, -0.19874097406864166, -0.3313418924808502, 0.6285757422447205, 0.5631362199783325, 0.5161648392677307, 0.5360202789306641, 0.4188025891780853, 0.1063661128282547, 0.13264621794223785, 0.1460850089788437, 0.18811281025409698, 0.14535386860370636, 4.6353607177734375, 3.974018096923828, 3.2731120586395264, 2.3377273082733154, 2.3377273082733154, 1.2921274900436401, 1.3953707218170166, 1.0918868780136108, 1.0918868780136108, 1.0918868780136108, -2.1168789863586426, -2.320673942565918, -2.6106486320495605, -3.0269527435302734, -1.8200263977050781],
    'grpo.clipped_surrogate.delta': [-0.1687861829996109, -0.2037074714899063, -0.3313418924808502, -0.19874097406864166, -0.3313418924808502, 0.6285757422447205, 0.5631362199783325, 0.5161648392677307, 0.5360202789306641, 0.4188025891780853, 0.1063661128282547, 0.13264621794223785, 0.1460850089788437, 0.18811281025409698, 0.14535386860370636, 4.383238792419434, 3.974018096923828, 3.2731120586395264, 2.3377273082733154, 2.3377273082733154, 1.2921274900436401, 1.3953707218170166, 1.0918868780136108, 1.0918868780136108, 1.0918868780136108, -2.1168789863586426, -2.320673942565918, -2.6106486320495605, -3.0269527435302734, -1.8200263977050781],
    'grpo.k3': [0.0044078826904296875, 0.02995908260345459, 0.0009332895278930664, 0.005961298942565918, 0.0003998279571533203, 0.009194016456604004, 0.007284402847290039, 0.010145425796508789, 0.004183411598205566, 0.0014585256576538086, 0.0540919303894043, 0.00034058094024658203, 0.015374302864074707, 0.03628253936767578, 0.05700480937957764, 0.013585209846496582, 0.00240933895111084, 8.940696716308594e-05, 5.6743621826171875e-05, 0.013093352317810059, 0.019542455673217773, 0.0058547258377075195, 0.0014880895614624023, 0.0003483295440673828, 0.00022721290588378906, 0.00017178058624267578, 0.02586841583251953, 0.0009198188781738281, 0.00043594837188720703, 0.015445113182067871],
    'grpo.aggregate.grpo': [0.49208441376686096],
    'grpo.aggregate.bnpo': [0.28005653619766235],
    'grpo.aggregate.dr_grpo': [0.11669021844863892],
    'grpo.aggregate.dapo': [0.14002826809883118],
    'grpo.clip_fractions': [3.0, 2.0, 5.0],
    'gmpo.combine_rewards': [0.8848679065704346, 1.731230616569519, 0.7488839626312256, -3.4680614471435547, float('nan'), -1.2605637311935425],
    'gmpo.group_advantages.group.nan': [0.7070068120956421, 0.0, -0.7070068120956421, 0.0, 0.0, 0.0],
    'gmpo.group_advantages.batch.nan': [1.4138137102127075, 0.0, -1.4138137102127075, 0.0, 0.0, 0.0],
    'gmpo.group_advantages.none.nan': [0.5, 0.0, -0.5, 0.0, 0.0, 0.0],
    'gmpo.clipped_log_ratio': [-0.42765799164772034, -0.23960566520690918, 0.30000001192092896, -0.2642883360385895, 0.30000001192092896, 0.2801985740661621, 0.1702636480331421, 0.08316826820373535, 0.12091410160064697, -0.12585818767547607, -0.2814081907272339, -0.002344965934753418, 0.09415817260742188, 0.3470113277435303, 0.08914065361022949, 0.4613912105560303, 0.3074549436569214, 0.11341845989227295, -0.27772271633148193, -0.2774088382720947, -0.05476069450378418, 0.02210932970046997, -0.3400067687034607, -0.25512707233428955, -0.3160170316696167, -0.11075353622436523, -0.01883876323699951, 0.09890234470367432, 0.30000001192092896, -0.26184535026550293],
    'gmpo.geometric_mean_ratio': [0.935840368270874, 1.1946781873703003, 0.7547202110290527, 1.1631542444229126, 0.983806848526001, 1.00149405002594],
    'gmpo.gmpo_loss': [0.46647870540618896],
    'gmpo.gmpo_loss.beta': [0.4671227037906647, 0.0044078826904296875, 0.02995908260345459, 0.0009332895278930664, 0.005961298942565918, 0.0003998279571533203, 0.009194016456604004, 0.007284402847290039, 0.010145425796508789, 0.004183411598205566, 0.0014585256576538086, 0.0540919303894043, 0.00034058094024658203, 0.015374302864074707, 0.03628253936767578, 0.05700480937957764, 0.013585209846496582, 0.00240933895111084, 8.940696716308594e-05, 5.6743621826171875e-05, 0.013093352317810059, 0.019542455673217773, 0.0058547258377075195, 0.0014880895614624023, 0.0003483295440673828, 0.00022721290588378906, 0.00017178058624267578, 0.02586841583251953, 0.0009198188781738281, 0.00043594837188720703, 0.015445113182067871],
    'gmpo.k3': [0.0044078826904296875, 0.02995908260345459, 0.0009332895278930664, 0.005961298942565918, 0.0003998279571533203, 0.009194016456604004, 0.007284402847290039, 0.010145425796508789, 0.004183411598205566, 0.0014585256576538086, 0.0540919303894043, 0.00034058094024658203, 0.015374302864074707, 0.03628253936767578, 0.05700480937957764, 0.013585209846496582, 0.00240933895111084, 8.940696716308594e-05, 5.6743621826171875e-05, 0.013093352317810059, 0.019542455673217773, 0.0058547258377075195, 0.0014880895614624023, 0.0003483295440673828, 0.00022721290588378906, 0.00017178058624267578, 0.02586841583251953, 0.0009198188781738281, 0.00043594837188720703, 0.015445113182067871],
    'gmpo.log_clip_counts': [3.0, 2.0, 5.0],
    'rloo.combine_rewards': [0.8848679065704346, 1.731230616569519, 0.7488839626312256, -3.4680614471435547, float('nan'), -1.2605637311935425],
    'rloo.kl_shaped_rewards': [1.1749670505523682, 1.5105311870574951, -1.1993061304092407, 0.09172651171684265, 0.6426165103912354, -2.069291353225708, -0.3764207661151886, -0.12580442428588867, 0.6293842792510986, -0.6706643104553223, -0.0485454797744751, 0.0804707407951355],
    'rloo.kl_shaped_rewards.beta0': [1.1561460494995117, 1.5042409896850586, -1.1678369045257568, 0.05819329246878624, 0.6401892304420471, -2.06526780128479, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    'rloo.leave_one_out_advantages.False': [0.9879440069198608, 1.5100864171981812, -2.498030424118042, 0.770732581615448, 1.6437265872955322, -2.414458990097046],
    'rloo.leave_one_out_advantages.False.nan': [1.0, 0.0, -1.0, 0.0, 0.0, 0.0],
    'rloo.leave_one_out_advantages.True': [0.5118955373764038, 0.7824395895004272, -1.294335126876831, 0.3993491232395172, 0.8516842126846313, -1.2510331869125366],
    'rloo.leave_one_out_advantages.True.nan': [1.4140136241912842, 0.0, -1.4140136241912842, 0.0, 0.0, 0.0],  # re-recorded: see the docstring
    'rloo.sequence_ratio': [0.878538966178894, 1.7051115036010742, 0.7547202110290527, 1.8304134607315063, 0.9678759574890137, 1.2796096801757812],
    'rloo.rloo_loss': [0.7220953106880188, 0.878538966178894, 1.7051115036010742, 0.7547202110290527, 1.8304134607315063, 0.9678759574890137, 1.2796096801757812],
    'vmpo.compute_advantages.per_prompt.per_prompt': [0.555277407169342, 0.8487493991851807, -1.4040268659591675, 0.4419127404689789, 0.9424588084220886, -1.3843715190887451],
    'vmpo.compute_advantages.per_prompt.none': [0.658629298210144, 1.006724238395691, -1.6653536558151245, 0.5138217210769653, 1.0958176851272583, -1.6096394062042236],
    'vmpo.compute_advantages.batch.per_prompt': [0.9570664167404175, 1.2505384683609009, -1.0022379159927368, 0.03203616663813591, 0.5325822234153748, -1.794248104095459],
    'vmpo.compute_advantages.batch.batch': [0.8956298828125, 1.1702631711959839, -0.9379016757011414, 0.029388127848505974, 0.48856014013290405, -1.6459394693374634],
    'vmpo.compute_advantages.batch.none': [1.1352019309997559, 1.4832968711853027, -1.1887810230255127, 0.037249159067869186, 0.6192451119422913, -2.086211919784546],
    'vmpo.compute_advantages.ema.per_prompt': [0.8904159665107727, 1.1838879585266113, -1.0688884258270264, -0.03595589101314545, 0.4645901322364807, -1.8622400760650635],
    'vmpo.compute_advantages.ema.batch': [0.8332578539848328, 1.1078910827636719, -1.0002737045288086, -0.03298385813832283, 0.4261881411075592, -1.7083114385604858],
    'vmpo.compute_advantages.ema.none': [1.0561460256576538, 1.4042409658432007, -1.2678369283676147, -0.04180670902132988, 0.5401892066001892, -2.1652677059173584],
    'vmpo.update_ema': [0.3, 0.48],
    'vmpo.select_top': [1.0, 0.0, 1.0, 0.0, 0.0, 1.0],
    'vmpo.estep_weights': [0.045812226831912994, 0.0, 0.02617514319717884, 0.0, 0.0, 0.9280126690864563],
    'vmpo.eta_dual_loss': [1.7180752754211426],
    'vmpo.alpha_dual_loss': [-0.012000000104308128],
    'vmpo.weights_kl_from_uniform': [0.7926775813102722],
    'vmpo.weights_entropy': [0.3059347867965698],
    'vmpo.sequence_kl.ref': [-1.0061209201812744, 1.0664455890655518, 0.4572315216064453, -0.09006786346435547, -0.40178442001342773, 1.1541767120361328, -1.0061209201812744, 1.0664455890655518, 0.4572315216064453, -0.09006786346435547, -0.40178442001342773, 1.1541767120361328],
    'vmpo.sequence_kl.behavior': [-0.0403902530670166, -0.4673870801925659, -0.8932027816772461, -0.23354721069335938, 1.243687629699707, -0.3316383361816406, -0.0403902530670166, -0.4673870801925659, -0.8932027816772461, -0.23354721069335938, 1.243687629699707, -0.3316383361816406],
    'vmpo.sequence_kl.old_policy': [0.05960965156555176, -0.367387056350708, -0.7932024002075195, -0.1335468292236328, 1.3436875343322754, -0.23163795471191406, 0.05960965156555176, -0.367387056350708, -0.7932024002075195, -0.1335468292236328, 1.3436875343322754, -0.23163795471191406],
    'vmpo.sequence_kl.old_policy_ref': [0.05960965156555176, -0.367387056350708, -0.7932024002075195, -0.1335468292236328, 1.3436875343322754, -0.23163795471191406, 0.05960965156555176, -0.367387056350708, -0.7932024002075195, -0.1335468292236328, 1.3436875343322754, -0.23163795471191406],
    'vmpo.ref_anchor': [-0.2012241929769516, 0.21328912675380707, 0.09144630283117294, -0.018013572320342064, -0.0803568884730339, 0.23083534836769104, -0.2012241929769516, 0.21328912675380707, 0.09144630283117294, -0.018013572320342064, -0.0803568884730339, 0.23083534836769104],
    'vmpo.vmpo_loss': [9.705587387084961, 0.029497018083930016, 9.656425476074219, 0.01966467685997486],
    'vmpo.combine_rewards': [0.8848679065704346, 2.1442809104919434, 0.7488839626312256, -3.4680614471435547, -2.2810871601104736, -1.2605637311935425],
    'dar.dar_advantages.per_prompt': [0.555277407169342, 0.8487493991851807, -1.4040268659591675, 0.4419127404689789, 0.9424588084220886, -1.3843715190887451],
    'dar.dar_advantages.batch': [0.5607824325561523, 0.8571639657020569, -1.417946457862854, 0.4374876916408539, 0.9330215454101562, -1.3705092668533325],
    'dar.dar_advantages.none': [0.658629298210144, 1.006724238395691, -1.6653536558151245, 0.5138217210769653, 1.0958176851272583, -1.6096394062042236],
    'dar.dar_weights': [3.387845277786255, 0.25304946303367615, 1.0601173639297485, 0.009242716245353222, 0.04690254479646683, 20.0, 0.7887593507766724, -0.5825487375259399, 0.2799757122993469, 0.18634557723999023, -0.784919261932373, -0.7687822580337524, 0.4314347505569458, -0.7916215658187866, -0.22159604728221893, -4.870265007019043, -2.274764060974121, 3.941344738006592],
    'dar.dar_weights.clipped': [2.0, 0.00020371981372591108, 0.14428210258483887, 8.504234588031658e-22, 6.024748061550511e-11, 2.0, 0.7887593507766724, -0.5825487375259399, 0.2799757122993469, 0.18634557723999023, -0.784919261932373, -0.7687822580337524, 4.314347267150879, -7.916215896606445, -2.2159605026245117, -48.70265197753906, -22.74764060974121, 39.413448333740234],
    'dar.dar_loss': [5.166506290435791],
    'dar.combine_rewards': [0.8848679065704346, 2.1442809104919434, 0.7488839626312256, -3.4680614471435547, -2.2810871601104736, -1.2605637311935425],
    'online_dpo.dpo_loss.sigmoid': [0.7399984002113342, 0.6224278807640076, 0.7286015152931213, -0.916053056716919, 1.4682300090789795, -0.6969451904296875],
    'online_dpo.dpo_loss.ipo': [34.99967956542969, 12.47339916229248, 32.45518493652344, -0.916053056716919, 1.4682300090789795, -0.6969451904296875],
    'online_dpo.apply_missing_eos_penalty': [1.1561460494995117, 0.004240989685058594, -1.1678369045257568, 0.05819329246878624, -0.8598107695579529, -2.06526780128479],
    'online_dpo.pair_weights': [0.0, 1.0, 1.0],
    'xpo.dpo_loss.sigmoid': [0.7399984002113342, 0.6224278807640076, 0.7286015152931213, -0.916053056716919, 1.4682300090789795, -0.6969451904296875],
    'xpo.dpo_loss.ipo': [34.99967956542969, 12.47339916229248, 32.45518493652344, -0.916053056716919, 1.4682300090789795, -0.6969451904296875],
    'xpo.apply_missing_eos_penalty': [1.1561460494995117, 0.004240989685058594, -1.1678369045257568, 0.05819329246878624, -0.8598107695579529, -2.06526780128479],
    'xpo.pair_weights': [0.0, 1.0, 1.0],
    'xpo.xpo_loss.sigmoid': [0.7364836931228638, 0.6208692789077759, 0.7178859710693359, 0.7399984002113342, 0.6224278807640076, 0.7286015152931213, -0.003514690324664116, -0.001558590680360794, -0.010715527459979057, -0.916053056716919, 1.4682300090789795, -0.6969451904296875],
    'xpo.xpo_loss.ipo': [34.99616622924805, 12.471840858459473, 32.4444694519043, 34.99967956542969, 12.47339916229248, 32.45518493652344, -0.003514690324664116, -0.001558590680360794, -0.010715527459979057, -0.916053056716919, 1.4682300090789795, -0.6969451904296875],
    'nash_md.preference_probability': [0.8817943930625916, 0.6633235216140747, 0.5597990155220032, 0.6066882014274597, 0.7525832056999207, 0.5008110404014587],
    'nash_md.mixture_logits': [-2.0078928470611572, -3.35801100730896, -2.298588275909424, -3.11383318901062, -4.0184550285339355, -1.277492642402649, -0.9432061314582825, -1.2357085943222046, -1.7773306369781494, -2.054281234741211, -2.509620428085327, -1.2539606094360352, -3.6236624717712402, -3.9770355224609375, -2.3556642532348633, -2.1161608695983887, -2.8693933486938477, -1.8114712238311768, -2.7371180057525635, -1.0119127035140991, -1.9932667016983032, -1.8395459651947021, -2.5112390518188477, -1.3839813470840454, -1.8365167379379272, -2.0696189403533936, -2.0514354705810547, -2.351689338684082, -1.8905446529388428, -1.8131482601165771, -1.885328769683838, -2.949909210205078, -1.3114522695541382, -1.8432362079620361, -2.9185032844543457, -1.9278204441070557, -1.9107643365859985, -1.8771299123764038, -1.319153904914856, -2.5737009048461914, -2.4503326416015625, -2.090219497680664],
    'nash_md.nash_md_loss': [0.17346113920211792, -0.3189206123352051, -0.10656572878360748, -1.655187964439392, -0.5207721590995789, 2.1412413120269775, 0.2986133098602295, -0.34378427267074585, -0.5454233288764954, 0.15618695318698883, 0.16306868195533752, -0.1548568308353424, -0.14359980821609497, 0.28454217314720154, 0.052023399621248245, 1.670806646347046, 0.5370790362358093, -2.1567270755767822],
    'nash_md.apply_missing_eos_penalty': [1.1561460494995117, 0.004240989685058594, -1.1678369045257568, 0.05819329246878624, -0.8598107695579529, -2.06526780128479],
    'grad.grpo': [-0.00640292139723897, -0.00657121604308486, -0.006349894683808088, -0.006419267971068621, -0.006334612611681223, 0.014315539039671421, 0.014301890507340431, 0.014321760274469852, 0.0, 0.0, 0.0002938842517323792, 0.0, 0.0, 0.0, 0.0, 0.08479902893304825, 0.0850408673286438, 0.0849863588809967, 0.08498366177082062, 0.0, 0.03335799276828766, 0.03367327153682709, 0.0, 0.0, 0.0, -0.06212717667222023, -0.06189797446131706, -0.06215203180909157, -0.06213834509253502, -0.06194290891289711],
    'grad.gmpo': [-0.008204220794141293, -0.008428613655269146, -5.843653343617916e-05, -0.008226016536355019, -3.806070890277624e-05, 0.031812313944101334, 0.03178198263049126, 0.031826138496398926, 0.0, 0.0, 0.018683530390262604, 0.0, 0.0, 0.0, 0.0, 0.1413317322731018, 0.1417347937822342, 0.1416439414024353, 0.14163945615291595, 0.0, 0.11119330674409866, 0.11224423348903656, 0.0, 0.0, 0.0, -0.07896953821182251, -0.07866393774747849, -0.07900267839431763, -3.975967410951853e-05, -0.07872384786605835],
    'grad.rloo': [-0.03790322691202164, -0.03790322691202164, -0.03790322691202164, -0.03790322691202164, -0.03790322691202164, 0.13498032093048096, 0.13498032093048096, 0.13498032093048096, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8914599418640137, 0.8914599418640137, 0.8914599418640137, 0.8914599418640137, 0.0, 0.22016896307468414, 0.22016896307468414, 0.0, 0.0, 0.0, -0.5043383240699768, -0.5043383240699768, -0.5043383240699768, -0.5043383240699768, -0.5043383240699768],
    'grad.vmpo': [-0.08773393929004669, 0.04443523660302162, -0.007123827934265137, -0.003752827877178788, -0.016741018742322922, -0.8799219727516174],
    'grad.dar': [-0.02157173864543438, -0.03958108276128769, -0.011079803109169006, -0.24351327121257782, -0.11373820900917053, -0.1970672458410263],
    'grad.online_dpo': [-0.05228853225708008, -0.04633600637316704, -0.05174165964126587, 0.05228853225708008, 0.04633600637316704, 0.05174165964126587],
    'grad.xpo': [-0.05178853124380112, -0.04583600535988808, -0.05124165862798691, 0.05228853225708008, 0.04633600637316704, 0.05174165964126587],
    'grad.nash_md': [-0.07360085844993591, -0.08787520229816437, -0.06864561885595322, -0.07508015632629395, -0.06717077642679214, 0.1304338425397873, 0.12887796759605408, 0.13115109503269196, 0.0, 0.0, 0.06798815727233887, 0.0, 0.0, 0.0, 0.0, 0.4328882694244385, 0.4559539556503296, 0.4502711296081543, 0.44999855756759644, 0.0, 0.27740877866744995, 0.30756792426109314, 0.0, 0.0, 0.0, -0.4159518778324127, -0.3904622495174408, -0.41836273670196533, -0.4170423746109009, -0.3959980905056],
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_loss_matches_golden(name):
    fns = cases()
    assert name in fns, f"{name}: the function or case was removed; restore it or re-record GOLDEN deliberately"
    got = torch.tensor(_flat(fns[name]()), dtype=torch.float64)
    want = torch.tensor(GOLDEN[name], dtype=torch.float64)
    assert got.shape == want.shape, name
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)


def test_every_case_is_recorded():
    assert set(cases()) == set(GOLDEN)


if __name__ == "__main__":
    import math

    print("GOLDEN: dict[str, list[float]] = {")
    for k, v in compute().items():
        vals = ", ".join("float('nan')" if math.isnan(f) else repr(f) for f in v)
        print(f"    {k!r}: [{vals}],")
    print("}")
