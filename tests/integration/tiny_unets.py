"""Tiny random SD1.5 / SDXL UNets, an SD3.5 MMDiT and a Z-Image NextDiT, built with ComfyUI's own classes so that
its loaders detect them as those families (run with ComfyUI's python, after tiny_models.py has filled the same base
directory):

    python tiny_unets.py COMFYUI_PATH BASE_DIR

ComfyUI recognises a UNet by exact values (comfy/supported_models.py): SD1.5 needs model_channels 320 and
context_dim 768; SDXL needs model_channels 320, context_dim 2048, adm_in_channels 2816 and per-input-block
transformer depths [0, 0, 2, 2, 10, 10]. Everything else is free, so these models keep those and shrink the rest:
one resolution level for SD1.5, channel_mult [1, 1, 1] and no attention in the decoder for SDXL (~0.1 B
parameters, stored in float16). SD3 is recognised by an MMDiT layout with 16 input channels; its width is
64 x depth, here depth 2.

Writes, under BASE_DIR/models:
  checkpoints/tiny_sd15.safetensors          SD1.5 UNet + a 4-channel TAESD as its VAE (CheckpointLoaderSimple)
  checkpoints/tiny_sdxl.safetensors          SDXL UNet + a 4-channel TAESD as its VAE
  diffusion_models/tiny_sd15_unet.safetensors  the SD1.5 UNet alone (UNETLoader)
  diffusion_models/tiny_sd35.safetensors     an SD3.5-style MMDiT (RMS q/k norm), for UNETLoader
  diffusion_models/tiny_zimage.safetensors   a Z-Image NextDiT at width 256, its config in the metadata (ComfyUI
                                             detects Z-Image at width 3840 only): FMTTTestZImageLoader loads it
  diffusion_models/tiny_sd15_ip2p_unet.safetensors  the SD1.5 UNet with 8 input channels: ComfyUI detects it as
                                             SD15_instructpix2pix, a family the flow-map trainer does not support
  loras/tiny_sdxl_lightning.safetensors      a rank-4 LoRA on the SDXL UNet's attention (a "Lightning" LoRA)
  diffusion_models/tiny_sdxl_lightning_unet.safetensors  the SDXL UNet with that LoRA merged (a Lightning UNet)
and BASE_DIR/input/tiny_dataset/: three 64x64 images (the flow-map training workflow's dataset folder).
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _tiny_models():
    spec = importlib.util.spec_from_file_location("fmtt_tiny_models", HERE / "tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unet(family: str, seed: int, in_channels: int = 4):
    """A random UNet that ComfyUI detects as `family` ("sd15" or "sdxl"; with in_channels 8, its InstructPix2Pix
    variant)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules import openaimodel
    common = dict(image_size=32, in_channels=in_channels, out_channels=4, model_channels=320,
                  use_spatial_transformer=True, legacy=False, operations=comfy.ops.disable_weight_init)
    if family == "sd15":
        net = openaimodel.UNetModel(**common, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                                    transformer_depth_output=[1, 1], transformer_depth_middle=0, context_dim=768,
                                    use_linear_in_transformer=False, num_heads=8, num_head_channels=-1)
    elif family == "sdxl":
        net = openaimodel.UNetModel(**common, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1],
                                    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0] * 9,
                                    transformer_depth_middle=-1, context_dim=2048, use_linear_in_transformer=True,
                                    adm_in_channels=2816, num_classes="sequential", num_head_channels=64)
    else:
        raise ValueError(family)
    return _tiny_models().init_(net, seed, scale=0.2)


