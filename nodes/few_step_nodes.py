"""The node for few-step LoRAs (LCM, TCD, Lightning / Hyper-SD / Turbo) as look-aheads on the sampled model."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from .few_step_lora import CHOICES, load_lookahead
from .folders import file_path
from .types import CATEGORY, Lookahead

KIND_TOOLTIP = (
    "What the LoRA is, which decides how it is sampled. auto: from the file name or its metadata (lcm, tcd, "
    "lightning, hyper, turbo, ...). LCM: a consistency model, it predicts X_{t,1} directly (its own "
    "boundary-condition parameterisation), an approximate consistency map. TCD: an x0 prediction and a "
    "deterministic DDIM jump (gamma 0), an approximate two-time map. Lightning / Hyper-SD / Turbo: trained away "
    "from the teacher's ODE (adversarial / distribution matching), so the look-ahead is biased even where it "
    "looks sharp. None of them is the base model's flow map: keep the sampler's weights on twisted (exact) or "
    "auto, never eulerian.")


class FewStepLoRALookaheadNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTFewStepLoRALookahead", display_name="FMTT Look-ahead (few-step LoRA)", category=CATEGORY,
            description="Look-ahead with a few-step LoRA you already have (LCM-LoRA, TCD, Hyper-SD, SDXL-Lightning, "
                        "Turbo, ...) on the model being sampled: k steps from t to the image, the LoRA applied beside "
                        "the weights in the look-ahead's calls only. No second model in memory, the MODEL stays "
                        "untouched for the base sampler. An approximate look-ahead, not a flow map: the paper "
                        "found a few-step model's look-ahead (FLUX.1-schnell) its strongest practical choice, but "
                        "a cheap few-step best-of-N is the baseline to beat.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL being sampled (the same one goes to the FMTT sampler)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A few-step LoRA for this model's family from models/loras/ (kohya, "
                                       "diffusers / peft or ComfyUI naming: what LoraLoader accepts)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="LoRA strength (1.0: as trained), as LoraLoader's strength_model."),
                io.Int.Input("steps", default=4, min=1, max=16,
                             tooltip="Steps from t to the image, 1 model call each (and its backward). Step-distilled "
                                     "LoRAs (Lightning '4step', Hyper-SD '8steps') are best at their own count; LCM "
                                     "and TCD work at any."),
                io.Combo.Input("kind", options=CHOICES, default="auto", tooltip=KIND_TOOLTIP),
                io.Boolean.Input("checkpoint", default=True,
                                 tooltip="Recompute each step in the backward pass instead of storing activations: "
                                         "memory stays one step deep."),
            ],
            outputs=[Lookahead.Output(display_name="lookahead",
                                      tooltip="An approximate look-ahead: connect to an FMTT sampler "
                                              "(weights twisted or auto, never eulerian).")])

    @classmethod
    def execute(cls, model, lora_name, strength, steps, kind, checkpoint) -> io.NodeOutput:
        path = file_path("loras", lora_name)
        return io.NodeOutput(load_lookahead(model, path, os.path.basename(lora_name), strength, steps, kind,
                                            checkpoint))


FEW_STEP_NODES = [FewStepLoRALookaheadNode]
