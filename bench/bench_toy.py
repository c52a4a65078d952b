"""The authors' toy table, rebuilt: ring base, wavy-ring reward, step sweep (issue 9).

Source: github.com/flow-map-trajectory-tilting/fmtt_icml2026_submission,
toy_ring_step_sweep_amp008/results.md (numbers in AUTHORS below) and its figures. The repository has
no code, so the setting is rebuilt from the stated knobs and the figures; every guess is marked GUESS.

  stated  reward_ramp_end 0.1 -> RampTilt(0.1); ess_threshold 0.9; stochasticity_scale 0.1 -> eta 0.1;
          ring_cycloid_freq 12 lobes; ring_cycloid_amplitude 0.08; steps 50 / 100 / 200 / 500;
          reward in [0, 1]; target by rejection sampling; metrics MMD, SW2, mean reward, resamples.
  GUESS   base: a "GMM" ring of 64 equal Gaussians, radius 0.95, std 0.04 (the figure's ring: width
          ~0.1 around radius ~0.95); the exact denoiser and flow map of that mixture stand in for the
          authors' trained model and distilled flow map (ours is ideal, theirs is learned).
  GUESS   reward: exp(-d^2 / (2 * 0.03^2)), d = |x| - R(theta) the radial distance to the wavy ring
          R(theta) = 0.95 + 0.08 * c(12 theta), c a cycloid-like profile in [-1, 1] with sharp outer
          tips (c(u) = 1 - 2 |sin(u / 2)|, the figure's star shape).
  GUESS   beta = 10 (the figure's tilted reward histogram piles up at 1); linear tilt to 1 by t = 0.1.
  GUESS   MMD: squared MMD with a Gaussian kernel of bandwidth 0.1, times 100 (the authors' values
          0.03-4.3 exceed what an unscaled MMD^2 in [0, 2] of a collapsed population reaches only
          with some scaling); SW2: sliced 2-Wasserstein over 128 directions. Compare within a column,
          not across tables.
  GUESS   N = 1000 particles (not stated), 1 seed per cell unless --seeds.

Rows: flow map with Eulerian weights (the authors' method), denoiser with the authors' Eulerian
weights, each look-ahead with our exact weights (advective, twisted, and the default auto: per step
twisted or advective), no look-ahead (zero-order / FK-style
potentials on x itself is not defined in the core; we run the tilt with lambda_t r(x_t), i.e. the
identity look-ahead, as the authors' "no lookahead" row describes).

    python bench/bench_toy.py            # full sweep, prints and writes bench/results/toy_ring.md
    python bench/bench_toy.py --quick    # 50 steps, N 256: a smoke run, prints only
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import fmtt_core as fc
from fmtt_core.analytic import GaussianMixture

RESULTS = Path(__file__).resolve().parent / "results"
AUTHORS = {  # steps -> method -> (MMD, SW2, mean reward, resamples), from results.md
    50: {"no look-ahead": (0.996, 0.578, 0.911, 46), "denoiser, eulerian": (3.973, 0.988, 0.917, 47),
         "flow map, eulerian": (0.043, 0.060, 0.621, 5)},
    100: {"no look-ahead": (0.460, 0.443, 0.958, 64), "denoiser, eulerian": (4.131, 0.979, 0.949, 81),
          "flow map, eulerian": (0.065, 0.083, 0.925, 10)},
    200: {"no look-ahead": (4.332, 0.902, 0.977, 84), "denoiser, eulerian": (3.016, 0.942, 0.964, 135),
          "flow map, eulerian": (0.065, 0.126, 0.967, 9)},
    500: {"no look-ahead": (3.459, 0.857, 0.972, 155), "denoiser, eulerian": (3.717, 0.977, 0.976, 198),
          "flow map, eulerian": (0.031, 0.089, 0.971, 6)},
}
RADIUS, STD, MODES, AMP, LOBES, WIDTH, BETA = 0.95, 0.04, 64, 0.08, 12, 0.03, 10.0


def ring_base() -> GaussianMixture:
    ang = torch.arange(MODES, dtype=torch.float64) * 2 * math.pi / MODES
    means = RADIUS * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return GaussianMixture(torch.ones(MODES), means, torch.full((MODES, 2), STD ** 2))


def wavy_ring_reward(x: torch.Tensor) -> torch.Tensor:
    theta = torch.atan2(x[:, 1], x[:, 0])
    ring = RADIUS + AMP * (1 - 2 * torch.sin(LOBES * theta / 2).abs())
    d = x.norm(dim=1) - ring
    return torch.exp(-d ** 2 / (2 * WIDTH ** 2))


def target_samples(base: GaussianMixture, n: int, seed: int = 7) -> torch.Tensor:
    """Rejection sampling of p * exp(beta r): accept with probability exp(beta (r - 1)) (r <= 1)."""
    g, out, have = torch.Generator().manual_seed(seed), [], 0
    while have < n:
        x = base.sample(200_000, g)
        keep = torch.rand(x.shape[0], generator=g, dtype=torch.float64) < torch.exp(BETA * (wavy_ring_reward(x) - 1))
        out.append(x[keep])
        have += int(keep.sum())
    return torch.cat(out)[:n]


def mmd100(x, w, y, bandwidth=0.1) -> float:
    """100 x squared MMD (Gaussian kernel) between weighted particles and target samples (V-statistic)."""
    k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * bandwidth ** 2))  # noqa: E731
    v = torch.full((y.shape[0],), 1 / y.shape[0], dtype=torch.float64)
    return 100 * float(w @ k(x, x) @ w + v @ k(y, y) @ v - 2 * w @ k(x, y) @ v)


def sw2(x, w, y, directions=128, seed=0) -> float:
    """Sliced 2-Wasserstein: weighted particles vs target samples, quantile matching per direction."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(directions, 2, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    q = torch.linspace(0.0005, 0.9995, 1000, dtype=torch.float64)
    total = 0.0
    for d in dirs:
        px, order = torch.sort(x @ d)
        cdf = torch.cumsum(w[order], 0)
        qx = px[torch.searchsorted(cdf, q * cdf[-1]).clamp(max=px.numel() - 1)]
        qy = torch.quantile(y @ d, q)
        total += float(((qx - qy) ** 2).mean())
    return math.sqrt(total / directions)


