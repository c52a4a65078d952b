"""Nodes: FMTT Train Flow Map (distil the MODEL into a two-time flow map) and the look-ahead that loads what it
writes, for every family nodes/two_time.py supports."""
from __future__ import annotations

import json
import os
import re

import folder_paths
from comfy_api.latest import io, ui

from ..fmtt_core import FMTTInputError
from ..fmtt_core.flow_maps.trainer import DistillSettings
from .flow_map_training import Run, loss_plot, train, training_data, writer_for
from .folders import FLOW_MAPS, file_path
from .two_time import family_of
from .two_time_lookahead import load_lookahead
from .types import CATEGORY, Lookahead

# Which time pairs (s, t) are drawn: both orders (FMRG's recipe), or s < t only, the noise-to-data jumps FMTT's
# look-ahead takes (the map's whole capacity on them; on the tiny FLUX test model, 100 steps lowered the held-out
# 1-jump error 15% this way against ~1% with both orders).
BOTH_ORDERS = "both orders (FMRG)"
TIME_PAIRS = {BOTH_ORDERS: True, "noise to data": False}
RUNS = "fmtt_flow_map_runs"  # under ComfyUI's output directory: one folder of resumable state per run name


def run_dir(name: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), RUNS, name)


class TrainFlowMapNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTTrainFlowMap", display_name="FMTT Train Flow Map", category=CATEGORY,
            is_input_list=True, is_output_node=True,
            description="Distils the MODEL into a two-time flow map X(x; sigma -> sigma') (a LoRA beside the weights "
                        "and a second time embedder, Lagrangian self-distillation) for FMTT's look-ahead. Writes "
                        "models/fmtt_flow_maps/<name>.safetensors every save_every steps and keeps a resumable state "
                        "(Cancel included) in output/fmtt_flow_map_runs/<name>/.",
            inputs=[
                io.Model.Input("model", tooltip="The model to distil, as loaded (the one you will sample with)."),
                io.Conditioning.Input("positive", tooltip="The prompt (data-free), or one conditioning per dataset "
                                                          "image (Make Training Dataset's conditioning)."),
                io.String.Input("name", default="flow_map", tooltip="File name in models/fmtt_flow_maps/ and the "
                                                                     "run's state folder."),
                io.Int.Input("steps", default=500, min=1, max=1_000_000,
                             tooltip="Optimiser steps of the whole run (a resumed run may raise it)."),
                io.Int.Input("rank", default=16, min=1, max=256, tooltip="LoRA rank."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-7,
                               tooltip="AdamW learning rate (FMRG: 1e-4 at rank 64, 3e-4 at 256 px)."),
                io.Int.Input("batch_size", default=1, min=1, max=1024,
                             tooltip="Samples per step, each with its own time pair (s, t)."),
                io.Combo.Input("objective", options=["lsd", "psd"], default="lsd",
                               tooltip="lsd: Lagrangian self-distillation (FMRG's; finite-difference d/dt). psd: "
                                       "progressive (X_{s,t} = X_{m,t}(X_{s,m})), no derivative."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seeds the LoRA init, the data, noise and time draws (a run is reproducible)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="The guidance the map is distilled at; sample FMTT with the same cfg."),
                io.Int.Input("save_every", default=100, min=0, max=1_000_000,
                             tooltip="Steps between saves of the file and the resumable state (0: at the end)."),
                io.Int.Input("preview_every", default=50, min=0, max=1_000_000,
                             tooltip="Steps between previews: the teacher's 64-step result beside 1, 2 and 4 jumps "
                                     "(0: only at the start and the end)."),
                io.Boolean.Input("resume", default=False, tooltip="Continue the saved run of this name (optimiser, "
                                                                  "step and random state included)."),
                io.Int.Input("width", default=512, min=16, max=4096, step=8,
                             tooltip="Data-free only: image width of the samples the model makes."),
                io.Int.Input("height", default=512, min=16, max=4096, step=8,
                             tooltip="Data-free only: image height of the samples the model makes."),
                io.Int.Input("data_free_samples", default=64, min=1, max=100_000,
                             tooltip="Data-free only: how many samples the model makes to train on."),
                io.Boolean.Input("block_checkpointing", default=True,
                                 tooltip="Recompute transformer blocks in the backward pass (less memory)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Needed when cfg > 1."),
                io.Latent.Input("latents", optional=True, tooltip="Clean latents (Make Training Dataset, or VAE "
                                                                  "Encode); none: data-free from the prompt."),
                # Added after the first release: the last widget, optional, so saved workflows keep their values.
                io.Int.Input("accumulate", default=1, min=1, max=1024, optional=True,
                             tooltip="Gradient accumulation: each step runs batch_size in this many equal "
                                     "micro-batches (batch_size must be a multiple), the same update with the "
                                     "memory of one micro-batch."),
                io.Combo.Input("time_pairs", options=list(TIME_PAIRS), default=BOTH_ORDERS, optional=True,
                               tooltip="The jumps the map learns: both orders of (sigma, sigma'), as FMRG trains, or "
                                       "noise to data only, the jumps FMTT's look-ahead takes (all the capacity on "
                                       "them)."),
            ],
            outputs=[io.String.Output(display_name="flow_map", tooltip="The file's name in models/fmtt_flow_maps/."),
                     io.Image.Output(display_name="loss_plot", tooltip="The per-step loss (log scale)."),
                     io.String.Output(display_name="report", tooltip="JSON: losses and look-ahead errors.")])

    @classmethod
    def execute(cls, model, positive, name, steps, rank, learning_rate, batch_size, objective, seed, cfg, save_every,
                preview_every, resume, width, height, data_free_samples, block_checkpointing, negative=None,
                latents=None, accumulate=None, time_pairs=None) -> io.NodeOutput:
        one = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731  (is_input_list: scalars come as lists)
        model, name, cfg = one(model), one(name), float(one(cfg))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            raise FMTTInputError(f"FMTT Train Flow Map: name {name!r} must be letters, digits, '_', '-' or '.'.")
        family_of(model.model)  # an unsupported family is refused before anything runs
        negative = one(negative) if negative is not None else None
        if cfg != 1.0 and negative is None:
            raise FMTTInputError("FMTT Train Flow Map: cfg is not 1, so a negative conditioning is needed; connect "
                                 "one (or set cfg to 1).")
        data = training_data(latents, positive, negative, one(width), one(height),
                             model.model.latent_format.latent_channels, one(data_free_samples))
        state_dir = run_dir(name)
        state = os.path.join(state_dir, "state.safetensors")
        if one(resume) and not os.path.isfile(state):
            raise FMTTInputError(f"FMTT Train Flow Map: resume is on but no saved run '{name}' exists "
                                 f"({state}); turn resume off to start it.")
        if not one(resume) and os.path.isfile(state):
            raise FMTTInputError(f"FMTT Train Flow Map: a run named '{name}' already exists ({state_dir}); turn "
                                 "resume on to continue it, or choose another name.")
        os.makedirs(state_dir, exist_ok=True)
        flow_maps = folder_paths.get_folder_paths(FLOW_MAPS)[0]
        os.makedirs(flow_maps, exist_ok=True)
        settings = DistillSettings(objective=one(objective), steps=one(steps), batch=one(batch_size),
                                   accumulate=one(accumulate) if accumulate is not None else 1,
                                   lr=float(one(learning_rate)), seed=one(seed), save_every=one(save_every),
                                   preview_every=one(preview_every), log_every=1,
                                   both_directions=TIME_PAIRS[one(time_pairs) or BOTH_ORDERS])
        run = Run(settings, one(rank), cfg, data, os.path.join(flow_maps, f"{name}.safetensors"), state_dir,
                  state if one(resume) else None, block_checkpointing=one(block_checkpointing))
        run.writer = lambda adapter, base, meta, path: writer_for(adapter)(adapter, base, meta, path)
        report = train(model, run)
        summary = {"losses": report.losses, "lookahead_error": report.lookahead_error,
                   "eval_loss": report.eval_loss, "saved": report.saved,
                   "file": f"{name}.safetensors"}
        text = json.dumps(summary)
        return io.NodeOutput(f"{name}.safetensors", loss_plot(report.losses), text, ui=ui.PreviewText(text))


