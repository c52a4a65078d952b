"""The memory guard: what one particle costs in this run, and the chunk size that fits the free memory of the
device the sampling runs on (the CPU's free RAM on a CPU).

One particle's pass, with the reward gradient, holds the activations of every model call the backward pass goes
through (the look-ahead's, and the denoiser's when the look-ahead builds on it), of the VAE decode and of the
reward. Those are measured, not guessed: one particle's model call and VAE decode run forward and backward once
before sampling, and autograd says what they keep (fmtt_core.memory.measure_pass). Without the gradient a pass
keeps one call's inference activations: ComfyUI's own estimates (model.memory_required,
vae.memory_used_decode). The arithmetic and the refusal live in fmtt_core.memory.
"""
from __future__ import annotations

import os

import comfy.model_management
import torch

from ..fmtt_core.memory import MemoryPlan, MiB, measure_pass, plan_chunks
from .autograd import block_lists, differentiable

BUDGET_VAR = "FMTT_MEMORY_BUDGET_MB"  # caps the budget (a shared machine, a test); unset: all that is free
STATE_COPIES = 8            # particle-sized tensors a step keeps per particle (x, D, gradient, noise, ODE step, ...)
REWARD_FLOOR = 16 * MiB     # the least a reward pass is assumed to cost per image
# The old multiples of ComfyUI's inference estimate, kept for the flow-map training's memory estimate
# (nodes/flow_map_training.py on main), which is not measured yet; sampling no longer uses them.
BACKWARD_KEEPS = 6.0
BACKWARD_KEEPS_BLOCKS = 2.0


def budget(device) -> int:
    """Bytes the run may use on `device`: ComfyUI's free memory less its reserve (--reserve-vram), at most
    FMTT_MEMORY_BUDGET_MB."""
    free = comfy.model_management.get_free_memory(device) - comfy.model_management.extra_reserved_memory()
    cap = os.environ.get(BUDGET_VAR)
    if cap:
        try:
            free = min(free, int(float(cap) * MiB))
        except ValueError:
            raise ValueError(f"FMTT: {BUDGET_VAR}={cap!r} is not a number of MiB; unset it or give e.g. 8000.") \
                from None
    return max(int(free), 0)


def _kept_model_calls(spec) -> int:
    """Model calls whose activations one particle's backward pass needs at once."""
    kind = getattr(spec, "kind", "denoiser")
    if kind == "denoiser":
        return 1
    steps = int(getattr(spec, "jumps", getattr(spec, "steps", 1)))
    kept = 1 if getattr(spec, "checkpoint", False) else steps
    return kept + (1 if kind == "ode" else 0)  # the ODE look-ahead also builds on the sampler's D call


def reward_bytes(reward) -> int:
    """A reward's pass per image: its own estimate when it has one (memory_per_image), else about half its
    weights' size (transformer activations with a backward pass, for images at the model's input size)."""
    own = getattr(reward, "memory_per_image", None)
    if callable(own):
        return int(own())
    tensors = list(reward.parameters()) + list(reward.buffers()) if hasattr(reward, "parameters") else []
    return max(REWARD_FLOOR, sum(t.numel() * t.element_size() for t in tensors) // 2)


def inference_bytes(base_model, cfg: float, vae, latent_shape) -> int:
    """ComfyUI's estimate of one particle's model call and VAE decode without gradients."""
    one = [1, *latent_shape[1:]]
    model = base_model.memory_required(one) * (2 if cfg != 1.0 else 1)  # cfg evaluates two conditionings
    return int(max(model, vae.memory_used_decode(one, vae.vae_dtype)))


def measured_bytes(settings, model_call, decode, base_model, vae, vae_module, cfg: float, x: torch.Tensor,
                   sigma: torch.Tensor) -> tuple[int, int]:
    """(model call, VAE decode): the bytes one particle's call of each keeps for its backward pass at this run's
    size, measured by running it once. A particle whose inference alone cannot fit is refused first, so that the
    measurement itself always fits."""
    plan_chunks(1, inference_bytes(base_model, cfg, vae, x.shape), 0, budget(x.device), lower=LOWER)
    net = base_model.diffusion_model
    blocks = ([b for blocks in block_lists(net).values() for b in blocks] if settings.block_checkpointing else [])
    x1 = x[:1].detach().clone().requires_grad_()
    with differentiable([net, vae_module], True):
        call = measure_pass(lambda x1: model_call(x1, sigma[:1].to(x1.device)), x1, blocks=blocks)
        dec = measure_pass(decode, x1)
    return call.peak, dec.peak


def particle_pass_bytes(settings, base_model, cfg: float, vae, spec, latent_shape, measured=None) -> int:
    """Bytes of one particle's pass through look-ahead, VAE decode and reward (with backward if steering; then
    `measured` is what measured_bytes returned)."""
    reward = reward_bytes(settings.reward)
    if not settings.needs_gradient():
        return inference_bytes(base_model, cfg, vae, latent_shape) + reward
    model_call, decode = measured
    return int(model_call * _kept_model_calls(spec) + decode + reward)


LOWER = ("use a cheaper look-ahead (fewer steps, checkpoint on), a TAESD VAE, block_checkpointing on, or mode "
         "zero_order (no gradients)")


def plan(settings, base_model, cfg: float, vae, spec, x, measured=None) -> MemoryPlan:
    """The chunk size for sampling `settings.particles` particles per latent of x, or FMTTMemoryError."""
    state = x[0].numel() * x.element_size() * STATE_COPIES
    return plan_chunks(settings.particles, particle_pass_bytes(settings, base_model, cfg, vae, spec, x.shape,
                                                               measured),
                       state, budget(x.device), settings.chunk_size or None, lower=LOWER)
