"""Weighted sums of rewards, each normalised so rewards of different scales combine sensibly:

    R(x) = sum_i w_i * n_i(r_i(x))

Normalisations n_i:

* Affine(offset, scale): n(r) = (r - offset) / scale with fixed constants (identity by default).
  `Affine.fit(scores)` sets them once from scores of a calibration batch (mean, standard deviation).
* BatchStandardize(): n(r) = (r - mean_batch r) / (std_batch r + eps), from the batch being scored.

Which to use. FMTT tilts the target to p(x) * exp(R(x)) and its importance weights accumulate R of each
particle on its own. A fixed affine map keeps that target well defined: the offset shifts every log-weight
equally (cancels when weights are normalised) and the scale only rescales the reward strength. Batch
statistics make a particle's reward depend on the other particles, so the target changes whenever the
batch does (each step, after every resampling, with the number of particles) and the weights no longer
estimate expectations under any fixed target; a batch of one standardises to 0. Use BatchStandardize only
to rank candidates (search, best-of-N); for sampling with weights use Affine, fitted once with Affine.fit.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .base import Reward, check_images


@dataclass(frozen=True)
class Affine:
    """n(r) = (r - offset) / scale, with fixed constants (scale > 0; flip a reward with a negative weight)."""
    offset: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.offset) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Affine needs a finite offset and a finite scale > 0, got offset={self.offset}, "
                             f"scale={self.scale}; use a negative term weight to reverse a reward.")

    @classmethod
    def fit(cls, scores: torch.Tensor) -> Affine:
        """Standardise with the mean and standard deviation of calibration scores (frozen afterwards)."""
        scores = torch.as_tensor(scores, dtype=torch.float64).detach().flatten()
        if scores.numel() < 2 or not torch.isfinite(scores).all():
            raise ValueError(f"Affine.fit needs at least 2 finite scores, got {scores.tolist()}.")
        std = scores.std(unbiased=False).item()
        if std == 0:
            raise ValueError("Affine.fit: all calibration scores are equal, so there is no scale to fit; "
                             "score more varied images or set Affine(offset, scale) by hand.")
        return cls(offset=scores.mean().item(), scale=std)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.offset) / self.scale


@dataclass(frozen=True)
class BatchStandardize:
    """n(r) = (r - mean) / (std + eps) over the batch (population std). Batch-dependent: see the module doc."""
    eps: float = 1e-6

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - scores.mean()) / (scores.std(unbiased=False) + self.eps)


Normalization = Affine | BatchStandardize


@dataclass(frozen=True)
class Term:
    """One summand: weight * normalize(reward(images))."""
    reward: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0
    normalize: Normalization = field(default_factory=Affine)
    name: str = ""


class WeightedSum(Reward):
    """R(x) = sum_i w_i n_i(r_i(x)) over `terms` (Term, or (reward, weight[, normalize]) tuples).

    Each reward keeps its own device, dtype and chunk_size; images are passed to it as given and the
    sum comes back as float32 on the images' device.
    """

    def __init__(self, terms: Sequence[Term | tuple]):
        super().__init__()
        terms = [t if isinstance(t, Term) else Term(*t) for t in terms]
        if not terms:
            raise ValueError("WeightedSum needs at least one term, e.g. WeightedSum([(reward, 1.0)]).")
        for i, t in enumerate(terms):
            if not callable(t.reward):
                raise ValueError(f"Term {i} has reward {t.reward!r}, which is not callable; pass a Reward.")
            if not math.isfinite(t.weight):
                raise ValueError(f"Term {i} has weight {t.weight}; weights must be finite.")
            if not isinstance(t.normalize, (Affine, BatchStandardize)):
                raise ValueError(f"Term {i} has normalize={t.normalize!r}; "
                                 "use Affine(offset, scale) or BatchStandardize().")
        # A plain tuple, not a ModuleList: the sub-rewards stay on their own devices.
        self.terms = tuple(Term(t.reward, float(t.weight), t.normalize, t.name or f"term{i}")
                           for i, t in enumerate(terms))

    def term_rewards(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised, unweighted rewards [n_terms, B] (for traces and previews)."""
        rows = []
        for t in self.terms:
            r = t.reward(images)
            if r.shape != (images.shape[0],):
                raise ValueError(f"Reward of {t.name} returned shape {tuple(r.shape)} for {images.shape[0]} images; "
                                 "rewards must return one score per image, shape [B].")
            rows.append(t.normalize(r.float().to(images.device)))
        return torch.stack(rows)

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor([t.weight for t in self.terms], device=images.device)
        return weights @ self.term_rewards(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # No chunking or device move here: each term does its own, and BatchStandardize needs the whole batch.
        check_images(images)
        return self.evaluate(images)
