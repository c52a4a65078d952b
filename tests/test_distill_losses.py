"""The distillation losses of fmtt_core.flow_maps.distill against references written here from the published
formulas (LSD / PSD, Boffi, Albergo, Vanden-Eijnden arXiv 2505.18825; FMRG's lsd_loss recipe), on real torch
students, and on the analytic Gaussian-mixture test bed where the exact flow map is known."""
import math

import pytest
import torch
import torch.nn as nn

from fmtt_core import FMTTInputError, velocity_from_denoiser
from fmtt_core.analytic import GaussianMixture
from fmtt_core.flow_maps import (
    derivative_warmup,
    diagonal_loss,
    flow_map_from_student,
    lsd_loss,
    psd_loss,
    sample_time_pairs,
)

D = 3


class TinyStudent(nn.Module):
    """u(x, s, t) from an MLP on [x, s, t, t - s]."""

    def __init__(self, seed=0, dim=D):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 3, 32), nn.Tanh(), nn.Linear(32, dim)).double()

    def forward(self, x, s, t):
        return self.net(torch.cat([x, s[:, None], t[:, None], (t - s)[:, None]], dim=1))


class TinyTeacher(nn.Module):
    def __init__(self, seed=1, dim=D):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 1, 16), nn.Tanh(), nn.Linear(16, dim)).double()

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def _inputs(n=16, seed=0, dim=D):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.9
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9
    return x, s, t


# ------------------------------------------------------------------ references, one row at a time

def reference_lsd(student, teacher, x, s, t, h, w, p, derivative_grad=False):
    """FMRG's recipe per row: u = f(x_s; s, t), X = x_s + (t - s) u, du = (f(x_s; s, t + h) - f(x_s; s, t - h)) / 2h
    detached (kept in the graph for the paper's full gradient), v = teacher(X, t) detached, residual
    u + w (t - s) du - v; mean |r|^p."""
    terms = []
    for i in range(x.shape[0]):
        xi, si, ti = x[i:i + 1], s[i:i + 1], t[i:i + 1]
        u = student(xi, si, ti)
        du = (student(xi, si, ti + h) - student(xi, si, ti - h)) / (2 * h)
        du = du if derivative_grad else du.detach()
        big_x = xi + (ti - si) * u
        v = teacher(big_x.detach(), ti).detach()
        terms.append((u + w * (ti - si) * du - v).abs().pow(p))
    return torch.cat(terms).mean()


def reference_psd(student, x, s, t, r, p):
    """Per row: X_{s,t}(x) against the stop-gradient two-jump X_{m,t}(X_{s,m}(x)), m = s + r (t - s)."""
    def jump(y, a, b):
        return y + (b - a) * student(y, a, b)

    terms = []
    for i in range(x.shape[0]):
        xi, si, ti = x[i:i + 1], s[i:i + 1], t[i:i + 1]
        mi = si + r[i] * (ti - si)
        terms.append((jump(xi, si, ti) - jump(jump(xi, si, mi), mi, ti).detach()).abs().pow(p))
    return torch.cat(terms).mean()


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
@pytest.mark.parametrize("w", [1.0, 0.3])
def test_lsd_equals_reference_value_and_gradient(norm, p, w):
    student, teacher = TinyStudent(), TinyTeacher()
    x, s, t = _inputs()
    h = 5e-3
    loss, stats = lsd_loss(student, teacher, x, s, t, fd_step=h, derivative_weight=w, norm=norm)
    ref = reference_lsd(student, teacher, x, s, t, h, w, p)
    g = _grads(student, loss)
    g_ref = _grads(student, ref)
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g, g_ref, rtol=1e-8, atol=1e-12)
    assert stats["derivative_weight"] == w and math.isclose(stats["loss"], float(ref.detach()), rel_tol=1e-10)
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters())


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
def test_lsd_with_the_derivative_in_the_graph_equals_reference(norm, p):
    student, teacher = TinyStudent(), TinyTeacher()
    x, s, t = _inputs()
    loss, _ = lsd_loss(student, teacher, x, s, t, norm=norm, derivative_grad=True)
    ref = reference_lsd(student, teacher, x, s, t, 5e-3, 1.0, p, derivative_grad=True)
    detached = reference_lsd(student, teacher, x, s, t, 5e-3, 1.0, p)
    g, g_ref, g_detached = _grads(student, loss), _grads(student, ref), _grads(student, detached)
    assert torch.allclose(loss, ref, rtol=1e-10)
    assert torch.allclose(g, g_ref, rtol=1e-7, atol=1e-12)
    assert not torch.allclose(g, g_detached, rtol=1e-3)  # the two recipes descend differently


