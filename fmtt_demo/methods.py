"""The samplers the demo compares, run through fmtt_core at a matched network-pass budget.

Budget unit, a "network pass": one forward of the denoiser or of the flow map for one particle counts 1,
one backward through one of them counts 2 (the usual cost of a backward pass). Reward-model passes are
counted separately and not charged: the reward here is an MLP 30x smaller than the denoiser. Per particle
and step that makes

    base, best-of-N, FK steering            1      (one denoiser call; FK's potential reuses it)
    denoiser guidance                       3      (denoiser + backward through it)
    FMTT exact, flow-map look-ahead (J)     1 + 4J (denoiser + J flow-map jumps + backward through them,
                                                    + J jumps on steps the weights make advective (none under
                                                    the default twisted weights; auto / advective add them):
                                                    an upper bound, charged whether or not they are made)
    FMTT search / zero-order, flow map      1 + 3J / 1 + J
    FMTT exact, denoiser look-ahead         4      (denoiser + backward + the advective steps' look-ahead)
    FMTT search, denoiser look-ahead        3
    FMTT exact, ODE(k) look-ahead           4k     (reuses the denoiser call: k - 1 forwards, backward
                                                    through k, k advective forwards; k = Setup.ode_steps)

and each method gets the particle count that spends what FMTT-exact with the flow map spends
(`matched_particles`). The table reports the passes each method actually made, from fmtt_core's counter.

Every run hands on `n_out` samples, and its metrics are expectations over them: samplers that carry
weights (FMTT exact and zero-order, FK steering) hand on draws from their final weights; selection
methods (best-of-N, FMTT search) hand on their top n_out by final reward; base sampling and guidance
hand on i.i.d. particles.

FK steering runs with "diff" potentials (the variant whose weights target exp(beta r(x1)), like FMTT
exact); "fk_max", the running-max potential (one of the FK paper's choices), is there for the bench.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fmtt_core import (
    DenoiserLookahead,
    FlowMapLookahead,
    FMTTConfig,
    FMTTResult,
    ODELookahead,
    base_sample,
    best_of_n,
    fk_steering,
    fmtt_sample,
    guidance_sample,
)


@dataclass
class Setup:
    """What every method shares: models, reward, tilt strength and sampler settings."""

    models: object                  # fmtt_demo.models.DigitModels
    reward: Callable
    reward_scale: float = 1.0
    eta: float = 1.0
    jumps: int = 1                  # flow-map jumps per look-ahead
    ode_steps: int = 2              # Euler steps of the base ODE per look-ahead ("fmtt_ode")
    ess_threshold: float = 0.5
    chunk_size: int | None = None
    sharded: bool = False           # spread each population over the ranks of the default process group

    @property
    def denoiser(self):
        return self.models.denoiser

    def config(self, seed: int, mode: str = "exact") -> FMTTConfig:
        return FMTTConfig(mode=mode, reward_scale=self.reward_scale, eta=self.eta, ess_threshold=self.ess_threshold,
                          chunk_size=self.chunk_size, seed=seed)


def _flow_map(setup: Setup) -> dict:
    return {"lookahead": FlowMapLookahead(setup.models.flow_map, jumps=setup.jumps)}


def _denoiser(setup: Setup) -> dict:
    return {"lookahead": DenoiserLookahead(setup.denoiser)}


def _ode(setup: Setup) -> dict:
    return {"lookahead": ODELookahead(setup.denoiser, steps=setup.ode_steps)}


@dataclass(frozen=True)
class Method:
    """One sampler of fmtt_core with its method-specific options; every sampler has the core's one
    signature sampler(denoiser, x_init, times, *, reward, config, callback, **options)."""

    key: str
    label: str
    hands_on: str                               # "weights" | "top" | "iid"
    passes_per_step: Callable[[Setup], int]     # network passes per particle-step (see the module doc)
    sampler: Callable[..., FMTTResult] = field(repr=False)
    mode: str = "exact"                         # FMTTConfig.mode (FMTT only)
    options: Callable[[Setup], dict] = field(default=lambda setup: {}, repr=False)

    def run(self, setup: Setup, x_init, times, seed, callback=None) -> FMTTResult:
        sampler = self.sampler
        if setup.sharded:  # same call, same result; each rank evaluates its shard (fmtt_core.distributed)
            from fmtt_core.distributed import sharded
            sampler = sharded(sampler)
        return sampler(setup.denoiser, x_init, times, reward=setup.reward, config=setup.config(seed, self.mode),
                       callback=callback, **self.options(setup))


METHODS = {m.key: m for m in [
    Method("base", "base sampling", "iid", lambda s: 1, base_sample),
    Method("best_of_n", "best-of-N", "top", lambda s: 1, best_of_n),
    Method("guidance", "denoiser guidance", "iid", lambda s: 3, guidance_sample),
    # "diff" potentials telescope to exp(beta r(x1)): FK then targets the same tilted law as FMTT exact.
    Method("fk", "FK steering, diff", "weights", lambda s: 1, fk_steering, options=lambda s: {"potential": "diff"}),
    Method("fk_max", "FK steering, max", "weights", lambda s: 1, fk_steering, options=lambda s: {"potential": "max"}),
    Method("fmtt_exact", "FMTT exact, flow map", "weights", lambda s: 1 + 4 * s.jumps, fmtt_sample, "exact", _flow_map),
    Method("fmtt_search", "FMTT search, flow map", "top", lambda s: 1 + 3 * s.jumps, fmtt_sample, "search", _flow_map),
    Method("fmtt_denoiser", "FMTT exact, denoiser", "weights", lambda s: 4, fmtt_sample, "exact", _denoiser),
    Method("fmtt_search_denoiser", "FMTT search, denoiser", "top", lambda s: 3, fmtt_sample, "search", _denoiser),
    # ODE(k) reuses the step's denoiser call: k - 1 more forwards, a backward through all k, k advective forwards.
    Method("fmtt_ode", "FMTT exact, ODE(k)", "weights", lambda s: 4 * s.ode_steps, fmtt_sample, "exact", _ode),
    Method("fmtt_zero_order", "FMTT zero-order, flow map", "weights", lambda s: 1 + s.jumps, fmtt_sample, "zero_order",
           _flow_map),
]}
DEFAULT_METHODS = ("base", "best_of_n", "guidance", "fk", "fmtt_exact", "fmtt_search", "fmtt_denoiser")
REFERENCE = "fmtt_exact"


def matched_particles(method: Method, setup: Setup, particles: int, reference: str = REFERENCE) -> int:
    """Particles for `method` that spend what `reference` spends with `particles` particles."""
    budget = METHODS[reference].passes_per_step(setup) * particles
    return max(1, round(budget / method.passes_per_step(setup)))


def network_passes(result: FMTTResult) -> int:
    """Passes actually made, from fmtt_core's counter: forwards + 2 x model evaluations back-propagated."""
    nfe = result.nfe
    return nfe.denoiser + nfe.lookahead + 2 * nfe.backward_model


