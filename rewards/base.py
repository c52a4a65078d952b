"""The reward contract shared by every reward in this package.

A reward maps a batch of images to one score per image and is differentiable in the pixels:

    images: float tensor [B, 3, H, W], RGB, values in [0, 1] (ComfyUI's IMAGE is [B, H, W, 3];
            the node layer permutes)
    returns: float tensor [B] (float32), larger is better

A reward is called: `reward(images)` validates, chunks the batch so memory stays bounded, and returns
float32 on the input's device. Subclasses implement `evaluate(images)` for one chunk already validated
and moved to the reward's device / dtype. ("Score" is kept for the score function grad log p_t of the
core's clock; here everything is a reward.)
"""
from __future__ import annotations

import torch


class RewardInputError(ValueError):
    """Bad images (shape, channels, range) handed to a reward."""


def check_images(images: torch.Tensor, *, name: str = "images", range_tol: float = 1e-3) -> None:
    """Raise a RewardInputError naming the problem and the fix."""
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(f"{name} must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}.")
    if images.ndim != 4:
        raise RewardInputError(
            f"{name} must have 4 dimensions [B, 3, H, W], got shape {tuple(images.shape)}. "
            "ComfyUI IMAGE tensors are [B, H, W, 3]: permute with images.permute(0, 3, 1, 2).")
    if images.shape[1] != 3:
        raise RewardInputError(
            f"{name} must have 3 (RGB) channels in dim 1, got {images.shape[1]} (shape {tuple(images.shape)}). "
            "Convert grey or RGBA images to RGB first.")
    if not images.is_floating_point():
        raise RewardInputError(
            f"{name} must be a float tensor in [0, 1], got dtype {images.dtype}; divide uint8 by 255.")
    with torch.no_grad():
        lo, hi = images.min().item(), images.max().item()
    if lo < -range_tol or hi > 1 + range_tol:
        raise RewardInputError(
            f"{name} values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]. "
            "Map VAE output from [-1, 1] with (x + 1) / 2 and clamp.")


class Reward(torch.nn.Module):
    """Base class: validation, chunking, device / dtype handling.

    `chunk_size` bounds how many images go through the model at once (None: all).
    Parameters are frozen: rewards are differentiated w.r.t. pixels, never trained here.
    """

    def __init__(self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 chunk_size: int | None = None):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_size = chunk_size

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def freeze(self) -> Reward:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        size = self.chunk_size or images.shape[0]
        out = [self.evaluate(chunk.to(self.device, self.dtype)).float().reshape(-1)
               for chunk in images.split(size)]
        return torch.cat(out).to(images.device)
