"""FMRG's FLUX two-time flow-map LoRA format (DualTimeEmbedder + diffusers LoRA) and the pack's one two-time mechanism,
a TwoTimeAdapter (nodes/two_time.py): a file is read onto ComfyUI's Flux as an adapter (fmrg_adapter), which the
look-ahead runs like any trained flow map, and a FLUX adapter the trainer made is written as such a file
(write_fmrg_format), so FMRG's own code loads it.

What the file means is fmtt_core.flow_maps.two_time_lora's business; this module maps it onto ComfyUI's modules:

* LoRA keys go through ComfyUI's own diffusers -> ComfyUI mapping (comfy.lora.model_lora_keys_unet, built on
  comfy.utils.flux_to_diffusers) into the adapter's SideLoRA: to_q / to_k / to_v land in row slices of the fused
  qkv / linear1 weights, the final layer's scale / shift halves are swapped, exactly as ComfyUI's LoraLoader would
  merge them, and the LoRA runs beside the weights only inside the look-ahead's calls (nodes/side_lora.py).
* The second embedder's LoRA (`time_text_embed.second_embedder.*`) becomes the LoRA of the adapter's copies of
  time_in / guidance_in / vector_in (diffusers' timestep / guidance / text embedder), with the file's scale and the
  strength in its up matrix; full tensors (a `modules_to_save` save) and peft's lora_B biases replace the copy's
  weight / bias. The adapter averages each embedder with its copy, the copy of time_in embedding sigma':
  vec = (E1(sigma) + E2(sigma')) / 2, FMRG's DualTimeEmbedder.
"""
from __future__ import annotations

import json
import os
import re

import comfy.model_base
import comfy.utils
import torch

from ..fmtt_core import FMTTInputError
from ..fmtt_core.flow_maps import TwoTimeLoRA, inspect_two_time_lora
from .side_lora import SideLoRA
from .two_time import TwoTimeAdapter, family_of


def check_flux(model) -> None:
    base = getattr(model, "model", None)
    if not isinstance(base, comfy.model_base.Flux) or isinstance(base, getattr(comfy.model_base, "Flux2", ())) \
            or getattr(base.diffusion_model, "time_in", None) is None:
        name = type(base).__name__ if base is not None else type(model).__name__
        raise FMTTInputError(f"FMTT: the MODEL is {name}, not FLUX.1: the flow-map LoRA was trained on FLUX.1-dev. "
                             "Connect the FLUX.1-dev model (Load Diffusion Model with flux1-dev).")


def fmrg_adapter(model, path: str, strength: float) -> TwoTimeAdapter:
    """FMRG's file on this FLUX MODEL: its base layers' LoRA as a SideLoRA, its second embedder's as the copies'."""
    info = inspect_two_time_lora(path)  # the header only: wrong files are refused before anything is loaded
    check_flux(model)
    with torch.inference_mode(False):
        tensors = info.load_tensors()
        second, replaced = _second_embedder(model, info, tensors, strength)
        file_name = info.path.rsplit("/", 1)[-1]
        try:
            side = SideLoRA.build(model, comfy_named(info, tensors), strength, file_name)
        except FMTTInputError as e:  # the base layers: the same fix as above, in FLUX.1-dev's words
            raise FMTTInputError(f"{e} (FMRG's LoRA needs the FLUX.1-dev it was trained on, with its guidance "
                                 "embedder.)") from None
        return TwoTimeAdapter(family_of(model.model), model, {}, second, trainable=False, name=file_name, side=side,
                              replaced=replaced)


