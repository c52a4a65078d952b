"""Two-time flow-map LoRAs for FLUX: what such a file holds, what it means, and bad files told apart (torch only).

The one public file of this kind is the Lagrangian-self-distilled FLUX.1-dev flow map of FMRG
(huggingface `gabeguofanclub/flux-1-dev-flowmap-lsd`, code github.com/jrrhuang/fmrg, Apache-2.0).
Its semantics, from FMRG's `flux_two_timestep/dual_time_embedder.py` and `fluxfm_sampler_reward.py`:

* the diffusers `FluxTransformer2DModel` gets `time_text_embed = DualTimeEmbedder(time_text_embed)`, a module
  holding `original_embedder` (the model's own `CombinedTimestepGuidanceTextProjEmbeddings`) and
  `second_embedder = copy.deepcopy(original_embedder)`;
* with a timestep pair (sigma, sigma') both are embedded, each by its own embedder with the same guidance and
  pooled text, and the two conditioning vectors are averaged: vec = (E1(sigma) + E2(sigma')) / 2;
* then `pipeline.load_lora_weights(file)` loads the LoRA (diffusers / peft names) on that transformer;
* the output u is a velocity in the sigma clock (sigma = 1 noise, 0 data):
  X(z; sigma -> sigma') = z + (sigma' - sigma) u(z, sigma, sigma')  (the scheduler's Euler step).

Keys: what was established and what was assumed (see also the README section "FLUX flow-map LoRA").
Established from the code: FMRG loads the file *only* through `FluxLoraLoaderMixin.load_lora_weights` after
wrapping. That loader keeps `transformer.*` keys whose names contain "lora" and builds a peft `LoraConfig` (from
the file's `lora_adapter_metadata` when present, else r = alpha = rank); full tensors of `second_embedder.*`
would only be read if that metadata declared them in `modules_to_save`. Because `DualTimeEmbedder` sits at
`time_text_embed`, every key touching the embedders is named `transformer.time_text_embed.original_embedder.…`
or `transformer.time_text_embed.second_embedder.…`: a plain FLUX LoRA never holds either. So the second
embedder is *a LoRA on a copy of the base model's time_text_embed* (base weights = FLUX.1-dev's own), and the
scale of every LoRA is alpha / r (alpha / sqrt(r) with rsLoRA) from the metadata, else 1.
Assumed (could not be checked here: the hub is not reachable from this environment): that the published files
target at least `time_text_embed.{original,second}_embedder.timestep_embedder.linear_{1,2}` (a third-party test
written against the 512 px file lists exactly these 8 embedder keys) plus transformer-block layers; that they
use peft key names (`lora_A` / `lora_B`). The loader does not depend on either: any diffusers-named layer is
accepted, full `second_embedder.*` tensors (a `modules_to_save` save) replace the copy's weights, and a file
whose keys touch neither embedder is refused, since nothing in it would make X depend on sigma'.

A second two-time format is one more `TwoTimeFormat` in FORMATS (a name, `matches(keys)`, `split(...)`); the
node layer maps whatever `split` returns. The MeanFlow adapters of ostris' ai-toolkit are not supported: no
public description of their key layout and time conditioning was found to implement them against.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import FMTTInputError
from ..files import read_safetensors_header

PREFIX = "transformer."
ORIGINAL, SECOND = "time_text_embed.original_embedder.", "time_text_embed.second_embedder."
LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)"
                      r"(?:\.default)?\.(?P<param>weight|bias)$")
DOWN, UP = ("lora_A", "lora_down", "lora.down"), ("lora_B", "lora_up", "lora.up")

# Key fragments that identify a model family (checked in order: the first family that matches wins).
FAMILIES = (
    ("FLUX", ("single_transformer_blocks.", "double_blocks.", "single_blocks.", "time_text_embed.",
              "lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_transformer_single_transformer_blocks_")),
    ("SD1.x / SDXL", ("down_blocks.", "up_blocks.", "mid_block.", "input_blocks.", "output_blocks.", "lora_unet_down_",
                      "lora_unet_up_", "lora_unet_input_", "lora_te1_", "lora_te_")),
    ("SD3 / SD3.5", ("context_block.", "x_block.", "joint_blocks.")),
    ("Z-Image / Lumina", ("noise_refiner.", "context_refiner.", "layers.0.attention.")),
    ("Wan / video", ("blocks.0.self_attn.", "blocks.0.cross_attn.")),
)


class FlowMapLoRAError(FMTTInputError):
    """A LoRA file that is not a two-time flow-map LoRA this pack can load, with what to do instead."""


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA: delta W = scale * up @ down, up [out, r], down [r, in], read from the file's keys; with peft's
    lora_bias=True also delta b = scale * bias (peft scales the up layer's bias with the rest of it)."""

    down: str
    up: str
    scale: float
    bias: str | None = None

    def delta(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * tensors[self.up].float() @ tensors[self.down].float()

    def bias_delta(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None if self.bias is None else self.scale * tensors[self.bias].float()


@dataclass(frozen=True)
class TwoTimeLoRA:
    """What a two-time LoRA file holds, in diffusers' module names (without the `transformer.` prefix).

    base:        LoRA on the base transformer's layers, the original time embedder included
                 (`time_text_embed.timestep_embedder.linear_1`, ...: where diffusers keeps it without the wrapper)
    second:      LoRA on the copy of `time_text_embed`, keyed by sub-module (`timestep_embedder.linear_1`, ...)
    second_full: full tensors replacing the copy's (`timestep_embedder.linear_1.weight` -> file key)
    """

    path: str
    format: str
    base: dict[str, LoraLayer]
    second: dict[str, LoraLayer] = field(default_factory=dict)
    second_full: dict[str, str] = field(default_factory=dict)
    rank: int = 0

    def keys(self) -> list[str]:
        layers = [*self.base.values(), *self.second.values()]
        return sorted({k for layer in layers for k in (layer.down, layer.up, layer.bias) if k is not None}
                      | set(self.second_full.values()))

    def load_tensors(self, device="cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        tensors = load_file(self.path, device=str(device))
        return {k: tensors[k] for k in self.keys()}

    def summary(self) -> str:
        return (f"{self.format}: {len(self.base)} base layers, {len(self.second)} LoRA + "
                f"{len(self.second_full)} full tensors on the second time embedder, rank {self.rank}")


# ------------------------------------------------------------------ reading the key names

def family_of(keys) -> str | None:
    for family, marks in FAMILIES:
        if any(m in k for k in keys for m in marks):
            return family
    return None


def _peft_config(metadata: dict) -> dict | None:
    """The peft LoraConfig diffusers saved with the weights (`lora_adapter_metadata`, keys `transformer.<field>`)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return {k[len(PREFIX):]: v for k, v in packed.items() if k.startswith(PREFIX)} or None


def _pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: a pattern matches a module name that ends with it at a dot boundary."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _scale(module: str, rank: int, config: dict | None, alphas: dict[str, float]) -> float:
    """LoRA scale as diffusers / peft apply it: alpha / r (or alpha / sqrt(r) with rsLoRA); without metadata or
    alpha keys, alpha = r (scale 1), the diffusers convention for files saved without either."""
    if config is not None:
        r = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        return alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    if module in alphas:
        return alphas[module] / rank
    return 1.0


def _lora_layers(header: dict) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{module: {"down": key, "up": key}} for every LoRA pair, and the keys that are not LoRA weights."""
    pairs, other = {}, []
    for key in header:
        if key == "__metadata__":
            continue
        m = LORA_KEY.match(key)
        if m is None:
            other.append(key)
            continue
        side = "down" if m["part"] in DOWN else "up"
        if m["param"] == "bias":
            if side == "down":  # peft's lora_bias puts a bias on B only
                other.append(key)
                continue
            side = "bias"
        pairs.setdefault(m["module"], {})[side] = key
    return pairs, other


# ------------------------------------------------------------------ formats

class FMRGDualTime:
    """FMRG's DualTimeEmbedder + diffusers / peft LoRA (see the module docstring)."""

    name = "fmrg_dual_time"

    @staticmethod
    def matches(keys) -> bool:
        return any(ORIGINAL in k or SECOND in k for k in keys)

    @staticmethod
    def split(path: str, header: dict) -> TwoTimeLoRA:
        metadata = header.get("__metadata__") or {}
        config = _peft_config(metadata)
        pairs, other = _lora_layers(header)
        alphas = {k[:-len(".alpha")].removeprefix(PREFIX): float(_scalar(path, k))
                  for k in other if k.endswith(".alpha")}
        other = [k for k in other if not k.endswith(".alpha")]
        bad = [k for k in other if not k.startswith(PREFIX + SECOND)]
        if any("lora_magnitude_vector" in k or "dora_scale" in k for k in bad):
            raise FlowMapLoRAError(f"'{os.path.basename(path)}' is a DoRA; this pack loads plain LoRA flow maps only.")
        base, second, full, ranks = {}, {}, {}, set()
        for module, sides in pairs.items():
            if not {"down", "up"} <= set(sides):
                raise FlowMapLoRAError(f"'{os.path.basename(path)}': the LoRA of {module} has only its "
                                       f"{' and '.join(sides)} tensor(s); the file is incomplete. Download it again.")
            name = module.removeprefix(PREFIX)
            down, up = header[sides["down"]]["shape"], header[sides["up"]]["shape"]
            rank = int(down[0])
            if len(down) != 2 or len(up) != 2 or int(up[1]) != rank:
                raise FlowMapLoRAError(
                    f"'{os.path.basename(path)}': the LoRA of {module} has A {tuple(down)} and B {tuple(up)}: their "
                    "ranks disagree (A is [r, in], B is [out, r]). The file is damaged or was edited; export it again.")
            bias = sides.get("bias")
            if bias is not None and list(header[bias]["shape"]) != [int(up[0])]:
                raise FlowMapLoRAError(f"'{os.path.basename(path)}': the LoRA bias of {module} has shape "
                                       f"{tuple(header[bias]['shape'])}, its B matrix {tuple(up)} rows; the file is "
                                       "damaged. Export it again.")
            ranks.add(rank)
            layer = LoraLayer(sides["down"], sides["up"], _scale(name, rank, config, alphas), bias)
            if name.startswith(SECOND):
                second[name[len(SECOND):]] = layer
            else:  # the original embedder is the model's own time_text_embed: the name diffusers and ComfyUI map
                base[name.replace(ORIGINAL, "time_text_embed.", 1)] = layer
        for key in other:
            if key.startswith(PREFIX + SECOND):
                full[key[len(PREFIX + SECOND):]] = key
        if bad:
            raise FlowMapLoRAError(
                f"'{os.path.basename(path)}' holds {len(bad)} tensors that are neither LoRA weights nor second time "
                f"embedder weights (e.g. {', '.join(bad[:3])}); it is not a two-time flow-map LoRA this pack reads.")
        return TwoTimeLoRA(path, FMRGDualTime.name, base, second, full, max(ranks, default=0))


def _scalar(path: str, key: str) -> float:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return float(f.get_tensor(key).float().item())


FORMATS = (FMRGDualTime,)


def inspect_two_time_lora(path: str | os.PathLike) -> TwoTimeLoRA:
    """Read a LoRA file's header and tell what it is: a two-time flow-map LoRA (returned), or an error naming what
    the file is instead and what to do with it. Only the header is read (the file is checked to be complete)."""
    path = os.fspath(path)
    header = read_safetensors_header(path, what="flow-map LoRA")
    keys = [k for k in header if k != "__metadata__"]
    name = os.path.basename(path)
    if (header.get("__metadata__") or {}).get("fmtt.format") == "flow_map":
        raise FlowMapLoRAError(f"'{name}' is a flow map in the pack's own format, not a LoRA: load it with "
                               "'FMTT Look-ahead (flow map file)' from models/fmtt_flow_maps/.")
    if not keys:
        raise FlowMapLoRAError(f"'{name}' holds no tensors.")
    for fmt in FORMATS:
        if fmt.matches(keys):
            return fmt.split(path, header)
    family = family_of(keys)
    is_lora = any(LORA_KEY.match(k) or ".alpha" in k or "lora" in k for k in keys)
    if not is_lora:
        raise FlowMapLoRAError(f"'{name}' is not a LoRA (its tensors are named like {keys[0]!r}, a full model). "
                               "Load models with their loader nodes; this node takes a two-time flow-map LoRA.")
    if any(("second_embedder" in k or "original_embedder" in k) and not k.startswith(PREFIX) for k in keys):
        raise FlowMapLoRAError(
            f"'{name}' is a two-time flow-map LoRA in kohya naming (keys like "
            f"{next(k for k in keys if 'embedder' in k)!r}); this node reads the diffusers / peft naming FMRG's "
            f"loader uses ('{PREFIX}{SECOND}timestep_embedder.linear_1.lora_A.weight', ...). Save the LoRA with "
            "diffusers' save_lora_weights (or convert its keys to that naming) and load that file.")
    if family == "FLUX":
        raise FlowMapLoRAError(
            f"'{name}' is an ordinary FLUX LoRA: it has no second time embedder "
            f"(no '{SECOND}*' or '{ORIGINAL}*' keys), so it is not a flow-map LoRA; load it with LoraLoader. "
            "The flow-map LoRA is FMRG's pytorch_lora_weights.safetensors (see the README).")
    if family is not None:
        raise FlowMapLoRAError(f"'{name}' is a LoRA for {family}, not for FLUX.1-dev; load it with LoraLoader on "
                               "that model. This node takes a FLUX.1-dev two-time flow-map LoRA.")
    raise FlowMapLoRAError(f"'{name}' is a LoRA for an unknown model (keys like {', '.join(keys[:3])}); this node "
                           "takes a FLUX.1-dev two-time flow-map LoRA in diffusers / peft naming.")
