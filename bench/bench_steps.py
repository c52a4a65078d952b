"""Error and ESS versus steps: the SDE step (Euler-Maruyama vs exponential) and the weight rules.

Part 1, the base chain: untilted sampling of the analytic targets (fmtt_core.analytic) with
Euler-Maruyama and with the exponential step, against the exact data law. Weights cannot remove this
error: every exact weighting targets the base chain's law times exp(beta r).
Part 2, FMTT exact mode with each weight rule (twisted = the default, advective, eulerian) and
look-ahead (exact flow map by RK4, the denoiser), on the ring with the quadratic reward: error of the
weighted mean against the exact tilted law, final ESS / N and resamplings.

    python bench/bench_steps.py            # ~8 min on one core: prints and writes bench/results/steps.md
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
C2 = torch.tensor([4.0, 0.0], dtype=torch.float64)


def errors(x, w, law):
    m = w @ x
    v = w @ (x - m) ** 2
    sd = law.cov().diag().sqrt()
    return float(((m - law.mean()) / sd).abs().max()), float((v / law.cov().diag() - 1).abs().max())


def x_init(n, dim, seed):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)


def base_chain(steps_list, n, seeds):
    rows = []
    for name, law in (("ring 2-D", RING), ("gmm 8-D", GMM8)):
        for steps in steps_list:
            for kind in fc.SDE_STEPS:
                errs = []
                for seed in range(seeds):
                    res = fc.base_sample(law.denoiser, x_init(n, law.dim, seed), fc.time_grid(steps),
                                         config=fc.FMTTConfig(sde_step=kind, seed=seed))
                    errs.append(errors(res.samples, torch.full((n,), 1 / n, dtype=torch.float64), law))
                rows.append((name, steps, kind, *[sum(e[i] for e in errs) / seeds for i in range(2)]))
    return rows


def weight_rules(steps_list, n, seeds, rk4):
    reward, beta = quadratic_reward(C2, 1.0), 1.0
    law = RING.tilt_quadratic(C2, beta)
    looks = {"flow map": lambda: fc.FlowMapLookahead(lambda x, s, t: RING.flow_map(x, s, t, rk4)),
             "denoiser": lambda: fc.DenoiserLookahead(RING.denoiser)}
    rows = []
    for steps in steps_list:
        for look_name, look in looks.items():
            for weights in ("twisted", "advective", "eulerian"):
                out = []
                for seed in range(seeds):
                    res = fc.fmtt_sample(RING.denoiser, x_init(n, 2, seed), fc.time_grid(steps), reward=reward,
                                         lookahead=look(), config=fc.FMTTConfig(reward_scale=beta, weights=weights,
                                                                                seed=seed))
                    out.append((*errors(res.samples, res.weights, law), res.ess / n, res.n_resamples))
                rows.append((steps, look_name, weights, *[sum(o[i] for o in out) / seeds for i in range(4)]))
    return rows


def tables(base_rows, weight_rows, meta) -> str:
    lines = [f"# Error vs steps ({meta})", "", "## Base chain (no reward): error against the data law", "",
             "| target | steps | step | mean err | var err |", "|---|---:|---|---:|---:|"]
    lines += [f"| {a} | {s} | {k} | {m:.3f} | {v:.3f} |" for a, s, k, m, v in base_rows]
    lines += ["", "## FMTT exact on the ring (quadratic reward, beta 1): weight rules", "",
              "| steps | look-ahead | weights | mean err | var err | final ESS/N | resamples |",
              "|---:|---|---|---:|---:|---:|---:|"]
    lines += [f"| {s} | {lk} | {w} | {m:.3f} | {v:.3f} | {e:.2f} | {r:.1f} |" for s, lk, w, m, v, e, r in weight_rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (small N, one seed), prints only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.quick:
        base_rows = base_chain((5, 10), 256, 1)
        weight_rows = weight_rules((5,), 64, 1, 4)
        meta = "quick: N 256 / 64, 1 seed"
    else:
        base_rows = base_chain((10, 20, 40, 80), 8192, 2)
        weight_rows = weight_rules((5, 10, 20, 40), 1024, 3, 8)
        meta = "base chain N 8192 x 2 seeds, FMTT N 1024, 3 seeds, flow map = RK4(8) on the exact denoiser"
    text = tables(base_rows, weight_rows, meta) + f"\n{time.perf_counter() - start:.0f} s on one thread.\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "steps.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
