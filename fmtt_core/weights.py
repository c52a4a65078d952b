"""Weight rules: how a sampler turns each step into log-weight increments and when it resamples.

Every rule has the same small interface, called by the particle chain (`chain.run_chain`) once per
step k at t_k -> t_{k+1}:

    increment(k, r, x, d) -> [N]   log-weight increment after evaluating the look-ahead reward r_k
    select(k, log_w, r, ess, t_next) -> ancestors or None    resampling / search selection
    reindex(ancestors)             move the rule's per-particle state with the particles
    tilted(k, g)                   the step's tilt force, before increment(k) (for rules that adapt to it)
    moved(move)                    the SDE move just made (sde.Move: its kernel ratios)
    final(r1) -> [N]               the increment that closes the path at t = 1 with r(x1)

and two flags: `claims_weights` (its log-weights are importance weights of the tilted law) and
`prices_push` (it accounts exactly for any tilt push, so taming is exact and big pushes are no
discretisation error). With lambda_k = tilt_values, beta = reward_scale, r_k = r(X_{t_k,1}(x_k)):

Exact for the step count used (the weighted population targets (discretised base chain's law) *
exp(beta r) at every grid as N grows; tests/test_core_weights_power.py. As N grows, not at every N: on a
strong, narrow tilt the weights are heavy-tailed and the bias fades slowly, about N^-0.2, not 1/N:
docs/weights.md):
  TwistedWeights    beta (lambda_k r_k - lambda_{k-1} r_{k-1}) + log [base / proposal kernel]: the
                    discrete-time Feynman-Kac weights of twisted SMC. They telescope to beta r(x1)
                    times the likelihood ratio of the base chain, for ANY look-ahead and any push
                    (so also for weights="doob", the same rule with the push doubled). Free. Zero-order
                    mode and FK steering's diff potential are this rule without a push.
Consistent only (Jarzynski weights: exact in continuous time, an O(h) bias at a finite grid; measured
in bench/results/weights.md):
  AdvectiveWeights  dA = (d_t + b.grad) r_t dt along the ODE step: for any look-ahead; one more
                    look-ahead forward per step.
  EulerianWeights   dA = lambda'_t beta r_t dt: for a perfect flow map only (a denoiser look-ahead
                    leaves a bias that does not vanish with h).
  AutoWeights       per step, twisted where the step is quiet, advective where it is not: a mix
                    telescopes only through the Jarzynski identity on the marginals, so it is
                    consistent as h -> 0, not exact, as soon as one step is advective.
Exact in expectation, degenerate in practice (search heuristics):
  FKWeights         FK steering's max / add potentials with the final correction of the reference
                    code (exp(beta r(x1)) / product of the potentials applied). The intermediate
                    targets are over-tilted about K-fold, so the correction leaves a tiny ESS
                    (baselines.fk_steering warns below FK_DEGENERATE_ESS).
  SearchSelection   no weights; top-k selection on the look-ahead reward at scheduled steps.
  NoWeights         base sampling and guidance: no weights, no resampling.
"""
from __future__ import annotations

import math

import torch

from .population import Population
from .sde import base_kernel, step_noise

# The step rules whose increment is a Jarzynski (continuous-time) one: exact only as h -> 0.
APPROXIMATE_RULES = ("advective", "eulerian")


class WeightRule:
    claims_weights = True
    prices_push = False
    step_rule = ""        # the increment used at the current step, for the trace
    last_defect = None    # the Eulerian defect per particle, where the current step measured it

    def __init__(self, pop: Population, ess_threshold: float = 0.5, scheme: str = "systematic"):
        self.pop, self.ess_threshold, self.scheme = pop, ess_threshold, scheme

    def increment(self, k: int, r, x, d) -> torch.Tensor:
        raise NotImplementedError

    def select(self, k: int, log_w, r, step_ess: float, t_next: float):
        """ESS-triggered resampling (not on the last step: its weights are the final ones)."""
        if t_next < 1 and step_ess < self.ess_threshold * self.pop.size:
            return self.pop.ancestors(log_w, self.scheme, k)
        return None

    def reindex(self, ancestors) -> None:
        pass

    def moved(self, move) -> None:
        pass

    def tilted(self, k: int, g) -> None:
        """The tilt force g = grad of lambda_k beta r_k at x_k (None: untilted step), before increment(k)."""

    def final(self, r1) -> torch.Tensor:
        return torch.zeros_like(r1)


