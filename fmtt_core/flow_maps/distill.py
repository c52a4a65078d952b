"""Flow-map distillation losses: teach a two-time student X_{s,t}(x) = x + (t - s) u(x, s, t) the flow of a teacher.

Core clock (fmtt_core.clock): t in [0, 1], t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1. The teacher is the
base model's velocity b_t(x) = dx/dt of its probability-flow ODE; the exact flow map solves
    d/dt X_{s,t}(x) = b_t(X_{s,t}(x)),   X_{s,s}(x) = x.

Callables, so any framework's model fits:
    student(x, s, t) -> u     two-time velocity ([B, ...] like x; s, t are [B] times)
    teacher(x, t)    -> b_t(x) the base velocity (called without gradients)

LSD, Lagrangian self-distillation (Boffi, Albergo, Vanden-Eijnden, arXiv 2505.18825), as in FMRG's FLUX recipe:
    d/dt X_{s,t} = u + (t - s) d/dt u,   residual  r = u + w (t - s) sg(d/dt u) - sg(b_t(X_{s,t}(x_s)))
with d/dt u by a central finite difference (two gradient-free student calls) and w the derivative weight
(ramped from 0 to 1 by `derivative_warmup`). Four forwards (one with gradients) and one backward per step.
`derivative_grad=True` keeps the finite difference in the graph: the gradient of the residual itself.

PSD, progressive self-distillation (same paper), derivative-free: the semigroup property
    X_{s,t}(x) = X_{m,t}(X_{s,m}(x))   for m between s and t,
with the two-jump side as a stop-gradient target. It says nothing about the teacher by itself; pair it with
`diagonal_loss` (u(x, t, t) = b_t(x)), which ties the map to the teacher's velocity.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..clock import _bcast
from ..errors import FMTTInputError

Student = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Teacher = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORMS = ("l1", "l2")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of SD3 / FLUX / Z-Image schedules in the core clock. Those models shift their noise level
    sigma = 1 - t by sigma' = shift sigma / (1 + (shift - 1) sigma), which for shift > 1 spends more of the
    uniform draw near noise; shift = 1 is the identity."""
    if shift <= 0:
        raise FMTTInputError(f"time shift must be > 0, got {shift}; use 1.0 for no shift.")
    sigma = 1 - t
    return 1 - shift * sigma / (1 + (shift - 1) * sigma)


def sample_time_pairs(n: int, *, generator: torch.Generator, min_gap: float = 0.0, shift: float = 1.0,
                      both_directions: bool = True, t_min: float = 0.0, device=None,
                      dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t), each [n]: independent uniform times (FMRG's draw) on the model's time range [t_min, 1], shifted by
    the model's `shift`, with |t - s| >= min_gap (pairs closer than that are redrawn, so the accepted pairs keep the
    joint law restricted to the allowed region). both_directions=False orders each pair s <= t (the noise-to-data
    jumps FMTT uses); True keeps both orders, as FMRG does. t_min: the earliest time the model is defined at (a
    model whose noise stops at sigma_max starts at t = 1 / (1 + sigma_max) on the VE clock; flow models at 0).
    Draws on the CPU from `generator`, so a run is reproducible across devices."""
    if not 0.0 <= min_gap < 0.9:
        raise FMTTInputError(f"min_gap must be in [0, 0.9), got {min_gap}: larger gaps leave almost no pairs.")
    if not 0.0 <= t_min < 1.0 - min_gap:
        raise FMTTInputError(f"t_min must be in [0, 1 - min_gap), got {t_min} (min_gap {min_gap}).")
    if int(n) != n or n < 1:
        raise FMTTInputError(f"the number of time pairs must be an integer >= 1, got {n!r}.")
    n = int(n)

    def draw(k: int) -> torch.Tensor:
        return t_min + (1 - t_min) * shift_time(torch.rand(k, generator=generator, dtype=torch.float64), shift)

    s, t = draw(n), draw(n)
    bad = (t - s).abs() < min_gap
    while bad.any():
        k = int(bad.sum())
        s[bad] = draw(k)
        t[bad] = draw(k)
        bad = (t - s).abs() < min_gap
    if not both_directions:
        s, t = torch.minimum(s, t), torch.maximum(s, t)
    dtype = dtype or torch.get_default_dtype()
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def derivative_warmup(step: int, warmup_steps: int) -> float:
    """Weight of the (t - s) d/dt u term at `step`: linear from 0 to 1 over `warmup_steps` (MeanFlow / AYF's
    tangent warmup: the map first learns the average velocity, then its time derivative), 1 afterwards."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / warmup_steps))


def flow_map_from_student(student: Student) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """X_{s,t}(x) = x + (t - s) u(x, s, t): the jump a two-time velocity defines (X_{s,s} = x exactly)."""

    def flow_map(x: torch.Tensor, s, t) -> torch.Tensor:
        s, t = _times(s, x), _times(t, x)
        return x + _bcast(t - s, x) * student(x, s, t)

    return flow_map


def _times(t, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])


def _reduce(residual: torch.Tensor, norm: str, per_row: bool = False) -> torch.Tensor:
    """The mean norm of the residual: over everything (the loss), or per row ([B]: each sample's own loss, whose
    mean is the loss)."""
    if norm == "l1":
        size = residual.abs()
    elif norm == "l2":
        size = residual.pow(2)
    else:
        raise FMTTInputError(f"unknown loss norm {norm!r}; choose one of {', '.join(NORMS)}.")
    return size.reshape(size.shape[0], -1).mean(1) if per_row else size.mean()


