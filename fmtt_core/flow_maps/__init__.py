"""Flow maps X_{s,t}: the one home of the file formats and the jump math, shared by the core, the ComfyUI nodes
and the tests (torch only).

conv_resnet     the pack's own flow-map file format ("fmtt flow map v1")
two_time_lora   two-time flow-map LoRAs for FLUX (FMRG's DualTimeEmbedder + diffusers LoRA): key inspection,
                classification of wrong files, LoRA scales
jumps           X(z; sigma -> sigma') = z + (sigma' - sigma) u and its core-clock form
distill         distillation losses that teach a two-time student the teacher's flow (LSD, PSD), time pairs
trainer         the resumable (and data-parallel) distillation loop shared by `fmtt distill` and the node
"""
from .conv_resnet import ARCHITECTURE, ConvFlowMap, FlowMapFileError, load_flow_map, save_flow_map
from .distill import (
    derivative_warmup,
    diagonal_loss,
    flow_map_from_student,
    lsd_loss,
    psd_loss,
    sample_time_pairs,
    shift_time,
)
from .jumps import average_embeddings, jump_from_denoiser, sigma_jump
from .trainer import DistillSettings, FlowMapTrainer
from .two_time_lora import FORMATS, FlowMapLoRAError, LoraLayer, TwoTimeLoRA, family_of, inspect_two_time_lora

__all__ = [
    "ConvFlowMap", "FlowMapFileError", "load_flow_map", "save_flow_map", "ARCHITECTURE",
    "sigma_jump", "jump_from_denoiser", "average_embeddings",
    "sample_time_pairs", "lsd_loss", "psd_loss", "diagonal_loss", "derivative_warmup", "flow_map_from_student",
    "shift_time", "DistillSettings", "FlowMapTrainer",
    "inspect_two_time_lora", "TwoTimeLoRA", "LoraLayer", "FlowMapLoRAError", "FORMATS", "family_of",
]
