"""One step of the (tilted) SDE  dX = [b_t + eps_t s_t + eps_t grad r_t] dt + sqrt(2 eps_t) dW.

Each step is a Gaussian kernel: the base chain moves x to N(m, sigma^2 I) and the tilt shifts the
mean by delta = (sigma^2 / 2) g, g = grad r_t (the Langevin push for exp(r_t) over the step's noise;
for Euler-Maruyama, delta = h eps g). Because both kernels are known, the step also returns

    log [ N(x'; m, sigma^2) / N(x'; m + delta, sigma^2) ] = -z.delta / sigma - |delta|^2 / (2 sigma^2),

the base-to-proposal kernel ratio that twisted weights use to price the push exactly, whatever
delta was (tamed, clipped or not).

With eps_t = eta (1 - t) the drift is [D (1 + eta t) - x (1 + eta)] / (1 - t): linear in x but for D.
Its integrating factor (1 - u)^-(1+eta) gives, over a step t -> t' (h = t' - t, rho = (1 - t') / (1 - t)),

    x' = rho^(1+eta) x + (1 - t')^(1+eta) int_t^t' v'(u) D(u) du + sigma z,   v(u) = u (1 - u)^-(1+eta),
    sigma^2 = (1 - t')^2 (1 - rho^(2 eta)),

and the steps differ in how they take D(u) along the step:
  euler:        m = x + h (b + eps s), sigma^2 = 2 eps h  (Euler-Maruyama: drift and noise frozen at t)
  exponential:  D(u) = D frozen:  m = t' D + rho^(1+eta) (x - t D). Exact for a point-mass data law;
                the stochastic DDIM / ancestral step (eta = 0 is DDIM).
  2m:           D(u) linear in u through this step's D and the last step's D_prev at t_prev (per
                particle), the second-order multistep exponential integrator (the SDE analogue of
                DPM-Solver++(2M), in t rather than log-SNR: measured better on mixtures):
                    m = m_exponential + c (D - D_prev) / (t - t_prev),
                    c = (1 - t')^(1+eta) int_t^t' v'(u) (u - t) du = t' h - int_t^t' u rho_u^(1+eta) du,
                with rho_u = (1 - t') / (1 - u). No extra model call. Given (x, D_prev) the kernel is
                still Gaussian with the same sigma, so kernel-ratio weights stay exact provided D_prev
                follows its particle through resampling. The first step (no D_prev) is exponential.
                D - D_prev also carries the last step's noise, so with eta > 0 the step stays first
                order in law, with a smaller constant (bench/bench_steps.py).
None of them is exact for Gaussian data: that needs D's Jacobian (near t = 1 it cancels the drift's
stiff rate (1 + eta) / (1 - t), which the exponential steps integrate but Euler only samples).
The step that reaches t = 1 is the jump onto D for all three: the score is singular there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .clock import (
    _bcast,
    score_from_denoiser,
    velocity_from_denoiser,
)
from .schedules import noise_level

MULTISTEP = ("2m",)  # steps that read the last step's D (chain.run_chain keeps it per particle)


def step_noise(t: float, t_next: float, eta: float, kind: str = "exponential") -> float:
    """sigma of the step from t to t_next: it depends on the times alone (0 for the jump onto D at t = 1)."""
    if t_next >= 1.0:
        return 0.0
    if kind == "euler":
        return math.sqrt(2 * noise_level(t, eta) * (t_next - t))
    rho = (1 - t_next) / (1 - t)
    return (1 - t_next) * math.sqrt(max(0.0, 1 - rho ** (2 * eta)))


def base_kernel(x, denoised, t: float, t_next: float, eta: float, kind: str = "exponential", prev=None):
    """(mean [N, ...], sigma) of the untilted step from t to t_next. prev = (t_prev, D_prev): the last
    step's denoiser output for these particles, used by "2m" (None: the first step)."""
    sigma = step_noise(t, t_next, eta, kind)
    if t_next >= 1.0:
        return denoised, sigma
    if kind == "euler":
        drift, eps = velocity_from_denoiser(x, denoised, t), noise_level(t, eta)
        if eps > 0:
            drift = drift + eps * score_from_denoiser(x, denoised, t)
        return x + (t_next - t) * drift, sigma
    rho = (1 - t_next) / (1 - t)
    mean = t_next * denoised + rho ** (1 + eta) * (x - t * denoised)
    if kind == "2m" and prev is not None:
        t_prev, d_prev = prev
        mean = mean + multistep_weight(t, t_next, eta) * (denoised - d_prev) / (t - t_prev)
    return mean, sigma


