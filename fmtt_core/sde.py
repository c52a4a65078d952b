"""One step of the (tilted) SDE  dX = [b_t + eps_t s_t + eps_t grad r_t] dt + sqrt(2 eps_t) dW.

Each step is a Gaussian kernel: the base chain moves x to N(m(x), sigma^2 I) and the tilt shifts the
mean by delta = (sigma^2 / 2) g, g = grad r_t (the Langevin push for exp(r_t) over the step's noise;
for Euler-Maruyama, delta = h eps g). Because both kernels are known, the step also returns

    log [ N(x'; m, sigma^2) / N(x'; m + delta, sigma^2) ] = -z.delta / sigma - |delta|^2 / (2 sigma^2),

the base-to-proposal kernel ratio that twisted weights use to price the push exactly, whatever
delta was (tamed, clipped or not).

Two base chains, both with D frozen over the step (eps_t = eta (1 - t), rho = (1 - t') / (1 - t)):
  euler:        m = x + h (b + eps s),                      sigma^2 = 2 eps h
  exponential:  m = t' D + (1 - t') rho^eta n,               sigma^2 = (1 - t')^2 (1 - rho^(2 eta))
                with n = (x - t D) / (1 - t). The drift is linear in x once D is frozen, and this
                integrates it exactly: exact for a point-mass data law (D constant), the stochastic
                DDIM / ancestral step (eta = 0 is DDIM). It stays stable near t = 1, where the Euler
                drift's rate (1 + eta) / (1 - t) makes h large.
The step that reaches t = 1 is the jump onto D for both: the score is singular there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .clock import (
    _bcast,
    noise_from_denoiser,
    score_from_denoiser,
    velocity_from_denoiser,
)
from .schedules import noise_level


def base_kernel(x, denoised, t: float, t_next: float, eta: float, kind: str = "exponential"):
    """(mean [N, ...], sigma) of the untilted step from t to t_next."""
    if t_next >= 1.0:
        return denoised, 0.0
    h, eps = t_next - t, noise_level(t, eta)
    if kind == "euler":
        drift = velocity_from_denoiser(x, denoised, t)
        if eps > 0:
            drift = drift + eps * score_from_denoiser(x, denoised, t)
        return x + h * drift, math.sqrt(2 * eps * h)
    rho = (1 - t_next) / (1 - t)
    n = noise_from_denoiser(x, denoised, t)
    return t_next * denoised + (1 - t_next) * rho ** eta * n, (1 - t_next) * math.sqrt(max(0.0, 1 - rho ** (2 * eta)))


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
             max_push: float | None = None) -> Move:
    """x' = m + delta + sigma z with delta = (sigma^2 / 2) tilt_force, tamed to |delta| <= max_push x
    the step's noise norm sigma sqrt(d) per particle. See the module doc."""
    mean, sigma = base_kernel(x, denoised, t, t_next, eta, kind)
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
