"""Function-evaluation accounting shared by FMTT and every baseline.

Counts are particle-evaluations (rows pushed through a network): a batch of 8 particles through the
denoiser counts 8. `per_particle` divides by the population size, the unit the paper reports.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class NFE:
    denoiser: int = 0   # base-model calls for the sampling drift
    lookahead: int = 0  # model calls inside look-aheads (base-model ODE steps, companion, flow map)
    decoder: int = 0    # decoder forwards before the reward
    reward: int = 0     # reward-model forwards
    backward: int = 0   # backward passes (each through reward, decoder and look-ahead)
    backward_model: int = 0  # model evaluations those backward passes traverse (a 4-jump flow map: 4)

    @property
    def model(self) -> int:
        """Forward network evaluations of the diffusion / flow models (denoiser + look-ahead)."""
        return self.denoiser + self.lookahead

    def add(self, field: str, rows: int) -> None:
        setattr(self, field, getattr(self, field) + int(rows))

    def per_particle(self, particles: int) -> dict[str, float]:
        return {k: v / particles for k, v in self.as_dict().items()}

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "model": self.model}

    def __str__(self) -> str:
        d = self.as_dict()
        return ", ".join(f"{k} {v}" for k, v in d.items())
