"""Issue 9: weights="auto", chosen per step by a measured criterion (weights.AutoWeights); the default
until issue 19 measured its O(h) bias (bench/results/weights.md) and made twisted the default.

Twisted weights are exact at any step size but carry log-weight noise of variance (sigma |g| / 2)^2 per
step; the advective (Jarzynski) increment is deterministic given x_k and exact only as h -> 0. `auto`
takes twisted on quiet steps and advective on the others, so it is consistent, not exact. What holds:
- where the push is large (the authors' toy: beta 10 on a 0.03-wide band, eta 0.1) auto resamples far
  less than twisted weights, and lands as close to the rejection-sampled target as the authors'
  Eulerian weights with a flow map (at 50 steps: both reach only part of the tilt, see docs/weights.md);
- where a run mixes both rules, its bias is small against the law's spread (its size in standard
  errors: tests/test_core_weights_power.py);
- the choice follows the push: an untilted run is all twisted, a hard push all advective;
- the choice is the same under sharding (a population-wide max, not a per-shard one).
"""
import math

import bench_toy
import pytest
import torch
from scipy import stats

import fmtt_core as fc
from fmtt_core.analytic import quadratic_reward, ring_mixture

RING = ring_mixture(8, 4.0, 0.5)
C2 = torch.tensor([4.0, 0.0], dtype=torch.float64)


def ring_flow_map():
    return fc.FlowMapLookahead(lambda x, s, t: RING.flow_map(x, s, t, 8))


@pytest.mark.slow
def test_auto_does_not_collapse_where_twisted_weights_do():
    """The authors' toy at 50 steps (bench_toy.py's setting, N 256): twisted weights resample at nearly
    every step and their weighted population misses the target; auto behaves like the authors' method."""
    base = bench_toy.ring_base()
    target = bench_toy.target_samples(base, 1500)
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(100), dtype=torch.float64)

    def run(weights):
        cfg = fc.FMTTConfig(reward_scale=bench_toy.BETA, tilt=fc.RampTilt(0.1), eta=0.1, ess_threshold=0.9,
                            weights=weights, seed=0)
        look = fc.FlowMapLookahead(lambda x, s, t: base.flow_map(x, s, t, 4))
        res = fc.fmtt_sample(base.denoiser, x0, fc.time_grid(50), reward=bench_toy.wavy_ring_reward,
                             lookahead=look, config=cfg)
        return res, bench_toy.sw2(res.samples, res.weights, target)

    auto, sw_auto = run("auto")
    twisted, sw_twisted = run("twisted")
    eulerian, sw_eulerian = run("eulerian")
    assert twisted.n_resamples >= 40, "the setting no longer stresses twisted weights: the test lost its point"
    assert auto.n_resamples <= 2 * eulerian.n_resamples + 4, (auto.n_resamples, eulerian.n_resamples)
    assert sw_twisted > 0.5 and sw_auto < 0.2, (sw_auto, sw_twisted)
    assert sw_auto < 2 * sw_eulerian + 0.05, (sw_auto, sw_eulerian)
    assert auto.rule_counts.get("advective", 0) >= 40, auto.rule_counts


@pytest.mark.slow
def test_auto_is_close_where_it_mixes_rules():
    """The ring with a quadratic reward at beta 2, 30 steps: auto makes some steps twisted and some
    advective; the weighted mean and variance are within a Student-t 99.9% bound of the closed-form tilted
    law over 6 seeds, with the population healthy. A weak bound: it shows consistency, not exactness (the
    powered check in test_core_weights_power.py finds auto's bias against the discretised chain)."""
    runs, n, beta = 6, 1024, 2.0
    truth = RING.tilt_quadratic(C2, beta)
    means, variances, counts = [], [], []
    for seed in range(runs):
        x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(2000 + seed), dtype=torch.float64)
        res = fc.fmtt_sample(RING.denoiser, x0, fc.time_grid(30), reward=quadratic_reward(C2, 1.0),
                             lookahead=ring_flow_map(),
                             config=fc.FMTTConfig(reward_scale=beta, weights="auto", seed=seed))
        w = res.weights[:, None]
        m = (w * res.samples).sum(0)
        means.append(m)
        variances.append((w * (res.samples - m) ** 2).sum(0) / (1 - (res.weights ** 2).sum()))
        counts.append(res.rule_counts)
        assert res.ess > 0.2 * n
    t_crit = stats.t.ppf(1 - 0.001 / 2, runs - 1)
    for est, exact, what in ((torch.stack(means), truth.mean(), "mean"),
                             (torch.stack(variances), truth.cov().diagonal(), "variance")):
        z = ((est.mean(0) - exact) / (est.std(0) / math.sqrt(runs))).abs().max()
        assert z <= t_crit, f"auto weights far off in the {what}: |z| = {float(z):.1f}"
    assert all(c.get("twisted", 0) >= 3 and c.get("advective", 0) >= 3 for c in counts), counts


def test_the_rule_follows_the_push():
    """No tilt (beta 0): every step is quiet, so twisted; a hard push (beta 200): every tilted step is
    advective. The trace records the rule per step."""
    x0 = torch.randn(128, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def counts(beta):
        res = fc.fmtt_sample(RING.denoiser, x0, fc.time_grid(10), reward=quadratic_reward(C2, 1.0),
                             lookahead=ring_flow_map(), config=fc.FMTTConfig(reward_scale=beta, weights="auto"))
        assert [s.rule for s in res.trace].count("") == 0
        return res.rule_counts

    assert counts(0.0) == {"twisted": 10}
    hard = counts(200.0)
    assert hard.get("advective", 0) >= 8, hard


def test_auto_measures_the_eulerian_defect_on_its_advective_steps():
    """The defect comes free on advective steps: the trace shows it without defect_probe."""
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = fc.fmtt_sample(RING.denoiser, x0, fc.time_grid(10), reward=quadratic_reward(C2, 1.0),
                         lookahead=fc.DenoiserLookahead(RING.denoiser),
                         config=fc.FMTTConfig(reward_scale=200.0, weights="auto"))
    measured = [s for s in res.trace if s.rule == "advective"]
    assert measured and all(not math.isnan(s.defect) for s in measured)
    assert all(math.isnan(s.defect) for s in res.trace if s.rule == "twisted")


@pytest.mark.slow
def test_no_single_particle_takes_over_in_the_authors_setting():
    """The ring in the authors' setting (ramp tilt 0.1, eta 0.1, ESS threshold 0.9, 50 steps): a step is
    twisted only if its noisiest particle is quiet. Judged by the population mean instead, single
    particles with large twisted noise got through and spoilt 2 of these 6 seeds (mean error 1.47 and
    0.71 in units of the std); now every seed is close and the weighted mean is within bounds."""
    import test_core_exactness as ex

    name, gm, reward, tilted = ex.CASES[0]
    truth = tilted(1.0)

    def sampler(x0, seed):
        cfg = fc.FMTTConfig(reward_scale=1.0, tilt=fc.RampTilt(0.1), eta=0.1, ess_threshold=0.9, weights="auto",
                            seed=seed)
        return fc.fmtt_sample(gm.denoiser, x0, fc.time_grid(50), reward=reward, lookahead=ex.flow_map(gm),
                              config=cfg)

    means, _, runs = ex.replicate(sampler, gm, 1024)
    errors = ((means - truth.mean()).abs() / truth.cov().diagonal().sqrt()).mean(1)
    assert float(errors.max()) < 0.3, errors
    assert ex.within_ci(means, truth.mean())[0]
    assert all(r.rule_counts.get("twisted", 0) > 0 and r.rule_counts.get("advective", 0) > 0 for r in runs)