def test_lsd_without_derivative_is_the_average_velocity_residual():
    student, teacher = TinyStudent(), TinyTeacher()
    x, s, t = _inputs()
    loss, _ = lsd_loss(student, teacher, x, s, t, derivative_weight=0.0, norm="l2")
    u = student(x, s, t)
    expect = (u - teacher(x + (t - s)[:, None] * u, t)).pow(2).mean()
    assert torch.allclose(loss, expect, rtol=1e-12)


def test_finite_difference_is_one_sided_at_the_clock_ends():
    """At t = 1 the central difference would ask for t > 1: it uses [1 - h, 1] instead, and stays finite."""
    student, teacher = TinyStudent(), TinyTeacher()
    x, s, _ = _inputs(4)
    t = torch.ones(4, dtype=torch.float64)
    h = 1e-2
    loss, _ = lsd_loss(student, teacher, x, s, t, fd_step=h)
    with torch.no_grad():
        u = student(x, s, t)
        du = (u - student(x, s, t - h)) / h
        v = teacher(x + (t - s)[:, None] * u, t)
    assert torch.allclose(loss, (u + (t - s)[:, None] * du - v).abs().mean(), rtol=1e-12)


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
def test_psd_equals_reference(norm, p):
    student = TinyStudent()
    x, s, t = _inputs()
    loss, _ = psd_loss(student, x, s, t, generator=torch.Generator().manual_seed(5), norm=norm)
    r = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = reference_psd(student, x, s, t, r, p)
    g, g_ref = _grads(student, loss), _grads(student, ref)
    assert torch.allclose(loss, ref, rtol=1e-10)
    assert torch.allclose(g, g_ref, rtol=1e-8, atol=1e-12)

    half, _ = psd_loss(student, x, s, t, generator=torch.Generator(), norm=norm, midpoint="half")
    assert torch.allclose(half, reference_psd(student, x, s, t, torch.full_like(s, 0.5), p), rtol=1e-10)


def test_diagonal_loss_is_the_velocity_match():
    student, teacher = TinyStudent(), TinyTeacher()
    x, _, t = _inputs()
    loss, _ = diagonal_loss(student, teacher, x, t, norm="l1")
    assert torch.allclose(loss, (student(x, t, t) - teacher(x, t)).abs().mean(), rtol=1e-12)


# ------------------------------------------------------------------ the analytic test bed: an exact student

GM = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 1.0], [1.5, -0.5]]),
                     torch.tensor([[0.3, 0.5], [0.4, 0.2]]))


def exact_student(x, s, t):
    """u = (X_{s,t}(x) - x) / (t - s) with X the mixture's exact flow map (fine RK4)."""
    return (GM.flow_map(x, s, t, steps=64) - x) / (t - s)[:, None]


def gm_teacher(x, t):
    return velocity_from_denoiser(x, GM.denoiser(x, t), t)


def _gm_inputs(n=256, seed=3):
    g = torch.Generator().manual_seed(seed)
    s, t = sample_time_pairs(n, generator=g, min_gap=0.05, dtype=torch.float64)
    s, t = 0.85 * s, 0.85 * t  # away from t = 1, where b = (D - x) / (1 - t) is a 0/0 in floating point
    x1 = GM.sample(n, g)
    x_s = (1 - s)[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64) + s[:, None] * x1
    return x_s, s, t


def perturbed_student(x, s, t):
    return exact_student(x, s, t) + 0.05 * torch.sin(3 * x + s[:, None])


def test_exact_flow_map_has_zero_lsd_loss_and_a_perturbed_one_does_not():
    x_s, s, t = _gm_inputs()
    exact, _ = lsd_loss(exact_student, gm_teacher, x_s, s, t, norm="l1")
    wrong, _ = lsd_loss(perturbed_student, gm_teacher, x_s, s, t, norm="l1")
    # The exact map's residual is the finite-difference error O(h^2) plus RK4's: tiny against any real error.
    assert float(exact) < 2e-4, float(exact)
    assert float(wrong) > 1e-2, float(wrong)
    # The (t - s) d/dt u term is what makes the exact map exact: without it the residual is large.
    no_derivative, _ = lsd_loss(exact_student, gm_teacher, x_s, s, t, derivative_weight=0.0)
    assert float(no_derivative) > 0.1
    # A finite-difference step ten times smaller changes the exact map's residual little (it is already ~0).
    finer, _ = lsd_loss(exact_student, gm_teacher, x_s, s, t, fd_step=5e-4, norm="l1")
    assert float(finer) < 2e-4