class JarzynskiRule(WeightRule):
    """Continuous-time (Jarzynski) weights, exact as h -> 0 for the SDE with the full push eps grad r_t.
    A tamed move (max_push) is turned into a move of that SDE by the kernel ratio untamed / tamed
    (Move.taming_ratio), added to the next increment: the tamed drift with its matching correction."""

    def __init__(self, pop, **kw):
        super().__init__(pop, **kw)
        self.pending = torch.zeros(pop.count, dtype=torch.float64)

    def moved(self, move):
        self.pending = move.taming_ratio if move.taming_ratio is not None else torch.zeros_like(self.pending)

    def increment(self, k, r, x, d):
        inc, self.pending = self.jarzynski(k, r, x, d) + self.pending, torch.zeros_like(self.pending)
        return inc

    def final(self, r1):
        return self.jarzynski_final(r1) + self.pending

    def jarzynski(self, k, r, x, d):
        raise NotImplementedError

    def jarzynski_final(self, r1):
        return torch.zeros_like(r1)


def _finite_or_neginf(value, r):
    """value where r is finite, -inf (weight zero) where it is not (0 * -inf would be NaN)."""
    return torch.where(torch.isfinite(r), value, -math.inf)


class TwistedWeights(WeightRule):
    prices_push = True
    step_rule = "twisted"

    def __init__(self, pop, lam, beta, **kw):
        super().__init__(pop, **kw)
        self.lam, self.beta = lam, beta
        self.potential = torch.zeros(pop.count, dtype=torch.float64)  # beta lambda_k r_k of each path
        self.pending = torch.zeros(pop.count, dtype=torch.float64)    # kernel ratio of the last move

    def twist(self, k, r, x):
        """The log-potential of step k per particle, beta lambda_k r_k. Any function of x_k keeps the weights exact
        (they telescope); how close it is to log E[exp(beta lambda_k r(x1)) | x_k] decides their variance."""
        return self.beta * float(self.lam[k]) * torch.nan_to_num(r, neginf=0.0)

    def increment(self, k, r, x, d):
        new = self.twist(k, r, x)
        inc = _finite_or_neginf(new - self.potential + self.pending, r)
        self.potential, self.pending = new, torch.zeros_like(self.pending)
        return inc

    def reindex(self, ancestors):
        self.potential = self.pop.take(self.potential, ancestors)

    def moved(self, move):
        self.pending = move.log_ratio

    def final(self, r1):
        return self.beta * r1 - self.potential + self.pending


class EulerianWeights(JarzynskiRule):
    step_rule = "eulerian"
    """Trapezoid rule in time: r at t_k closes the previous interval and opens this one; r(x1) closes
    the last (the look-ahead at t = 1 is the identity)."""

    def __init__(self, pop, lam, beta, **kw):
        super().__init__(pop, **kw)
        self.lam, self.beta, self.dlam_prev = lam, beta, 0.0

    def jarzynski(self, k, r, x, d):
        dlam = float(self.lam[k + 1] - self.lam[k])
        inc = 0.5 * (self.dlam_prev + dlam) * self.beta * r
        self.dlam_prev = dlam
        return inc

    def jarzynski_final(self, r1):
        return 0.5 * self.dlam_prev * self.beta * r1


def eulerian_defect(loop, x, d, r, t: float, t_next: float) -> torch.Tensor:
    """r(X_{t',1}(x + h b)) - r(X_{t,1}(x)) per particle: zero for a perfect flow map (the Eulerian
    identity), the error of Eulerian weights over the step otherwise. One look-ahead forward."""
    x_ode, _ = base_kernel(x, d, t, t_next, 0.0, "euler")
    return loop.lookahead_reward(x_ode, t_next) - r


def advective_increment(loop, lam, beta, times, k, r, x, d):
    """(beta (lambda_{k+1} r_{t'}(x + h b) - lambda_k r_t(x)), the defect r_{t'}(x + h b) - r_t(x)): the
    advective derivative of beta lambda_t r_t along the ODE step."""
    defect = eulerian_defect(loop, x, d, r, float(times[k]), float(times[k + 1]))
    return beta * (float(lam[k + 1]) * (r + defect) - float(lam[k]) * r), defect


