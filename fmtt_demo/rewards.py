"""The demo's rewards: r(x1) -> [B] on digit images [B, 1, 8, 8] in [-1, 1], differentiable in the pixels.

Any callable of this shape plugs into fmtt_core; two are shipped to show it:

* ClassifierReward  log p(c | x) under the reward's MLP classifier. With reward scale beta = 1 the tilted
                    target p(x) p(c | x) is exactly the class-conditional law p(x | c) (Bayes).
* SymmetryReward    mirror symmetry about the vertical axis, no model at all:
                    r(x) = -mean_pixels (x - flip(x))^2 / 4, in [-1, 0] (0 = perfectly symmetric).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import N_CLASSES


class ClassifierReward:
    def __init__(self, classifier, target_class: int):
        if not (isinstance(target_class, int) and 0 <= target_class < N_CLASSES):
            raise ValueError(f"target_class must be a digit 0..9, got {target_class!r}.")
        self.classifier, self.target_class = classifier, target_class

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.classifier(x), dim=1)[:, self.target_class]

    def __str__(self):
        return f"log p(class={self.target_class} | x)"


class SymmetryReward:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return -(x - x.flip(-1)).square().flatten(1).mean(1) / 4

    def __str__(self):
        return "mirror symmetry"


REWARDS = ("classifier", "symmetry")


def make_reward(kind: str, models, target_class: int = 3):
    """The named reward, built from the loaded DigitModels."""
    if kind == "classifier":
        return ClassifierReward(models.classifier, target_class)
    if kind == "symmetry":
        return SymmetryReward()
    raise ValueError(f"unknown reward {kind!r}; choose one of {', '.join(REWARDS)}.")
