"""ComfyUI <-> fmtt_core: clocks, the denoiser in the core's t convention, gradients, VAE decoding.

ComfyUI's samplers see a model `model(x, sigma, **extra_args) -> denoised` on one of two clocks:
  flow models (CONST: Flux, SD3, Z-Image, ...)   x = (1 - sigma) x1 + sigma noise       t = 1 - sigma
  noise-prediction models (EPS, v, EDM, x0)      x = x1 + sigma noise (VE form)          t = 1 / (1 + sigma),
                                                  x_lin = x / (1 + sigma)
Both land on the core's interpolant x_t = (1 - t) x0 + t x1, and the denoised prediction E[x1 | x] is the same
in both, so the core never needs to know which model it drives.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.model_sampling

from ..fmtt_core import (FMTTInputError, flow_sigma_to_t, linear_to_ve, t_to_flow_sigma, t_to_ve_sigma,
                         ve_sigma_to_t, ve_to_linear)


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


def clock_of(model_sampling) -> Clock:
    """The clock of a ComfyUI model_sampling object, or a clear error for parameterisations FMTT cannot drive."""
    ms = comfy.model_sampling
    unsupported = tuple(getattr(ms, n) for n in ("IMG_TO_IMG", "IMG_TO_IMG_FLOW", "V_PREDICTION_DDPM", "COSMOS_RFLOW")
                        if hasattr(ms, n))
    name = "+".join(c.__name__ for c in type(model_sampling).__mro__[1:] if c.__module__ == ms.__name__) or "?"
    if not isinstance(model_sampling, unsupported):
        if isinstance(model_sampling, ms.CONST):
            if getattr(model_sampling, "noise_scale", 1.0) != 1.0:
                raise FMTTInputError("FMTT: this flow model scales its noise (noise_scale != 1), which the FMTT "
                                     "sampler does not support; use a standard flow model (Flux, SD3, Z-Image).")
            return Clock("flow")
        if isinstance(model_sampling, ms.EPS):
            return Clock("ve")
    raise FMTTInputError(f"FMTT: the model's sampling type ({name}) is not supported. FMTT drives flow models "
                         "(Flux, SD3, Z-Image, ...) and noise / v-prediction models (SD1.x, SDXL).")


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


# ------------------------------------------------------------------ gradients through ComfyUI models

def _normal_weights(module: torch.nn.Module) -> None:
    """Replace inference-mode weights (ComfyUI loads models inside torch.inference_mode) by normal clones,
    which autograd accepts. Same values; done once per load (a re-patched weight is cloned again)."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()


@contextlib.contextmanager
def _frozen(modules: list[torch.nn.Module]):
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _clone_saved_activations():
    """DiT blocks update activations in place (x += ...) after autograd saved them; saving a copy keeps the
    backward pass valid. Weights are never modified in place, so they are saved as they are."""

    def pack(t: torch.Tensor):
        return t if isinstance(t, torch.nn.Parameter) else t.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


@contextlib.contextmanager
def differentiable(modules: list[torch.nn.Module], enabled: bool = True):
    """Make gradients flow through ComfyUI models inside a node (see the pack's design notes):
    leave inference mode, use normal-tensor frozen weights, set ComfyUI's `in_training` flag (Flux's fused
    RoPE has no backward otherwise) and copy saved activations. Everything is restored on exit."""
    with torch.inference_mode(False):
        if not enabled:
            yield
            return
        for m in modules:
            _normal_weights(m)
        saved_flag = comfy.model_management.in_training
        comfy.model_management.in_training = True
        try:
            with _frozen(modules), torch.enable_grad(), _clone_saved_activations():
                yield
        finally:
            comfy.model_management.in_training = saved_flag


def normal_tensor(t):
    """A normal (autograd-usable) copy of a tensor created in inference mode; None stays None."""
    if t is None:
        return None
    with torch.inference_mode(False):
        return t.clone()


# ------------------------------------------------------------------ decoding for the reward

def check_vae(vae, base_model) -> None:
    """Raise a clear error when the VAE does not belong to the model's latent space."""
    if vae is None or not hasattr(vae, "first_stage_model"):
        raise FMTTInputError("FMTT: the vae input is not a ComfyUI VAE; connect a Load VAE node.")
    want = base_model.latent_format.latent_channels
    have = getattr(vae, "latent_channels", None)
    if have != want:
        raise FMTTInputError(
            f"FMTT: the VAE expects {have}-channel latents but the model makes {want}-channel latents. Connect the "
            "VAE that belongs to this model (e.g. ae.safetensors or the taef1 TAESD for FLUX, the SD3 VAE for "
            "SD3.5); the reward sees images decoded by it.")
    if getattr(vae, "latent_dim", 2) != 2:
        raise FMTTInputError("FMTT: the VAE is a video / audio VAE; FMTT rewards score images, connect an image VAE.")


def vae_decoder(vae, base_model):
    """Differentiable decode(x1) -> images [B, 3, H, W] in [0, 1].

    VAE.decode clamps in place and is not differentiable, so this calls the first stage model directly and maps
    its [-1, 1] output to [0, 1] the way the VAE's own process_output does.
    """
    check_vae(vae, base_model)
    comfy.model_management.load_models_gpu([vae.patcher])
    first_stage = vae.first_stage_model
    probe = vae.process_output(torch.tensor([-1.0, 1.0]))
    signed = torch.allclose(probe, torch.tensor([0.0, 1.0]))

    def decode(x1: torch.Tensor) -> torch.Tensor:
        z = base_model.process_latent_out(x1).to(vae.device, vae.vae_dtype)
        images = first_stage.decode(z).float()
        if images.ndim == 5:  # some image VAEs return a one-frame video
            images = images[:, :, 0]
        images = (images + 1) / 2 if signed else images
        return images.clamp(0, 1).to(x1.device)

    return decode, first_stage
