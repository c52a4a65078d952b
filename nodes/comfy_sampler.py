"""The FMTT sampler as a ComfyUI SAMPLER: a KSAMPLER function that hands the sampling to fmtt_core.

ComfyUI calls `fn(model, x, sigmas, extra_args, callback, disable)` with x the noised latent batch at sigmas[0].
Each latent of the batch becomes one population of particles: particle 0 starts from ComfyUI's own noise (so
one particle with no reward is the plain sampler), the others from noise seeded by (noise seed, batch index,
particle index). fmtt_core runs the tilted SDE; this module only converts clocks, sizes the chunks to the free
memory, wires progress, previews and interrupts, collects what went wrong for the user, and picks which
particles to hand back.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass

import comfy.model_management
import comfy.samplers
import comfy.utils
import numpy as np
import torch
from comfy_execution.utils import get_executing_context
from server import PromptServer

from ..fmtt_core import FMTTInputError, fmtt_sample
from ..fmtt_core.finite import FMTTNonFiniteError, require_finite
from ..fmtt_core.particles import SPREAD
from . import memory_guard, multigpu
from .autograd import differentiable, normal_tensor
from .clocks import clock_of, core_denoiser, family_of, guided_parts
from .decoding import vae_decoder
from .finite_outputs import explain
from .lookahead_specs import BaseModelLookahead, describe

STREAM_NOISE, STREAM_SAMPLER, STREAM_PICK = 0, 1, 2
# A final latent this many times farther from 0 than the starting noise's largest value is outside anything the
# model produces (normal results stay within about 2x); the reward pushed it there.
FAR_OUT = 10.0


def ksampler(settings) -> comfy.samplers.KSAMPLER:
    """The SAMPLER that runs FMTT with these settings (checked first: a bad setting fails before any work)."""
    settings.check()
    return comfy.samplers.KSAMPLER(lambda *a, **k: sample_fmtt(settings, *a, **k))


def particle_seed(seed: int, batch_index: int, stream: int, particle: int = 0) -> int:
    """Independent, reproducible seeds from the noise seed, per latent in the batch, random stream (initial
    noise, the sampler's SDE noise and resampling, the final pick) and particle."""
    words = np.random.SeedSequence([int(seed) % 2**64, batch_index, stream, particle]).generate_state(2, np.uint32)
    return (int(words[0]) << 32 | int(words[1])) >> 1


def _max_denoise(base_model, sigma0: float) -> bool:
    max_sigma = float(base_model.model_sampling.sigma_max)
    return math.isclose(max_sigma, sigma0, rel_tol=1e-5) or sigma0 > max_sigma


def latent_model_fn(model, extra_args: dict, b: int):
    """ComfyUI's model call restricted to latent b of the batch: its inpainting noise, latent and mask broadcast
    over the particles. `model` is the KSamplerX0Inpaint a SAMPLER function receives."""
    view = comfy.samplers.KSamplerX0Inpaint(model.inner_model, model.sigmas)
    pick = lambda t: None if t is None else normal_tensor(t[b % t.shape[0]:b % t.shape[0] + 1])  # noqa: E731
    view.latent_image, view.noise = pick(model.latent_image), pick(getattr(model, "noise", None))
    mask = pick(extra_args.get("denoise_mask"))
    options, seed = extra_args.get("model_options", {}), extra_args.get("seed")
    return lambda xc, sigma: view(xc, sigma, denoise_mask=mask, model_options=options, seed=seed)


def initial_particles(model, x: torch.Tensor, b: int, n: int, seed: int, base_model, sigma0: float) -> torch.Tensor:
    """n starting particles [n, ...] for latent b at sigma0, in ComfyUI's x space: ComfyUI's own noised latent
    first (so one particle is exactly ComfyUI's run), then noise seeded per particle from the noise seed."""
    x = normal_tensor(x)
    latent = model.latent_image[b:b + 1] if model.latent_image is not None else torch.zeros_like(x[:1])
    rows = [x[b:b + 1]]
    for p in range(1, n):
        g = torch.Generator().manual_seed(particle_seed(seed, b, STREAM_NOISE, p))
        noise = torch.randn(x.shape[1:], generator=g, dtype=torch.float32).unsqueeze(0).to(x.device, x.dtype)
        rows.append(base_model.model_sampling.noise_scaling(torch.tensor(sigma0).to(x.device), noise,
                                                            latent.to(x.device), _max_denoise(base_model, sigma0)))
    return torch.cat(rows)


@dataclass
class Sampling:
    """One call of the SAMPLER: what every population of the batch shares."""

    settings: object
    model: object          # ComfyUI's KSamplerX0Inpaint around the guider
    x: torch.Tensor        # the noised latent batch at sigmas[0]
    sigmas: torch.Tensor   # float32, on the CPU
    clock: object
    base_model: object
    decode: object
    spec: object           # the look-ahead spec
    extra_args: dict
    seed: int
    chunk_size: int
    on_step: object        # progress / preview / interrupt, called after each step
    replicas: list | None = None  # per device models when the particles are spread over MultiGPU clones
    pool: object = None           # ComfyUI's MultiGPUThreadPool for those devices

    @property
    def times(self) -> torch.Tensor:
        return self.clock.t(self.sigmas).double()

    def run(self, companion=None) -> torch.Tensor:
        """Sample every latent of the batch; returns the picked particles, in ComfyUI's x space."""
        outputs = [self.population(b, companion) for b in range(self.x.shape[0])]
        with torch.inference_mode(False):
            # At t = 1 both clocks agree with the core's: x = x_lin = x1.
            return torch.cat(outputs).to(self.x.device, self.x.dtype)

    def population(self, b: int, companion) -> torch.Tensor:
        s, diag = self.settings, self.settings.diagnostics
        denoiser = core_denoiser(latent_model_fn(self.model, self.extra_args, b), self.clock)
        with torch.inference_mode(False):
            x_init = self.clock.to_linear(
                initial_particles(self.model, self.x, b, self.settings.particles, self.seed, self.base_model,
                                  float(self.sigmas[0])),
                self.sigmas[0].to(self.x.device))
        spread = self._spread(b, denoiser)
        token = SPREAD.set(spread)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fmtt_sample(denoiser, x_init, self.times, reward=s.reward,
                                     lookahead=self.spec.build(denoiser, companion), decoder=self.decode,
                                     config=s.config(particle_seed(self.seed, b, STREAM_SAMPLER), self.chunk_size),
                                     callback=lambda info: self.on_step(b, info))
        finally:
            SPREAD.reset(token)
        if spread is not None:
            diag.devices = spread.describe()
        diag.runs.append(result)
        similar = {}  # the core warns per step: one line per kind of warning, with how often it came
        for w in caught:
            if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("FMTT"):
                similar.setdefault(re.sub(r"\d[\d.e+-]*", "#", str(w.message)), []).append(str(w.message))
            else:  # not ours: hand it on as if it had not been caught
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for texts in similar.values():
            diag.warn(f"[{b}] {texts[0]}" + (f" (and {len(texts) - 1} more step(s) alike)" if len(texts) > 1 else ""))
        self._check_range(b, result.samples, x_init)
        k = 1 if s.output == "best" else s.output_count
        picked = result.pick({"weighted_resample": "resample"}.get(s.output, s.output), k=k,
                             seed=particle_seed(self.seed, b, STREAM_PICK))
        return picked.detach()

    def _spread(self, b: int, denoiser):
        """The particles' spread over the MultiGPU devices for latent b (None: all on this device)."""
        if not self.replicas:
            return None
        denoisers = [denoiser if rep.unit.main else
                     core_denoiser(latent_model_fn(*multigpu.device_call(self.model, self.extra_args, rep.unit), b),
                                   self.clock)
                     for rep in self.replicas]
        return multigpu.Spread(self.replicas, denoisers, self.pool, self.settings.needs_gradient())

    def _check_range(self, b: int, samples: torch.Tensor, x_init: torch.Tensor) -> None:
        """Flag final particles that are not finite or far outside the range of anything the model makes."""
        reach = samples.detach().float().flatten(1).abs().amax(1)
        scale = float(x_init.detach().float().abs().max())
        bad = ~torch.isfinite(reach) | (reach > FAR_OUT * scale)
        if bad.any():
            finite = reach[torch.isfinite(reach)]
            largest = f"{float(finite.max()):.3g}" if finite.numel() else "not finite"
            self.settings.diagnostics.warn(
                f"[{b}] {int(bad.sum())} of {reach.numel()} final particles are far outside the model's range "
                f"(largest |x| {largest}, the starting noise reaches {scale:.3g}): the steering blew them up. "
                "Lower reward_scale or eta, use more steps, or set grad_clip.")


def sample_fmtt(settings, model, x, sigmas, extra_args=None, callback=None, disable=None):
    started = time.perf_counter()
    extra_args = dict(extra_args or {})
    guider, base_model = guided_parts(model)
    clock = clock_of(base_model.model_sampling, family_of(base_model))
    if float(sigmas[-1]) != 0.0:
        raise FMTTInputError("FMTT: the sigmas must end at 0 (the sampler has to reach the data end to score "
                             "samples). Connect the full schedule, or the low half of SplitSigmas.")
    sig = sigmas.detach().float().cpu()
    decode, vae_module = vae_decoder(settings.vae, base_model)
    spec = settings.lookahead if settings.lookahead is not None else BaseModelLookahead("denoiser")
    cfg = float(getattr(guider, "cfg", 1.0))
    # Measured on the main device alone: ComfyUI's MultiGPU path would send the probe to a clone under no_grad.
    one_device = {**extra_args, "model_options": multigpu.without_multigpu(extra_args.get("model_options", {}))}
    measured = memory_guard.measured_bytes(settings, spec, latent_model_fn(model, one_device, 0), decode, base_model,
                                           settings.vae, vae_module, cfg, x, sigmas)
    plan = memory_guard.plan(settings, base_model, cfg, settings.vae, spec, x, measured)
    diag = settings.diagnostics
    diag.reset({**settings.summary(), "lookahead": describe(settings.lookahead)}, sig, str(plan))
    options = extra_args.get("model_options", {})
    replicas, pool = None, None
    if any(key in options for key in multigpu.MULTIGPU_KEYS):
        # ComfyUI's own MultiGPU path splits conds over devices under torch.no_grad() (the tilt gradient would
        # vanish): every model call FMTT makes goes to one device's BaseModel, and FMTT spreads the particles.
        extra_args["model_options"] = multigpu.without_multigpu(options)
        units = multigpu.units(guider, options)
        why = (multigpu.spreadable(spec, settings.reward) if len(units) > 1
               else "ComfyUI loaded no MultiGPU clone for this run")
        if why is None:
            replicas = multigpu.replicas(units, settings, spec, base_model, decode, vae_module)
            pool = options.get("multigpu_thread_pool")
        else:
            diag.warn(f"MultiGPU: every particle runs on the main device, because {why} (results are the same as "
                      "without MultiGPU).")
    steps = len(sigmas) - 1
    pbar = None if callback is not None else comfy.utils.ProgressBar(steps * x.shape[0])

    def on_step(b, info):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:  # ComfyUI's preview callback: progress bar and latent preview
            callback({"i": info["step"], "denoised": info["denoised"][:1].detach(), "x": info["x"][:1].detach(),
                      "sigma": sig[info["step"]], "sigma_hat": sig[info["step"]]})
        elif pbar is not None:
            pbar.update_absolute(b * steps + info["step"] + 1, steps * x.shape[0])

    run = Sampling(settings, model, x, sig, clock, base_model, decode, spec, extra_args,
                   int(extra_args.get("seed") or 0), plan.chunk_size, on_step, replicas, pool)
    base_modules = ([base_model.diffusion_model, vae_module] + list(spec.modules())
                    + [m for rep in replicas or [] for m in rep.modules])

    def body(companion=None, companion_modules=()):
        with differentiable(base_modules + list(companion_modules), settings.needs_gradient(),
                            settings.block_checkpointing), contextlib.ExitStack() as devices:
            for rep in replicas or []:
                devices.enter_context(rep.prepared())
            return run.run(companion)

    try:
        out = spec.run_with(base_model, x, sigmas, run.seed, body)
        require_finite("step", out, 1.0)  # a picked particle that blew up is an error, never a result
        return out
    except FMTTNonFiniteError as err:
        raise explain(err, getattr(guider, "cfg", None), spec) from None
    finally:
        diag.seconds = time.perf_counter() - started
        _announce(diag)


def _announce(diag) -> None:
    """Show this run's warnings where the user looks: on the node that ran the sampling (ComfyUI's progress text
    under the node) and in the console; the diagnostics summary and plot list them too."""
    if not diag.warnings:
        return
    text = "FMTT warnings:\n" + "\n".join(diag.warnings)
    logging.warning(text)
    context = get_executing_context()
    if context is not None and getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_progress_text(text, context.node_id)
