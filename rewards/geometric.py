"""Geometric rewards that need no model: where an image's mass lies, and how symmetric it is.

All are differentiable in the pixels and cheap; images are [B, 3, H, W] in [0, 1] (see base.py).

* MaskContainment: fraction of the image's mass inside a mask,
      r(x) = sum_p mask_p m_p(x) / (sum_p m_p(x) + tiny)        in [0, 1],
  with per-pixel mass m = luminance Y, "ink" 1 - Y (dark strokes on a light page), or closeness to a
  colour c, exp(-|x_p - c|^2 / (2 sigma^2)). Y uses Rec. 709 weights on the values as given.
* MirrorSymmetry: r(x) = -mean (x - flip(x))^2 over channels and pixels, in [-1, 0]; 0 is perfectly
  symmetric. Each mirrored pair is counted twice, so a pair differing by d contributes d^2 per pixel.
* RotationInvariance: r(x) = -mean_angles mean (x - rot(x))^2. Multiples of 90 degrees rotate exactly
  (torch.rot90) and compare the whole image; other angles resample bilinearly (grid_sample) and compare
  only the inscribed disc, the part of the image a rotation keeps inside the frame.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import Reward, RewardInputError, check_images

LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)  # Rec. 709
MASS_KINDS = ("luminance", "ink", "color")


def luminance(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, H, W]."""
    return torch.einsum("bchw,c->bhw", images, images.new_tensor(LUMA_WEIGHTS))


def pixel_mass(images: torch.Tensor, kind: str = "luminance", color: Sequence[float] | None = None,
               color_sigma: float = 0.25) -> torch.Tensor:
    """Non-negative mass per pixel [B, H, W] (see the module docstring)."""
    if kind == "luminance":
        return luminance(images)
    if kind == "ink":
        return 1 - luminance(images)
    if kind == "color":
        distance2 = (images - images.new_tensor(color).view(1, 3, 1, 1)).square().sum(1)
        return torch.exp(-distance2 / (2 * color_sigma ** 2))
    raise ValueError(f"mass={kind!r} is not one of {MASS_KINDS}.")


def check_mask(mask: torch.Tensor, *, range_tol: float = 1e-3) -> torch.Tensor:
    """A mask [H, W] or [B, H, W] in [0, 1] as float [B, H, W]; errors name the fix."""
    if not isinstance(mask, torch.Tensor):
        raise RewardInputError(f"mask must be a torch.Tensor [H, W] or [B, H, W] in [0, 1], got {type(mask).__name__}.")
    if mask.ndim == 4 and mask.shape[1] == 1:
        raise RewardInputError(f"mask has shape {tuple(mask.shape)}; drop the channel dim: mask[:, 0].")
    if mask.ndim not in (2, 3):
        raise RewardInputError(f"mask must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}.")
    mask = mask.float() if not mask.is_floating_point() else mask
    lo, hi = mask.min().item(), mask.max().item()
    if lo < -range_tol or hi > 1 + range_tol:
        raise RewardInputError(f"mask values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]; "
                               "divide an 8-bit mask by 255 or threshold it.")
    return mask if mask.ndim == 3 else mask.unsqueeze(0)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear (antialiased when shrinking): weights are non-negative and sum
    to one, so the result stays in [0, 1], and it is smooth in the mask values."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask.unsqueeze(1), size=size, mode="bilinear", align_corners=False,
                         antialias=True).squeeze(1)


