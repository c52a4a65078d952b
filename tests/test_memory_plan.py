"""The memory guard's arithmetic (fmtt_core.memory): the largest chunk that fits, refusals that name the setting
to lower, and a planned chunk size that really bounds the memory a run takes."""
from __future__ import annotations

import re

import pytest
import torch

from fmtt_core import FMTTConfig, fmtt_sample
from fmtt_core.memory import FMTTMemoryError, MiB, plan_chunks

PASS, STATE = 100 * MiB, 1 * MiB


@pytest.mark.parametrize("particles,budget", [(1, 101), (8, 900), (64, 3000), (4096, 8000), (10, 10**6)])
def test_automatic_chunk_is_the_largest_that_fits(particles, budget):
    plan = plan_chunks(particles, PASS, STATE, budget * MiB)
    assert plan.automatic and 1 <= plan.chunk_size <= particles
    assert plan.peak <= plan.budget
    if plan.chunk_size < particles:  # one more particle per pass would not fit
        assert particles * STATE + (plan.chunk_size + 1) * PASS > plan.budget
    assert f"chunk size {plan.chunk_size} of {particles}" in str(plan)


def test_too_many_particles_are_refused_naming_how_many_fit():
    with pytest.raises(FMTTMemoryError) as err:
        plan_chunks(4096, PASS, STATE, 2000 * MiB)
    most = int(re.search(r"lower particles to at most (\d+)", str(err.value)).group(1))
    assert plan_chunks(most, PASS, STATE, 2000 * MiB).chunk_size >= 1
    with pytest.raises(FMTTMemoryError):
        plan_chunks(most + 1, PASS, STATE, 2000 * MiB)
    assert "2,000 MiB is free" in str(err.value)


def test_one_particle_too_big_names_the_image_size_and_the_callers_hints():
    with pytest.raises(FMTTMemoryError, match="lower the image size, use a TAESD VAE"):
        plan_chunks(1, 5000 * MiB, STATE, 4000 * MiB, lower="use a TAESD VAE")


def test_a_chunk_size_that_does_not_fit_is_refused_with_the_largest_that_does():
    with pytest.raises(FMTTMemoryError, match=r"Lower chunk_size to at most 8") as err:
        plan_chunks(64, PASS, STATE, (64 + 850) * MiB, chunk_size=16)
    assert "chunk_size 16" in str(err.value)
    plan = plan_chunks(64, PASS, STATE, (64 + 850) * MiB, chunk_size=8)
    assert plan.chunk_size == 8 and not plan.automatic


def test_planned_chunks_bound_the_networks_batch():
    """The core runs its networks on at most chunk_size particles at a time: the plan's bound holds in a run."""
    plan = plan_chunks(12, PASS, STATE, 12 * STATE + 5 * PASS)
    assert plan.chunk_size == 5
    seen = []

    def denoiser(x, t):
        seen.append(x.shape[0])
        return 0.5 * x

    x0 = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    fmtt_sample(denoiser, x0, torch.linspace(0, 1, 4).double(), reward=lambda x: -x.square().sum(1),
                config=FMTTConfig(chunk_size=plan.chunk_size))
    assert max(seen) == plan.chunk_size and sum(seen) % 12 == 0