class AdvectiveWeights(JarzynskiRule):
    """advective_increment at every step: exact as h -> 0 for any look-ahead."""

    step_rule = "advective"

    def __init__(self, pop, lam, beta, times, loop, **kw):
        super().__init__(pop, **kw)
        self.lam, self.beta, self.times, self.loop = lam, beta, times, loop

    def jarzynski(self, k, r, x, d):
        inc, self.last_defect = advective_increment(self.loop, self.lam, self.beta, self.times, k, r, x, d)
        return inc


class FKWeights(WeightRule):
    """FK steering potentials G_k = exp(beta max_{j<=k} r_j) ("max") or exp(beta sum_{j<=k} r_j) ("add"),
    applied every step; the last step applies exp(beta r(x1)) / prod_k G_k along each ancestry, as the
    authors' fkd_class.py does at the terminal sample, so the product over a path is exp(beta r(x1))."""

    step_rule = "fk"

    def __init__(self, pop, potential, beta, **kw):
        super().__init__(pop, **kw)
        self.potential, self.beta = potential, beta
        self.history = None                                          # running max / sum of r
        self.applied = torch.zeros(pop.count, dtype=torch.float64)   # sum_k log G_k along each ancestry

    def increment(self, k, r, x, d):
        r0 = torch.nan_to_num(r, neginf=0.0)
        if self.history is None:
            self.history = r0
        elif self.potential == "max":
            self.history = torch.maximum(self.history, r0)
        else:
            self.history = self.history + r0
        log_g = self.beta * self.history
        self.applied = self.applied + log_g
        return _finite_or_neginf(log_g, r)

    def reindex(self, ancestors):
        self.history = self.pop.take(self.history, ancestors)
        self.applied = self.pop.take(self.applied, ancestors)

    def final(self, r1):
        return self.beta * r1 - self.applied


class SearchSelection(WeightRule):
    """Top-k selection at `schedule` steps; claims no weights. Its increments (beta dlambda r) only
    feed the thermodynamic-length estimate."""

    claims_weights = False

    def __init__(self, pop, lam, beta, schedule: set[int], keep: int):
        super().__init__(pop)
        self.lam, self.beta, self.schedule, self.keep = lam, beta, schedule, keep

    def increment(self, k, r, x, d):
        return self.beta * float(self.lam[k + 1] - self.lam[k]) * r

    def select(self, k, log_w, r, step_ess, t_next):
        if k not in self.schedule:
            return None
        return self.pop.select_top(r, min(self.keep, int(self.pop.sum(torch.isfinite(r).double()))))


class NoWeights(WeightRule):
    claims_weights = False

    def increment(self, k, r, x, d):
        return torch.zeros(self.pop.count, dtype=torch.float64)

    def select(self, k, log_w, r, step_ess, t_next):
        return None


def search_schedule(steps: int, selections: int) -> set[int]:
    """Selection steps spread over the first three quarters of the trajectory, never on the last step
    (its selection would have no step left to act on); tiny grids get fewer selections."""
    if steps < 2:
        return set()
    return {min(steps - 2, round(0.75 * steps * (j + 1) / (selections + 1))) for j in range(selections)}


# A step is quiet when the twisted increment's noise variance, divided by the step length, is at most this
# (nats^2 per unit time) for every particle. A rate, not a per-step variance: the per-step variance shrinks
# with h but its sum over the run does not (rate = eps |g|^2 / 2), while the advective increment's error
# vanishes as h -> 0. Measured (README "Hard cases"): a per-step threshold (0.1 nats^2) turned the calmer
# steps of the authors' toy twisted at 500 steps and degraded it (33 resamplings, SW2 0.69 against 0.05
# for advective); a population-mean rate let single particles with large twisted noise through and spoilt
# 2 of 6 seeds on the ring in the toy setting (error 1.47 and 0.71; 0.09 at worst with the largest).
QUIET_NOISE_RATE = 3.0


