"""The teacher's probability-flow ODE dx/dt = v(x, t), solved with Heun's method on a uniform grid."""
from __future__ import annotations

import torch


@torch.no_grad()
def heun_trajectory(velocity, x: torch.Tensor, t_start: float = 0.0, steps: int = 128,
                    keep_every: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve from t_start to 1. Returns (times [M], states [M, B, ...]) at every `keep_every`-th grid point
    (the start and the end always included)."""
    times = torch.linspace(t_start, 1.0, steps + 1, dtype=torch.float64)
    kept_t, kept_x = [times[0]], [x]
    for k in range(steps):
        t, h = float(times[k]), float(times[k + 1] - times[k])
        v = velocity(x, t)
        x_euler = x + h * v
        x = x + 0.5 * h * (v + velocity(x_euler, t + h))
        if (k + 1) % keep_every == 0 or k + 1 == steps:
            kept_t.append(times[k + 1])
            kept_x.append(x)
    return torch.stack(kept_t), torch.stack(kept_x)


@torch.no_grad()
def heun_endpoint(velocity, x: torch.Tensor, t, steps: int = 128) -> torch.Tensor:
    """X_{t,1}(x) by `steps` Heun steps; t is a float or a [B] tensor (one start time per row)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
    h = ((1 - t) / steps).view(-1, *([1] * (x.ndim - 1)))
    for k in range(steps):
        tk = t + (1 - t) * k / steps
        v = velocity(x, tk)
        x_euler = x + h * v
        x = x + 0.5 * h * (v + velocity(x_euler, tk + (1 - t) / steps))
    return x
