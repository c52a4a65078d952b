"""Baselines in the same framework: same model calls, same SDE step, same NFE counter.

- base_sample: the untilted SDE (eta > 0) or probability-flow ODE (eta = 0).
- best_of_n: base sampling, then keep the highest final rewards.
- guidance_sample: denoiser-gradient guidance (DPS-style), drift + scale * grad r(D(x)), no weights.
- fk_steering: Feynman-Kac steering with denoiser potentials, resampling, no gradient.
"""
from __future__ import annotations

import math

import torch

from .errors import FMTTInputError
from .lookahead import DenoiserLookahead
from .sampler import (FMTTResult, ParticleLoop, StepTrace, _noise, _warn_invalid, check_particles, sde_step)
from .schedules import check_time_grid
from .smc import SCHEMES, ess, normalize_log_weights, resample_indices


def _uniform_log_w(n: int) -> torch.Tensor:
    return torch.full((n,), -math.log(n), dtype=torch.float64)


def _check_eta(eta: float) -> None:
    if not math.isfinite(eta) or eta < 0:
        raise FMTTInputError(f"eta (stochasticity) must be >= 0, got {eta}.")


def base_sample(denoiser, x_init, times, *, reward=None, decoder=None, eta: float = 1.0, seed: int = 0,
                chunk_size=None, callback=None) -> FMTTResult:
    """Untilted sampling; final rewards are scored when a reward is given (for reporting)."""
    check_particles(x_init)
    _check_eta(eta)
    times = check_time_grid(times)
    loop = ParticleLoop(denoiser, reward, decoder, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(int(seed))
    x, n = x_init, x_init.shape[0]
    trace = []
    for k in range(len(times) - 1):
        t, t_next = float(times[k]), float(times[k + 1])
        d, _, _ = loop.evaluate(x, t, look=False)
        x = sde_step(x, d, t, t_next, eta, _noise(x, gen))
        trace.append(StepTrace(t, float(n), False, math.nan, math.nan, n))
        if callback is not None:
            callback({"step": k, "steps": len(times) - 1, "t": t, "x": x, "denoised": d,
                      "ess": float(n), "resampled": False, "nfe": loop.nfe})
    return FMTTResult(x, _uniform_log_w(n), loop.final_rewards(x), trace, loop.nfe,
                      "base" if eta > 0 else "base-ode")


def best_of_n(denoiser, x_init, times, *, reward, decoder=None, eta: float = 1.0, top_k: int = 1,
              seed: int = 0, chunk_size=None, callback=None) -> FMTTResult:
    """Sample N independently, score the final samples; `pick("top_k", top_k)` hands on the best."""
    if reward is None:
        raise FMTTInputError("best_of_n needs a reward to rank the samples.")
    if not 1 <= top_k <= x_init.shape[0]:
        raise FMTTInputError(f"top_k must be in [1, N={x_init.shape[0]}], got {top_k}.")
    res = base_sample(denoiser, x_init, times, reward=reward, decoder=decoder, eta=eta, seed=seed,
                      chunk_size=chunk_size, callback=callback)
    res.method = f"best-of-{x_init.shape[0]}"
    return res


def guidance_sample(denoiser, x_init, times, *, reward, decoder=None, guidance_scale: float = 1.0,
                    eta: float = 1.0, seed: int = 0, chunk_size=None, grad_clip=None,
                    callback=None) -> FMTTResult:
    """Denoiser guidance without weights: drift b + eps s + eps * scale * grad_x r(D(x, t)).

    It has FMTT's drift with the naive look-ahead and a constant tilt, but claims no weights: what it
    samples is not the tilted law (the comparison the paper makes).
    """
    check_particles(x_init)
    _check_eta(eta)
    times = check_time_grid(times)
    loop = ParticleLoop(denoiser, reward, decoder, DenoiserLookahead(denoiser), chunk_size, grad_clip)
    gen = torch.Generator().manual_seed(int(seed))
    x, n = x_init, x_init.shape[0]
    trace = []
    for k in range(len(times) - 1):
        t, t_next = float(times[k]), float(times[k + 1])
        use_grad = t_next < 1 and eta > 0 and guidance_scale != 0
        d, r, g = loop.evaluate(x, t, look=True, grad_scale=guidance_scale if use_grad else 0.0)
        valid = _warn_invalid(r, t)
        ok = torch.isfinite(r)
        trace.append(StepTrace(t, float(n), False, float(r[ok].mean()), float(r[ok].max()), valid))
        x = sde_step(x, d, t, t_next, eta, _noise(x, gen), g)
        if callback is not None:
            callback({"step": k, "steps": len(times) - 1, "t": t, "x": x, "denoised": d,
                      "ess": float(n), "resampled": False, "nfe": loop.nfe})
    return FMTTResult(x, _uniform_log_w(n), loop.final_rewards(x), trace, loop.nfe, "denoiser-guidance")


FK_POTENTIALS = ("max", "add", "diff")


def fk_steering(denoiser, x_init, times, *, reward, decoder=None, potential: str = "max",
                reward_scale: float = 1.0, eta: float = 1.0, ess_threshold: float = 0.5,
                resampling: str = "multinomial", seed: int = 0, chunk_size=None, callback=None) -> FMTTResult:
    """FK steering (Singhal et al. 2025) with denoiser potentials r_k = r(D(x_k, t_k)):

      diff: G_k = exp(beta (r_k - r_{k-1}))   (telescopes to exp(beta r(x1)): a weighted target)
      max:  G_k = exp(beta max_{j<=k} r_j)     add: G_k = exp(beta sum_{j<=k} r_j)

    As in the original, after each resampling the particles restart with equal weights and the next
    resampling uses the current potential G_k (for max / add) or the product of increments since the
    last resampling (diff). Resampling is ESS-triggered; the SDE noise (eta > 0) diversifies copies.
    """
    check_particles(x_init)
    _check_eta(eta)
    if potential not in FK_POTENTIALS:
        raise FMTTInputError(f"potential must be one of {FK_POTENTIALS}, got {potential!r}.")
    if resampling not in SCHEMES:
        raise FMTTInputError(f"resampling must be one of {SCHEMES}, got {resampling!r}.")
    if eta == 0:
        raise FMTTInputError("FK steering needs a stochastic sampler (eta > 0): with the ODE, resampled "
                             "copies stay identical.")
    times = check_time_grid(times)
    loop = ParticleLoop(denoiser, reward, decoder, DenoiserLookahead(denoiser), chunk_size)
    gen = torch.Generator().manual_seed(int(seed))
    x, n = x_init, x_init.shape[0]
    beta = float(reward_scale)
    log_w = torch.zeros(n, dtype=torch.float64)
    history = None  # running max / sum / previous value of r per particle
    trace = []
    for k in range(len(times) - 1):
        t, t_next = float(times[k]), float(times[k + 1])
        d, r, _ = loop.evaluate(x, t, look=True)
        valid = _warn_invalid(r, t)
        ok = torch.isfinite(r)
        r = torch.where(ok, r, -math.inf)
        if potential == "diff":
            prev = history if history is not None else torch.zeros_like(r)
            log_w = log_w + beta * (r - prev)
            history = r
        elif potential == "max":
            history = r if history is None else torch.maximum(history, r)
            log_w = beta * history
        else:
            history = r if history is None else history + r
            log_w = beta * history
        log_w = torch.nan_to_num(log_w, nan=-math.inf)
        step_ess = ess(log_w)
        resampled = False
        if t_next < 1 and step_ess < ess_threshold * n:
            idx = resample_indices(log_w, resampling, gen)
            x, d, history = x[idx.to(x.device)], d[idx.to(x.device)], history[idx]
            resampled = True
            if potential == "diff":
                log_w = torch.zeros(n, dtype=torch.float64)
        trace.append(StepTrace(t, step_ess, resampled, float(r[ok].mean()), float(r[ok].max()), valid))
        x = sde_step(x, d, t, t_next, eta, _noise(x, gen))
        if callback is not None:
            callback({"step": k, "steps": len(times) - 1, "t": t, "x": x, "denoised": d,
                      "ess": step_ess, "resampled": resampled, "nfe": loop.nfe})
    final_lw = normalize_log_weights(log_w) if potential == "diff" else _uniform_log_w(n)
    return FMTTResult(x, final_lw, loop.final_rewards(x), trace, loop.nfe, f"fk-steering[{potential}]")
