"""Every method of fmtt_demo.methods on the pair task, at a matched network-pass budget, scored by the judge.

A run's "success" is the judge's reading of its handed-on samples (fmtt_demo.methods.handed_on): the
probability, under the hand-on rule, that the judge reads a pair satisfying the constraint.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from fmtt_core import time_grid

from ..methods import METHODS, MethodRun, Setup, expectation, handed_on, make_x_init, matched_particles, network_passes
from .constraints import PairConstraintReward, judge_calls, judge_success
from .data import CANVAS_SHAPE
from .models import PairModels, load_pair_models

# Every sampler the pair bench compares (fmtt_ode at Setup.ode_steps; zero-order FMTT is FK steering with
# flow-map potentials: the flow map's look-ahead without FMTT's gradient).
PAIR_METHODS = ("base", "best_of_n", "guidance", "fk", "fk_max", "fmtt_exact", "fmtt_search", "fmtt_denoiser",
                "fmtt_search_denoiser", "fmtt_ode", "fmtt_zero_order")
DEFAULT_CONSTRAINT = "sum10"
# r = log P(A | x) lies in [-10, 0]; beta 4 makes the tilt decisive, as in the digits demo.
REWARD_SCALE = 4.0


@torch.no_grad()
def evaluate_pairs(method, result, models: PairModels, reward: PairConstraintReward, n_out: int) -> dict:
    """Judge success, the reward classifier's success on the same samples (far above the judge means
    adversarial pixels), judge confidence, mean reward: expectations over the handed-on samples."""
    idx, prob = handed_on(method, result, n_out)
    x = result.samples[idx]
    left, right = x[..., :8], x[..., 8:]
    confidence = models.judge(left).softmax(1).amax(1) * models.judge(right).softmax(1).amax(1)
    reward_values = torch.nan_to_num(result.rewards[idx].double(), nan=float("-inf"))
    finite = torch.isfinite(reward_values)
    calls = judge_calls(models.judge, x)
    return {
        "judge_accuracy": expectation(prob, judge_success(models.judge, reward.table, x)),
        "reward_classifier_accuracy": expectation(prob, judge_success(models.classifier, reward.table, x)),
        "judge_confidence": expectation(prob, confidence.double()),
        "mean_reward": expectation(prob[finite], reward_values[finite]) if finite.any() else float("nan"),
        "final_ess": result.ess / result.samples.shape[0] if method.hands_on == "weights" else None,
        "resamples": result.n_resamples,
        "judge_pairs": [[int(a), int(b)] for a, b in calls[:8]],
    }


def pair_setup(models: PairModels, constraint: str, reward_scale: float = REWARD_SCALE, eta: float = 1.0,
               jumps: int = 1, ode_steps: int = 2) -> Setup:
    return Setup(models, PairConstraintReward(models.classifier, constraint), reward_scale=reward_scale, eta=eta,
                 jumps=jumps, ode_steps=ode_steps)


def run_method(setup: Setup, key: str, particles: int, steps: int, seed: int, n_out: int,
               callback=None) -> MethodRun:
    """One method at the budget FMTT exact (flow map) spends with `particles` particles."""
    method = METHODS[key]
    n = matched_particles(method, setup, particles)
    start = time.perf_counter()
    result = method.run(setup, make_x_init(n, seed, CANVAS_SHAPE), time_grid(steps), seed, callback=callback)
    seconds = time.perf_counter() - start
    metrics = evaluate_pairs(method, result, setup.models, setup.reward, min(n_out, n))
    return MethodRun(method, n, result, seconds, network_passes(result), metrics)


def run_pairs(*, constraint: str = DEFAULT_CONSTRAINT, particles: int = 64, samples: int | None = None,
              steps: int = 40, methods=PAIR_METHODS, reward_scale: float | None = None, eta: float = 1.0,
              jumps: int = 1, ode_steps: int = 2, seed: int = 0, weights: Path | None = None,
              progress: bool = False) -> tuple[list[MethodRun], dict]:
    """`fmtt demo --task pairs`: every method on one constraint; returns the runs and the settings."""
    unknown = [k for k in methods if k not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(PAIR_METHODS)}.")
    samples = min(16, particles) if samples is None else samples
    if samples > particles:
        raise ValueError(f"--samples {samples} is more than --particles {particles}; raise --particles or lower "
                         "--samples.")
    models = load_pair_models(weights)
    setup = pair_setup(models, constraint, REWARD_SCALE if reward_scale is None else reward_scale, eta, jumps,
                       ode_steps)
    settings = {"task": "pairs", "constraint": constraint, "constraint_expression": setup.reward.expression,
                "uniform_pair_rate": setup.reward.base_rate(), "reward_description": str(setup.reward),
                "reward_scale": setup.reward_scale, "particles": particles, "samples_handed_on": samples,
                "steps": steps, "eta": eta, "jumps": jumps, "ode_steps": ode_steps, "seed": seed,
                "methods": list(methods), "target_class": None,
                "budget_rule": "matched network passes to FMTT exact (flow map) with `particles`"}
    bar = None
    if progress:
        import sys

        from tqdm import tqdm
        bar = tqdm(total=len(methods) * steps, unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        runs = [run_method(setup, key, particles, steps, seed, samples,
                           callback=(lambda info: bar.update(1)) if bar is not None else None) for key in methods]
    finally:
        if bar is not None:
            bar.close()
    return runs, settings
