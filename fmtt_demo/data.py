"""scikit-learn's 8x8 digits (1,797 images, shipped inside the scikit-learn wheel: no download).

Pixels: ink level 0..16 -> x = level / 8 - 1 in [-1, 1], tensors [N, 1, 8, 8].
Splits (stratified by class, fixed by the seed):
  "train" 60%  the generative model and the reward's classifier,
  "judge" 25%  the judge classifier only (the reward never sees it),
  "test"  15%  held out from everything: the accuracies in the model card.
"""
from __future__ import annotations

import torch

SPLIT_FRACTIONS = {"train": 0.60, "judge": 0.25, "test": 0.15}


def to_pixels(levels: torch.Tensor) -> torch.Tensor:
    return levels / 8.0 - 1.0


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images [N, 1, 8, 8] in [-1, 1] (float32) and labels [N] (int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the demo extra installs it
        raise ImportError("the digits data comes with scikit-learn: pip install 'comfyui-fmtt[demo]'") from e
    digits = load_digits()
    images = to_pixels(torch.tensor(digits.images, dtype=torch.float32)).unsqueeze(1)
    return images, torch.tensor(digits.target, dtype=torch.int64)


def split_digits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train" | "judge" | "test": (images, labels)}, stratified, deterministic in `seed`."""
    images, labels = load_digits_tensors()
    gen = torch.Generator().manual_seed(seed)
    parts = {name: [] for name in SPLIT_FRACTIONS}
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_train = round(SPLIT_FRACTIONS["train"] * idx.numel())
        n_judge = round(SPLIT_FRACTIONS["judge"] * idx.numel())
        parts["train"].append(idx[:n_train])
        parts["judge"].append(idx[n_train:n_train + n_judge])
        parts["test"].append(idx[n_train + n_judge:])
    out = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks).sort().values
        out[name] = (images[idx], labels[idx])
    return out
