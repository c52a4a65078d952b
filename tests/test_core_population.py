"""The population object: randomness that does not depend on sharding, and the single-process default."""
import math

import torch

import fmtt_core as fc
from fmtt_core.analytic import linear_reward, ring_mixture


class Shard(fc.Population):
    """Rows [start, start + count) of a population of `size`: what a distributed shard holds."""

    def __init__(self, size, seed, start, count):
        super().__init__(size, seed)
        self.start, self.count = start, count


def test_particle_noise_is_independent_of_sharding():
    for shape in [(2,), (4, 8, 8)]:  # small particles share a noise block, large ones do not
        full = fc.Population(1000, seed=3).noise(torch.zeros(1000, *shape), step=7)
        for start, count in [(0, 1), (1, 333), (333, 334), (999, 1)]:
            part = Shard(1000, 3, start, count).noise(torch.zeros(count, *shape), step=7)
            assert torch.equal(part, full[start:start + count])
    a = fc.Population(10, seed=3).noise(torch.zeros(10, 2), 7)
    assert not torch.equal(a, fc.Population(10, seed=3).noise(torch.zeros(10, 2), 8))
    assert not torch.equal(a, fc.Population(10, seed=4).noise(torch.zeros(10, 2), 7))
    assert abs(float(fc.Population(20000, 0).noise(torch.zeros(20000, 2), 0).std()) - 1) < 0.02


def test_every_sampler_runs_through_a_given_population():
    """A population passed in is the one used (here a counting subclass of the default)."""
    class Counting(fc.Population):
        calls = 0

        def ancestors(self, log_w, scheme, step):
            Counting.calls += 1
            return super().ancestors(log_w, scheme, step)

    ring = ring_mixture(8, 4.0, 0.5)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = fc.FMTTConfig(reward_scale=2.0, ess_threshold=1.0)
    res = fc.fmtt_sample(ring.denoiser, x0, fc.time_grid(6), reward=linear_reward([1.0, 0.0]), config=cfg,
                         population=Counting(64, 0))
    assert Counting.calls == res.n_resamples > 0
    fk = fc.fk_steering(ring.denoiser, x0, fc.time_grid(6), reward=linear_reward([1.0, 0.0]), config=cfg,
                        population=Counting(64, 0))
    assert Counting.calls == res.n_resamples + fk.n_resamples
    assert math.isclose(float(res.weights.sum()), 1.0)
