"""Nodes for flow-map LoRAs: the FLUX two-time flow-map LoRA as a look-ahead, and few-step flow-map sampling."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .flow_map_sampler import flow_map_sampler
from .folders import FLOW_MAPS, file_path
from .two_time_lookahead import load_lookahead
from .types import CATEGORY, Lookahead, Reward

LORA_FOLDERS = (FLOW_MAPS, "loras")


def lora_files() -> list[str]:
    """Flow-map LoRAs from models/fmtt_flow_maps/ and models/loras/ (.safetensors only)."""
    names = {f for folder in LORA_FOLDERS for f in folder_paths.get_filename_list(folder)}
    return sorted(f for f in names if f.endswith(".safetensors"))


def lora_path(name: str) -> str:
    for folder in LORA_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    return file_path(FLOW_MAPS, name)  # raises the error naming both folders' fix


class FluxFlowMapLookaheadNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTFluxFlowMapLookahead", display_name="FMTT Look-ahead (FLUX flow-map LoRA)",
            category=CATEGORY,
            description="Look-ahead with FLUX.1-dev's two-time flow-map LoRA (FMRG, gabeguofanclub/"
                        "flux-1-dev-flowmap-lsd): X(x; sigma -> 0) from the sampled model with the LoRA and a second "
                        "time embedder, 1 model call per jump. The MODEL stays untouched for the base sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.1-dev MODEL, as the sampler gets it (same model)."),
                io.Combo.Input("lora_name", options=lora_files(),
                               tooltip="The flow-map LoRA (pytorch_lora_weights.safetensors, renamed) in "
                                       "models/fmtt_flow_maps/ or models/loras/."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="LoRA strength (1.0: as trained). Other values give no exact flow map."),
                io.Int.Input("jumps", default=1, min=1, max=16,
                             tooltip="Jumps from t to 1: 1 model call each (1: the paper's one-step look-ahead)."),
                io.Boolean.Input("checkpoint", default=False,
                                 tooltip="Recompute each jump in the backward pass (memory one jump deep)."),
            ],
            outputs=[Lookahead.Output(display_name="lookahead",
                                      tooltip="A flow map of the base model: connect to an FMTT sampler (Eulerian "
                                              "weights) or to FMTT Flow-Map Sampler.")])

    @classmethod
    def execute(cls, model, lora_name, strength, jumps, checkpoint) -> io.NodeOutput:
        path = lora_path(lora_name)
        return io.NodeOutput(load_lookahead(model, path, jumps, checkpoint, strength))


class FlowMapSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTFlowMapSampler", display_name="FMTT Flow-Map Sampler", category=CATEGORY,
            description="Few-step sampling with a flow map for SamplerCustomAdvanced: one jump per step of the "
                        "connected sigmas (4 steps = 4 model calls), optionally the best of N candidates by a reward.",
            inputs=[
                Lookahead.Input("flow_map", tooltip="A flow-map look-ahead: FMTT Look-ahead (FLUX flow-map LoRA) "
                                                    "or (flow map file)."),
                io.Int.Input("candidates", default=1, min=1, max=256,
                             tooltip="Best of N: candidates per latent, each from its own noise (N x steps model "
                                     "calls); the one with the highest reward is kept. 1: plain few-step sampling."),
                Reward.Input("reward", optional=True, tooltip="Scores the candidates (needed when candidates > 1)."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the candidates for the reward."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="Connect to SamplerCustomAdvanced.")])

    @classmethod
    def execute(cls, flow_map, candidates, reward=None, vae=None) -> io.NodeOutput:
        return io.NodeOutput(flow_map_sampler(flow_map, candidates, reward, vae))


FLOW_MAP_NODES = [FluxFlowMapLookaheadNode, FlowMapSamplerNode]
