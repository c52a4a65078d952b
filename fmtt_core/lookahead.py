"""Look-aheads: predict where a trajectory at (x, t) lands at t = 1, differentiably in x.

Each look-ahead is `lookahead(x, t, denoised=None, nfe=None) -> X_{t,1}(x)` with t a [B] tensor.
`denoised` is D(x, t) already computed by the sampler (with its graph); the base-model look-aheads
reuse it as their first evaluation so one step costs no extra call. `nfe` counts look-ahead calls.

With an exact flow map, r(X_{t,1}(x)) is constant along the probability-flow ODE (the Eulerian
identity), which is what makes FMTT's weights exact; the denoiser is its 1-step Euler approximation.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .clock import _bcast, velocity_from_denoiser
from .errors import FMTTInputError
from .nfe import NFE

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FlowMap = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Grid = Callable[[torch.Tensor, int], list]  # (t [B], steps) -> [t_0 = t, t_1, ..., t_steps = 1], each [B]


def uniform_grid(t: torch.Tensor, steps: int) -> list:
    return [t + (1 - t) * j / steps for j in range(steps + 1)]


def _check_steps(name: str, steps: int) -> int:
    if int(steps) != steps or steps < 1:
        raise FMTTInputError(f"{name} must be an integer >= 1, got {steps!r}.")
    return int(steps)


def _count(nfe: NFE | None, x: torch.Tensor) -> None:
    if nfe is not None:
        nfe.add("lookahead", x.shape[0])


def _maybe_checkpoint(use: bool, fn, *args):
    # Recompute each step in the backward pass instead of storing its activations: memory stays
    # one step deep for multi-step look-aheads.
    if use and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _check_shape(kind: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if out.shape != x.shape:
        raise FMTTInputError(f"{kind} look-ahead returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
                             "the model must map x to the same shape (same latent space).")
    return out


@dataclass
class DenoiserLookahead:
    """X_{t,1}(x) ~ D(x, t): the 1-step Euler flow map of the base model (the baseline look-ahead)."""

    denoiser: Denoiser
    kind = "denoiser"
    flow_map_of_base = False  # D is only the 1-step Euler flow map: weights need the advective form
    uses_denoised = True

    def __call__(self, x, t, denoised=None, nfe=None):
        if denoised is not None:
            return denoised
        _count(nfe, x)
        return _check_shape(self.kind, x, self.denoiser(x, t))

    def __str__(self):
        return "denoiser"


@dataclass
class ODELookahead:
    """`steps` solver steps of the probability-flow ODE dx = b_t(x) dt from t to 1.

    Sub-grid per particle: uniform in t, or `grid(t, steps)`; Heun's corrector is skipped on the final step, whose
    end point t = 1 has no velocity (the Euler step there lands exactly on D).
    """

    denoiser: Denoiser
    steps: int = 4
    solver: str = "euler"
    checkpoint: bool = False
    reuse_denoised: bool = True
    grid: Grid = uniform_grid
    kind = "ode"
    flow_map_of_base = True  # the base model's own ODE, up to solver error

    @property
    def uses_denoised(self) -> bool:
        return self.reuse_denoised

    def __post_init__(self):
        _check_steps(f"{self.kind} look-ahead steps", self.steps)
        if self.solver not in ("euler", "heun"):
            raise FMTTInputError(f"solver must be 'euler' or 'heun', got {self.solver!r}.")

    def _denoise(self, x, t, nfe):
        _count(nfe, x)
        return _check_shape(self.kind, x, self.denoiser(x, t))

    def _step(self, x, t, t_next, d, nfe):
        h = _bcast(t_next - t, x)
        v = velocity_from_denoiser(x, d, t)
        x_next = x + h * v
        if self.solver == "heun" and bool((t_next < 1).all()):
            d_next = self._denoise(x_next, t_next, nfe)
            x_next = x + h * (v + velocity_from_denoiser(x_next, d_next, t_next)) / 2
        return x_next

    def __call__(self, x, t, denoised=None, nfe=None):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        grid = self.grid(t, self.steps)
        for j in range(self.steps):
            if j == 0 and denoised is not None and self.reuse_denoised:
                d = denoised
            else:
                d = _maybe_checkpoint(self.checkpoint, self._denoise, x, grid[j], nfe)
            x = _maybe_checkpoint(self.checkpoint, self._step, x, grid[j], grid[j + 1], d, nfe)
        return x

    def __str__(self):
        return f"{self.kind}({self.steps}, {self.solver})"


@dataclass
class CompanionLookahead(ODELookahead):
    """`steps` ODE steps of a second, few-step model sharing the latent space (e.g. FLUX.1-schnell
    for FLUX.1-dev). Its first call cannot reuse the base model's D."""

    reuse_denoised: bool = False
    kind = "companion"
    flow_map_of_base = False  # another model's ODE: not the base flow map, so advective weights


@dataclass
class FewStepLookahead(ODELookahead):
    """`steps` deterministic Euler steps of a few-step distilled model (a consistency / TCD / Lightning-style LoRA
    on the base model), on the grid it is meant to be sampled on. In the sigma clock an Euler step is DDIM's jump
    x' = D + sigma' (x - D) / sigma: TCD with gamma 0, and LCM's multistep sampler with its fresh noise replaced by
    the noise the model itself implies. Not a flow map of the base model: such models are trained to land on the
    data (consistency) or away from the teacher's ODE (adversarial / distribution matching), so the weights must
    not assume X_{t,1} is the base model's flow map."""

    reuse_denoised: bool = False  # the base model's D is not the few-step model's
    kind = "few_step"
    flow_map_of_base = False


@dataclass
class FlowMapLookahead:
    """A learned two-time flow map X(x, s, t), applied in `jumps` equal jumps from t to 1."""

    flow_map: FlowMap
    jumps: int = 1
    checkpoint: bool = False
    kind = "flow_map"
    flow_map_of_base = True  # trained to match the base model's flow map
    uses_denoised = False

    def __post_init__(self):
        _check_steps("flow-map jumps", self.jumps)

    def _jump(self, x, s, t):
        return _check_shape(self.kind, x, self.flow_map(x, s, t))

    def __call__(self, x, t, denoised=None, nfe=None):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        grid = [t + (1 - t) * j / self.jumps for j in range(self.jumps + 1)]
        for j in range(self.jumps):
            _count(nfe, x)
            x = _maybe_checkpoint(self.checkpoint, self._jump, x, grid[j], grid[j + 1])
        return x

    def __str__(self):
        return f"flow_map({self.jumps})"
