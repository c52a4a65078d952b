"""The FMTT sampler settings, declared once.

Each row of SETTINGS is one input of the FMTT Sampler and FMTT KSampler nodes: its ComfyUI widget (name,
default, limits, tooltip) and, for the settings the core reads, the FMTTConfig field it sets and how the widget
value becomes the core's value. The widgets, the settings object the nodes hand to the sampler, the FMTTConfig
and the checks all come from this table: adding a setting is one row (plus its FMTTConfig field).

Checks: ComfyUI checks each widget against its limits and options when a prompt is queued (the nodes do not
override validate_inputs, which would switch those checks off). What spans several settings is checked when
the node runs, by the core's FMTTConfig.validate, its messages translated to the widget names.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from comfy_api.latest import io

from ..fmtt_core import MODES, SCHEMES, SDE_STEPS, FMTTConfig, FMTTInputError, LinearTilt, RampTilt
from ..fmtt_core import WEIGHTS as CORE_WEIGHTS
from .diagnostics import Diagnostics
from .lookahead_specs import LookaheadSpec
from .types import Lookahead, Reward

CORE = FMTTConfig()  # the core's defaults: the widgets of the core's settings start from them
OUTPUTS = ("best", "top_k", "weighted_resample")
WEIGHTS = CORE_WEIGHTS


def _same(value):
    return value


def _zero_is_none(value):
    return value or None


def _tilt(ramp: float):
    return LinearTilt() if ramp >= 1 else RampTilt(ramp)


@dataclass(frozen=True)
class Setting:
    input: io.Input                       # the widget or socket: name, default, limits, tooltip
    core: str | None = None               # the FMTTConfig field it sets; None: read by the node layer only
    to_core: Callable[[Any], Any] = _same  # widget value -> the core's value

    @property
    def name(self) -> str:
        return self.input.id

    @property
    def default(self):
        return getattr(self.input, "default", None)


SETTINGS: tuple[Setting, ...] = (
    Setting(Reward.Input("reward", tooltip="What to steer toward: an FMTT reward (CLIP, PickScore, VLM question, "
                                           "mask, ... or a weighted sum).")),
    Setting(io.Vae.Input("vae", tooltip="The model's VAE (or a TAESD of the same latent space, cheaper): particles "
                                        "are decoded with it, differentiably, before the reward scores them.")),
    Setting(Lookahead.Input("lookahead", optional=True,
                            tooltip="How to predict a particle's final image: an FMTT look-ahead node. Unconnected: "
                                    "the base model's denoiser (cheapest, least accurate early on).")),
    Setting(io.Combo.Input("mode", options=list(MODES), default=CORE.mode,
                           tooltip="exact: reward-gradient drift + importance weights + resampling, samples "
                                   "p(x) exp(scale r(x)) as the sampler's steps discretise it (exactly with twisted / "
                                   "doob weights; with an O(h) bias under advective / eulerian / auto, see weights). "
                                   "search: gradient drift + keep-the-best selections (highest rewards, no weights). "
                                   "zero_order: no gradients, weights + resampling only (cheapest, exact)."),
            core="mode"),
    Setting(io.Int.Input("particles", default=4, min=1, max=4096,
                         tooltip="Particles per latent in the batch. More particles: better steering, "
                                 "proportionally more compute; their memory is checked before sampling.")),
    Setting(io.Float.Input("reward_scale", default=CORE.reward_scale, min=0.0, max=100000.0, step=0.01,
                           tooltip="Tilt strength beta: the target is p(x) exp(beta r(x)). Scale it to the reward's "
                                   "range (CLIP ~100 x cos: try 0.1-1; HPSv2 ~0.3: try 20-100). 0: no steering."),
            core="reward_scale"),
    Setting(io.Float.Input("eta", default=CORE.eta, min=0.0, max=10.0, step=0.01,
                           tooltip="Stochasticity: noise level eps_t = eta (1 - t). The reward gradient acts "
                                   "through the noise, so eta = 0 means weights only."), core="eta"),
    Setting(io.Float.Input("ess_threshold", default=CORE.ess_threshold, min=0.0, max=1.0, step=0.01,
                           tooltip="Resample when the effective sample size falls below this fraction of the "
                                   "particles (0: never, 1: every step)."), core="ess_threshold"),
    Setting(io.Combo.Input("resampling", options=list(SCHEMES), default=CORE.resampling,
                           tooltip="Resampling scheme: systematic (lowest variance), stratified, multinomial, "
                                   "residual."), core="resampling"),
    Setting(io.Int.Input("chunk_size", default=0, min=0, max=4096,
                         tooltip="Particles per forward / backward pass. 0: automatic, as many as the free memory "
                                 "of the device allows (shown in the diagnostics). Results do not change."),
            core="chunk_size", to_core=_zero_is_none),
    Setting(io.Combo.Input("output", options=list(OUTPUTS), default="best",
                           tooltip="Which particles to hand on: best (highest final reward), top_k (the "
                                   "output_count best), weighted_resample (output_count draws from the importance "
                                   "weights: samples of the tilted distribution).")),
    Setting(io.Int.Input("output_count", default=1, min=1, max=4096,
                         tooltip="How many particles per latent for top_k (at most the particles) / "
                                 "weighted_resample.")),
    Setting(io.Float.Input("tilt_ramp", default=1.0, min=0.01, max=1.0, step=0.01, advanced=True,
                           tooltip="Tilt schedule: lambda reaches 1 at this fraction of the trajectory (1.0: linear, "
                                   "the paper's lambda_t = t; 0.1: weights and resampling act only early)."),
            core="tilt", to_core=_tilt),
    Setting(io.Float.Input("grad_clip", default=0.0, min=0.0, max=100000.0, step=0.01, advanced=True,
                           tooltip="Cap on the per-particle reward-gradient norm (0: off). Tames spiky rewards; "
                                   "makes exact mode approximate."), core="grad_clip", to_core=_zero_is_none),
    Setting(io.Int.Input("search_steps", default=CORE.search_steps, min=1, max=100, advanced=True,
                         tooltip="search mode: number of keep-the-best selections over the first 3/4 of the "
                                 "steps."), core="search_steps"),
    Setting(io.Int.Input("search_keep", default=0, min=0, max=4096, advanced=True,
                         tooltip="search mode: particles kept at each selection, at most the particles (0: a "
                                 "quarter of them)."), core="search_keep", to_core=_zero_is_none),
    Setting(io.Combo.Input("weights", options=list(WEIGHTS), default=CORE.weights, advanced=True,
                           tooltip="Importance-weight formula (docs/weights.md). Exact at this step count: twisted "
                                   "(default; free; resamples often for steep rewards) and doob (twisted with a doubled"
                                   " push: fewer resamplings on smooth rewards). Exact only as steps shrink (bias of "
                                   "several standard errors at 20-100 steps): advective (one more look-ahead forward "
                                   "per step), eulerian (perfect flow map only), auto (twisted or advective per step; "
                                   "the diagnostics give the share of approximate steps)."),
            core="weights"),
    Setting(io.Boolean.Input("block_checkpointing", default=True, optional=True, advanced=True,
                             tooltip="Recompute each transformer block (FLUX-family models) in the backward pass "
                                     "instead of storing its activations: far less memory per reward gradient, "
                                     "about one more forward pass of time. Results do not change.")),
    # Appended last: saved workflows list widget values in this order, so older ones keep theirs.
    Setting(io.Combo.Input("sde_step", options=list(SDE_STEPS), default=CORE.sde_step, optional=True, advanced=True,
                           tooltip="How each SDE step is integrated. euler: Euler-Maruyama. 2m: the exponential step "
                                   "plus a second-order correction from the previous model call (no extra call): "
                                   "2-8x fewer steps for the same error on the bench, most at low eta; weaker at "
                                   "eta 1 with very few steps. exponential: stochastic DDIM. Weights stay exact for "
                                   "each."),
            core="sde_step"),
)
BY_NAME = {s.name: s for s in SETTINGS}


def fmtt_inputs() -> list:
    """The widgets and sockets of the FMTT settings, in the table's order (saved workflows depend on it)."""
    return [s.input for s in SETTINGS]


