"""FMTT: Euler-Maruyama on the tilted SDE with flow-map look-ahead and Jarzynski weights.

    dX = [ b_t(X) + eps_t s_t(X) + eps_t grad r_t(X) ] dt + sqrt(2 eps_t) dW,
    r_t(x) = lambda_t * r(X_{t,1}(x)),      dA_t = lambda'_t * r(X_{t,1}(X_t)) dt,

so that E[h(X_1) e^{A_1}] / E[e^{A_1}] = E_{p_data e^r}[h]. Here r already carries the user's
reward scale beta. The baselines in `baselines.py` run through the same `ParticleLoop`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .clock import _bcast, score_from_denoiser, velocity_from_denoiser
from .errors import FMTTInputError, FMTTNumericalError
from .lookahead import Denoiser, DenoiserLookahead
from .nfe import NFE
from .schedules import LinearTilt, check_time_grid, noise_level, tilt_values
from .smc import SCHEMES, ess, normalize_log_weights, resample_indices

RewardFn = Callable[[torch.Tensor], torch.Tensor]
MODES = ("exact", "search", "zero_order")


@dataclass
class FMTTConfig:
    """User parameters of the FMTT sampler.

    mode: "exact" (gradient tilt + weights + adaptive resampling: samples p_data * exp(beta r)),
          "zero_order" (no gradient, same weights: still exact, FK-style with flow-map potentials),
          "search" (gradient tilt + top-k selection on look-ahead reward: finds high-reward samples).
    reward_scale: beta, the tilt's inverse temperature.
    tilt: lambda schedule (LinearTilt, RampTilt(t_ramp)).
    eta: stochasticity, eps_t = eta * (1 - t); 0 is the ODE (no gradient drift then).
    ess_threshold: resample when ESS < ess_threshold * N (0: never, 1: every step).
    resampling: systematic (default, lowest variance), stratified, multinomial, residual.
    chunk_size: particles per forward/backward pass (None: all at once); bounds memory.
    grad_clip: max per-particle norm of grad r_t (None: off). Clipping changes the drift, so exact
          mode's weights are then approximate; meant for search or for taming rewards with spikes.
    search_steps: number of top-k selections in search mode, spread over the first 3/4 of the grid.
    top_k: particles kept at each selection (default N // 4, at least 1).
    weights: "eulerian" (dA = lambda' r dt, exact for a true flow-map look-ahead, free), "advective"
          (dA = (d_t + b.grad) r_t dt, exact for any look-ahead, one more look-ahead forward a step),
          "auto" (eulerian for flow-map / base-ODE look-aheads, advective for denoiser / companion).
    seed: seeds the sampler's own generator (SDE noise, resampling); no global RNG is touched.
    """

    mode: str = "exact"
    reward_scale: float = 1.0
    tilt: Callable = field(default_factory=LinearTilt)
    eta: float = 1.0
    ess_threshold: float = 0.5
    resampling: str = "systematic"
    chunk_size: int | None = None
    grad_clip: float | None = None
    search_steps: int = 3
    top_k: int | None = None
    weights: str = "auto"
    seed: int = 0

    def validate(self, particles: int) -> None:
        if self.mode not in MODES:
            raise FMTTInputError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.resampling not in SCHEMES:
            raise FMTTInputError(f"resampling must be one of {SCHEMES}, got {self.resampling!r}.")
        if not math.isfinite(self.reward_scale) or self.reward_scale < 0:
            raise FMTTInputError(f"reward_scale must be a finite number >= 0, got {self.reward_scale}.")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise FMTTInputError(f"eta (stochasticity) must be >= 0, got {self.eta}.")
        if not 0 <= self.ess_threshold <= 1:
            raise FMTTInputError(f"ess_threshold is a fraction of the particles in [0, 1], got {self.ess_threshold}.")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise FMTTInputError(f"chunk_size must be >= 1 (or None for all particles), got {self.chunk_size}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise FMTTInputError(f"grad_clip must be > 0 or None, got {self.grad_clip}.")
        if self.weights not in ("auto", "eulerian", "advective"):
            raise FMTTInputError(f"weights must be 'auto', 'eulerian' or 'advective', got {self.weights!r}.")
        if self.mode == "search":
            if self.search_steps < 1:
                raise FMTTInputError(f"search mode needs search_steps >= 1, got {self.search_steps}.")
            if self.top_k is not None and not 1 <= self.top_k <= particles:
                raise FMTTInputError(f"top_k must be in [1, particles={particles}], got {self.top_k}.")


@dataclass
class StepTrace:
    t: float
    ess: float               # ESS after this step's weight update, before resampling
    resampled: bool
    reward_mean: float       # weighted mean of the look-ahead reward r(X_{t,1}(x)) (unscaled)
    reward_max: float
    valid: int               # particles with finite reward and gradient


@dataclass
class FMTTResult:
    samples: torch.Tensor        # [N, ...] final particles (t = 1)
    log_weights: torch.Tensor    # [N] normalised log-weights (uniform where no weights are claimed)
    rewards: torch.Tensor        # [N] r(x1) of the final particles, unscaled (NaN if it was not finite)
    trace: list[StepTrace]
    nfe: NFE
    method: str
    thermodynamic_length: float = 0.0

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    @property
    def ess(self) -> float:
        return ess(self.log_weights)

    @property
    def n_resamples(self) -> int:
        return sum(s.resampled for s in self.trace)

    @property
    def order(self) -> torch.Tensor:
        """Particle indices, highest final reward first (non-finite rewards last)."""
        r = torch.nan_to_num(self.rewards.double(), nan=-math.inf)
        return torch.argsort(r, descending=True, stable=True)

    @property
    def best_index(self) -> int:
        return int(self.order[0])

    def pick(self, how: str = "best", k: int = 1, seed: int = 0) -> torch.Tensor:
        """Particles to hand on: "best" (highest reward), "top_k" (k best), "resample" (k draws from
        the weights: unbiased samples of the tilted law)."""
        if how == "best":
            return self.samples[self.order[:1]]
        if how == "top_k":
            return self.samples[self.order[:k]]
        if how == "resample":
            idx = resample_indices(self.log_weights, "systematic", torch.Generator().manual_seed(seed), n=k)
            return self.samples[idx.to(self.samples.device)]
        raise FMTTInputError(f"pick how must be 'best', 'top_k' or 'resample', got {how!r}.")


class ParticleLoop:
    """Evaluates D, the look-ahead reward and its gradient for a particle population, in chunks.

    Shared by FMTT and the baselines so that every method makes the same model calls and is charged
    on the same NFE counter.
    """

    def __init__(self, denoiser: Denoiser, reward: RewardFn | None, decoder=None, lookahead=None,
                 chunk_size: int | None = None, grad_clip: float | None = None):
        self.denoiser, self.reward, self.decoder = denoiser, reward, decoder
        self.lookahead = lookahead
        self.chunk_size, self.grad_clip = chunk_size, grad_clip
        self.nfe = NFE()

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe.add("denoiser", x.shape[0])
        d = self.denoiser(x, t)
        if d.shape != x.shape:
            raise FMTTInputError(f"the denoiser returned shape {tuple(d.shape)} for particles {tuple(x.shape)}; "
                                 "it must return D(x, t) with the same shape as x.")
        return d

    def score(self, y: torch.Tensor) -> torch.Tensor:
        """Unscaled reward r(decode(y)) -> [B]."""
        if self.decoder is not None:
            self.nfe.add("decoder", y.shape[0])
            y = self.decoder(y)
        self.nfe.add("reward", y.shape[0])
        r = self.reward(y)
        if r.shape != (y.shape[0],):
            r = r.reshape(-1)
            if r.shape != (y.shape[0],):
                raise FMTTInputError(f"the reward must return one value per particle, shape [{y.shape[0]}], "
                                     f"got {tuple(r.shape)}.")
        return r

    def evaluate(self, x: torch.Tensor, t: float, *, look: bool, grad_scale: float = 0.0):
        """-> (D [N,...], R [N] look-ahead reward or None, g [N,...] = grad_x (grad_scale * R) or None).

        grad_scale = 0 skips the backward pass. Particles whose reward or gradient is not finite get
        R = -inf (weight zero) and g = 0.
        """
        ds, rs, gs = [], [], []
        size = self.chunk_size or x.shape[0]
        for xc in x.split(size):
            tc = torch.full((xc.shape[0],), float(t), dtype=x.dtype, device=x.device)
            if grad_scale == 0.0:
                with torch.no_grad():
                    d = self.denoise(xc, tc)
                    r = self.score(self.lookahead(xc, tc, denoised=d, nfe=self.nfe)) if look else None
                ds.append(d)
                rs.append(r)
                continue
            with torch.enable_grad():
                xg = xc.detach().requires_grad_(True)
                # Keep D's graph only when the look-ahead builds on it (denoiser, base ODE); for a
                # flow map or companion it would hold a whole model's activations for nothing.
                with torch.set_grad_enabled(self.lookahead.uses_denoised):
                    d = self.denoise(xg, tc)
                lookahead_calls = self.nfe.lookahead
                r = self.score(self.lookahead(xg, tc, denoised=d, nfe=self.nfe))
                ok = torch.isfinite(r)
                # The backward pass goes through the look-ahead's model calls, and through D when reused.
                traversed = self.nfe.lookahead - lookahead_calls
                self.nfe.add("backward", xc.shape[0])
                self.nfe.add("backward_model", traversed + (xc.shape[0] if self.lookahead.uses_denoised else 0))
                objective = torch.where(ok, r, 0).sum() * grad_scale
                # A reward that ignores its input (constant) has no graph: its gradient is zero.
                g = (torch.autograd.grad(objective, xg)[0] if objective.requires_grad
                     else torch.zeros_like(xg))
            g = g.detach()
            ok &= torch.isfinite(g.flatten(1)).all(1)
            g = torch.where(ok.reshape(-1, *([1] * (g.ndim - 1))), g, 0)
            ds.append(d.detach())
            rs.append(torch.where(ok, r.detach(), -math.inf))
            gs.append(self._clip(g))
        r = torch.cat(rs).to(torch.float64).cpu() if look else None
        if r is not None:
            r = torch.nan_to_num(r, nan=-math.inf, posinf=-math.inf)
        return torch.cat(ds), r, (torch.cat(gs) if gs else None)

    def _clip(self, g: torch.Tensor) -> torch.Tensor:
        if self.grad_clip is None:
            return g
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
        return g * _bcast((self.grad_clip / norm).clamp(max=1.0), g)

    def score_batched(self, x1: torch.Tensor) -> torch.Tensor:
        """r(decode(x1)) in chunks, without gradient -> float64 [N] on the CPU."""
        size = self.chunk_size or x1.shape[0]
        with torch.no_grad():
            return torch.cat([self.score(xc).double() for xc in x1.split(size)]).cpu()

    def lookahead_reward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """r(X_{t,1}(x)) in chunks, without gradient -> float64 [N] on the CPU."""
        size = self.chunk_size or x.shape[0]
        out = []
        with torch.no_grad():
            for xc in x.split(size):
                tc = torch.full((xc.shape[0],), float(t), dtype=x.dtype, device=x.device)
                out.append(self.score(self.lookahead(xc, tc, nfe=self.nfe)).double())
        return torch.cat(out).cpu()

    def final_rewards(self, x: torch.Tensor) -> torch.Tensor:
        if self.reward is None:
            return torch.full((x.shape[0],), math.nan, dtype=torch.float64)
        r = self.score_batched(x)
        return torch.where(torch.isfinite(r), r, math.nan)


def sde_step(x, denoised, t: float, t_next: float, eta: float, noise: torch.Tensor, tilt_force=None):
    """One Euler-Maruyama step of dX = [b + eps (s + tilt_force)] dt + sqrt(2 eps) dW.

    The step that reaches t = 1 is the probability-flow step onto D: the score is singular there and
    the final sample is the denoised state.
    """
    if t_next >= 1.0:
        return denoised
    h, eps = t_next - t, noise_level(t, eta)
    drift = velocity_from_denoiser(x, denoised, t)
    if eps == 0:
        return x + h * drift
    drift = drift + eps * score_from_denoiser(x, denoised, t)
    if tilt_force is not None:
        drift = drift + eps * tilt_force
    return x + h * drift + math.sqrt(2 * eps * h) * noise


def check_particles(x_init: torch.Tensor) -> None:
    if not isinstance(x_init, torch.Tensor) or x_init.ndim < 2:
        raise FMTTInputError("x_init must be a tensor [N, ...] with one row per particle.")
    if x_init.shape[0] < 1:
        raise FMTTInputError("particles must be >= 1 (x_init has an empty batch dimension).")
    if not x_init.is_floating_point() or not torch.isfinite(x_init).all():
        raise FMTTInputError("x_init must be a finite floating-point tensor.")


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same particles on every device.
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


def _select_top_k(r: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Keep the k highest look-ahead rewards and refill to n by cloning each in turn."""
    top = torch.argsort(r, descending=True, stable=True)[:k]
    return top.repeat(math.ceil(n / k))[:n].sort().values


def _search_schedule(steps: int, selections: int) -> set[int]:
    """Selection steps spread over the first three quarters of the trajectory (not the last step)."""
    span = max(1, min(steps - 1, round(0.75 * steps)))
    return {max(0, round(span * (j + 1) / (selections + 1))) for j in range(selections)}


STEEP_PUSH = 40.0  # a heuristic: passing analytic runs reach ~25x; runs spoilt by one jump ~45x (bench)


def _warn_steep_push(g: torch.Tensor, t: float, t_next: float, eta: float) -> bool:
    """Warn once when the tilt's push h eps |grad r_t| dwarfs the step's noise sqrt(2 eps h d): a
    discretisation jump the weights cannot correct (steep look-ahead gradients, large reward_scale)."""
    h, eps = t_next - t, noise_level(t, eta)
    push = h * eps * float(g.flatten(1).norm(dim=1).max())
    noise = math.sqrt(2 * eps * h * g[0].numel())
    if push <= STEEP_PUSH * noise:
        return False
    warnings.warn(f"FMTT: at t={t:.3f} the reward gradient moves a particle {push:.3g} in one step, "
                  f"{push / noise:.0f}x the step's noise; the weights cannot correct such jumps. Use more "
                  "steps, a smaller reward_scale, or grad_clip (search mode).", RuntimeWarning, stacklevel=3)
    return True


def _weighted_mean(w: torch.Tensor, v: torch.Tensor) -> float:
    """Weighted mean over the particles where v is finite."""
    ok = torch.isfinite(v)
    return float((w[ok] * v[ok]).sum() / w[ok].sum().clamp_min(1e-300))


def _warn_invalid(r: torch.Tensor, t: float) -> int:
    valid = int(torch.isfinite(r).sum())
    if valid == 0:
        raise FMTTNumericalError(
            f"the reward (or its gradient) is non-finite for every particle at t={t:.3f}. Check that the "
            "reward returns finite values for decoded samples, lower reward_scale, or set grad_clip.")
    if valid < r.numel():
        warnings.warn(f"FMTT: {r.numel() - valid} of {r.numel()} particles had a non-finite reward or "
                      f"gradient at t={t:.3f}; they get weight zero.", RuntimeWarning, stacklevel=3)
    return valid


class EulerianWeights:
    """dA = lambda'_t r(X_{t,1}(X_t)) dt: exact when the look-ahead is the base model's flow map
    (the Eulerian identity removes every other term). Trapezoid rule: r at t_k closes the previous
    interval and opens this one; r(x1) closes the last (the look-ahead at t = 1 is the identity)."""

    def __init__(self, lam, beta):
        self.lam, self.beta, self.dlam_prev = lam, beta, 0.0

    def step(self, k, r, x, d, loop):
        dlam = float(self.lam[k + 1] - self.lam[k])
        inc = 0.5 * (self.dlam_prev + dlam) * self.beta * r
        self.dlam_prev = dlam
        return inc

    def reindex(self, idx):
        pass

    def final(self, r1):
        return 0.5 * self.dlam_prev * self.beta * r1


class AdvectiveWeights:
    """dA = (d_t + b_t . grad) r_t(X_t) dt: exact for ANY look-ahead, discretised along the ODE step,
    r_{t+h}(x + h b) - r_t(x). Costs one more look-ahead + reward forward per step; for a true flow
    map it reduces to EulerianWeights, for a denoiser it carries the correction the flow map avoids."""

    def __init__(self, lam, beta, times):
        self.lam, self.beta, self.times = lam, beta, times

    def step(self, k, r, x, d, loop):
        t, t_next = float(self.times[k]), float(self.times[k + 1])
        x_ode = sde_step(x, d, t, t_next, 0.0, None)
        r_next = loop.score_batched(x_ode) if t_next >= 1 else loop.lookahead_reward(x_ode, t_next)
        r_next = torch.nan_to_num(r_next, nan=-math.inf, posinf=-math.inf)
        return self.beta * (float(self.lam[k + 1]) * r_next - float(self.lam[k]) * r)

    def reindex(self, idx):
        pass

    def final(self, r1):
        return torch.zeros_like(r1)


class TelescopingWeights:
    """Zero-order mode (untilted SDE): potentials exp(lambda_k r_k - lambda_{k-1} r_{k-1}) multiply
    to exp(r(x1)) along every path, so the reweighted base process is exact (FK steering with
    look-ahead potentials). The Eulerian shortcut does not apply without the gradient drift."""

    def __init__(self, lam, beta, n):
        self.lam, self.beta = lam, beta
        self.potential = torch.zeros(n, dtype=torch.float64)  # lambda_k r_k of each particle's path

    def step(self, k, r, x, d, loop):
        new = float(self.lam[k]) * torch.nan_to_num(r, neginf=0.0)
        inc = self.beta * (float(self.lam[k]) * r - self.potential)
        self.potential = new
        return inc

    def reindex(self, idx):
        self.potential = self.potential[idx]

    def final(self, r1):
        return self.beta * (r1 - self.potential)


def _weights_for(cfg, lookahead, lam, times, n):
    if cfg.mode == "zero_order":
        return TelescopingWeights(lam, cfg.reward_scale, n)
    if cfg.mode == "search":
        return None
    kind = cfg.weights
    if kind == "auto":
        kind = "eulerian" if getattr(lookahead, "flow_map_of_base", False) else "advective"
    if kind == "eulerian":
        return EulerianWeights(lam, cfg.reward_scale)
    return AdvectiveWeights(lam, cfg.reward_scale, times)


def fmtt_sample(denoiser: Denoiser, x_init: torch.Tensor, times, *, reward: RewardFn, lookahead=None,
                decoder=None, config: FMTTConfig | None = None, callback=None) -> FMTTResult:
    """Flow Map Trajectory Tilting. See the module docstring and FMTTConfig for the parameters.

    denoiser: D(x, t) in the core clock; x_init: particles at times[0] (noise, or a noised latent);
    times: increasing grid ending at 1; reward: r(x1) -> [N] (applied after `decoder` if given);
    lookahead: defaults to the denoiser (the paper's ablation; pass a flow map for the real thing).
    """
    cfg = config or FMTTConfig()
    check_particles(x_init)
    n = x_init.shape[0]
    cfg.validate(n)
    times = check_time_grid(times)
    lookahead = lookahead if lookahead is not None else DenoiserLookahead(denoiser)
    loop = ParticleLoop(denoiser, reward, decoder, lookahead, cfg.chunk_size, cfg.grad_clip)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    lam = tilt_values(cfg.tilt, times)
    beta = float(cfg.reward_scale)
    weights = _weights_for(cfg, lookahead, lam, times, n)
    selections = _search_schedule(len(times) - 1, cfg.search_steps) if cfg.mode == "search" else set()
    top_k = cfg.top_k or max(1, n // 4)

    x, log_w = x_init, torch.zeros(n, dtype=torch.float64)
    trace, thermo, warned_steep = [], 0.0, False
    for k in range(len(times) - 1):
        t, t_next = float(times[k]), float(times[k + 1])
        use_grad = cfg.mode != "zero_order" and noise_level(t, cfg.eta) > 0 and t_next < 1 and beta > 0
        # g = grad of r_t = lambda_t * beta * r(X_{t,1}(x)); r itself comes back unscaled.
        d, r, g = loop.evaluate(x, t, look=True, grad_scale=float(lam[k]) * beta if use_grad else 0.0)
        valid = _warn_invalid(r, t)
        ok = torch.isfinite(r)

        w = torch.exp(normalize_log_weights(log_w))
        mean = _weighted_mean(w, r)
        if weights is not None:
            increment = weights.step(k, r, x, d, loop)
            log_w = torch.nan_to_num(log_w + increment, nan=-math.inf)
        else:
            increment = beta * float(lam[k + 1] - lam[k]) * r
        # Thermodynamic length of the path of intermediate targets, sum_k sqrt(Var_w[dA_k]); with a
        # flow-map look-ahead dA_k = beta r dlambda_k (the paper's estimate).
        thermo += math.sqrt(max(_weighted_mean(w, (increment - _weighted_mean(w, increment)) ** 2), 0.0))
        step_ess = ess(log_w) if weights is not None else float(n)

        idx = None
        if weights is not None and t_next < 1 and step_ess < cfg.ess_threshold * n:
            idx = resample_indices(log_w, cfg.resampling, gen)
            log_w = torch.zeros(n, dtype=torch.float64)
            weights.reindex(idx)
        elif k in selections:
            idx = _select_top_k(torch.where(ok, r, -math.inf), min(top_k, valid), n)
        if idx is not None:
            x, d = x[idx.to(x.device)], d[idx.to(x.device)]
            g = g[idx.to(x.device)] if g is not None else None
        trace.append(StepTrace(t, step_ess, idx is not None, mean, float(r[ok].max()), valid))

        if g is not None and not warned_steep:
            warned_steep = _warn_steep_push(g, t, t_next, cfg.eta)
        x = sde_step(x, d, t, t_next, cfg.eta, _noise(x, gen), g)
        if callback is not None:
            callback({"step": k, "steps": len(times) - 1, "t": t, "x": x, "denoised": d,
                      "ess": step_ess, "resampled": idx is not None, "nfe": loop.nfe})

    final_r = loop.final_rewards(x)
    if weights is not None:
        log_w = normalize_log_weights(log_w + weights.final(torch.nan_to_num(final_r, nan=-math.inf)))
    else:
        log_w = torch.full((n,), -math.log(n), dtype=torch.float64)
    return FMTTResult(x, log_w, final_r, trace, loop.nfe, f"fmtt-{cfg.mode}[{lookahead}]", thermo)