def mmdit(seed: int):
    """A random SD3.5-style MMDiT: 16 latent channels, patch 2, depth 2 (width 128), RMS q/k norm; text context of
    64 features and a pooled vector of 32 (the shapes of the test conditioning node)."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_module
    import comfy.ops
    net = mmdit_module.MMDiT(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=32,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
        pos_embed_max_size=16, num_patches=256, qk_norm="rms", pos_embed_scaling_factor=None,
        operations=comfy.ops.disable_weight_init)
    _tiny_models().init_(net, seed, scale=0.2)
    with torch.no_grad():  # a buffer, left empty by the class (real checkpoints store it): SD3's sin-cos table
        table = mmdit_module.get_2d_sincos_pos_embed(net.hidden_size, 16)
        net.pos_embed.copy_(torch.from_numpy(table).float().unsqueeze(0))
    smooth_in_time(net.t_embedder.mlp[0], timestep_per_sigma=1000.0)
    return net


# A Z-Image NextDiT (ComfyUI's model_detection values for dim 3840: heads of 128 channels, RoPE axes [32, 48, 48],
# theta 256, FFN x 8/3, Z-Image's 256-wide time modulation, t_embedder((1 - timestep) x 1000)) at width 256 (the
# smallest the 256-wide modulation allows), 2 heads, 2 layers (and ComfyUI's default 2 + 2 refiner layers), a
# 64-feature caption. ComfyUI detects Z-Image only at dim 3840, so the file carries this config in its metadata and
# the test node FMTTTestZImageLoader builds ComfyUI's ZImage model from it (family_test_nodes.py).
ZIMAGE_CONFIG = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 64,
                 "n_layers": 2, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [32, 48, 48],
                 "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
                 "z_image_modulation": True, "time_scale": 1000.0}


def zimage(seed: int):
    """A random Z-Image NextDiT of ZIMAGE_CONFIG, with its RMSNorm weights near 1 and a time embedder smooth in
    time (smooth_in_time: Z-Image's timestep is sigma, its embedder reads (1 - sigma) x 1000)."""
    import comfy.ldm.lumina.model
    import comfy.ops
    net = comfy.ldm.lumina.model.NextDiT(**ZIMAGE_CONFIG, operations=comfy.ops.disable_weight_init)
    _tiny_models().init_(net, seed, scale=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.RMSNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
    smooth_in_time(net.t_embedder.mlp[0], timestep_per_sigma=ZIMAGE_CONFIG["time_scale"])
    return net


def smooth_in_time(first: torch.nn.Linear, timestep_per_sigma: float, bandwidth: float = 10.0, gain: float = 30.0):
    """Make a random time embedder (sinusoids of the timestep -> `first` -> ...) behave like a trained one: a trained
    model's velocity is smooth in time, and depends on it. A random first layer reads every sinusoid alike, and the
    fastest turn ~1 radian per timestep unit (1000 per unit sigma): the tiny SD3's velocity then swings at a scale of
    ~0.005 in sigma, |dv/dsigma| / |v| ~ 15, which the flow-map trainer's finite difference (step 5e-3) cannot
    resolve (it reads 2.5x too low), and the model is no teacher a flow map can be distilled from. Here each
    frequency w (radians per unit sigma) is read with weight gain * exp(-(w / bandwidth)^2): |dv/dsigma| / |v| ~ 3.6
    (SD3) and ~ 9 (Z-Image), and the finite difference agrees with the derivative to 3 digits."""
    with torch.no_grad():
        half = first.weight.shape[1] // 2  # [cos | sin] of the same frequencies (flip_sin_to_cos or not)
        w = torch.exp(-math.log(10000) * torch.arange(half) / half) * timestep_per_sigma
        window = gain * torch.exp(-(w / bandwidth) ** 2)
        first.weight.mul_(torch.cat([window, window]).to(first.weight))


def lora(state_dict: dict, seed: int, rank: int = 4) -> dict:
    """A kohya-format LoRA (lora_unet_*) on every attention projection of a UNet, strong enough to change it."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in state_dict.items():
        if ".attn" in key and key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight")) and w.ndim == 2:
            name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
            out[name + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
            out[name + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.05
            out[name + ".alpha"] = torch.tensor(float(rank))
    return out


def merged(state_dict: dict, lora_sd: dict) -> dict:
    """The UNet with the LoRA merged in (W + alpha / rank * up @ down): a separate few-step checkpoint, as
    SDXL-Lightning is also distributed (sdxl_lightning_4step_unet.safetensors)."""
    out = dict(state_dict)
    for key in state_dict:
        name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
        if name + ".lora_up.weight" in lora_sd:
            up, down = lora_sd[name + ".lora_up.weight"], lora_sd[name + ".lora_down.weight"]
            out[key] = state_dict[key] + float(lora_sd[name + ".alpha"]) / down.shape[0] * up @ down
    return out


def checkpoint(net: torch.nn.Module, vae: torch.nn.Module) -> dict:
    """The single-file layout CheckpointLoaderSimple reads (no text encoder: the tests bring their conditioning)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in net.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    return sd


def half(sd: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


def main(comfy_path: str, base: str):
    sys.path.insert(0, comfy_path)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    from safetensors.torch import save_file
    models = Path(base) / "models"
    for sub in ("checkpoints", "diffusion_models", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    taesd = _tiny_models().taesd(4, 4)  # the same tiny 4-channel TAESD as vae/tiny_taesd_4ch.safetensors
    sd15 = unet("sd15", 11)
    save_file(checkpoint(sd15, taesd), models / "checkpoints" / "tiny_sd15.safetensors")
    save_file(sd15.state_dict(), models / "diffusion_models" / "tiny_sd15_unet.safetensors")
    sdxl = unet("sdxl", 12)
    save_file(half(checkpoint(sdxl, taesd)), models / "checkpoints" / "tiny_sdxl.safetensors")
    lightning = lora(sdxl.state_dict(), 13)
    save_file(lightning, models / "loras" / "tiny_sdxl_lightning.safetensors")
    save_file(half(merged(sdxl.state_dict(), lightning)),
              models / "diffusion_models" / "tiny_sdxl_lightning_unet.safetensors")
    save_file(mmdit(14).state_dict(), models / "diffusion_models" / "tiny_sd35.safetensors")
    save_file(zimage(16).state_dict(), models / "diffusion_models" / "tiny_zimage.safetensors",
              {"fmtt.tiny_zimage": json.dumps(ZIMAGE_CONFIG)})
    save_file(unet("sd15", 15, in_channels=8).state_dict(),
              models / "diffusion_models" / "tiny_sd15_ip2p_unet.safetensors")
    dataset(Path(base) / "input" / "tiny_dataset")


def dataset(folder: Path, n: int = 3):
    """A folder of 64x64 images: the image dataset of the flow-map training workflow."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"image_{i}.png")


if __name__ == "__main__":
    main(*sys.argv[1:3])
