"""Geometric rewards against hand-computed values, finite differences and their error messages."""
from __future__ import annotations

import math

import pytest
import torch

from fmtt_rewards.base import RewardInputError
from fmtt_rewards.geometric import (
    MaskContainment,
    MirrorSymmetry,
    RotationInvariance,
    inscribed_disc,
    resize_mask,
    rotate,
)


def image_from_pixels(rows):
    """[[(r, g, b), ...], ...] -> [1, 3, H, W] float64."""
    return torch.tensor(rows, dtype=torch.float64).permute(2, 0, 1).unsqueeze(0)


# white, black / red, green
FOUR = image_from_pixels([[(1, 1, 1), (0, 0, 0)], [(1, 0, 0), (0, 1, 0)]])
Y_RED, Y_GREEN = 0.2126, 0.7152


def test_luminance_containment_by_hand():
    diagonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = MaskContainment(diagonal, dtype=torch.float64)(FOUR)
    expected = (1 + Y_GREEN) / (1 + 0 + Y_RED + Y_GREEN)
    assert out.shape == (1,) and out.dtype == torch.float32
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_ink_containment_by_hand():
    diagonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = MaskContainment(diagonal, mass="ink", dtype=torch.float64)(FOUR)
    expected = (0 + (1 - Y_GREEN)) / (0 + 1 + (1 - Y_RED) + (1 - Y_GREEN))
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_color_containment_by_hand():
    red_corner = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    out = MaskContainment(red_corner, mass="color", color=(1, 0, 0), color_sigma=0.5, dtype=torch.float64)(FOUR)
    # squared distances to red: white 2, black 1, red 0, green 2; mass exp(-d2 / (2 * 0.25))
    expected = 1 / (math.exp(-4) + math.exp(-2) + 1 + math.exp(-4))
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_mask_is_resized_bilinearly_by_hand():
    left = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    up = resize_mask(left[None], (4, 4))[0]
    torch.testing.assert_close(up[0], torch.tensor([1.0, 0.75, 0.25, 0.0]))
    uniform = torch.full((1, 3, 4, 4), 0.6, dtype=torch.float64)
    assert MaskContainment(left, dtype=torch.float64)(uniform).item() == pytest.approx(0.5, abs=1e-6)
    # Shrinking a 4x4 left-half mask to 2x2 uses the antialiasing triangle filter: weights 3/4, 3/4, 1/4.
    down = resize_mask(torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4)[None], (2, 2))[0]
    torch.testing.assert_close(down, torch.tensor([[6 / 7, 1 / 7]] * 2))


