"""Exactness with power (issue 19): the rules that claim exactness for the step count used match the
discretised base chain reweighted at the end, within 3 standard errors; the same check rejects rules
known to carry a bias.

Reference: the same discretised base chain (grid, eta, SDE step; no tilt) with 10^6 particles,
reweighted by exp(beta r(x1)), computed once by `python bench/bench_weights.py --write-reference` and
committed (tests/data/weights_reference.json). The statistic is the largest |z| over the weighted mean and
variance of each coordinate and the weighted mean reward, z = (mean of R seeds - reference) /
sqrt(sd^2 / R + se_ref^2). At 20 steps
the base chain itself is 15 standard errors away from the continuous-time tilted law on the ring, so
this reference, not the closed form, is what an exact rule must hit. The standard error is the spread
across seeds (it holds resampling's correlations). Pooling seeds does not shrink a run's own finite-N bias:
where the weights are heavy-tailed (the ring at beta 2) that bias fades about as N^-0.2, not 1/N, and the
test records it as a strict xfail (docs/weights.md).
"""
import json
import math
import warnings
from pathlib import Path

import bench_weights as bw
import pytest
import torch

import fmtt_core as fc

REFERENCE = json.loads((Path(__file__).parent / "data" / "weights_reference.json").read_text())
Z_MAX = 3.0
SEEDS, PARTICLES = 10, 1000


def bias_z(case: str, sample, seeds=SEEDS, n=PARTICLES) -> float:
    """Largest |z| of the weighted moments of `sample(x0, seed) -> FMTTResult` against the reference."""
    gm = bw.cases()[case][0]
    ref = REFERENCE[case]
    est = []
    for seed in range(seeds):
        x0 = torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(500 + seed), dtype=torch.float64)
        res = sample(x0, seed)
        est.append(bw.moments(res.samples, res.weights, res.rewards))
    z = bw.z_scores(torch.stack(est), torch.tensor(ref["moments"]), torch.tensor(ref["se"]))
    return float(z.abs().max())


def fmtt(case, look="flow map", **options):
    gm, reward, beta, kw, rk4, _ = bw.cases()[case]
    steps = REFERENCE[case]["steps"]
    lookahead = (fc.FlowMapLookahead(lambda x, s, t: gm.flow_map(x, s, t, rk4)) if look == "flow map"
                 else fc.DenoiserLookahead(gm.denoiser))

    def sample(x0, seed):
        cfg = fc.FMTTConfig(reward_scale=beta, seed=seed, **kw, **options)
        return fc.fmtt_sample(gm.denoiser, x0, fc.time_grid(steps), reward=reward, lookahead=lookahead, config=cfg)
    return sample


def fk_diff(case, **options):
    gm, reward, beta, kw, _, _ = bw.cases()[case]

    def sample(x0, seed):
        return fc.fk_steering(gm.denoiser, x0, fc.time_grid(REFERENCE[case]["steps"]), reward=reward,
                              potential="diff", config=fc.FMTTConfig(reward_scale=beta, seed=seed, **kw, **options))
    return sample


def test_reference_is_the_committed_chain():
    """The committed reference is what bench_weights computes for these cases (same grid and reward)."""
    for case, (steps, n) in bw.TEST_CASES.items():
        assert REFERENCE[case]["steps"] == steps and REFERENCE[case]["particles"] == n
        assert REFERENCE[case]["beta"] == bw.cases()[case][2]
    # A fresh, smaller reference agrees with it within their joint error.
    gm, reward, beta, kw, _, _ = bw.cases()["ring"]
    est, se, _, _ = bw.reference(gm, reward, beta, kw, REFERENCE["ring"]["steps"], 50_000, seed=1)
    z = (est - torch.tensor(REFERENCE["ring"]["moments"])) / torch.sqrt(se ** 2 + torch.tensor(REFERENCE["ring"]["se"]) ** 2)  # noqa: E501
    assert float(z.abs().max()) < 4, z


# Measured with these seeds (issue 19): two exact-by-construction rules miss the bar on the ring at beta 2, 20
# steps, N 1000, both towards high reward (twisted 3.7, FK diff 12.2 standard errors; zero-order 1.4). Cause,
# measured (docs/weights.md): a finite-N bias of heavy-tailed weights, not a wrong formula and not SMC's O(1/N)
# bias. Without resampling FK diff is the reweighted base chain to the last digit (test below); the bias comes
# with resampling, whatever the scheme, and shrinks only slowly with N (FK diff, mean of x: +0.072, 0.063,
# 0.043, 0.033 at N 1k, 4k, 16k, 64k; twisted +0.027, 0.022, 0.013 at 1k, 4k, 16k). For FK diff the intermediate
# potentials (r at the denoiser end point, sharp from the first step) under-represent the part of the target that
# the final correction must weight up. For twisted it is not the potential (the ring's exact closed-form twist
# leaves the same bias) but the push taming at max_push 4: with max_push 1 the same test passes (the case
# 'twisted, max_push 1' below; bench/results/weights_ring_twisted.md). A test at the CI's N with the defaults
# cannot pass honestly, so these stay strict xfails: they turn into failures if a change makes the ring cases pass.
HEAVY_TAILED = pytest.mark.xfail(strict=True, reason="finite-N bias of heavy-tailed weights on the ring at beta 2: "
                                 "shrinks only slowly with N (docs/weights.md, issue 19)")


