"""The memory guard: what one particle costs in this run, and the chunk size that fits the free memory of the
device the sampling runs on (the CPU's free RAM on a CPU).

One particle's pass, with the reward gradient, holds the activations of every model call the backward pass goes
through (the look-ahead's, and the denoiser's when the look-ahead builds on it), of the VAE decode and of the
reward. Those are measured, not guessed: one particle's model call, VAE decode, reward (and a flow-map file's
network) run forward and backward once before sampling, and autograd says what they keep
(fmtt_core.memory.measure_pass); how many model calls the backward pass holds at once follows from how the
look-ahead runs (fmtt_core.memory.held_calls). Without the gradient a pass keeps one call's inference activations:
ComfyUI's own estimates (model.memory_required, vae.memory_used_decode), and the measured reward. The arithmetic and
the refusal live in fmtt_core.memory.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import comfy.model_management
import torch

from ..fmtt_core.memory import HeldCalls, MemoryPlan, MiB, held_calls, measure_pass, particle_pass, plan_chunks
from .autograd import block_lists, differentiable, normal_tensor

BUDGET_VAR = "FMTT_MEMORY_BUDGET_MB"  # caps the budget (a shared machine, a test); unset: all that is free
STATE_COPIES = 8            # particle-sized tensors a step keeps per particle (x, D, gradient, noise, ODE step, ...)


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


def lookahead_calls(spec) -> HeldCalls:
    """fmtt_core.memory.held_calls for a look-ahead spec: its network calls per particle (Heun's corrector is
    skipped on the last step) and whether it builds on the sampler's D (the denoiser and the base model's ODE)."""
    kind = getattr(spec, "kind", "denoiser")
    if kind == "denoiser":
        return held_calls(1, True, False)
    steps = int(getattr(spec, "jumps", getattr(spec, "steps", 1)))
    calls = 2 * steps - 1 if getattr(spec, "solver", "euler") == "heun" else steps
    return held_calls(calls, kind == "ode", bool(getattr(spec, "checkpoint", False)))


def lookahead_network(spec):
    """The look-ahead's own network when it runs one instead of the sampled model (a flow-map file), else None."""
    return getattr(spec, "network", None)


def inference_bytes(base_model, cfg: float, vae, latent_shape) -> int:
    """ComfyUI's estimate of one particle's model call and VAE decode without gradients."""
    one = [1, *latent_shape[1:]]
    model = base_model.memory_required(one) * (2 if cfg != 1.0 else 1)  # cfg evaluates two conditionings
    return int(max(model, vae.memory_used_decode(one, vae.vae_dtype)))


@dataclass(frozen=True)
class Measured:
    """Bytes one particle's forward + backward pass of each part holds at this run's size (measure_pass)."""

    model_call: int    # one call of the sampled model, cfg included (0 without the reward gradient)
    decode: int        # the VAE decode (0 without the reward gradient)
    reward: int        # the reward on one decoded image
    network_call: int  # one call of the look-ahead's own network (0 when it runs the sampled model)


def measured_bytes(settings, spec, model_call, decode, base_model, vae, vae_module, cfg: float, x: torch.Tensor,
                   sigma: torch.Tensor) -> Measured:
    """What one particle's model call, VAE decode, reward and look-ahead network keep for their backward pass at
    this run's size, measured by running each once (without the reward gradient only the reward is measured, an
    upper bound of its inference). A particle whose inference alone cannot fit is refused first, so that the
    measurement itself always fits."""
    plan_chunks(1, inference_bytes(base_model, cfg, vae, x.shape), 0, budget(x.device), lower=LOWER)
    net, own = base_model.diffusion_model, lookahead_network(spec)
    blocks = ([b for blocks in block_lists(net).values() for b in blocks] if settings.block_checkpointing else [])
    call = dec = network = 0
    with differentiable([net, vae_module] + list(spec.modules()), True):
        # made here, outside inference mode: an inference tensor would take no part in autograd (nothing measured)
        x1 = normal_tensor(x[:1]).requires_grad_()
        t1 = normal_tensor(sigma[:1]).to(x1.device)
        if settings.needs_gradient():
            call = measure_pass(lambda x1: model_call(x1, t1), x1, blocks=blocks).peak
            dec = measure_pass(decode, x1).peak
            if own is not None:
                flow_map = spec.build(None).flow_map
                s, t = torch.zeros(1, device=x1.device), torch.ones(1, device=x1.device)
                network = measure_pass(lambda x1: flow_map(x1, s, t), x1).peak
        with torch.no_grad():
            image = decode(x1)
        reward = measure_pass(settings.reward, image.detach().requires_grad_()).peak
    return Measured(call, dec, reward, network)


def particle_pass_bytes(settings, base_model, cfg: float, vae, spec, latent_shape, measured: Measured) -> int:
    """Bytes of one particle's pass through look-ahead, VAE decode and reward: with the reward gradient, the
    measured parts as the backward pass holds them (fmtt_core.memory.particle_pass); without it, ComfyUI's inference
    estimate of a model call and a decode, and the measured reward."""
    if not settings.needs_gradient():
        return inference_bytes(base_model, cfg, vae, latent_shape) + measured.reward
    latent = math.prod(latent_shape[1:]) * 4  # a checkpointed call keeps float32 inputs
    return particle_pass(measured.network_call or measured.model_call, lookahead_calls(spec), latent, measured.decode,
                         measured.reward)


LOWER = ("use a cheaper look-ahead (fewer steps, checkpoint on), a TAESD VAE, block_checkpointing on, or mode "
         "zero_order (no gradients)")


def plan(settings, base_model, cfg: float, vae, spec, x, measured: Measured) -> MemoryPlan:
    """The chunk size for sampling `settings.particles` particles per latent of x, or FMTTMemoryError."""
    state = x[0].numel() * x.element_size() * STATE_COPIES
    return plan_chunks(settings.particles, particle_pass_bytes(settings, base_model, cfg, vae, spec, x.shape,
                                                               measured),
                       state, budget(x.device), settings.chunk_size or None, lower=LOWER)
