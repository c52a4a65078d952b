"""What a sampler hands back: the final particles, their weights, rewards and a per-step trace."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import FMTTInputError
from .nfe import NFE
from .smc import ess, resample_indices
from .weights import APPROXIMATE_RULES


@dataclass
class StepTrace:
    t: float
    ess: float               # ESS after this step's weight update, before resampling
    resampled: bool          # resampling or search selection at this step
    reward_mean: float       # weighted mean of the look-ahead reward r(X_{t,1}(x)) (unscaled)
    reward_max: float
    valid: int               # particles with finite reward and gradient
    # Eulerian defect: weighted RMS of r(X_{t+h,1}(x + h b)) - r(X_{t,1}(x)) (unscaled reward units),
    # zero for a perfect flow map; how far Eulerian weights would be from exact. NaN: not measured.
    defect: float = math.nan
    tamed: int = 0           # particles whose tilt push was tamed (max_push / grad_clip) at this step
    rule: str = ""           # the weight increment used at this step ("twisted", "advective", ...; "" none)


@dataclass
class FMTTResult:
    samples: torch.Tensor        # [N, ...] final particles (t = 1)
    log_weights: torch.Tensor    # [N] normalised log-weights (uniform where no weights are claimed)
    rewards: torch.Tensor        # [N] r(x1) of the final particles, unscaled (NaN if it was not finite)
    trace: list[StepTrace]
    nfe: NFE
    method: str
    thermodynamic_length: float = 0.0

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    @property
    def ess(self) -> float:
        return ess(self.log_weights)

    @property
    def n_resamples(self) -> int:
        return sum(s.resampled for s in self.trace)

    @property
    def max_defect(self) -> float:
        """Largest Eulerian defect measured along the run (NaN when none was measured)."""
        d = [s.defect for s in self.trace if not math.isnan(s.defect)]
        return max(d) if d else math.nan

    @property
    def rule_counts(self) -> dict[str, int]:
        """Steps per weight increment: how `weights="auto"` split the run between its rules."""
        counts: dict[str, int] = {}
        for s in self.trace:
            if s.rule:
                counts[s.rule] = counts.get(s.rule, 0) + 1
        return counts

    @property
    def approximate_share(self) -> float:
        """Share of the weighted steps whose increment is a Jarzynski one (advective, eulerian): exact only
        as h -> 0. 0: the weights are exact for this grid; NaN: the run claims no weights."""
        ruled = [s.rule for s in self.trace if s.rule]
        return sum(r in APPROXIMATE_RULES for r in ruled) / len(ruled) if ruled else math.nan

    @property
    def order(self) -> torch.Tensor:
        """Particle indices, highest final reward first (non-finite rewards last)."""
        r = torch.nan_to_num(self.rewards.double(), nan=-math.inf)
        return torch.argsort(r, descending=True, stable=True)

    @property
    def best_index(self) -> int:
        return int(self.order[0])

    def pick(self, how: str = "best", k: int = 1, seed: int = 0) -> torch.Tensor:
        """Particles to hand on: "best" (highest reward), "top_k" (k best), "resample" (k draws from
        the weights: unbiased samples of the tilted law)."""
        if how == "best":
            return self.samples[self.order[:1]]
        if how == "top_k":
            return self.samples[self.order[:k]]
        if how == "resample":
            idx = resample_indices(self.log_weights, "systematic", torch.Generator().manual_seed(seed), n=k)
            return self.samples[idx.to(self.samples.device)]
        raise FMTTInputError(f"pick how must be 'best', 'top_k' or 'resample', got {how!r}.")
