"""FMTT against its baselines on analytic targets where the tilted law is known exactly.

Targets (fmtt_core.analytic): a 2-D ring of 8 Gaussians with a quadratic reward centred on one mode,
and an 8-D 4-component diagonal Gaussian mixture with a linear reward. Both tilts are again Gaussian
mixtures, so every weighted population can be scored against the exact law p_data * exp(beta r):

  mean err   mean over dimensions of |weighted mean - exact mean| / exact std
  cov err    |weighted covariance - exact covariance|_F / |exact covariance|_F
  energy     energy distance (V-statistic, >= 0) between the weighted particles and exact samples;
             it grows as 1 / ESS, so degenerate weights are penalised
  bias z     max over dimensions of |seed-averaged mean - exact| / its standard error across seeds

Cost is counted by the samplers' own NFE counter. The flow-map look-ahead is the exact flow map
(fine RK4 on the exact denoiser) charged as ONE model call per jump: an ideal learned flow map.
The `i.i.d. exact` row draws N samples from the tilted law itself: the Monte-Carlo floor of each
metric at that N, plotted at the cost of a plain N-particle sampler.

    python bench/bench_analytic.py                          # ~7 min, 1 thread: bench/results/analytic.*
    python bench/bench_analytic.py --setting toy --seeds 4  # authors' toy knobs: analytic_toy.*
    python bench/bench_analytic.py --quick                  # smoke run (~10 s), prints only
    python bench/bench_analytic.py --replot bench/results/analytic.json   # redraw the plot
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import fmtt_core as fc
from fmtt_core.analytic import (
    GaussianMixture,
    linear_reward,
    quadratic_reward,
    ring_mixture,
)

RESULTS = Path(__file__).resolve().parent / "results"


# --- targets ------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    mixture: GaussianMixture
    reward: Callable[[torch.Tensor], torch.Tensor]   # unscaled r(x)
    tilted: GaussianMixture                          # exact law of p_data * exp(beta r)
    beta: float
    success: Callable[[torch.Tensor], torch.Tensor] | None = None  # [N] in {0, 1}: the sample is a "hit"


def ring_target(beta: float = 1.0) -> Target:
    ring = ring_mixture(8, 4.0, 0.5)
    centre = torch.tensor([4.0, 0.0], dtype=torch.float64)  # on the mode at angle 0
    return Target(f"ring2d-quadratic(beta={beta:g})", ring, quadratic_reward(centre, 1.0),
                  ring.tilt_quadratic(centre, beta), beta)


def gmm8_target(beta: float = 1.0) -> Target:
    gm = GaussianMixture(
        torch.tensor([0.3, 0.3, 0.2, 0.2]),
        2 * torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
        0.2 + 0.5 * torch.rand(4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    a = torch.tensor([1.0, -0.5, 0, 0, 0.5, 0, 0, 0], dtype=torch.float64)
    return Target(f"gmm8d-linear(beta={beta:g})", gm, linear_reward(a), gm.tilt_linear(beta * a), beta)


# --- sampler settings and methods ---------------------------------------------------------------
@dataclass
class Setting:
    """Knobs shared by every method. Defaults are the pack's defaults."""

    steps: int = 30
    eta: float = 1.0
    tilt: Callable = field(default_factory=fc.LinearTilt)
    ess_threshold: float = 0.5
    # RK4 steps of the 'ideal' flow map. 12 already gives ~1e-3 endpoints, but its GRADIENT is off
    # by up to 60x at particles near the 8-D mixture's basin boundaries (where the exact map's
    # Jacobian reaches ~1e3-1e4); 24 brings that to < 25% for the worst particle of 1024.
    flow_map_rk4_steps: int = 24


SETTINGS = {
    "default": Setting(),
    # The authors' 2-D toy: fast tilt ramp, little noise, eager resampling.
    "toy": Setting(steps=50, eta=0.1, tilt=fc.RampTilt(0.1), ess_threshold=0.9),
}


