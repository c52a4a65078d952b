"""Few-step sampling with a flow map, as a ComfyUI SAMPLER: x_{k+1} = X(x_k; sigma_k -> sigma_{k+1}) along the
connected sigmas (4 steps: 4 model calls), optionally best of N candidates by a reward.

It is the flow map's own baseline (one / few jumps from noise, no steering) and the quickest check that a flow-map
LoRA loaded correctly: a wrong LoRA gives noise or a blur in 4 steps, where the base model would need ~28.
"""
from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch

from ..fmtt_core import FlowMapLookahead, FMTTInputError
from ..fmtt_core.finite import FMTTNonFiniteError, broke_every, require_finite
from .clocks import clock_of, core_denoiser, guided_parts
from .comfy_sampler import initial_particles, latent_model_fn
from .decoding import vae_decoder
from .finite_outputs import explain
from .lookahead_specs import LookaheadSpec


def check_spec(spec) -> None:
    if not isinstance(spec, LookaheadSpec) or spec.kind != "flow_map":
        raise FMTTInputError("FMTT Flow-Map Sampler: connect a flow-map look-ahead (FMTT Look-ahead (FLUX flow-map "
                             "LoRA) or FMTT Look-ahead (flow map file)); base-model and companion look-aheads are "
                             "not flow maps.")


def sample_flow_map(spec, candidates, reward, vae, model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = dict(extra_args or {})
    seed = int(extra_args.get("seed") or 0)
    guider, base_model = guided_parts(model)
    clock = clock_of(base_model.model_sampling)
    if clock.kind != "flow":
        raise FMTTInputError("FMTT Flow-Map Sampler: the model is not a flow model; flow-map LoRAs are for FLUX.")
    if candidates > 1 and (reward is None or vae is None):
        raise FMTTInputError("FMTT Flow-Map Sampler: best of N (candidates > 1) needs the reward and vae inputs.")
    decode = vae_decoder(vae, base_model)[0] if candidates > 1 else None
    times = clock.t(sigmas.detach().float().cpu()).tolist()
    steps = len(times) - 1
    pbar = comfy.utils.ProgressBar(steps * x.shape[0]) if callback is None else None

    def body(companion=None, companion_modules=()):
        outputs = []
        for b in range(x.shape[0]):
            look = spec.build(core_denoiser(latent_model_fn(model, extra_args, b), clock), companion)
            if not isinstance(look, FlowMapLookahead):
                raise FMTTInputError("FMTT Flow-Map Sampler: the look-ahead is not a flow map.")
            z = initial_particles(model, x, b, candidates, seed, base_model, float(sigmas[0]))
            require_finite("particles", z, times[0])
            for k in range(steps):
                z_next = look.flow_map(z, torch.tensor(times[k]), torch.tensor(times[k + 1]))
                require_finite("lookahead", z_next, times[k])  # every jump: a few steps leave no room for NaN
                if callback is not None:
                    callback({"i": k, "denoised": z_next[:1], "x": z[:1], "sigma": sigmas[k], "sigma_hat": sigmas[k]})
                elif pbar is not None:
                    pbar.update(1)
                z = z_next
            if candidates > 1:  # best of N by the reward of the decoded images
                images = decode(z)
                require_finite("decoder", images, 1.0)
                scores = torch.nan_to_num(reward(images).reshape(-1).float(), nan=-float("inf"), posinf=-float("inf"))
                if not torch.isfinite(scores).any():
                    raise broke_every("reward", candidates, 1.0)
                z = z[int(scores.argmax())][None]
            outputs.append(z)
        return torch.cat(outputs).to(x.dtype)

    try:
        return spec.run_with(base_model, x, sigmas, seed, body)
    except FMTTNonFiniteError as err:
        raise explain(err, getattr(guider, "cfg", None), spec) from None


def flow_map_sampler(spec, candidates=1, reward=None, vae=None) -> comfy.samplers.KSAMPLER:
    check_spec(spec)
    return comfy.samplers.KSAMPLER(lambda *a, **k: sample_flow_map(spec, candidates, reward, vae, *a, **k))
