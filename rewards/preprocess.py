"""Differentiable image preprocessing for CLIP-style encoders.

The reference pipelines (OpenAI CLIP, open_clip, transformers' CLIPImageProcessor, BLIP) run on PIL
images: resize the shorter side to `size` (bicubic), center-crop to `size`, scale to [0, 1] and
normalise per channel. Here the same steps run on tensors so gradients reach the pixels. Bicubic
resizing uses `antialias=True`, whose kernel is PIL's (a = -0.5), so results match the PIL pipeline
up to PIL's uint8 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_to_cover(images: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Smallest aspect-preserving resize of [B, C, H, W] that covers a (th, tw) crop.

    For a square crop this is "shorter side -> size" with torchvision's rounding of the longer side.
    """
    h, w = images.shape[-2:]
    th, tw = size
    if th * w >= tw * h:  # height is the binding side
        new_h, new_w = th, int(th * w / h)
    else:
        new_h, new_w = int(tw * h / w), tw
    if (new_h, new_w) == (h, w):
        return images
    smooth = mode in ("bilinear", "bicubic")
    return F.interpolate(images, size=(new_h, new_w), mode=mode, align_corners=False if smooth else None,
                         antialias=smooth)


def center_crop(images: torch.Tensor, size: tuple[int, int], offset: str = "round") -> torch.Tensor:
    """Crop the center (th, tw) window. An odd margin puts the window half a pixel off center:
    torchvision's CenterCrop (open_clip, OpenAI CLIP, BLIP) rounds the offset, transformers' image
    processors floor it."""
    h, w = images.shape[-2:]
    th, tw = size
    if th > h or tw > w:
        raise ValueError(f"center_crop: crop {size} larger than image {(h, w)}; resize first.")
    place = {"round": lambda m: int(round(m / 2.0)), "floor": lambda m: m // 2}[offset]
    top, left = place(h - th), place(w - tw)
    return images[..., top:top + th, left:left + tw]


@dataclass(frozen=True)
class ClipTransform:
    """Resize the shorter side, center-crop to `size`, normalise with mean / std.

    size: crop size, int or (height, width). resize: shorter-side length before cropping
    (None: just enough to cover the crop, the usual CLIP setting). mean / std: per-channel RGB.
    crop_offset: "round" (torchvision) or "floor" (transformers), see `center_crop`.
    """

    size: int | tuple[int, int] = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bicubic"
    resize: int | None = None
    crop_offset: str = "round"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> normalised [B, 3, h, w], differentiable."""
        # Half-precision interpolation is missing or imprecise on some backends: resize in float32.
        work = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
        crop = _pair(self.size)
        cover = crop if self.resize is None else (max(self.resize, crop[0]), max(self.resize, crop[1]))
        x = center_crop(resize_to_cover(work, cover, self.interpolation), crop, self.crop_offset)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).to(images.dtype)