@dataclass
class Method:
    """One fmtt_core sampler plus its method-specific options; all share the core's one signature
    sampler(denoiser, x_init, times, *, reward, config, **options)."""

    name: str
    sampler: Callable
    scored: bool       # its (weighted) population is compared with the tilted law
    weighted: bool     # it carries non-uniform importance weights (ESS is meaningful)
    reward_kind: str   # "mean" (weighted mean reward), "best" (reward of the pick), "population"
    config: dict = field(default_factory=dict)                # FMTTConfig fields beyond the setting's
    options: Callable = field(default=lambda target, setting: {})  # e.g. the look-ahead
    reweigh: bool = False  # weight the final samples by exp(beta r(x1)) (base + importance sampling)

    def run(self, target: Target, x0, times, setting: Setting, seed: int) -> fc.FMTTResult:
        cfg = fc.FMTTConfig(reward_scale=target.beta, tilt=setting.tilt, eta=setting.eta,
                            ess_threshold=setting.ess_threshold, seed=seed, **self.config)
        res = self.sampler(target.mixture.denoiser, x0, times, reward=target.reward, config=cfg,
                           **self.options(target, setting))
        if self.reweigh:  # the cheapest exact estimator: base samples weighted by exp(beta r(x1))
            res.log_weights = fc.normalize_log_weights(target.beta * torch.nan_to_num(res.rewards, nan=-math.inf))
            res.method = "base+IS"
        return res


def _flow_map(target: Target, setting: Setting) -> dict:
    gm, steps = target.mixture, setting.flow_map_rk4_steps
    return {"lookahead": fc.FlowMapLookahead(lambda x, s, t: gm.flow_map(x, s, t, steps))}


def _ode(k):
    return lambda target, setting: {"lookahead": fc.ODELookahead(target.mixture.denoiser, k)}


def _denoiser(target, setting):
    return {"lookahead": fc.DenoiserLookahead(target.mixture.denoiser)}


def _fk(potential):
    return lambda target, setting: {"potential": potential}


METHODS = [
    Method("FMTT flow map", fc.fmtt_sample, True, True, "mean", options=_flow_map),
    Method("FMTT flow map, eulerian w", fc.fmtt_sample, True, True, "mean", {"weights": "eulerian"}, _flow_map),
    Method("FMTT ODE(2)", fc.fmtt_sample, True, True, "mean", options=_ode(2)),
    Method("FMTT ODE(4)", fc.fmtt_sample, True, True, "mean", options=_ode(4)),
    Method("FMTT denoiser", fc.fmtt_sample, True, True, "mean", options=_denoiser),
    Method("FMTT denoiser, advective w", fc.fmtt_sample, True, True, "mean", {"weights": "advective"}, _denoiser),
    Method("FMTT denoiser, eulerian w", fc.fmtt_sample, True, True, "mean", {"weights": "eulerian"}, _denoiser),
    Method("FMTT denoiser, twisted w", fc.fmtt_sample, True, True, "mean", {"weights": "twisted"}, _denoiser),
    Method("FMTT flow map, advective w", fc.fmtt_sample, True, True, "mean", {"weights": "advective"}, _flow_map),
    Method("FMTT flow map, twisted w", fc.fmtt_sample, True, True, "mean", {"weights": "twisted"}, _flow_map),
    Method("FMTT zero-order flow map", fc.fmtt_sample, True, True, "mean", {"mode": "zero_order"}, _flow_map),
    Method("FMTT search flow map", fc.fmtt_sample, False, False, "population", {"mode": "search"}, _flow_map),
    Method("FK steering diff", fc.fk_steering, True, True, "mean", options=_fk("diff")),
    Method("FK steering max", fc.fk_steering, True, True, "mean", options=_fk("max")),
    Method("guidance (no weights)", fc.guidance_sample, True, False, "mean"),
    Method("best-of-N", fc.best_of_n, False, False, "best"),
    Method("base + IS weights", fc.best_of_n, True, True, "mean", reweigh=True),
]
IID = "i.i.d. exact (MC floor)"


