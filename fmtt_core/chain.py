"""The particle chain every sampler runs: evaluate, weigh, resample or select, move.

    for each step t_k -> t_{k+1}:
        D, r_k, g = model calls at x_k (g = grad of tilt_scale_k * r_k, when tilted)
        log_w += rule.increment(...)          (when the rule claims weights)
        resample / select by the rule         (ancestors from the population)
        x_{k+1} = SDE step (tilted by g; "2m" also reads D_{k-1}); rule.moved(kernel ratio)
    log_w += rule.final(r(x1))

What differs between FMTT and the baselines is only the rule (weights.py), the look-ahead and the
tilt scale; everything population-wide goes through the Population.
"""
from __future__ import annotations

import math
import warnings

import torch

from .config import FMTTConfig
from .particles import ParticleLoop, count_valid
from .population import Population
from .result import FMTTResult, StepTrace
from .sde import MULTISTEP, push_ratio, sde_step, step_noise
from .weights import WeightRule, eulerian_defect

STEEP_PUSH = 40.0  # a heuristic: passing analytic runs reach ~25x; runs spoilt by one jump ~45x (bench)
# Warn when more than this share of the weighted steps used Jarzynski (O(h)) increments: the run's bias is then
# that of advective weights (measured in bench/results/weights.md), not the exactness of twisted ones.
APPROXIMATE_DOMINANT = 0.5


def run_chain(loop: ParticleLoop, pop: Population, x: torch.Tensor, times: torch.Tensor, cfg: FMTTConfig,
              rule: WeightRule, *, tilt_scale=None, look: bool = True, method: str = "",
              callback=None) -> FMTTResult:
    """tilt_scale: per step k the factor on grad r_k (lambda_k beta for FMTT, a constant for guidance),
    None for no tilt. look: evaluate the look-ahead reward (False: base sampling)."""
    log_w = torch.zeros(pop.count, dtype=torch.float64)
    trace, thermo, warned = [], 0.0, False
    steps = len(times) - 1
    prev = None  # (t_{k-1}, D_{k-1} per particle) for a multistep SDE step; it moves with its particle
    for k in range(steps):
        t, t_next = float(times[k]), float(times[k + 1])
        scale = float(tilt_scale[k]) if tilt_scale is not None and t_next < 1 and cfg.eta > 0 else 0.0
        d, r, g = loop.evaluate(x, t, look=look, grad_scale=scale)
        if r is None:
            r = torch.full((pop.count,), math.nan, dtype=torch.float64)
            valid = pop.size
        else:
            valid = count_valid(r, t, pop)

        w = torch.exp(pop.normalize(log_w))
        mean = pop.weighted_mean(w, r)
        rule.tilted(k, g)
        inc = rule.increment(k, r, x, d)
        if rule.claims_weights:
            log_w = torch.nan_to_num(log_w + inc, nan=-math.inf)
        # Thermodynamic length of the path of intermediate targets, sum_k sqrt(Var_w[dA_k]).
        if look:
            var = pop.weighted_mean(w, (inc - pop.weighted_mean(w, inc)) ** 2)
            thermo += math.sqrt(var) if var > 0 else 0.0  # NaN: no finite increment at this step
        defect = _defect(loop, pop, rule, cfg, x, d, r, w, t, t_next) if look else math.nan
        step_ess = pop.ess(log_w) if rule.claims_weights else float(pop.size)

        anc = rule.select(k, log_w, r, step_ess, t_next)
        if anc is not None:
            x, d, g = pop.take(x, anc), pop.take(d, anc), pop.take(g, anc)
            if prev is not None:
                prev = (prev[0], pop.take(prev[1], anc))
            rule.reindex(anc)
            if rule.claims_weights:
                log_w = torch.zeros(pop.count, dtype=torch.float64)
        # Every shard takes part in the max, also one whose rewards are all non-finite.
        reward_max = float(pop.max(torch.where(torch.isfinite(r), r, -math.inf)))
        reward_max = reward_max if reward_max > -math.inf else math.nan

        if g is not None and rule.claims_weights and not warned:
            warned = _warn_steep_push(g, t, t_next, cfg)
        move = sde_step(x, d, t, t_next, cfg.eta, pop.noise(x, k), g, cfg.sde_step,
                        cfg.max_push if rule.claims_weights else None, prev)
        x, prev = move.x, ((t, d) if cfg.sde_step in MULTISTEP else None)
        rule.moved(move)
        tamed = int(pop.sum(torch.tensor([float(move.tamed)], dtype=torch.float64)))  # over every shard
        trace.append(StepTrace(t, step_ess, anc is not None, mean, reward_max, valid, defect, tamed,
                               rule.step_rule if rule.claims_weights else ""))
        if callback is not None:
            callback({"step": k, "steps": steps, "t": t, "x": x, "denoised": d,
                      "ess": step_ess, "resampled": anc is not None, "nfe": loop.nfe})

    final_r = loop.final_rewards(x)
    if rule.claims_weights:
        log_w = pop.normalize(log_w + rule.final(torch.nan_to_num(final_r, nan=-math.inf)))
    else:
        log_w = torch.full((pop.count,), -math.log(pop.size), dtype=torch.float64)
    result = FMTTResult(pop.gather(x), pop.gather(log_w), pop.gather(final_r), trace, loop.nfe, method, thermo)
    _warn_approximate(result)
    return result


