"""Clock conversions, look-aheads, NFE accounting, determinism and bad input for fmtt_core."""
import math
import subprocess
import sys
import warnings

import pytest
import torch

import fmtt_core as fc
from fmtt_core.analytic import (
    GaussianMixture,
    linear_reward,
    quadratic_reward,
    ring_mixture,
)

RING = ring_mixture(8, 4.0, 0.5)


def noise(n, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_flow_map(gm, steps=12):
    return fc.FlowMapLookahead(lambda x, s, t: gm.flow_map(x, s, t, steps))


# --- clock ----------------------------------------------------------------------------------------
def test_score_from_denoiser_matches_autograd_score_of_marginal():
    """Tweedie: s_t = -(x - t D) / (1 - t)^2 equals grad log p_t computed from the closed-form marginal."""
    gm = RING
    x = noise(64, seed=1) * 3
    for t in (0.2, 0.5, 0.9):
        marginal = GaussianMixture(gm.weights, t * gm.means, t ** 2 * gm.variances + (1 - t) ** 2)
        xg = x.clone().requires_grad_(True)
        (autograd_score,) = torch.autograd.grad(marginal.log_prob(xg).sum(), xg)
        tt = torch.full((64,), t, dtype=torch.float64)
        s = fc.score_from_denoiser(x, gm.denoiser(x, tt), tt)
        assert torch.allclose(s, autograd_score, atol=1e-8, rtol=1e-6)
        b = fc.velocity_from_denoiser(x, gm.denoiser(x, tt), tt)
        n = fc.noise_from_denoiser(x, gm.denoiser(x, tt), tt)
        assert torch.allclose(b, gm.denoiser(x, tt) - n)


def test_clock_conversions_round_trip_and_agree():
    sigma = torch.tensor([14.6, 3.0, 1.0, 0.1])
    t = fc.ve_sigma_to_t(sigma)
    assert torch.allclose(fc.t_to_ve_sigma(t), sigma)
    x1, x0 = torch.randn(4, 3), torch.randn(4, 3)
    x_ve = x1 + sigma[:, None] * x0
    x_lin = fc.ve_to_linear(x_ve, sigma)
    assert torch.allclose(x_lin, (1 - t[:, None]) * x0 + t[:, None] * x1, atol=1e-6)
    assert torch.allclose(fc.linear_to_ve(x_lin, t), x_ve, atol=1e-5)
    s = torch.tensor([1.0, 0.7, 0.0])
    assert torch.allclose(fc.flow_sigma_to_t(s), torch.tensor([0.0, 0.3, 1.0]))
    assert torch.allclose(fc.t_to_flow_sigma(fc.flow_sigma_to_t(s)), s)


# --- look-aheads ----------------------------------------------------------------------------------
def test_lookaheads_converge_to_exact_flow_map():
    gm, x, t = RING, noise(200, seed=2), torch.full((200,), 0.3, dtype=torch.float64)
    ref = gm.flow_map(x, t, torch.ones(200), 200)
    err = lambda y: float((y - ref).norm(dim=1).mean())  # noqa: E731
    e_den = err(fc.DenoiserLookahead(gm.denoiser)(x, t))
    e_euler = [err(fc.ODELookahead(gm.denoiser, k)(x, t)) for k in (2, 8, 32)]
    e_heun = err(fc.ODELookahead(gm.denoiser, 8, "heun")(x, t))
    assert e_euler[0] < e_den and e_euler[2] < e_euler[1] < e_euler[0]
    assert e_heun < e_euler[1]
    assert err(exact_flow_map(gm).__call__(x, t)) < 1e-2 < e_den


def test_lookahead_gradient_matches_finite_difference_and_checkpointing():
    gm = RING
    x = noise(4, seed=3).requires_grad_(True)
    t = torch.full((4,), 0.4, dtype=torch.float64)
    r = quadratic_reward(torch.tensor([4.0, 0.0]), 1.0)
    for look in (fc.ODELookahead(gm.denoiser, 3, "heun"), exact_flow_map(gm, 6)):
        (g,) = torch.autograd.grad(r(look(x, t)).sum(), x)
        eps, fd = 1e-6, torch.zeros_like(x)
        for i in range(2):
            e = torch.zeros_like(x)
            e[:, i] = eps
            fd[:, i] = (r(look(x + e, t)) - r(look(x - e, t))) / (2 * eps)
        assert torch.allclose(g, fd, atol=1e-6, rtol=1e-5)
        look.checkpoint = True
        (g_ckpt,) = torch.autograd.grad(r(look(x, t)).sum(), x)
        assert torch.allclose(g, g_ckpt)


def test_lookahead_rejects_shape_change_and_bad_steps():
    with pytest.raises(fc.FMTTInputError, match="same shape"):
        fc.DenoiserLookahead(lambda x, t: x[:, :1])(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(fc.FMTTInputError, match="integer >= 1"):
        fc.ODELookahead(RING.denoiser, 0)
    with pytest.raises(fc.FMTTInputError, match="euler"):
        fc.ODELookahead(RING.denoiser, 2, "rk45")


# --- sampler mechanics ----------------------------------------------------------------------------
def run(mode="exact", look=None, seed=0, n=64, steps=10, **kw):
    cfg = fc.FMTTConfig(mode=mode, seed=seed, **kw)
    return fc.fmtt_sample(RING.denoiser, noise(n), fc.time_grid(steps), reward=linear_reward([1.0, 0.0]),
                          lookahead=look or fc.ODELookahead(RING.denoiser, 2), config=cfg)


def test_nfe_breakdown_counts_every_call():
    n, steps = 64, 10
    res = run(n=n, steps=steps, look=fc.ODELookahead(RING.denoiser, 3), weights="eulerian")
    # base calls: one per step; ODE(3) reuses D so 2 extra calls per step; rewards: one per step + final.
    assert res.nfe.denoiser == n * steps
    assert res.nfe.lookahead == 2 * n * steps
    assert res.nfe.reward == n * (steps + 1)
    # gradients: every step except the first (lambda_0 = 0) and the last (the jump onto D).
    assert res.nfe.backward == n * (steps - 2)
    assert res.nfe.backward_model == 3 * res.nfe.backward  # D + 2 ODE calls per backward
    flow = run(n=n, steps=steps, look=fc.FlowMapLookahead(lambda x, s, t: RING.flow_map(x, s, t, 4), jumps=4),
               weights="eulerian")
    assert flow.nfe.backward_model == 4 * flow.nfe.backward  # 4 jumps, D not in the graph
    adv = run(n=n, steps=steps, look=fc.DenoiserLookahead(RING.denoiser), weights="advective")  # +1 D a step
    assert adv.nfe.lookahead == n * (steps - 1) and adv.nfe.reward == n * (2 * steps + 1)
    twisted = run(n=n, steps=steps, look=fc.DenoiserLookahead(RING.denoiser), weights="twisted")  # no extra call
    assert twisted.nfe.lookahead == 0 and twisted.nfe.reward == n * (steps + 1)
    zo = run("zero_order", n=n, steps=steps)
    assert zo.nfe.backward == 0
    assert res.nfe.per_particle(n)["denoiser"] == steps


def test_same_seed_same_result_no_global_rng_and_chunking_invariant():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = run(seed=5), run(seed=5)
    assert torch.equal(torch.get_rng_state(), state), "the sampler must not touch the global RNG"
    assert torch.equal(a.samples, b.samples) and torch.equal(a.log_weights, b.log_weights)
    c = run(seed=6)
    assert not torch.allclose(a.samples, c.samples)
    chunked = run(seed=5, chunk_size=7)
    assert torch.allclose(chunked.samples, a.samples, atol=1e-10)
    assert torch.allclose(chunked.log_weights, a.log_weights, atol=1e-10)


def test_result_pick_and_trace():
    res = run(n=32)
    assert len(res.trace) == 10 and all(0 < s.ess <= 32 + 1e-9 for s in res.trace)
    assert torch.isclose(res.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    best = res.pick("best")
    assert torch.equal(best[0], res.samples[res.rewards.argmax()])
    assert res.pick("top_k", k=5).shape == (5, 2)
    assert res.pick("resample", k=8).shape == (8, 2)
    with pytest.raises(fc.FMTTInputError, match="best"):
        res.pick("median")


def test_non_finite_rewards_get_zero_weight_with_warning_and_all_bad_raises():
    def spiky(x):
        r = x[:, 0].clone()
        r[::4] = math.nan  # a quarter of the particles produce NaN
        return r
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = fc.fmtt_sample(RING.denoiser, noise(16), fc.time_grid(4), reward=spiky,
                             lookahead=fc.ODELookahead(RING.denoiser, 2))
    assert torch.isfinite(res.samples).all()
    with pytest.raises(fc.FMTTNumericalError, match="every particle"):
        fc.fmtt_sample(RING.denoiser, noise(8), fc.time_grid(4), reward=lambda x: x[:, 0] * math.nan)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "greedy"}, "mode must be one of"),
    ({"resampling": "fancy"}, "resampling must be one of"),
    ({"ess_threshold": 2.0}, "ess_threshold"),
    ({"reward_scale": -1.0}, "reward_scale"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"eta": -0.1}, "eta"),
    ({"weights": "magic"}, "weights must be"),
    ({"mode": "search", "search_keep": 1000}, "search_keep"),
    ({"mode": "zero_order", "weights": "eulerian"}, "applies to mode .exact. only"),
    ({"sde_step": "rk4"}, "sde_step must be"),
    ({"max_push": 0.0}, "max_push"),
])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(fc.FMTTInputError, match=message):
        run(**kwargs)


