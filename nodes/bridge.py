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
import contextvars
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


def _tensor_leaves(tree):
    """The autograd-usable tensors in a nest of tuples / lists / dicts, and what rebuilds the nest from
    replacements for them. Inference tensors (ComfyUI's sigmas, conditioning) are constants: they cannot take
    part in autograd, nor be changed in place."""
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    tracked = [isinstance(v, torch.Tensor) and not v.is_inference() for v in leaves]

    def rebuild(tensors):
        tensors = iter(tensors)
        return torch.utils._pytree.tree_unflatten([next(tensors) if t else v for v, t in zip(leaves, tracked)], spec)

    return [v for v, t in zip(leaves, tracked) if t], rebuild


class _RecomputedBlock(torch.autograd.Function):
    """A DiT block call that keeps only its inputs for the backward pass and runs again there.

    torch.utils.checkpoint does not fit ComfyUI's blocks: they update activations in place (x += ...) after autograd
    saved them, and its recompute keeps saved tensors as views that those updates overwrite (silently wrong
    gradients). This recompute saves copies instead, like the un-checkpointed path, one block at a time.
    Gradients flow to the call's tensors (also inside tuples, lists and dicts); other objects are constants.
    """

    @staticmethod
    def forward(ctx, run, outputs_box, *tensors):
        ctx.run = run
        ctx.save_for_backward(*tensors)
        outputs, outputs_box["rebuild"] = _tensor_leaves(run(tensors))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]
        with torch.enable_grad(), _clone_saved_activations():
            outputs, _ = _tensor_leaves(ctx.run(inputs))
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (None, None, *(next(grads) if t.requires_grad else None for t in inputs))


def _recomputed(block_forward):
    """A block's forward that recomputes it in the backward pass. The arguments are captured as they are at the
    call (ComfyUI updates transformer_options between blocks), and the block always runs on copies of its input
    tensors because it updates them in place."""

    def forward(*args, **kwargs):
        tensors, rebuild_call = _tensor_leaves((args, kwargs))
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return block_forward(*args, **kwargs)  # nothing to differentiate: the plain call
        # The recompute runs in the context variables of this call (a flow-map LoRA is active only inside its
        # look-ahead calls), whichever thread runs the backward pass.
        context = contextvars.copy_context()

        def run(inputs):
            call_args, call_kwargs = rebuild_call([t.clone() for t in inputs])
            return context.run(block_forward, *call_args, **call_kwargs)

        box = {}
        outputs = _RecomputedBlock.apply(run, box, *tensors)
        return box["rebuild"](outputs)

    return forward


BLOCK_LISTS = ("double_blocks", "single_blocks")  # Flux-family DiTs (Flux, Flux 2, Chroma, HunyuanVideo)


@contextlib.contextmanager
def _recomputed_blocks(modules: list[torch.nn.Module]):
    """Recompute every DiT block of these models in the backward pass: memory per model call is about one
    block's activations plus each block's inputs, instead of every block's activations."""
    blocks = [b for m in modules for name in BLOCK_LISTS for b in getattr(m, name, None) or []]
    patched = [(b, b.__dict__.get("forward")) for b in blocks]
    for b in blocks:
        b.forward = _recomputed(b.forward)  # an instance attribute over the class's forward
    try:
        yield
    finally:
        for b, before in patched:
            if before is None:
                del b.forward
            else:
                b.forward = before


@contextlib.contextmanager
def differentiable(modules: list[torch.nn.Module], enabled: bool = True, block_checkpointing: bool = False):
    """Make gradients flow through ComfyUI models inside a node (see the pack's design notes):
    leave inference mode, use normal-tensor frozen weights, set ComfyUI's `in_training` flag (Flux's fused
    RoPE has no backward otherwise) and copy saved activations, or with `block_checkpointing` recompute each DiT
    block in the backward pass instead of storing its activations. Everything is restored on exit."""
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
                with _recomputed_blocks(modules) if block_checkpointing else contextlib.nullcontext():
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