class AutoWeights(WeightRule):
    """Per step, the rule that suits it: twisted where the step is quiet, advective where it is not.

    Consistent, not exact. Twisted steps carry the tilted marginal rho_k e^{r_k} of the discretised chain
    exactly (they price the move by its kernel ratio); advective steps only to O(h^2) per step (the
    Jarzynski increment along the ODE step), so a run with advective steps has an O(h) bias against the
    chain it samples: measured 11 standard errors at 20 steps on the ring at beta 2 (bench/results/weights.md).
    The rule may change from step to step, chosen before the move from what is known at x_k. Twisted
    weights add log-weight noise: their increment carries (sigma / 2) grad r_t . z, of variance
    push^2 = (sigma |g| / 2)^2 per particle (g the tilt force, sigma the step's noise). A step is *quiet*
    when every particle's push^2 per unit time is at most `quiet` (nats^2 per unit time). Where the tilt
    pushes harder (steep rewards, little noise, the authors' toy), twisted weights degenerate (measured:
    bench/bench_toy.py) and the advective increment, deterministic given x_k, takes over for that step (one
    look-ahead forward). The largest particle decides: one particle near a basin boundary, where
    |grad r_t| through a flow map is huge, makes the whole step advective. Other per-step criteria
    (twisted_step) and Jarzynski increments (jarzynski) are subclasses: bench/bench_weights.py measures some."""

    prices_push = False   # on twisted steps only; advective steps correct a tamed push to O(h)
    jarzynski_name = "advective"  # the trace's name for the steps that are not twisted

    def __init__(self, pop, lam, beta, times, loop, eta, sde_step, quiet=QUIET_NOISE_RATE, **kw):
        super().__init__(pop, **kw)
        self.lam, self.beta, self.times, self.loop = lam, beta, times, loop
        self.eta, self.sde_step, self.quiet = eta, sde_step, quiet
        self.force = None
        self.twisted_open = False                                       # is the current step twisted?
        self.potential = torch.zeros(pop.count, dtype=torch.float64)    # beta lambda_k r_k, twisted steps
        self.pending = torch.zeros(pop.count, dtype=torch.float64)      # the last move's kernel / taming ratio
        self.step_rule, self.last_defect = "", None

    def tilted(self, k, g):
        self.force = g

    def noise_variance(self, k) -> torch.Tensor:
        """(sigma |g| / 2)^2 per particle: the variance of the log-weight noise a twisted step k would add."""
        if self.force is None:
            return torch.zeros(self.pop.count, dtype=torch.float64)
        sigma = step_noise(float(self.times[k]), float(self.times[k + 1]), self.eta, self.sde_step)
        push2 = (0.5 * sigma * self.force.flatten(1).double().norm(dim=1).cpu()) ** 2
        return torch.nan_to_num(push2, nan=0.0, posinf=math.inf)

    def twisted_step(self, k, r, x, d) -> bool:
        """Is step k twisted? When the largest noise_variance per unit time is at most `quiet`. The largest,
        not the mean: one particle with a large twisted increment is enough to take over the weights."""
        h = float(self.times[k + 1] - self.times[k])
        return float(self.pop.max(self.noise_variance(k))) / h <= self.quiet

    def jarzynski(self, k, r, x, d):
        """(increment, Eulerian defect or None) of a step that is not twisted: the advective increment."""
        return advective_increment(self.loop, self.lam, self.beta, self.times, k, r, x, d)

    def increment(self, k, r, x, d):
        lam_r = self.beta * float(self.lam[k]) * torch.nan_to_num(r, neginf=0.0)
        inc = (lam_r - self.potential if self.twisted_open else 0.0) + self.pending
        self.twisted_open = self.twisted_step(k, r, x, d)
        self.step_rule, self.last_defect = ("twisted" if self.twisted_open else self.jarzynski_name), None
        if self.twisted_open:
            self.potential = lam_r
        else:
            jarzynski, self.last_defect = self.jarzynski(k, r, x, d)
            inc = inc + jarzynski
        self.pending = torch.zeros_like(self.pending)
        return _finite_or_neginf(inc, r)

    def reindex(self, ancestors):
        self.potential = self.pop.take(self.potential, ancestors)

    def moved(self, move):
        ratio = move.log_ratio if self.twisted_open else move.taming_ratio
        self.pending = ratio if ratio is not None else torch.zeros_like(self.pending)

    def final(self, r1):
        return (self.beta * r1 - self.potential if self.twisted_open else 0.0) + self.pending