def test_exact_flow_map_has_zero_psd_and_diagonal_loss_and_a_perturbed_one_does_not():
    x_s, s, t = _gm_inputs()
    g = torch.Generator().manual_seed(0)
    exact, _ = psd_loss(exact_student, x_s, s, t, generator=g, norm="l1")
    wrong, _ = psd_loss(perturbed_student, x_s, s, t, generator=torch.Generator().manual_seed(0), norm="l1")
    assert float(exact) < 1e-5 and float(wrong) > 1e-3, (float(exact), float(wrong))

    # The diagonal u(x, t, t) = b_t(x): the exact map's average velocity over a vanishing gap.
    def exact_diag(x, s, t):
        return exact_student(x, s, s + 1e-4)

    d_exact, _ = diagonal_loss(exact_diag, gm_teacher, x_s, s, norm="l1")
    d_wrong, _ = diagonal_loss(lambda x, s, t: exact_diag(x, s, t) + 0.05 * torch.sin(3 * x), gm_teacher, x_s, s)
    assert float(d_exact) < 1e-3 and float(d_wrong) > 1e-2


# ------------------------------------------------------------------ time pairs, warmup, the jump

def _ks_bound(n, alpha=1e-4):
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def test_time_pairs_are_independent_uniform():
    n = 20000
    s, t = sample_time_pairs(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    for v in (s, t):
        cdf = (v[:, None] <= grid).double().mean(0)
        assert (cdf - grid).abs().max() < _ks_bound(n)
    # Independence: the joint CDF at a few points is the product of the marginals.
    for a, b in ((0.3, 0.3), (0.5, 0.8), (0.9, 0.2)):
        joint = float(((s <= a) & (t <= b)).double().mean())
        assert abs(joint - a * b) < 4 * math.sqrt(a * b * (1 - a * b) / n)
    # Both orders appear about equally often.
    assert abs(float((s < t).double().mean()) - 0.5) < 4 * math.sqrt(0.25 / n)


def test_time_pairs_min_gap_ordering_and_law():
    n, g = 20000, 0.2
    s, t = sample_time_pairs(n, generator=torch.Generator().manual_seed(1), min_gap=g, both_directions=False,
                             dtype=torch.float64)
    d = t - s
    assert bool((d >= g).all())
    # Uniform on {|t - s| >= g}: d has density 2 (1 - d) / (1 - g)^2 on [g, 1], so E d = (1 + 2 g) / 3.
    mean = (1 + 2 * g) / 3
    var = (1 - g) ** 2 / 18
    assert abs(float(d.mean()) - mean) < 5 * math.sqrt(var / n)


def test_time_pairs_shift_follows_the_model_schedule():
    """With shift k the noise level sigma = 1 - t is k sigma_u / (1 + (k - 1) sigma_u) for a uniform sigma_u,
    so P(t <= q) = 1 - sigma_u(1 - q) with sigma_u(sigma) = sigma / (k - (k - 1) sigma)."""
    n, k = 20000, 3.0
    s, t = sample_time_pairs(n, generator=torch.Generator().manual_seed(2), shift=k, dtype=torch.float64)
    q = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    sig = 1 - q
    expect = 1 - sig / (k - (k - 1) * sig)
    for v in (s, t):
        assert ((v[:, None] <= q).double().mean(0) - expect).abs().max() < _ks_bound(n)
    assert float(t.mean()) < 0.4  # shift 3 crowds the draws towards noise


def test_time_pairs_reproducible_device_and_dtype():
    a = sample_time_pairs(8, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    b = sample_time_pairs(8, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].dtype == torch.float32 and a[0].shape == (8,)


def test_bad_settings_are_refused_with_the_fix():
    g = torch.Generator()
    with pytest.raises(FMTTInputError, match="min_gap"):
        sample_time_pairs(4, generator=g, min_gap=0.95)
    with pytest.raises(FMTTInputError, match="shift"):
        sample_time_pairs(4, generator=g, shift=0.0)
    student, teacher = TinyStudent(), TinyTeacher()
    x, s, t = _inputs(4)
    with pytest.raises(FMTTInputError, match="norm"):
        lsd_loss(student, teacher, x, s, t, norm="huber")
    with pytest.raises(FMTTInputError, match="fd_step"):
        lsd_loss(student, teacher, x, s, t, fd_step=0.0)
    with pytest.raises(FMTTInputError, match="teacher returned shape"):
        lsd_loss(student, lambda x, t: x[:, :1], x, s, t)


def test_derivative_warmup_ramps_linearly():
    assert [derivative_warmup(k, 4) for k in (0, 1, 2, 4, 10)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert derivative_warmup(0, 0) == 1.0


def test_flow_map_from_student_is_identity_at_equal_times():
    student = TinyStudent()
    x, s, t = _inputs()
    jump = flow_map_from_student(student)
    assert torch.equal(jump(x, s, s), x)
    assert torch.allclose(jump(x, s, t), x + (t - s)[:, None] * student(x, s, t), rtol=1e-12)
    assert jump(x, 0.2, 0.7).shape == x.shape  # float times broadcast over the batch


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
def test_per_row_losses_are_each_rows_own_loss(norm, p):
    """per_row: each row's loss (the reference on that row alone); their mean is the batch loss."""
    student, teacher = TinyStudent(), TinyTeacher()
    x, s, t = _inputs(n=6)
    r = torch.rand(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g = torch.Generator()
    rows = {"lsd": lsd_loss(student, teacher, x, s, t, norm=norm, per_row=True)[0].detach(),
            "psd": psd_loss(student, x, s, t, generator=g, norm=norm, midpoint=r, per_row=True)[0].detach(),
            "diagonal": diagonal_loss(student, teacher, x, t, norm=norm, per_row=True)[0].detach()}
    with torch.no_grad():
        for i in range(6):
            one = slice(i, i + 1)
            assert math.isclose(float(rows["lsd"][i]), float(reference_lsd(student, teacher, x[one], s[one], t[one],
                                                                            5e-3, 1.0, p)), rel_tol=1e-10)
            assert math.isclose(float(rows["psd"][i]), float(reference_psd(student, x[one], s[one], t[one], r[one], p)),
                                rel_tol=1e-10)
            want = (student(x[one], t[one], t[one]) - teacher(x[one], t[one])).abs().pow(p).mean()
            assert math.isclose(float(rows["diagonal"][i]), float(want), rel_tol=1e-10)
    assert torch.allclose(rows["lsd"].mean(), lsd_loss(student, teacher, x, s, t, norm=norm)[0].detach(), rtol=1e-12)


def test_time_pairs_stay_in_the_models_range_uniformly():
    """t_min (a VE model's t at sigma_max): both times uniform on [t_min, 1], never below it."""
    n, lo = 20000, 0.064
    s, t = sample_time_pairs(n, generator=torch.Generator().manual_seed(5), t_min=lo, dtype=torch.float64)
    grid = torch.linspace(lo, 1, 101, dtype=torch.float64)
    for v in (s, t):
        assert float(v.min()) >= lo
        cdf = (v[:, None] <= grid).double().mean(0)
        assert (cdf - (grid - lo) / (1 - lo)).abs().max() < _ks_bound(n)
    with pytest.raises(FMTTInputError, match="t_min"):
        sample_time_pairs(4, generator=torch.Generator(), t_min=1.0)


def test_finite_difference_is_one_sided_at_the_models_first_time():
    """At t = t_min the central difference would ask for a time the model does not have: it uses [t_min, t_min + h]."""
    student, teacher = TinyStudent(), TinyTeacher()
    x, s, _ = _inputs(4)
    lo, h = 0.064, 1e-2
    t = torch.full((4,), lo, dtype=torch.float64)
    loss, _ = lsd_loss(student, teacher, x, s, t, fd_step=h, t_min=lo)
    with torch.no_grad():
        u = student(x, s, t)
        du = (student(x, s, t + h) - u) / h
        v = teacher(x + (t - s)[:, None] * u, t)
    assert torch.allclose(loss, (u + (t - s)[:, None] * du - v).abs().mean(), rtol=1e-12)
