"""The jump a two-time model defines, in the sigma clock of the model and in the core clock (torch only).

A two-time model returns a velocity u(z, sigma, sigma') in the clock its pipeline uses (sigma = 1 noise, 0 data,
z = (1 - sigma) x1 + sigma x0), and its jump is one Euler step of that velocity:
    X(z; sigma -> sigma') = z + (sigma' - sigma) u(z, sigma, sigma').
In the core clock (t = 1 - sigma) the same jump reads X(x, s, t) = x + (t - s) b, with b = -u the velocity d x / d t.
ComfyUI's flow models hand back a denoised D = z - sigma u instead of u, so b = (D - x) / (1 - s): the jump is
the core's velocity_from_denoiser, stepped over t - s. X(x, s, s) = x exactly, whatever the network says.
"""
from __future__ import annotations

import torch

from ..clock import _bcast, velocity_from_denoiser


def sigma_jump(z: torch.Tensor, sigma, sigma_next, u: torch.Tensor) -> torch.Tensor:
    """X(z; sigma -> sigma') = z + (sigma' - sigma) u, the pipeline's Euler step with a two-time velocity."""
    return z + _bcast(torch.as_tensor(sigma_next) - torch.as_tensor(sigma), z) * u


def jump_from_denoiser(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """X(x, s, t) = x + (t - s) (D - x) / (1 - s) in the core clock, with D the two-time model's denoised output."""
    return x + _bcast(t - s, x) * velocity_from_denoiser(x, denoised, s)


def average_embeddings(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """FMRG's DualTimeEmbedder: the conditioning vector of (sigma, sigma') is the mean of the two embeddings."""
    return (first + second) / 2
