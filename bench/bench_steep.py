"""The steep-gradient case of issue 9 at the reviewer's scale: N = 16000, 40 steps, beta 2.

The review measured |grad r| ~ 2600 on "a 2-D four-component mixture" with an exact flow map: one
Euler-Maruyama step threw a particle 134x its noise, resampling cloned it, and the mean was off by 20.
The mixture and reward were not given. GUESS: four well-separated Gaussians at (+-2, +-2), variance
0.1, weights 0.4/0.3/0.2/0.1, and a smooth linear reward r(x) = x_0. The steepness then comes from the
flow map itself: near a separatrix between basins X_{t,1} stretches space enormously, so
grad r_t = J^T grad r reaches 1e4-1e5 on the few particles that start there (the more particles, the
more such starts: this is why the review needed N = 16000). Rows: the old default for flow maps
(Eulerian weights, no taming), then each rule with the default push taming (max_push 4), twisted
untamed, and the default `auto`. Error = |weighted mean - exact tilted mean| (closed form); the
Monte-Carlo floor is the error of N i.i.d. base samples weighted by exp(beta r).

    python bench/bench_steep.py            # 3 seeds, prints and writes bench/results/steep.md
    python bench/bench_steep.py --quick    # 1 seed, N 4000
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import fmtt_core as fc
from fmtt_core.analytic import GaussianMixture

RESULTS = Path(__file__).resolve().parent / "results"
STEEP = GaussianMixture(torch.tensor([0.4, 0.3, 0.2, 0.1]),
                        torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]]), torch.full((4, 2), 0.1))
BETA, STEPS = 2.0, 40
ROWS = [  # name, weights, max_push
    ("eulerian, no taming (the old default)", "eulerian", None),
    ("eulerian, tamed", "eulerian", 4.0),
    ("advective, tamed", "advective", 4.0),
    ("twisted, no taming", "twisted", None),
    ("twisted, tamed", "twisted", 4.0),
    ("auto, tamed (default)", "auto", 4.0),
]


A = torch.tensor([1.0, 0.0], dtype=torch.float64)


def steep_reward(x):
    return x @ A


def run(n, seeds):
    truth = STEEP.tilt_linear(BETA * A).mean()
    floor = []
    for seed in seeds:
        iid = STEEP.sample(n, torch.Generator().manual_seed(50 + seed))
        floor.append(float((torch.softmax(BETA * steep_reward(iid), 0) @ iid - truth).norm()))
    rows = [("i.i.d. base + exact weights (Monte-Carlo floor)", sum(floor) / len(floor), None, None, None, None)]
    look = fc.FlowMapLookahead(lambda x, s, t: STEEP.flow_map(x, s, t, 6))
    for name, weights, max_push in ROWS:
        errs, ess, res_n, warned, start = [], [], [], 0, time.perf_counter()
        for seed in seeds:
            x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            cfg = fc.FMTTConfig(reward_scale=BETA, weights=weights, max_push=max_push, seed=seed)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = fc.fmtt_sample(STEEP.denoiser, x0, fc.time_grid(STEPS), reward=steep_reward, lookahead=look,
                                     config=cfg)
            warned += any("noise" in str(w.message) for w in caught)
            errs.append(float((res.weights @ res.samples - truth).norm()))
            ess.append(res.ess / n)
            res_n.append(res.n_resamples)
        k = len(seeds)
        rows.append((name, sum(errs) / k, max(errs), sum(ess) / k, sum(res_n) / k, f"{warned}/{k}"))
        print(f"  {name}: error {sum(errs) / k:.3f} (max {max(errs):.3f}), ESS {sum(ess) / k:.2f}, "
              f"resamples {sum(res_n) / k:.1f}, steep-push warnings {warned}/{k} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return rows, truth


def table(rows, truth, meta) -> str:
    lines = [f"# Steep gradients at scale ({meta})", "",
             f"Exact tilted mean ({float(truth[0]):.3f}, {float(truth[1]):.3f}); error = |weighted mean - exact|.", "",
             ("| weights | mean error | worst seed | final ESS / N | resamplings | "
              "runs warned of a push > 40x the noise |"),
             "|---|---:|---:|---:|---:|---:|"]
    for name, err, worst, ess, res, warned in rows:
        cells = [f"{err:.3f}"] + ["—" if v is None else spec.format(v) for v, spec in
                                  ((worst, "{:.3f}"), (ess, "{:.2f}"), (res, "{:.1f}"), (warned, "{}"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, N 4000, prints only")
    ap.add_argument("--particles", type=int, default=16000)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    n, seeds = (4000, [1]) if args.quick else (args.particles, list(range(1, args.seeds + 1)))
    rows, truth = run(n, seeds)
    meta = f"N {n}, {STEPS} steps, beta {BETA:g}, seeds {seeds}, exact flow map (RK4(6))"
    text = table(rows, truth, meta) + f"\n{time.perf_counter() - start:.0f} s on one thread.\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "steep.md").write_text(text)


if __name__ == "__main__":
    main()
