"""The memory guard: what one particle costs in this run, from ComfyUI's own memory estimates, and the chunk size
that fits the free memory of the device the sampling runs on (the CPU's free RAM on a CPU).

One particle's pass, with the reward gradient, holds the activations of every model call the backward pass goes
through (the look-ahead's, and the denoiser's when the look-ahead builds on it), of the VAE decode and of the
reward; without the gradient only one call's. ComfyUI's estimates are for inference (model.memory_required,
vae.memory_used_decode); a backward pass keeps a multiple of that, BACKWARD_KEEPS below. The arithmetic and the
refusal live in fmtt_core.memory.
"""
from __future__ import annotations

import os

import comfy.model_management

from ..fmtt_core.memory import MiB, MemoryPlan, plan_chunks
from .bridge import BLOCK_LISTS

BUDGET_VAR = "FMTT_MEMORY_BUDGET_MB"  # caps the budget (a shared machine, a test); unset: all that is free
BACKWARD_KEEPS = 6.0        # activations a backward pass keeps, in units of the inference peak ComfyUI estimates
BACKWARD_KEEPS_BLOCKS = 2.0  # the same with block checkpointing: block inputs plus one block recomputed
STATE_COPIES = 8            # particle-sized tensors a step keeps per particle (x, D, gradient, noise, ODE step, ...)
REWARD_FLOOR = 16 * MiB     # the least a reward pass is assumed to cost per image


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


def particle_pass_bytes(settings, base_model, cfg: float, vae, spec, latent_shape) -> int:
    """Bytes of one particle's pass through look-ahead, VAE decode and reward (with backward if steering)."""
    one = [1, *latent_shape[1:]]
    model = base_model.memory_required(one) * (2 if cfg != 1.0 else 1)  # cfg evaluates two conditionings
    decode = vae.memory_used_decode(one, vae.vae_dtype)
    reward = reward_bytes(settings.reward)
    if not settings.needs_gradient():
        return int(max(model, decode) + reward)
    blocks = settings.block_checkpointing and any(getattr(base_model.diffusion_model, n, None) for n in BLOCK_LISTS)
    keeps = BACKWARD_KEEPS_BLOCKS if blocks else BACKWARD_KEEPS
    return int(model * keeps * _kept_model_calls(spec) + decode * BACKWARD_KEEPS + reward)


def plan(settings, base_model, cfg: float, vae, spec, x) -> MemoryPlan:
    """The chunk size for sampling `settings.particles` particles per latent of x, or FMTTMemoryError."""
    state = x[0].numel() * x.element_size() * STATE_COPIES
    lower = ("use a cheaper look-ahead (fewer steps, checkpoint on), a TAESD VAE, block_checkpointing on, or "
             "mode zero_order (no gradients)")
    return plan_chunks(settings.particles, particle_pass_bytes(settings, base_model, cfg, vae, spec, x.shape),
                       state, budget(x.device), settings.chunk_size or None, lower=lower)
