"""A small distillation problem with a closed-form answer, shared by the trainer tests and the gloo workers.

Data x1 ~ N(m, diag v) in 2-D under x_t = (1 - t) x0 + t x1: the marginal at t is N(t m, diag sigma_t^2) with
sigma_t^2 = t^2 v + (1 - t)^2, the teacher's velocity is b_t(x) = m + (sigma_t' / sigma_t) (x - t m), and the
exact flow map is X_{s,t}(x) = t m + (sigma_t / sigma_s) (x - s m): a yardstick for what the student learns.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fmtt_core.flow_maps import DistillSettings

MEAN = torch.tensor([1.5, -0.5])
VAR = torch.tensor([0.25, 0.6])


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return (t[:, None] ** 2 * VAR + (1 - t[:, None]) ** 2).sqrt()


def teacher(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    sig = _sigma(t)
    dsig = (t[:, None] * VAR - (1 - t[:, None])) / sig
    return MEAN + dsig / sig * (x - t[:, None] * MEAN)


def exact_map(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t[:, None] * MEAN + _sigma(t) / _sigma(s) * (x - s[:, None] * MEAN)


def data(n: int, generator: torch.Generator) -> torch.Tensor:
    return MEAN + VAR.sqrt() * torch.randn(n, 2, generator=generator)


class Student(nn.Module):
    """u(x, s, t) from an MLP on [x, s, t, t - s] (dropout optional: it makes the global RNG part of the state)."""

    def __init__(self, width: int = 64, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, s, t):
        return self.net(torch.cat([x, s[:, None], t[:, None], (t - s)[:, None]], dim=1))


def settings(**over) -> DistillSettings:
    base = dict(steps=12, batch=8, lr=3e-3, ema_decay=0.9, derivative_warmup_steps=4, lr_warmup_steps=3, seed=3)
    return DistillSettings(**{**base, **over})
