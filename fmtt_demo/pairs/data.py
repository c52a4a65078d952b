"""Pair canvases [N, 1, 8, 16]: two of scikit-learn's 8x8 digits side by side, from one split of
fmtt_demo.data (so the base model, the reward classifier and the judge keep their disjoint splits)."""
from __future__ import annotations

import torch

CANVAS_SHAPE = (1, 8, 16)


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 1, 8, 16] canvases -> (left, right), each [B, 1, 8, 8]."""
    return x[..., :8], x[..., 8:]


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return torch.cat([left, right], dim=-1)


def random_pairs(images: torch.Tensor, labels: torch.Tensor, n: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n canvases whose two digits are drawn independently and uniformly from (images, labels).
    Returns canvases [n, 1, 8, 16] and labels [n, 2] (left, right)."""
    i, j = torch.randint(images.shape[0], (2, n), generator=gen)
    return side_by_side(images[i], images[j]), torch.stack([labels[i], labels[j]], dim=1)
