"""A NaN / inf is named at the stage that made it (fmtt_core/finite.py), not at the reward at the end of the chain:
each stage of a real sampler run (analytic ring mixture, exact flow map) is broken in turn."""
import math

import pytest
import torch

import fmtt_core as fc
from fmtt_core.analytic import ring_mixture
from fmtt_core.finite import FMTTNonFiniteError, Trace

RING = ring_mixture(8, 4.0, 0.5)


def noise(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flow_map(x, s, t):
    return RING.flow_map(x, s, t, 6)


def reward(x):
    return x[:, 0]


def run(mode="exact", denoiser=RING.denoiser, look=flow_map, decoder=None, r=reward, n=8):
    cfg = fc.FMTTConfig(mode=mode, reward_scale=1.0, seed=0)
    return fc.fmtt_sample(denoiser, noise(n), fc.time_grid(4), reward=r, lookahead=fc.FlowMapLookahead(look),
                          decoder=decoder, config=cfg)


NAN = math.nan


@pytest.mark.parametrize("mode", ["exact", "zero_order", "search"])
@pytest.mark.parametrize("stage, kwargs, said", [
    ("model", {"denoiser": lambda x, t: RING.denoiser(x, t) * NAN}, "model call"),
    ("lookahead", {"look": lambda x, s, t: flow_map(x, s, t) * NAN}, "look-ahead"),
    ("decoder", {"decoder": lambda y: y * NAN}, "decoder (VAE)"),
])
def test_a_stage_that_breaks_every_particle_is_named_with_its_fix(mode, stage, kwargs, said):
    with pytest.raises(FMTTNonFiniteError) as e:
        run(mode, **kwargs)
    assert e.value.stage == stage, str(e.value)
    assert said in str(e.value) and "every particle" in str(e.value) and "reward_scale" not in str(e.value)
    assert fc.finite.STAGES[stage][1] in str(e.value)  # the fix


def test_the_model_is_named_even_when_the_look_ahead_does_not_read_it():
    """A flow map never reads D; the NaN from the model call still is the first one (a NaN cfg does this)."""
    with pytest.raises(FMTTNonFiniteError, match="cfg") as e:
        run(denoiser=lambda x, t: RING.denoiser(x, t) + math.inf)
    assert e.value.stage == "model"


def test_inf_in_the_look_ahead_is_named_too():
    with pytest.raises(FMTTNonFiniteError) as e:
        run(look=lambda x, s, t: flow_map(x, s, t) - math.inf)
    assert e.value.stage == "lookahead"


def test_a_reward_that_is_nan_everywhere_is_still_the_reward():
    with pytest.raises(fc.FMTTNumericalError, match="every particle") as e:
        run(r=lambda x: x[:, 0] * NAN)
    assert not isinstance(e.value, FMTTNonFiniteError) or e.value.stage == "reward"
    assert "reward" in str(e.value)


def test_a_model_that_fails_for_some_particles_is_named_in_a_warning_and_the_run_goes_on():
    def patchy(x, t):  # NaN where the particle's first coordinate is large: a few of 32
        d = RING.denoiser(x, t)
        return torch.where((x[:, :1] > 1.0), NAN, d)

    with pytest.warns(RuntimeWarning, match=r"the model call D\(x, t\) returned non-finite values for \d+ of 32"):
        res = run(denoiser=patchy, n=32)
    assert torch.isfinite(res.pick("best")).all()
    assert torch.isfinite(res.rewards).any()


def test_trace_blames_the_first_stage_only_and_the_step_when_nothing_entered_finite():
    x = torch.zeros(4, 3)
    x[3, 0] = NAN  # already non-finite: no stage is blamed for it
    trace = Trace(x)
    d = torch.zeros(4, 3)
    d[0] = NAN
    trace.check("model", d)
    y = torch.full((4,), NAN)  # NaN everywhere downstream: rows 1, 2 break at the look-ahead, row 0 stays "model"
    trace.check("lookahead", y)
    assert trace.first.tolist()[:3] == [fc.finite._CODE["model"], fc.finite._CODE["lookahead"],
                                        fc.finite._CODE["lookahead"]] and trace.first[3] == 0
    with pytest.raises(FMTTNonFiniteError) as e:
        trace.blame(0.5)
    assert e.value.stage == "lookahead"  # it broke most of the particles that entered finite
    with pytest.raises(FMTTNonFiniteError) as e:
        Trace(torch.full((2, 2), math.inf)).blame(0.5)
    assert e.value.stage == "step" and "reward_scale" in str(e.value)