def multistep_weight(t: float, t_next: float, eta: float) -> float:
    """c = (1 - t')^(1+eta) int_t^t' v'(u) (u - t) du = t' h - int_t^t' u ((1 - t') / (1 - u))^(1+eta) du,
    in closed form with w = 1 - u: the last integral is (1 - t')^(1+eta) int (w^-(1+eta) - w^-eta) dw."""
    lo, hi = 1 - t_next, 1 - t
    return t_next * (t_next - t) - lo ** (1 + eta) * (_power_integral(1 + eta, lo, hi) - _power_integral(eta, lo, hi))


def _power_integral(a: float, lo: float, hi: float) -> float:
    """int_lo^hi w^-a dw, continuous through a = 1 (the log)."""
    span, b = math.log(hi / lo), 1 - a
    return lo ** b * (span if b == 0 else math.expm1(b * span) / b)


@dataclass
class Move:
    x: torch.Tensor              # the particles at t_next
    log_ratio: torch.Tensor      # [N] float64: log base kernel / proposal kernel at x (0 without tilt)
    taming_ratio: torch.Tensor | None = None  # [N] log untamed-tilt kernel / tamed kernel at x (None: no taming)
    tamed: int = 0               # particles whose push was tamed


def _row_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).double().norm(dim=1)


def sde_step(x, denoised, t: float, t_next: float, eta: float, noise: torch.Tensor | None,
             tilt_force: torch.Tensor | None = None, kind: str = "exponential",
             max_push: float | None = None, prev=None) -> Move:
    """x' = m + delta + sigma z with delta = (sigma^2 / 2) tilt_force, tamed to |delta| <= max_push x
    the step's noise norm sigma sqrt(d) per particle; prev = (t_prev, D_prev) for "2m". See the module doc."""
    mean, sigma = base_kernel(x, denoised, t, t_next, eta, kind, prev)
    zero = torch.zeros(x.shape[0], dtype=torch.float64)
    if sigma == 0:
        return Move(mean, zero)
    if tilt_force is None:
        return Move(mean + sigma * noise, zero)
    full = 0.5 * sigma ** 2 * tilt_force
    delta, tamed, taming_ratio = full, 0, None
    if max_push is not None:
        push = _row_norm(full)
        limit = max_push * sigma * math.sqrt(x[0].numel())
        scale = (limit / push.clamp_min(1e-300)).clamp(max=1.0)
        tamed = int((scale < 1).sum())
        delta = full * _bcast(scale.to(full.dtype).to(full.device), full)
        # log N(x'; m + full) / N(x'; m + delta): turns a tamed move into one of the untamed SDE.
        taming_ratio = _gauss_log_ratio(noise, delta - full, sigma)
    return Move(mean + delta + sigma * noise, _gauss_log_ratio(noise, delta, sigma), taming_ratio, tamed)


def _gauss_log_ratio(noise, shift, sigma) -> torch.Tensor:
    """log N(x'; a, sigma^2) - log N(x'; a + shift, sigma^2) at x' = a + shift + sigma z, per particle."""
    z_dot = (noise.double() * shift.double()).flatten(1).sum(1).cpu()
    return -z_dot / sigma - _row_norm(shift).cpu() ** 2 / (2 * sigma ** 2)


def push_ratio(tilt_force: torch.Tensor, sigma: float) -> float:
    """Largest |delta| / (sigma sqrt(d)) over the particles: how far the tilt throws a particle
    compared with the step's own noise."""
    if sigma == 0:
        return 0.0
    return float(_row_norm(0.5 * sigma ** 2 * tilt_force).max()) / (sigma * math.sqrt(tilt_force[0].numel()))