def handed_on(method: Method, result: FMTTResult, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(particle indices, their probabilities) of the samples the method hands on (see the module doc)."""
    n = result.samples.shape[0]
    if method.hands_on == "top":
        idx = result.order[: min(n_out, n)]
        return idx, torch.full((idx.numel(),), 1.0 / idx.numel(), dtype=torch.float64)
    if method.hands_on == "weights":
        return torch.arange(n), result.weights.double()
    return torch.arange(n), torch.full((n,), 1.0 / n, dtype=torch.float64)


def draw_handed_on(method: Method, result: FMTTResult, k: int, seed: int = 0) -> torch.Tensor:
    """k samples to show, drawn by the hand-on rule (resampled by weight for weighted samplers)."""
    if method.hands_on == "weights":
        return result.pick("resample", k=k, seed=seed)
    if method.hands_on == "top":
        return result.samples[result.order[:k]]
    return result.samples[:k]


def make_x_init(particles: int, seed: int, shape: tuple[int, ...] = (1, 8, 8)) -> torch.Tensor:
    """Noise at t = 0 for `particles` particles of `shape`, from the seed alone."""
    return torch.randn((particles, *shape), generator=torch.Generator().manual_seed(seed))


@dataclass
class MethodRun:
    method: Method
    particles: int
    result: FMTTResult
    seconds: float
    passes: int
    metrics: dict


def expectation(prob: torch.Tensor, values: torch.Tensor) -> float:
    """Σ prob·values / Σ prob. Both sums run the same reduction and rounding is monotone, so the share of 0 / 1
    values stays within [0, 1]; normalising the weights first gave an accuracy of 1 + 2e-16 on some CPUs."""
    return float((prob * values).sum() / prob.sum())


@torch.no_grad()
def evaluate(method: Method, result: FMTTResult, models, n_out: int, target_class: int | None) -> dict:
    """Judge accuracy (target class), judge confidence, reward: expectations over the handed-on samples."""
    idx, prob = handed_on(method, result, n_out)
    x = result.samples[idx]
    judge_probs = models.judge(x).softmax(1).double()
    reward = torch.nan_to_num(result.rewards[idx].double(), nan=float("-inf"))
    finite = torch.isfinite(reward)
    out = {
        "judge_confidence": expectation(prob, judge_probs.max(1).values),
        "judge_histogram": [expectation(prob, judge_probs.argmax(1) == c) for c in range(10)],
        "mean_reward": expectation(prob[finite], reward[finite]) if finite.any() else float("nan"),
        "final_ess": result.ess / result.samples.shape[0] if method.hands_on == "weights" else None,
        "resamples": result.n_resamples,
    }
    if target_class is not None:
        out["judge_accuracy"] = out["judge_histogram"][target_class]
        # The reward's own classifier on the same samples: far above the judge means adversarial pixels.
        out["reward_classifier_accuracy"] = expectation(prob, models.classifier(x).argmax(1) == target_class)
    return out
