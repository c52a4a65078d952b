"""FMTTConfig: the one settings object every sampler in the core reads (FMTT and the baselines)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import FMTTInputError
from .schedules import LinearTilt
from .smc import SCHEMES

MODES = ("exact", "search", "zero_order")
WEIGHTS = ("auto", "twisted", "doob", "advective", "eulerian")
SDE_STEPS = ("exponential", "euler", "2m")


@dataclass
class FMTTConfig:
    """User parameters of the samplers (FMTT and the baselines read the fields they use).

    mode: "exact" (gradient tilt + importance weights + adaptive resampling; samples the discretised base chain's
          law * exp(beta r): exactly, for the step count used, with weights "twisted" / "doob"; up to an O(h)
          bias with the Jarzynski weights "advective" / "eulerian" / "auto", see `weights`),
          "zero_order" (no gradient, telescoping look-ahead potentials: exact for the step count used),
          "search" (gradient tilt + top-k selection on look-ahead reward: finds high-reward samples, no weights).
    reward_scale: beta, the tilt's inverse temperature (the guidance scale for guidance_sample).
    tilt: lambda schedule (LinearTilt, RampTilt(t_ramp)).
    eta: stochasticity, eps_t = eta * (1 - t); 0 is the ODE (no gradient drift then).
    sde_step: "euler" (Euler-Maruyama), "exponential" (integrates the SDE's linear part exactly with
          D frozen over the step: exact for a point-mass data law, the DDIM / ancestral family) or
          "2m" (the exponential step with D linear in t through the last two model calls: second-order
          multistep, DPM-Solver++(2M)-like, no extra model call; weights stay exact). See sde.py and
          bench/bench_steps.py for when each helps.
    ess_threshold: resample when ESS < ess_threshold * N (0: never, 1: every step).
    resampling: systematic (default, lowest variance), stratified, multinomial, residual.
    chunk_size: particles per forward/backward pass (None: all at once); bounds memory.
    grad_clip: max per-particle norm of grad r_t (None: off). Exact under twisted weights (they
          price whatever push was made); approximate under eulerian / advective weights.
    max_push: tames the tilt's push to at most max_push x the step's noise norm, per particle, with the
          matching weight correction (the kernel ratio untamed / tamed push), so that a steep reward
          gradient cannot throw a particle across the space in one step. None: off. Under twisted weights the
          correction for a push several times the noise makes the weights heavy-tailed: on the bench's ring at
          beta 2 the default 4 leaves a finite-N bias of 3.7-6.3 standard errors at N 1000 that 1 removes
          (docs/weights.md, bench/results/weights_ring_twisted.md).
    search_steps: number of top-k selections in search mode, spread over the first 3/4 of the grid.
    search_keep: particles kept at each search selection (default N // 4, at least 1).
    weights: how exact mode weighs each step (docs/weights.md; measured in bench/results/weights.md).
          Exact for the step count used (the weighted population targets the discretised base chain's law
          * exp(beta r) at any grid, for any look-ahead, any push, taming and clipping included):
          "twisted" (default): beta (lambda_k r_k - lambda_{k-1} r_{k-1}) + log base / proposal kernel, the
          discrete-time weights of twisted SMC; free. Their log-weights carry noise of variance
          (sigma |grad r_t| / 2)^2 per step, so they resample often where the tilt is steep against the noise
          (the authors' toy: 18 of 20 steps) while still reaching the tilted reward.
          "doob": the same weights with the push doubled (2 eps grad r_t, the Doob-type proposal), which
          cancels that noise to first order: fewer resamplings on smooth rewards, worse than twisted on steep
          ones (the linearisation fails there).
          Consistent only (Jarzynski weights: exact as the steps shrink, an O(h) bias at a finite grid,
          measured 4-12 standard errors at 20 steps and still several at 50-100 on the bench's targets):
          "advective": dA = (d_t + b.grad) r_t dt for any look-ahead, one more look-ahead forward per step.
          "eulerian": dA = lambda' r dt, free, for a perfect flow map only (check the trace's Eulerian defect).
          "auto": per step twisted where the tilt's push is small against the step's noise, advective where it
          is not (weights.AutoWeights); any mix with advective steps is consistent, not exact.
          FMTTResult.rule_counts and approximate_share say how a run was split; the chain warns when
          Jarzynski steps dominate.
    defect_probe: particles on which the Eulerian defect r_{t+h}(x + h b) - r_t(x) is measured each
          step for the trace (one look-ahead forward each; 0: off; free under advective weights).
    seed: seeds the sampler's own random streams (SDE noise, resampling); no global RNG is touched.
    """

    mode: str = "exact"
    reward_scale: float = 1.0
    tilt: Callable = field(default_factory=LinearTilt)
    eta: float = 1.0
    sde_step: str = "euler"
    ess_threshold: float = 0.5
    resampling: str = "systematic"
    chunk_size: int | None = None
    grad_clip: float | None = None
    max_push: float | None = 4.0
    search_steps: int = 3
    search_keep: int | None = None
    weights: str = "twisted"
    defect_probe: int = 0
    seed: int = 0

    def validate(self, particles: int) -> None:
        if self.mode not in MODES:
            raise FMTTInputError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.resampling not in SCHEMES:
            raise FMTTInputError(f"resampling must be one of {SCHEMES}, got {self.resampling!r}.")
        if self.sde_step not in SDE_STEPS:
            raise FMTTInputError(f"sde_step must be one of {SDE_STEPS}, got {self.sde_step!r}.")
        if not math.isfinite(self.reward_scale) or self.reward_scale < 0:
            raise FMTTInputError(f"reward_scale must be a finite number >= 0, got {self.reward_scale}.")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise FMTTInputError(f"eta (stochasticity) must be >= 0, got {self.eta}.")
        if not 0 <= self.ess_threshold <= 1:
            raise FMTTInputError(f"ess_threshold is a fraction of the particles in [0, 1], got {self.ess_threshold}.")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise FMTTInputError(f"chunk_size must be >= 1 (or None for all particles), got {self.chunk_size}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise FMTTInputError(f"grad_clip must be > 0 or None, got {self.grad_clip}.")
        if self.max_push is not None and not self.max_push > 0:
            raise FMTTInputError(f"max_push must be > 0 or None, got {self.max_push}.")
        if self.weights not in WEIGHTS:
            raise FMTTInputError(f"weights must be one of {WEIGHTS}, got {self.weights!r}.")
        if self.mode != "exact" and self.weights not in ("auto", "twisted"):
            raise FMTTInputError(f"weights={self.weights!r} applies to mode 'exact' only: {self.mode} mode uses "
                                 "its own rule (zero_order: look-ahead potentials; search: selection). Leave "
                                 "weights at 'twisted'.")
        if self.defect_probe < 0:
            raise FMTTInputError(f"defect_probe must be >= 0, got {self.defect_probe}.")
        if self.mode == "search":
            if self.search_steps < 1:
                raise FMTTInputError(f"search mode needs search_steps >= 1, got {self.search_steps}.")
            if self.search_keep is not None and not 1 <= self.search_keep <= particles:
                raise FMTTInputError(f"search_keep must be in [1, particles={particles}], got {self.search_keep}.")
