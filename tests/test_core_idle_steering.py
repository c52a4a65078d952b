"""Settings that steer nothing are said aloud (fmtt_core.sampler.idle_steering), and what the warning claims is
what the run does: no backward pass, no gradient push, nothing to choose between."""
import warnings

import pytest
import torch

import fmtt_core as fc
from fmtt_core.analytic import ring_mixture

RING = ring_mixture(8, 4.0, 0.5)


def run(steps=6, n=8, **cfg):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    config = fc.FMTTConfig(**{"reward_scale": 1.0, "seed": 0, **cfg})
    return fc.fmtt_sample(RING.denoiser, x, fc.time_grid(steps), reward=lambda y: y[:, 0],
                          lookahead=fc.FlowMapLookahead(lambda y, s, t: RING.flow_map(y, s, t, 4)), config=config)


@pytest.mark.parametrize("mode", ["exact", "search"])
def test_two_steps_never_run_the_gradient_and_say_so(mode):
    with pytest.warns(RuntimeWarning, match="with 2 step\\(s\\) .* no backward pass runs"):
        res = run(steps=2, mode=mode)
    assert res.nfe.backward == 0  # the claim holds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = run(steps=3, mode=mode)  # 3 steps: the middle one is tilted and followed by another
    assert res.nfe.backward > 0


def test_reward_scale_zero_is_plain_sampling_and_says_so():
    with pytest.warns(RuntimeWarning, match="reward_scale is 0"):
        steered = run(reward_scale=0.0)
    assert steered.nfe.backward == 0 and steered.n_resamples == 0
    torch.testing.assert_close(steered.weights, torch.full((8,), 1 / 8, dtype=torch.float64))


def test_eta_zero_and_one_particle_say_what_is_left():
    with pytest.warns(RuntimeWarning, match="eta is 0"):
        run(eta=0.0)
    with pytest.warns(RuntimeWarning, match="1 particle: weights and resampling have nothing to choose between; "
                                            "only the reward gradient steers"):
        run(n=1)


def test_steering_settings_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in ("exact", "zero_order", "search"):
            run(mode=mode)
        run(steps=2, mode="zero_order")  # weights act at the second step: not idle
