"""Error and ESS versus steps: the SDE steps (Euler-Maruyama, exponential, 2m) and the weight rules.

Part 1, the base chain: untilted sampling of the analytic targets (fmtt_core.analytic) with each
SDE step at eta 1 and 0.1, against the exact data law; the steps each needs for a given error; on
Gaussian data (eta 1), the variance error per data width (narrow to wide). Weights cannot remove
this error: every exact weighting targets the base chain's law times exp(beta r).
Part 2, FMTT exact mode on the ring with the quadratic reward, error of the weighted mean against the
exact tilted law, final ESS / N and resamplings: (a) the SDE steps side by side under twisted
weights, (b) the weight rules (twisted, auto, advective, eulerian) with the Euler step; look-aheads:
the exact flow map (RK4 on the exact denoiser) and the denoiser.

    python bench/bench_steps.py            # 6-10 min on one core: prints and writes bench/results/steps.md
    python bench/bench_steps.py --quick    # smoke run, prints only

Errors: |mean - exact| / std (max over dimensions) and |variance / exact - 1| (max), mean over seeds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import fmtt_core as fc
from fmtt_core.analytic import GaussianMixture, quadratic_reward, ring_mixture

RESULTS = Path(__file__).resolve().parent / "results"
RING = ring_mixture(8, 4.0, 0.5)
GMM8 = GaussianMixture(
    torch.tensor([0.3, 0.3, 0.2, 0.2]),
    2 * torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
    0.2 + 0.5 * torch.rand(4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
# Gaussian data, one variance per dimension (independent): where each step wins depends on the width.
GAUSS_VARS = (0.01, 0.1, 1.0, 4.0)
GAUSS = GaussianMixture(torch.ones(1), torch.tensor([[1.0, -0.5, 0.0, 2.0]]), torch.tensor([GAUSS_VARS]))
TARGETS = {"gaussian 4-D": GAUSS, "ring 2-D": RING, "gmm 8-D": GMM8}
C2 = torch.tensor([4.0, 0.0], dtype=torch.float64)
STEPS = ("euler", "exponential", "2m")
LEVELS = (0.1, 0.05, 0.025)
ETAS = (1.0, 0.1)  # the default stochasticity, and the authors' toy's (little noise: 2m's best case)


def errors(x, w, law):
    m = w @ x
    v = w @ (x - m) ** 2
    sd = law.cov().diag().sqrt()
    return float(((m - law.mean()) / sd).abs().max()), float((v / law.cov().diag() - 1).abs().max())


def variance_errors(x, law):
    """Signed variance / exact - 1 per dimension."""
    return (x.var(0) / law.cov().diag() - 1).tolist()


def x_init(n, dim, seed):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)


def mean_over_seeds(rows):
    return [sum(r[i] for r in rows) / len(rows) for i in range(len(rows[0]))]


def base_chain(steps_list, n, seeds, eta):
    """{(target, steps, step kind): (mean err, var err)} on the uniform grid at this eta."""
    out = {}
    for name, law in TARGETS.items():
        for steps in steps_list:
            for kind in STEPS:
                errs = []
                for seed in range(seeds):
                    res = fc.base_sample(law.denoiser, x_init(n, law.dim, seed), fc.time_grid(steps),
                                         config=fc.FMTTConfig(sde_step=kind, eta=eta, seed=seed))
                    errs.append(errors(res.samples, torch.full((n,), 1 / n, dtype=torch.float64), law))
                out[name, steps, kind] = mean_over_seeds(errs)
    return out


GRIDS = {"uniform": lambda u: u, "crowded": lambda u: 1 - (1 - u) ** 2}  # crowded: t = 1 - (1 - u)^2


def gaussian_widths(steps_list, n, seeds):
    """{(grid, steps, step kind): signed variance error per dimension of the Gaussian}."""
    out = {}
    for grid, warp in GRIDS.items():
        for steps in steps_list:
            for kind in STEPS:
                dims = []
                for seed in range(seeds):
                    res = fc.base_sample(GAUSS.denoiser, x_init(n, GAUSS.dim, seed), warp(fc.time_grid(steps)),
                                         config=fc.FMTTConfig(sde_step=kind, seed=seed))
                    dims.append(variance_errors(res.samples, GAUSS))
                out[grid, steps, kind] = mean_over_seeds(dims)
    return out


def steps_needed(base, steps_list, level, name, kind):
    """Fewest steps on the grid from which on max(mean err, var err) stays <= level."""
    ok = [max(base[name, s, kind]) <= level for s in steps_list]
    for i, s in enumerate(steps_list):
        if all(ok[i:]):
            return str(s)
    return f"> {steps_list[-1]}"


def fmtt_runs(steps_list, n, seeds, rk4):
    """{(steps, look-ahead, weights, step kind): (mean err, var err, final ESS / N, resamples)}."""
    reward, beta = quadratic_reward(C2, 1.0), 1.0
    law = RING.tilt_quadratic(C2, beta)
    looks = {"flow map": lambda: fc.FlowMapLookahead(lambda x, s, t: RING.flow_map(x, s, t, rk4)),
             "denoiser": lambda: fc.DenoiserLookahead(RING.denoiser)}
    cases = [("twisted", kind) for kind in STEPS] + [(w, "euler") for w in ("auto", "advective", "eulerian")]
    out = {}
    for steps in steps_list:
        for look_name, look in looks.items():
            for weights, kind in cases:
                rows = []
                for seed in range(seeds):
                    cfg = fc.FMTTConfig(reward_scale=beta, weights=weights, sde_step=kind, seed=seed)
                    res = fc.fmtt_sample(RING.denoiser, x_init(n, 2, seed), fc.time_grid(steps), reward=reward,
                                         lookahead=look(), config=cfg)
                    rows.append((*errors(res.samples, res.weights, law), res.ess / n, res.n_resamples))
                out[steps, look_name, weights, kind] = mean_over_seeds(rows)
    return out


def tables(bases, per_dim, base_steps, fmtt, fmtt_steps, meta) -> str:
    """bases: {eta: base_chain(...)}, the default eta first."""
    head = " | ".join(STEPS)
    lines = [f"# Error vs steps ({meta})"]
    for eta, base in bases.items():
        lines += ["", f"## Base chain (no reward, eta {eta:g}): error against the data law, mean err / var err", "",
                  f"| target | steps | {head} |", "|---|---:|" + "---:|" * len(STEPS)]
        for name in TARGETS:
            for s in base_steps:
                lines.append(f"| {name} | {s} | " + " | ".join(
                    "{:.3f} / {:.3f}".format(*base[name, s, k]) for k in STEPS) + " |")
        lines += ["", f"## Steps needed for a given error (eta {eta:g}): fewest steps on the grid from which on "
                  "max(mean err, var err) <= error", "",
                  f"| target | error | {head} |", "|---|---:|" + "---:|" * len(STEPS)]
        for name in TARGETS:
            for level in LEVELS:
                lines.append(f"| {name} | {level:g} | " + " | ".join(
                    steps_needed(base, base_steps, level, name, k) for k in STEPS) + " |")
    lines += ["", "## Gaussian data by width: signed variance error of each dimension (data variance s2), on "
              "the uniform grid and on one crowded towards the data, t = 1 - (1 - u)^2", "",
              "| grid | steps | step | " + " | ".join(f"s2 = {v:g}" for v in GAUSS_VARS) + " |",
              "|---|---:|---|" + "---:|" * len(GAUSS_VARS)]
    for (grid, s, k), errs in per_dim.items():
        lines.append(f"| {grid} | {s} | {k} | " + " | ".join(f"{e:+.3f}" for e in errs) + " |")
    lines += ["", "## FMTT exact on the ring (quadratic reward, beta 1), twisted weights: the SDE steps, "
              "mean err / var err / final ESS/N", "",
              f"| steps | look-ahead | {head} |", "|---:|---|" + "---:|" * len(STEPS)]
    looks = dict.fromkeys(lk for _, lk, _, _ in fmtt)
    for s in fmtt_steps:
        for lk in looks:
            lines.append(f"| {s} | {lk} | " + " | ".join(
                "{:.3f} / {:.3f} / {:.2f}".format(*fmtt[s, lk, "twisted", k][:3]) for k in STEPS) + " |")
    lines += ["", "## FMTT exact on the ring (quadratic reward, beta 1): weight rules, Euler step", "",
              "| steps | look-ahead | weights | mean err | var err | final ESS/N | resamples |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for (s, lk, w, k), (m, v, e, r) in fmtt.items():
        if k == "euler":
            lines.append(f"| {s} | {lk} | {w} | {m:.3f} | {v:.3f} | {e:.2f} | {r:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (small N, one seed), prints only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.quick:
        base_steps, fmtt_steps = (5, 10), (5,)
        bases = {eta: base_chain(base_steps, 512, 1, eta) for eta in ETAS}
        per_dim = gaussian_widths(base_steps, 512, 1)
        fmtt = fmtt_runs(fmtt_steps, 64, 1, 4)
        meta = "quick: N 512 / 64, 1 seed"
    else:
        base_steps, fmtt_steps = (5, 10, 20, 40, 80), (5, 10, 20, 40)
        bases = {eta: base_chain(base_steps, 32768, 2, eta) for eta in ETAS}
        per_dim = gaussian_widths((5, 10, 20, 40), 32768, 2)
        fmtt = fmtt_runs(fmtt_steps, 2048, 3, 8)
        meta = "base chain N 32768 x 2 seeds, FMTT N 2048 x 3 seeds, flow map = RK4(8) on the exact denoiser"
    text = tables(bases, per_dim, base_steps, fmtt, fmtt_steps, meta)
    text += f"\n{time.perf_counter() - start:.0f} s on one thread.\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "steps.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