def _warn_approximate(result: FMTTResult) -> None:
    """Warn when Jarzynski steps dominate the run: its weights are then consistent (exact as steps -> 0),
    not exact for the grid used."""
    share = result.approximate_share
    if share > APPROXIMATE_DOMINANT:
        counts = ", ".join(f"{k} {v}" for k, v in result.rule_counts.items())
        warnings.warn(f"FMTT: {share:.0%} of the steps used approximate (Jarzynski) weights ({counts}): exact only "
                      "as the steps shrink, with an O(h) bias at this step count (bench/results/weights.md: up to "
                      "10+ standard errors at 20-50 steps). For weights exact at this step count use "
                      "weights='twisted'; otherwise use more steps.", RuntimeWarning, stacklevel=3)


def _defect(loop, pop, rule, cfg, x, d, r, w, t, t_next) -> float:
    """Weighted RMS Eulerian defect: free on advective steps, else on `defect_probe` particles."""
    if rule.last_defect is not None:
        dr = rule.last_defect
    elif cfg.defect_probe > 0:
        p = max(0, min(cfg.defect_probe - pop.start, x.shape[0]))  # this shard's rows among the first probed
        dr = eulerian_defect(loop, x[:p], d[:p], r[:p], t, t_next) if p else r[:0]
        r, w = r[:p], w[:p]
    else:
        return math.nan
    ok = torch.isfinite(dr) & torch.isfinite(r)
    return math.sqrt(pop.weighted_mean(torch.where(ok, w, 0.0), torch.where(ok, dr, 0.0) ** 2))


def _warn_steep_push(g, t, t_next, cfg) -> bool:
    """Warn once when the tilt's push dwarfs the step's noise: untamed, the weights cannot correct such a
    jump; tamed, they do, but the correction then makes them degenerate."""
    sigma = step_noise(t, t_next, cfg.eta, cfg.sde_step)
    ratio = push_ratio(g, sigma)
    if ratio <= STEEP_PUSH:
        return False
    if cfg.max_push is None:
        what = (f"{cfg.weights} weights cannot correct such jumps. Use max_push (tames the push with the "
                "matching weight correction), weights='twisted', more steps, or a smaller reward_scale.")
        if cfg.weights == "twisted":
            what = "twisted weights price it exactly but degenerate. Use more steps or a smaller reward_scale."
    else:
        what = (f"it was tamed to {cfg.max_push:g}x with the matching weight correction, which makes the weights "
                "degenerate. Use more steps or a smaller reward_scale.")
    warnings.warn(f"FMTT: at t={t:.3f} the reward gradient moves a particle {ratio:.0f}x the step's noise; {what}",
                  RuntimeWarning, stacklevel=3)
    return True
