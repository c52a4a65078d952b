"""Analytic test bed: diagonal Gaussian mixtures with a closed-form denoiser and closed-form tilts.

Under x_t = (1 - t) x0 + t x1 with x1 ~ sum_i pi_i N(mu_i, diag v_i), component i has the marginal
N(t mu_i, t^2 v_i + (1 - t)^2), so E[x1 | x_t] is a posterior-weighted sum of Gaussian regressions.
A linear or quadratic reward tilts the mixture into another mixture, so the FMTT target is known
exactly. The flow map is the exact ODE solved finely (RK4 on a grid crowded near t = 1).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


@dataclass
class GaussianMixture:
    weights: torch.Tensor    # [K], sums to 1
    means: torch.Tensor      # [K, d]
    variances: torch.Tensor  # [K, d] diagonal covariances

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.variances = torch.as_tensor(self.variances, dtype=torch.float64).expand_as(self.means).clone()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # --- moments and sampling -------------------------------------------------------------------
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        m = self.mean()
        second = sum(w * (torch.diag(v) + torch.outer(mu, mu))
                     for w, mu, v in zip(self.weights, self.means, self.variances))
        return second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.variances[comp].sqrt() * z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._component_log_probs(x, self.means, self.variances), dim=1)

    @staticmethod
    def _gauss_log(x, mean, var):  # x [N, d], mean/var [K, d] -> [N, K]
        diff = x[:, None, :] - mean[None]
        return -0.5 * ((diff ** 2 / var[None]) + torch.log(2 * math.pi * var[None])).sum(-1)

    def _component_log_probs(self, x, mean, var):
        return torch.log(self.weights)[None] + self._gauss_log(x, mean, var)

    # --- the exact denoiser and flow map ----------------------------------------------------------
    def denoiser(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x1 | x_t = x], differentiable in x. x [N, d], t [N] (or scalar)."""
        dtype = x.dtype
        x = x.double()
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1, 1, 1).expand(x.shape[0], 1, 1)
        mean_t = t * self.means[None]                                  # [N, K, d]
        var_t = t ** 2 * self.variances[None] + (1 - t) ** 2           # [N, K, d]
        diff = x[:, None, :] - mean_t
        log_p = torch.log(self.weights)[None] - 0.5 * (diff ** 2 / var_t + torch.log(2 * math.pi * var_t)).sum(-1)
        post = torch.softmax(log_p, dim=1)                             # [N, K]
        cond = self.means[None] + t * self.variances[None] / var_t * diff
        return (post[..., None] * cond).sum(1).to(dtype)

    def flow_map(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, steps: int = 48) -> torch.Tensor:
        """X_{s,t}(x) by RK4 on the probability-flow ODE, on a grid crowded towards t (where the
        velocity varies fastest near the data end). Reaching t = 1 ends with the exact jump onto D."""
        s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        to_one = bool((t == 1).all())
        end = 1 - (1 - s) * 1e-4 if to_one else t

        def vel(y, tau):
            return (self.denoiser(y, tau.squeeze(1)) - y) / (1 - tau)

        u = [1 - (1 - j / steps) ** 2 for j in range(steps + 1)]
        for a, b in itertools.pairwise(u):
            ta, tb = s + (end - s) * a, s + (end - s) * b
            h, tm = tb - ta, (ta + tb) / 2
            k1 = vel(x, ta)
            k2 = vel(x + h / 2 * k1, tm)
            k3 = vel(x + h / 2 * k2, tm)
            k4 = vel(x + h * k3, tb)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if to_one:
            x = self.denoiser(x, end.squeeze(1))
        return x

    # --- closed-form tilts ------------------------------------------------------------------------
    def tilt_linear(self, a: torch.Tensor) -> GaussianMixture:
        """Law of p(x) exp(a . x): component i moves to mu_i + v_i a, weight * exp(a.mu_i + a.v_i a / 2)."""
        a = torch.as_tensor(a, dtype=torch.float64)
        log_w = torch.log(self.weights) + self.means @ a + 0.5 * (self.variances * a ** 2).sum(1)
        return GaussianMixture(torch.softmax(log_w, 0), self.means + self.variances * a, self.variances)

    def tilt_quadratic(self, center: torch.Tensor, precision: float | torch.Tensor) -> GaussianMixture:
        """Law of p(x) exp(-precision |x - center|^2 / 2) (precision per dimension allowed)."""
        c = torch.as_tensor(center, dtype=torch.float64).expand(self.dim)
        p = torch.as_tensor(precision, dtype=torch.float64).expand(self.dim)
        var = 1 / (1 / self.variances + p)
        mean = var * (self.means / self.variances + p * c)
        # Weight: pi_i * N(c; mu_i, v_i + 1/p), up to a constant common to all components.
        log_w = torch.log(self.weights) + self._gauss_log(c[None], self.means, self.variances + 1 / p)[0]
        return GaussianMixture(torch.softmax(log_w, 0), mean, var)