class Identity:
    """The 'no look-ahead' row: the reward at the current state, r(x_t)."""

    kind, uses_denoised = "identity", False

    def __call__(self, x, t, denoised=None, nfe=None):
        return x

    def __str__(self):
        return "none"


def methods(base: GaussianMixture, rk4: int):
    flow = lambda: fc.FlowMapLookahead(lambda x, s, t: base.flow_map(x, s, t, rk4))  # noqa: E731
    den = lambda: fc.DenoiserLookahead(base.denoiser)  # noqa: E731
    return {"no look-ahead": (Identity, "eulerian"), "denoiser, eulerian": (den, "eulerian"),
            "denoiser, advective (ours)": (den, "advective"), "denoiser, twisted (ours)": (den, "twisted"),
            "denoiser, auto (ours, default)": (den, "auto"),
            "flow map, eulerian": (flow, "eulerian"), "flow map, advective (ours)": (flow, "advective"),
            "flow map, twisted (ours)": (flow, "twisted"), "flow map, auto (ours, default)": (flow, "auto")}


def run(steps_list, n, seeds, rk4, names=None):
    base = ring_base()
    y = target_samples(base, 2000)
    rows = []
    for steps in steps_list:
        for name, (look, weights) in methods(base, rk4).items():
            if names and name not in names:
                continue
            cells, start = [], time.perf_counter()
            for seed in range(seeds):
                x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
                cfg = fc.FMTTConfig(reward_scale=BETA, tilt=fc.RampTilt(0.1), eta=0.1, ess_threshold=0.9,
                                    weights=weights, seed=seed)
                res = fc.fmtt_sample(base.denoiser, x0, fc.time_grid(steps), reward=wavy_ring_reward,
                                     lookahead=look(), config=cfg)
                w = res.weights
                cells.append((mmd100(res.samples, w, y), sw2(res.samples, w, y),
                              float(w @ torch.nan_to_num(res.rewards, nan=0.0)), res.n_resamples))
            avg = tuple(sum(c[i] for c in cells) / seeds for i in range(4))
            rows.append((steps, name, *avg, time.perf_counter() - start))
            print(f"  {steps} steps, {name}: MMD {avg[0]:.3f} SW2 {avg[1]:.3f} reward {avg[2]:.3f} "
                  f"resamples {avg[3]:.0f}", flush=True)
    return rows, float(wavy_ring_reward(y).mean())


