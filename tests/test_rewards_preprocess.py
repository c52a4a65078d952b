"""Differentiable CLIP preprocessing against the reference pipelines (torchvision on tensors, PIL)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from fmtt_rewards.preprocess import CLIP_MEAN, CLIP_STD, ClipTransform, center_crop


def smooth_images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g)
    return F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1)  # photo-like, not white noise


@pytest.mark.parametrize("h, w, size", [(50, 70, 32), (300, 260, 224), (20, 30, 48), (77, 77, 64)])
def test_matches_torchvision_resize_crop_normalize(h, w, size):
    x = smooth_images(2, h, w)
    reference = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                           T.CenterCrop(size), T.Normalize(CLIP_MEAN, CLIP_STD)])(x)
    torch.testing.assert_close(ClipTransform(size=size)(x), reference, rtol=0, atol=1e-5)


def test_resize_then_crop_matches_torchvision():
    x = smooth_images(1, 90, 120)
    reference = T.Compose([T.Resize(256, interpolation=InterpolationMode.BICUBIC, antialias=True),
                           T.CenterCrop(224), T.Normalize(CLIP_MEAN, CLIP_STD)])(x)
    torch.testing.assert_close(ClipTransform(size=224, resize=256)(x), reference, rtol=0, atol=1e-5)


def test_matches_pil_pipeline_up_to_uint8_rounding():
    """OpenAI CLIP / open_clip preprocess PIL images; PIL rounds its resized pixels to uint8."""
    x8 = (smooth_images(1, 120, 90) * 255).round().to(torch.uint8)[0]
    pil = Image.fromarray(np.ascontiguousarray(x8.permute(1, 2, 0).numpy()))
    pil = pil.resize((64, round(64 * 120 / 90)), Image.BICUBIC)
    top = round((pil.height - 64) / 2)
    reference = torch.from_numpy(np.asarray(pil.crop((0, top, 64, top + 64))).copy()).permute(2, 0, 1) / 255.0
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    ours = ClipTransform(size=64)(x8[None].float() / 255)[0] * std + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert (ours - reference).abs().max() < 1.5 / 255
    assert (ours - reference).abs().mean() < 0.5 / 255


def test_already_sized_images_are_only_normalised():
    x = smooth_images(2, 32, 32)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(ClipTransform(size=32)(x), (x - mean) / std)


def test_crop_offsets_of_torchvision_and_transformers():
    x = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 4, 7)
    assert center_crop(x, (4, 4), "round")[0, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]  # round(1.5) -> 2
    assert center_crop(x, (4, 4), "floor")[0, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="larger than image"):
        center_crop(x, (5, 5))


def test_gradient_reaches_every_pixel_and_matches_finite_differences():
    transform = ClipTransform(size=24)
    x = smooth_images(1, 30, 40).double().requires_grad_(True)
    weights = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (transform(x) * weights).sum().backward()
    assert torch.isfinite(x.grad).all()
    # the 24 x 32 resize loses 4 columns on each side to the crop; the kept ones depend on >= 30 input columns
    assert (x.grad.abs().sum(dim=(0, 1, 2)) > 0).sum() >= 30
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        fd = ((transform(x + h * direction) - transform(x - h * direction)) * weights).sum() / (2 * h)
    torch.testing.assert_close((x.grad * direction).sum(), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_resized_in_float32(dtype):
    x = smooth_images(2, 50, 60)
    out = ClipTransform(size=32)(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ClipTransform(size=32)(x), rtol=0, atol=2e-2)
