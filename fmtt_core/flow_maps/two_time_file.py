"""The pack's two-time flow-map LoRA file ("fmtt two-time lora v1"), for every family but FLUX (torch only).

A FLUX flow map trained by the pack is written in FMRG's diffusers format instead (two_time_lora.py), so FMRG's
own code reads it unchanged. Every other family has no public format to follow; this one holds, in safetensors:

  base.<module>.lora_down.weight   [r, in]    LoRA on a Linear of the diffusion model (ComfyUI's module path,
  base.<module>.lora_up.weight     [out, r]   e.g. `input_blocks.4.1.transformer_blocks.0.attn1.to_q`), scale 1
  second.<module>.lora_down.weight / lora_up.weight   LoRA on the same-named Linear of the *copy* of the model's
                                               time embedder (`time_embed.0`, `t_embedder.mlp.2`, ...)

The second time embedder is a copy of the model's own (base weights = the model's), fed the second time sigma';
the model's conditioning vector is the mean of both embeddings (FMRG's DualTimeEmbedder, for every family).
The jump is one Euler step in ComfyUI's sampling space, X(x; sigma -> sigma') = x + (sigma' - sigma)(x - D) / sigma
(flow models: the velocity form z + (sigma' - sigma) u), with D the two-time model's denoised prediction.

Metadata (all strings): fmtt.format = "two_time_lora", fmtt.version, family, base_model_hash (a fingerprint of the
diffusion model's tensors, see nodes/two_time.py), clock ("flow" | "ve"), prediction (eps / v / flow),
cfg (the guidance the map was distilled at), resolution ("WxH" of the training latents, pixels), objective
("lsd" | "psd"), steps (optimiser steps), rank, embedders (JSON list of the copied time embedders).
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import FMTTInputError
from ..files import read_safetensors_header

FORMAT, VERSION = "two_time_lora", "1"
DOWN, UP = "lora_down.weight", "lora_up.weight"
REQUIRED = ("family", "base_model_hash", "clock", "cfg", "resolution", "objective", "steps", "rank", "embedders")


def save_two_time_lora(path, base: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       second: dict[str, tuple[torch.Tensor, torch.Tensor]], metadata: dict) -> None:
    """Write {module: (down, up)} for the model's Linears and its time embedder copy, with the metadata."""
    from safetensors.torch import save_file
    missing = [k for k in REQUIRED if k not in metadata]
    if missing:
        raise ValueError(f"two-time LoRA metadata lacks {missing}")
    tensors = {}
    for prefix, layers in (("base", base), ("second", second)):
        for module, (down, up) in layers.items():
            tensors[f"{prefix}.{module}.{DOWN}"] = down.detach().float().contiguous().cpu()
            tensors[f"{prefix}.{module}.{UP}"] = up.detach().float().contiguous().cpu()
    meta = {"fmtt.format": FORMAT, "fmtt.version": VERSION,
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, meta)
    os.replace(tmp, path)  # a Cancel or crash mid-write never leaves half a file under the real name


def is_two_time_lora(path) -> bool:
    header = read_safetensors_header(os.fspath(path), what="flow-map LoRA")
    return (header.get("__metadata__") or {}).get("fmtt.format") == FORMAT


def load_two_time_lora(path) -> tuple[dict, dict, dict]:
    """(base, second, metadata): {module: (down, up)} float32 tensors, and the metadata with JSON values decoded."""
    from safetensors.torch import load_file
    path = os.fspath(path)
    header = read_safetensors_header(path, what="flow-map LoRA")
    raw = header.get("__metadata__") or {}
    name = os.path.basename(path)
    if raw.get("fmtt.format") != FORMAT:
        raise FMTTInputError(f"FMTT: '{name}' is not a two-time flow-map LoRA written by FMTT Train Flow Map.")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise FMTTInputError(f"FMTT: '{name}' lacks the metadata {missing}; it was not written by this pack's "
                             "trainer. Train it again with FMTT Train Flow Map.")
    metadata = {k: _decode(v) for k, v in raw.items()}
    tensors = load_file(path)
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {"base": {}, "second": {}}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        for side, suffix in (("down", DOWN), ("up", UP)):
            if prefix in layers and rest.endswith("." + suffix):
                layers[prefix].setdefault(rest[:-len(suffix) - 1], {})[side] = value.float()
                break
        else:
            raise FMTTInputError(f"FMTT: '{name}' holds an unexpected tensor {key!r}; the file is damaged.")
    out = []
    for prefix in ("base", "second"):
        pairs = {}
        for module, sides in layers[prefix].items():
            if set(sides) != {"down", "up"}:
                raise FMTTInputError(f"FMTT: '{name}': the LoRA of {module} is incomplete; the file is damaged.")
            pairs[module] = (sides["down"], sides["up"])
        out.append(pairs)
    return out[0], out[1], metadata


def _decode(value: str):
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value