def flow_map_files() -> list[str]:
    return sorted(f for f in folder_paths.get_filename_list(FLOW_MAPS) if f.endswith(".safetensors"))


class TrainedFlowMapLookaheadNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTTrainedFlowMapLookahead", display_name="FMTT Look-ahead (trained flow map)",
            category=CATEGORY,
            description="Look-ahead with a flow map made by FMTT Train Flow Map for this model (SD1.5, SDXL, FLUX.1, "
                        "SD3, Z-Image): the sampled model with the map's LoRA and second time embedder, active only "
                        "during look-ahead calls; 1 model call per jump.",
            inputs=[io.Model.Input("model", tooltip="The model the map was trained on, as the sampler gets it."),
                    io.Combo.Input("flow_map", options=flow_map_files(),
                                   tooltip="A file FMTT Train Flow Map wrote to models/fmtt_flow_maps/."),
                    io.Int.Input("jumps", default=1, min=1, max=16,
                                 tooltip="Jumps from t to 1: 1 model call each (1: the one-step look-ahead)."),
                    io.Boolean.Input("checkpoint", default=False,
                                     tooltip="Recompute each jump in the backward pass (memory one jump deep).")],
            outputs=[Lookahead.Output(display_name="lookahead", tooltip="Connect to an FMTT sampler or to FMTT "
                                                                          "Flow-Map Sampler.")])

    @classmethod
    def execute(cls, model, flow_map, jumps, checkpoint) -> io.NodeOutput:
        return io.NodeOutput(load_lookahead(model, file_path(FLOW_MAPS, flow_map), jumps, checkpoint))


TRAINING_NODES = [TrainFlowMapNode, TrainedFlowMapLookaheadNode]
