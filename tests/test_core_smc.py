"""ESS and resampling schemes: unbiased offspring counts, and systematic has the lowest variance."""
import math

import pytest
import torch

import fmtt_core as fc

WEIGHTS = torch.tensor([0.31, 0.02, 0.17, 0.005, 0.125, 0.2, 0.08, 0.09], dtype=torch.float64)
assert abs(WEIGHTS.sum().item() - 1) < 1e-12


def offspring_counts(scheme, reps=4000, n=8):
    gen = torch.Generator().manual_seed(11)
    log_w = WEIGHTS.log()
    return torch.stack([torch.bincount(fc.resample_indices(log_w, scheme, gen), minlength=n) for _ in range(reps)]).double()  # noqa: E501


def test_ess_bounds_and_values():
    n = 10
    assert fc.ess(torch.zeros(n)) == pytest.approx(n)
    one_hot = torch.full((n,), -math.inf)
    one_hot[3] = 0.0
    assert fc.ess(one_hot) == pytest.approx(1.0)
    w = torch.tensor([0.5, 0.25, 0.25])
    assert fc.ess(w.log() + 7.0) == pytest.approx(1 / (w ** 2).sum().item())  # invariant to scaling


@pytest.mark.parametrize("scheme", fc.SCHEMES)
def test_resampling_is_unbiased(scheme):
    counts = offspring_counts(scheme)
    n, reps = 8, counts.shape[0]
    mean, sd = counts.mean(0), counts.std(0)
    expected = n * WEIGHTS
    # 99.9% normal bound per particle on the mean count over 4000 independent resamplings.
    bound = 3.3 * sd.clamp_min(1e-9) / math.sqrt(reps)
    assert ((mean - expected).abs() <= bound + 1e-12).all(), (scheme, mean, expected)
    assert (counts.sum(1) == n).all()


def test_systematic_has_lowest_variance():
    var = {s: offspring_counts(s).var(0).sum().item() for s in fc.SCHEMES}
    assert var["systematic"] < var["stratified"] < var["multinomial"], var
    assert var["systematic"] <= var["residual"] < var["multinomial"], var


def test_resampling_zero_weights_never_chosen_and_all_zero_raises():
    log_w = torch.tensor([0.0, -math.inf, 0.0, -math.inf])
    for scheme in fc.SCHEMES:
        idx = fc.resample_indices(log_w, scheme, torch.Generator().manual_seed(0))
        assert set(idx.tolist()) <= {0, 2}
    with pytest.raises(fc.FMTTNumericalError, match="all importance weights are zero"):
        fc.resample_indices(torch.full((4,), -math.inf))
    with pytest.raises(fc.FMTTInputError, match="unknown resampling scheme"):
        fc.resample_indices(torch.zeros(4), "roulette")