def test_per_image_masks_follow_their_images_through_chunks():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 8, 8, generator=g, dtype=torch.float64)
    masks = (torch.rand(5, 4, 4, generator=g) > 0.5).float()
    whole = MaskContainment(masks, dtype=torch.float64)(images)
    chunked = MaskContainment(masks, dtype=torch.float64, chunk_size=2)(images)
    one_by_one = torch.cat([MaskContainment(masks[i], dtype=torch.float64)(images[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(one_by_one, whole)
    with pytest.raises(RewardInputError, match="one mask \\[H, W\\] shared by all images, or one per image"):
        MaskContainment(masks)(images[:3].float())


def test_mirror_symmetry_by_hand():
    # channel 0: 0.2 | 0.6, channel 1: 0.5 | 0.5, channel 2: 0 | 1
    x = image_from_pixels([[(0.2, 0.5, 0.0), (0.6, 0.5, 1.0)]])
    expected = -(2 * 0.4 ** 2 + 0 + 2 * 1.0) / 6
    assert MirrorSymmetry(dtype=torch.float64)(x).item() == pytest.approx(expected, abs=1e-6)
    assert MirrorSymmetry("top_bottom", dtype=torch.float64)(x.transpose(-1, -2)).item() == \
        pytest.approx(expected, abs=1e-6)
    symmetric = torch.cat([x, x.flip(-1)], dim=-1)
    assert MirrorSymmetry(dtype=torch.float64)(symmetric).item() == 0


def test_rotation_invariance_by_hand():
    a, b, c, d = 0.1, 0.4, 0.7, 1.0
    x = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64)
    x[0, 0] = torch.tensor([[a, b], [c, d]])
    # 180 degrees: [[d, c], [b, a]]; 90 degrees: [[b, d], [a, c]]; 12 values in all
    r180 = -(2 * (a - d) ** 2 + 2 * (b - c) ** 2) / 12
    r90 = -((a - b) ** 2 + (b - d) ** 2 + (c - a) ** 2 + (d - c) ** 2) / 12
    assert RotationInvariance(180, dtype=torch.float64)(x).item() == pytest.approx(r180, abs=1e-6)
    assert RotationInvariance(90, dtype=torch.float64)(x).item() == pytest.approx(r90, abs=1e-6)
    assert RotationInvariance((90, 180), dtype=torch.float64)(x).item() == pytest.approx((r90 + r180) / 2, abs=1e-6)
    assert RotationInvariance(-270, dtype=torch.float64)(x).item() == pytest.approx(r90, abs=1e-6)


def test_grid_rotation_agrees_with_exact_rotation_on_the_disc():
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    disc = inscribed_disc(9, 9, dtype=torch.float64).bool()
    assert disc.sum() == 49  # pixels within 4 of the centre of a 9x9 grid
    for quarter_turns in (1, 2, 3):
        exact = torch.rot90(x, quarter_turns, dims=(-2, -1))
        torch.testing.assert_close(rotate(x, 90 * quarter_turns)[..., disc], exact[..., disc])
    torch.testing.assert_close(rotate(x, 0), x)


def test_arbitrary_angle_rewards_round_images():
    v, u = torch.meshgrid(torch.arange(33.0) - 16, torch.arange(33.0) - 16, indexing="ij")
    round_blob = torch.exp(-(u ** 2 + v ** 2) / (2 * 6.0 ** 2)).expand(1, 3, 33, 33).double()
    noise = torch.rand(1, 3, 33, 33, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reward = RotationInvariance(45, dtype=torch.float64)
    assert reward(round_blob).item() > -1e-3  # only bilinear interpolation error
    assert reward(noise).item() < -0.05


def test_non_square_rotation_by_90_names_the_fix():
    with pytest.raises(RewardInputError, match="use square images, or angles=180"):
        RotationInvariance(90)(torch.rand(1, 3, 4, 6))
    assert RotationInvariance(180)(torch.rand(1, 3, 4, 6)).shape == (1,)
    assert RotationInvariance(30)(torch.rand(1, 3, 4, 6)).shape == (1,)


@pytest.mark.parametrize("reward", [
    MaskContainment(torch.rand(3, 3, generator=torch.Generator().manual_seed(3)), dtype=torch.float64),
    MaskContainment(torch.rand(3, 3), mass="ink", dtype=torch.float64),
    MaskContainment(torch.rand(3, 3), mass="color", color=(0.2, 0.8, 0.4), dtype=torch.float64),
    MirrorSymmetry(dtype=torch.float64),
    RotationInvariance((90, 180), dtype=torch.float64),
    RotationInvariance(33, dtype=torch.float64),
], ids=["luminance", "ink", "color", "mirror", "rot90+180", "rot33"])
def test_gradients_match_finite_differences(reward):
    x = (0.2 + 0.6 * torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    assert torch.autograd.gradcheck(reward.evaluate, (x.requires_grad_(),), eps=1e-6, atol=1e-7)
    out = reward(x)
    assert out.shape == (2,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_inputs_name_the_fix():
    with pytest.raises(RewardInputError, match="drop the channel dim"):
        MaskContainment(torch.ones(1, 1, 4, 4))
    with pytest.raises(RewardInputError, match="divide an 8-bit mask by 255"):
        MaskContainment(torch.full((4, 4), 255.0))
    with pytest.raises(RewardInputError, match="must be \\[H, W\\] or \\[B, H, W\\]"):
        MaskContainment(torch.ones(4))
    with pytest.raises(ValueError, match="mass='brightness' is not one of"):
        MaskContainment(torch.ones(4, 4), mass="brightness")
    with pytest.raises(ValueError, match="needs color=\\(r, g, b\\)"):
        MaskContainment(torch.ones(4, 4), mass="color")
    with pytest.raises(ValueError, match="axis='diagonal'"):
        MirrorSymmetry("diagonal")
    with pytest.raises(ValueError, match="finite angles"):
        RotationInvariance(())
    with pytest.raises(RewardInputError, match="3 \\(RGB\\) channels"):
        MirrorSymmetry()(torch.rand(1, 1, 4, 4))
    with pytest.raises(RewardInputError, match="must lie in \\[0, 1\\]"):
        MaskContainment(torch.ones(4, 4))(torch.rand(1, 3, 4, 4) * 3)
