"""A reference for the FLUX two-time flow-map LoRA that nobody on this team wrote: diffusers' FluxTransformer2DModel,
FMRG's DualTimeEmbedder, a peft LoRA saved by diffusers' own FluxPipeline.save_lora_weights and loaded back by
diffusers' own loader (what FMRG's `pipeline.load_lora_weights` runs). Used by tests/test_flux_flow_map_lora.py
(CI, no ComfyUI) and by tests/integration/tiny_flux_flow_map.py (inside the integration suite's ComfyUI python).

Needs diffusers and peft (the `test` extra). Tiny sizes match tests/integration/tiny_models.py's Flux, so the same
files also drive the workflow runs there.

`DualTimeEmbedder` below is copied from FMRG, github.com/jrrhuang/fmrg, flux_two_timestep/dual_time_embedder.py
(Copyright the FMRG authors, Apache License 2.0, http://www.apache.org/licenses/LICENSE-2.0); the print call and a
commented-out line are left out, nothing else is changed. It is test code only and not shipped in the pack.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

# The tiny FLUX of tests/integration/tiny_models.py in diffusers' terms: hidden 128 = 1 head x 128, patch 2 (the
# 64 = 16 x 2 x 2 packed channels), context 64, pooled 32, RoPE axes (16, 56, 56), one double and one single block.
TINY = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=1, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
# Every kind of layer ComfyUI maps differently: split q / k / v into fused qkv (double and single blocks), the MLP
# part of the single block's linear1, the final layer's swapped scale / shift, and all embedders of both times.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
           "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out", "norm1.linear",
           "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder", "context_embedder",
           "timestep_embedder.linear_1", "timestep_embedder.linear_2", "guidance_embedder.linear_1",
           "guidance_embedder.linear_2", "text_embedder.linear_1", "text_embedder.linear_2"]


class DualTimeEmbedder(torch.nn.Module):
    def __init__(self, original_embedder):
        super().__init__()
        self.original_embedder = original_embedder
        self.second_embedder = copy.deepcopy(original_embedder)

    def forward(self, timestep, guidance, pooled_projections):
        # Check if timestep is a tuple of two inputs
        if timestep.shape[-1] == 2 and len(timestep.shape) >= 2:
            t1, t2 = timestep.unbind(dim=-1)
            # Embed both timesteps
            emb1 = self.original_embedder(t1, guidance, pooled_projections)
            emb2 = self.second_embedder(t2, guidance, pooled_projections)
            # Combine them (e.g., average)
            return (emb1 + emb2) / 2
        # Fallback for standard single timestep
        return self.original_embedder(timestep, guidance, pooled_projections)


def add_dual_time_embedder(single_time_flux_transformer):
    single_time_flux_transformer.time_text_embed = DualTimeEmbedder(single_time_flux_transformer.time_text_embed)
    return single_time_flux_transformer


def init_(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Random weights of a moderate size (diffusers' default init leaves a near-constant tiny model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # RMSNorm / LayerNorm scales near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else max(p.numel(), 1)
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in ** 0.5 * (3 if p.ndim > 1 else 0.3))
    return module


def smooth_in_time(transformer, cutoff: float = 10.0):
    """Damp the timestep embedder's weights on the sinusoids of the time that oscillate faster than `cutoff` rad per
    unit sigma, as training leaves a real FLUX: its velocity varies smoothly with sigma. FLUX embeds 1000 sigma with
    frequencies up to 1 (1000 rad per unit sigma); random weights on all of them make the tiny teacher's velocity a
    rough random function of time (|dv/dsigma| ~ 13 |v| measured, against ~0.1 |v| after this), whose flow map
    neither exists smoothly nor can be distilled from finite differences in t (FMRG's step 5e-3)."""
    linear = transformer.time_text_embed.timestep_embedder.linear_1
    half = linear.in_features // 2  # [cos, sin] of 1000 sigma * 10000^(-i / half), i < half (diffusers, ComfyUI)
    freq = 1000 * torch.exp(-math.log(10000) * torch.arange(half) / half)
    with torch.no_grad():
        linear.weight.mul_(torch.exp(-(freq / cutoff) ** 2).repeat(2))
    return transformer


def tiny_transformer(seed: int = 11):
    from diffusers import FluxTransformer2DModel
    return smooth_in_time(init_(FluxTransformer2DModel(**TINY), seed)).eval()


def save_flow_map_lora(transformer, path: Path, rank: int = 4, alpha: float = 8.0, seed: int = 12,
                       targets=TARGETS, lora_bias: bool = False) -> Path:
    """Wrap a copy of `transformer` as FMRG does, add a random peft LoRA and save it with diffusers'
    FluxPipeline.save_lora_weights (peft names, `transformer.` prefix, LoraConfig in the metadata).
    lora_bias: peft's LoraConfig(lora_bias=True), a bias on every B matrix (random, like B)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    model = add_dual_time_embedder(copy.deepcopy(transformer))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_bias=lora_bias,
                        init_lora_weights=True if lora_bias else "gaussian")  # peft allows lora_bias with True only
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts lora_B at zero: a random B makes every layer count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = Path(path)
    FluxPipeline.save_lora_weights(path.parent, transformer_lora_layers=get_peft_model_state_dict(model),
                                   weight_name=path.name, transformer_lora_adapter_metadata=config.to_dict())
    return path


def save_plain_lora(transformer, path: Path, seed: int = 13) -> Path:
    """An ordinary FLUX LoRA (no dual time embedder), saved the same way: the 'not a flow-map LoRA' case."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    model = copy.deepcopy(transformer)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "proj_mlp"])
    model.add_adapter(config)
    path = Path(path)
    FluxPipeline.save_lora_weights(path.parent, transformer_lora_layers=get_peft_model_state_dict(model),
                                   weight_name=path.name, transformer_lora_adapter_metadata=config.to_dict())
    return path


def load_like_fmrg(transformer, path: Path):
    """FMRG's loading: add_dual_time_embedder, then the LoRA through diffusers' Flux LoRA loader (the steps of
    FluxPipeline.load_lora_weights, which needs a whole pipeline instance; the classmethods are the same code)."""
    from diffusers import FluxPipeline
    model = add_dual_time_embedder(copy.deepcopy(transformer))
    state, alphas, metadata = FluxPipeline.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=model, metadata=metadata)
    return model.eval()


def conditioning(seed: int, tokens: int = 4):
    """The random Flux conditioning of the integration suite's FMTTTestConditioning node (same draws)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, 64, generator=g), torch.randn(1, 32, generator=g)


def reference_jump(model, x: torch.Tensor, sigma, sigma_next, context, pooled, guidance: float = 3.5):
    """X(z; sigma -> sigma') = z + (sigma' - sigma) u(z, sigma, sigma') with diffusers' FLUX, as FMRG computes it:
    packed latents, timestep = stack([sigma, sigma'], -1) (the pipeline's t / 1000), unpacked velocity."""
    from diffusers import FluxPipeline
    b, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(b)
    sigma_next = torch.as_tensor(sigma_next, dtype=x.dtype).expand(b)
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    u = model(hidden_states=packed, timestep=torch.stack([sigma, sigma_next], dim=-1),
              guidance=torch.full((b,), guidance), pooled_projections=pooled.expand(b, -1),
              encoder_hidden_states=context.expand(b, -1, -1), txt_ids=torch.zeros(context.shape[1], 3),
              img_ids=img_ids, return_dict=False)[0]
    u = FluxPipeline._unpack_latents(u, h * 8, w * 8, 8)
    return x + (sigma_next - sigma).view(-1, 1, 1, 1) * u
