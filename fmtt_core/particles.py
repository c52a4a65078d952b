"""Model calls for a particle population: D, the look-ahead reward and its gradient, in chunks.

Shared by FMTT and the baselines so that every method makes the same model calls and is charged
on the same NFE counter. "reward" here is always the user's reward r (never the score function).
"""
from __future__ import annotations

import contextvars
import math
import warnings
from collections.abc import Callable

import torch

from .clock import _bcast
from .errors import FMTTInputError, FMTTNumericalError
from .finite import Trace
from .lookahead import Denoiser
from .nfe import NFE

RewardFn = Callable[[torch.Tensor], torch.Tensor]

# Where a ParticleLoop's model calls (evaluate, lookahead_reward) run. None: here, chunk by chunk. An adapter that
# holds copies of the models on other devices (the ComfyUI pack's MultiGPU support) sets `spread(loop, x, fn)`: it
# runs fn(replica_loop, rows) for consecutive row blocks of x, each on its device, and returns what fn(loop, x)
# would, rows in order.
SPREAD: contextvars.ContextVar = contextvars.ContextVar("fmtt_spread", default=None)


def split_rows(n: int, chunk: int | None, speeds: list[float]) -> list[int]:
    """How many of n particles each worker (device) evaluates, in order, for a spread over workers with these
    relative speeds. Workers get whole chunks of `chunk` rows (None: single rows), so every batch is one that a
    single worker would also run; the number of chunks is shared in proportion to the speeds, rounded by largest
    remainder (ComfyUI's load_balance_devices rule). The last, partial chunk goes to the last worker with chunks;
    a slow worker may get none."""
    if n < 1 or not speeds or any(not math.isfinite(s) or s < 0 for s in speeds) or sum(speeds) <= 0:
        raise FMTTInputError(f"cannot split {n} particles over workers with relative speeds {speeds}: need n >= 1 "
                             "and finite speeds >= 0, not all zero.")
    size = min(chunk or 1, n)
    chunks = -(-n // size)
    share = [chunks * s / sum(speeds) for s in speeds]
    counts = [int(w) for w in share]
    by_remainder = sorted(range(len(share)), key=lambda i: share[i] - counts[i], reverse=True)
    for i in by_remainder[:chunks - sum(counts)]:
        counts[i] += 1
    rows = [c * size for c in counts]
    last = max(i for i, c in enumerate(counts) if c)
    rows[last] -= chunks * size - n
    return rows


def check_particles(x_init: torch.Tensor) -> None:
    if not isinstance(x_init, torch.Tensor) or x_init.ndim < 2:
        raise FMTTInputError("x_init must be a tensor [N, ...] with one row per particle.")
    if x_init.shape[0] < 1:
        raise FMTTInputError("particles must be >= 1 (x_init has an empty batch dimension).")
    if not x_init.is_floating_point() or not torch.isfinite(x_init).all():
        raise FMTTInputError("x_init must be a finite floating-point tensor.")


def count_valid(r: torch.Tensor, t: float, pop=None) -> int:
    """Particles with a finite look-ahead reward; warns about the others, raises if there are none.
    With a population, r holds its local rows and the count is the whole population's."""
    valid = int(torch.isfinite(r).sum()) if pop is None else int(pop.sum(torch.isfinite(r).double()))
    total = r.numel() if pop is None else pop.size
    if valid == 0:
        raise FMTTNumericalError(
            f"the reward (or its gradient) is non-finite for every particle at t={t:.3f}. Check that the "
            "reward returns finite values for decoded samples, lower reward_scale, or set grad_clip.")
    if valid < total:
        warnings.warn(f"FMTT: {total - valid} of {total} particles had a non-finite reward or "
                      f"gradient at t={t:.3f}; they get weight zero.", RuntimeWarning, stacklevel=3)
    return valid


class ParticleLoop:
    """Evaluates D, the look-ahead reward and its gradient for the particles, chunk by chunk."""

    def __init__(self, denoiser: Denoiser, reward: RewardFn | None, decoder=None, lookahead=None,
                 chunk_size: int | None = None, grad_clip: float | None = None):
        self.denoiser, self.reward, self.decoder = denoiser, reward, decoder
        self.lookahead = lookahead
        self.chunk_size, self.grad_clip = chunk_size, grad_clip
        self.nfe = NFE()

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe.add("denoiser", x.shape[0])
        d = self.denoiser(x, t)
        if d.shape != x.shape:
            raise FMTTInputError(f"the denoiser returned shape {tuple(d.shape)} for particles {tuple(x.shape)}; "
                                 "it must return D(x, t) with the same shape as x.")
        return d

    def reward_of(self, y: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """Unscaled reward r(decode(y)) -> [B]; `trace` records where rows stop being finite."""
        if self.decoder is not None:
            self.nfe.add("decoder", y.shape[0])
            y = self.decoder(y)
            if trace is not None:
                trace.check("decoder", y)
        self.nfe.add("reward", y.shape[0])
        r = self.reward(y)
        if r.shape != (y.shape[0],):
            r = r.reshape(-1)
            if r.shape != (y.shape[0],):
                raise FMTTInputError(f"the reward must return one value per particle, shape [{y.shape[0]}], "
                                     f"got {tuple(r.shape)}.")
        if trace is not None:
            trace.check("reward", r)
        return r

    def look_ahead(self, x: torch.Tensor, t: torch.Tensor, trace: Trace, denoised=None) -> torch.Tensor:
        """X_t,1(x), its rows checked: a flow map reads only x; a look-ahead built on D reads D too."""
        y = self.lookahead(x, t, denoised=denoised, nfe=self.nfe)
        trace.check("lookahead", y)
        return y

    def _chunks(self, x: torch.Tensor):
        return x.split(self.chunk_size or x.shape[0])

    def evaluate(self, x: torch.Tensor, t: float, *, look: bool, grad_scale: float = 0.0):
        """-> (D [N,...], R [N] look-ahead reward or None, g [N,...] = grad_x (grad_scale * R) or None).

        grad_scale = 0 skips the backward pass. Particles whose reward or gradient is not finite get
        R = -inf (weight zero) and g = 0. Spread over devices when SPREAD is set.
        """
        spread = SPREAD.get()
        if spread is None:
            return self.evaluate_here(x, t, look=look, grad_scale=grad_scale)
        return spread(self, x, lambda loop, rows: loop.evaluate_here(rows, t, look=look, grad_scale=grad_scale))

    def evaluate_here(self, x: torch.Tensor, t: float, *, look: bool, grad_scale: float = 0.0):
        """evaluate() with this loop's own models, chunk by chunk."""
        ds, rs, gs, traces = [], [], [], []
        for xc in self._chunks(x):
            tc = torch.full((xc.shape[0],), float(t), dtype=x.dtype, device=x.device)
            trace = Trace(xc)
            traces.append(trace)
            if grad_scale == 0.0:
                with torch.no_grad():
                    d = self.denoise(xc, tc)
                    trace.check("model", d)
                    r = self.reward_of(self.look_ahead(xc, tc, trace, denoised=d), trace) if look else None
                ds.append(d)
                rs.append(r)
                continue
            with torch.enable_grad():
                xg = xc.detach().requires_grad_(True)
                # Keep D's graph only when the look-ahead builds on it (denoiser, base ODE); for a
                # flow map or companion it would hold a whole model's activations for nothing.
                with torch.set_grad_enabled(self.lookahead.uses_denoised):
                    d = self.denoise(xg, tc)
                trace.check("model", d)
                lookahead_calls = self.nfe.lookahead
                r = self.reward_of(self.look_ahead(xg, tc, trace, denoised=d), trace)
                ok = torch.isfinite(r)
                # The backward pass goes through the look-ahead's model calls, and through D when reused.
                traversed = self.nfe.lookahead - lookahead_calls
                self.nfe.add("backward", xc.shape[0])
                self.nfe.add("backward_model", traversed + (xc.shape[0] if self.lookahead.uses_denoised else 0))
                objective = torch.where(ok, r, 0).sum() * grad_scale
                # A reward that ignores its input (constant) has no graph: its gradient is zero.
                g = (torch.autograd.grad(objective, xg)[0] if objective.requires_grad
                     else torch.zeros_like(xg))
            g = g.detach()
            trace.check("gradient", g)
            ok &= torch.isfinite(g.flatten(1)).all(1)
            g = torch.where(ok.reshape(-1, *([1] * (g.ndim - 1))), g, 0)
            ds.append(d.detach())
            rs.append(torch.where(ok, r.detach(), -math.inf))
            gs.append(self._clip(g))
        # A stage that broke every particle is named here; rewards are counted population-wide (count_valid).
        Trace.cat(traces).blame(t)
        r = _as_weights_input(torch.cat(rs)) if look else None
        return torch.cat(ds), r, (torch.cat(gs) if gs else None)

    def _clip(self, g: torch.Tensor) -> torch.Tensor:
        if self.grad_clip is None:
            return g
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
        return g * _bcast((self.grad_clip / norm).clamp(max=1.0), g)

    def lookahead_reward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """r(X_{t,1}(x)) in chunks, without gradient -> float64 [N] on the CPU (-inf where not finite);
        at t = 1 the look-ahead is the identity. Spread over devices when SPREAD is set."""
        spread = SPREAD.get()
        if spread is None:
            return self.lookahead_reward_here(x, t)
        return spread(self, x, lambda loop, rows: (loop.lookahead_reward_here(rows, t),))[0]

    def lookahead_reward_here(self, x: torch.Tensor, t: float) -> torch.Tensor:
        out, traces = [], []
        with torch.no_grad():
            for xc in self._chunks(x):
                trace = Trace(xc)
                traces.append(trace)
                if t >= 1:
                    out.append(self.reward_of(xc, trace))
                    continue
                tc = torch.full((xc.shape[0],), float(t), dtype=x.dtype, device=x.device)
                out.append(self.reward_of(self.look_ahead(xc, tc, trace), trace))
        Trace.cat(traces).blame(t)
        return _as_weights_input(torch.cat(out))

    def final_rewards(self, x: torch.Tensor) -> torch.Tensor:
        """r(x1) of the final particles, float64 on the CPU, NaN where not finite (or no reward)."""
        if self.reward is None:
            return torch.full((x.shape[0],), math.nan, dtype=torch.float64)
        traces = [Trace(xc) for xc in self._chunks(x)]
        with torch.no_grad():
            r = torch.cat([self.reward_of(xc, trace).double() for xc, trace in zip(self._chunks(x), traces)]).cpu()
        Trace.cat(traces).blame(1.0)
        return torch.where(torch.isfinite(r), r, math.nan)


def _as_weights_input(r: torch.Tensor) -> torch.Tensor:
    """float64 CPU rewards with every non-finite value as -inf (weight zero)."""
    return torch.nan_to_num(r.detach().to(torch.float64).cpu(), nan=-math.inf, posinf=-math.inf)