# --- metrics --------------------------------------------------------------------------------------
def weighted_moments(x: torch.Tensor, w: torch.Tensor):
    m = w @ x
    c = (w[:, None] * (x - m)).T @ (x - m)
    return m, c


def energy_distance(x, w, y, yy_term: float) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| with X ~ sum_i w_i delta_{x_i}, Y uniform on y (V-statistic)."""
    xy = w @ torch.cdist(x, y).mean(1)
    xx = w @ torch.cdist(x, x) @ w
    return float(2 * xy - xx - yy_term)


@dataclass
class Reference:
    """Exact quantities of one target's tilted law."""

    mean: torch.Tensor
    std: torch.Tensor
    cov: torch.Tensor
    samples: torch.Tensor
    yy_term: float
    reward_mean: float
    success: Callable[[torch.Tensor], torch.Tensor] | None = None
    success_rate: float | None = None  # of the exact tilted law

    @classmethod
    def of(cls, target: Target, n_samples: int) -> Reference:
        law = target.tilted
        y = law.sample(n_samples, torch.Generator().manual_seed(12345))
        big = law.sample(200_000, torch.Generator().manual_seed(54321))  # E[r] to ~1e-3
        return cls(law.mean(), law.cov().diag().sqrt(), law.cov(), y, float(torch.cdist(y, y).mean()),
                   float(target.reward(big).mean()), target.success,
                   float(target.success(big).double().mean()) if target.success else None)


def population_metrics(x: torch.Tensor, w: torch.Tensor, ref: Reference) -> dict:
    x, w = x.double(), w.double()
    m, c = weighted_moments(x, w)
    return {"mean_err": float(((m - ref.mean).abs() / ref.std).mean()),
            "cov_err": float((c - ref.cov).norm() / ref.cov.norm()),
            "energy": energy_distance(x, w, ref.samples, ref.yy_term),
            "mean_vec": m.tolist()}


def run_metrics(method: Method, res: fc.FMTTResult, ref: Reference, n: int) -> dict:
    out = {"nfe_model": res.nfe.model / n, "nfe_backward": res.nfe.backward / n,
           "nfe_reward": res.nfe.reward / n, "total_model_nfe": res.nfe.model}
    r = res.rewards
    if method.reward_kind == "best":
        out["reward"] = float(r[res.best_index])
    elif method.reward_kind == "population":
        out["reward"] = float(r.nanmean())
        out["reward_best"] = float(r[res.best_index])
    else:
        out["reward"] = float(res.weights @ torch.nan_to_num(r, nan=0.0))
    if ref.success is not None:  # hit rate of what the method hands on, read like its reward
        hit = ref.success(res.samples).double()
        out["success"] = float(hit[res.best_index] if method.reward_kind == "best" else
                               hit.mean() if method.reward_kind == "population" else res.weights.double() @ hit)
    if method.scored:
        out.update(population_metrics(res.samples, res.weights, ref))
    if method.weighted:
        out["ess_frac"] = res.ess / n
    if res.method.startswith(("fmtt", "fk")):  # the samplers that resample (or select)
        out["resamples"] = res.n_resamples
    if res.method.startswith(("fmtt-exact", "fmtt-zero_order")):
        out["thermo"] = res.thermodynamic_length
    return out


# --- the benchmark --------------------------------------------------------------------------------
@dataclass
class Config:
    targets: list[Target]
    particles: tuple[int, ...] = (64, 256, 1024)
    seeds: int = 6
    setting: Setting = field(default_factory=Setting)
    reference_samples: int = 2000
    methods: list[Method] = field(default_factory=lambda: list(METHODS))


