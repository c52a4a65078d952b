"""Tiny FLUX flow-map LoRA files and their diffusers reference, for the integration suite (run with ComfyUI's python,
called by tiny_models.py).

Writes, under BASE_DIR:
  models/diffusion_models/tiny_flux_dev_fm.safetensors  a diffusers tiny FluxTransformer2DModel converted to ComfyUI's
                                                        Flux layout with ComfyUI's own mapping (flux_to_diffusers)
  models/loras/tiny_flux_flowmap_lora.safetensors       FMRG-style two-time LoRA for it, saved by diffusers
  models/loras/tiny_flux_style_lora.safetensors         an ordinary FLUX LoRA (bad-input case)
  models/loras/tiny_sdxl_lora.safetensors               a LoRA with SDXL key names (bad-input case)
  models/loras/tiny_truncated_lora.safetensors          the flow-map LoRA cut in half (bad-input case)
  models/diffusion_models/tiny_sd3_not_flux.safetensors an SD3-style MMDiT, detected as SD3 (the non-FLUX MODEL case)
  fmtt_reference/flux_flow_map.safetensors              inputs and diffusers' X(x; sigma -> sigma') for the comparison
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
COND_SEED = 21
# (latent H, W, batch, [(sigma, sigma'), ...]): both resolutions' packing, two batch sizes, jumps of every length.
CASES = [((4, 4), 1, [(1.0, 0.0), (0.8, 0.3), (0.55, 0.5), (0.3, 0.0)]),
         ((4, 4), 3, [(0.9, 0.2), (0.6, 0.6)]),
         ((6, 8), 2, [(1.0, 0.0), (0.7, 0.4)])]
CHAIN = (0.9, 0.6, 0.3, 0.0)  # three equal jumps in t from t = 0.1 to 1: the look-ahead with jumps = 3


def to_comfy(diffusers_sd: dict, unet_config: dict) -> dict:
    """A diffusers FLUX state dict in ComfyUI's layout, by ComfyUI's own key map (row slices of fused qkv and
    linear1 are concatenated; the final layer's scale / shift go through ComfyUI's swap function)."""
    import comfy.utils
    key_map = comfy.utils.flux_to_diffusers(unet_config, output_prefix="")
    out, fused = {}, {}
    for k, v in diffusers_sd.items():
        target = key_map[k]
        if isinstance(target, str):
            out[target] = v
        elif target[1] is None:
            out[target[0]] = target[2](v)
        else:
            fused.setdefault(target[0], {})[target[1][1]] = v
    for k, parts in fused.items():
        out[k] = torch.cat([parts[o] for o in sorted(parts)])
    return out


def not_flux():
    """An SD3-style MMDiT that ComfyUI's loader detects as SD3 (16 latent channels, patch 2, depth 2); only loaded,
    never run. The same layout as the model-family suite's tiny SD3.5."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ops
    net = mmdit.MMDiT(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=32,
                      context_embedder_config={"target": "torch.nn.Linear",
                                               "params": {"in_features": 64, "out_features": 128}},
                      pos_embed_max_size=16, num_patches=256, qk_norm="rms", pos_embed_scaling_factor=None,
                      operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            t.zero_()
    return net


def build(base: Path) -> None:
    import comfy.ldm.flux.model
    import comfy.ops
    from safetensors.torch import save_file

    from fmtt_testing import flux_flow_map_reference as ref
    models = base / "models"
    for sub in ("diffusion_models", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    diffusers_model = ref.tiny_transformer()
    config = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                  hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                  theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    comfy_model = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **config)
    comfy_model.load_state_dict(to_comfy(diffusers_model.state_dict(), config), strict=True)
    save_file({k: v.contiguous() for k, v in comfy_model.state_dict().items()},
              models / "diffusion_models" / "tiny_flux_dev_fm.safetensors")

    save_file(not_flux().state_dict(), models / "diffusion_models" / "tiny_sd3_not_flux.safetensors")
    lora = ref.save_flow_map_lora(diffusers_model, models / "loras" / "tiny_flux_flowmap_lora.safetensors")
    ref.save_plain_lora(diffusers_model, models / "loras" / "tiny_flux_style_lora.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)},
              models / "loras" / "tiny_sdxl_lora.safetensors")
    data = lora.read_bytes()
    (models / "loras" / "tiny_truncated_lora.safetensors").write_bytes(data[: len(data) * 2 // 3])

    model = ref.load_like_fmrg(diffusers_model, lora)
    context, pooled = ref.conditioning(COND_SEED)
    g = torch.Generator().manual_seed(22)
    tensors, cases = {}, []
    with torch.no_grad():
        for size, batch, pairs in CASES:
            for sigma, sigma_next in pairs:
                i = len(cases)
                tensors[f"x{i}"] = x = torch.randn(batch, 16, *size, generator=g)
                tensors[f"want{i}"] = ref.reference_jump(model, x, sigma, sigma_next, context, pooled)
                cases.append({"sigma": sigma, "sigma_next": sigma_next})
        x = torch.randn(2, 16, 4, 4, generator=g)
        tensors["chain_x"], z = x, x
        for sigma, sigma_next in zip(CHAIN[:-1], CHAIN[1:]):
            z = ref.reference_jump(model, z, sigma, sigma_next, context, pooled)
        tensors["chain_want"] = z
    (base / "fmtt_reference").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, base / "fmtt_reference" / "flux_flow_map.safetensors",
              {"cases": json.dumps(cases), "chain": json.dumps(CHAIN), "cond_seed": str(COND_SEED)})
