"""How many particles to push through the networks at once, from what one particle costs and what is free.

A sampling step keeps the whole population's state (particles, denoised predictions, gradients, noise) and
runs the networks on one chunk of particles at a time; with the reward gradient, a chunk's forward pass keeps
its activations for the backward pass. So

    memory = particles * state_per_particle + chunk * pass_per_particle  <=  budget,

and the largest chunk that fits is chunk = (budget - particles * state_per_particle) // pass_per_particle.
A run in which not even one particle's pass fits is refused before it starts, with the setting to lower.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import FMTTInputError

MiB = 1024 * 1024


class FMTTMemoryError(FMTTInputError):
    """The requested run cannot fit in the memory that is free."""


def mib(n_bytes: float) -> str:
    return f"{n_bytes / MiB:,.0f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    chunk_size: int            # particles per forward / backward pass
    particles: int
    pass_per_particle: int     # bytes of one particle's pass through the networks (with backward if any)
    state_per_particle: int    # bytes of one particle's state between passes
    budget: int                # bytes the run may use
    automatic: bool            # chosen from the budget (True) or given by the user

    @property
    def peak(self) -> int:
        return self.particles * self.state_per_particle + self.chunk_size * self.pass_per_particle

    def __str__(self) -> str:
        how = "automatic" if self.automatic else "as set"
        return (f"chunk size {self.chunk_size} of {self.particles} particles ({how}); estimated "
                f"{mib(self.pass_per_particle)} per particle pass, {mib(self.peak)} peak of {mib(self.budget)} free")


def plan_chunks(particles: int, pass_per_particle: float, state_per_particle: float, budget: float,
                chunk_size: int | None = None, lower: str = "") -> MemoryPlan:
    """The chunk size for a run (chunk_size None: the largest that fits), or FMTTMemoryError naming what to lower.

    `lower` is appended to the messages: what else makes one particle cheaper in the caller's terms.
    """
    if particles < 1:
        raise FMTTInputError(f"particles must be >= 1, got {particles}.")
    pass_b, state_b, budget = max(int(pass_per_particle), 1), max(int(state_per_particle), 0), int(budget)
    state = particles * state_b
    room = budget - state
    if room < pass_b:
        most = max(0, (budget - pass_b) // max(state_b, 1))
        if most >= 1:
            fix = f"lower particles to at most {most}"
        else:
            fix = "lower the image size" + (f", {lower}" if lower else "")
        raise FMTTMemoryError(
            f"not enough memory: {particles} particles need about {mib(state)} for their state plus "
            f"{mib(pass_b)} for one particle's pass through the networks, but only {mib(budget)} is free. "
            f"To fit: {fix}, or free memory (close other programs, unload other models).")
    fit = room // pass_b
    if chunk_size is None:
        return MemoryPlan(int(min(particles, fit)), particles, pass_b, state_b, budget, True)
    if chunk_size < 1:
        raise FMTTInputError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}.")
    chunk = min(chunk_size, particles)
    if chunk > fit:
        raise FMTTMemoryError(
            f"not enough memory for chunk_size {chunk_size}: a pass of {chunk} particles needs about "
            f"{mib(chunk * pass_b)} besides the population's {mib(state)}, but only {mib(budget)} is free. "
            f"Lower chunk_size to at most {fit}, or let it be chosen automatically (chunk_size 0 in the nodes).")
    return MemoryPlan(chunk, particles, pass_b, state_b, budget, False)
