"""Weighted sums of real rewards with fixed-affine and batch normalisation."""
from __future__ import annotations

import pytest
import torch

from fmtt_rewards.base import Reward, RewardInputError
from fmtt_rewards.combine import Affine, BatchStandardize, Term, WeightedSum
from fmtt_rewards.geometric import MaskContainment, MirrorSymmetry, RotationInvariance


def batch(n=6, seed=0):
    return 0.1 + 0.8 * torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LEFT = torch.zeros(8, 8)
LEFT[:, :4] = 1


def test_weighted_sum_with_affine_normalisation_by_hand():
    x = batch()
    sym, inside = MirrorSymmetry(dtype=torch.float64), MaskContainment(LEFT, dtype=torch.float64)
    total = WeightedSum([(sym, 2.0), Term(inside, -0.5, Affine(offset=0.3, scale=0.2))])
    expected = 2.0 * sym(x) - 0.5 * (inside(x) - 0.3) / 0.2
    out = total(x)
    assert out.shape == (6,) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    scores = total.term_rewards(x)
    assert scores.shape == (2, 6)
    torch.testing.assert_close(scores[1], (inside(x) - 0.3) / 0.2)
    assert [t.name for t in total.terms] == ["term0", "term1"]


def test_gradient_is_the_gradient_of_the_composed_expression():
    """Each reward's own gradient is checked against finite differences in test_rewards_geometric.py;
    here the sum must pass gradients through weights, affine maps and batch statistics unchanged."""
    sym, rot = MirrorSymmetry(dtype=torch.float64), RotationInvariance(180, dtype=torch.float64)
    inside = MaskContainment(LEFT, dtype=torch.float64)
    total = WeightedSum([(sym, 1.0), (rot, 0.5, Affine(0.1, 0.05)), (inside, 3.0, BatchStandardize())])
    x = batch(3).requires_grad_()
    w = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)  # not a plain sum: standardised scores sum to 0
    (grad,) = torch.autograd.grad((w * total(x)).sum(), x)
    c = inside.evaluate(x)
    expected = (sym.evaluate(x) + 0.5 * (rot.evaluate(x) - 0.1) / 0.05
                + 3.0 * (c - c.mean()) / (c.std(unbiased=False) + 1e-6))
    (expected_grad,) = torch.autograd.grad((w * expected).sum(), x)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_affine_fit_standardises_the_calibration_scores():
    inside = MaskContainment(LEFT, dtype=torch.float64)
    calibration = inside(batch(32, seed=1))
    norm = Affine.fit(calibration)
    standardised = norm(calibration).double()
    assert standardised.mean().abs() < 1e-6
    assert standardised.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_batch_standardisation_depends_on_the_batch_and_affine_does_not():
    """The documented reason to prefer a fixed affine map for importance weights."""
    x, others = batch(6, seed=2), batch(6, seed=3)
    swapped = torch.cat([x[:1], others[1:]])
    for normalize, batch_dependent in [(BatchStandardize(), True), (Affine(0.5, 0.1), False)]:
        total = WeightedSum([Term(MaskContainment(LEFT, dtype=torch.float64), 1.0, normalize)])
        first, first_again = total(x)[0], total(swapped)[0]
        assert (abs(first - first_again) > 1e-3) == batch_dependent
    standardised = WeightedSum([Term(MirrorSymmetry(dtype=torch.float64), 1.0, BatchStandardize())])(x).double()
    assert standardised.mean().abs() < 1e-6 and standardised.std(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    single = WeightedSum([Term(MirrorSymmetry(), 1.0, BatchStandardize())])(x[:1].float())
    assert single.item() == 0  # a batch of one standardises to zero, as documented


class WrongShape(Reward):
    def evaluate(self, images):
        return images.mean(dim=(1, 2))  # [B, W] instead of [B]


def test_bad_terms_name_the_fix():
    with pytest.raises(ValueError, match="at least one term"):
        WeightedSum([])
    with pytest.raises(ValueError, match="weights must be finite"):
        WeightedSum([(MirrorSymmetry(), float("nan"))])
    with pytest.raises(ValueError, match="not callable"):
        WeightedSum([("symmetry", 1.0)])
    with pytest.raises(ValueError, match="use Affine\\(offset, scale\\) or BatchStandardize"):
        WeightedSum([(MirrorSymmetry(), 1.0, lambda r: r)])
    with pytest.raises(ValueError, match="negative term weight"):
        Affine(0.0, -1.0)
    with pytest.raises(ValueError, match="all calibration scores are equal"):
        Affine.fit(torch.ones(4))
    with pytest.raises(ValueError, match="one score per image, shape \\[B\\]"):
        WeightedSum([(WrongShape(), 1.0)])(torch.rand(2, 3, 4, 4))
    with pytest.raises(RewardInputError, match="3 \\(RGB\\) channels"):
        WeightedSum([(MirrorSymmetry(), 1.0)])(torch.rand(2, 4, 4, 4))
