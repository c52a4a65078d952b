"""Differentiable decoding of latents to images for the reward, through the model's own VAE."""
from __future__ import annotations

import comfy.model_management
import torch

from ..fmtt_core import FMTTInputError


def check_vae(vae, base_model) -> None:
    """Raise a clear error when the VAE does not belong to the model's latent space."""
    if vae is None or not hasattr(vae, "first_stage_model"):
        raise FMTTInputError("FMTT: the vae input is not a ComfyUI VAE; connect a Load VAE node.")
    want = base_model.latent_format.latent_channels
    have = getattr(vae, "latent_channels", None)
    if have != want:
        raise FMTTInputError(
            f"FMTT: the VAE expects {have}-channel latents but the model makes {want}-channel latents. Connect the "
            "VAE that belongs to this model (e.g. ae.safetensors or the taef1 TAESD for FLUX, the SD3 VAE for "
            "SD3.5); the reward sees images decoded by it.")
    if getattr(vae, "latent_dim", 2) != 2:
        raise FMTTInputError("FMTT: the VAE is a video / audio VAE; FMTT rewards score images, connect an image VAE.")


def vae_decoder(vae, base_model):
    """Differentiable decode(x1) -> images [B, 3, H, W] in [0, 1].

    VAE.decode clamps in place and is not differentiable, so this calls the first stage model directly and maps
    its [-1, 1] output to [0, 1] the way the VAE's own process_output does.
    """
    check_vae(vae, base_model)
    comfy.model_management.load_models_gpu([vae.patcher])
    first_stage = vae.first_stage_model
    probe = vae.process_output(torch.tensor([-1.0, 1.0]))
    signed = torch.allclose(probe, torch.tensor([0.0, 1.0]))

    def decode(x1: torch.Tensor) -> torch.Tensor:
        z = base_model.process_latent_out(x1).to(vae.device, vae.vae_dtype)
        images = first_stage.decode(z).float()
        if images.ndim == 5:  # some image VAEs return a one-frame video
            images = images[:, :, 0]
        images = (images + 1) / 2 if signed else images
        return images.clamp(0, 1).to(x1.device)

    return decode, first_stage