def _second_embedder(model, info: TwoTimeLoRA, tensors: dict, strength: float) -> tuple[dict, dict]:
    """The file's `second_embedder.*` under the adapter's names ("time_in.in_layer"): ({name: (down, up)} with the
    LoRA's scale and the strength in up, {name: {"weight" / "bias": tensor}} for what the file replaces)."""
    base = model.model
    file_name = info.path.rsplit("/", 1)[-1]
    state = base.state_dict()
    diffusers_to_comfy = comfy.utils.flux_to_diffusers(base.model_config.unet_config, output_prefix="diffusion_model.")
    second, replaced, unmatched, wrong = {}, {}, [], []
    for name, value in [*info.second.items(), *info.second_full.items()]:
        sub = name if name in info.second else name.rsplit(".", 1)[0]
        target = diffusers_to_comfy.get(f"time_text_embed.{sub}.weight")
        if not isinstance(target, str) or target not in state:
            unmatched.append("second_embedder." + name)
            continue
        layer = target.removeprefix("diffusion_model.").removesuffix(".weight")  # "time_in.in_layer"
        if name not in info.second:  # a full tensor replacing the copy's weight or bias
            replaced.setdefault(layer, {})[name.rsplit(".", 1)[1]] = tensors[value].float()
            continue
        down, up = tensors[value.down].float(), tensors[value.up].float() * (value.scale * strength)
        if (up.shape[0], down.shape[1]) != tuple(state[target].shape):
            wrong.append(f"second_embedder.{name}: {(up.shape[0], down.shape[1])} vs {tuple(state[target].shape)}")
            continue
        second[layer] = (down, up)
        if value.bias is not None:  # peft's lora_B bias: added to the copy's bias
            replaced.setdefault(layer, {})["bias_delta"] = value.bias_delta(tensors) * strength
    if unmatched:
        raise FMTTInputError(
            f"FMTT: {len(unmatched)} layer(s) of '{file_name}' match nothing in this FLUX model "
            f"(e.g. {', '.join(unmatched[:4])}). The LoRA was made for another model: use the FLUX.1-dev it was "
            "trained on (FMRG's LoRA needs FLUX.1-dev with its guidance embedder).")
    if wrong:
        raise FMTTInputError(f"FMTT: the LoRA's shapes do not fit this FLUX model ({'; '.join(wrong[:3])}): it is "
                             "for another model size. Use the FLUX.1-dev it was trained on.")
    for layer, new in replaced.items():
        delta = new.pop("bias_delta", None)
        if delta is not None:
            new["bias"] = new.get("bias", state[f"diffusion_model.{layer}.bias"].float()) + delta
    return second, replaced


def comfy_named(info: TwoTimeLoRA, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base layers' LoRA under the diffusers names ComfyUI's key map knows (`transformer.<module>`), with the
    file's scale (peft metadata, rsLoRA, alpha keys) written as the alpha LoraLoader reads: alpha = scale * rank."""
    named = {}
    for name, layer in info.base.items():
        down = tensors[layer.down]
        named[f"transformer.{name}.lora_A.weight"] = down
        named[f"transformer.{name}.lora_B.weight"] = tensors[layer.up]
        named[f"transformer.{name}.alpha"] = torch.tensor(layer.scale * down.shape[0], dtype=torch.float64)
        if layer.bias is not None:
            named[f"transformer.{name}.lora_B.bias"] = tensors[layer.bias]
    return named


FMRG_EMBEDDERS = {"time_in": "timestep_embedder", "guidance_in": "guidance_embedder", "vector_in": "text_embedder"}
FMRG_LAYERS = {"in_layer": "linear_1", "out_layer": "linear_2"}
# Other names ComfyUI's map accepts for the same weights (LyCORIS, FLUX.2); FLUX.1's diffusers model has none of them.
FMRG_ALIASES = re.compile(r"linear_in|linear_out|to_qkv_mlp_proj|single_transformer_blocks\.\d+\.attn\.to_out\.")


def write_fmrg_format(adapter: TwoTimeAdapter, base, metadata: dict, path: str) -> None:
    """A FLUX flow map in FMRG's format (diffusers / peft names, DualTimeEmbedder paths; two_time_lora.py), so FMRG's
    own code loads it with `load_lora_weights` unchanged. ComfyUI's fused qkv / linear1 LoRAs are split into the
    q / k / v / mlp row slices diffusers keeps apart (same down, the up's rows): the same delta W, exactly."""
    from safetensors.torch import save_file
    lora, second = adapter.tensors()
    targets: dict[str, list[tuple[str, tuple | None]]] = {}
    for name, target in comfy.utils.flux_to_diffusers(base.model_config.unet_config, output_prefix="").items():
        if FMRG_ALIASES.search(name):
            continue
        if isinstance(target, str):
            targets.setdefault(target, []).append((name, None))
        elif target[1] is not None:
            targets.setdefault(target[0], []).append((name, (int(target[1][1]), int(target[1][2]))))
    tensors = {}

    def put(module: str, down: torch.Tensor, up: torch.Tensor):
        tensors[f"transformer.{module}.lora_A.weight"] = down.float().cpu().clone()  # one per diffusers layer
        tensors[f"transformer.{module}.lora_B.weight"] = up.float().cpu().clone()

    for path_, (down, up) in lora.items():
        found = targets.get(path_ + ".weight", [])
        if not found:
            raise FMTTInputError(f"FMTT: internal error, the FLUX layer {path_} has no diffusers name.")
        for name, rows in found:
            module = name.removesuffix(".weight").replace("time_text_embed.", "time_text_embed.original_embedder.", 1)
            put(module, down, up if rows is None else up[rows[0]:rows[0] + rows[1]])
    for path_, (down, up) in second.items():
        embedder, layer = path_.split(".")
        put(f"time_text_embed.second_embedder.{FMRG_EMBEDDERS[embedder]}.{FMRG_LAYERS[layer]}", down, up)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, {"fmtt.trained": json.dumps(metadata)})
    os.replace(tmp, path)