def _check(x: torch.Tensor, out: torch.Tensor, who: str) -> torch.Tensor:
    if out.shape != x.shape:
        raise FMTTInputError(f"the {who} returned shape {tuple(out.shape)} for input {tuple(x.shape)}; it must "
                             "return a velocity of the input's shape.")
    return out


def time_derivative(student: Student, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                    fd_step: float, *, grad: bool = False, t_min: float = 0.0) -> torch.Tensor:
    """d/dt u(x_s, s, t) by a central finite difference; one-sided where t +- fd_step leaves [t_min, 1] (the
    difference is taken over the clipped interval, so it stays a first-order estimate there). Without
    gradients unless `grad`."""
    if not 0.0 < fd_step < 0.5:
        raise FMTTInputError(f"fd_step must be in (0, 0.5), got {fd_step}; FMRG uses 5e-3.")
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        t_hi, t_lo = (t + fd_step).clamp(max=1.0), (t - fd_step).clamp(min=t_min)
        return (student(x_s, s, t_hi) - student(x_s, s, t_lo)) / _bcast(t_hi - t_lo, x_s)


def lsd_loss(student: Student, teacher: Teacher, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *,
             fd_step: float = 5e-3, derivative_weight: float = 1.0, norm: str = "l1",
             derivative_grad: bool = False, per_row: bool = False, t_min: float = 0.0) -> tuple[torch.Tensor, dict]:
    """LSD: mean norm of u + w (t - s) sg(d/dt u) - sg(b_t(X_{s,t}(x_s))), the Lagrangian residual of the map.

    derivative_grad=False (FMRG's recipe): gradients through u only; the d/dt term is a fixed target.
    derivative_grad=True: gradients through the finite difference too, i.e. the gradient of the paper's least-squares
    residual |d/dt X - b(X)| itself (two more forwards kept for the backward pass). The stop-gradient form is a
    fixed-point iteration u <- b - (t - s) d/dt u, which can amplify components of u that vary fast in t (a
    network with high-frequency time features); the full gradient descends the residual and does not.

    t_min: the model's earliest time (the finite difference stays inside [t_min, 1]).
    Returns (loss, stats of floats); per_row: the loss of each row ([B]) instead of their mean."""
    s, t = _times(s, x_s), _times(t, x_s)
    u = _check(x_s, student(x_s, s, t), "student")
    du_dt = time_derivative(student, x_s, s, t, fd_step, grad=derivative_grad, t_min=t_min)
    gap = _bcast(t - s, x_s)
    with torch.no_grad():
        x_t = x_s + gap * u.detach()
        b = _check(x_s, teacher(x_t, t), "teacher")
    residual = u + derivative_weight * gap * du_dt - b
    loss = _reduce(residual, norm, per_row)
    stats = {"loss": float(loss.detach().mean()), "residual_rms": float(residual.detach().pow(2).mean().sqrt()),
             "du_dt_rms": float(du_dt.detach().pow(2).mean().sqrt()), "derivative_weight": float(derivative_weight)}
    return loss, stats


def psd_loss(student: Student, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *, generator: torch.Generator,
             norm: str = "l1", midpoint="uniform", per_row: bool = False) -> tuple[torch.Tensor, dict]:
    """PSD: mean norm of X_{s,t}(x_s) - sg(X_{m,t}(X_{s,m}(x_s))), m = s + r (t - s).

    midpoint "uniform": r ~ U(0, 1) per row from `generator` (PSD-U); "half": r = 1/2 (PSD-M); or a [B] tensor of
    fractions r drawn by the caller (a data-parallel trainer draws them for the whole batch)."""
    s, t = _times(s, x_s), _times(t, x_s)
    if isinstance(midpoint, torch.Tensor):
        r = _times(midpoint, x_s)
    elif midpoint == "uniform":
        r = torch.rand(x_s.shape[0], generator=generator, dtype=torch.float64).to(x_s.device, x_s.dtype)
    elif midpoint == "half":
        r = torch.full_like(s, 0.5)
    else:
        raise FMTTInputError(f"unknown PSD midpoint {midpoint!r}; choose 'uniform', 'half' or a tensor of fractions.")
    m = s + r * (t - s)
    jump = flow_map_from_student(student)
    x_t = jump(x_s, s, t)
    _check(x_s, x_t, "student")
    with torch.no_grad():
        target = jump(jump(x_s, s, m), m, t)
    loss = _reduce(x_t - target, norm, per_row)
    stats = {"loss": float(loss.detach().mean()), "gap_rms": float((x_t.detach() - target).pow(2).mean().sqrt())}
    return loss, stats


def diagonal_loss(student: Student, teacher: Teacher, x: torch.Tensor, t: torch.Tensor, *,
                  norm: str = "l1", per_row: bool = False) -> tuple[torch.Tensor, dict]:
    """The map's boundary condition d/dt X_{s,t}|_{t=s} = u(x, s, s) = b_s(x): mean norm of u(x, t, t) - sg(b_t(x)).
    PSD needs it to learn the teacher's flow at all; LSD contains it (at t = s its residual is exactly this)."""
    t = _times(t, x)
    u = _check(x, student(x, t, t), "student")
    with torch.no_grad():
        b = _check(x, teacher(x, t), "teacher")
    loss = _reduce(u - b, norm, per_row)
    return loss, {"loss": float(loss.detach().mean())}