def linear_reward(a: torch.Tensor):
    a = torch.as_tensor(a)
    return lambda x: x @ a.to(x.dtype)


def quadratic_reward(center: torch.Tensor, precision: float):
    center = torch.as_tensor(center)
    return lambda x: -0.5 * precision * ((x - center.to(x.dtype)) ** 2).sum(-1)


def ring_mixture(modes: int = 8, radius: float = 4.0, std: float = 0.5, dim: int = 2) -> GaussianMixture:
    """`modes` equal Gaussians on a circle in the first two coordinates (others centred at 0)."""
    ang = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
    means = torch.zeros(modes, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = radius * torch.cos(ang), radius * torch.sin(ang)
    return GaussianMixture(torch.ones(modes), means, torch.full((modes, dim), std ** 2))


def gated_reward(centres: torch.Tensor, width: float, floor: float):
    """r(x) = log(floor + sum_j exp(-|x - c_j|^2 / (2 width^2))): flat (log floor) everywhere but in thin
    cells around the centres c_j [J, d]. A look-ahead that lands between the cells sees no signal at all."""
    centres = torch.as_tensor(centres)

    def reward(x):
        sq = ((x[:, None, :] - centres.to(x.dtype)[None]) ** 2).sum(-1)      # [N, J]
        return torch.logsumexp(torch.cat([torch.full_like(sq[:, :1], math.log(floor)), -sq / (2 * width ** 2)], 1), 1)
    return reward


def tilt_gated(mixture: GaussianMixture, centres: torch.Tensor, width: float, floor: float) -> GaussianMixture:
    """Law of p(x) exp(gated_reward(x)) = p(x) (floor + sum_j bump_j(x)): again a mixture. `floor * p` keeps
    p's components; each p_i * bump_j is a Gaussian (tilt_quadratic's) of mass
    pi_i prod_d sqrt(w^2 / (v_i + w^2)) exp(-(c_j - mu_i)^2 / (2 (v_i + w^2)))."""
    c = torch.as_tensor(centres, dtype=torch.float64)                          # [J, d]
    w2 = width ** 2
    mu, v, log_pi = mixture.means[None], mixture.variances[None], torch.log(mixture.weights)[None]  # [1, K, d]
    var = (1 / (1 / v + 1 / w2)).expand(c.shape[0], -1, -1)
    mean = var * (mu / v + c[:, None, :] / w2)                                 # [J, K, d]
    log_mass = log_pi + (0.5 * torch.log(w2 / (v + w2)) - (c[:, None, :] - mu) ** 2 / (2 * (v + w2))).sum(-1)
    means = torch.cat([mixture.means, mean.reshape(-1, mixture.dim)])
    variances = torch.cat([mixture.variances, var.reshape(-1, mixture.dim)])
    log_w = torch.cat([math.log(floor) + torch.log(mixture.weights), log_mass.reshape(-1)])
    return GaussianMixture(torch.softmax(log_w, 0), means, variances)
