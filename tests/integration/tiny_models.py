"""Build tiny random models of the real architectures into a ComfyUI base directory (run with ComfyUI's python).

    PYTHONPATH=tests python tests/integration/tiny_models.py COMFYUI_PATH BASE_DIR

Writes, under BASE_DIR/models:
  diffusion_models/tiny_flux_dev.safetensors     Flux (comfy.ldm.flux.model.Flux) with guidance_in: FLUX.1-dev
  diffusion_models/tiny_flux_schnell.safetensors the same without guidance_in: detected as FLUX.1-schnell
  vae/tiny_taef1.safetensors                     a 16-channel TAESD (encoder + decoder, vae_scale / vae_shift)
  vae/tiny_taesd_4ch.safetensors                 a 4-channel TAESD: the wrong VAE for Flux (bad-input test)
  reward_models/tiny_clip/                       a transformers CLIP folder with a real BPE tokenizer
  reward_models/tiny_smolvlm/                    an Idefics3 (SmolVLM) folder: model, processor, chat template
                                                 (both from fmtt_testing.hf_models, as the reward tests build them)
  fmtt_flow_maps/tiny_flow_map.safetensors       a flow map in the pack's format
  loras/tiny_*_lora.safetensors, ...             FLUX flow-map LoRAs and their reference (tiny_flux_flow_map.py)
and BASE_DIR/input/tiny_image.png, tiny_mask.png. Every parameter is initialised here: ComfyUI's
disable_weight_init layers would otherwise hold garbage.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from fmtt_testing.hf_models import save_idefics3, write_hf_clip_folder


def init_(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale") and p.ndim == 1:  # RMSNorm scales near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else max(p.numel(), 1)
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in ** 0.5 * (3 if p.ndim > 1 else 0.3))
    return module


def flux(guidance: bool, seed: int):
    import comfy.ldm.flux.model
    import comfy.ops
    net = comfy.ldm.flux.model.Flux(
        image_model="flux", operations=comfy.ops.disable_weight_init, in_channels=16, out_channels=16,
        vec_in_dim=32, context_in_dim=64, hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1,
        depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
        guidance_embed=guidance, txt_ids_dims=[])
    return init_(net, seed)


def taesd(channels: int, seed: int):
    import comfy.taesd.taesd
    net = comfy.taesd.taesd.TAESD(latent_channels=channels)
    init_(net, seed, scale=0.2)  # moderate activations: few ReLU kinks, so finite differences are meaningful
    with torch.no_grad():
        net.vae_scale.fill_(1.0)
        net.vae_shift.fill_(0.0)
    return net


def write_flow_map(path: Path, pack: Path):
    sys.path.insert(0, str(pack))  # fmtt_core is a plain package of the pack (torch only)
    from fmtt_core.flow_maps import conv_resnet as module
    torch.manual_seed(8)
    net = init_(module.ConvFlowMap(channels=16, width=16, depth=1, n_freq=4, groups=4), 9)
    module.save_flow_map(net, path)


def write_images(input_dir: Path):
    import numpy as np
    from PIL import Image
    input_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(input_dir / "tiny_image.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(input_dir / "tiny_mask.png")


def main(comfy_path: str, base: str):
    sys.path.insert(0, comfy_path)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no GPU probing
    from safetensors.torch import save_file
    base = Path(base)
    models = base / "models"
    pack = Path(__file__).resolve().parents[2]
    for sub in ("diffusion_models", "vae", "reward_models", "fmtt_flow_maps"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    save_file(flux(True, 1).state_dict(), models / "diffusion_models" / "tiny_flux_dev.safetensors")
    save_file(flux(False, 2).state_dict(), models / "diffusion_models" / "tiny_flux_schnell.safetensors")
    save_file(taesd(16, 3).state_dict(), models / "vae" / "tiny_taef1.safetensors")
    save_file(taesd(4, 4).state_dict(), models / "vae" / "tiny_taesd_4ch.safetensors")
    write_hf_clip_folder(models / "reward_models" / "tiny_clip")
    save_idefics3(models / "reward_models" / "tiny_smolvlm")
    write_flow_map(models / "fmtt_flow_maps" / "tiny_flow_map.safetensors", pack)
    write_images(base / "input")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tiny_flux_flow_map  # FLUX flow-map LoRAs and their diffusers reference (needs diffusers + peft)
    tiny_flux_flow_map.build(base)


if __name__ == "__main__":
    main(*sys.argv[1:3])
