"""ComfyUI's sampling clocks and its model as the core's denoiser D(x_lin, t).

ComfyUI's samplers see a model `model(x, sigma, **extra_args) -> denoised` on one of two clocks:
  flow models (CONST: Flux, SD3, Z-Image, ...)   x = (1 - sigma) x1 + sigma noise       t = 1 - sigma
  noise-prediction models (EPS, v, EDM, x0)      x = x1 + sigma noise (VE form)          t = 1 / (1 + sigma),
                                                  x_lin = x / (1 + sigma)
Both land on the core's interpolant x_t = (1 - t) x0 + t x1, and the denoised prediction E[x1 | x] is the same
in both, so the core never needs to know which model it drives.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import torch

from ..fmtt_core import (
    FMTTInputError,
    flow_sigma_to_t,
    linear_to_ve,
    t_to_flow_sigma,
    t_to_ve_sigma,
    ve_sigma_to_t,
    ve_to_linear,
)


@dataclass(frozen=True)
class Clock:
    """One of ComfyUI's two sampling clocks, as conversions to and from the core's (x_lin, t)."""

    kind: str  # "flow" | "ve"

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        return flow_sigma_to_t(sigma) if self.kind == "flow" else ve_sigma_to_t(sigma)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t_to_flow_sigma(t) if self.kind == "flow" else t_to_ve_sigma(t)

    def to_linear(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return x if self.kind == "flow" else ve_to_linear(x, sigma)

    def from_linear(self, x_lin: torch.Tensor, t) -> torch.Tensor:
        return x_lin if self.kind == "flow" else linear_to_ve(x_lin, t)


SUPPORTED = ("flow models (Flux, SD3 / SD3.5, Z-Image, ...) and noise / v-prediction / x0 / EDM models (SD1.x, "
             "SDXL and its fine-tunes)")


def family_of(base_model) -> str:
    """'the SDXL model': the family ComfyUI detected for a loaded model (its supported_models class)."""
    config = getattr(base_model, "model_config", None)
    return f"the {type(config).__name__ if config is not None else type(base_model).__name__} model"


def clock_of(model_sampling, family: str = "the model") -> Clock:
    """The clock of a ComfyUI model_sampling object, or a clear error for parameterisations FMTT cannot drive."""
    ms = comfy.model_sampling
    unsupported = tuple(getattr(ms, n) for n in ("IMG_TO_IMG", "IMG_TO_IMG_FLOW", "V_PREDICTION_DDPM", "COSMOS_RFLOW")
                        if hasattr(ms, n))
    name = "+".join(c.__name__ for c in type(model_sampling).__mro__[1:] if c.__module__ == ms.__name__) or "?"
    if not isinstance(model_sampling, unsupported):
        if isinstance(model_sampling, ms.CONST):
            if getattr(model_sampling, "noise_scale", 1.0) != 1.0:
                raise FMTTInputError(f"FMTT: {family} scales its noise (noise_scale != 1), which the FMTT sampler "
                                     f"does not support. FMTT drives {SUPPORTED}.")
            return Clock("flow")
        if isinstance(model_sampling, ms.EPS):
            return Clock("ve")
    raise FMTTInputError(f"FMTT: {family} samples with a parameterisation ({name}) that FMTT does not support. "
                         f"FMTT drives {SUPPORTED} (if a ModelSamplingDiscrete node set this type, choose eps, "
                         "v_prediction, lcm or x0).")


def guided_parts(model):
    """(CFGGuider, BaseModel) behind the `model` a KSAMPLER function receives (a KSamplerX0Inpaint)."""
    guider = model.inner_model
    return guider, guider.inner_model


def core_denoiser(model_fn, clock: Clock, check_interrupt: bool = True):
    """D(x_lin, t) for fmtt_core from ComfyUI's model_fn(x, sigma) -> denoised."""

    def denoiser(x_lin: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if check_interrupt:
            # Chunked steps can hold many model calls: stop between calls, not only between steps.
            comfy.model_management.throw_exception_if_processing_interrupted()
        return model_fn(clock.from_linear(x_lin, t), clock.sigma(t).to(x_lin.dtype))

    return denoiser
