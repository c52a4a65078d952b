"""The four small networks of the digits demo, and how the shipped weights load.

Images are scikit-learn's 8x8 digits as tensors [B, 1, 8, 8] with pixels in [-1, 1]
(ink level 0..16 mapped by x = level / 8 - 1). Clock as in fmtt_core: t = 0 noise, t = 1 data,
x_t = (1 - t) x0 + t x1.

* VelocityNet  v(x, t) ~ E[x1 - x0 | x_t = x], trained by flow matching; its denoiser is
               D(x, t) = x + (1 - t) v(x, t)  (so b_t = (D - x) / (1 - t) = v).
* FlowMapNet   X(x, s, t) = x + (t - s) u(x, s, t), distilled from the velocity's ODE; u(x, t, t) = v(x, t).
* MLPClassifier  the reward's digit classifier (log-probabilities, differentiable).
* CNNJudge     an independent classifier (other architecture, other data split, other seed), used only
               to evaluate samples, so that adversarial pixels that fool the reward do not fool the score.

The generative nets are residual MLPs: at 8x8 they are as good as a small U-Net and an order of
magnitude cheaper per particle on a CPU, which is what the demo spends its time on.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_SHAPE = (1, 8, 8)
PIXELS = 64
N_CLASSES = 10
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_FILES = {"velocity": "velocity.safetensors", "flow_map": "flow_map.safetensors",
                "classifier": "classifier.safetensors", "judge": "judge.safetensors"}


def fourier_features(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B] times in [0, 1] -> [B, 2n] sin/cos features, frequencies pi * 2^(k/2), k = 0..n-1."""
    freqs = math.pi * 2.0 ** (torch.arange(n, dtype=t.dtype, device=t.device) / 2)
    angles = t.reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class FiLMBlock(nn.Module):
    """h + W2 silu(W1 (norm(h) * (1 + scale(c)) + shift(c)))."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(width, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h, c):
        scale, shift = self.film(c).chunk(2, dim=1)
        return h + self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class ResMLP(nn.Module):
    """x [B, pixels] and conditioning features c [B, cond_dim] -> [B, pixels]."""

    def __init__(self, cond_dim: int, width: int, depth: int, pixels: int = PIXELS):
        super().__init__()
        self.inp = nn.Linear(pixels, width)
        self.cond = nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(FiLMBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, pixels))

    def forward(self, x, c):
        h, c = self.inp(x), F.silu(self.cond(c))
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)


def _as_times(t, x: torch.Tensor) -> torch.Tensor:
    """A float or [B] tensor of times -> [B] tensor on x's device and dtype."""
    return torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])


class VelocityNet(nn.Module):
    def __init__(self, width: int = 256, depth: int = 3, n_freq: int = 12, pixels: int = PIXELS):
        super().__init__()
        # `pixels` only when not the 8x8 default, so the shipped single-digit files keep their header.
        self.config = {"width": width, "depth": depth, "n_freq": n_freq}
        if pixels != PIXELS:
            self.config["pixels"] = pixels
        self.n_freq = n_freq
        self.net = ResMLP(2 * n_freq, width, depth, pixels)

    def forward(self, x, t):
        """v(x, t) for x [B, 1, 8, 8] and t a float or [B]."""
        t = _as_times(t, x)
        return self.net(x.flatten(1), fourier_features(t, self.n_freq)).view_as(x)

    def denoise(self, x, t):
        """D(x, t) = E[x1 | x_t = x] = x + (1 - t) v(x, t)."""
        t = _as_times(t, x)
        return x + (1 - t).view(-1, 1, 1, 1) * self(x, t)


class FlowMapNet(nn.Module):
    """X(x, s, t) = x + (t - s) u(x, s, t): exact at t = s, and u(x, t, t) is the velocity."""

    def __init__(self, width: int = 256, depth: int = 3, n_freq: int = 12, pixels: int = PIXELS):
        super().__init__()
        # `pixels` only when not the 8x8 default, so the shipped single-digit files keep their header.
        self.config = {"width": width, "depth": depth, "n_freq": n_freq}
        if pixels != PIXELS:
            self.config["pixels"] = pixels
        self.n_freq = n_freq
        self.net = ResMLP(4 * n_freq, width, depth, pixels)

    def average_velocity(self, x, s, t):
        s, t = _as_times(s, x), _as_times(t, x)
        c = torch.cat([fourier_features(s, self.n_freq), fourier_features(t - s, self.n_freq)], dim=1)
        return self.net(x.flatten(1), c).view_as(x)

    def forward(self, x, s, t):
        s, t = _as_times(s, x), _as_times(t, x)
        return x + (t - s).view(-1, 1, 1, 1) * self.average_velocity(x, s, t)

    @torch.no_grad()
    def init_from_velocity(self, velocity: VelocityNet) -> None:
        """Start at u(x, s, t) = v(x, s), i.e. X = one Euler step: the (t - s) features get zero weight."""
        own, src = self.net.state_dict(), velocity.net.state_dict()
        for name, value in src.items():
            if name == "cond.0.weight":
                own[name].zero_()
                own[name][:, : value.shape[1]] = value
            else:
                own[name].copy_(value)
        self.net.load_state_dict(own)


class MLPClassifier(nn.Module):
    """The reward's classifier: [B, 1, 8, 8] -> [B, 10] logits."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.config = {"width": width}
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, N_CLASSES))

    def forward(self, x):
        return self.net(x)


class CNNJudge(nn.Module):
    """The evaluation-only classifier: a small conv net (different architecture from the reward's)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.config = {"channels": channels}
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * c * 4, 64), nn.ReLU(), nn.Linear(64, N_CLASSES))

    def forward(self, x):
        return self.head(self.features(x))


ARCHITECTURES = {"velocity": VelocityNet, "flow_map": FlowMapNet, "classifier": MLPClassifier, "judge": CNNJudge}


# ---------------------------------------------------------------------------------------------- files

def save_model(model: nn.Module, path: Path, **info) -> None:
    """safetensors with the architecture's config (and anything in `info`) in the header metadata."""
    from safetensors.torch import save_file

    # One metadata key: safetensors writes several in hash order, which would make the bytes vary.
    meta = {"fmtt_demo": json.dumps({"config": model.config, **info}, sort_keys=True)}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_model(kind: str, weights_dir: Path | str | None = None) -> nn.Module:
    """One shipped network, in eval mode with frozen parameters."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(ARCHITECTURES)}.")
    path = Path(weights_dir or WEIGHTS_DIR) / WEIGHT_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"digits demo weights not found at {path}. Reinstall the package, or train them with "
            f"`python -m fmtt_demo.train --out {path.parent}`.")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("fmtt_demo", "{}")).get("config", {})
    model = ARCHITECTURES[kind](**config)
    model.load_state_dict(load_file(str(path)))
    model.eval().requires_grad_(False)
    return model


@dataclass
class DigitModels:
    velocity: VelocityNet
    flow_map: FlowMapNet
    classifier: MLPClassifier
    judge: CNNJudge

    def denoiser(self, x, t):
        """D(x, t) in fmtt_core's Denoiser signature."""
        return self.velocity.denoise(x, t)

    @torch.no_grad()
    def judge_predict(self, x) -> torch.Tensor:
        return self.judge(x).argmax(1)


def load_digit_models(weights_dir: Path | str | None = None) -> DigitModels:
    return DigitModels(*(load_model(kind, weights_dir) for kind in ("velocity", "flow_map", "classifier", "judge")))
