"""Where a non-finite value first appears.

Values flow through one chain per particle:  model call D(x, t) -> look-ahead X_t,1(x) -> decoder -> reward r ->
its gradient -> the SDE step. A NaN or inf made at any stage poisons every later one, so the reward at the end of
the chain is non-finite whatever broke. The stage to blame is the one that took finite input and returned
non-finite output; naming it, with its fix, tells the user what to change (a NaN cfg, a damaged look-ahead file),
where "the reward is non-finite" would send them to the wrong input.
"""
from __future__ import annotations

import warnings

import torch

from .errors import FMTTNumericalError

# stage -> (what produced the value, what to do about it). Adapters add their own context (nodes/finite_outputs.py).
STAGES = {
    "particles": ("the starting latent", "Give the sampler a finite latent (check the node that made it)."),
    "model": ("the model call D(x, t)",
              "Check the guidance scale (cfg), the model file and any LoRA or patch on the model."),
    "lookahead": ("the look-ahead X_t,1(x)",
                  "Check the look-ahead: its model or file (NaN tensors), its LoRA and the LoRA strength."),
    "decoder": ("the decoder (VAE)", "Check the VAE file, or decode in float32 (a float16 VAE can overflow)."),
    "reward": ("the reward",
               "Check that the reward returns finite values for decoded images (its model file, its settings)."),
    "gradient": ("the reward's gradient", "Lower reward_scale, or set grad_clip."),
    "step": ("the sampler's step (the reward's push overflowed)", "Lower reward_scale or eta, or set grad_clip."),
}
_CODE = {stage: i + 1 for i, stage in enumerate(STAGES)}  # 0: finite so far
_STAGE = {code: stage for stage, code in _CODE.items()}


class FMTTNonFiniteError(FMTTNumericalError):
    """Every particle turned non-finite at one stage; `stage` names it (a key of STAGES)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[N] bool: row i of x holds only finite values."""
    return torch.isfinite(x.detach().reshape(x.shape[0], -1)).all(1) if x.ndim > 1 else torch.isfinite(x.detach())


class Trace:
    """The first stage at which each of N particles stopped being finite, filled in chain order.

        trace = Trace(x)              # rows that are already non-finite are not blamed on any stage
        trace.check("model", d)       # rows finite up to here whose d is not: blamed on the model
        trace.check("lookahead", y)   # ... and so on down the chain; trace.blame(t) then speaks
    """

    def __init__(self, x: torch.Tensor):
        self.entered = finite_rows(x).cpu()
        self.first = torch.zeros(x.shape[0], dtype=torch.int8)

    @property
    def ok(self) -> torch.Tensor:
        return self.entered & (self.first == 0)

    def check(self, stage: str, out: torch.Tensor) -> None:
        """Blame `stage` for the rows that were finite up to it and are not in its output `out`."""
        self.first[self.ok & ~finite_rows(out).cpu()] = _CODE[stage]

    @staticmethod
    def cat(traces: list[Trace]) -> Trace:
        out = Trace.__new__(Trace)
        out.entered = torch.cat([t.entered for t in traces])
        out.first = torch.cat([t.first for t in traces])
        return out

    def blame(self, t: float, *, tolerate: tuple[str, ...] = ("reward", "gradient")) -> None:
        """Raise FMTTNonFiniteError when no particle that entered finite came through, naming the stage that broke
        most of them; when only some broke, warn. Stages in `tolerate` are left to the caller, which counts
        them over the whole population (a reward may be -inf for some particles by design: weight zero)."""
        entered = int(self.entered.sum())
        if entered == 0:
            if self.entered.numel():
                raise broke_every("step", self.entered.numel(), t)
            return
        broke = self.first[self.entered]
        counts = {_STAGE[int(c)]: int((broke == c).sum()) for c in broke.unique() if int(c)}
        worst = max(counts, key=counts.get) if counts else None
        if int((broke > 0).sum()) == entered and worst not in tolerate:
            raise broke_every(worst, entered, t)
        for stage, n in counts.items():
            if stage not in tolerate:
                what = STAGES[stage][0]
                warnings.warn(f"FMTT: {what} returned non-finite values for {n} of {entered} particles at t={t:.3f}; "
                              f"they get weight zero. {STAGES[stage][1]}", RuntimeWarning, stacklevel=3)


def broke_every(stage: str, n: int, t: float) -> FMTTNonFiniteError:
    """The error for a stage that made every one of n particles non-finite at time t."""
    what, fix = STAGES[stage]
    return FMTTNonFiniteError(stage, f"FMTT: {what} returned non-finite values (NaN / inf) for every particle "
                                     f"({n}) at t={t:.3f}: the values first go bad there. {fix}")


def require_finite(stage: str, x: torch.Tensor, t: float) -> None:
    """Raise FMTTNonFiniteError naming `stage` when x has a non-finite row (for chains without weights, where one
    bad particle is already a wrong result: a few-step sampler's output)."""
    bad = ~finite_rows(x)
    if bad.any():
        what, fix = STAGES[stage]
        raise FMTTNonFiniteError(stage, f"FMTT: {what} returned non-finite values (NaN / inf) for "
                                        f"{int(bad.sum())} of {x.shape[0]} latents at t={t:.3f}: the values first "
                                        f"go bad there. {fix}")
