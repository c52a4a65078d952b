"""FMTT: the tilted SDE with a flow-map look-ahead, weighted and resampled.

    dX = [ b_t(X) + eps_t s_t(X) + eps_t grad r_t(X) ] dt + sqrt(2 eps_t) dW,    r_t(x) = lambda_t beta r(X_{t,1}(x)),

weighted so that E[h(X_1) w] / E[w] = E_{p e^{beta r}}[h] (weights.py), with the population resampled
when its ESS drops. This module only assembles the pieces: the look-ahead, the weight rule for the
mode, and the chain (chain.py) that every sampler runs.
"""
from __future__ import annotations

import warnings

from .chain import run_chain
from .config import FMTTConfig
from .lookahead import DenoiserLookahead
from .particles import ParticleLoop, RewardFn, check_particles
from .population import Population
from .result import FMTTResult
from .schedules import check_time_grid, tilt_values
from .weights import (
    AdvectiveWeights,
    AutoWeights,
    EulerianWeights,
    SearchSelection,
    TwistedWeights,
    search_schedule,
)


def weight_rule(cfg: FMTTConfig, pop: Population, lam, times, loop: ParticleLoop):
    """The rule for cfg.mode / cfg.weights: exact and zero-order modes weigh, search selects."""
    beta, resampling = float(cfg.reward_scale), {"ess_threshold": cfg.ess_threshold, "scheme": cfg.resampling}
    if cfg.mode == "search":
        keep = cfg.search_keep or max(1, pop.size // 4)
        return SearchSelection(pop, lam, beta, search_schedule(len(times) - 1, cfg.search_steps), keep)
    weights = "twisted" if cfg.mode == "zero_order" else cfg.weights
    if weights == "doob":  # twisted weights; the doubled push is set by push_factor
        weights = "twisted"
    if weights == "auto":
        return AutoWeights(pop, lam, beta, times, loop, cfg.eta, cfg.sde_step, **resampling)
    if weights == "eulerian":
        return EulerianWeights(pop, lam, beta, **resampling)
    if weights == "advective":
        return AdvectiveWeights(pop, lam, beta, times, loop, **resampling)
    return TwistedWeights(pop, lam, beta, **resampling)


def push_factor(cfg: FMTTConfig) -> float:
    """The tilt force on the drift in units of eps grad r_t: 1 for the paper's SDE, 2 for "doob".

    Twisted weights price any push by its kernel ratio. Their increment then carries the noise term
    (sigma z) . (grad r_t - delta / sigma^2) to first order in sigma (delta the push): the paper's push
    delta = sigma^2 g / 2 leaves half of it (variance (sigma |g| / 2)^2 per step, summing to a log-weight
    variance that does not shrink with the step), the push sigma^2 g (the locally optimal, Doob-type
    proposal for a linearised potential) cancels it, leaving O(sigma^2) curvature terms."""
    return 2.0 if cfg.mode == "exact" and cfg.weights == "doob" else 1.0


def idle_steering(cfg: FMTTConfig, lam, times, particles: int) -> list[str]:
    """Why these settings steer little or nothing (empty when they steer): said aloud, never a silent plain run."""
    beta, steps = float(cfg.reward_scale), len(times) - 1
    if beta == 0 and cfg.mode != "search":
        return ["reward_scale is 0: the target is the base model's own distribution, so nothing is steered (plain "
                "sampling with extra cost). Raise reward_scale."]
    said = []
    # The chain tilts step k by lambda_k beta grad r only when another step follows (t_{k+1} < 1) and eta > 0.
    gradient = cfg.mode != "zero_order" and cfg.eta > 0 and any(
        float(lam[k]) * beta > 0 and float(times[k + 1]) < 1 for k in range(steps))
    if cfg.mode != "zero_order" and cfg.eta == 0:
        said.append("eta is 0: the reward gradient acts through the noise, so it never moves a particle; only the "
                    "weights and selections steer. Raise eta.")
    elif cfg.mode != "zero_order" and not gradient:
        said.append(f"with {steps} step(s) no step both carries the tilt (lambda > 0 after the first point) and is "
                    "followed by another: the reward gradient never acts and no backward pass runs. Use 3 or more "
                    "steps.")
    if particles == 1:
        said.append("1 particle: " + ("search has nothing to select from" if cfg.mode == "search" else
                                      "weights and resampling have nothing to choose between")
                    + ("; only the reward gradient steers." if gradient else ", and nothing else steers.")
                    + " Use more particles.")
    return said


def fmtt_sample(denoiser, x_init, times, *, reward: RewardFn, config: FMTTConfig | None = None,
                lookahead=None, decoder=None, callback=None, population: Population | None = None) -> FMTTResult:
    """Flow Map Trajectory Tilting. See the module docstring and FMTTConfig for the parameters.

    denoiser: D(x, t) in the core clock; x_init: particles at times[0] (noise, or a noised latent);
    times: increasing grid ending at 1; reward: r(x1) -> [N] (applied after `decoder` if given);
    lookahead: defaults to the denoiser (the paper's ablation; pass a flow map for the real thing);
    population: where population-wide operations run (default: this process holds all particles).
    """
    cfg = config or FMTTConfig()
    check_particles(x_init)
    pop = population or Population(x_init.shape[0], cfg.seed)
    cfg.validate(pop.size)
    times = check_time_grid(times)
    lookahead = lookahead if lookahead is not None else DenoiserLookahead(denoiser)
    loop = ParticleLoop(denoiser, reward, decoder, lookahead, cfg.chunk_size, cfg.grad_clip)
    lam = tilt_values(cfg.tilt, times)
    for why in idle_steering(cfg, lam, times, pop.size):
        warnings.warn(f"FMTT: {why}", RuntimeWarning, stacklevel=2)
    rule = weight_rule(cfg, pop, lam, times, loop)
    tilt_scale = None if cfg.mode == "zero_order" else lam * float(cfg.reward_scale) * push_factor(cfg)
    return run_chain(loop, pop, x_init, times, cfg, rule, tilt_scale=tilt_scale,
                     method=f"fmtt-{cfg.mode}[{lookahead}]", callback=callback)