class MaskContainment(Reward):
    """Fraction of the image's mass inside `mask` ([H, W] shared, or [B, H, W] one per image).

    mass: "luminance", "ink" or "color" (then `color` = RGB in [0, 1], `color_sigma` its tolerance).
    """

    def __init__(self, mask: torch.Tensor, *, mass: str = "luminance", color: Sequence[float] | None = None,
                 color_sigma: float = 0.25, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 chunk_size: int | None = None):
        super().__init__(device=device, dtype=dtype, chunk_size=chunk_size)
        if mass not in MASS_KINDS:
            raise ValueError(f"mass={mass!r} is not one of {MASS_KINDS}.")
        if mass == "color":
            if color is None or len(color) != 3 or not all(0 <= c <= 1 for c in color):
                raise ValueError(f"mass='color' needs color=(r, g, b) with values in [0, 1], got {color!r}.")
            if not color_sigma > 0:
                raise ValueError(f"color_sigma must be > 0, got {color_sigma}.")
        self.mass, self.color, self.color_sigma = mass, color, color_sigma
        self.register_buffer("mask", check_mask(mask).to(self.device, self.dtype))

    def containment(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = pixel_mass(images, self.mass, self.color, self.color_sigma)
        inside = resize_mask(mask, tuple(images.shape[-2:])) * m
        return inside.flatten(1).sum(1) / (m.flatten(1).sum(1) + torch.finfo(m.dtype).tiny)

    def _masks_for(self, batch: int) -> torch.Tensor:
        if self.mask.shape[0] not in (1, batch):
            raise RewardInputError(f"mask has {self.mask.shape[0]} entries but there are {batch} images: pass one "
                                   "mask [H, W] shared by all images, or one per image [B, H, W].")
        return self.mask

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        return self.containment(images, self._masks_for(images.shape[0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Per-image masks must be chunked together with their images.
        check_images(images)
        masks = self._masks_for(images.shape[0])
        size = self.chunk_size or images.shape[0]
        out = []
        for start in range(0, images.shape[0], size):
            chunk = images[start:start + size].to(self.device, self.dtype)
            mask = masks if masks.shape[0] == 1 else masks[start:start + size]
            out.append(self.containment(chunk, mask).float())
        return torch.cat(out).to(images.device)


class MirrorSymmetry(Reward):
    """-mean squared difference between the image and its mirror image.

    axis: "left_right" (mirror across the vertical centre line, the default) or "top_bottom".
    """

    def __init__(self, axis: str = "left_right", *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, chunk_size: int | None = None):
        super().__init__(device=device, dtype=dtype, chunk_size=chunk_size)
        dims = {"left_right": -1, "top_bottom": -2}
        if axis not in dims:
            raise ValueError(f"axis={axis!r} is not one of {tuple(dims)}.")
        self.axis, self.flip_dim = axis, dims[axis]

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        return -(images - images.flip(self.flip_dim)).square().flatten(1).mean(1)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate [B, C, H, W] about the image centre by bilinear resampling, in pixel units (so non-square
    images rotate without shearing). Same direction as torch.rot90(images, 1, dims=(-2, -1)) at 90.
    Outside the frame the result is 0 (only the inscribed disc is meaningful)."""
    b, _, h, w = images.shape
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    v, u = torch.meshgrid(torch.arange(h, dtype=images.dtype, device=images.device) - (h - 1) / 2,
                          torch.arange(w, dtype=images.dtype, device=images.device) - (w - 1) / 2, indexing="ij")
    # Output pixel (u, v) reads the input at (u, v) rotated by theta.
    source_u, source_v = cos * u - sin * v, sin * u + cos * v
    grid = torch.stack([source_u / max((w - 1) / 2, 0.5), source_v / max((h - 1) / 2, 0.5)], dim=-1)
    return F.grid_sample(images, grid.expand(b, h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=True)


def inscribed_disc(h: int, w: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """[H, W] indicator of pixels within (min(H, W) - 1) / 2 of the centre: a rotation keeps them in the frame."""
    v, u = torch.meshgrid(torch.arange(h, dtype=dtype, device=device) - (h - 1) / 2,
                          torch.arange(w, dtype=dtype, device=device) - (w - 1) / 2, indexing="ij")
    radius = (min(h, w) - 1) / 2
    return (u.square() + v.square() <= radius ** 2 + 1e-6).to(dtype)


class RotationInvariance(Reward):
    """-mean over `angles` (degrees) of the mean squared difference between the image and its rotation."""

    def __init__(self, angles: float | Sequence[float] = 90, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, chunk_size: int | None = None):
        super().__init__(device=device, dtype=dtype, chunk_size=chunk_size)
        angles = [float(a) for a in (angles if isinstance(angles, (list, tuple)) else [angles])]
        if not angles or not all(math.isfinite(a) for a in angles):
            raise ValueError(f"angles must be one or more finite angles in degrees, got {angles!r}.")
        self.angles = angles

    def _mse(self, images: torch.Tensor, degrees: float) -> torch.Tensor:
        h, w = images.shape[-2:]
        if degrees % 90 == 0:
            quarter_turns = int(degrees // 90) % 4
            if quarter_turns % 2 and h != w:
                raise RewardInputError(f"A {degrees:g} degree rotation of a {h}x{w} image does not fit the frame; "
                                       "use square images, or angles=180, or crop first.")
            rotated = torch.rot90(images, quarter_turns, dims=(-2, -1))
            return (images - rotated).square().flatten(1).mean(1)
        disc = inscribed_disc(h, w, dtype=images.dtype, device=images.device)
        squared = (images - rotate(images, degrees)).square().mean(1)  # [B, H, W]
        return (squared * disc).flatten(1).sum(1) / disc.sum()

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        return -torch.stack([self._mse(images, a) for a in self.angles]).mean(0)