def run_benchmark(cfg: Config, log=print) -> tuple[list[dict], dict[str, Reference]]:
    """-> (one record per (target, method, N, seed), the exact reference of each target)."""
    records, references = [], {}
    times = fc.time_grid(cfg.setting.steps)
    for target in cfg.targets:
        ref = references[target.name] = Reference.of(target, cfg.reference_samples)
        for n in cfg.particles:
            for seed in range(cfg.seeds):
                # Common random numbers: every method starts from the same noise for a given seed.
                x0 = torch.randn(n, target.mixture.dim, generator=torch.Generator().manual_seed(1000 + seed),
                                 dtype=torch.float64)
                iid = target.tilted.sample(n, torch.Generator().manual_seed(2000 + seed))
                records.append({"target": target.name, "method": IID, "N": n, "seed": seed,
                                "total_model_nfe": n * cfg.setting.steps, "reward": float(target.reward(iid).mean()),
                                **({"success": float(target.success(iid).double().mean())} if target.success else {}),
                                **population_metrics(iid, torch.full((n,), 1.0 / n, dtype=torch.float64), ref)})
                for method in cfg.methods:
                    start = time.perf_counter()
                    res = method.run(target, x0, times, cfg.setting, seed)
                    rec = {"target": target.name, "method": method.name, "N": n, "seed": seed,
                           **run_metrics(method, res, ref, n), "seconds": time.perf_counter() - start}
                    records.append(rec)
            log(f"  {target.name}  N={n}: done")
    return records, references


def _seed_stats(values):
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), (float(v.std()) if len(values) > 1 else 0.0)


def summarise(records: list[dict], references: dict) -> list[dict]:
    """Mean and std over seeds for each (target, method, N); bias z from the seed-averaged mean."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["target"], rec["method"], rec["N"]), []).append(rec)
    rows = []
    for (target, method, n), recs in groups.items():
        row = {"target": target, "method": method, "N": n, "seeds": len(recs)}
        for key in ("nfe_model", "nfe_backward", "total_model_nfe", "mean_err", "cov_err", "energy",
                    "ess_frac", "resamples", "thermo", "reward", "reward_best", "success", "seconds"):
            if key in recs[0]:
                row[key] = _seed_stats([r[key] for r in recs])
        if "mean_vec" in recs[0] and len(recs) > 1:
            means = torch.tensor([r["mean_vec"] for r in recs], dtype=torch.float64)
            se = means.std(0) / math.sqrt(len(recs))
            row["bias_z"] = float(((means.mean(0) - references[target].mean).abs() / se.clamp_min(1e-12)).max())
        rows.append(row)
    return rows


# --- output ---------------------------------------------------------------------------------------
COLUMNS = [  # (header, key, format)
    ("model NFE/particle", "nfe_model", "{:.0f}"),
    ("backward/particle", "nfe_backward", "{:.0f}"),
    ("total model NFE", "total_model_nfe", "{:.3g}"),
    ("mean err", "mean_err", "{:.3f}"),
    ("cov err", "cov_err", "{:.3f}"),
    ("energy", "energy", "{:.4f}"),
    ("bias z", "bias_z", "{:.1f}"),
    ("ESS/N", "ess_frac", "{:.2f}"),
    ("resamples", "resamples", "{:.1f}"),
    ("thermo length", "thermo", "{:.2f}"),
    ("reward", "reward", "{:.3f}"),
]


def _cell(row, key, fmt):
    if key not in row:
        return "—"
    val = row[key]
    if isinstance(val, tuple):
        mean, std = val
        if key in ("nfe_model", "nfe_backward", "total_model_nfe") or std == 0:
            return fmt.format(mean)
        return f"{fmt.format(mean)} ± {fmt.format(std)}"
    return fmt.format(val)


def critical_z(seeds: int, dim: int, level: float = 0.01) -> float | None:
    """Two-sided Student-t quantile for the bias z column, Bonferroni over the dimensions."""
    try:
        from scipy import stats
    except ImportError:
        return None
    return float(stats.t.ppf(1 - level / (2 * dim), seeds - 1)) if seeds > 1 else None


def outlying_seeds(records: list[dict], target: str, factor: float = 4.0) -> list[str]:
    """Seeds whose mean err exceeds `factor` x the median over seeds of the same (method, N): rare
    failures that a mean +- std hides or blames on noise."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        if rec["target"] == target and "mean_err" in rec and rec["method"] != IID:
            groups.setdefault((rec["method"], rec["N"]), []).append(rec)
    notes = []
    for (method, n), recs in groups.items():
        median = float(torch.tensor([r["mean_err"] for r in recs]).median())
        notes += [f"{method}, N={n}, seed {r['seed']}: mean err {r['mean_err']:.3f} (median {median:.3f})"
                  for r in recs if r["mean_err"] > factor * median]
    return notes


