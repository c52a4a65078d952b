"""The FMTT sampler as a ComfyUI SAMPLER: a KSAMPLER function that hands the sampling to fmtt_core.

ComfyUI calls `fn(model, x, sigmas, extra_args, callback, disable)` with x the noised latent batch at sigmas[0].
Each latent of the batch becomes one population of particles: particle 0 starts from ComfyUI's own noise (so
one particle with no reward is the plain sampler), the others from noise seeded by (noise seed, batch index,
particle index). fmtt_core runs the tilted SDE; this module only converts clocks, wires progress, previews
and interrupts, and picks which particles to hand back.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..fmtt_core import FMTTConfig, FMTTInputError, LinearTilt, RampTilt, fmtt_sample
from .bridge import (clock_of, core_denoiser, differentiable, guided_parts, normal_tensor, vae_decoder)
from .lookahead import BaseModelLookahead, CompanionModelLookahead, describe

OUTPUTS = ("best", "top_k", "weighted_resample")


@dataclass
class Diagnostics:
    """Filled by the sampler each time it runs; read by the diagnostics node (FMTT_DIAGNOSTICS)."""

    runs: list = field(default_factory=list)  # one fmtt_core FMTTResult per population
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    sigmas: list = field(default_factory=list)

    def reset(self, settings: dict, sigmas) -> None:
        self.runs, self.settings, self.seconds, self.sigmas = [], settings, 0.0, [float(s) for s in sigmas]


@dataclass(eq=False)
class FMTTSettings:
    reward: object
    vae: object
    lookahead: object = None
    mode: str = "exact"
    particles: int = 4
    reward_scale: float = 1.0
    eta: float = 1.0
    ess_threshold: float = 0.5
    resampling: str = "systematic"
    tilt_ramp: float = 1.0
    chunk_size: int = 0
    grad_clip: float = 0.0
    search_steps: int = 3
    search_keep: int = 0
    weights: str = "auto"
    block_checkpointing: bool = True
    output: str = "best"
    output_count: int = 1
    diagnostics: Diagnostics = field(default_factory=Diagnostics)

    def check(self) -> None:
        if self.particles < 1:
            raise FMTTInputError(f"FMTT: particles must be >= 1, got {self.particles}.")
        if self.output not in OUTPUTS:
            raise FMTTInputError(f"FMTT: output must be one of {OUTPUTS}, got {self.output!r}.")
        if self.output == "top_k" and not 1 <= self.output_count <= self.particles:
            raise FMTTInputError(f"FMTT: output_count ({self.output_count}) must be between 1 and the number of "
                                 f"particles ({self.particles}) for output 'top_k'.")
        if self.reward is None or not callable(self.reward):
            raise FMTTInputError("FMTT: the reward input is not an FMTT reward; connect an FMTT reward node.")
        if self.lookahead is not None and not hasattr(self.lookahead, "build"):
            raise FMTTInputError("FMTT: the lookahead input is not an FMTT look-ahead; connect an FMTT look-ahead node.")

    def config(self, seed: int) -> FMTTConfig:
        return FMTTConfig(
            mode=self.mode, reward_scale=self.reward_scale, eta=self.eta, ess_threshold=self.ess_threshold,
            resampling=self.resampling, tilt=LinearTilt() if self.tilt_ramp >= 1 else RampTilt(self.tilt_ramp),
            chunk_size=self.chunk_size or None, grad_clip=self.grad_clip or None, search_steps=self.search_steps,
            search_keep=self.search_keep or None, weights=self.weights, seed=seed)

    def summary(self) -> dict:
        """The settings as plain values, for the diagnostics."""
        skip = ("reward", "vae", "lookahead", "diagnostics")
        out = {k: v for k, v in vars(self).items() if k not in skip}
        out["lookahead"] = describe(self.lookahead)
        out["reward"] = getattr(self.reward, "name", type(self.reward).__name__)
        return out

    def needs_gradient(self) -> bool:
        return self.mode != "zero_order" and self.reward_scale > 0 and self.eta > 0

    def sampler(self) -> comfy.samplers.KSAMPLER:
        self.check()
        return comfy.samplers.KSAMPLER(lambda *a, **k: sample_fmtt(self, *a, **k))


STREAM_NOISE, STREAM_SAMPLER, STREAM_PICK = 0, 1, 2


def particle_seed(seed: int, batch_index: int, stream: int, particle: int = 0) -> int:
    """Independent, reproducible seeds from the noise seed, per latent in the batch, random stream (initial
    noise, the sampler's SDE noise and resampling, the final pick) and particle."""
    words = np.random.SeedSequence([int(seed) % 2**64, batch_index, stream, particle]).generate_state(2, np.uint32)
    return (int(words[0]) << 32 | int(words[1])) >> 1


def _max_denoise(base_model, sigma0: float) -> bool:
    max_sigma = float(base_model.model_sampling.sigma_max)
    return math.isclose(max_sigma, sigma0, rel_tol=1e-5) or sigma0 > max_sigma


def _population(model, x, b, n, seed, sigma0, base_model):
    """Particles [n, ...] for latent b at sigma0, in ComfyUI's x space."""
    latent = model.latent_image[b:b + 1] if model.latent_image is not None else torch.zeros_like(x[b:b + 1])
    rows = [x[b:b + 1]]
    for p in range(1, n):
        g = torch.Generator().manual_seed(particle_seed(seed, b, STREAM_NOISE, p))
        noise = torch.randn(x.shape[1:], generator=g, dtype=torch.float32).unsqueeze(0).to(x.device, x.dtype)
        rows.append(base_model.model_sampling.noise_scaling(torch.tensor(sigma0).to(x.device), noise,
                                                             latent.to(x.device), _max_denoise(base_model, sigma0)))
    return torch.cat(rows)


def _inpaint_view(model, b):
    """The model's inpainting wrapper restricted to latent b: noise, latent and mask broadcast over particles."""
    view = comfy.samplers.KSamplerX0Inpaint(model.inner_model, model.sigmas)
    pick = lambda t: None if t is None else normal_tensor(t[b % t.shape[0]:b % t.shape[0] + 1])  # noqa: E731
    view.latent_image, view.noise = pick(model.latent_image), pick(getattr(model, "noise", None))
    return view, pick


def sample_fmtt(settings: FMTTSettings, model, x, sigmas, extra_args=None, callback=None, disable=None):
    started = time.perf_counter()
    extra_args = dict(extra_args or {})
    seed = int(extra_args.get("seed") or 0)
    guider, base_model = guided_parts(model)
    clock = clock_of(base_model.model_sampling)
    if float(sigmas[-1]) != 0.0:
        raise FMTTInputError("FMTT: the sigmas must end at 0 (the sampler has to reach the data end to score "
                             "samples). Connect the full schedule, or the low half of SplitSigmas.")
    sig = sigmas.detach().float().cpu()
    times = clock.t(sig).double()
    decode, vae_module = vae_decoder(settings.vae, base_model)
    settings.diagnostics.reset(settings.summary(), sig)
    steps = len(sigmas) - 1
    pbar = None if callback is not None else comfy.utils.ProgressBar(steps)
    spec = settings.lookahead if settings.lookahead is not None else BaseModelLookahead("denoiser")
    base_modules = [base_model.diffusion_model, vae_module] + list(getattr(spec, "modules", lambda: [])())

    def body(companion=None, companion_modules=()):
        with differentiable(base_modules + list(companion_modules), settings.needs_gradient(),
                            settings.block_checkpointing):
            return _run_populations(settings, model, x, sig, times, clock, base_model, decode, spec, companion,
                                    extra_args, seed, callback, pbar)

    if hasattr(spec, "to"):
        spec.to(x.device)
    if isinstance(spec, CompanionModelLookahead):
        out = spec.run_with(base_model, x.shape, sigmas, seed, body)
    else:
        out = body()
    settings.diagnostics.seconds = time.perf_counter() - started
    return out


def _run_populations(settings, model, x, sig, times, clock, base_model, decode, spec, companion, extra_args, seed,
                     callback, pbar):
    outputs = []
    model_options = extra_args.get("model_options", {})
    mask = extra_args.get("denoise_mask")
    steps = len(times) - 1
    for b in range(x.shape[0]):
        view, pick = _inpaint_view(model, b)
        mask_b = pick(mask)

        def model_fn(xc, sigma, view=view, mask_b=mask_b):
            return view(xc, sigma, denoise_mask=mask_b, model_options=model_options, seed=extra_args.get("seed"))

        denoiser = core_denoiser(model_fn, clock)
        lookahead = spec.build(denoiser, companion)
        with torch.inference_mode(False):
            x_init = clock.to_linear(_population(model, normal_tensor(x), b, settings.particles, seed,
                                                 float(sig[0]), base_model), sig[0].to(x.device))

        def on_step(info):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if callback is not None:  # ComfyUI's preview callback: progress bar and latent preview
                callback({"i": info["step"], "denoised": info["denoised"][:1].detach(), "x": info["x"][:1].detach(),
                          "sigma": sig[info["step"]], "sigma_hat": sig[info["step"]]})
            elif pbar is not None:
                pbar.update_absolute(info["step"] + 1, steps)

        result = fmtt_sample(denoiser, x_init, times, reward=settings.reward, lookahead=lookahead, decoder=decode,
                             config=settings.config(particle_seed(seed, b, STREAM_SAMPLER)), callback=on_step)
        settings.diagnostics.runs.append(result)
        k = 1 if settings.output == "best" else settings.output_count
        picked = result.pick({"weighted_resample": "resample"}.get(settings.output, settings.output), k=k,
                             seed=particle_seed(seed, b, STREAM_PICK))
        outputs.append(picked.detach())
    with torch.inference_mode(False):
        # At t = 1 both clocks agree with the core's: x = x_lin = x1.
        return torch.cat(outputs).to(x.device, x.dtype)