def test_bad_inputs_are_clear_errors():
    r = linear_reward([1.0, 0.0])
    with pytest.raises(fc.FMTTInputError, match="particles must be >= 1"):
        fc.fmtt_sample(RING.denoiser, torch.zeros(0, 2), fc.time_grid(4), reward=r)
    with pytest.raises(fc.FMTTInputError, match="steps must be an integer >= 1"):
        fc.time_grid(0)
    with pytest.raises(fc.FMTTInputError, match="strictly increasing"):
        fc.fmtt_sample(RING.denoiser, noise(4), torch.tensor([0.0, 0.5, 0.4, 1.0]), reward=r)
    with pytest.raises(fc.FMTTInputError, match="end at t=1"):
        fc.fmtt_sample(RING.denoiser, noise(4), torch.tensor([0.0, 0.5]), reward=r)
    with pytest.raises(fc.FMTTInputError, match="same shape as x"):
        fc.fmtt_sample(lambda x, t: x[:, :1], noise(4), fc.time_grid(4), reward=r)
    with pytest.raises(fc.FMTTInputError, match="one value per particle"):
        fc.fmtt_sample(RING.denoiser, noise(4), fc.time_grid(4), reward=lambda x: x.sum().reshape(1))
    with pytest.raises(fc.FMTTInputError, match="stochastic"):
        fc.fk_steering(RING.denoiser, noise(4), fc.time_grid(4), reward=r, config=fc.FMTTConfig(eta=0.0))


def test_importing_core_pulls_no_framework():
    code = ("import sys, fmtt_core, fmtt_core.analytic; "
            "bad = [m for m in ('comfy', 'transformers', 'open_clip', 'folder_paths', 'fmtt_rewards') if m in sys.modules]; "  # noqa: E501
            "print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_steep_reward_gradient_warns_with_the_fix():
    steep = lambda x: 1e4 * x[:, 0]  # noqa: E731
    with pytest.warns(RuntimeWarning, match="weights cannot correct"):
        fc.fmtt_sample(RING.denoiser, noise(8), fc.time_grid(5), reward=steep,
                       lookahead=fc.ODELookahead(RING.denoiser, 1),
                       config=fc.FMTTConfig(weights="eulerian", max_push=None))
    # The default tames the push, with its weight correction, and still says the tilt is extreme.
    with pytest.warns(RuntimeWarning, match="tamed to 4x with the matching weight correction"):
        res = fc.fmtt_sample(RING.denoiser, noise(8), fc.time_grid(5), reward=steep,
                             lookahead=fc.ODELookahead(RING.denoiser, 1))
    assert sum(s.tamed for s in res.trace) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(n=16)  # a gentle reward: no warning