def markdown_table(rows: list[dict], references: dict, setting: Setting, records: list[dict] | None = None) -> str:
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows):
        ref, seeds = references[target], rows[0]["seeds"]
        crit = critical_z(seeds, ref.mean.numel())
        lines += [f"### {target}", "",
                  f"Exact tilted law: E[r] = {ref.reward_mean:.3f}. {setting.steps} steps, eta={setting.eta:g}, "
                  f"tilt={setting.tilt}, ESS threshold {setting.ess_threshold:g}, flow map = RK4 with "
                  f"{setting.flow_map_rk4_steps} steps; mean ± std over {seeds} seeds"
                  + (f"; bias z > {crit:.1f} is significant at 1%." if crit else "."), "",
                  "| method | N | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
                  "|---|---:|" + "---:|" * len(COLUMNS)]
        for row in (r for r in rows if r["target"] == target):
            reward = _cell(row, "reward", "{:.3f}")
            if "reward_best" in row:
                reward += f" (best {row['reward_best'][0]:.3f})"
            cells = [_cell(row, k, f) for _, k, f in COLUMNS[:-1]] + [reward]
            lines.append(f"| {row['method']} | {row['N']} | " + " | ".join(cells) + " |")
        outliers = outlying_seeds(records or [], target)
        if outliers:
            lines += ["", "Outlying seeds (mean err > 4 x the median of their row): " + "; ".join(outliers) + "."]
        lines.append("")
    return "\n".join(lines)


LEGEND = """\
- mean err: mean over dimensions of |weighted mean - exact mean| / exact std. cov err: relative
  Frobenius error of the weighted covariance. energy: energy distance to exact samples (2000 in full runs)
  (V-statistic, grows like 1/ESS). bias z: max over dimensions of |seed-averaged mean - exact| /
  its standard error across seeds (detects bias, not noise).
- model NFE: denoiser + look-ahead network calls (the flow map is charged 1 call per jump, as a
  learned flow map would be; here it is the exact flow map by RK4); backward: backward passes.
  total model NFE = N x model NFE/particle.
- ESS/N: final effective sample size, for methods with importance weights. resamples: ESS-triggered
  resamplings (top-k selections for search). thermo length: sum_k sqrt(Var_w[dA_k]).
- reward: weighted mean of r(x1) for samplers (compare with the exact E[r]); the selected
  sample's reward for best-of-N; the population mean (and best) for search, which claims no weights.
- i.i.d. exact: N samples of the tilted law itself: the Monte-Carlo floor of each metric at that N.
  base + IS weights: best-of-N's samples weighted by exp(beta r): the cheapest exact estimator.
"""


