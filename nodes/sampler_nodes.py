"""Sampler, look-ahead and diagnostics nodes. The sampling itself is fmtt_core's (through comfy_sampler.py);
the FMTT settings' widgets come from the table in settings.py."""
from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..fmtt_core.flow_maps import load_flow_map
from . import diagnostics as diag
from .comfy_sampler import ksampler
from .folders import FLOW_MAPS, file_path
from .lookahead_specs import BaseModelLookahead, CompanionModelLookahead, FlowMapFileLookahead
from .settings import fmtt_inputs, settings_from
from .types import CATEGORY, Lookahead, SamplerDiagnostics

LOOKAHEAD_OUT = "The look-ahead X_t,1(x): where a particle at time t is predicted to land. Connect to an FMTT sampler."


class FMTTSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTSampler", display_name="FMTT Sampler", category=CATEGORY,
            description="Flow Map Trajectory Tilting as a SAMPLER for SamplerCustomAdvanced / SamplerCustom: "
                        "reward-steered particles with a look-ahead, importance weights and resampling.",
            inputs=fmtt_inputs(),
            outputs=[io.Sampler.Output(display_name="sampler",
                                       tooltip="Connect to SamplerCustomAdvanced (or SamplerCustom)."),
                     SamplerDiagnostics.Output(display_name="diagnostics",
                                               tooltip="Connect to FMTT Diagnostics to see what the steering did.")])

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        settings = settings_from(kwargs)
        return io.NodeOutput(ksampler(settings), settings.diagnostics)


class FMTTKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTKSampler", display_name="FMTT KSampler", category=CATEGORY,
            description="All-in-one: the usual KSampler widgets plus FMTT reward steering. Works for txt2img and, "
                        "with denoise < 1 on an encoded image, for img2img / editing.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion / flow model to sample."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed; every particle's noise and the sampler's randomness derive from "
                                     "it (same seed, same result)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (1.0 for FLUX with its guidance embedding)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="simple",
                               tooltip="Sigma schedule."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (unused at cfg 1)."),
                io.Latent.Input("latent_image", tooltip="Empty latent for txt2img, or an encoded image with "
                                                        "denoise < 1 for img2img / editing."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the schedule to run; < 1 keeps the input image's structure."),
                *fmtt_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The selected particles' latents."),
                     io.Image.Output(display_name="diagnostics_plot",
                                     tooltip="Reward, ESS and resampling events over the steps."),
                     io.String.Output(display_name="summary", tooltip="Text summary with the NFE breakdown.")])

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise,
                **kwargs) -> io.NodeOutput:
        if denoise <= 0:
            raise ValueError("FMTT KSampler: denoise is 0, nothing to sample; use a value in (0, 1].")
        settings = settings_from(kwargs)
        sampler = ksampler(settings)  # checks the settings before any work
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"],
                                                         latent_image.get("downscale_ratio_spacial"),
                                                         latent_image.get("downscale_ratio_temporal"))
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        total = int(steps / denoise)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
        sigmas = sigmas[-(steps + 1):]
        callback = latent_preview.prepare_callback(model, steps)
        samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                             noise_mask=latent_image.get("noise_mask"), callback=callback,
                                             disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = {k: v for k, v in latent_image.items()
               if k not in ("samples", "batch_index", "downscale_ratio_spacial", "downscale_ratio_temporal")}
        out["samples"] = samples
        return io.NodeOutput(out, diag.plot(settings.diagnostics), diag.summary(settings.diagnostics))


class FMTTDiagnostics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTDiagnostics", display_name="FMTT Diagnostics", category=CATEGORY, is_output_node=True,
            description="Shows what the FMTT sampler did on its last run: reward, ESS and resampling events per "
                        "step, and the NFE breakdown.",
            inputs=[SamplerDiagnostics.Input("diagnostics", tooltip="From the FMTT Sampler node."),
                    io.Latent.Input("samples", tooltip="The sampler's output latent: makes this node run after "
                                                       "the sampling it reports on.")],
            outputs=[io.Image.Output(display_name="plot", tooltip="Reward, ESS and resampling events over steps."),
                     io.String.Output(display_name="summary", tooltip="Text summary with the NFE breakdown.")])

    @classmethod
    def execute(cls, diagnostics, samples) -> io.NodeOutput:
        image, text = diag.plot(diagnostics), diag.summary(diagnostics)
        return io.NodeOutput(image, text, ui={**ui.PreviewImage(image, cls=cls).as_dict(),
                                              **ui.PreviewText(text).as_dict()})


class BaseLookaheadNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTBaseModelLookahead", display_name="FMTT Look-ahead (base model)", category=CATEGORY,
            description="Look-ahead from the model being sampled: its denoiser (1 call, the paper's baseline) or "
                        "k ODE steps (k calls and their backward; closer to the true flow map).",
            inputs=[
                io.Combo.Input("kind", options=["ode", "denoiser"], default="ode",
                               tooltip="ode: k probability-flow ODE steps from t to 1; denoiser: D(x, t)."),
                io.Int.Input("steps", default=4, min=1, max=64, tooltip="ODE steps (ode only)."),
                io.Combo.Input("solver", options=["euler", "heun"], default="euler",
                               tooltip="ODE solver (ode only); heun costs about twice the calls."),
                io.Boolean.Input("checkpoint", default=True,
                                 tooltip="Recompute each step in the backward pass instead of storing activations: "
                                         "memory stays one step deep."),
            ],
            outputs=[Lookahead.Output(display_name="lookahead", tooltip=LOOKAHEAD_OUT)])

    @classmethod
    def execute(cls, kind, steps, solver, checkpoint) -> io.NodeOutput:
        return io.NodeOutput(BaseModelLookahead(kind, steps, solver, checkpoint))


class CompanionLookaheadNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTCompanionLookahead", display_name="FMTT Look-ahead (companion model)", category=CATEGORY,
            description="Look-ahead with a few-step model sharing the latent space (FLUX.1-schnell for FLUX.1-dev, "
                        "the SDXL-Lightning / Turbo UNet for SDXL), run for k steps with its own conditioning.",
            inputs=[
                io.Model.Input("model", tooltip="The companion model (same latent space as the sampled model)."),
                io.Conditioning.Input("positive", tooltip="The companion's conditioning (encode the prompt with "
                                                          "its text encoder)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative conditioning for the companion (only used with cfg > 1)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="The companion's guidance scale (1.0 for distilled models)."),
                io.Int.Input("steps", default=4, min=1, max=64, tooltip="Companion steps from t to 1."),
                io.Combo.Input("solver", options=["euler", "heun"], default="euler", tooltip="ODE solver."),
                io.Boolean.Input("checkpoint", default=True,
                                 tooltip="Recompute each step in the backward pass (memory one step deep)."),
            ],
            outputs=[Lookahead.Output(display_name="lookahead", tooltip=LOOKAHEAD_OUT)])

    @classmethod
    def execute(cls, model, positive, cfg, steps, solver, checkpoint, negative=None) -> io.NodeOutput:
        return io.NodeOutput(CompanionModelLookahead(model, positive, negative, cfg, steps, solver, checkpoint))


class FlowMapLookaheadNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTFlowMapLookahead", display_name="FMTT Look-ahead (flow map file)", category=CATEGORY,
            description="Look-ahead with a learned two-time flow map X_s,t from models/fmtt_flow_maps/ (the pack's "
                        "safetensors format, see the README).",
            inputs=[
                io.Combo.Input("flow_map", options=folder_paths.get_filename_list(FLOW_MAPS),
                               tooltip="A flow-map file in models/fmtt_flow_maps/."),
                io.Int.Input("jumps", default=1, min=1, max=64, tooltip="Jumps from t to 1 (1: one network call)."),
                io.Boolean.Input("checkpoint", default=False,
                                 tooltip="Recompute jumps in the backward pass (useful with several jumps)."),
            ],
            outputs=[Lookahead.Output(display_name="lookahead", tooltip=LOOKAHEAD_OUT)])

    @classmethod
    def execute(cls, flow_map, jumps, checkpoint) -> io.NodeOutput:
        with torch.inference_mode(False):
            net = load_flow_map(file_path(FLOW_MAPS, flow_map)).to(comfy.model_management.get_torch_device())
        return io.NodeOutput(FlowMapFileLookahead(net, flow_map, jumps, checkpoint))


SAMPLER_NODES = [FMTTSampler, FMTTKSampler, FMTTDiagnostics, BaseLookaheadNode, CompanionLookaheadNode,
                 FlowMapLookaheadNode]
