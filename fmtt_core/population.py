"""The particle population: every operation that needs all N particles at once goes through here.

A sampler holds its particles as local rows (here: all N). What couples them is confined to this
object: each particle's noise, weight normalisation and ESS, resampling (choosing ancestors and moving
particles to them), search selection and collecting the final population. `Population` is the
single-process implementation; a distributed one (one shard of the rows per process) overrides the
same methods, and the samplers need no other change.

Randomness is explicit and sharding-free: particle i's noise at step k is a function of (seed, k, i)
alone, and the uniforms behind resampling are a function of (seed, k) alone, so every shard can draw
them identically.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .smc import ess, normalize_log_weights, resample_indices

NOISE_STREAM, RESAMPLE_STREAM = 0, 1
_BLOCK_ELEMENTS = 1 << 16  # noise is drawn in blocks of particles of about this many numbers


def stream_seed(seed: int, *words: int) -> int:
    """An independent 63-bit seed for (seed, *words) (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed) % 2**64, *map(int, words)]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) >> 1


class Population:
    """All N particles in this process (the default). Rows are particles; indices are global."""

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)     # N, the whole population
        self.seed = int(seed)
        self.start = 0            # global index of the first local row
        self.count = self.size    # local rows

    # --- randomness ---------------------------------------------------------------------------------
    def generator(self, step: int, stream: int = RESAMPLE_STREAM) -> torch.Generator:
        """A generator that is the same on every shard for (seed, step, stream)."""
        return torch.Generator().manual_seed(stream_seed(self.seed, stream, step))

    def noise(self, like: torch.Tensor, step: int) -> torch.Tensor:
        """Standard normal noise for the local rows, shaped like `like`; row i's noise depends only on
        (seed, step, global index i). Drawn on the CPU in float32 so a seed gives the same particles on
        every device, in blocks of particles so that no shard pays for another's rows (beyond a block)."""
        shape = like.shape[1:]
        block = max(1, _BLOCK_ELEMENTS // max(1, math.prod(shape)))
        lo, hi = self.start, self.start + like.shape[0]
        rows = []
        for b in range(lo // block, (hi - 1) // block + 1):
            g = torch.Generator().manual_seed(stream_seed(self.seed, NOISE_STREAM, step, b))
            z = torch.randn((block, *shape), generator=g, dtype=torch.float32)
            rows.append(z[max(lo - b * block, 0): min(hi - b * block, block)])
        return torch.cat(rows).to(like.device, like.dtype)

    # --- reductions ---------------------------------------------------------------------------------
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over all particles of per-particle values t [n_local, ...] -> [...]."""
        return t.sum(0)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t.max(0).values

    def weighted_mean(self, w: torch.Tensor, v: torch.Tensor) -> float:
        """sum_i w_i v_i / sum_i w_i over the particles where v is finite (w unnormalised is fine);
        NaN where no particle has a finite v (nothing was measured: not a mean of 0)."""
        ok = torch.isfinite(v)
        num, den = self.sum(torch.where(ok, w * v, 0.0)), self.sum(torch.where(ok, w, 0.0))
        return float(num / den) if den > 0 else math.nan

    # --- weights ------------------------------------------------------------------------------------
    def normalize(self, log_w: torch.Tensor) -> torch.Tensor:
        """Local rows of the normalised log-weights (normalised over the whole population)."""
        return normalize_log_weights(log_w)

    def ess(self, log_w: torch.Tensor) -> float:
        """Effective sample size of the whole population."""
        return ess(log_w)

    # --- moving particles ---------------------------------------------------------------------------
    def ancestors(self, log_w: torch.Tensor, scheme: str, step: int) -> torch.Tensor:
        """Global ancestor index of each local row after resampling by the weights (int64, CPU)."""
        return resample_indices(log_w, scheme, self.generator(step))

    def select_top(self, r: torch.Tensor, keep: int) -> torch.Tensor:
        """Search selection: keep the `keep` highest look-ahead rewards (NaN / -inf last) and refill the
        population by cloning each in turn -> global ancestor index of each local row."""
        r = torch.nan_to_num(r.double(), nan=-math.inf)
        top = torch.argsort(r, descending=True, stable=True)[:keep]
        return top.repeat(math.ceil(self.size / keep))[: self.size].sort().values

    def take(self, t: torch.Tensor | None, ancestors: torch.Tensor) -> torch.Tensor | None:
        """Rows of per-particle tensor t (local rows) for the given global ancestors (None passes)."""
        if t is None:
            return None
        return t[ancestors.to(t.device)]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The whole population's rows of a per-particle tensor (to build the final result)."""
        return t
