"""Importance weights, effective sample size and resampling (BlackJAX-style: indices from weights).

Each scheme returns N ancestor indices whose counts have expectation N * w_i (unbiased); they differ
in variance: multinomial > stratified > systematic, residual in between.
"""
from __future__ import annotations

import torch

from .errors import FMTTInputError, FMTTNumericalError

SCHEMES = ("systematic", "stratified", "multinomial", "residual")


def normalize_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """log w_i - logsumexp(log w): normalised log-weights; -inf stays -inf (weight zero).

    NaN or +inf is a bug upstream (an infinite weight has no normalisation): it is refused, never
    passed on to pick particles.
    """
    log_w = log_w.double()
    bad = torch.isnan(log_w) | (log_w == float("inf"))
    if bad.any():
        raise FMTTNumericalError(
            f"{int(bad.sum())} log-weight(s) are NaN or +inf (first at index {int(bad.nonzero()[0])}); "
            "weights must be finite or -inf (weight zero). Map non-finite rewards to -inf before weighting.")
    if not torch.isfinite(log_w).any():
        raise FMTTNumericalError(
            "all importance weights are zero (every particle's reward or gradient was non-finite or -inf). "
            "Check the reward on a few samples, lower reward_scale, or enable grad_clip.")
    return log_w - torch.logsumexp(log_w, 0)


def ess(log_w: torch.Tensor) -> float:
    """Effective sample size (sum w)^2 / sum w^2, computed from log-weights."""
    log_w = normalize_log_weights(log_w)
    return float(torch.exp(-torch.logsumexp(2 * log_w, 0)))


def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _sorted_search(weights: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Ancestor index for each position in [0, 1): inverse of the weights' CDF.

    Positions are scaled by the CDF's own total rather than forcing its last value to 1: forcing it
    would hand the round-off gap to the last particle even when its weight is zero. The clamp keeps a
    position that rounds onto the total inside the last particle that has weight.
    """
    cdf = torch.cumsum(weights, 0)
    idx = torch.searchsorted(cdf, positions * cdf[-1], right=True)
    return idx.clamp_(max=int(torch.nonzero(weights > 0).max()))


def systematic(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    positions = (_uniform(1, generator) + torch.arange(n, dtype=torch.float64)) / n
    return _sorted_search(weights, positions)


def stratified(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    positions = (_uniform(n, generator) + torch.arange(n, dtype=torch.float64)) / n
    return _sorted_search(weights, positions)


def multinomial(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def residual(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Deterministic floor(n w_i) copies, the remainder drawn multinomially from the residuals."""
    copies = torch.floor(n * weights).long()
    kept = torch.repeat_interleave(torch.arange(weights.numel()), copies)
    rest = n - kept.numel()
    if rest == 0:
        return kept
    res = n * weights - copies
    extra = torch.multinomial(res / res.sum(), rest, replacement=True, generator=generator)
    return torch.cat([kept, extra])


_SCHEME_FNS = {"systematic": systematic, "stratified": stratified,
               "multinomial": multinomial, "residual": residual}


def resample_indices(log_w: torch.Tensor, scheme: str = "systematic", generator: torch.Generator | None = None,
                     n: int | None = None) -> torch.Tensor:
    """Ancestor indices (int64, on the CPU) drawn from normalised weights exp(log_w)."""
    if scheme not in _SCHEME_FNS:
        raise FMTTInputError(f"unknown resampling scheme {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    weights = torch.exp(normalize_log_weights(log_w.detach().cpu()))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return _SCHEME_FNS[scheme](weights, n or weights.numel(), generator)
