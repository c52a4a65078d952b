"""The pack's flow-map file format ("fmtt flow map v1"): a learned two-time map X_{s,t}(x) in a safetensors file.

Anyone can export to it: write the tensors below with `safetensors.torch.save_file(tensors, path, metadata)`.

Clock and space. Times follow the FMTT core: t = 0 is noise, t = 1 is data, x_t = (1 - t) x0 + t x1, with x the
diffusion model's latent *as the model sees it* (after the latent format's process_in: for Flux
`(vae_latent - shift) * scale`). For noise-prediction models (SD1.x, SDXL) x is the linear interpolant
x_VE / (1 + sigma) at t = 1 / (1 + sigma). The map must satisfy X_{s,s}(x) = x; it is used as X_{t,1}(x).

Metadata (all strings):
    fmtt.format        "flow_map"
    fmtt.version       "1"
    fmtt.architecture  "conv_resnet"
    fmtt.config        JSON: {"channels": C, "width": W, "depth": L, "n_freq": F, "groups": G}

Architecture "conv_resnet":  X(x, s, t) = x + (t - s) * u(x, s, t), with
    c      = [sin(pi 2^(k/2) s), cos(...), sin(pi 2^(k/2) (t - s)), cos(...)]   k = 0..F-1     -> [B, 4F]
    e      = silu(cond.2(silu(cond.0(c))))                                       Linear 4F->W, W->W
    h      = inp(x)                                                              Conv2d C->W, 3x3, pad 1
    block i (i = 0..L-1):
        scale, shift = blocks.i.film(e).chunk(2)                                 Linear W->2W
        h = h + blocks.i.conv2(silu(blocks.i.conv1(GN(h) * (1 + scale) + shift)))  Conv2d W->W 3x3 pad 1
    u      = out(silu(GN(h)))                                                    Conv2d W->C, 3x3, pad 1
GN is GroupNorm(G, W) without affine parameters. Tensor names: inp.weight/bias, cond.0.weight/bias,
cond.2.weight/bias, blocks.{i}.film.weight/bias, blocks.{i}.conv1.weight/bias, blocks.{i}.conv2.weight/bias,
out.weight/bias (PyTorch layouts: Linear [out, in], Conv2d [out, in, 3, 3]).
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FMTTInputError
from ..files import FMTTFileError, read_safetensors_header

FORMAT, VERSION, ARCHITECTURE = "flow_map", "1", "conv_resnet"


class FlowMapFileError(FMTTInputError):
    """A flow-map file that is not in the pack's format or does not fit its declared architecture."""


def fourier_features(t: torch.Tensor, n: int) -> torch.Tensor:
    freqs = math.pi * 2.0 ** (torch.arange(n, dtype=t.dtype, device=t.device) / 2)
    angles = t.reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _Block(nn.Module):
    def __init__(self, width: int, groups: int):
        super().__init__()
        self.groups = groups
        self.film = nn.Linear(width, 2 * width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h, e):
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        z = F.group_norm(h, self.groups) * (1 + scale) + shift
        return h + self.conv2(F.silu(self.conv1(z)))


class ConvFlowMap(nn.Module):
    """X(x, s, t) = x + (t - s) u(x, s, t) on latents [B, C, H, W] (see the module docstring)."""

    def __init__(self, channels: int, width: int = 64, depth: int = 2, n_freq: int = 8, groups: int = 8):
        super().__init__()
        if width % groups:
            raise FlowMapFileError(f"flow map config: width {width} must be a multiple of groups {groups}.")
        self.config = {"channels": channels, "width": width, "depth": depth, "n_freq": n_freq, "groups": groups}
        self.n_freq, self.groups = n_freq, groups
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.cond = nn.Sequential(nn.Linear(4 * n_freq, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(_Block(width, groups) for _ in range(depth))
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(x.shape[0])
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c = torch.cat([fourier_features(s, self.n_freq), fourier_features(t - s, self.n_freq)], dim=1)
        e = F.silu(self.cond(c))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, e)
        u = self.out(F.silu(F.group_norm(h, self.groups)))
        return x + (t - s).view(-1, *([1] * (x.ndim - 1))) * u


def save_flow_map(net: ConvFlowMap, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    metadata = {"fmtt.format": FORMAT, "fmtt.version": VERSION, "fmtt.architecture": ARCHITECTURE,
                "fmtt.config": json.dumps(net.config)}
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path), metadata)


def load_flow_map(path: str | os.PathLike) -> ConvFlowMap:
    """Read a flow map in the pack's format; errors say what is wrong with the file and what is expected."""
    from safetensors.torch import load_file

    path = str(path)
    if not os.path.isfile(path):
        raise FlowMapFileError(f"flow map file '{path}' does not exist; put it in ComfyUI's models/fmtt_flow_maps/.")
    try:  # the damaged-file check every model file of the pack gets (zero bytes, a bad header, a renamed text file)
        meta = read_safetensors_header(path, what="flow-map file").get("__metadata__") or {}
    except FMTTFileError as err:
        raise FlowMapFileError(str(err)) from None
    if meta.get("fmtt.format") != FORMAT:
        raise FlowMapFileError(
            f"'{os.path.basename(path)}' is not an FMTT flow-map file (metadata fmtt.format is "
            f"{meta.get('fmtt.format')!r}, expected {FORMAT!r}). Export the map in the format described in the "
            "README (section 'Flow-map file format').")
    if meta.get("fmtt.version") != VERSION or meta.get("fmtt.architecture") != ARCHITECTURE:
        raise FlowMapFileError(f"'{os.path.basename(path)}' has version {meta.get('fmtt.version')!r} / architecture "
                               f"{meta.get('fmtt.architecture')!r}; this pack reads version {VERSION} "
                               f"{ARCHITECTURE!r}. Update the pack or re-export.")
    try:
        net = ConvFlowMap(**json.loads(meta["fmtt.config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise FlowMapFileError(f"'{os.path.basename(path)}': bad fmtt.config metadata ({err}); expected JSON with "
                               "channels, width, depth, n_freq, groups.") from err
    state = load_file(path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise FlowMapFileError(f"'{os.path.basename(path)}': the tensors do not fit the declared config "
                               f"{net.config}: {err}") from err
    broken = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:  # a NaN weight makes every look-ahead NaN: refuse the file, not the sampling it would spoil
        raise FlowMapFileError(f"'{os.path.basename(path)}': tensor(s) {', '.join(broken[:4])} hold NaN / inf values; "
                               "the file is damaged or was saved from a diverged training run. Re-export it from a "
                               "finite checkpoint.")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
