"""Time conventions: one clock for the core, plain conversions for the models ComfyUI runs.

Core clock: t in [0, 1], t = 0 pure noise, t = 1 data, on the linear interpolant
    x_t = (1 - t) * x0 + t * x1,   x0 ~ N(0, I).
A model is a denoiser D(x, t) ~ E[x1 | x_t = x]; velocity and score follow from one call.
"""
from __future__ import annotations

import torch


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row times [B] (or a scalar) broadcast against x [B, ...]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def noise_from_denoiser(x: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """n = (x - t D) / (1 - t): the implied x0."""
    t = _bcast(t, x)
    return (x - t * denoised) / (1 - t)


def velocity_from_denoiser(x: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """b_t(x) = D - n = (D - x) / (1 - t)."""
    return (denoised - x) / (1 - _bcast(t, x))


def score_from_denoiser(x: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s_t(x) = -n / (1 - t) = -(x - t D) / (1 - t)^2."""
    t = _bcast(t, x)
    return -(x - t * denoised) / (1 - t) ** 2


# ComfyUI flow models (CONST sampling: Flux, SD3, AuraFlow, ...): x = (1 - sigma) x1 + sigma x0.
def flow_sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    return 1 - torch.as_tensor(sigma)


def t_to_flow_sigma(t: torch.Tensor) -> torch.Tensor:
    return 1 - torch.as_tensor(t)


# Noise-prediction models in k-diffusion's VE form (SD1.x, SDXL): x = x1 + sigma x0.
# Dividing by (1 + sigma) gives the linear interpolant at t = 1 / (1 + sigma).
def ve_sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.as_tensor(sigma))


def t_to_ve_sigma(t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t)
    return (1 - t) / t


def ve_to_linear(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / (1 + _bcast(sigma, x))


def linear_to_ve(x_lin: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x_lin / _bcast(t, x_lin)