@pytest.mark.slow
@pytest.mark.parametrize("case, rule", [
    pytest.param("ring", "twisted", marks=HEAVY_TAILED), ("ring", "zero_order"),
    pytest.param("ring", "fk diff", marks=HEAVY_TAILED), ("ring", "fk diff, no resampling"),
    ("ring", "twisted, max_push 1"),
    ("mix2d", "twisted"), ("mix2d", "zero_order"), ("mix2d", "fk diff")])
def test_exact_rules_match_the_reweighted_chain(case, rule):
    """FK diff with resampling off runs the ring with the xfail's seeds and N and passes (|z| 1.9 against 12.2
    with resampling): the statistic and the reference are sound at this N; the xfail's bias comes with it.
    Twisted with its push tamed to 1x the step's noise instead of 4x passes too (|z| 0.8 at these seeds, 1.1
    on 30 fresh ones against 6.3 at 4x: bench/results/weights_ring_twisted.md): twisted's share of the ring's
    bias comes with the kernel-ratio correction of a push several times the noise."""
    sample = {"twisted": lambda: fmtt(case, weights="twisted"), "zero_order": lambda: fmtt(case, mode="zero_order"),
              "twisted, max_push 1": lambda: fmtt(case, weights="twisted", max_push=1.0),
              "fk diff": lambda: fk_diff(case),
              "fk diff, no resampling": lambda: fk_diff(case, ess_threshold=0.0)}[rule]()
    z = bias_z(case, sample)
    assert z <= Z_MAX, f"{rule} on {case}: bias {z:.1f} standard errors"


def test_without_resampling_fk_diff_is_the_reweighted_base_chain():
    """FK diff's potentials telescope: with resampling off, its samples are the base chain's, to the last digit,
    and its final weights are exp(beta r(x1)) normalised. So the ring's bias at N 1000 (xfail above) is not a
    missing or wrong final weight; it comes with resampling on heavy-tailed weights."""
    gm, reward, beta, kw, _, _ = bw.cases()["ring"]
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cfg = fc.FMTTConfig(reward_scale=beta, seed=4, ess_threshold=0.0, **kw)
    fk = fc.fk_steering(gm.denoiser, x0, fc.time_grid(20), reward=reward, potential="diff", config=cfg)
    base = fc.base_sample(gm.denoiser, x0, fc.time_grid(20), reward=reward, config=cfg)
    assert fk.n_resamples == 0
    assert torch.equal(fk.samples, base.samples)
    torch.testing.assert_close(fk.weights, torch.softmax(beta * base.rewards, 0), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("what, options", [
    ("eulerian weights with a denoiser look-ahead", {"look": "denoiser", "weights": "eulerian"}),
    ("advective weights at 20 steps", {"weights": "advective"}),
])
def test_the_check_rejects_known_biased_rules(what, options):
    """The same statistic, seeds and particles: Jarzynski weights at 20 steps fail it."""
    z = bias_z("ring", fmtt("ring", **options))
    assert z > Z_MAX, f"{what}: bias only {z:.1f} standard errors; the exactness check has no power"
    assert math.isfinite(z)


def test_runs_report_their_share_of_approximate_steps_and_warn_when_it_dominates():
    """Twisted runs have no Jarzynski step (share 0, no warning); a hard push makes auto advective on most
    steps: the share says so and the chain warns that the weights are only consistent."""
    gm, reward, _, _, _, _ = bw.cases()["ring"]
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    look = fc.DenoiserLookahead(gm.denoiser)

    def run(**options):
        return fc.fmtt_sample(gm.denoiser, x0, fc.time_grid(10), reward=reward, lookahead=look,
                              config=fc.FMTTConfig(**options))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twisted = run(reward_scale=1.0)
    assert twisted.approximate_share == 0 and twisted.rule_counts == {"twisted": 10}
    with pytest.warns(RuntimeWarning, match="approximate \\(Jarzynski\\) weights"):
        hard = run(reward_scale=200.0, weights="auto", max_push=None)
    assert hard.approximate_share == hard.rule_counts["advective"] / 10 > 0.5
    assert math.isnan(fc.fmtt_sample(gm.denoiser, x0, fc.time_grid(4), reward=reward,
                                     config=fc.FMTTConfig(mode="search")).approximate_share)


def test_fk_max_and_add_warn_when_the_final_correction_leaves_degenerate_weights():
    """The ring at beta 1, 20 steps, N 256: max / add end with an ESS of 1-2% of N (below FK_DEGENERATE_ESS)
    and warn; diff (exact) keeps half of N and does not."""
    gm, reward, _, _, _, _ = bw.cases()["ring"]
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def fk(potential):
        return fc.fk_steering(gm.denoiser, x0, fc.time_grid(20), reward=reward, potential=potential,
                              config=fc.FMTTConfig(reward_scale=1.0))
    for potential in ("max", "add"):
        with pytest.warns(RuntimeWarning, match=f"{potential} potential left an ESS"):
            res = fk(potential)
        assert res.ess < fc.baselines.FK_DEGENERATE_ESS * 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fk("diff").ess > 0.3 * 256
