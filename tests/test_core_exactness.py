"""Statistical proof of the core on analytic targets (fixed seeds, confidence bounds).

Each estimate is the mean of R independent runs (one seed each); its confidence interval uses the
runs' own spread (Student t, R - 1 degrees of freedom), so resampling correlations inside a run are
accounted for. The truth is the closed-form tilted Gaussian mixture.
"""
import math

import pytest
import torch
from scipy import stats

import fmtt_core as fc
from fmtt_core.analytic import (
    GaussianMixture,
    linear_reward,
    quadratic_reward,
    ring_mixture,
)

RUNS = 6
T_CRIT = stats.t.ppf(1 - 0.001 / 2, RUNS - 1)  # two-sided 99.9% per coordinate

RING = ring_mixture(8, 4.0, 0.5)
GMM8 = GaussianMixture(
    torch.tensor([0.3, 0.3, 0.2, 0.2]),
    2 * torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
    0.2 + 0.5 * torch.rand(4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
A8 = torch.tensor([1.0, -0.5, 0, 0, 0.5, 0, 0, 0], dtype=torch.float64)
C2 = torch.tensor([4.0, 0.0], dtype=torch.float64)


def flow_map(gm):
    return fc.FlowMapLookahead(lambda x, s, t: gm.flow_map(x, s, t, 8))


def weighted_moments(res):
    w = res.weights[:, None]
    m = (w * res.samples).sum(0)
    # Unbiased weighted variance: the plug-in one is low by the factor 1 - sum w^2 (= 1 - 1/ESS).
    v = (w * (res.samples - m) ** 2).sum(0) / (1 - (res.weights ** 2).sum())
    return m, v


def replicate(sampler, gm, n, runs=RUNS):
    """-> (means [R, d], variances [R, d], results) over independent seeds."""
    ms, vs, out = [], [], []
    for seed in range(runs):
        x0 = torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
        res = sampler(x0, seed)
        m, v = weighted_moments(res)
        ms.append(m), vs.append(v), out.append(res)
    return torch.stack(ms), torch.stack(vs), out


def within_ci(estimates, truth):
    """Student-t test per coordinate: |mean - truth| <= t * sd / sqrt(R). Returns (ok, max |z|)."""
    mean, sd = estimates.mean(0), estimates.std(0).clamp_min(1e-12)
    z = ((mean - truth) / (sd / math.sqrt(estimates.shape[0]))).abs()
    return bool((z <= T_CRIT).all()), float(z.max())


def fmtt(gm, reward, beta, mode="exact", look=None, steps=30, **kw):
    def sampler(x0, seed):
        return fc.fmtt_sample(gm.denoiser, x0, fc.time_grid(steps), reward=reward,
                              lookahead=look or flow_map(gm),
                              config=fc.FMTTConfig(mode=mode, reward_scale=beta, seed=seed, **kw))
    return sampler


CASES = [  # (name, mixture, reward, exact tilted law as a function of beta)
    ("ring2d-quadratic", RING, quadratic_reward(C2, 1.0), lambda b: RING.tilt_quadratic(C2, b)),
    ("gmm8d-linear", GMM8, linear_reward(A8), lambda b: GMM8.tilt_linear(b * A8)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, gm, reward, tilted", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_exact_mode_matches_tilted_law(name, gm, reward, tilted, beta):
    target = tilted(beta)
    means, variances, runs = replicate(fmtt(gm, reward, beta), gm, n=300)
    ok_m, z_m = within_ci(means, target.mean())
    ok_v, z_v = within_ci(variances, target.cov().diag())
    assert ok_m, f"weighted mean off the tilted law: max |z| = {z_m:.2f} > {T_CRIT:.2f}"
    assert ok_v, f"weighted variance off the tilted law: max |z| = {z_v:.2f} > {T_CRIT:.2f}"
    # The tilt really moved the law: the base mean is far outside the interval.
    assert not within_ci(means, gm.mean())[0]
    assert all(r.n_resamples >= 0 and r.ess > 0.2 * 300 for r in runs)


@pytest.mark.slow
def test_zero_reward_reproduces_base_law_and_zero_order_is_exact():
    gm = GMM8
    means, variances, _ = replicate(fmtt(gm, lambda x: torch.zeros(x.shape[0], dtype=x.dtype), 1.0), gm, n=300)
    assert within_ci(means, gm.mean())[0] and within_ci(variances, gm.cov().diag())[0]
    target = gm.tilt_linear(A8)
    for look in (flow_map(gm), fc.DenoiserLookahead(gm.denoiser)):  # telescoping weights: exact for both
        means, variances, _ = replicate(fmtt(gm, linear_reward(A8), 1.0, mode="zero_order", look=look, steps=60),
                                        gm, n=300)
        assert within_ci(means, target.mean())[0], f"zero_order with {look} is biased"
        assert within_ci(variances, target.cov().diag())[0]


@pytest.mark.slow
def test_flow_map_beats_denoiser_lookahead():
    """The paper's central claim at equal steps and particles (authors' toy setting: ramp tilt, ESS
    threshold 0.9), with the paper's Eulerian weights for the flow map: the denoiser look-ahead is
    either biased (Eulerian weights, which assume the flow-map identity) or degenerates more
    (advective weights, exact but noisier): more resamplings and a longer thermodynamic path. The
    flow map is accurate with fewer resamplings."""
    gm, reward, target = RING, quadratic_reward(C2, 1.0), RING.tilt_quadratic(C2, 1.0)
    setting = {"tilt": fc.RampTilt(0.1), "eta": 0.1, "ess_threshold": 0.9, "steps": 50}
    den = fc.DenoiserLookahead(gm.denoiser)
    flow_m, _, flow_runs = replicate(fmtt(gm, reward, 1.0, weights="eulerian", **setting), gm, n=500, runs=4)
    biased_m, _, _ = replicate(fmtt(gm, reward, 1.0, look=den, weights="eulerian", **setting), gm, n=500, runs=4)
    _, _, adv_runs = replicate(fmtt(gm, reward, 1.0, look=den, weights="advective", **setting), gm, n=500, runs=4)
    err = lambda m: float((m.mean(0) - target.mean()).norm())  # noqa: E731
    assert within_ci(flow_m, target.mean())[0]
    assert err(flow_m) < 0.5 * err(biased_m), (err(flow_m), err(biased_m))
    assert not within_ci(biased_m, target.mean())[0], "the Eulerian weights with a denoiser should be biased"
    flow_resamples = sum(r.n_resamples for r in flow_runs)
    adv_resamples = sum(r.n_resamples for r in adv_runs)
    assert flow_resamples < adv_resamples, (flow_resamples, adv_resamples)
    thermo = lambda runs: sum(r.thermodynamic_length for r in runs) / len(runs)  # noqa: E731
    assert thermo(flow_runs) < thermo(adv_runs)


@pytest.mark.slow
def test_search_reaches_reward_maximum():
    gm, reward = RING, quadratic_reward(C2, 1.0)
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kw = {"reward": reward, "lookahead": flow_map(gm)}
    exact = fc.fmtt_sample(gm.denoiser, x0, fc.time_grid(40), **kw, config=fc.FMTTConfig(reward_scale=1.0, seed=1))
    search = fc.fmtt_sample(gm.denoiser, x0, fc.time_grid(40), **kw,
                            config=fc.FMTTConfig(mode="search", reward_scale=1.0, search_steps=3, search_keep=16, seed=1))  # noqa: E501
    exact_mean = float((exact.weights * exact.rewards).sum())
    assert float(search.rewards.mean()) >= exact_mean
    # The reward's maximum on the data's support: the best of 200k draws from the base law.
    support_max = float(reward(gm.sample(200_000, torch.Generator().manual_seed(0))).max())
    assert float(search.rewards.max()) >= support_max - 0.05
    assert float(search.rewards.mean()) >= support_max - 0.5


@pytest.mark.slow
def test_fk_diff_potential_is_exact_and_guidance_is_not_weighted():
    gm, reward, target = GMM8, linear_reward(A8), GMM8.tilt_linear(A8)

    def fk(x0, seed):
        return fc.fk_steering(gm.denoiser, x0, fc.time_grid(40), reward=reward, potential="diff",
                              config=fc.FMTTConfig(seed=seed))
    means, _, _ = replicate(fk, gm, n=300)
    assert within_ci(means, target.mean())[0]
    x0 = torch.randn(300, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = fc.base_sample(gm.denoiser, x0, fc.time_grid(40), reward=reward)
    guided = fc.guidance_sample(gm.denoiser, x0, fc.time_grid(40), reward=reward,
                                config=fc.FMTTConfig(reward_scale=1.0))
    assert guided.rewards.mean() > base.rewards.mean() + 0.5
    bon = fc.best_of_n(gm.denoiser, x0, fc.time_grid(40), reward=reward)
    assert float(bon.rewards[bon.best_index]) == float(base.rewards.max())
