"""Errors the core raises for bad input: each names the problem and the fix."""


class FMTTInputError(ValueError):
    """Invalid argument, shape or value given to the FMTT core."""


class FMTTNumericalError(RuntimeError):
    """Rewards, gradients or weights became unusable (all non-finite, all weights zero)."""