def table(rows, target_reward, meta) -> str:
    lines = [f"# Authors' toy table, rebuilt ({meta})", "",
             (f"Rejection-sampled target: mean reward {target_reward:.3f}. Ours vs the authors' (results.md); "
             "the authors' model and flow map are learned, ours exact; MMD scale is a GUESS (see bench_toy.py)."), "",
             ("| steps | method | MMD (ours / authors) | SW2 (ours / authors) | mean reward (ours / authors) | "
             "resamples (ours / authors) |"), "|---:|---|---:|---:|---:|---:|"]
    for steps, name, mmd, sw, rew, res, _ in rows:
        theirs = AUTHORS.get(steps, {}).get(name)
        cells = [f"{spec.format(ours)} / {spec.format(theirs[i]) if theirs else '—'}"
                 for i, (ours, spec) in enumerate(((mmd, "{:.3f}"), (sw, "{:.3f}"), (rew, "{:.3f}"), (res, "{:.0f}")))]
        lines.append(f"| {steps} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def floors(steps_list, n, seeds=4) -> str:
    """What the table's columns mean at N = n: the MMD / SW2 of exact target samples (rejection-sampled,
    uniform weights) against the same 2000 target samples the rows are scored on (the estimators' floor),
    and the mean reward of the target and of base sampling + final importance weights exp(beta r(x1)),
    which is what an exact weight rule reaches at that step count."""
    base = ring_base()
    y = target_samples(base, 2000)
    uniform = torch.full((n,), 1 / n, dtype=torch.float64)
    exact = [target_samples(base, n, seed=50 + s) for s in range(seeds)]
    mmd_floor = sum(mmd100(x, uniform, y) for x in exact) / seeds
    sw_floor = sum(sw2(x, uniform, y) for x in exact) / seeds
    lines = [f"## Floors and references at N {n} ({seeds} seeds; `python bench/bench_toy.py --floors`)", "",
             f"- Exact target samples score MMD {mmd_floor:.3f} and SW2 {sw_floor:.3f} against the same target set: "
             "rows at or near these values are indistinguishable from exact samples by these estimators. The "
             "authors' 0.03-0.07 MMD sits far below our floor, so the MMD values do not compare with theirs.",
             f"- Target mean reward {float(wavy_ring_reward(y).mean()):.3f}.", "",
             "| steps | base + final importance weights: mean reward | its final ESS / N |", "|---:|---:|---:|"]
    for steps in steps_list:
        rewards, ess = [], []
        for seed in range(seeds):
            x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
            res = fc.base_sample(base.denoiser, x0, fc.time_grid(steps), reward=wavy_ring_reward,
                                 config=fc.FMTTConfig(eta=0.1, seed=seed))
            w = torch.softmax(BETA * res.rewards, 0)
            rewards.append(float(w @ res.rewards))
            ess.append(float(1 / (w ** 2).sum()) / n)
        lines.append(f"| {steps} | {sum(rewards) / seeds:.3f} | {sum(ess) / seeds:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50 steps, N 256, prints only")
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 500])
    ap.add_argument("--particles", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--floors", action="store_true",
                    help="only the estimators' floors and the base + final weights references, appended to the table")
    ap.add_argument("--rk4", type=int, default=6, help="RK4 steps of the exact flow map (cost of the flow-map rows)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.floors:
        text = floors(args.steps, args.particles)
        print(text)
        path = RESULTS / "toy_ring.md"
        kept = path.read_text().split("## Floors and references")[0].rstrip() + "\n\n"
        path.write_text(kept + text)
        return
    if args.quick:
        rows, tr = run([50], 256, 1, 4)
        meta = "quick: 50 steps, N 256"
    else:
        rows, tr = run(args.steps, args.particles, args.seeds, args.rk4)
        meta = f"N {args.particles}, {args.seeds} seed(s), flow map RK4({args.rk4})"
    text = table(rows, tr, meta) + f"\n{time.perf_counter() - start:.0f} s on one thread.\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "toy_ring.md").write_text(text)


if __name__ == "__main__":
    main()