def _speak(message: str) -> str:
    """A core message in the node's words: core field names become widget names."""
    for s in SETTINGS:
        if s.core is not None and s.core != s.name:
            message = re.sub(rf"\b{s.core}\b", s.name, message)
    return message if message.startswith("FMTT") else f"FMTT: {message}"


def widget_problem(setting: Setting, value) -> str | None:
    """What is wrong with a value against its widget's type, limits and options (None: nothing). ComfyUI checks
    typed-in widgets itself; this also covers values that arrive through links."""
    inp, name = setting.input, setting.name
    if isinstance(inp, io.Combo.Input):
        return None if value in inp.options else f"{name}: {value!r} is not one of {list(inp.options)}."
    if isinstance(inp, (io.Int.Input, io.Float.Input)):
        integer = isinstance(inp, io.Int.Input)
        kind = "a whole number" if integer else "a number"
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not number or (integer and value != int(value)) or not inp.min <= value <= inp.max:
            return f"{name} must be {kind} between {inp.min} and {inp.max}, got {value!r}."
    return None


class _SettingsBehaviour:
    """Methods of FMTTSettings (its fields are generated from SETTINGS below)."""

    def config(self, seed: int, chunk_size: int | None = None) -> FMTTConfig:
        values = {s.core: s.to_core(getattr(self, s.name)) for s in SETTINGS if s.core is not None}
        if chunk_size is not None:  # the chunk size the memory plan chose
            values["chunk_size"] = chunk_size
        return FMTTConfig(**values, seed=seed)

    def check(self) -> None:
        """Raise FMTTInputError naming the setting and the fix; the core's validation speaks for its settings."""
        if self.reward is None or not callable(self.reward):
            raise FMTTInputError("FMTT: the reward input is not an FMTT reward; connect an FMTT reward node.")
        if self.lookahead is not None and not isinstance(self.lookahead, LookaheadSpec):
            raise FMTTInputError("FMTT: the lookahead input is not an FMTT look-ahead; connect an FMTT look-ahead "
                                 "node.")
        problems = [p for s in SETTINGS if s.default is not None and (p := widget_problem(s, getattr(self, s.name)))]
        if problems:
            raise FMTTInputError("FMTT: " + " ".join(problems))
        if self.output == "top_k" and self.output_count > self.particles:
            raise FMTTInputError(f"FMTT: output_count ({self.output_count}) is larger than particles "
                                 f"({self.particles}) with output top_k: lower output_count or raise particles.")
        try:
            self.config(seed=0).validate(self.particles)
        except FMTTInputError as err:
            raise FMTTInputError(_speak(str(err))) from None

    def summary(self) -> dict:
        """The settings as plain values, for the diagnostics."""
        out = {s.name: getattr(self, s.name) for s in SETTINGS if s.name not in ("reward", "vae", "lookahead")}
        out["reward"] = getattr(self.reward, "name", type(self.reward).__name__)
        return out

    def needs_gradient(self) -> bool:
        return self.mode != "zero_order" and self.reward_scale > 0 and self.eta > 0


FMTTSettings = make_dataclass(
    "FMTTSettings",
    [(s.name, Any) if s.default is None and not s.input.optional else (s.name, Any, field(default=s.default))
     for s in SETTINGS] + [("diagnostics", Diagnostics, field(default_factory=Diagnostics))],
    bases=(_SettingsBehaviour,), eq=False)
FMTTSettings.__module__ = __name__
FMTTSettings.__doc__ = "One run's FMTT settings, a field per row of SETTINGS (missing optional ones: defaults)."


def settings_from(inputs: dict) -> FMTTSettings:
    """The settings from a node's inputs (other inputs, such as the KSampler's model and seed, are left out)."""
    return FMTTSettings(**{k: v for k, v in inputs.items() if k in BY_NAME})