def plot(rows: list[dict], path: Path) -> None:
    """Error and ESS against total model NFE, one line per method; bars: standard error over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    targets = list(dict.fromkeys(r["target"] for r in rows))
    panels = [("mean_err", "mean err (std units)"), ("energy", "energy distance"), ("ess_frac", "final ESS / N"),
              ("resamples", "resamplings (selections for search)")]
    fig, axes = plt.subplots(len(targets), len(panels), figsize=(4.6 * len(panels), 4.0 * len(targets) + 1.2),
                             squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    palette = plt.cm.tab10.colors + ("#555555", "#b8860b", "#8fbc8f")
    style = {m: {"color": palette[i % len(palette)], "marker": "osD^v<>pXh*P"[i % 11],
                     "ls": "--" if m.startswith(("FK", "guidance", "best", "base")) else "-"}
             for i, m in enumerate(m for m in methods if m != IID)}
    style[IID] = {"color": "k", "marker": "", "ls": ":", "lw": 2}
    for i, target in enumerate(targets):
        for j, (key, label) in enumerate(panels):
            ax = axes[i, j]
            for method in methods:
                pts = sorted((r["total_model_nfe"][0], r[key][0], r[key][1] / math.sqrt(r["seeds"])) for r in rows
                             if r["target"] == target and r["method"] == method and key in r)
                if pts:
                    xs, ys, se = zip(*pts)
                    ax.errorbar(xs, ys, yerr=se, ms=4, capsize=2, label=method, **style[method])
            ax.set_xscale("log")
            if key in ("mean_err", "energy"):
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("total model NFE (denoiser + look-ahead calls)")
            ax.set_ylabel(label)
            ax.set_title(target, fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
    legend = {}  # every method once, in table order, whichever panel drew it
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    labels = [m for m in methods if m in legend]
    fig.legend([legend[m] for m in labels], labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 1.1 / (4.0 * len(targets) + 1.2), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- CLI ------------------------------------------------------------------------------------------
def quick_config(betas=(1.0,)) -> Config:
    """A smoke run: every method and metric, on small populations (under a minute)."""
    setting = replace(Setting(), steps=12, flow_map_rk4_steps=8)
    targets = [f(b) for b in betas for f in (ring_target, gmm8_target)]
    return Config(targets, particles=(32, 128), seeds=2, setting=setting, reference_samples=500)


def full_config(setting: str = "default", betas=(1.0,)) -> Config:
    targets = [f(b) for b in betas for f in (ring_target, gmm8_target)]
    return Config(targets, setting=SETTINGS[setting])


def _rounded(obj):
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


def write_outputs(out: Path, stem: str, command: str, seconds: float, rows, records, table) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header = f"# Analytic benchmark\n\nGenerated by `{command}` in {seconds:.0f} s (1 CPU thread).\n\n{LEGEND}\n"
    (out / f"{stem}.md").write_text(header + table)
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "rows": _rounded(rows),
                                                  "records": _rounded(records)}, indent=1))
    plot(rows, out / f"{stem}.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N in {32, 128}, 2 seeds, 12 steps (< 1 min); writes files only with --out")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default",
                        help="sampler knobs: the pack defaults, or the authors' 2-D toy (ramp tilt, eta 0.1)")
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0], help="reward scales to run")
    parser.add_argument("--particles", type=int, nargs="+", help="override the particle counts")
    parser.add_argument("--seeds", type=int, help="override the number of seeds")
    parser.add_argument("--steps", type=int, help="override the number of sampler steps")
    parser.add_argument("--out", type=Path, help=f"folder for analytic*.md/.png/.json (full runs: {RESULTS})")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only re-render the plot of a saved analytic*.json next to it, then exit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny tensors: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replot:
        plot(json.loads(args.replot.read_text())["rows"], args.replot.with_suffix(".png"))
        return 0

    cfg = quick_config(args.betas) if args.quick else full_config(args.setting, args.betas)
    if args.particles:
        cfg.particles = tuple(args.particles)
    if args.seeds:
        cfg.seeds = args.seeds
    if args.steps:
        cfg.setting = replace(cfg.setting, steps=args.steps)
    start = time.perf_counter()
    records, references = run_benchmark(cfg, log=lambda msg: print(msg, file=sys.stderr))
    rows = summarise(records, references)
    table = markdown_table(rows, references, cfg.setting, records)
    print(table)

    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        stem = "analytic" + ("_quick" if args.quick else "") + ("" if args.setting == "default" else f"_{args.setting}")
        command = "python bench/bench_analytic.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_outputs(out, stem, command.strip(), time.perf_counter() - start, rows, records, table)
        print(f"wrote {out / stem}.md/.json/.png", file=sys.stderr)
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
