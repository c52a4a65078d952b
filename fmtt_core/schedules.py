"""Time grids, tilt schedules lambda_t and the noise level eps_t."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FMTTInputError


def time_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0) -> torch.Tensor:
    """Uniform grid t_start = t_0 < ... < t_steps = t_end (float64)."""
    if int(steps) != steps or steps < 1:
        raise FMTTInputError(f"steps must be an integer >= 1, got {steps!r}.")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise FMTTInputError(f"need 0 <= t_start < t_end <= 1, got t_start={t_start}, t_end={t_end}.")
    return torch.linspace(t_start, t_end, int(steps) + 1, dtype=torch.float64)


def check_time_grid(times: torch.Tensor) -> torch.Tensor:
    """Validate a user grid: 1-D, >= 2 points, strictly increasing, inside [0, 1], ending at 1."""
    times = torch.as_tensor(times, dtype=torch.float64).flatten().cpu()
    if times.numel() < 2:
        raise FMTTInputError(f"the time grid needs at least 2 points (1 step), got {times.numel()}; "
                             "use time_grid(steps) to build one.")
    if not torch.isfinite(times).all():
        raise FMTTInputError("the time grid contains NaN or inf.")
    if (times[1:] <= times[:-1]).any():
        raise FMTTInputError(f"the time grid must be strictly increasing (noise t=0 -> data t=1), got "
                             f"{times.tolist()[:8]}...; ComfyUI sigmas decrease, so convert them "
                             "with flow_sigma_to_t / ve_sigma_to_t first.")
    if times[0] < 0 or times[-1] > 1:
        raise FMTTInputError(f"the time grid must lie in [0, 1], got [{times[0]:.4g}, {times[-1]:.4g}].")
    if abs(times[-1].item() - 1.0) > 1e-6:
        raise FMTTInputError(f"the time grid must end at t=1 (data), got {times[-1]:.6g}.")
    return times


@dataclass(frozen=True)
class LinearTilt:
    """lambda_t = u, with u = (t - t_0) / (1 - t_0) the progress along the grid (the paper's lambda_t = t)."""

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return u

    def __str__(self) -> str:
        return "linear"


@dataclass(frozen=True)
class RampTilt:
    """lambda reaches 1 at progress u = t_ramp and stays there: weights and resampling act only early."""

    t_ramp: float = 0.1

    def __post_init__(self):
        if not 0 < self.t_ramp <= 1:
            raise FMTTInputError(f"RampTilt.t_ramp must be in (0, 1], got {self.t_ramp}.")

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return torch.clamp(u / self.t_ramp, max=1.0)

    def __str__(self) -> str:
        return f"ramp({self.t_ramp})"


def tilt_values(tilt, times: torch.Tensor) -> torch.Tensor:
    """lambda at each grid point, relative to the grid's start so that lambda_{t_0} = 0, lambda_1 = 1.

    Starting mid-way (img2img) the particles follow the untilted law at t_0, so the tilt must start at 0
    there for the weights to stay exact.
    """
    u = (times - times[0]) / (times[-1] - times[0])
    lam = torch.as_tensor(tilt(u), dtype=torch.float64)
    if lam[0].abs() > 1e-12 or abs(lam[-1].item() - 1) > 1e-9 or (lam[1:] < lam[:-1]).any():
        raise FMTTInputError(f"tilt schedule {tilt} must increase from 0 to 1; got {lam.tolist()[:6]}...")
    return lam


def noise_level(t: float, eta: float) -> float:
    """eps_t = eta * (1 - t): vanishes at the data end, where the score is singular."""
    return eta * (1.0 - t)
